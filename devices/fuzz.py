"""Fuzz mqttd's decoder and its broker state machine, for as long as you like.

    python -m devices.fuzz --inputs 1000000 [--seed N] [--keep-going]   # decoder + sans-IO broker
    python -m devices.fuzz --seed N --episode K                # replay one broker episode
    python -m devices.fuzz --socket [--connections 20000] [--duration 60] [--keep-going]
    python -m devices.fuzz --atheris [-- LIBFUZZER_ARGS...]    # coverage-guided (optional)

The default mode generates inputs from a seeded ``random.Random`` and feeds them, in-process and
without I/O, to two targets, half the inputs each:

* **the decoder** (``mqttd.codec.Decoder``): random bytes, and packets of every type (valid, or
  mutated: bit flips, interesting bytes, insertions, deletions, truncation, a corrupted Remaining
  Length, another type/flags nibble, a duplicated slice, two packets spliced), each decoded whole
  and again in random chunks. Only packets or an ``MQTTError`` may come out, the result may not
  depend on the chunking, every decoded packet must survive encode -> decode unchanged, and no
  input may take longer than ``--hang-s``.
* **the broker** (``Broker.handle_data``, ``protocol_error``, ``connection_lost``,
  ``expire_sessions``, ``close_all_connections``; no sockets): episodes of ``--steps`` steps on a
  fresh broker with random limits, each step one connection doing one thing: CONNECT (a small
  pool of client ids, so duplicates and takeovers are common, clean or not, with wills), SUBSCRIBE
  and UNSUBSCRIBE (random, sometimes invalid filters), PUBLISH at QoS 0/1/2 (random topics, flags,
  colliding packet ids), PUBACK/PUBREC/PUBREL/PUBCOMP (for ids it holds, or random ones), PINGREQ,
  DISCONNECT, bytes mutated as above, connections lost at random, slow readers, session expiry.
  Half the episodes are durable: the broker has its SQLite store (in memory) and the fuzzer
  commits the group-commit writer's batch at random points (long batches and short ones) and
  sometimes restarts the broker from the store. One step counts as one input. After every step
  :meth:`BrokerFuzzer.check` verifies that only ``MQTTError`` escaped and mqttd logged no ERROR,
  the bookkeeping (connections, sessions, the subscription trie and its match cache, buffer
  accounting, inflight windows, queue budgets and byte counts incl. the disk part, inbound QoS 2
  ids) is consistent, and, from each client's point of view, that the broker speaks the protocol:
  one CONNACK first, each request answered once and in order (held back until a commit at most),
  a packet id never reused while unacknowledged, exactly the unacknowledged messages in flight.
  After a complete commit the store must match memory (no delivery without its message body, as
  many queued and in flight per session). At the end of an episode every connection is closed or
  lost, the store holds exactly the persistent sessions, and a fresh client must still connect,
  subscribe and receive a publish.

``--socket`` runs a real broker in-process on 127.0.0.1 (port 0, store in memory) and opens many
short TCP connections that send mutated byte streams (some connect properly and subscribe to
``#`` and stop reading, some send garbage, some go silent), while a healthy client publishes to
itself at QoS 1 and must get each message back within ``--hang-s``. Any ERROR logged by mqttd
(an internal error) fails the run, with the bytes that connection sent.

Any failure prints what failed, the traceback, and the input in hex (a broker episode: every step,
and the ``--seed``/``--episode`` that replays it), and the exit status is 1. The run stops at the
first failure, or with ``--keep-going`` reports each kind of failure once and counts the repeats.

Optional coverage-guided fuzzing with atheris (libFuzzer); mqttd does not depend on it::

    .venv/bin/pip install atheris        # binary wheels for CPython 3.11 on Linux x86-64
    .venv/bin/python -m devices.fuzz --atheris -- -max_total_time=3600 -rss_limit_mb=4096 corpus/

The first input byte picks the target; for the broker the rest is a little program of steps (see
:func:`atheris_one_input`). A crash is reported by libFuzzer with the input saved as ``crash-*``.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from mqttd.broker import Broker
from mqttd.codec import Decoder, MQTTError
from mqttd.codec.errors import ServerShuttingDown
from mqttd.codec.packets import (
    CONNACK,
    PINGRESP,
    PROTOCOL_31,
    PROTOCOL_311,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
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
from mqttd.config import OVERFLOW_POLICIES, ClientOverride, Config, Limits, Listener, Persistence
from mqttd.topics import matches
from persistence.writer import GroupCommitWriter

HANG_S = 5.0  # no single input (one decode, one broker step) may take longer

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


def random_decoder_input(rng: random.Random) -> tuple[bytes, tuple[int, ...], int]:
    """(data, chunk cuts, max_packet_size) for the decoder target."""
    r = rng.random()
    if r < 0.1:
        data = rng.randbytes(rng.randint(0, 48))
    elif r < 0.2:  # a plausible first byte, then noise
        data = bytes((rng.choice(INTERESTING),)) + rng.randbytes(rng.randint(0, 24))
    else:
        parts = [random_any_packet(rng).encode() for _ in range(rng.choice((1, 1, 2, 3, 4)))]
        other = random_any_packet(rng).encode()
        k = rng.randrange(len(parts))
        if r < 0.85:
            parts[k] = apply_mutations(parts[k], random_mutations(rng), other)
        data = b"".join(parts)
        if rng.random() < 0.1:
            data = apply_mutations(data, random_mutations(rng), other)
    size = rng.choice(MAX_PACKET_SIZES) if rng.random() < 0.4 else MAX_PACKET_SIZES[0]
    return data, random_cuts(rng, len(data)), size


# -- the decoder target ---------------------------------------------------------------------------

DecodeResult = tuple[list[Packet], tuple[str, str] | None, int]


def decode_stream(
    data: bytes, cuts: Sequence[int], max_packet_size: int, as_bytearray: bool = False
) -> DecodeResult:
    """Feed ``data`` to a fresh decoder in chunks split at ``cuts``; return (every packet that
    came out, the error as (class name, message) or None, bytes left buffered or -1)."""
    decoder = Decoder(max_packet_size)
    packets: list[Packet] = []
    prev = 0
    for cut in (*cuts, len(data)):
        chunk = data[prev:cut]
        prev = max(prev, cut)
        try:
            packets += decoder.feed(bytearray(chunk) if as_bytearray else chunk)
        except MQTTError as exc:
            packets += exc.packets_before
            return packets, (type(exc).__name__, str(exc)), -1
    return packets, None, decoder.buffered


def describe_decoder_input(data: bytes, cuts: Sequence[int], max_packet_size: int) -> str:
    return f"data={data.hex()} cuts={list(cuts)} max_packet_size={max_packet_size}"


def check_decoder(data: bytes, cuts: Sequence[int] = (), max_packet_size: int = 268_435_460,
                  hang_s: float = HANG_S) -> DecodeResult:
    """Decode ``data`` whole and in chunks; raise FuzzFailure on a finding."""
    cuts = tuple(sorted({c for c in cuts if 0 < c < len(data)}))
    started = time.perf_counter()
    try:
        whole = decode_stream(data, (), max_packet_size)
        chunked = decode_stream(data, cuts, max_packet_size, as_bytearray=len(cuts) % 2 == 1)
    except Exception as exc:
        raise FuzzFailure(
            f"the decoder raised {type(exc).__name__} (not MQTTError): {exc}\n"
            f"  input: {describe_decoder_input(data, cuts, max_packet_size)}"
        ) from exc
    elapsed = time.perf_counter() - started
    if elapsed > hang_s:
        fail(f"decoding took {elapsed:.1f}s\n  input: "
             f"{describe_decoder_input(data, cuts, max_packet_size)}")
    if whole != chunked:
        fail(
            "decoding depends on the chunking\n"
            f"  input: {describe_decoder_input(data, cuts, max_packet_size)}\n"
            f"  whole:   {whole}\n  chunked: {chunked}"
        )
    for packet in whole[0]:
        try:
            encoded = packet.encode()
            again = Decoder(protocol_level=PROTOCOL_311).feed(encoded)
        except Exception as exc:
            raise FuzzFailure(
                f"re-encoding the decoded {packet!r} and decoding it again raised "
                f"{type(exc).__name__}: {exc}\n"
                f"  input: {describe_decoder_input(data, cuts, max_packet_size)}"
            ) from exc
        if again != [packet]:
            fail(
                f"decode(encode(p)) != p for p={packet!r}: got {again!r}\n"
                f"  input: {describe_decoder_input(data, cuts, max_packet_size)}"
            )
    return whole


# -- the broker target ----------------------------------------------------------------------------

# Actions (plain tuples, so that hypothesis strategies and the random generator share them):
#   ("connect", data, cuts)    open a connection and send data (a CONNECT, perhaps more, perhaps
#                              mutated) in chunks split at cuts
#   ("send", peer, data, cuts) a connected peer sends data (peers are picked modulo their number)
#   ("ack", peer, kind, pick)  a peer sends PUBACK/PUBREC/PUBREL/PUBCOMP (kind 4..7) for a packet
#                              id it holds (picked by pick), or for pick % 65535 + 1
#   ("lost", peer)             the connection is lost (any peer, connected or not)
#   ("reap",)                  the I/O layer ends every connection the broker closed
#   ("flush", peer)            a slow peer's pending bytes are sent
#   ("slow", peer)             a peer stops (or starts again) taking its output off the socket
#   ("expire",)                every offline session has expired
Action = tuple[Any, ...]

_ACK_CLASSES = {PUBACK: PubAck, PUBREC: PubRec, PUBREL: PubRel, PUBCOMP: PubComp}


def random_config(rng: random.Random) -> Config:
    limits = Limits(
        max_packet_size_bytes=rng.choice((1_048_576, 300, 64)),
        max_inflight_messages=rng.choice((1, 2, 3, 5, 20)),
        max_queued_messages=rng.choice((1, 2, 5, 100, 1000)),
        max_queued_bytes=rng.choice((-1, 8, 100, 16_777_216)),
        overflow_policy=rng.choice(OVERFLOW_POLICIES),
        qos0_buffer_bytes=rng.choice((0, 64, 262_144)),
        max_inbound_qos2=rng.choice((1, 2, 1000)),
        max_keepalive_s=rng.choice((65535, 100)),
        max_topic_length_bytes=rng.choice((65535, 16)),
        max_topic_levels=rng.choice((-1, 3)),
        max_publish_rate_per_s=rng.choice((-1.0, 5.0)),
    )
    overrides: tuple[ClientOverride, ...] = ()
    if rng.random() < 0.3:
        overrides = (
            ClientOverride(client_id="c1", max_inflight_messages=1, max_queued_messages=2),
        )
    # small pages: persistent queues spill to disk and are read back a page at a time
    return make_fuzz_config(limits, overrides, page=rng.choice((1, 2, 3, 4096)))


def make_fuzz_config(limits: Limits | None = None,
                     overrides: tuple[ClientOverride, ...] = (), page: int = 4096) -> Config:
    return Config(
        listeners=(Listener(host="127.0.0.1", port=0),),
        limits=limits if limits is not None else Limits(),
        client_overrides=overrides,
        persistence=Persistence(db_file=":memory:", queue_page_messages=page),
    )


def random_action(rng: random.Random) -> Action:
    r = rng.random()
    peer = rng.randrange(64)
    if r < 0.12:
        parts = [random_connect(rng).encode()]
        if rng.random() < 0.2:
            parts += [random_client_packet(rng).encode() for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.07:
            parts[0] = apply_mutations(parts[0], random_mutations(rng), parts[-1])
        if rng.random() < 0.03:
            parts = [rng.randbytes(rng.randint(0, 20))]  # garbage instead of a CONNECT
        data = b"".join(parts)
        return ("connect", data, random_cuts(rng, len(data)) if rng.random() < 0.3 else ())
    if r < 0.67:
        parts = [random_client_packet(rng).encode() for _ in range(rng.choice((1, 1, 1, 1, 2, 3)))]
        if rng.random() < 0.08:
            k = rng.randrange(len(parts))
            parts[k] = apply_mutations(parts[k], random_mutations(rng), parts[-1])
        if rng.random() < 0.01:
            parts.append(rng.randbytes(rng.randint(1, 8)))
        data = b"".join(parts)
        return ("send", peer, data, random_cuts(rng, len(data)) if rng.random() < 0.2 else ())
    if r < 0.84:
        return ("ack", peer, rng.choice((PUBACK, PUBACK, PUBREC, PUBREL, PUBCOMP)),
                rng.randrange(1 << 16))
    if r < 0.88:
        return ("lost", peer)
    if r < 0.94:
        return ("reap",)
    if r < 0.97:
        return ("flush", peer)
    if r < 0.99:
        return ("slow", peer)
    return ("expire",)


def random_durable_action(rng: random.Random, commit_rate: float = 0.15) -> Action:
    """As random_action, with commits (one step in 1/commit_rate: long batches hold more
    interplay between operations) and restarts (rarely)."""
    r = rng.random()
    if r < commit_rate:
        return ("commit",)
    if r < commit_rate + 0.005:
        return ("restart",)
    return random_action(rng)


def describe_action(action: Action) -> str:
    return "(" + ", ".join(
        f"bytes.fromhex({a.hex()!r})" if isinstance(a, bytes) else repr(a) for a in action
    ) + ")"


def _expected_answer(packet: Packet) -> int | None:
    """The packet type the broker must answer ``packet`` with (None: no answer)."""
    if isinstance(packet, Publish):
        return {0: None, 1: PUBACK, 2: PUBREC}[packet.qos]
    return {
        PubRel: PUBCOMP, PubRec: PUBREL, Subscribe: SUBACK, Unsubscribe: UNSUBACK,
        PingReq: PINGRESP, Connect: CONNACK,
    }.get(type(packet))


# Answers that acknowledge state: held back until the store commits it (durable sessions), but
# always sent in the order of the requests (MQTT-4.6.0). The others are sent at once.
_ORDERED_ANSWERS = frozenset({PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK})


class Peer:
    """One connection as its client sees it: what it received, what it holds unacknowledged."""

    def __init__(self, conn: Any, number: int) -> None:
        self.conn = conn
        self.number = number
        self.decoder = Decoder(protocol_level=PROTOCOL_311)
        self.received: list[Packet] = []  # everything the broker sent (kept for short episodes)
        self.keep_received = True
        # packet id -> (QoS, released): QoS 1/2 PUBLISH received and not yet acknowledged
        # (released: PUBREL received, PUBCOMP due)
        self.outstanding: dict[int, tuple[int, bool]] = {}
        self.rel_due: set[int] = set()  # our QoS 2 PUBLISHes the broker PUBREC'd
        self.connacked = False
        self.refused = False
        self.started = False  # the broker handled our CONNECT
        self.disconnected = False  # the broker handled our DISCONNECT
        self.handling: Packet | None = None
        self.answered = 0  # immediate answers (PINGRESP, PUBREL) to the packet being handled
        self.expect: deque[Packet] = deque()  # requests whose ordered answer is still due
        self.resending = False  # between CONNACK and the end of CONNECT: a resumed session
        self.slow = False
        self.taken = 0  # bytes taken off the outbox and not reported sent (a slow reader)
        self.lost = False

    def __repr__(self) -> str:
        return f"<peer {self.number} {self.conn.client_id or '-'}>"


class BrokerFuzzer:
    """Drives one sans-IO :class:`Broker` with actions and checks it after each."""

    def __init__(self, config: Config | None = None, *, durable: bool = False,
                 deep_every: int = 1, hang_s: float = HANG_S,
                 keep_received: bool = True) -> None:
        self.config = config if config is not None else make_fuzz_config()
        self.durable = durable
        self.broker = Broker(self.config)
        if durable:  # a store in memory; commits happen when the fuzzer says so
            self.broker.open_store()
        self.restarts = 0
        self.live: list[Peer] = []
        self.gone: list[Peer] = []
        self.peers_opened = 0
        self.steps = 0
        self.deep_every = deep_every  # the trie cache check is costly: every n-th step
        self.hang_s = hang_s
        self.keep_received = keep_received
        self.health_checks = 0
        self._by_conn: dict[Any, Peer] = {}
        self.protocol_checks = self._hook(self.broker)
        self._errors = error_log()
        self._errors.take()

    def _hook(self, broker: Broker) -> bool:
        """The protocol checks see which packets the broker handles, in order, through its
        dispatch table; without one they are off (the bookkeeping checks still run)."""
        handlers = getattr(broker, "_handlers", None)
        if not isinstance(handlers, dict):
            return False
        for kind, handler in list(handlers.items()):
            handlers[kind] = self._wrap(handler)
        return True

    # -- the client's side ----------------------------------------------------------------

    def _wrap(self, handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def handle(conn: Any, packet: Any) -> None:
            peer = self._by_conn[conn]
            self._begin(peer, packet)
            try:
                handler(conn, packet)
            except MQTTError:
                peer.handling = None
                peer.resending = False
                if peer.expect and peer.expect[-1] is packet:
                    peer.expect.pop()  # refused: no answer due
                raise
            self._end(peer, packet)

        return handle

    def _begin(self, peer: Peer, packet: Packet) -> None:
        if peer.conn.closing:
            fail(f"{peer}: the broker handled {packet!r} on a connection it had closed")
        if not peer.started:
            if not isinstance(packet, Connect):
                fail(f"{peer}: the broker handled {packet!r} before a CONNECT")
            peer.started = True
        elif isinstance(packet, Connect):
            fail(f"{peer}: the broker handled a second CONNECT")
        if peer.disconnected:
            fail(f"{peer}: the broker handled {packet!r} after DISCONNECT")
        peer.resending = False  # a session resume ends with the CONNECT
        if isinstance(packet, Disconnect):
            peer.disconnected = True
        elif isinstance(packet, PubAck):
            if peer.outstanding.get(packet.packet_id) == (1, False):
                del peer.outstanding[packet.packet_id]
        elif isinstance(packet, PubComp):
            if peer.outstanding.get(packet.packet_id) == (2, True):
                del peer.outstanding[packet.packet_id]
        peer.handling = packet
        peer.answered = 0
        if _expected_answer(packet) in _ORDERED_ANSWERS:
            peer.expect.append(packet)

    def _end(self, peer: Peer, packet: Packet) -> None:
        expected = _expected_answer(packet)
        if expected == CONNACK:
            if not peer.connacked:
                fail(f"{peer}: CONNECT handled without a CONNACK")
        elif expected in _ORDERED_ANSWERS:
            if self.broker.writer is None and peer.expect:
                fail(f"{peer}: {peer.expect[0]!r} not answered (no store: nothing to wait for)")
        elif expected is not None and peer.answered != 1:
            fail(f"{peer}: {packet!r} answered {peer.answered} times, not once")
        peer.handling = None
        peer.resending = False

    def _output(self, peer: Peer) -> None:
        """``conn.on_output``: take the bytes at once, as the client reads them."""
        conn = peer.conn
        data = conn.data_to_send()
        if not data:
            return
        if peer.lost:
            fail(f"{peer}: the broker sent {data.hex()} to a connection it was told is lost")
        peer.taken += len(data)
        if not peer.slow:
            conn.sent(peer.taken)
            peer.taken = 0
        try:
            packets = peer.decoder.feed(data)
        except MQTTError as exc:
            raise FuzzFailure(f"{peer}: the broker sent bytes that do not decode ({exc}): "
                              f"{data.hex()}") from exc
        for packet in packets:
            if self.protocol_checks:
                self._check_server_packet(peer, packet)
            if peer.keep_received:
                peer.received.append(packet)

    def _check_server_packet(self, peer: Peer, packet: Packet) -> None:
        kind = packet.TYPE
        handling = peer.handling
        if not peer.connacked:
            if kind != CONNACK:
                fail(f"{peer}: the first packet from the broker is {packet!r}, not CONNACK")
            peer.connacked = True
            if packet.return_code == 0:  # type: ignore[union-attr]
                if handling is None and not peer.started:
                    # the broker handled CONNECT without its dispatch table: CONNACK 0 marks it
                    peer.started = True
                elif not isinstance(handling, Connect):
                    fail(f"{peer}: CONNACK 0 while handling {handling!r}")
                peer.resending = True
                peer.answered += 1
            else:
                peer.refused = True
                if handling is not None:
                    fail(f"{peer}: a refusing CONNACK while handling {handling!r}")
            return
        if kind == CONNACK:
            fail(f"{peer}: a second CONNACK {packet!r}")
        if peer.refused:
            fail(f"{peer}: {packet!r} after a refusing CONNACK")
        if kind == PUBLISH:
            assert isinstance(packet, Publish)
            if packet.qos:
                packet_id = packet.packet_id
                if packet.dup:
                    if not peer.resending:
                        fail(f"{peer}: DUP=1 {packet!r} outside a session resume")
                else:
                    peer.resending = False
                if packet_id in peer.outstanding:
                    fail(f"{peer}: {packet!r} reuses packet id {packet_id}, which is still "
                         f"unacknowledged ({peer.outstanding[packet_id]})")
                peer.outstanding[packet_id] = (packet.qos, False)
            return
        if kind == PUBREL:
            packet_id = packet.packet_id  # type: ignore[union-attr]
            if peer.resending:
                if packet_id in peer.outstanding:
                    fail(f"{peer}: resent PUBREL {packet_id} for an id already resent")
                peer.outstanding[packet_id] = (2, True)
                return
            if not (isinstance(handling, PubRec) and handling.packet_id == packet_id):
                fail(f"{peer}: unsolicited {packet!r} while handling {handling!r}")
            peer.answered += 1
            if peer.outstanding.get(packet_id) == (2, False):
                peer.outstanding[packet_id] = (2, True)
            return
        if kind == PINGRESP:
            if not isinstance(handling, PingReq):
                fail(f"{peer}: PINGRESP while handling {handling!r}")
            peer.answered += 1
            return
        # answers that keep the order of the requests
        if not peer.expect:
            fail(f"{peer}: unsolicited {packet!r} (while handling {handling!r})")
        request = peer.expect.popleft()
        if _expected_answer(request) != kind:
            fail(f"{peer}: {packet!r} where the answer to {request!r} was due")
        if kind == SUBACK:
            assert isinstance(packet, SubAck) and isinstance(request, Subscribe)
            codes = packet.return_codes
            requested = request.subscriptions
            if packet.packet_id != request.packet_id or len(codes) != len(requested):
                fail(f"{peer}: {packet!r} does not answer {request!r}")
            for code, sub in zip(codes, requested, strict=True):
                if code != 0x80 and code > sub.qos:
                    fail(f"{peer}: {packet!r} grants more than {request!r} asked")
        else:
            packet_id = packet.packet_id  # type: ignore[union-attr]
            if packet_id != request.packet_id:  # type: ignore[union-attr]
                fail(f"{peer}: {packet!r} does not answer {request!r}")
            if kind == PUBREC:
                peer.rel_due.add(packet_id)
            elif kind == PUBCOMP:
                peer.rel_due.discard(packet_id)

    # -- actions --------------------------------------------------------------------------------

    def open(self) -> Peer:
        conn = self.broker.new_connection(f"fuzz:{self.peers_opened}")
        peer = Peer(conn, self.peers_opened)
        peer.keep_received = self.keep_received
        self.peers_opened += 1
        conn.on_output = lambda: self._output(peer)
        self._by_conn[conn] = peer
        self.live.append(peer)
        return peer

    def _pick(self, index: int, connected: bool) -> Peer | None:
        peers = self.live
        if connected:
            peers = [p for p in peers if p.connacked and not p.conn.closing] or [
                p for p in peers if not p.conn.closing
            ]
        return peers[index % len(peers)] if peers else None

    def act(self, action: Action) -> None:
        """Run one action and check the broker afterwards."""
        self.steps += 1
        started = time.perf_counter()
        try:
            self._act(action)
        except (FuzzFailure, Hang):
            raise
        except Exception as exc:
            raise FuzzFailure(
                f"{type(exc).__name__} escaped the broker (not MQTTError): {exc}"
            ) from exc
        elapsed = time.perf_counter() - started
        if elapsed > self.hang_s:
            fail(f"one step took {elapsed:.1f}s")
        self.check_error_log()
        self.check(deep=self.steps % self.deep_every == 0)

    def check_error_log(self) -> None:
        records = self._errors.take()
        if records:
            lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in records)
            fail(f"mqttd logged an error: {lines}")

    def _act(self, action: Action) -> None:
        name = action[0]
        peer: Peer | None
        if name == "connect":
            self.send(self.open(), action[1], action[2])
        elif name == "send":
            sender = self._pick(action[1], connected=True) or self.open()
            self.send(sender, action[2], action[3])
        elif name == "ack":
            peer = self._pick(action[1], connected=True)
            if peer is not None:
                self.send(peer, self._ack_for(peer, action[2], action[3]).encode(), ())
        elif name == "lost":
            peer = self._pick(action[1], connected=False)
            if peer is not None:
                self.lose(peer)
        elif name == "reap":
            for closed in [p for p in self.live if p.conn.closing]:
                self.lose(closed)
        elif name == "flush":
            peer = self._pick(action[1], connected=False)
            if peer is not None and peer.taken:
                peer.conn.sent(peer.taken)
                peer.taken = 0
        elif name == "slow":
            peer = self._pick(action[1], connected=False)
            if peer is not None:
                peer.slow = not peer.slow
        elif name == "expire":
            self.broker.expire_sessions(time.time() + 1e9)
        elif name == "commit":
            self.commit(everything=False)
        elif name == "restart":
            self.restart()
        else:
            raise ValueError(f"unknown action {action!r}")

    def commit(self, everything: bool = True) -> None:
        """What the store's writer task does: apply what is pending in one transaction, release
        the replies held for it, run the read callbacks (which may submit more)."""
        writer = self.broker.writer
        if writer is None:
            return
        for _ in range(100 if everything else 1):
            if not writer.pending:
                break
            batch, writer._pending = writer._pending, []
            upto = writer.ticket
            results = writer.store.apply(batch)
            writer.commits += 1
            writer.ops_written += len(batch)
            writer.committed = upto
            writer.on_commit(upto)
            for callback, rows in results:
                callback(rows)
        else:
            if everything and writer.pending:
                fail(f"the store's writer never settles ({writer.pending} pending)")
        if writer.pending:
            return
        if self.protocol_checks:
            for peer in self.live:
                if peer.expect:
                    fail(f"{peer}: everything is committed, the answer to {peer.expect[0]!r} "
                         f"is still held back")
        self.check_store_counts()

    def check_store_counts(self) -> None:
        """Everything committed (read-only, unlike check_store): no stored delivery refers to a
        message body that is gone, and each persistent session has as many deliveries queued
        and in flight on disk as in memory."""
        broker = self.broker
        conn = broker.writer.store.conn  # type: ignore[union-attr]
        orphans = conn.execute(
            "SELECT d.client_id, d.seq, d.message_id, d.state FROM deliveries d "
            "LEFT JOIN messages m ON m.id = d.message_id WHERE m.id IS NULL LIMIT 5"
        ).fetchall()
        if orphans:
            fail(f"stored deliveries (client, seq, message, state) whose message body is gone: "
                 f"{orphans}")
        stored = {
            client_id: (queued, inflight)
            for client_id, queued, inflight in conn.execute(
                "SELECT client_id, sum(state = 0), sum(state > 0) FROM deliveries "
                "GROUP BY client_id"
            )
        }
        for client_id, session in broker.sessions.items():
            if not session.persistent or session.loading_sizes:
                continue  # (a page being read back is still counted on disk)
            mine = (session.queued, len(session.inflight))
            if stored.get(client_id, (0, 0)) != mine:
                fail(f"session {client_id!r}: the store has {stored.get(client_id, (0, 0))} "
                     f"deliveries (queued, in flight), memory {mine}")

    def check_store(self) -> None:
        """Everything committed: the store holds exactly the broker's persistent state (what a
        restart would restore)."""
        broker = self.broker
        writer = broker.writer
        if writer is None:
            return
        self.commit(everything=True)
        snapshot = writer.store.load(time.time(), -1)
        sessions = {c: s for c, s in broker.sessions.items() if s.persistent}
        if set(snapshot.sessions) != set(sessions):
            fail(f"the store has sessions {sorted(snapshot.sessions)}, the broker persistent "
                 f"sessions {sorted(sessions)}")
        for client_id, row in snapshot.sessions.items():
            session = sessions[client_id]
            if row.subscriptions != session.subscriptions:
                fail(f"session {client_id!r}: stored subscriptions {row.subscriptions}, "
                     f"in memory {session.subscriptions}")
            stored = {r[1]: (r[2], r[3]) for r in row.inflight}
            mine = {i: (1 if e[0] is not None else 2, e[1]) for i, e in session.inflight.items()}
            if stored != mine:
                fail(f"session {client_id!r}: stored in flight {stored}, in memory {mine}")
            if row.queued != session.queued or sum(row.queued_sizes) != session.queued_bytes:
                fail(f"session {client_id!r}: stored queue {row.queued} messages / "
                     f"{sum(row.queued_sizes)} bytes, in memory {session.queued} / "
                     f"{session.queued_bytes}")
            if row.inbound_qos2 != session.inbound_qos2:
                fail(f"session {client_id!r}: stored inbound QoS 2 ids {row.inbound_qos2}, in "
                     f"memory {session.inbound_qos2}")
        if len(snapshot.retained) != len(broker.retained):
            fail(f"{len(snapshot.retained)} retained messages stored, {len(broker.retained)} "
                 f"in memory")

    def restart(self) -> None:
        """Commit everything, check the store, then crash (no connection is told anything) and
        start a new broker from the store, as ``Broker.open_store`` does."""
        old = self.broker
        if old.writer is None:
            return
        self.check_store()
        store = old.writer.store
        snapshot = store.load(time.time(), self.config.persistence.session_expiry_s)
        broker = Broker(self.config)
        broker.writer = GroupCommitWriter(store, self.config.persistence.max_pending_writes)
        broker.writer.on_commit = broker._on_commit
        broker._restore(snapshot)
        self.broker = broker
        self.protocol_checks = self._hook(broker)
        self.restarts += 1
        self._by_conn.clear()
        self.live.clear()
        self.gone.clear()

    def _ack_for(self, peer: Peer, kind: int, pick: int) -> Packet:
        if kind == PUBREL:
            ids = sorted(peer.rel_due)
        else:
            want = {PUBACK: (1, False), PUBREC: (2, False), PUBCOMP: (2, True)}[kind]
            ids = sorted(i for i, state in peer.outstanding.items() if state == want)
        if ids and pick % 5:
            packet_id = ids[pick % len(ids)]
        else:
            packet_id = pick % 65535 + 1
        return _ACK_CLASSES[kind](packet_id)  # type: ignore[return-value]

    def send(self, peer: Peer, data: bytes, cuts: Sequence[int] = ()) -> None:
        """``peer`` sends ``data``, read by the broker in chunks split at ``cuts``."""
        prev = 0
        for cut in (*sorted(c for c in cuts if 0 < c < len(data)), len(data)):
            chunk = data[prev:cut]
            if cut <= prev and cut != len(data):
                continue
            prev = cut
            if peer.conn.closing or peer.lost:
                return  # the I/O layer stops reading once the broker closes the connection
            try:
                self.broker.handle_data(peer.conn, chunk)
            except MQTTError as exc:
                peer.handling = None
                peer.resending = False
                self.broker.protocol_error(peer.conn, exc)
                if not peer.conn.closing:
                    fail(f"{peer}: protocol_error({exc!r}) left the connection open")
                return
            peer.handling = None
            peer.resending = False

    def lose(self, peer: Peer) -> None:
        self.broker.connection_lost(peer.conn)
        peer.lost = True
        self.live.remove(peer)
        self.gone.append(peer)
        if len(self.gone) > 64:  # keep the last ones (for the checks), not all
            for old in self.gone[:-64]:
                self._by_conn.pop(old.conn, None)
            del self.gone[:-64]

    def finish(self, shutdown: bool = False) -> None:
        """End every connection (``shutdown``: as the server does on shutdown) and check that
        nothing is left but offline persistent sessions."""
        try:
            if shutdown:
                self.broker.close_all_connections(ServerShuttingDown("fuzz: shutting down"))
            for peer in list(self.live):
                self.lose(peer)
        except (FuzzFailure, Hang):
            raise
        except Exception as exc:
            raise FuzzFailure(f"{type(exc).__name__} escaped the broker on finish: {exc}") from exc
        broker = self.broker
        self.commit(everything=True)
        if broker.connections:
            fail(f"connections left after every one was lost: {broker.connections}")
        if broker.buffers.bytes:
            fail(f"buffers.bytes is {broker.buffers.bytes} with no connections")
        for session in broker.sessions.values():
            if session.connection is not None or not session.persistent:
                fail(f"session {session.client_id!r} left attached or not persistent")
        self.check(deep=True)
        self.check_store()

    def check_healthy(self) -> None:
        """A fresh client can connect, subscribe and receive a publish."""
        self.health_checks += 1
        n = self.health_checks
        topic = f"h{n}"  # one short level: within any topic limit the config sets
        try:
            sub = self.open()
            sub.keep_received = True
            self.send(sub, Connect(f"health-sub-{n}").encode()
                      + Subscribe(1, (Subscription(topic, 1),)).encode())
            if sub.received[:2] != [ConnAck(False, 0), SubAck(1, (1,))]:
                fail(f"healthy subscriber got {sub.received!r}")
            pub = self.open()
            pub.keep_received = True
            self.send(pub, Connect(f"health-pub-{n}").encode()
                      + Publish(topic, b"ok", 1, packet_id=7).encode())
            self.commit(everything=True)  # a durable subscriber may match: the ack waits for it
            if pub.received != [ConnAck(False, 0), PubAck(7)]:
                fail(f"healthy publisher got {pub.received!r}")
            got = [p for p in sub.received if isinstance(p, Publish) and p.topic == topic]
            if len(got) != 1 or got[0].payload != b"ok" or got[0].qos != 1:
                fail(f"healthy subscriber did not receive its message: {sub.received!r}")
            self.send(sub, PubAck(got[0].packet_id).encode() + Disconnect().encode())
            self.send(pub, Disconnect().encode())
            self.commit(everything=True)
            self.lose(sub)
            self.lose(pub)
            if sub.outstanding:
                fail(f"healthy subscriber left with {sub.outstanding}")
        except (FuzzFailure, Hang):
            raise
        except Exception as exc:
            raise FuzzFailure(f"{type(exc).__name__} during the health check: {exc}") from exc
        self.check(deep=True)

    # -- invariants -------------------------------------------------------------------------------

    def check(self, deep: bool = True) -> None:
        self.check_error_log()
        check_broker(self.broker, deep=deep)
        broker = self.broker
        live = set()
        for peer in self.live:
            conn = peer.conn
            live.add(conn)
            if conn.outbox:
                fail(f"{peer}: output left in the outbox (on_output not called?)")
            if conn.outbox_bytes != peer.taken:
                fail(f"{peer}: outbox_bytes {conn.outbox_bytes} != {peer.taken} unsent")
            session = conn.session
            if session is None or not self.protocol_checks or not peer.connacked:
                continue
            if session.connection is not conn:
                fail(f"{peer}: its session {session.client_id!r} is attached elsewhere")
            inflight = session.inflight
            if peer.outstanding.keys() != inflight.keys():
                fail(f"{peer}: the client holds {sorted(peer.outstanding.items())} "
                     f"unacknowledged, the broker {sorted(inflight)} in flight")
            for packet_id, (qos, released) in peer.outstanding.items():
                message, inflight_qos, _retain, _seq, _share, _ids = inflight[packet_id]
                if released != (message is None) or inflight_qos != qos:
                    fail(f"{peer}: packet id {packet_id} is {(qos, released)} for the client, "
                         f"{(message, inflight_qos)} for the broker")
        if broker.connections != live:
            fail(f"broker.connections ({len(broker.connections)}) is not the set of "
                 f"connections not lost ({len(live)})")
        for peer in self.gone:
            conn = peer.conn
            if conn.session is not None:
                fail(f"{peer}: a lost connection still has session {conn.session.client_id!r}")
            if conn.outbox_bytes or conn.outbox:
                fail(f"{peer}: a lost connection still counts {conn.outbox_bytes} bytes")


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
    subscriptions = 0
    for client_id, session in broker.sessions.items():
        if session.client_id != client_id or session.discarded:
            fail(f"broker.sessions[{client_id!r}] is {session.client_id!r}, "
                 f"discarded={session.discarded}")
        inflight = session.inflight
        if len(inflight) > session.max_inflight:
            fail(f"session {client_id!r}: {len(inflight)} in flight > max_inflight "
                 f"{session.max_inflight}")
        for packet_id in inflight:
            if not 1 <= packet_id <= 65535:
                fail(f"session {client_id!r}: packet id {packet_id} in flight")
        queued, queued_bytes = session.queued, session.queued_bytes
        if queued < 0 or queued_bytes < 0:
            fail(f"session {client_id!r}: queued {queued}, queued_bytes {queued_bytes}")
        if queued > session.max_queued:
            fail(f"session {client_id!r}: {queued} queued > max_queued {session.max_queued}")
        if 0 <= session.max_queued_bytes < queued_bytes:
            fail(f"session {client_id!r}: {queued_bytes} bytes queued > max_queued_bytes "
                 f"{session.max_queued_bytes}")
        held = list(session.queue)
        held_bytes = sum(len(entry[0].payload) for entry in held if entry[0] is not None)
        if session.writer is None:  # everything queued is in RAM: count it
            if queued != len(held) or queued_bytes != held_bytes:
                fail(f"session {client_id!r}: queued {queued} / {queued_bytes} bytes, but the "
                     f"queue holds {len(held)} / {held_bytes}")
        elif hasattr(session, "disk_sizes"):  # RAM + the page being read + disk only
            loading = session.loading_sizes
            disk = session.disk_sizes[session.disk_head :]
            if len(disk) != session.disk_count or not 0 <= session.pending_drops <= len(loading):
                fail(f"session {client_id!r}: disk_count {session.disk_count} with "
                     f"{len(disk)} sizes, {session.pending_drops} drops of {len(loading)}")
            holds = held_bytes + sum(loading[session.pending_drops :]) + sum(disk)
            if queued_bytes != holds:
                fail(f"session {client_id!r}: queued_bytes {queued_bytes}, but its queue "
                     f"holds {holds}")
        if len(session.inbound_qos2) > limits.max_inbound_qos2:
            fail(f"session {client_id!r}: {len(session.inbound_qos2)} inbound QoS 2 ids > "
                 f"max_inbound_qos2")
        attached = session.connection
        if attached is not None:
            if attached not in connections:
                fail(f"session {client_id!r} attached to a connection that is gone")
            if attached.session is not session:
                fail(f"session {client_id!r} attached to a connection that does not know it")
            if session.queue and len(inflight) < session.max_inflight:
                fail(f"session {client_id!r}: {len(session.queue)} queued while the window "
                     f"has room ({len(inflight)} < {session.max_inflight}) and it is online")
        elif not session.persistent:
            fail(f"clean session {client_id!r} kept while offline")
        subscriptions += len(session.subscriptions)
    trie = broker.router.trie
    entries = trie_entries(trie)
    if entries is None:
        return
    if len(entries) != len(trie) or len(entries) != subscriptions:
        fail(f"the trie holds {len(entries)} subscriptions, says {len(trie)}, the sessions "
             f"{subscriptions}")
    for topic_filter, client_id, subscriber, qos in entries:
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


# -- the sans-IO runner ---------------------------------------------------------------------------


def _quiet_logging() -> None:
    """Warnings per refused client cost time and say nothing new here; errors are findings
    (see ErrorLog): keep those, and only in the ErrorLog."""
    error_log()
    for name in ("mqttd", "persistence"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.propagate = False


def episode_seed(seed: int, episode: int) -> int:
    return seed * 1_000_003 + episode


def run_episode(seed: int, episode: int, steps: int, *, verbose: bool = False,
                hang_s: float = HANG_S, log: list[Action] | None = None) -> int:
    """One broker episode; returns the number of steps. ``log`` receives every action."""
    rng = random.Random(episode_seed(seed, episode))
    config = random_config(rng)
    durable = rng.random() < 0.5
    commit_rate = rng.choice((0.01, 0.02, 0.05, 0.15))
    n = rng.randint(steps // 2, steps)
    fuzzer = BrokerFuzzer(config, durable=durable, deep_every=16, hang_s=hang_s,
                          keep_received=False)
    if verbose:
        print(f"episode {episode} (seed {seed}): {n} steps, durable {durable} (commit rate "
              f"{commit_rate}), {config.limits}, {config.persistence}, "
              f"overrides {config.client_overrides}")
    for _ in range(n):
        action = random_durable_action(rng, commit_rate) if durable else random_action(rng)
        if log is not None:
            log.append(action)
        if verbose:
            print(f"  step {fuzzer.steps + 1}: {describe_action(action)}")
        fuzzer.act(action)
    shutdown = rng.random() < 0.3
    if log is not None:
        log.append(("finish", shutdown))
    fuzzer.finish(shutdown)
    fuzzer.check_healthy()
    return n


class _Watchdog:
    """SIGALRM after ``seconds`` unless re-armed: raises Hang inside the looping code."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.enabled = hasattr(signal, "SIGALRM")
        if self.enabled:
            signal.signal(signal.SIGALRM, self._fire)

    def _fire(self, signum: int, frame: Any) -> None:
        raise Hang(f"no progress for {self.seconds:.0f}s")

    def arm(self) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def disarm(self) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)


def failure_kind(message: str) -> str:
    """A failure's first line with numbers and quoted names blanked: repeats of one bug."""
    line = message.strip().splitlines()[0] if message.strip() else message
    return re.sub(r"-?\d+", "N", re.sub(r"'[^']*'|b'[^']*'", "'…'", line))[:200]


def run_inputs(total: int, seed: int, *, steps: int = 300, hang_s: float = HANG_S,
               report_every_s: float = 5.0, keep_going: bool = False) -> int:
    """The default mode; returns the exit status. ``keep_going``: report each kind of failure
    once (in full) and go on, counting the repeats."""
    _quiet_logging()
    rng = random.Random(seed)
    watchdog = _Watchdog(max(2 * hang_s, 10.0))
    decoded = steps_done = episodes = 0
    outcomes: dict[str, int] = {}
    failures: dict[str, int] = {}  # kind -> count
    started = last_report = time.perf_counter()
    print(f"fuzzing: {total} inputs, seed {seed} (decoder and sans-IO broker, half each)",
          flush=True)

    def report(final: bool = False) -> None:
        elapsed = time.perf_counter() - started
        count = decoded + steps_done
        print(f"[{elapsed:7.1f}s] {count} inputs ({decoded} decoder, {steps_done} broker steps "
              f"in {episodes} episodes), {count / max(elapsed, 1e-9):,.0f} inputs/s"
              + (f", {sum(failures.values())} failures" if failures else "")
              + (" - done" if final else ""), flush=True)

    def found(exc: BaseException, title: str, details: Callable[[], None]) -> bool:
        """Record a failure; print it if it is a new kind. Returns whether to go on."""
        kind = failure_kind(str(exc))
        failures[kind] = failures.get(kind, 0) + 1
        if failures[kind] == 1:
            print(f"\nFAILURE {title}: {exc}")
            traceback.print_exc()
            details()
            print(flush=True)
        return keep_going

    try:
        while decoded + steps_done < total:
            # a batch of decoder inputs ...
            batch = min(steps, total - decoded - steps_done)
            watchdog.arm()
            for _ in range(batch):
                data, cuts, size = random_decoder_input(rng)
                try:
                    packets, error, _ = check_decoder(data, cuts, size, hang_s)
                except (FuzzFailure, Hang) as exc:
                    decoded += 1
                    watchdog.arm()
                    if not found(exc, "(decoder)", lambda: print(
                            f"  input: {describe_decoder_input(data, cuts, size)}")):  # noqa: B023
                        return 1
                    continue
                decoded += 1
                key = error[0] if error else ("packets" if packets else "incomplete")
                outcomes[key] = outcomes.get(key, 0) + 1
            # ... then a broker episode of about as many steps
            if decoded + steps_done < total:
                log: list[Action] = []
                watchdog.arm()
                try:
                    steps_done += run_episode(seed, episodes, steps, hang_s=hang_s, log=log)
                except (FuzzFailure, Hang) as exc:
                    steps_done += sum(1 for action in log if action[0] != "finish")

                    def show(log: list[Action] = log, episode: int = episodes) -> None:
                        print(f"the episode's steps (the last one failed); replay with\n"
                              f"  python -m devices.fuzz --seed {seed} --episode {episode}")
                        for i, action in enumerate(log, 1):
                            print(f"  {i}: {describe_action(action)}")

                    if not found(exc, f"(broker, episode {episodes}, step {len(log)})", show):
                        return 1
                episodes += 1
            watchdog.disarm()
            now = time.perf_counter()
            if now - last_report >= report_every_s:
                last_report = now
                report()
    finally:
        watchdog.disarm()
    report(final=True)
    print("decoder outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    if failures:
        print(f"{sum(failures.values())} failures of {len(failures)} kinds:")
        for kind, count in sorted(failures.items(), key=lambda item: -item[1]):
            print(f"  {count:6d} x {kind}")
        return 1
    print("no failures")
    return 0


# -- socket mode ----------------------------------------------------------------------------------


class _ErrorRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def random_stream(rng: random.Random) -> tuple[str, bytes, float]:
    """(kind, bytes to send, how long to keep reading) for one socket-mode connection."""
    r = rng.random()
    if r < 0.1:
        return "garbage", rng.randbytes(rng.randint(1, 64)), 0.05
    connect = random_connect(rng)
    parts = [connect.encode()]
    if r < 0.2:  # a slow subscriber: subscribes to everything, then stops reading
        parts.append(Subscribe(1, (Subscription("#", rng.choice((0, 1, 2))),)).encode())
        return "stalled", b"".join(parts), 0.3
    if r < 0.25:  # half a packet, then silence
        data = parts[0][: rng.randint(0, len(parts[0]) - 1)]
        return "silent", data, 0.2
    parts += [random_client_packet(rng).encode() for _ in range(rng.randint(0, 8))]
    kind = "valid"
    if r < 0.85:
        kind = "mutated"
        for _ in range(rng.randint(1, 3)):
            k = rng.randrange(len(parts))
            parts[k] = apply_mutations(parts[k], random_mutations(rng), parts[-1])
    return kind, b"".join(parts), 0.05


async def _socket_fuzz(seed: int, connections: int, duration_s: float, concurrency: int,
                       hang_s: float, keep_going: bool = False) -> int:
    import trio

    from mqttd.broker import running
    from mqttd.server.tcp import TCPServer  # noqa: F401 (the I/O layer under test)

    recorder = _ErrorRecorder()
    for name in ("mqttd", "persistence"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.addHandler(recorder)
        logger.propagate = False
    config = make_fuzz_config(Limits(connect_timeout_s=0.5, max_packet_size_bytes=65536,
                                     max_queued_messages=100, max_inflight_messages=5))
    rng = random.Random(seed)
    sent_by_peer: dict[str, tuple[str, bytes]] = {}
    state = {"opened": 0, "round_trips": 0, "max_rtt": 0.0, "refused": 0}
    failures: list[str] = []  # one per kind of failure
    repeats: dict[str, int] = {}  # kind -> count
    fatal: list[str] = []  # failures that stop the run (the healthy client, a broker crash)
    kinds: dict[str, int] = {}

    def record(message: str, stop: bool = False) -> None:
        kind = failure_kind(message)
        repeats[kind] = repeats.get(kind, 0) + 1
        if repeats[kind] == 1:
            failures.append(message)
            print(f"FAILURE (at {time.perf_counter() - started:.1f}s): "
                  f"{message.splitlines()[0]}", flush=True)
        if stop or not keep_going:
            fatal.append(message)
    started = time.perf_counter()
    deadline = started + duration_s

    async def one_connection(port: int) -> None:
        kind, data, linger_s = random_stream(rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            state["refused"] += 1
            return
        try:
            host, local_port = stream.socket.getsockname()[:2]
            sent_by_peer[f"{host}:{local_port}"] = (kind, data)
            if len(sent_by_peer) > 50_000:
                for key in list(sent_by_peer)[:25_000]:
                    del sent_by_peer[key]
            cuts = random_cuts(rng, len(data))
            prev = 0
            for cut in (*cuts, len(data)):
                if cut > prev:
                    await stream.send_all(data[prev:cut])
                    prev = cut
                    await trio.sleep(0)
            if kind != "stalled":
                with trio.move_on_after(linger_s):
                    while await stream.receive_some(65536):
                        pass
            else:
                await trio.sleep(linger_s)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def worker(port: int) -> None:
        while state["opened"] < connections and time.perf_counter() < deadline and not fatal:
            state["opened"] += 1
            await one_connection(port)

    async def healthy(port: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        decoder = Decoder(protocol_level=PROTOCOL_311)
        pending: list[Packet] = []

        async def receive() -> Packet:
            while not pending:
                data = await stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError("the broker closed the healthy client")
                pending.extend(decoder.feed(data))
            return pending.pop(0)

        await stream.send_all(Connect("fuzz-health", keepalive_s=0).encode()
                              + Subscribe(1, (Subscription("fuzz-health/#", 1),)).encode())
        with trio.fail_after(hang_s):
            assert await receive() == ConnAck(False, 0)
            assert await receive() == SubAck(1, (1,))
        task_status.started()
        n = 0
        while True:
            n = n % 65535 + 1
            payload = n.to_bytes(4, "big")
            t0 = time.perf_counter()
            await stream.send_all(Publish("fuzz-health/ping", payload, 1, packet_id=n).encode())
            got_ack = got_message = False
            try:
                with trio.fail_after(hang_s):
                    while not (got_ack and got_message):
                        packet = await receive()
                        if packet == PubAck(n):
                            got_ack = True
                        elif isinstance(packet, Publish) and packet.topic == "fuzz-health/ping":
                            if packet.payload != payload:
                                record(f"healthy client got {packet!r}, sent {payload!r}", True)
                                return
                            got_message = True
                            await stream.send_all(PubAck(packet.packet_id).encode())
            except trio.TooSlowError:
                record(f"the healthy client's message {n} did not come back within "
                       f"{hang_s}s (ack {got_ack}, message {got_message})", True)
                return
            rtt = time.perf_counter() - t0
            state["round_trips"] += 1
            state["max_rtt"] = max(state["max_rtt"], rtt)
            await trio.sleep(0.01)

    async def monitor(broker: Broker) -> None:
        last = time.perf_counter()
        while True:
            await trio.sleep(0.5)
            try:
                check_broker(broker, deep=False)
            except FuzzFailure as exc:
                record(f"broker invariant broken while serving: {exc}")
                if not keep_going:
                    return
            now = time.perf_counter()
            if now - last >= 5:
                last = now
                print(f"[{now - started:6.1f}s] {state['opened']} connections "
                      f"({state['opened'] / (now - started):,.0f}/s), healthy round trips "
                      f"{state['round_trips']} (max {state['max_rtt'] * 1000:.0f} ms), "
                      f"{len(broker.connections)} open", flush=True)

    print(f"socket fuzzing: up to {connections} connections or {duration_s:.0f}s, "
          f"{concurrency} at a time, seed {seed}", flush=True)
    try:
        async with running(config) as broker:
            port = broker.port
            async with trio.open_nursery() as nursery:
                nursery.start_soon(monitor, broker)
                await nursery.start(healthy, port)
                async with trio.open_nursery() as workers:
                    for _ in range(concurrency):
                        workers.start_soon(worker, port)
                # everything closed: only the healthy client's connection should be left
                with trio.move_on_after(hang_s + 2 * config.limits.connect_timeout_s):
                    while len(broker.connections) > 1 and not fatal:
                        await trio.sleep(0.05)
                if len(broker.connections) > 1:
                    record(f"{len(broker.connections) - 1} fuzz connections still open after "
                           f"every client closed")
                before = state["round_trips"]
                with trio.move_on_after(hang_s):
                    while state["round_trips"] < before + 3 and not fatal:
                        await trio.sleep(0.01)
                if state["round_trips"] < before + 3 and not fatal:
                    record("the healthy client stopped after the fuzz connections", True)
                try:
                    check_broker(broker, deep=True)
                except FuzzFailure as exc:
                    record(f"broker invariant broken at the end: {exc}")
                nursery.cancel_scope.cancel()
    except Exception:  # the broker (or its nursery) died
        record("the broker crashed:\n" + traceback.format_exc(), True)
    elapsed = time.perf_counter() - started
    for log_record in recorder.records:
        text = log_record.getMessage()
        detail = ""
        for peer, (stream_kind, data) in sent_by_peer.items():
            if f"({peer})" in text:
                detail = f"\n  that connection ({stream_kind}) sent: {data.hex()}"
        trace = ("\n" + "".join(traceback.format_exception(*log_record.exc_info))
                 if log_record.exc_info else "")
        record(f"mqttd logged {log_record.levelname}: {text}{detail}{trace}")
    print(f"{state['opened']} connections in {elapsed:.1f}s "
          f"({state['opened'] / elapsed:,.0f}/s; "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
          + f"; refused {state['refused']}); healthy client: {state['round_trips']} round trips, "
          f"max {state['max_rtt'] * 1000:.0f} ms")
    if failures:
        for failure in failures:
            print(f"\nFAILURE ({repeats.get(failure_kind(failure), 1)} x): {failure}")
        return 1
    print("no failures")
    return 0


# -- atheris --------------------------------------------------------------------------------------


def atheris_one_input(data: bytes) -> None:
    """One libFuzzer input. First byte even: the decoder gets the rest (the second byte picks
    a max packet size and a chunk size). Odd: a broker program of records ``op, length, bytes``:
    op % 8 in 0..3 the peer op // 8 % 4 sends the next ``length`` bytes (0: opening a connection
    first), 4 an ack, 5 lost, 6 reap, 7 flush/slow."""
    if len(data) < 2:
        return
    if data[0] % 2 == 0:
        size = MAX_PACKET_SIZES[data[1] % len(MAX_PACKET_SIZES)]
        body = data[2:]
        step = 1 + data[1] // len(MAX_PACKET_SIZES) % 16
        check_decoder(body, tuple(range(step, len(body), step)), size)
        return
    fuzzer = BrokerFuzzer(make_fuzz_config(Limits(max_inflight_messages=2, max_queued_messages=3)))
    i = 1
    while i + 1 < len(data):
        op, length = data[i], data[i + 1]
        i += 2
        peer = op // 8 % 4
        kind = op % 8
        if kind == 0:
            chunk, i = data[i : i + length], i + length
            fuzzer.act(("connect", Connect(f"c{peer}", clean_session=op & 0x80 == 0).encode()
                        + chunk, ()))
        elif kind <= 3:
            chunk, i = data[i : i + length], i + length
            fuzzer.act(("send", peer, chunk, (length // 2,) if kind == 3 else ()))
        elif kind == 4:
            fuzzer.act(("ack", peer, 4 + length % 4, length))
        elif kind == 5:
            fuzzer.act(("lost", peer))
        elif kind == 6:
            fuzzer.act(("reap",))
        else:
            fuzzer.act(("flush" if length % 2 else "slow", peer))
    fuzzer.finish()
    fuzzer.check_healthy()


def run_atheris(argv: list[str]) -> int:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print("atheris is not installed: .venv/bin/pip install atheris", file=sys.stderr)
        return 2
    _quiet_logging()
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *argv], atheris_one_input)
    atheris.Fuzz()
    return 0


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="devices.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000,
                        help="inputs to generate: decoder inputs + broker steps (default 100000)")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--steps", type=int, default=300, help="at most this many steps per "
                        "broker episode (default 300)")
    parser.add_argument("--episode", type=int, default=None,
                        help="replay this broker episode of --seed, printing every step")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failure go on; report each kind of failure once")
    parser.add_argument("--hang-s", type=float, default=HANG_S,
                        help=f"longest an input may take (default {HANG_S})")
    parser.add_argument("--socket", action="store_true", help="fuzz a real broker over TCP")
    parser.add_argument("--connections", type=int, default=20_000, help="socket mode: how many")
    parser.add_argument("--duration", type=float, default=60.0, help="socket mode: at most (s)")
    parser.add_argument("--concurrency", type=int, default=32, help="socket mode: at a time")
    parser.add_argument("--atheris", action="store_true",
                        help="coverage-guided with atheris; arguments after -- go to libFuzzer")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    if args.atheris:
        return run_atheris(extra)
    if args.socket:
        import trio

        return trio.run(_socket_fuzz, seed, args.connections, args.duration, args.concurrency,
                        args.hang_s, args.keep_going)
    if args.episode is not None:
        _quiet_logging()
        try:
            n = run_episode(seed, args.episode, args.steps, verbose=True, hang_s=args.hang_s)
        except (FuzzFailure, Hang):
            traceback.print_exc()
            return 1
        print(f"episode {args.episode}: {n} steps, no failures")
        return 0
    return run_inputs(args.inputs, seed, steps=args.steps, hang_s=args.hang_s,
                      keep_going=args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
