"""Fuzz mqttd's decoder and its broker state machine, for as long as you like.

    python -m tools.fuzz --inputs 1000000 [--seed N] [--keep-going]   # decoder + sans-IO broker
    python -m tools.fuzz --seed N --episode K                # replay one broker episode
    python -m tools.fuzz ... --tolerate CHECK                # skip a check of a known finding
    python -m tools.fuzz --socket [--connections 20000] [--duration 60] [--keep-going]
    python -m tools.fuzz --atheris [-- LIBFUZZER_ARGS...]    # coverage-guided (optional)

The default mode generates inputs from a seeded ``random.Random`` and feeds them, in-process and
without I/O, to two targets, half the inputs each:

* **the decoder** (``mqttd.codec.Decoder``): random bytes, and packets of every type, 3.1.1 and
  (a third) 5.0, the decoder at level 5 or accepting a level-5 CONNECT (valid, or
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
  DISCONNECT, bytes mutated as above, connections lost at random, slow readers, session expiry,
  due timers (5.0 will delays). About a third of the connections are MQTT 5.0, with properties
  on every packet, topic aliases, subscription options and identifiers, shared subscriptions,
  reason codes, AUTH; :mod:`tools.fuzz5` generates them and checks the broker's 5.0 answers
  (``--tolerate`` skips the check of a known finding, see ``tools.fuzz5.CHECKS``).
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
    .venv/bin/python -m tools.fuzz --atheris -- -max_total_time=3600 -rss_limit_mb=4096 corpus/

The first input byte picks the target; for the broker the rest is a little program of steps (see
:func:`atheris_one_input`). A crash is reported by libFuzzer with the input saved as ``crash-*``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import re
import signal
import sqlite3
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs

from mqttd.broker import Broker
from mqttd.codec import Decoder, MQTTError
from mqttd.codec.errors import ServerShuttingDown
from mqttd.codec.packets import (
    CONNACK,
    PINGRESP,
    PROTOCOL_5,
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
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from mqttd.config import OVERFLOW_POLICIES, ClientOverride, Config, Limits, Listener, Persistence
from persistence.store import SqliteStore
from persistence.writer import GroupCommitWriter
from tools import fuzz5
from tools.fuzz_base import (  # noqa: F401 (re-exported: the tests import them from here)
    BAD_TOPICS,
    CLIENT_IDS,
    CORRUPT_LENGTHS,
    FILTER_LEVELS,
    INTERESTING,
    LEVELS,
    MAX_PACKET_SIZES,
    MUTATION_OPS,
    FuzzFailure,
    Hang,
    apply_mutations,
    check_broker,
    error_log,
    fail,
    random_any_packet,
    random_client_packet,
    random_connect,
    random_cuts,
    random_mutations,
    trie_entries,
)

HANG_S = 5.0  # no single input (one decode, one broker step) may take longer


def random_decoder_input(rng: random.Random) -> tuple[bytes, tuple[int, ...], int, int]:
    """(data, chunk cuts, max_packet_size, level) for the decoder target; ``level``: how the
    decoder starts (see :func:`decode_stream`): a third of the inputs are 5.0 packets."""
    r = rng.random()
    level = 0
    if r < 0.1:
        data = rng.randbytes(rng.randint(0, 48))
        level = rng.choice((0, 1, 5))
    elif r < 0.2:  # a plausible first byte, then noise
        data = bytes((rng.choice(INTERESTING),)) + rng.randbytes(rng.randint(0, 24))
        level = rng.choice((0, 1, 5))
    else:
        if rng.random() < 0.35:
            parts, other, level = fuzz5.random_decoder_packets5(rng)
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
    return data, random_cuts(rng, len(data)), size, level


# -- the decoder target ---------------------------------------------------------------------------

DecodeResult = tuple[list[Packet], tuple[str, str] | None, int]


def new_decoder(max_packet_size: int, level: int = 0) -> Decoder:
    """A decoder as the decoder target starts it: ``level`` 0 as the broker's before a
    CONNECT without 5.0, 1 accepting a level-5 CONNECT (as mqttd's connections), 5 at level 5
    (as a 5.0 client's)."""
    if level == PROTOCOL_5:
        return Decoder(max_packet_size, PROTOCOL_5)
    return Decoder(max_packet_size, accept_v5=level == 1)


def decode_stream(
    data: bytes, cuts: Sequence[int], max_packet_size: int, as_bytearray: bool = False,
    level: int = 0,
) -> DecodeResult:
    """Feed ``data`` to a fresh decoder (see :func:`new_decoder`) in chunks split at ``cuts``;
    return (every packet that came out, the error as (class name, message) or None, bytes
    left buffered or -1)."""
    decoder = new_decoder(max_packet_size, level)
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


def describe_decoder_input(data: bytes, cuts: Sequence[int], max_packet_size: int,
                           level: int = 0) -> str:
    return (f"data={data.hex()} cuts={list(cuts)} max_packet_size={max_packet_size}"
            + (f" level={level}" if level else ""))


def check_decoder(data: bytes, cuts: Sequence[int] = (), max_packet_size: int = 268_435_460,
                  hang_s: float = HANG_S, level: int = 0) -> DecodeResult:
    """Decode ``data`` whole and in chunks, the decoder started at ``level`` (see
    :func:`new_decoder`); raise FuzzFailure on a finding."""
    cuts = tuple(sorted({c for c in cuts if 0 < c < len(data)}))
    started = time.perf_counter()
    try:
        whole = decode_stream(data, (), max_packet_size, level=level)
        chunked = decode_stream(data, cuts, max_packet_size, as_bytearray=len(cuts) % 2 == 1,
                                level=level)
    except Exception as exc:
        raise FuzzFailure(
            f"the decoder raised {type(exc).__name__} (not MQTTError): {exc}\n"
            f"  input: {describe_decoder_input(data, cuts, max_packet_size, level)}"
        ) from exc
    elapsed = time.perf_counter() - started
    if elapsed > hang_s:
        fail(f"decoding took {elapsed:.1f}s\n  input: "
             f"{describe_decoder_input(data, cuts, max_packet_size, level)}")
    if whole != chunked:
        fail(
            "decoding depends on the chunking\n"
            f"  input: {describe_decoder_input(data, cuts, max_packet_size, level)}\n"
            f"  whole:   {whole}\n  chunked: {chunked}"
        )
    current = PROTOCOL_5 if level == PROTOCOL_5 else PROTOCOL_311  # the layout of each packet
    for packet in whole[0]:
        try:
            if isinstance(packet, Connect):  # the layout from here on is the CONNECT's
                encoded = packet.encode()
                again = Decoder(accept_v5=True).feed(encoded)
                current = PROTOCOL_5 if packet.protocol_level == PROTOCOL_5 else PROTOCOL_311
            else:
                encoded = packet.encode(current)
                again = Decoder(protocol_level=current).feed(encoded)
        except Exception as exc:
            raise FuzzFailure(
                f"re-encoding the decoded {packet!r} and decoding it again raised "
                f"{type(exc).__name__}: {exc}\n"
                f"  input: {describe_decoder_input(data, cuts, max_packet_size, level)}"
            ) from exc
        if again != [packet]:
            fail(
                f"decode(encode(p)) != p for p={packet!r}: got {again!r}\n"
                f"  input: {describe_decoder_input(data, cuts, max_packet_size, level)}"
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
#   ("timers",)                the broker's timers (5.0 will delays, session expiry) are due
#   ("send5", peer, data, cuts)                a level-5 peer sends data (see tools.fuzz5)
#   ("ack5", peer, kind, pick, code, text)     a level-5 ack with a reason code (and string)
Action = tuple[Any, ...]

_ACK_CLASSES = {PUBACK: PubAck, PUBREC: PubRec, PUBREL: PubRel, PUBCOMP: PubComp}


def random_config(rng: random.Random) -> Config:
    limits = Limits(
        max_packet_size_bytes=rng.choice((1_048_576, 300, 64)),
        max_inflight_messages=rng.choice((1, 2, 3, 5, 20)),
        max_queued_messages=rng.choice((1, 2, 5, 100, 1000)),
        max_queued_bytes=rng.choice((-1, 8, 100, 16_777_216)),
        overflow_policy=rng.choice(OVERFLOW_POLICIES),
        persistent_max_queued_messages=rng.choice((-1, 1, 2, 5, 100)),
        persistent_max_queued_bytes=rng.choice((-1, 8, 100, 16_777_216)),
        persistent_overflow_policy=rng.choice(OVERFLOW_POLICIES),
        output_high_watermark_bytes=rng.choice((1, 64, 262_144)),
        queue_high_watermark_messages=rng.choice((1, 2, 256)),
        qos0_buffer_bytes=rng.choice((0, 64, 262_144)),
        max_inbound_qos2=rng.choice((1, 2, 1000)),
        max_keepalive_s=rng.choice((65535, 100)),
        max_topic_length_bytes=rng.choice((65535, 16)),
        max_topic_levels=rng.choice((-1, 3)),
        max_publish_rate_per_s=rng.choice((-1.0, 5.0)),
        max_receive_messages=rng.choice((1, 2, 1000)),  # 5.0 Receive Maximum
        max_topic_aliases=rng.choice((0, 2, 10)),
    )
    overrides: tuple[ClientOverride, ...] = ()
    if rng.random() < 0.3:
        overrides = (
            ClientOverride(client_id="c1", max_inflight_messages=1, max_queued_messages=2),
        )
    # small pages: persistent queues spill to disk and are read back a page at a time
    return make_fuzz_config(limits, overrides, page=rng.choice((1, 2, 3, 4096)),
                            session_expiry_s=rng.choice((604_800, 60, -1)))


def make_fuzz_config(limits: Limits | None = None,
                     overrides: tuple[ClientOverride, ...] = (), page: int = 4096,
                     session_expiry_s: int = 604_800) -> Config:
    return Config(
        listeners=(Listener(host="127.0.0.1", port=0),),
        limits=limits if limits is not None else Limits(),
        client_overrides=overrides,
        persistence=Persistence(db_file=":memory:", queue_page_messages=page,
                                session_expiry_s=session_expiry_s),
    )


V5_SHARE = 0.35  # of the connections and of what connected clients send


def random_action(rng: random.Random) -> Action:
    r = rng.random()
    peer = rng.randrange(64)
    if r < 0.12:
        if rng.random() < V5_SHARE:
            return fuzz5.random_connect_action5(rng)
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
        if rng.random() < V5_SHARE:
            return fuzz5.random_send_action5(rng, peer)
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
    return ("expire",) if rng.random() < 0.5 else ("timers",)


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
    if (
        isinstance(packet, PubRec) and packet.reason_code >= 0x80
        and "pubrel-after-error" not in fuzz5.TOLERATED
    ):
        return None  # 5.0: a PUBREC with an error ends the exchange, no PUBREL
    return {
        PubRel: PUBCOMP, PubRec: PUBREL, Subscribe: SUBACK, Unsubscribe: UNSUBACK,
        PingReq: PINGRESP, Connect: CONNACK,
    }.get(type(packet))


# Answers that acknowledge state: held back until the store commits it (durable sessions), but
# always sent in the order of the requests (MQTT-4.6.0). The others are sent at once.
# answers that keep the order of their requests (PINGRESP too: it may wait behind acks that
# wait for a commit)
_ORDERED_ANSWERS = frozenset({PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK, PINGRESP})


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
        self.answered = 0  # immediate answers (PUBREL) to the packet being handled
        self.expect: deque[Packet] = deque()  # requests whose ordered answer is still due
        self.resending = False  # between CONNACK and the end of CONNECT: a resumed session
        self.slow = False
        self.taken = 0  # bytes taken off the outbox and not reported sent (a slow reader)
        self.lost = False
        self.v5: fuzz5.Client5 | None = None  # its CONNECT was handled at level 5
        self.opening = b""  # what it sent before its CONNACK

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
        self.sub_ids: dict[str, set[int]] = {}  # client id -> 5.0 subscription ids it set
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
        if peer.v5 is not None:
            peer.v5.begin(self, peer, packet)
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
            if self.broker.writer is None and peer.expect and not peer.conn.sealed:
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
            self.broker.output_sent(conn, peer.taken)
            peer.taken = 0
        if peer.v5 is None and not peer.connacked and conn.protocol_level == PROTOCOL_5:
            peer.v5 = fuzz5.Client5.starting(peer.opening)  # the broker took a 5.0 CONNECT
            peer.decoder = Decoder(protocol_level=PROTOCOL_5)
        if peer.v5 is not None and self.protocol_checks:
            peer.v5.check_sizes(data)
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
        if peer.v5 is not None and peer.v5.check_server_packet(self, peer, packet):
            return
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
        # answers that keep the order of the requests
        if not peer.expect:
            fail(f"{peer}: unsolicited {packet!r} (while handling {handling!r})")
        request = peer.expect.popleft()
        if _expected_answer(request) != kind:
            fail(f"{peer}: {packet!r} where the answer to {request!r} was due")
        if kind == PINGRESP:
            pass  # nothing more to check than its place
        elif kind == SUBACK:
            assert isinstance(packet, SubAck) and isinstance(request, Subscribe)
            codes = packet.return_codes
            requested = request.subscriptions
            if packet.packet_id != request.packet_id or len(codes) != len(requested):
                fail(f"{peer}: {packet!r} does not answer {request!r}")
            for code, sub in zip(codes, requested, strict=True):
                if code < 0x80 and code > sub.qos:
                    fail(f"{peer}: {packet!r} grants more than {request!r} asked")
        else:
            packet_id = packet.packet_id  # type: ignore[union-attr]
            if packet_id != request.packet_id:  # type: ignore[union-attr]
                fail(f"{peer}: {packet!r} does not answer {request!r}")
            if kind == PUBREC:
                if packet.reason_code < 0x80:  # type: ignore[union-attr]
                    peer.rel_due.add(packet_id)
            elif kind == PUBCOMP:
                peer.rel_due.discard(packet_id)
        if peer.v5 is not None:
            peer.v5.check_answer(peer, packet, request)

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

    def _pick(self, index: int, connected: bool, v5: bool | None = None) -> Peer | None:
        """A live peer (``connected``: preferably one with a CONNACK, not closed; ``v5``:
        preferably one at level 5, or not)."""
        peers = self.live
        if connected:
            peers = [p for p in peers if p.connacked and not p.conn.closing] or [
                p for p in peers if not p.conn.closing
            ]
        if v5 is not None:
            peers = [p for p in peers if (p.v5 is not None) == v5] or peers
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
        elif name in ("send", "send5"):
            sender = self._pick(action[1], connected=True, v5=name == "send5") or self.open()
            self.send(sender, action[2], action[3])
        elif name == "ack":
            peer = self._pick(action[1], connected=True)
            if peer is not None:
                self.send(peer, self._ack_for(peer, action[2], action[3]).encode(), ())
        elif name == "ack5":
            peer = self._pick(action[1], connected=True, v5=True)
            if peer is not None:
                ack: Any = self._ack_for(peer, action[2], action[3])
                ack = attrs.evolve(ack, reason_code=action[4],
                                   properties={"reason_string": "fuzz"} if action[5] else None)
                self.send(peer, ack.encode(PROTOCOL_5 if peer.v5 is not None else PROTOCOL_311))
        elif name == "timers":  # as if time passed until every timer is due
            self.broker.timers.run_due(math.inf, limit=1000)
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
                self.broker.output_sent(peer.conn, peer.taken)
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

    def _writer(self) -> GroupCommitWriter | None:
        """The broker's store writer, whose internals the fuzzer drives by hand."""
        return cast("GroupCommitWriter | None", self.broker.writer)

    def commit(self, everything: bool = True) -> None:
        """What the store's writer task does: apply what is pending in one transaction, release
        the replies held for it, run the read callbacks (which may submit more)."""
        writer = self._writer()
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
                if peer.expect and not peer.conn.sealed:  # (nothing after a 5.0 DISCONNECT)
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
            if not session.persistent or session.out.loading:
                continue  # (a page being read back is still counted on disk)
            mine = (session.queued, len(session.inflight))
            if stored.get(client_id, (0, 0)) != mine:
                fail(f"session {client_id!r}: the store has {stored.get(client_id, (0, 0))} "
                     f"deliveries (queued, in flight), memory {mine}")

    def check_store(self) -> None:
        """Everything committed: the store holds exactly the broker's persistent state (what a
        restart would restore)."""
        broker = self.broker
        writer = self._writer()
        if writer is None:
            return
        self.commit(everything=True)
        # load() deletes what expired: read a copy, at time 0 (no message has expired then;
        # the sessions connected now are taken as disconnected, those with a 5.0 Session
        # Expiry Interval of 0 end with their connection: not restored, rightly)
        copy = sqlite3.connect(":memory:", check_same_thread=False)
        writer.store.conn.backup(copy)
        try:
            snapshot = SqliteStore(copy, ":memory:").load(0.0, -1)
        finally:
            copy.close()
        sessions = {c: s for c, s in broker.sessions.items()
                    if s.persistent and s.expiry_s != 0}
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
            if row.queued != session.queued or sum(row.queued_sizes) != session.out.bytes:
                fail(f"session {client_id!r}: stored queue {row.queued} messages / "
                     f"{sum(row.queued_sizes)} bytes, in memory {session.queued} / "
                     f"{session.out.bytes}")
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
        store = cast(GroupCommitWriter, old.writer).store
        snapshot = store.load(time.time(), self.config.persistence.session_expiry_s)
        broker = Broker(self.config)
        writer = GroupCommitWriter(store, self.config.persistence.max_pending_writes)
        writer.on_commit = broker._on_commit
        broker.writer = writer
        broker.restore(snapshot)
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
            if not peer.connacked and len(peer.opening) < 4096:
                peer.opening += chunk  # (its CONNECT, for the 5.0 checks)
            if not self._read(peer, chunk):
                return

    def _read(self, peer: Peer, chunk: bytes) -> bool:
        """Hand ``chunk`` to the broker as the stream task does: a publisher the broker holds
        (flow control: a backlogged subscriber, the publish rate) is read again only once
        released, and what it sent before is handled first. Time passes here until it is
        released: its subscribers count as stalled, its rate tokens refill. False when the
        connection ended on a protocol error."""
        conn = peer.conn
        broker = self.broker
        while conn.held_by or conn.held_packets is not None or conn.publish_tokens < 0:
            if conn.closing:
                return False
            if conn.held_by:
                broker.flow.release_stalled(conn, math.inf)
                if conn.held_by:  # held at the store's gate: the fuzzer's store has room
                    fail(f"{peer}: held by {sorted(c.name for c in conn.held_by)} for ever")
            if conn.publish_tokens < 0:
                broker.publish_rate_delay(conn, conn.tokens_at + 1e6)
            if not self._handle(peer, None):
                return False
        return self._handle(peer, chunk)

    def _handle(self, peer: Peer, chunk: bytes | None) -> bool:
        """``handle_data(chunk)``, or ``resume`` the held packets (``chunk`` None)."""
        try:
            if chunk is None:
                self.broker.resume(peer.conn)
            else:
                self.broker.handle_data(peer.conn, chunk)
        except MQTTError as exc:
            peer.handling = None
            peer.resending = False
            self.broker.protocol_error(peer.conn, exc)
            if not peer.conn.closing:
                fail(f"{peer}: protocol_error({exc!r}) left the connection open")
            return False
        peer.handling = None
        peer.resending = False
        return True

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
            if peer.v5 is not None and self.protocol_checks:
                peer.v5.check_after_step(peer)
            session = conn.session
            if session is None or not self.protocol_checks or not peer.connacked:
                continue
            if conn.sealed:
                continue  # after a 5.0 DISCONNECT: in flight for the session, never sent here
            if session.connection is not conn:
                fail(f"{peer}: its session {session.client_id!r} is attached elsewhere")
            inflight = session.inflight
            # held back: in flight from an earlier connection, not resent on this one yet
            held = set(getattr(session, "_held", None) or ())
            if peer.outstanding.keys() != inflight.keys() - held:
                fail(f"{peer}: the client holds {sorted(peer.outstanding.items())} "
                     f"unacknowledged, the broker {sorted(inflight.keys() - held)} in flight")
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
                data, cuts, size, level = random_decoder_input(rng)
                try:
                    packets, error, _ = check_decoder(data, cuts, size, hang_s, level)
                except (FuzzFailure, Hang) as exc:
                    decoded += 1
                    watchdog.arm()
                    if not found(exc, "(decoder)", lambda: print(
                            f"  input: {describe_decoder_input(data, cuts, size, level)}")):  # noqa: B023
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
                              f"  python -m tools.fuzz --seed {seed} --episode {episode}")
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
    from mqttd.server.listeners import TCPServer  # noqa: F401 (the I/O layer under test)

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
    parser = argparse.ArgumentParser(prog="tools.fuzz", description=__doc__.split("\n")[0])
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
    parser.add_argument("--tolerate", action="append", default=[], choices=fuzz5.CHECKS,
                        help="skip this check of a known finding (repeatable; see tools.fuzz5)")
    args = parser.parse_args(argv)
    fuzz5.TOLERATED.update(args.tolerate)
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
