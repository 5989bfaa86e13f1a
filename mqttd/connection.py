"""Per-connection protocol state, sans-IO.

``Connection.receive_data(bytes)`` decodes and returns the packets the broker must
handle, enforcing the connection-level rules (CONNECT first and only once, nothing
after DISCONNECT, no server-to-client packet types from a client). Output is
appended to the outbox by ``send``/``send_packet``; the I/O layer drains it with
``data_to_send()`` after the ``on_output`` callback tells it there is something.
"""

from __future__ import annotations

import enum
import operator
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from mqttd.codec import Decoder, MQTTError, ProtocolError
from mqttd.codec import reason as reason_codes
from mqttd.codec.acks import encode_ack
from mqttd.codec.packets import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGRESP,
    PROTOCOL_5,
    PROTOCOL_311,
    SUBACK,
    UNSUBACK,
    Disconnect,
    Packet,
    Will,
)
from mqttd.logs import trace_received, trace_sent

if TYPE_CHECKING:
    from mqttd.config import Listener
    from mqttd.session import Session

_SERVER_ONLY = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})
_CHECKED = frozenset({CONNECT, DISCONNECT, *_SERVER_ONLY})  # what _check_connected looks for
_type_of = operator.attrgetter("TYPE")


class State(enum.Enum):
    AWAIT_CONNECT = "await-connect"
    CONNECTED = "connected"
    CLOSED = "closed"


# the members as globals: a global load, where ``State.X`` is a global and an attribute
# lookup through EnumType.__getattr__ (about a microsecond each)
_CONNECTED = State.CONNECTED
_CLOSED = State.CLOSED


def _noop() -> None:
    pass


def _noop_fed(conn: Connection) -> None:
    pass


@attrs.define(eq=False)
class BufferAccount:
    """Unsent outbound bytes across every connection of a broker."""

    bytes: int = 0


@attrs.define(eq=False)
class Connection:
    """One client connection as the broker sees it (no sockets here)."""

    peer: str = "?"
    max_packet_size: int = 268_435_460
    listener: Listener | None = None  # the listener it came through (None: driven without I/O)
    tls_identity: str | None = None  # subject CN of a verified TLS client certificate
    decoder: Decoder = attrs.field(init=False)
    state: State = State.AWAIT_CONNECT
    protocol_level: int = PROTOCOL_311
    client_id: str = ""
    keepalive_s: int = 0
    is_bridge: bool = False  # CONNECT with protocol level | 0x80 (another broker's bridge)
    # MQTT 5.0 (see mqttd.v5): topic aliases both ways, the client's Maximum Packet Size
    # (0: none), whether it wants reason strings, unacknowledged QoS 1 PUBLISHes held for a
    # commit (with the session's QoS 2 ids: what counts against our Receive Maximum)
    topic_alias_in_max: int = 0
    topic_aliases_in: dict[int, str] | None = None
    topic_alias_out_max: int = 0
    topic_aliases_out: dict[str, int] | None = None
    max_send_size: int = 0
    problem_information: bool = True
    qos1_unacked: int = 0
    connack_properties: dict[str, Any] | None = None  # 5.0: decided at CONNECT, sent in CONNACK
    accepted: bool = False  # CONNACK 0 sent
    connected_at: float = 0.0  # when it was accepted (epoch seconds)
    auth_exchange: Any = None  # 5.0 enhanced authentication (mqttd.enhanced_auth.Exchange)
    session: Session | None = None
    will: Will | None = None
    # output: ``outbox_bytes`` counts every unsent byte, including those the I/O layer
    # took with data_to_send() and has not reported as sent()
    outbox: list[bytes] = attrs.Factory(list)
    outbox_bytes: int = 0
    account: BufferAccount = attrs.Factory(BufferAccount)
    output_discarded: bool = False
    # no new output is queued: set when the output is discarded, or once a 5.0 DISCONNECT
    # is queued (what is queued before it is still sent and accounted as usual)
    sealed: bool = False
    # when the I/O layer's current send started (None while it is not sending)
    send_blocked_since: float | None = None
    on_output: Callable[[], None] = _noop
    # replies held back until the store commits what they acknowledge: (ticket, bytes,
    # puback), oldest first; an empty tuple until the first one. A plain attribute, not a
    # property: it is read once per read (Engine.reading_paused) and once per reply
    deferred: deque[tuple[int, bytes, bool]] | tuple[()] = attrs.field(default=(), init=False)
    # set by the broker to end the connection: the I/O layer flushes (if asked) and closes
    closing: bool = False
    close_reason: MQTTError | None = None
    flush_before_close: bool = False
    on_close: Callable[[], None] = _noop
    # flow control (mqttd.engine.flow). As a subscriber: ``pace_bytes`` of unsent output
    # or ``pace_messages`` queued make it pace its publishers; whether its backlog is over
    # a high watermark (since when, monotonic), whether it stalled, when its output last
    # moved, the publishers it holds. As a publisher: the subscribers it waits for, and
    # the packets read but not handled yet (handled first when it is released).
    pace_bytes: int = 262_144
    pace_messages: int = 256
    backlogged: bool = False
    backlogged_at: float = 0.0
    stalled: bool = False
    progress_at: float = 0.0
    waiters: set[Connection] | None = None
    held_by: set[Connection] | None = None
    held_packets: list[Packet] | None = None
    on_fed: Callable[[Connection], None] = _noop_fed
    times_held: int = 0  # as a publisher: held by a backlogged subscriber
    stalls: int = 0  # as a subscriber: found stalled while it held a publisher
    # publish rate limit (token bucket; the broker spends, the I/O layer refills and waits)
    publish_tokens: float = 0.0
    tokens_at: float = 0.0  # when publish_tokens was last refilled (I/O layer's clock)
    # counters
    packets_received: int = 0
    dropped_qos0: int = 0
    # logging: what ended the connection, when no MQTTError says (the I/O layer or the
    # client's DISCONNECT); whether its packets are traced (decided once, mqttd.logs)
    end_reason: str = ""
    trace: bool = False

    def __attrs_post_init__(self) -> None:
        # (positional: a keyword argument costs a compiled class's constructor a slow parse)
        self.decoder = Decoder(self.max_packet_size, 0, True)

    def defer(self, ticket: int, data: bytes, puback: bool = False) -> None:
        deferred = self.deferred
        if isinstance(deferred, tuple):  # the first one
            deferred = self.deferred = deque()
        deferred.append((ticket, data, puback))

    def release_deferred(self, committed: int) -> bool:
        """Send the held replies whose ticket is committed; True when none are left."""
        deferred = self.deferred
        if not deferred:
            return True
        while deferred and deferred[0][0] <= committed:
            _ticket, data, puback = deferred.popleft()
            if puback:  # that PUBLISH no longer counts as unacknowledged
                self.qos1_unacked -= 1
            self.send(data)
        return not deferred

    @property
    def name(self) -> str:
        return f"{self.client_id or '<connecting>'} ({self.peer})"

    def receive_data(self, data: bytes) -> list[Packet]:
        """Decode ``data``. Raises MQTTError with ``packets_before`` set to the valid
        packets preceding the error, which the caller handles before closing."""
        try:
            packets = self.decoder.feed(data)
        except MQTTError as exc:
            if self.trace:
                trace_received(self.client_id, self.peer, exc.packets_before)
            exc.packets_before = self._check(exc.packets_before)
            raise
        if self.trace:
            trace_received(self.client_id, self.peer, packets)
        if self.state is _CONNECTED:  # _check's common case, without its two calls
            self.packets_received += len(packets)
            if _CHECKED.isdisjoint(map(_type_of, packets)):
                return packets
            return self._check_connected(packets, 0)
        return self._check(packets)

    def _check(self, packets: list[Packet]) -> list[Packet]:
        """Apply the connection-level rules; raise ProtocolError (with the packets that
        precede the offending one in ``packets_before``) when a packet breaks them."""
        self.packets_received += len(packets)
        state = self.state
        if state is _CONNECTED:
            return self._check_connected(packets, 0)
        if state is _CLOSED or not packets:
            return []
        if packets[0].TYPE != CONNECT:
            raise ProtocolError(f"first packet is {type(packets[0]).__name__}, not CONNECT")
        self.state = _CONNECTED
        return self._check_connected(packets, 1)

    def _check_connected(self, packets: list[Packet], start: int) -> list[Packet]:
        if not start and _CHECKED.isdisjoint(map(_type_of, packets)):
            return packets  # the common batch: nothing to check (one pass in C)
        for index in range(start, len(packets)):
            kind = packets[index].TYPE
            if kind == CONNECT or kind in _SERVER_ONLY:
                what = "a second CONNECT" if kind == CONNECT else type(packets[index]).__name__
                exc = ProtocolError(f"client sent {what}")
                exc.packets_before = packets[:index]
                raise exc
            if kind == DISCONNECT:
                self.state = _CLOSED
                return packets[: index + 1]
        return packets

    # -- output ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.sealed:
            return
        size = len(data)
        self.outbox_bytes += size
        self.account.bytes += size
        if not self.outbox:
            self.outbox.append(data)
            self.on_output()
        else:
            self.outbox.append(data)

    def send_parts(self, head: bytes, middle: bytes, tail: bytes) -> None:
        """Queue one packet given as three parts (a shared PUBLISH head, the packet id,
        the shared payload) without concatenating them here."""
        if self.sealed:
            return
        first = not self.outbox
        self.outbox += (head, middle, tail)
        size = len(head) + len(middle) + len(tail)
        self.outbox_bytes += size
        self.account.bytes += size
        if first:
            self.on_output()

    def send_pair(self, head: bytes, tail: bytes) -> None:
        """Queue one packet given as two parts (a shared QoS 0 PUBLISH: its head, then the
        shared payload)."""
        if self.sealed:
            return
        outbox = self.outbox
        first = not outbox
        outbox += (head, tail)  # (one in-place extend, not two append calls)
        size = len(head) + len(tail)
        self.outbox_bytes += size
        self.account.bytes += size
        if first:
            self.on_output()

    def send_packet(self, packet: Packet) -> None:
        self.send(packet.encode(self.protocol_level))

    def encode_ack(self, kind: int, packet_id: int, code: int = 0, reason: str = "") -> bytes:
        """PUBACK / PUBREC / PUBREL / PUBCOMP for this client: the reason code at level 5
        only, the reason string only with an error code, when the client allows problem
        information and when it fits the client's Maximum Packet Size (codec/acks.py)."""
        return encode_ack(
            kind, packet_id, code, level=self.protocol_level,
            reason=reason if self.problem_information else "", max_size=self.max_send_size,
        )

    def fit(self, packet: Packet, without_extras: Packet) -> bytes:
        """``packet`` encoded, or ``without_extras`` (the same without reason string / user
        properties) when the first is larger than the client's 5.0 Maximum Packet Size
        (MQTT-3.1.2-25)."""
        data = packet.encode(self.protocol_level)
        if self.max_send_size and len(data) > self.max_send_size:
            return without_extras.encode(self.protocol_level)
        return data

    def data_to_send(self) -> bytes:
        """Everything queued, joined; report it with :meth:`sent` once it is sent."""
        if not self.outbox:
            return b""
        data = b"".join(self.outbox)
        self.outbox.clear()
        if self.trace:
            trace_sent(self.client_id, self.peer, data, self.protocol_level)
        return data

    def sent(self, size: int) -> None:
        # (Engine.output_sent has a copy of this, inlined)
        if self.output_discarded:
            return  # already taken off the account when the connection ended
        self.outbox_bytes -= size
        self.account.bytes -= size

    def discard_output(self) -> None:
        """The connection is gone: what was not sent never will be (including what the I/O
        layer may still be writing: its later sent() is ignored)."""
        self.outbox.clear()
        self.account.bytes -= self.outbox_bytes
        self.outbox_bytes = 0
        self.output_discarded = self.sealed = True

    def close(self, reason: MQTTError | None = None, *, flush: bool = False) -> None:
        """Ask the I/O layer to end this connection (idempotent). A 5.0 client that was
        accepted is told why first: DISCONNECT with the reason code (and reason string)."""
        if not self.closing:
            if (
                reason is not None and self.protocol_level == PROTOCOL_5 and self.accepted
                and not self.sealed
            ):
                code = reason.reason_code
                if not reason_codes.is_valid(code, DISCONNECT) or code < 0x80:
                    code = reason_codes.PROTOCOL_ERROR  # e.g. a second CONNECT's 0x84
                text = str(reason)[:200]
                self.send(self.fit(
                    Disconnect(code, {"reason_string": text} if text else None),
                    Disconnect(code),
                ))
                # the DISCONNECT is the last packet (MQTT-3.14.4-1): what is queued before it
                # is flushed, nothing is queued after it
                self.sealed = True
                flush = True
            self.closing = True
            self.state = _CLOSED
            self.close_reason = reason
            self.flush_before_close = flush
            self.on_close()
