"""Session state: subscriptions, outbound inflight window, packet ids, bounded queue.

A session outlives its connection when it is persistent (clean session = 0). It
holds the outbound QoS 1/2 messages that are in flight (sent, not yet acknowledged)
and those waiting for the window to open (or for the client to come back), and the
inbound QoS 2 packet ids received but not yet released (exactly-once: a PUBLISH with
an id in that set is acknowledged again but not routed again).

Everything here is synchronous: the broker calls these methods from a connection's
reader task while it handles a packet, so no locks are needed.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

import attrs

from mqttd.codec.packets import Publish, PubRel, encode_publish_parts

if TYPE_CHECKING:
    from mqttd.protocol import Connection

# an inflight entry: the message, the QoS it is delivered at, the RETAIN flag sent
Delivery = tuple[Publish, int, bool]
# (head, tail) per QoS for one routed message, filled lazily and shared by subscribers
PartsCache = list["tuple[bytes, bytes] | None"]

RELEASED: Final = None  # inflight value of a QoS 2 message whose PUBREL was sent
_MISSING: Final = object()

# QoS 0 messages are dropped (and counted) rather than buffered beyond this many bytes
# of unsent output for one connection. Issue #4 makes this a configured budget.
QOS0_OUTBOX_ALLOWANCE_BYTES = 4 * 1024 * 1024

_PACKET_ID_BYTES = [i.to_bytes(2, "big") for i in range(65536)]


def new_parts_cache() -> PartsCache:
    return [None, None, None]


@attrs.define(eq=False)
class Session:
    client_id: str
    persistent: bool
    max_inflight: int = 20
    max_queued: int = 1000
    subscriptions: dict[str, int] = attrs.Factory(dict)  # filter -> granted QoS
    inflight: dict[int, Delivery | None] = attrs.Factory(dict)  # insertion order = send order
    queue: deque[Delivery] = attrs.Factory(deque)
    inbound_qos2: set[int] = attrs.Factory(set)
    connection: Connection | None = None
    next_packet_id: int = 1
    # counters
    sent: int = 0
    dropped: int = 0
    dropped_qos0: int = 0

    # -- outbound ----------------------------------------------------------------------

    def deliver(
        self, message: Publish, qos: int, retain: bool, parts: PartsCache | None
    ) -> None:
        """Hand one message to this session at ``qos``. ``parts`` caches the encoded
        (head, tail) per QoS across the subscribers of one routed message (``None`` when
        the encoding is specific to this delivery, e.g. a retained message)."""
        conn = self.connection
        if not qos:
            if conn is None:
                return  # QoS 0 is not queued for offline sessions (as mosquitto's default)
            if conn.outbox_bytes > QOS0_OUTBOX_ALLOWANCE_BYTES:
                self.dropped_qos0 += 1
                return
            head, tail = _parts(message, 0, retain, parts)
            conn.send_parts(head, b"", tail)
            self.sent += 1
            return
        if conn is not None and not self.queue and len(self.inflight) < self.max_inflight:
            self._send_new(conn, message, qos, retain, parts)
        else:
            self._enqueue((message, qos, retain))

    def _send_new(
        self,
        conn: Connection,
        message: Publish,
        qos: int,
        retain: bool,
        parts: PartsCache | None,
    ) -> None:
        packet_id = self._allocate_packet_id()
        self.inflight[packet_id] = (message, qos, retain)
        head, tail = _parts(message, qos, retain, parts)
        conn.send_parts(head, _PACKET_ID_BYTES[packet_id], tail)
        self.sent += 1

    def _enqueue(self, delivery: Delivery) -> None:
        queue = self.queue
        if len(queue) >= self.max_queued:
            queue.popleft()
            self.dropped += 1
        queue.append(delivery)

    def _allocate_packet_id(self) -> int:
        packet_id = self.next_packet_id
        inflight = self.inflight
        while packet_id in inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        return packet_id

    def pump(self) -> None:
        """Move queued messages into the inflight window while it has room."""
        conn = self.connection
        queue = self.queue
        while queue and conn is not None and len(self.inflight) < self.max_inflight:
            message, qos, retain = queue.popleft()
            self._send_new(conn, message, qos, retain, None)

    def on_puback(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id, _MISSING)
        if entry is _MISSING or entry is RELEASED or entry[1] != 1:  # type: ignore[index]
            return False
        del self.inflight[packet_id]
        if self.queue:
            self.pump()
        return True

    def on_pubrec(self, packet_id: int) -> bool:
        """QoS 2 step 2: the PUBLISH is never sent again, a PUBREL is (by the caller)."""
        entry = self.inflight.get(packet_id, _MISSING)
        if entry is RELEASED:
            return True
        if entry is _MISSING or entry[1] != 2:  # type: ignore[index]
            return False
        self.inflight[packet_id] = RELEASED
        return True

    def on_pubcomp(self, packet_id: int) -> bool:
        if self.inflight.get(packet_id, _MISSING) is not RELEASED:
            return False
        del self.inflight[packet_id]
        if self.queue:
            self.pump()
        return True

    # -- connection lifecycle ----------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        """Bind to a new connection: resend what is in flight (PUBLISH with DUP=1, or
        PUBREL) with the original packet ids and order, then fill the window."""
        self.connection = conn
        for packet_id, entry in self.inflight.items():
            if entry is RELEASED:
                conn.send_packet(PubRel(packet_id))
            else:
                message, qos, retain = entry
                head, tail = encode_publish_parts(message.topic, message.payload, qos, retain, True)
                conn.send_parts(head, _PACKET_ID_BYTES[packet_id], tail)
        self.pump()

    def detach(self) -> None:
        self.connection = None


def _parts(
    message: Publish, qos: int, retain: bool, cache: PartsCache | None
) -> tuple[bytes, bytes]:
    if cache is None:
        return encode_publish_parts(message.topic, message.payload, qos, retain)
    parts = cache[qos]
    if parts is None:
        parts = cache[qos] = encode_publish_parts(message.topic, message.payload, qos, retain)
    return parts
