"""The JetStream subset the cluster design uses, over :class:`NatsClient` requests.

* streams: create, update, ensure (create, or update when the name is taken with another
  configuration), info, delete (``$JS.API.STREAM.<OP>.<name>``, JSON);
* publish with PubAck: ``Nats-Msg-Id`` (deduplication within the stream's duplicate window)
  and ``Nats-Expected-Last-Subject-Sequence`` (compare and set); ``publish_nowait`` returns
  a :class:`PendingPubAck`, so many publishes are in flight at once, each ack matched to its
  request by the client's reply inbox;
* reads: ``direct_get`` (``$JS.API.DIRECT.GET.<stream>``, any replica answers, the stream
  needs ``allow_direct``) by ``seq``, ``last_by_subj`` or ``seq`` + ``next_by_subj``; and
  ``get_msg`` (``$JS.API.STREAM.MSG.GET.<stream>``, answered by the stream leader, so it
  sees every acknowledged write);
* purge, whole or one subject (``filter``), below a sequence (``seq``) or keeping the last
  ``keep``;
* (:mod:`mqttd.cluster.consumer` adds an ordered consumer for watching a subject filter.)

Error replies (``{"error": {"code", "err_code", "description"}}``) raise
:class:`JetStreamError`, or a subclass for the codes callers act on.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from mqttd.cluster import nats_protocol as proto
from mqttd.cluster.nats_client import NatsClient
from mqttd.cluster.nats_protocol import Headers, HeadersIn, Msg
from mqttd.cluster.nats_values import NatsError, PendingReply

log = logging.getLogger("mqttd.cluster.jetstream")

API_PREFIX = "$JS.API"
NS = 1_000_000_000

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_STREAM = "Nats-Expected-Stream"
# headers nats-server adds to a direct get reply (2.9.10 sends the first four)
DIRECT_HEADERS = ("Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp",
                  "Nats-Last-Sequence", "Nats-Num-Pending")

# err_code values of nats-server's JetStream API errors (server/errors.json)
ERR_STREAM_NOT_FOUND = 10059
ERR_STREAM_NAME_IN_USE = 10058
ERR_WRONG_LAST_SEQUENCE = 10071
# what newer servers answer a compare-and-set that lost on a clustered stream (2.15.1,
# checked here; 2.9.10 answers 10071)
ERR_WRONG_LAST_SEQUENCE_CLUSTERED = 10164
ERR_MAX_MSGS_PER_SUBJECT = 10077
ERR_NO_MESSAGE_FOUND = 10037


class JetStreamError(NatsError):
    """An error reply of the JetStream API (``code`` is HTTP-like, ``err_code`` is nats's)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"JetStream error {code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code
        self.description = description

    @classmethod
    def from_api(cls, error: Mapping[str, Any]) -> JetStreamError:
        err_code = int(error.get("err_code", 0))
        kind = _ERRORS.get(err_code, JetStreamError)
        return kind(int(error.get("code", 0)), err_code, str(error.get("description", "")))


class StreamNotFoundError(JetStreamError):
    pass


class WrongLastSequenceError(JetStreamError):
    """A compare-and-set publish lost: the subject's last sequence was not the expected one."""


class MaxMsgsPerSubjectError(JetStreamError):
    """``discard_new_per_subject`` refused a publish: the subject is full."""


_ERRORS: dict[int, type[JetStreamError]] = {
    ERR_STREAM_NOT_FOUND: StreamNotFoundError,
    ERR_WRONG_LAST_SEQUENCE: WrongLastSequenceError,
    ERR_WRONG_LAST_SEQUENCE_CLUSTERED: WrongLastSequenceError,
    ERR_MAX_MSGS_PER_SUBJECT: MaxMsgsPerSubjectError,
}


# -- values ---------------------------------------------------------------------------------

Retention = Literal["limits", "workqueue", "interest"]
Storage = Literal["file", "memory"]
Discard = Literal["old", "new"]


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return (values,) if isinstance(values, str) else tuple(values)


@attrs.frozen
class StreamConfig:
    """The stream settings the cluster uses; durations in seconds (the API wants ns)."""

    name: str
    subjects: tuple[str, ...] = attrs.field(converter=_strings, default=())
    retention: Retention = attrs.field(
        default="limits", validator=attrs.validators.in_(("limits", "workqueue", "interest"))
    )
    storage: Storage = attrs.field(default="file",
                                   validator=attrs.validators.in_(("file", "memory")))
    num_replicas: int = 1
    max_msgs: int = -1
    max_bytes: int = -1
    max_msgs_per_subject: int = -1
    max_msg_size: int = -1
    max_age_s: float = 0.0
    discard: Discard = attrs.field(default="old", validator=attrs.validators.in_(("old", "new")))
    discard_new_per_subject: bool = False
    allow_direct: bool = False
    allow_rollup_hdrs: bool = False
    deny_delete: bool = False
    deny_purge: bool = False
    duplicate_window_s: float = 0.0  # 0: the server's default (2 min, or max_age if smaller)

    def to_api(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["subjects"] = list(self.subjects)
        data["max_age"] = round(data.pop("max_age_s") * NS)
        data["duplicate_window"] = round(data.pop("duplicate_window_s") * NS)
        return data

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> StreamConfig:
        names = {a.name for a in attrs.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["subjects"] = tuple(data.get("subjects") or ())
        kwargs["max_age_s"] = data.get("max_age", 0) / NS
        kwargs["duplicate_window_s"] = data.get("duplicate_window", 0) / NS
        return cls(**kwargs)


@attrs.frozen
class StreamState:
    messages: int = 0
    bytes: int = 0
    first_seq: int = 0
    last_seq: int = 0
    num_subjects: int = 0
    num_deleted: int = 0
    consumer_count: int = 0


@attrs.frozen
class PeerInfo:
    name: str
    current: bool = False
    offline: bool = False
    lag: int = 0


@attrs.frozen
class ClusterInfo:
    name: str | None = None
    leader: str | None = None
    replicas: tuple[PeerInfo, ...] = ()


@attrs.frozen
class StreamInfo:
    config: StreamConfig
    state: StreamState
    cluster: ClusterInfo | None = None
    created: str = ""

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> StreamInfo:
        state = data.get("state") or {}
        names = {a.name for a in attrs.fields(StreamState)}
        cluster = None
        if (c := data.get("cluster")) is not None:
            replicas = tuple(
                PeerInfo(r["name"], bool(r.get("current")), bool(r.get("offline")),
                         int(r.get("lag", 0)))
                for r in c.get("replicas") or ()
            )
            cluster = ClusterInfo(c.get("name"), c.get("leader"), replicas)
        return cls(
            StreamConfig.from_api(data["config"]),
            StreamState(**{k: v for k, v in state.items() if k in names}),
            cluster,
            str(data.get("created", "")),
        )


@attrs.frozen
class PubAck:
    stream: str
    seq: int
    duplicate: bool = False


@attrs.frozen
class StoredMsg:
    """A message read back from a stream. ``headers`` are the ones it was published with."""

    subject: str
    seq: int
    payload: bytes
    headers: Headers = attrs.field(factory=dict)
    time: str = ""

    def header(self, key: str) -> str | None:
        values = self.headers.get(key)
        return values[0] if values else None


@attrs.define(eq=False)
class PendingPubAck:
    """A JetStream publish in flight; ``await result()`` for its PubAck."""

    reply: PendingReply

    async def result(self) -> PubAck:
        return parse_pub_ack(await self.reply.wait())


def parse_pub_ack(msg: Msg) -> PubAck:
    data = _json(msg)
    if "error" in data:
        raise JetStreamError.from_api(data["error"])
    return PubAck(str(data["stream"]), int(data["seq"]), bool(data.get("duplicate", False)))


def _json(msg: Msg) -> dict[str, Any]:
    if msg.status is not None:
        raise JetStreamError(msg.status, 0, msg.description or f"status {msg.status}")
    try:
        data = json.loads(msg.payload)
    except ValueError:
        raise JetStreamError(0, 0, f"reply is not JSON: {msg.payload[:80]!r}") from None
    if not isinstance(data, dict):
        raise JetStreamError(0, 0, f"reply is not a JSON object: {msg.payload[:80]!r}")
    return data


# -- the API ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class JetStream:
    client: NatsClient
    timeout_s: float = 5.0
    prefix: str = API_PREFIX

    async def api(self, subject: str, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One API request (``subject`` after the prefix); the reply's JSON, or the error."""
        payload = b"" if request is None else json.dumps(request).encode()
        msg = await self.client.request(f"{self.prefix}.{subject}", payload,
                                        timeout_s=self.timeout_s)
        data = _json(msg)
        if "error" in data:
            raise JetStreamError.from_api(data["error"])
        return data

    async def account_info(self) -> dict[str, Any]:
        return await self.api("INFO")

    # -- streams ------------------------------------------------------------------------

    async def add_stream(self, config: StreamConfig) -> StreamInfo:
        info = StreamInfo.from_api(await self.api(f"STREAM.CREATE.{config.name}",
                                                  config.to_api()))
        check_applied(config, info.config)
        return info

    async def update_stream(self, config: StreamConfig) -> StreamInfo:
        info = StreamInfo.from_api(await self.api(f"STREAM.UPDATE.{config.name}",
                                                  config.to_api()))
        check_applied(config, info.config)
        return info

    async def ensure_stream(self, config: StreamConfig) -> StreamInfo:
        """Create the stream, or update it when it exists with another configuration
        (creating an identical stream again succeeds)."""
        try:
            return await self.add_stream(config)
        except JetStreamError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise
        return await self.update_stream(config)

    async def stream_info(self, name: str) -> StreamInfo:
        return StreamInfo.from_api(await self.api(f"STREAM.INFO.{name}"))

    async def delete_stream(self, name: str) -> None:
        await self.api(f"STREAM.DELETE.{name}")

    async def purge(
        self, stream: str, subject: str | None = None, *, seq: int | None = None,
        keep: int | None = None,
    ) -> int:
        """Purge the stream, or only ``subject``; below ``seq`` or keeping the last ``keep``
        (not both). Returns how many messages went."""
        if seq is not None and keep is not None:
            raise ValueError("purge takes seq or keep, not both")
        request: dict[str, Any] = {}
        if subject is not None:
            request["filter"] = subject
        if seq is not None:
            request["seq"] = seq
        if keep is not None:
            request["keep"] = keep
        return int((await self.api(f"STREAM.PURGE.{stream}", request)).get("purged", 0))

    # -- publishing -----------------------------------------------------------------------

    def publish_nowait(
        self,
        subject: str,
        payload: bytes = b"",
        headers: HeadersIn | None = None,
        *,
        msg_id: str | None = None,
        expected_last_subject_seq: int | None = None,
        expected_stream: str | None = None,
        timeout_s: float | None = None,
    ) -> PendingPubAck:
        """Queue a publish to a stream's subject; the PubAck arrives later. Raises
        ``trio.WouldBlock`` when the client's output buffer or request table is full."""
        merged = _publish_headers(headers, msg_id, expected_last_subject_seq, expected_stream)
        return PendingPubAck(self.client.request_nowait(
            subject, payload, merged, timeout_s or self.timeout_s
        ))

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        headers: HeadersIn | None = None,
        *,
        msg_id: str | None = None,
        expected_last_subject_seq: int | None = None,
        expected_stream: str | None = None,
        timeout_s: float | None = None,
    ) -> PubAck:
        """Publish and wait for the PubAck (the message is stored, replicated when R>1)."""
        merged = _publish_headers(headers, msg_id, expected_last_subject_seq, expected_stream)
        reply = await self.client.request_start(subject, payload, merged,
                                                timeout_s or self.timeout_s)
        return parse_pub_ack(await reply.wait())

    # -- reading --------------------------------------------------------------------------

    async def direct_get(
        self, stream: str, *, seq: int | None = None, last_by_subj: str | None = None,
        next_by_subj: str | None = None,
    ) -> StoredMsg | None:
        """A message by sequence, the last on a subject, or the first on a subject at or
        after ``seq``; ``None`` when there is none. Any replica may answer, so a write
        acknowledged a moment ago may not be visible yet (use :meth:`get_msg` for that)."""
        request = _get_request(seq, last_by_subj, next_by_subj)
        msg = await self.client.request(f"{self.prefix}.DIRECT.GET.{stream}",
                                        json.dumps(request).encode(), timeout_s=self.timeout_s)
        if msg.status == proto.STATUS_NOT_FOUND:
            return None
        if msg.status is not None:
            raise JetStreamError(msg.status, 0, msg.description or f"status {msg.status}")
        headers = dict(msg.headers or {})
        subject = headers.get("Nats-Subject", [""])[0]
        sequence = int(headers.get("Nats-Sequence", ["0"])[0])
        time = headers.get("Nats-Time-Stamp", [""])[0]
        for key in DIRECT_HEADERS:
            headers.pop(key, None)
        return StoredMsg(subject, sequence, msg.payload, headers, time)

    async def get_msg(
        self, stream: str, *, seq: int | None = None, last_by_subj: str | None = None,
        next_by_subj: str | None = None,
    ) -> StoredMsg | None:
        """Like :meth:`direct_get`, through the stream leader (sees every acked write)."""
        request = _get_request(seq, last_by_subj, next_by_subj)
        try:
            data = await self.api(f"STREAM.MSG.GET.{stream}", request)
        except JetStreamError as exc:
            if exc.err_code == ERR_NO_MESSAGE_FOUND:
                return None
            raise
        m = data["message"]
        headers: Headers = {}
        if m.get("hdrs"):
            headers = proto.decode_headers(base64.b64decode(m["hdrs"]))[0]
        payload = base64.b64decode(m.get("data") or b"")
        return StoredMsg(m["subject"], int(m["seq"]), payload, headers, str(m.get("time", "")))


def check_applied(requested: StreamConfig, applied: StreamConfig) -> None:
    """Raise when the server's echo of a stream configuration lacks a setting we asked for:
    nats-server ignores fields it does not know (2.9.10 takes ``allow_msg_ttl`` silently),
    and a durability setting must not be dropped quietly."""
    default = StreamConfig(requested.name)
    ignored = [
        f.name for f in attrs.fields(StreamConfig)
        if getattr(requested, f.name) != getattr(default, f.name)
        and getattr(applied, f.name) != getattr(requested, f.name)
    ]
    if ignored:
        raise JetStreamError(0, 0, f"stream {requested.name}: the server did not apply "
                             f"{', '.join(ignored)} (an older nats-server?)")


def _publish_headers(
    headers: HeadersIn | None,
    msg_id: str | None,
    expected_last_subject_seq: int | None,
    expected_stream: str | None,
) -> HeadersIn | None:
    extra: dict[str, str] = {}
    if msg_id is not None:
        extra[MSG_ID] = msg_id
    if expected_last_subject_seq is not None:
        extra[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_subject_seq)
    if expected_stream is not None:
        extra[EXPECTED_STREAM] = expected_stream
    return {**headers, **extra} if headers else (extra or None)


def _get_request(
    seq: int | None, last_by_subj: str | None, next_by_subj: str | None
) -> dict[str, Any]:
    if last_by_subj is not None:
        if seq is not None or next_by_subj is not None:
            raise ValueError("last_by_subj goes alone")
        return {"last_by_subj": last_by_subj}
    if seq is None:
        raise ValueError("give seq, last_by_subj, or seq and next_by_subj")
    request: dict[str, Any] = {"seq": seq}
    if next_by_subj is not None:
        request["next_by_subj"] = next_by_subj
    return request
