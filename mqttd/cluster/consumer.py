"""An ordered consumer: read one subject filter of a stream in stream order, from a start
(everything, the last message per subject, new only, or a sequence), through an ephemeral
push consumer (no acks, flow control, idle heartbeats, memory storage, R1).

It is read by iterating; there is no task of its own. Flow-control requests are answered as
messages are read, so the server sends no faster than the reader takes them. A gap in the
consumer sequence (a message dropped by a full subscription channel, say), a heartbeat
reporting a later consumer sequence, no message or heartbeat for three heartbeat intervals
(its server died, or it was deleted) or an error status makes it delete the consumer and
create a new one from the next stream sequence: nothing is skipped or repeated. The deliver
subject has a literal SUB of its own: nats-server 2.9.10 does not deliver a push consumer to
an interest that is only a wildcard (such as the client's reply inbox).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import attrs
import trio

from mqttd.cluster import nats_protocol as proto
from mqttd.cluster.jetstream import NS, JetStream, StoredMsg
from mqttd.cluster.nats_protocol import Msg
from mqttd.cluster.nats_values import NatsError, Subscription

log = logging.getLogger("mqttd.cluster.jetstream")

DeliverPolicy = Literal["all", "last_per_subject", "new"]


@asynccontextmanager
async def watch(
    js: JetStream,
    stream: str,
    filter_subject: str,
    *,
    deliver_policy: DeliverPolicy = "all",
    start_seq: int | None = None,
    heartbeat_s: float = 2.0,
    capacity: int = 4096,
) -> AsyncIterator[OrderedConsumer]:
    """Read ``filter_subject`` of ``stream`` in order, from ``start_seq`` or the
    ``deliver_policy`` start; the consumer is deleted on the way out."""
    consumer = OrderedConsumer(js, stream, filter_subject, deliver_policy, start_seq,
                               heartbeat_s, capacity)
    await consumer._create()
    try:
        yield consumer
    finally:
        consumer._close()


@attrs.frozen
class _AckInfo:
    stream_seq: int
    consumer_seq: int
    pending: int
    timestamp_ns: int


def parse_ack_subject(subject: str) -> _AckInfo | None:
    """``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens,
    what 2.9.10 sends), or the later form with domain and account hash (12 tokens)."""
    tokens = subject.split(".")
    if tokens[:2] != ["$JS", "ACK"]:
        return None
    if len(tokens) == 9:
        base = 4
    elif len(tokens) >= 11:
        base = 6
    else:
        return None
    try:
        return _AckInfo(int(tokens[base + 1]), int(tokens[base + 2]), int(tokens[base + 4]),
                        int(tokens[base + 3]))
    except ValueError:
        return None


@attrs.define(eq=False)
class OrderedConsumer:
    """Iterate for :class:`StoredMsg` in stream order; a ``None`` comes once, when every
    message that existed at the start has been delivered (``caught_up``)."""

    js: JetStream
    stream: str
    filter_subject: str
    deliver_policy: str
    start_seq: int | None
    heartbeat_s: float
    capacity: int
    name: str | None = None
    resets: int = 0
    caught_up: bool = False
    _marker_sent: bool = False
    _sub: Subscription | None = None
    _stream_seq: int = 0  # last delivered
    _consumer_seq: int = 0

    def _config(self, deliver_subject: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "deliver_subject": deliver_subject,
            "filter_subject": self.filter_subject,
            "ack_policy": "none",
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": round(self.heartbeat_s * NS),
            "inactive_threshold": round(max(5.0, 5 * self.heartbeat_s) * NS),
            "mem_storage": True,
            "num_replicas": 1,
        }
        # resuming after a reset: from the next stream sequence (after an interrupted
        # last-per-subject start this may also deliver older messages of a subject, then
        # its last one: the final state per subject is the same)
        if self._stream_seq:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=self._stream_seq + 1)
        elif self.start_seq is not None:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=self.start_seq)
        else:
            config["deliver_policy"] = self.deliver_policy
        return config

    async def _create(self) -> None:
        client = self.js.client
        sub = client.subscribe_nowait(client.new_inbox(), capacity=self.capacity)
        try:
            data = await self.js.api(
                f"CONSUMER.CREATE.{self.stream}",
                {"stream_name": self.stream, "config": self._config(sub.subject)},
            )
        except BaseException:
            await sub.unsubscribe()
            raise
        self._sub, self.name, self._consumer_seq = sub, str(data["name"]), 0
        if not self._stream_seq and self.deliver_policy == "new" and self.start_seq is None:
            # a reset before the first message must not skip what came after this point
            self._stream_seq = int((data.get("delivered") or {}).get("stream_seq", 0))
        if not self.caught_up and int(data.get("num_pending", 0)) == 0:
            self.caught_up = True

    def _close(self) -> None:
        client = self.js.client
        if self._sub is not None:
            client._unsubscribe(self._sub)
            self._sub = None
        if self.name is not None and not client.closed:
            # no reply wanted: the server deletes it, or its inactive threshold does
            try:
                client.publish_nowait(f"{self.js.prefix}.CONSUMER.DELETE.{self.stream}.{self.name}")
            except (trio.WouldBlock, NatsError):
                pass
            self.name = None

    async def _reset(self, why: str) -> None:
        log.info("ordered consumer on %s %s: %s; recreating from stream seq %d",
                 self.stream, self.filter_subject, why, self._stream_seq + 1)
        self.resets += 1
        self._close()
        backoff = 0.05
        while True:
            try:
                await self._create()
                return
            except (NatsError, trio.WouldBlock) as exc:
                log.info("recreating the ordered consumer on %s failed: %s", self.stream, exc)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 1.0)

    def __aiter__(self) -> OrderedConsumer:
        return self

    async def __anext__(self) -> StoredMsg | None:
        while True:
            if self.caught_up and not self._marker_sent:
                self._marker_sent = True
                return None
            assert self._sub is not None
            msg: Msg | None = None
            with trio.move_on_after(3 * self.heartbeat_s):
                msg = await self._sub.next_msg()
            if msg is None:
                await self._reset("no message or heartbeat for three heartbeat intervals")
                continue
            stored = await self._handle(msg)
            if stored is not None:
                return stored

    async def _handle(self, msg: Msg) -> StoredMsg | None:
        client = self.js.client
        if msg.status == proto.STATUS_CONTROL:
            if msg.reply:  # flow control request: answer so the server sends more
                await client.publish(msg.reply)
            stalled = msg.header("Nats-Consumer-Stalled")
            if stalled:
                await client.publish(stalled)
            last = msg.header("Nats-Last-Consumer")
            if last is not None and int(last) != self._consumer_seq:
                await self._reset(f"heartbeat says consumer seq {last}, got {self._consumer_seq}")
            return None
        if msg.status is not None:
            await self._reset(f"status {msg.status} {msg.description}")
            return None
        info = parse_ack_subject(msg.reply or "")
        if info is None:
            log.warning("ordered consumer on %s: message without an ack subject", self.stream)
            return None
        if info.consumer_seq != self._consumer_seq + 1:
            await self._reset(f"gap: consumer seq {info.consumer_seq} after {self._consumer_seq}")
            return None
        self._consumer_seq, self._stream_seq = info.consumer_seq, info.stream_seq
        if info.pending == 0:
            self.caught_up = True
        time = datetime.fromtimestamp(info.timestamp_ns / NS, UTC).isoformat()
        return StoredMsg(msg.subject, info.stream_seq, msg.payload, dict(msg.headers or {}),
                         time)
