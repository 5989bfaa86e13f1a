"""Key-value buckets on JetStream, laid out as nats-server's KV: bucket ``b`` is the stream
``KV_b`` with subjects ``$KV.b.>``; key ``k`` is the subject ``$KV.b.k``; a value's revision
is its stream sequence; a delete is a message with the header ``KV-Operation: DEL``.

* ``get``: the last message on the key's subject (direct get), ``None`` when missing or
  deleted;
* ``put``; ``update`` with the expected revision (``Nats-Expected-Last-Subject-Sequence``:
  :class:`WrongLastSequenceError` when another write came first); ``create`` only when the
  key has no live value;
* ``delete`` (optionally expecting a revision);
* ``watch``: the current value of every key (deletes included), then a ``None``, then every
  update, through an ordered consumer delivering the last message per subject.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import attrs

from mqttd.cluster.consumer import OrderedConsumer, watch
from mqttd.cluster.jetstream import (
    JetStream,
    Storage,
    StoredMsg,
    StreamConfig,
    WrongLastSequenceError,
)

KV_OPERATION = "KV-Operation"
_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")
_BUCKET = re.compile(r"[a-zA-Z0-9_-]+")

Operation = Literal["PUT", "DEL", "PURGE"]


def check_key(key: str, *, wildcards: bool = False) -> None:
    """Keys as nats's KV allows them: ``[-/_=.a-zA-Z0-9]``, no empty token; ``*`` and a
    final ``>`` only in a watch."""
    tokens = key.split(".")
    ok = bool(key) and all(
        t and (_KEY.fullmatch(t) or (wildcards and (t == "*" or (t == ">" and i == len(tokens)
                                                                   - 1))))
        for i, t in enumerate(tokens)
    )
    if not ok:
        raise ValueError(f"invalid key {key!r}")


@attrs.frozen
class KvEntry:
    bucket: str
    key: str
    value: bytes
    revision: int
    operation: Operation = "PUT"
    time: str = ""


@attrs.define(eq=False)
class KeyValue:
    js: JetStream
    bucket: str

    @property
    def stream(self) -> str:
        return f"KV_{self.bucket}"

    def subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    @classmethod
    def config(
        cls,
        bucket: str,
        *,
        replicas: int = 1,
        history: int = 1,
        storage: Storage = "file",
        max_age_s: float = 0.0,
    ) -> StreamConfig:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}")
        return StreamConfig(
            name=f"KV_{bucket}",
            subjects=(f"$KV.{bucket}.>",),
            storage=storage,
            num_replicas=replicas,
            max_msgs_per_subject=history,
            max_age_s=max_age_s,
            discard="new",
            allow_direct=True,
            allow_rollup_hdrs=True,
            deny_delete=True,
            duplicate_window_s=min(max_age_s, 120.0) if max_age_s else 0.0,
        )

    @classmethod
    async def create_bucket(
        cls,
        js: JetStream,
        bucket: str,
        *,
        replicas: int = 1,
        history: int = 1,
        storage: Storage = "file",
        max_age_s: float = 0.0,
    ) -> KeyValue:
        """Create the bucket's stream (or bring an existing one to this configuration)."""
        config = cls.config(bucket, replicas=replicas, history=history, storage=storage,
                            max_age_s=max_age_s)
        await js.ensure_stream(config)
        return cls(js, bucket)

    @classmethod
    async def bind(cls, js: JetStream, bucket: str) -> KeyValue:
        """An existing bucket (StreamNotFoundError when there is none)."""
        await js.stream_info(f"KV_{bucket}")
        return cls(js, bucket)

    def _entry(self, msg: StoredMsg) -> KvEntry:
        prefix = f"$KV.{self.bucket}."
        op = msg.header(KV_OPERATION) or "PUT"
        operation: Operation = "DEL" if op == "DEL" else "PURGE" if op == "PURGE" else "PUT"
        return KvEntry(self.bucket, msg.subject[len(prefix):], msg.payload, msg.seq,
                       operation, msg.time)

    async def entry(self, key: str, *, leader: bool = False) -> KvEntry | None:
        """The key's last entry, a delete marker included; ``leader`` reads through the
        stream leader (sees every acknowledged write) instead of any replica."""
        check_key(key)
        get = self.js.get_msg if leader else self.js.direct_get
        msg = await get(self.stream, last_by_subj=self.subject(key))
        return None if msg is None else self._entry(msg)

    async def get(self, key: str, *, leader: bool = False) -> KvEntry | None:
        """The key's value, ``None`` when it has none or was deleted."""
        entry = await self.entry(key, leader=leader)
        return entry if entry is not None and entry.operation == "PUT" else None

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value``; returns its revision."""
        check_key(key)
        return (await self.js.publish(self.subject(key), value)).seq

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Store ``value`` if the key's last revision is ``revision`` (0: no entry yet),
        else :class:`WrongLastSequenceError`. Returns the new revision."""
        check_key(key)
        ack = await self.js.publish(self.subject(key), value,
                                    expected_last_subject_seq=revision)
        return ack.seq

    async def create(self, key: str, value: bytes) -> int:
        """Store ``value`` only if the key has no value (never written, or deleted)."""
        try:
            return await self.update(key, value, 0)
        except WrongLastSequenceError:
            entry = await self.entry(key, leader=True)
            if entry is None or entry.operation == "PUT":
                raise
            return await self.update(key, value, entry.revision)

    async def delete(self, key: str, *, revision: int | None = None) -> int:
        """Write a delete marker (if the last revision is ``revision``, when given)."""
        check_key(key)
        ack = await self.js.publish(self.subject(key), b"", {KV_OPERATION: "DEL"},
                                    expected_last_subject_seq=revision)
        return ack.seq

    @asynccontextmanager
    async def watch(
        self, keys: str = ">", *, heartbeat_s: float = 2.0, capacity: int = 4096
    ) -> AsyncIterator[KvWatcher]:
        """Current entries of the keys matching ``keys`` (deletes included), ``None`` once
        they are all delivered, then every change."""
        check_key(keys, wildcards=True)
        async with watch(self.js, self.stream, self.subject(keys),
                         deliver_policy="last_per_subject", heartbeat_s=heartbeat_s,
                         capacity=capacity) as consumer:
            yield KvWatcher(self, consumer)


@attrs.define(eq=False)
class KvWatcher:
    """Iterate for :class:`KvEntry` (and the one ``None`` after the current entries)."""

    kv: KeyValue
    consumer: OrderedConsumer

    def __aiter__(self) -> KvWatcher:
        return self

    async def __anext__(self) -> KvEntry | None:
        msg = await self.consumer.__anext__()
        return None if msg is None else self.kv._entry(msg)
