"""Session state: subscriptions, outbound inflight window, packet ids, bounded queue.

A session outlives its connection when it is persistent (clean session = 0). It holds
the outbound QoS 1/2 messages in flight (sent, not yet acknowledged) and those waiting
for the window to open or for the client to come back, and the inbound QoS 2 packet ids
received but not yet released (exactly once: a PUBLISH with an id in that set is
acknowledged again but not routed again).

A persistent session writes every change to the store (``writer``) as typed operations.
Its queue is a window onto the database: the oldest queued messages (at most
``page_size``) are in RAM in ``queue``; newer ones are on disk only (``disk_count``
of them, every one with a ``seq`` above ``disk_after``) and are read back a page at a
time as the client drains the queue, so a long offline backlog costs no RAM.

Everything here is synchronous: the broker calls it while handling a packet.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from mqttd import v5
from mqttd.codec.errors import ProtocolError, QuotaExceeded
from mqttd.codec.packets import PROTOCOL_5, Publish, PubRel, encode_publish_parts
from mqttd.topics import is_shared, matches, parse_shared
from persistence import ops

if TYPE_CHECKING:
    from mqttd.codec import MQTTError
    from persistence.journal import Journal
    from persistence.store import RestoredSession

log = logging.getLogger(__name__)

# An outbound delivery: (message, QoS delivered at, RETAIN flag sent, seq, share,
# subscription ids). ``seq`` numbers a persistent session's deliveries (0 in clean
# sessions). In ``inflight`` a message of None means "PUBREL sent" (QoS 2 after PUBREC).
# ``share`` is the ``$share/...`` name of the shared subscription it came through, the ids
# those of the 5.0 subscriptions it matched (None otherwise); both kept in memory only.
Delivery = tuple["Publish | None", int, bool, int, "str | None", "tuple[int, ...] | None"]
# Per routed message: encoded (head, tail) per QoS, shared by subscribers, and the stored
# message id once a persistent session has stored it (slot 3).
PartsCache = list



class Peer(v5.Terms, Protocol):
    """What a session needs of its client's connection (:class:`mqttd.protocol.Connection`
    has it): the session sends through it and never imports it."""

    protocol_level: int
    outbox_bytes: int

    def send_parts(self, head: bytes, middle: bytes, tail: bytes) -> None: ...

    def send_packet(self, packet: Any) -> None: ...

    def close(self, reason: MQTTError | None = None, *, flush: bool = False) -> None: ...


DROP_OLDEST = "drop_oldest"
DROP_NEW = "drop_new"
DISCONNECT = "disconnect"
DROP_LOG_INTERVAL_S = 60.0

_PACKET_ID_BYTES = [i.to_bytes(2, "big") for i in range(65536)]


def new_parts_cache() -> PartsCache:
    # 3.x encodings per QoS, the stored message id, 5.0 encodings per QoS
    return [None, None, None, 0, None, None, None]


@attrs.define(eq=False)
class DropCounters:
    """Drops across all sessions (shared by the broker's sessions)."""

    dropped: int = 0  # QoS 1/2 messages dropped by a queue budget
    dropped_qos0: int = 0  # QoS 0 messages dropped because the client's output was backed up


@attrs.define(eq=False)
class Session:
    client_id: str
    persistent: bool
    max_inflight: int = 20  # the window: the configured one, lowered by a Receive Maximum
    max_queued: int = 1000
    writer: Journal | None = None  # persistent sessions only
    page_size: int = 256
    max_queued_bytes: int = -1  # payload bytes; -1: no limit
    overflow_policy: str = DROP_OLDEST
    qos0_buffer_bytes: int = 262_144
    counters: DropCounters = attrs.Factory(DropCounters)
    subscriptions: dict[str, int] = attrs.Factory(dict)  # filter -> granted QoS
    inflight: dict[int, Delivery] = attrs.Factory(dict)  # insertion order = send order
    _queue: deque[Delivery] | None = None  # created when first needed (idle sessions are many)
    inbound_qos2: set[int] = attrs.Factory(set)
    connection: Peer | None = None
    next_packet_id: int = 1
    next_seq: int = 1
    queued_bytes: int = 0  # payload bytes of everything queued (RAM, being read, disk)
    disk_count: int = 0  # queued on disk only (persistent sessions)
    disk_after: int = 0  # every disk-only seq is above this
    disk_sizes: array[int] = attrs.Factory(lambda: array("Q"))  # payload sizes, seq order
    disk_head: int = 0  # disk_sizes[disk_head:] are the disk-only entries
    loading_sizes: list[int] = attrs.Factory(list)  # entries being read back from disk
    pending_drops: int = 0  # drops that fall on the page being read back
    # drops of disk-only messages decided while a page is read back: the store must drop
    # the oldest rows *after* that page, which is only known once it has arrived
    pending_disk_drops: int = 0
    disconnected_at: float | None = None
    # 5.0 Session Expiry Interval in seconds (-1: never); None: the configured default
    # (3.1.1 persistent sessions)
    expiry_s: int | None = None
    # 5.0 subscription options: filter -> (options byte, subscription id), non-default only
    sub_options: dict[str, tuple[int, int]] = attrs.Factory(dict)
    discarded: bool = False
    # the user name of the latest login, for ACL checks on delivery; ``login_known`` is
    # False for a session restored from the store until its client logs in again
    username: str | None = None
    login_known: bool = False
    # counters
    sent: int = 0
    dropped: int = 0
    dropped_qos0: int = 0
    expired: int = 0  # 5.0 messages whose expiry interval passed while queued
    too_large: int = 0  # 5.0 deliveries above the client's Maximum Packet Size
    _next_drop_log: float = 0.0
    # inflight packet ids not resent yet on this connection (its window was smaller)
    _held: deque[int] | None = None

    @classmethod
    def restore(
        cls,
        row: RestoredSession,
        writer: Journal,
        *,
        page_size: int,
        **limits: object,
    ) -> Session:
        session = cls(
            row.client_id, True, writer=writer, page_size=page_size,
            subscriptions=dict(row.subscriptions),
            inbound_qos2=set(row.inbound_qos2),
            next_seq=row.next_seq,
            disk_count=row.queued,
            disk_after=row.queued_after,
            disk_sizes=array("Q", row.queued_sizes),
            queued_bytes=sum(row.queued_sizes),
            disconnected_at=row.disconnected_at,
            expiry_s=row.expiry_s,
            sub_options=dict(row.subscription_options),
            **limits,  # type: ignore[arg-type]
        )
        for seq, packet_id, state, qos, retain, topic, payload, props, expires in row.inflight:
            message = None if state == 2 else v5.restored_message(
                topic, payload, qos, retain, props, expires
            )
            session.inflight[packet_id] = (
                message, qos, retain, seq, None, session._sub_ids_for(topic)
            )
        if session.inflight:
            session.next_packet_id = max(session.inflight) % 65535 + 1
        return session

    @property
    def queue(self) -> deque[Delivery] | tuple[()]:
        """Queued deliveries held in RAM, oldest first (read-only view)."""
        return self._queue if self._queue is not None else ()

    def _queue_for_append(self) -> deque[Delivery]:
        if self._queue is None:
            self._queue = deque()
        return self._queue

    @property
    def loading(self) -> int:
        """Deliveries being read back from disk."""
        return len(self.loading_sizes)

    @property
    def queued(self) -> int:
        """Messages waiting for the window (in RAM, being read back, or on disk)."""
        held = len(self._queue) if self._queue is not None else 0
        return held + len(self.loading_sizes) + self.disk_count - self.pending_drops

    def stats(self) -> dict[str, int | bool]:
        return {
            "connected": self.connection is not None,
            "persistent": self.persistent,
            "inflight": len(self.inflight),
            "queued": self.queued,
            "queued_bytes": self.queued_bytes,
            "sent": self.sent,
            "dropped": self.dropped,
            "dropped_qos0": self.dropped_qos0,
            "expired": self.expired,
            "too_large": self.too_large,
        }

    def _over_budget(self, extra_messages: int, extra_bytes: int) -> bool:
        if self.queued + extra_messages > self.max_queued:
            return True
        limit = self.max_queued_bytes
        return limit >= 0 and self.queued_bytes + extra_bytes > limit

    # -- outbound ----------------------------------------------------------------------

    def deliver(
        self,
        message: Publish,
        qos: int,
        retain: bool,
        parts: PartsCache | None,
        share: str | None = None,
        sub_ids: tuple[int, ...] | None = None,
    ) -> None:
        """Hand one message to this session at ``qos``. ``parts`` is shared by the
        subscribers of one routed message (``None`` when the encoding is specific to this
        delivery, e.g. a retained message sent on SUBSCRIBE). ``share`` names the shared
        subscription it came through, ``sub_ids`` the identifiers of the 5.0 subscriptions
        it matched."""
        conn = self.connection
        if not qos:
            if conn is None:
                return  # QoS 0 is not queued for offline sessions (as mosquitto's default)
            if conn.outbox_bytes > self.qos0_buffer_bytes:
                self.dropped_qos0 += 1
                self.counters.dropped_qos0 += 1
                self._log_drop()
                return
            if conn.protocol_level == PROTOCOL_5:
                encoded = v5.publish_parts(conn, message, 0, retain, parts, sub_ids)
                if encoded is None:
                    self.too_large += 1
                    return
                head, tail = encoded
            else:
                head, tail = _parts(message, 0, retain, parts)
            conn.send_parts(head, b"", tail)
            self.sent += 1
            return
        window_open = (
            conn is not None
            and not self._queue
            and not self.loading_sizes
            and not self.disk_count
            and len(self.inflight) < self.max_inflight
        )
        size = len(message.payload)
        if (
            not window_open
            and self.overflow_policy != DROP_OLDEST
            and self._over_budget(1, size)
        ):
            self._count_drop()
            if self.overflow_policy == DISCONNECT and conn is not None:
                log.warning(
                    "client %s: queue full (%d messages, %d bytes): disconnecting it "
                    "(overflow_policy disconnect)", self.client_id, self.queued,
                    self.queued_bytes,
                )
                conn.close(QuotaExceeded("queue full (overflow_policy disconnect)"))
            return
        writer = self.writer
        if writer is None:
            if window_open:
                self._send_new(
                    conn, message, qos, retain, parts, 0, share, sub_ids  # type: ignore[arg-type]
                )
            else:
                self._queue_for_append().append((message, qos, retain, 0, share, sub_ids))
                self.queued_bytes += size
                self._trim()
            return
        message_id = parts[3] if parts is not None else 0
        if not message_id:
            if message.properties is None and message.expires_at is None:
                message_id = writer.add_message(message.topic, message.payload, message.qos)
            else:
                message_id = writer.add_message(
                    message.topic, message.payload, message.qos,
                    v5.stored_properties(message), message.expires_at,
                )
            if parts is not None:
                parts[3] = message_id
        seq = self.next_seq
        self.next_seq = seq + 1
        packet_id = 0
        if window_open:
            packet_id = self._send_new(
                conn, message, qos, retain, parts, seq, share, sub_ids  # type: ignore[arg-type]
            )
            if packet_id < 0:
                return  # larger than the client accepts: dropped, never stored for it
        elif (
            conn is not None  # an offline session's queue lives on disk only
            and not self.loading_sizes
            and not self.disk_count
            and len(self.queue) < self.page_size
        ):
            self._queue_for_append().append((message, qos, retain, seq, share, sub_ids))
        else:
            if not self.disk_count and not self.loading_sizes:
                self.disk_after = seq - 1
            self.disk_count += 1
            self.disk_sizes.append(size)
        writer.submit(ops.AddDelivery(self.client_id, seq, message_id, qos, retain, packet_id))
        if not packet_id:
            self.queued_bytes += size
            self._trim()

    def _send_new(
        self,
        conn: Peer,
        message: Publish,
        qos: int,
        retain: bool,
        parts: PartsCache | None,
        seq: int,
        share: str | None = None,
        sub_ids: tuple[int, ...] | None = None,
    ) -> int:
        """Send a new PUBLISH and put it in flight; its packet id, or -1 when it is larger
        than the client's Maximum Packet Size (dropped and counted, nothing sent)."""
        if conn.protocol_level == PROTOCOL_5:
            encoded = v5.publish_parts(conn, message, qos, retain, parts, sub_ids)
            if encoded is None:
                self.too_large += 1
                log.info("client %s: a message on %r is larger than its maximum packet size "
                         "(%d): dropped", self.client_id, message.topic, conn.max_send_size)
                return -1
            head, tail = encoded
        else:
            head, tail = _parts(message, qos, retain, parts)
        packet_id = self.next_packet_id
        inflight = self.inflight
        while packet_id in inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        inflight[packet_id] = (message, qos, retain, seq, share, sub_ids)
        conn.send_parts(head, _PACKET_ID_BYTES[packet_id], tail)
        self.sent += 1
        return packet_id

    def _trim(self) -> None:
        """drop_oldest: drop the oldest queued messages until the queue fits its budget."""
        while self.queued and self._over_budget(0, 0):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._count_drop()
        if self._queue:
            message, _qos, _retain, seq, _share, _ids = self._queue.popleft()
            self.queued_bytes -= len(message.payload)  # type: ignore[union-attr]
            if self.writer is not None:
                self.writer.submit(ops.RemoveDelivery(self.client_id, seq))
        elif self.pending_drops < len(self.loading_sizes):
            # the oldest are on the page being read back: drop them when it arrives
            self.queued_bytes -= self.loading_sizes[self.pending_drops]
            self.pending_drops += 1
        elif self.loading_sizes and self.disk_count:
            # the oldest is on disk after the page being read back: drop it when it arrives
            self.disk_count -= 1
            self.queued_bytes -= self.disk_sizes[self.disk_head]
            self._advance_disk_head(1)
            self.pending_disk_drops += 1
        elif self.disk_count and self.writer is not None:
            self.disk_count -= 1
            self.queued_bytes -= self.disk_sizes[self.disk_head]
            self._advance_disk_head(1)
            self.writer.submit(ops.DropOldestQueued(self.client_id, self.disk_after))

    def _count_drop(self) -> None:
        self.dropped += 1
        self.counters.dropped += 1
        self._log_drop()

    def _log_drop(self) -> None:
        now = time.monotonic()
        if now >= self._next_drop_log:  # at most once a minute per client
            self._next_drop_log = now + DROP_LOG_INTERVAL_S
            log.warning(
                "client %s: dropping messages (%s; queue %d messages, %d bytes): %d dropped, "
                "%d QoS 0 dropped so far", self.client_id, self.overflow_policy, self.queued,
                self.queued_bytes, self.dropped, self.dropped_qos0,
            )

    def _advance_disk_head(self, count: int) -> None:
        self.disk_head += count
        if self.disk_head > 4096 and self.disk_head * 2 > len(self.disk_sizes):
            del self.disk_sizes[: self.disk_head]
            self.disk_head = 0

    def pump(self) -> None:
        """Move queued messages into the inflight window while it has room; read the next
        page back from disk when the in-RAM part runs low."""
        conn = self.connection
        if conn is None:
            return
        not_resent = self._held
        if not_resent is not None:  # in flight from an earlier connection, not resent yet
            while not_resent and len(self.inflight) - len(not_resent) < self.max_inflight:
                packet_id = not_resent.popleft()
                if packet_id in self.inflight:
                    self._resend(conn, packet_id)
            if not_resent:
                return
            self._held = None
        queue = self._queue
        writer = self.writer
        now = 0.0
        while queue and len(self.inflight) < self.max_inflight:
            message, qos, retain, seq, share, sub_ids = queue.popleft()
            self.queued_bytes -= len(message.payload)  # type: ignore[union-attr]
            if message.expires_at is not None:  # type: ignore[union-attr]
                now = now or time.time()
                if message.expires_at <= now:  # type: ignore[union-attr]
                    self.expired += 1  # not delivered after its expiry interval
                    if writer is not None:
                        writer.submit(ops.RemoveDelivery(self.client_id, seq))
                    continue
            packet_id = self._send_new(
                conn, message, qos, retain, None, seq, share, sub_ids  # type: ignore[arg-type]
            )
            if writer is not None:
                if packet_id < 0:
                    writer.submit(ops.RemoveDelivery(self.client_id, seq))
                else:
                    writer.submit(ops.SetInflight(self.client_id, seq, packet_id))
        held = len(queue) if queue is not None else 0
        if self.disk_count and not self.loading_sizes and held <= self.page_size // 2:
            count = min(self.page_size - held, self.disk_count)
            self.disk_count -= count
            head = self.disk_head
            self.loading_sizes = list(self.disk_sizes[head : head + count])
            self._advance_disk_head(count)
            writer.submit(  # type: ignore[union-attr]
                ops.LoadQueued(self.client_id, self.disk_after, count, self._page_loaded)
            )

    def _page_loaded(self, rows: list[ops.QueuedRow]) -> None:
        if self.discarded:
            return
        expected = len(self.loading_sizes)
        skip, self.pending_drops = self.pending_drops, 0
        self.loading_sizes = []
        if len(rows) < expected:  # rows removed under us (should not happen): stay honest
            log.error("session %s: %d queued rows missing", self.client_id, expected - len(rows))
            self.queued_bytes = max(0, self.queued_bytes - (expected - len(rows)))
        if rows:
            self.disk_after = rows[-1].seq
        writer: Journal = self.writer  # type: ignore[assignment]
        for row in rows[:skip]:  # dropped while being read back
            writer.submit(ops.RemoveDelivery(self.client_id, row.seq))
        disk_drops, self.pending_disk_drops = self.pending_disk_drops, 0
        for _ in range(disk_drops):  # the oldest on disk after this page
            writer.submit(ops.DropOldestQueued(self.client_id, self.disk_after))
        for row in rows[skip:]:
            if row.properties is None and row.expires_at is None:
                message = Publish(row.topic, row.payload, row.qos, row.retain)
            else:
                message = v5.restored_message(
                    row.topic, row.payload, row.qos, row.retain, row.properties, row.expires_at
                )
            self._queue_for_append().append(
                (message, row.qos, row.retain, row.seq, None, self._sub_ids_for(row.topic))
            )
        self.pump()

    # The acks of outbound deliveries. An unknown packet id is no error (False: e.g. an ack
    # that crossed a resend); an ack of the wrong kind for a delivery in flight is: a QoS 1
    # PUBLISH is answered by PUBACK only, a QoS 2 one by PUBREC and then PUBCOMP (MQTT 3.1.1
    # table 3.4, 5.0 section 4.3). ProtocolError closes the connection; the delivery stays
    # in flight and is sent again on the next one, as after any lost connection.

    def on_puback(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None:
            return False
        if entry[1] != 1:
            raise ProtocolError(f"PUBACK for the QoS 2 PUBLISH {packet_id}")
        del self.inflight[packet_id]
        self._acknowledged(entry[3])
        return True

    def on_pubrec(self, packet_id: int) -> bool:
        """QoS 2 step 2: the PUBLISH is never sent again, a PUBREL is (by the caller). A
        PUBREC again after the PUBREL is a resend: True, the caller sends PUBREL again."""
        entry = self.inflight.get(packet_id)
        if entry is None:
            return False
        if entry[1] != 2:
            raise ProtocolError(f"PUBREC for the QoS 1 PUBLISH {packet_id}")
        if entry[0] is not None:
            self.inflight[packet_id] = (None, 2, False, entry[3], None, None)
            if self.writer is not None:
                self.writer.submit(ops.SetReleased(self.client_id, entry[3]))
        return True

    def on_pubrec_refused(self, packet_id: int) -> bool:
        """5.0: a PUBREC with an error code (0x80 and up) ends the QoS 2 exchange: no PUBREL,
        the message is done with for this client (MQTT-4.3.3-4)."""
        entry = self.inflight.get(packet_id)
        if entry is None:
            return False
        if entry[1] != 2:
            raise ProtocolError(f"PUBREC for the QoS 1 PUBLISH {packet_id}")
        if entry[0] is None:
            return False  # after our PUBREL: the exchange is past PUBREC already
        del self.inflight[packet_id]
        self._acknowledged(entry[3])
        return True

    def on_pubcomp(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None:
            return False
        if entry[1] != 2:
            raise ProtocolError(f"PUBCOMP for the QoS 1 PUBLISH {packet_id}")
        if entry[0] is not None:
            raise ProtocolError(f"PUBCOMP before PUBREC for the QoS 2 PUBLISH {packet_id}")
        del self.inflight[packet_id]
        self._acknowledged(entry[3])
        return True

    def _acknowledged(self, seq: int) -> None:
        if self.writer is not None:
            self.writer.submit(ops.RemoveDelivery(self.client_id, seq))
        if self._queue or self.disk_count:
            self.pump()

    # -- connection lifecycle ----------------------------------------------------------

    def attach(self, conn: Peer) -> None:
        """Bind to a new connection: resend what is in flight (PUBLISH with DUP=1, or
        PUBREL) with the original packet ids and order, then fill the window."""
        self.connection = conn
        self.disconnected_at = None
        self._held = None
        packet_ids = list(self.inflight)
        resent = 0
        for index, packet_id in enumerate(packet_ids):
            if resent >= self.max_inflight:
                # a 5.0 client's Receive Maximum may be lower than what is in flight: the
                # rest is resent as acknowledgements make room (MQTT-3.3.4-9)
                self._held = deque(packet_ids[index:])
                break
            if self._resend(conn, packet_id):
                resent += 1
        self.pump()

    def _resend(self, conn: Peer, packet_id: int) -> bool:
        """Send an inflight delivery again on a new connection (PUBLISH with DUP=1, or
        PUBREL); False if it was dropped (larger than the client accepts)."""
        message, qos, retain, seq, _share, ids = self.inflight[packet_id]
        if message is None:
            conn.send_packet(PubRel(packet_id))
            return True
        if conn.protocol_level == PROTOCOL_5:
            encoded = v5.publish_parts(conn, message, qos, retain, None, ids, True)
            if encoded is None:  # this client accepts smaller packets than the last one
                self.too_large += 1
                del self.inflight[packet_id]
                if self.writer is not None:
                    self.writer.submit(ops.RemoveDelivery(self.client_id, seq))
                return False
            head, tail = encoded
        else:
            head, tail = encode_publish_parts(message.topic, message.payload, qos, retain, True)
        conn.send_parts(head, _PACKET_ID_BYTES[packet_id], tail)
        return True

    def _sub_ids_for(self, topic: str) -> tuple[int, ...] | None:
        """The 5.0 subscription identifiers of a message read back from the store (which
        keeps them per subscription, not per queued message): those of this session's
        subscriptions that match its topic."""
        if not self.sub_options:
            return None
        ids = set()
        for topic_filter, (_options, sub_id) in self.sub_options.items():
            if sub_id:
                inner = parse_shared(topic_filter)[1] if is_shared(topic_filter) else topic_filter
                if matches(inner, topic):
                    ids.add(sub_id)
        return tuple(sorted(ids)) or None

    def take_shared(self) -> list[tuple[Publish, int, str]]:
        """Take back the unacknowledged deliveries that came through shared subscriptions
        (PUBLISHes in flight, QoS 2 ones not yet PUBRECed, and those queued in RAM), oldest
        first, so that the broker can hand them to another member of their group. Disk-only
        queued entries (a backlog beyond one page) stay with this session."""
        taken: list[tuple[Publish, int, str]] = []
        writer = self.writer
        for packet_id, (message, qos, _retain, seq, share, _ids) in list(self.inflight.items()):
            if share is not None and message is not None:
                del self.inflight[packet_id]
                taken.append((message, qos, share))
                if writer is not None:
                    writer.submit(ops.RemoveDelivery(self.client_id, seq))
        queue = self._queue
        if queue and any(entry[4] is not None for entry in queue):
            kept: deque[Delivery] = deque()
            for entry in queue:
                message, qos, _retain, seq, share, _ids = entry
                if share is None:
                    kept.append(entry)
                    continue
                taken.append((message, qos, share))  # type: ignore[arg-type]
                self.queued_bytes -= len(message.payload)  # type: ignore[union-attr]
                if writer is not None:
                    writer.submit(ops.RemoveDelivery(self.client_id, seq))
            self._queue = kept
        return taken

    def detach(self) -> None:
        self.connection = None
        self._held = None
        self._evict_queue()

    def _evict_queue(self) -> None:
        """Offline: hand the queued messages held in RAM back to the disk region (they are
        stored already), so an offline session's queue costs no RAM. Not while a page is
        being read back (its rows lie between the two); that page stays in RAM."""
        queue = self._queue
        if self.writer is None or not queue or self.loading_sizes:
            return
        sizes = array("Q", (len(entry[0].payload) for entry in queue))  # type: ignore[union-attr]
        sizes.extend(self.disk_sizes[self.disk_head :])
        self.disk_sizes = sizes
        self.disk_head = 0
        self.disk_after = queue[0][3] - 1
        self.disk_count += len(queue)
        self._queue = None


def _parts(
    message: Publish, qos: int, retain: bool, cache: PartsCache | None
) -> tuple[bytes, bytes]:
    if cache is None:
        return encode_publish_parts(message.topic, message.payload, qos, retain)
    parts = cache[qos]
    if parts is None:
        parts = cache[qos] = encode_publish_parts(message.topic, message.payload, qos, retain)
    return parts  # type: ignore[no-any-return]
