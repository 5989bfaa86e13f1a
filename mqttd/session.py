"""Session state: subscriptions, outbound inflight window, packet ids, inbound QoS 2.

A session outlives its connection when it is persistent (clean session = 0). It holds
the outbound QoS 1/2 messages in flight (sent, not yet acknowledged), its out-queue (those
waiting for the window to open or for the client to come back: :mod:`mqttd.outqueue`), and
the inbound QoS 2 packet ids received but not yet released (exactly once: a PUBLISH with an
id in that set is acknowledged again but not routed again).

A persistent session writes every change to the store (``writer``) as typed operations.

Everything here is synchronous: the broker calls it while handling a packet.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import attrs

from mqttd import v5
from mqttd.codec.errors import ProtocolError, QuotaExceeded
from mqttd.codec.packets import PROTOCOL_5, Publish, PubRel, encode_publish_parts
from mqttd.delivery import (
    STORED_ID,
    Attempt,
    Delivery,
    Fanout,
    Recipient,
    Share,
    encode_delivery,
    encode_resend,
    new_delivery,
    stored_share,
)
from mqttd.outqueue import DISCONNECT, DropCounters, OutQueue, QueueLimits
from mqttd.topics import is_shared, matches, parse_shared
from persistence import ops

if TYPE_CHECKING:
    from mqttd.codec import MQTTError
    from persistence.journal import Journal
    from persistence.store import RestoredSession

log = logging.getLogger(__name__)


class Peer(Recipient, Protocol):
    """What a session needs of its client's connection (:class:`mqttd.connection.Connection`
    has it): the session sends through it and never imports it."""

    outbox_bytes: int
    # flow control (mqttd.engine.flow): over ``pace_bytes`` of unsent output or
    # ``pace_messages`` queued, a delivery calls ``on_fed`` (which holds the publisher),
    # unless the client has ``stalled``
    pace_bytes: int
    pace_messages: int
    stalled: bool

    def on_fed(self, conn: Any) -> None: ...

    def send_parts(self, head: bytes, middle: bytes, tail: bytes) -> None: ...

    def send_pair(self, head: bytes, tail: bytes) -> None: ...

    def send_packet(self, packet: Any) -> None: ...

    def close(self, reason: MQTTError | None = None, *, flush: bool = False) -> None: ...


_PACKET_ID_BYTES = [i.to_bytes(2, "big") for i in range(65536)]


class Taken(NamedTuple):
    """A delivery through a shared subscription taken back from a member whose connection
    ended (:meth:`Session.take_shared`): ``sent`` if it was in flight (delivered, not
    acknowledged), not if it was still queued."""

    message: Publish
    qos: int
    share: Share
    sent: bool


def _shared_delivery(
    client_id: str, seq: int, message_id: int, qos: int, retain: bool, packet_id: int,
    share: Share,
) -> ops.AddSharedDelivery:
    if share.__class__ is str:
        return ops.AddSharedDelivery(client_id, seq, message_id, qos, retain, packet_id,
                                     share)  # type: ignore[arg-type]
    attempt: Attempt = share  # type: ignore[assignment]
    return ops.AddSharedDelivery(client_id, seq, message_id, qos, retain, packet_id,
                                 attempt.share, attempt.deliveries, attempt.first_failure or None)


@attrs.define(eq=False)
class Session:
    client_id: str
    persistent: bool
    max_inflight: int = 20  # the window: the configured one, lowered by a Receive Maximum
    writer: Journal | None = None  # persistent sessions only
    queue_limits: QueueLimits = attrs.Factory(QueueLimits)
    qos0_buffer_bytes: int = 262_144
    counters: DropCounters = attrs.Factory(DropCounters)
    subscriptions: dict[str, int] = attrs.Factory(dict)  # filter -> granted QoS
    inflight: dict[int, Delivery] = attrs.Factory(dict)  # insertion order = send order
    out: OutQueue = attrs.field(init=False)
    inbound_qos2: set[int] = attrs.Factory(set)
    connection: Peer | None = None
    next_packet_id: int = 1
    next_seq: int = 1
    disconnected_at: float | None = None
    # 5.0 Session Expiry Interval in seconds (-1: never); None: the configured default
    # (3.1.1 persistent sessions)
    expiry_s: int | None = None
    # 5.0 subscription options: filter -> (options byte, subscription id), non-default only
    sub_options: dict[str, tuple[int, int]] = attrs.Factory(dict)
    discarded: bool = False
    # it is, or was, a member of a consumer group: its acknowledgements may settle jobs
    # (mqttd.workqueues); the others' acks are not looked at for that
    group_member: bool = False
    # the user name of the latest login, for ACL checks on delivery; ``login_known`` is
    # False for a session restored from the store until its client logs in again
    username: str | None = None
    login_known: bool = False
    # counters
    sent: int = 0
    too_large: int = 0  # 5.0 deliveries above the client's Maximum Packet Size
    publishes_refused: int = 0  # its client's PUBLISHes not taken (no room, rate, full queue)
    next_refusal_log: float = 0.0
    # inflight packet ids not resent yet on this connection (its window was smaller)
    _held: deque[int] | None = None

    def __attrs_post_init__(self) -> None:
        self.out = OutQueue(self.client_id, self.writer, self.queue_limits, self.counters)

    @classmethod
    def restore(
        cls,
        row: RestoredSession,
        writer: Journal,
        **limits: Any,
    ) -> Session:
        session = cls(
            row.client_id, True, writer=writer,
            subscriptions=dict(row.subscriptions),
            inbound_qos2=set(row.inbound_qos2),
            next_seq=row.next_seq,
            disconnected_at=row.disconnected_at,
            expiry_s=row.expiry_s,
            sub_options=dict(row.subscription_options),
            group_member=bool(row.shares),
            **limits,
        )
        session.out.restore(row.queued, row.queued_after, row.queued_sizes)
        shares = row.shares
        for seq, packet_id, state, qos, retain, topic, payload, props, expires in row.inflight:
            message = None if state == 2 else v5.restored_message(
                topic, payload, qos, retain, props, expires
            )
            share = shares.get(seq) if shares and message is not None else None
            session.inflight[packet_id] = Delivery(
                message, qos, retain, seq, stored_share(*share) if share else None,
                session._sub_ids_for(topic),
            )
        if session.inflight:
            session.next_packet_id = max(session.inflight) % 65535 + 1
        return session

    @property
    def queued(self) -> int:
        """Messages waiting for the window (in RAM, being read back, or on disk)."""
        return len(self.out)

    def stats(self) -> dict[str, int | bool]:
        out = self.out
        return {
            "connected": self.connection is not None,
            "persistent": self.persistent,
            "inflight": len(self.inflight),
            "queued": len(out),
            "queued_bytes": out.bytes,
            "sent": self.sent,
            "dropped": out.dropped,
            "dropped_qos0": out.dropped_qos0,
            "refused": out.refused,
            "expired": out.expired,
            "too_large": self.too_large,
            "publishes_refused": self.publishes_refused,
        }

    # -- outbound ----------------------------------------------------------------------

    def deliver(
        self,
        message: Publish,
        qos: int,
        retain: bool,
        fanout: Fanout[Any] | None,
        share: Share | None = None,
        sub_ids: tuple[int, ...] | None = None,
    ) -> None:
        """Hand one message to this session at ``qos``. ``fanout`` is shared by the
        subscribers of one routed message (``None`` when the encoding is specific to this
        delivery, e.g. a retained message sent on SUBSCRIBE). ``share`` names the shared
        subscription it came through, ``sub_ids`` the identifiers of the 5.0 subscriptions
        it matched."""
        conn = self.connection
        if not qos:
            if conn is None:
                return  # QoS 0 is not queued for offline sessions (as mosquitto's default)
            if conn.outbox_bytes >= conn.pace_bytes:  # backlogged: pace, or drop if stalled
                if not conn.stalled:
                    conn.on_fed(conn)
                elif conn.outbox_bytes > self.qos0_buffer_bytes:
                    self.out.count_qos0_drop()
                    return
            if fanout is not None and conn.protocol_level != PROTOCOL_5:
                # 3.1.1, shared (encode_delivery's common case, without its call)
                encoded = fanout[0]
                if encoded is None:
                    encoded = fanout[0] = encode_publish_parts(
                        message.topic, message.payload, 0, retain
                    )
            else:
                encoded = encode_delivery(conn, message, 0, retain, fanout, sub_ids)
                if encoded is None:
                    self.too_large += 1
                    return
            conn.send_pair(encoded[0], encoded[1])
            self.sent += 1
            return
        out = self.out
        if conn is not None and conn.outbox_bytes >= conn.pace_bytes and not conn.stalled:
            conn.on_fed(conn)
        window_open = (
            conn is not None
            and not out.ram
            and not out.loading
            and not out.disk_count
            and len(self.inflight) < self.max_inflight
        )
        if not window_open and out.refuses(len(message.payload)):
            if out.limits.policy == DISCONNECT and conn is not None:
                self._disconnect_full(conn)
            return
        writer = self.writer
        if writer is None:
            if window_open:
                self._send_new(
                    conn, message, qos, retain, fanout, 0, share, sub_ids  # type: ignore[arg-type]
                )
            else:
                out.hold(Delivery(message, qos, retain, 0, share, sub_ids), len(message.payload))
        else:
            self._deliver_stored(conn, message, qos, retain, fanout, share, sub_ids, window_open)
        if not window_open and conn is not None and not conn.stalled and (
            len(out) >= conn.pace_messages
        ):
            conn.on_fed(conn)

    def _disconnect_full(self, conn: Peer) -> None:
        out = self.out
        log.warning(
            "client %s: queue full (%d messages, %d bytes): disconnecting it "
            "(overflow_policy disconnect)", self.client_id, len(out), out.bytes,
        )
        conn.close(QuotaExceeded("queue full (overflow_policy disconnect)"))

    def _deliver_stored(
        self,
        conn: Peer | None,
        message: Publish,
        qos: int,
        retain: bool,
        fanout: Fanout[Any] | None,
        share: Share | None,
        sub_ids: tuple[int, ...] | None,
        window_open: bool,
    ) -> None:
        """A persistent session's delivery: stored (the message once per fanout, a delivery
        row per session), then sent or queued."""
        writer: Journal = self.writer  # type: ignore[assignment]
        message_id = fanout[STORED_ID] if fanout is not None else 0
        if not message_id:
            if message.properties is None and message.expires_at is None:
                message_id = writer.add_message(message.topic, message.payload, message.qos)
            else:
                message_id = writer.add_message(
                    message.topic, message.payload, message.qos,
                    v5.stored_properties(message), message.expires_at,
                )
            if fanout is not None:
                fanout[STORED_ID] = message_id
        seq = self.next_seq
        self.next_seq = seq + 1
        if window_open:
            packet_id = self._send_new(
                conn, message, qos, retain, fanout, seq, share, sub_ids  # type: ignore[arg-type]
            )
            if packet_id > 0:  # else larger than the client accepts: never stored for it
                writer.submit(
                    ops.AddDelivery(self.client_id, seq, message_id, qos, retain, packet_id)
                    if share is None else _shared_delivery(
                        self.client_id, seq, message_id, qos, retain, packet_id, share
                    )
                )
            return
        out = self.out
        out.place(Delivery(message, qos, retain, seq, share, sub_ids), len(message.payload),
                  conn is not None)
        writer.submit(
            ops.AddDelivery(self.client_id, seq, message_id, qos, retain, 0) if share is None
            else _shared_delivery(self.client_id, seq, message_id, qos, retain, 0, share)
        )
        out.trim()

    def _send_new(
        self,
        conn: Peer,
        message: Publish,
        qos: int,
        retain: bool,
        fanout: Fanout[Any] | None,
        seq: int,
        share: Share | None = None,
        sub_ids: tuple[int, ...] | None = None,
    ) -> int:
        """Send a new PUBLISH and put it in flight; its packet id, or -1 when it is larger
        than the client's Maximum Packet Size (dropped and counted, nothing sent)."""
        encoded = encode_delivery(conn, message, qos, retain, fanout, sub_ids)
        if encoded is None:
            self.too_large += 1
            log.info("client %s: a message on %r is larger than its maximum packet size "
                     "(%d): dropped", self.client_id, message.topic, conn.max_send_size)
            return -1
        packet_id = self.next_packet_id
        inflight = self.inflight
        while packet_id in inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        inflight[packet_id] = new_delivery(  # type: ignore[call-overload]
            Delivery, (message, qos, retain, seq, share, sub_ids)
        )
        conn.send_parts(encoded[0], _PACKET_ID_BYTES[packet_id], encoded[1])
        self.sent += 1
        return packet_id

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
        out = self.out
        writer = self.writer
        while out.ram and len(self.inflight) < self.max_inflight:
            delivery = out.next()
            if delivery is None:
                break  # the rest had expired
            message, qos, retain, seq, share, sub_ids = delivery
            packet_id = self._send_new(
                conn, message, qos, retain, None, seq, share, sub_ids  # type: ignore[arg-type]
            )
            if writer is not None:
                if packet_id < 0:
                    writer.submit(ops.RemoveDelivery(self.client_id, seq))
                else:
                    writer.submit(ops.SetInflight(self.client_id, seq, packet_id))
        if out.disk_count:
            out.read_ahead(self._page_loaded)

    def _page_loaded(self, rows: list[ops.QueuedRow]) -> None:
        if self.discarded:
            return
        self.out.page_loaded(rows, self._sub_ids_for)
        self.pump()

    # The acks of outbound deliveries. An unknown packet id is no error (False: e.g. an ack
    # that crossed a resend); an ack of the wrong kind for a delivery in flight is: a QoS 1
    # PUBLISH is answered by PUBACK only, a QoS 2 one by PUBREC and then PUBCOMP (MQTT 3.1.1
    # table 3.4, 5.0 section 4.3). ProtocolError closes the connection; the delivery stays
    # in flight and is sent again on the next one, as after any lost connection.

    # They return the delivery acknowledged (a tuple, so true), or None for an unknown id.

    def on_puback(self, packet_id: int) -> Delivery | None:
        entry = self.inflight.get(packet_id)
        if entry is None:
            return None
        if entry.qos != 1:
            raise ProtocolError(f"PUBACK for the QoS 2 PUBLISH {packet_id}")
        del self.inflight[packet_id]
        self._acknowledged(entry.seq)
        return entry

    def on_pubrec(self, packet_id: int) -> Delivery | None:
        """QoS 2 step 2: the PUBLISH is never sent again, a PUBREL is (by the caller). A
        PUBREC again after the PUBREL is a resend: the entry (without a message), and the
        caller sends PUBREL again."""
        entry = self.inflight.get(packet_id)
        if entry is None:
            return None
        if entry.qos != 2:
            raise ProtocolError(f"PUBREC for the QoS 1 PUBLISH {packet_id}")
        if entry.message is not None:
            self.inflight[packet_id] = Delivery(None, 2, False, entry.seq, None, None)
            if self.writer is not None:
                self.writer.submit(ops.SetReleased(self.client_id, entry.seq))
        return entry

    def on_pubrec_refused(self, packet_id: int) -> Delivery | None:
        """5.0: a PUBREC with an error code (0x80 and up) ends the QoS 2 exchange: no PUBREL,
        the message is done with for this client (MQTT-4.3.3-4)."""
        entry = self.inflight.get(packet_id)
        if entry is None:
            return None
        if entry.qos != 2:
            raise ProtocolError(f"PUBREC for the QoS 1 PUBLISH {packet_id}")
        if entry.message is None:
            return None  # after our PUBREL: the exchange is past PUBREC already
        del self.inflight[packet_id]
        self._acknowledged(entry.seq)
        return entry

    def on_pubcomp(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None:
            return False
        if entry.qos != 2:
            raise ProtocolError(f"PUBCOMP for the QoS 1 PUBLISH {packet_id}")
        if entry.message is not None:
            raise ProtocolError(f"PUBCOMP before PUBREC for the QoS 2 PUBLISH {packet_id}")
        del self.inflight[packet_id]
        self._acknowledged(entry.seq)
        return True

    def _acknowledged(self, seq: int) -> None:
        if self.writer is not None:
            self.writer.submit(ops.RemoveDelivery(self.client_id, seq))
        out = self.out
        if out.ram or out.disk_count:
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
        encoded = encode_resend(conn, message, qos, retain, ids)
        if encoded is None:  # this client accepts smaller packets than the last one
            self.too_large += 1
            del self.inflight[packet_id]
            if self.writer is not None:
                self.writer.submit(ops.RemoveDelivery(self.client_id, seq))
            return False
        conn.send_parts(encoded[0], _PACKET_ID_BYTES[packet_id], encoded[1])
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

    def take_shared(self) -> list[Taken]:
        """Take back the unacknowledged deliveries that came through shared subscriptions
        (PUBLISHes in flight, QoS 2 ones not yet PUBRECed, and those queued in RAM), oldest
        first, so that the broker can hand them to another member of their group. Disk-only
        queued entries (a backlog beyond one page) stay with this session."""
        taken: list[Taken] = []
        writer = self.writer
        for packet_id, delivery in list(self.inflight.items()):
            if delivery.share is not None and delivery.message is not None:
                del self.inflight[packet_id]
                taken.append(Taken(delivery.message, delivery.qos, delivery.share, True))
                if writer is not None:
                    writer.submit(ops.RemoveDelivery(self.client_id, delivery.seq))
        for delivery in self.out.take_shared():
            taken.append(Taken(delivery.message, delivery.qos, delivery.share, False))  # type: ignore[arg-type]
        return taken

    def detach(self) -> None:
        self.connection = None
        self._held = None
        self.out.evict()
