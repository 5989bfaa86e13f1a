"""The parts of the broker fuzzer (:mod:`tools.fuzz`) that its 3.1.1 and 5.0 halves share:
failures and the error log, generation of topics, filters, packet ids, payloads and 3.1.1
packets, byte mutations, and the broker's own bookkeeping invariants (:func:`check_broker`,
which needs no knowledge of the clients, so the socket mode runs it too)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from mqttd.broker import Broker
from mqttd.codec.packets import (
    PROTOCOL_31,
    PROTOCOL_311,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
    encode_varint,
)
from mqttd.topics import SHARE_PREFIX, matches

if TYPE_CHECKING:
    from mqttd.connection import Connection

GROUP_KEY = "\x00"  # a share group's key in the trie (mqttd.share_groups._KEY_PREFIX)

# -- failures -------------------------------------------------------------------------------------


class FuzzFailure(AssertionError):
    """A finding: an exception that is not MQTTError, a broken invariant, a protocol violation."""


class Hang(BaseException):
    """Raised by the watchdog alarm in the middle of an input that takes far too long."""


def fail(message: str) -> None:
    raise FuzzFailure(message)


class ErrorLog(logging.Handler):
    """Collects what mqttd logs at ERROR and above: the broker's own alarms ("should not
    happen") are findings too. Installed once on the ``mqttd`` and ``persistence`` loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 1000:  # (nobody may be taking them: other tests' errors)
            self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        records, self.records = self.records, []
        return records


_error_log: ErrorLog | None = None


def error_log() -> ErrorLog:
    """The shared ErrorLog, installed on first use (below ERROR nothing is formatted)."""
    global _error_log
    if _error_log is None:
        _error_log = ErrorLog()
        for name in ("mqttd", "persistence"):
            logging.getLogger(name).addHandler(_error_log)
    return _error_log


# -- generation -----------------------------------------------------------------------------------

CLIENT_IDS = ("c0", "c1", "c2", "c3", "", "sensor/é", "c" * 40)
LEVELS = ("a", "b", "c", "", "$SYS", "dev", "é")
FILTER_LEVELS = (*LEVELS, "+", "+", "#", "#", "a#", "+b")
BAD_TOPICS = ("", "a/+", "#", "+", "a\x00b", "a/#/b")
INTERESTING = (0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, 0xC0, 0x10, 0x20, 0x30, 0x62, 0x82, 0xE0)
# Remaining Length fields to put in a packet: small, boundaries, non-minimal, too long, cut short
CORRUPT_LENGTHS = (
    b"\x00", b"\x01", b"\x02", b"\x7f", b"\x80\x01", b"\xff\x7f", b"\xff\xff\x7f",
    b"\xff\xff\xff\x7f", b"\x80\x00", b"\x80\x80\x80\x00", b"\x80\x80\x80\x80\x00",
    b"\xff\xff\xff\xff", b"\xff\xff\xff\xff\x7f", b"\x80", b"\xff\xff",
)
MUTATION_OPS = 9
MAX_PACKET_SIZES = (268_435_460, 1_048_576, 300, 64, 5, 2)


def random_topic(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.02:
        return rng.choice(BAD_TOPICS)
    if r < 0.03:
        return "/".join("l" for _ in range(rng.randint(4, 40)))
    if r < 0.04:
        return "t" * rng.randint(17, 400)
    return "/".join(rng.choice(LEVELS) for _ in range(rng.choice((1, 1, 2, 2, 3, 4))))


def random_filter(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.03:
        return rng.choice(BAD_TOPICS)
    if r < 0.04:
        return "/".join(rng.choice(("l", "+")) for _ in range(rng.randint(4, 20)))
    if r < 0.05:
        return "f" * rng.randint(17, 300)
    return "/".join(rng.choice(FILTER_LEVELS) for _ in range(rng.choice((1, 1, 2, 2, 3))))


def random_packet_id(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.75:
        return rng.randint(1, 4)
    if r < 0.85:
        return 65535
    if r < 0.99:
        return rng.randint(1, 65535)
    return 0


def random_payload(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.3:
        return b""
    if r < 0.85:
        return rng.randbytes(rng.randint(1, 12))
    return rng.randbytes(rng.choice((40, 70, 300)))


def random_connect(rng: random.Random) -> Connect:
    will = None
    if rng.random() < 0.3:
        will = Will(random_topic(rng), random_payload(rng), rng.randint(0, 2), rng.random() < 0.3)
    username = password = None
    if rng.random() < 0.1:
        username = rng.choice(("u", "", "ü"))
        if rng.random() < 0.5:
            password = rng.randbytes(rng.randint(0, 4))
    return Connect(
        rng.choice(CLIENT_IDS),
        clean_session=rng.random() < 0.5,
        keepalive_s=rng.choice((0, 10, 60, 65535)),
        protocol_level=PROTOCOL_31 if rng.random() < 0.1 else PROTOCOL_311,
        will=will,
        username=username,
        password=password,
    )


def random_publish(rng: random.Random) -> Publish:
    qos = rng.choice((0, 0, 1, 1, 2))
    dup = qos > 0 and rng.random() < 0.1
    packet_id = random_packet_id(rng) if qos else 0
    return Publish(random_topic(rng), random_payload(rng), qos, rng.random() < 0.15, dup, packet_id)


def random_client_packet(rng: random.Random) -> Packet:
    """A packet a connected client might send, mostly valid."""
    r = rng.random()
    if r < 0.50:
        return random_publish(rng)
    if r < 0.64:
        subs = tuple(
            Subscription(random_filter(rng), rng.choice((0, 1, 2, 2, 1)))
            for _ in range(rng.choice((1, 1, 2, 3)))
        )
        return Subscribe(random_packet_id(rng), subs)
    if r < 0.71:
        filters = tuple(random_filter(rng) for _ in range(rng.choice((1, 1, 2))))
        return Unsubscribe(random_packet_id(rng), filters)
    if r < 0.76:
        return PingReq()
    if r < 0.79:
        return Disconnect()
    if r < 0.90:
        cls = rng.choice((PubAck, PubRec, PubRel, PubComp))
        return cls(random_packet_id(rng))
    if r < 0.93:
        return random_connect(rng)
    return random_server_packet(rng)


def random_server_packet(rng: random.Random) -> Packet:
    kind = rng.randrange(4)
    if kind == 0:
        return ConnAck(rng.random() < 0.5, rng.choice((0, 0, 1, 5)))
    if kind == 1:
        return SubAck(random_packet_id(rng), tuple(rng.choice((0, 1, 2, 0x80)) for _ in range(2)))
    if kind == 2:
        return UnsubAck(random_packet_id(rng))
    return PingResp()


def random_any_packet(rng: random.Random) -> Packet:
    return random_connect(rng) if rng.random() < 0.15 else random_client_packet(rng)


def random_mutations(rng: random.Random) -> list[tuple[int, int, int]]:
    return [
        (rng.randrange(MUTATION_OPS), rng.randrange(1 << 16), rng.randrange(1 << 16))
        for _ in range(rng.choice((1, 1, 1, 2, 3)))
    ]


def apply_mutations(data: bytes, ops: Sequence[tuple[int, int, int]], other: bytes = b"") -> bytes:
    """Apply mutation ops ``(op, a, b)`` (ints; taken modulo what they index) to one packet."""
    buf = bytearray(data)
    for op, a, b in ops:
        n = len(buf)
        op %= MUTATION_OPS
        if op == 0 and n:  # flip one bit
            buf[a % n] ^= 1 << (b % 8)
        elif op == 1 and n:  # set a byte, often to an interesting value
            buf[a % n] = INTERESTING[b % len(INTERESTING)] if b & 0x100 else b & 0xFF
        elif op == 2:  # insert a run of one byte
            i = a % (n + 1)
            buf[i:i] = bytes((b & 0xFF,)) * (1 + (b >> 8) % 8)
        elif op == 3 and n:  # delete a few bytes
            i = a % n
            del buf[i : i + 1 + b % 8]
        elif op == 4:  # truncate
            del buf[a % (n + 1) :]
        elif op == 5 and n >= 2:  # replace the Remaining Length field
            end = 1
            while end < n and end < 5 and buf[end] & 0x80:
                end += 1
            end = min(end + 1, n)
            if a & 1:
                new = CORRUPT_LENGTHS[b % len(CORRUPT_LENGTHS)]
            else:
                length = 0
                for shift, byte in enumerate(buf[1:end]):
                    length |= (byte & 0x7F) << (7 * shift)
                new = encode_varint(max(0, min(268_435_455, length + (b % 9) - 4)))
            buf[1:end] = new
        elif op == 6 and n:  # another packet type, or other flags
            if a & 1:
                buf[0] = (buf[0] & 0x0F) | ((b % 16) << 4)
            else:
                buf[0] = (buf[0] & 0xF0) | (b % 16)
        elif op == 7:  # splice: our head, another packet's tail
            buf = buf[: a % (n + 1)] + other[b % (len(other) + 1) :]
        elif op == 8 and n:  # duplicate a slice in place
            i = a % n
            j = min(n, i + 1 + b % 16)
            buf[j:j] = buf[i:j]
    return bytes(buf)


def random_cuts(rng: random.Random, length: int) -> tuple[int, ...]:
    r = rng.random()
    if r < 0.5 or length < 2:
        return ()
    if r < 0.6 and length <= 64:
        return tuple(range(1, length))  # byte by byte
    return tuple(sorted(rng.randint(1, length - 1) for _ in range(rng.randint(1, 4))))



def trie_entries(trie: Any) -> list[tuple[str, str, Any, int]] | None:
    """Every (filter, client id, subscriber, qos) in the trie, or None if it has no ``_root``.
    Raises FuzzFailure for a node that holds nothing (not pruned)."""
    root = getattr(trie, "_root", None)
    if root is None:
        return None
    out = []
    stack: list[tuple[Any, list[str]]] = [(root, [])]
    while stack:
        node, prefix = stack.pop()
        if prefix and node.is_empty():
            fail(f"an empty trie node was not pruned: {'/'.join(prefix)!r}")
        path = "/".join(prefix)
        for client_id, (subscriber, qos, _options) in node.subscribers.items():
            out.append((path, client_id, subscriber, qos))
        hash_filter = "/".join([*prefix, "#"])
        for client_id, (subscriber, qos, _options) in node.hash_subscribers.items():
            out.append((hash_filter, client_id, subscriber, qos))
        if node.plus is not None:
            stack.append((node.plus, [*prefix, "+"]))
        for level, child in node.children.items():
            stack.append((child, [*prefix, level]))
    return out


def check_broker(broker: Broker, deep: bool = True) -> None:
    """The broker's own bookkeeping is consistent (no knowledge of the clients needed, so the
    socket mode can run it too). Raises FuzzFailure."""
    connections = broker.connections
    total = 0
    for conn in connections:
        if conn.outbox_bytes < 0:
            fail(f"{conn.name}: outbox_bytes {conn.outbox_bytes} < 0")
        total += conn.outbox_bytes
        session = conn.session
        if session is not None:
            if broker.sessions.get(session.client_id) is not session:
                fail(f"{conn.name}: attached to a session that is not in broker.sessions")
            if session.connection is not conn:
                fail(f"{conn.name}: its session {session.client_id!r} points elsewhere")
    if broker.buffers.bytes != total:
        fail(f"broker.buffers.bytes {broker.buffers.bytes} != {total}, the sum of the "
             f"connections' outbox_bytes")
    limits = broker.config.limits
    subscriptions = 0  # not shared ones (a share group is one trie entry for its members)
    shares = getattr(broker, "shares", None)
    groups: dict[str, Any] = shares.groups if shares is not None else {}
    for client_id, session in broker.sessions.items():
        if session.client_id != client_id or session.discarded:
            fail(f"broker.sessions[{client_id!r}] is {session.client_id!r}, "
                 f"discarded={session.discarded}")
        inflight = session.inflight
        # in flight from an earlier connection and not resent yet on this one (its 5.0
        # Receive Maximum is smaller) do not count against the window
        not_resent = len(getattr(session, "_held", None) or ())
        if len(inflight) - not_resent > session.max_inflight:
            fail(f"session {client_id!r}: {len(inflight) - not_resent} in flight > "
                 f"max_inflight {session.max_inflight}")
        for packet_id in inflight:
            if not 1 <= packet_id <= 65535:
                fail(f"session {client_id!r}: packet id {packet_id} in flight")
        out = session.out
        queued, queued_bytes = len(out), out.bytes
        if queued < 0 or queued_bytes < 0:
            fail(f"session {client_id!r}: queued {queued}, queued_bytes {queued_bytes}")
        if 0 <= out.limits.max_messages < queued:
            fail(f"session {client_id!r}: {queued} queued > max_queued {out.limits.max_messages}")
        if 0 <= out.limits.max_bytes < queued_bytes:
            fail(f"session {client_id!r}: {queued_bytes} bytes queued > max_queued_bytes "
                 f"{out.limits.max_bytes}")
        held = list(out.ram or ())
        held_bytes = sum(len(entry[0].payload) for entry in held if entry[0] is not None)
        if session.writer is None:  # everything queued is in RAM: count it
            if queued != len(held) or queued_bytes != held_bytes:
                fail(f"session {client_id!r}: queued {queued} / {queued_bytes} bytes, but the "
                     f"queue holds {len(held)} / {held_bytes}")
        else:  # RAM + the page being read + disk only
            loading = out.loading
            disk = out.disk_sizes[out.disk_head :]
            if len(disk) != out.disk_count or not 0 <= out.pending_drops <= len(loading):
                fail(f"session {client_id!r}: disk_count {out.disk_count} with "
                     f"{len(disk)} sizes, {out.pending_drops} drops of {len(loading)}")
            holds = held_bytes + sum(loading[out.pending_drops :]) + sum(disk)
            if queued_bytes != holds:
                fail(f"session {client_id!r}: queued_bytes {queued_bytes}, but its queue "
                     f"holds {holds}")
        if len(session.inbound_qos2) > limits.max_inbound_qos2:
            fail(f"session {client_id!r}: {len(session.inbound_qos2)} inbound QoS 2 ids > "
                 f"max_inbound_qos2")
        attached = cast("Connection | None", session.connection)
        if attached is not None:
            if attached not in connections:
                fail(f"session {client_id!r} attached to a connection that is gone")
            if attached.session is not session:
                fail(f"session {client_id!r} attached to a connection that does not know it")
            if out.ram and len(inflight) < session.max_inflight:
                fail(f"session {client_id!r}: {len(out.ram)} queued while the window "
                     f"has room ({len(inflight)} < {session.max_inflight}) and it is online")
        elif not session.persistent:
            fail(f"clean session {client_id!r} kept while offline")
        for topic_filter, qos in session.subscriptions.items():
            if not topic_filter.startswith(SHARE_PREFIX):
                subscriptions += 1
                continue
            group = groups.get(topic_filter)
            member = group.members.get(client_id) if group is not None else None
            if member is None or member[0] is not session or member[1] != qos:
                fail(f"session {client_id!r}: shared subscription {topic_filter!r} at QoS {qos}, "
                     f"but its group has {member}")
    for name, group in groups.items():  # one trie entry per group (under a key of its own)
        if not group.members:
            fail(f"share group {name!r} kept without members")
        for member_id, member in group.members.items():
            current = broker.sessions.get(member_id)
            if current is not member[0] or current.subscriptions.get(name) != member[1]:
                fail(f"share group {name!r}: member {member_id!r} at QoS {member[1]} is not a "
                     f"current session subscribed to it")
    trie = broker.router.trie
    entries = trie_entries(trie)
    if entries is None:
        return
    internal = getattr(broker, "internal_subscriptions", 0)  # the delayed-publish queue
    if len(entries) != len(trie) or len(entries) != subscriptions + len(groups) + internal:
        fail(f"the trie holds {len(entries)} subscriptions, says {len(trie)}, the sessions "
             f"{subscriptions}, {len(groups)} share groups and {internal} of the broker's own")
    for topic_filter, client_id, subscriber, qos in entries:
        if subscriber is getattr(broker, "delayed", None):
            continue
        if client_id.startswith(GROUP_KEY):
            group = groups.get(client_id[len(GROUP_KEY):])
            if group is None or subscriber is not group or group.filter != topic_filter:
                fail(f"trie entry {topic_filter!r} for share group {client_id[1:]!r}: "
                     f"not the group")
            continue
        session = broker.sessions.get(client_id)
        if subscriber is not session:
            fail(f"trie entry {topic_filter!r} for {client_id!r}: not its current session")
        if session.subscriptions.get(topic_filter) != qos:  # type: ignore[union-attr]
            fail(f"trie entry {topic_filter!r} for {client_id!r} at QoS {qos}; the session "
                 f"has {session.subscriptions}")  # type: ignore[union-attr]
    cache = getattr(trie, "_cache", None)
    if deep and isinstance(cache, dict):
        for topic, cached in cache.items():
            expected: dict[str, tuple[Any, int]] = {}
            for topic_filter, client_id, subscriber, qos in entries:
                if matches(topic_filter, topic):
                    if client_id not in expected or qos > expected[client_id][1]:
                        expected[client_id] = (subscriber, qos)
            got = {(id(s), q) for s, q, _options in cached}
            if got != {(id(s), q) for s, q in expected.values()} or len(cached) != len(got):
                fail(f"stale trie match cache for {topic!r}: {cached} vs {expected}")


