"""A persistent session in cluster mode: its queue is a JetStream subject, not the store.

Every QoS 1/2 message for a persistent session is written, by the node that accepted it, to
``mqttd.q.<client key>`` in the stream MQTTD_Q (:mod:`mqttd.clustering.sessions`), whichever
node the session's client is on, or none. The node the client is connected to reads that
subject in order (the *feeder*) and hands each message to this session when its inflight
window has room: :meth:`StreamSession.feed`. So the session holds no queue of its own for
those: only what is in flight, and the deliveries that do not come through the stream (QoS
0, a retained message sent on SUBSCRIBE, a message routed live from a node that did not
know the subscription yet), which it keeps in RAM as a clean session does.

Packet ids are a function of the stream sequence (``seq % 65535 + 1``), so a node that
takes the session over resends what another node had in flight with the ids that node
used (MQTT-4.4.0-1), without anyone writing the ids down. Acknowledgements advance the
session's *floor* over the contiguous acknowledged prefix; the node purges the subject up
to it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import attrs
import trio

from mqttd.codec.packets import Publish, PubRel
from mqttd.delivery import Delivery, Fanout, Share, encode_delivery, encode_resend
from mqttd.session import _PACKET_ID_BYTES, Session


class QueueOwner(Protocol):
    """What a StreamSession needs of its node (mqttd.clustering.sessions.ClusterSessions)."""

    def in_stream(self, session: StreamSession) -> bool: ...

    def acked(self, session: StreamSession) -> None: ...

    def start_feeder(self, session: StreamSession) -> None: ...


def packet_id_of(seq: int) -> int:
    """The packet id of the delivery at stream sequence ``seq``: the same on every node."""
    return seq % 65535 + 1


@attrs.define(eq=False)
class StreamSession(Session):
    cluster: QueueOwner | None = None
    key: str = ""  # subjects.client_key(client_id)
    epoch: int = 0  # of the session record this node wrote last (MQTTD_SESS)
    # imports from a node whose index revision is below this may not have been written to
    # the stream for this session (the node had not seen its subscriptions): delivered live
    live_until_rev: int = 1 << 62
    fed_upto: int = 0  # the last stream sequence handed to the session
    floor: int = 0  # every stream sequence up to here is acknowledged (or skipped)
    purged: int = 0  # the subject is purged up to here
    dup_budget: int = 0  # resumed from another node: its first deliveries are sent DUP
    feeder: trio.CancelScope | None = None
    consumer: str | None = None  # the feeder's pull consumer (its name)
    # the ack subjects of what was fed and not yet below the floor; the floor's one is
    # acknowledged (cumulatively) with the next purge
    ack_subjects: dict[int, str] = attrs.Factory(dict)
    floor_ack: str | None = None
    # resumed from a record: deliveries whose PUBREC came before (PUBREL is sent for them)
    released_seqs: set[int] = attrs.Factory(set)
    room: trio.Event = attrs.Factory(trio.Event)
    _unacked: deque[int] = attrs.Factory(deque)  # fed, in order
    _acked: set[int] = attrs.Factory(set)  # acknowledged above the first unacknowledged

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.out.journal = None  # what it holds in RAM is not stored (see the module)

    # -- deliveries -----------------------------------------------------------------------

    def deliver(
        self,
        message: Publish,
        qos: int,
        retain: bool,
        fanout: Fanout[Any] | None,
        share: Share | None = None,
        sub_ids: tuple[int, ...] | None = None,
    ) -> None:
        cluster = self.cluster
        if qos and share is None and cluster is not None and cluster.in_stream(self):
            return  # the stream brings it
        writer, self.writer = self.writer, None  # as a clean session: in RAM, not stored
        try:
            Session.deliver(self, message, qos, retain, fanout, share, sub_ids)
        finally:
            self.writer = writer

    def window_open(self) -> bool:
        return (
            self.connection is not None
            and len(self.inflight) < self.max_inflight
            and not self.out.ram
            and self._held is None
        )

    def has_room(self, seq: int) -> bool:
        """Whether the feeder may hand over the message at ``seq`` now."""
        return self.window_open() and packet_id_of(seq) not in self.inflight

    async def wait_window(self) -> None:
        while not self.window_open():
            await self.room.wait()
            self.room = trio.Event()

    async def wait_room(self, seq: int) -> None:
        while not self.has_room(seq):
            await self.room.wait()
            self.room = trio.Event()

    def wake(self) -> None:
        self.room.set()

    def feed(self, message: Publish, qos: int, retain: bool,
             sub_ids: tuple[int, ...] | None, seq: int) -> bool:
        """Send the message read from the stream at ``seq`` (the caller checked
        :meth:`has_room`). False when it was not sent (larger than the client accepts:
        counted, and acknowledged for the stream)."""
        conn = self.connection
        assert conn is not None
        self.fed_upto = seq
        self._unacked.append(seq)
        if self.dup_budget > 0:
            self.dup_budget -= 1
            encoded = encode_resend(conn, message, qos, retain, sub_ids)
        else:
            encoded = encode_delivery(conn, message, qos, retain, None, sub_ids)
        if encoded is None:
            self.too_large += 1
            self.stream_acked(seq)
            return False
        packet_id = packet_id_of(seq)
        self.inflight[packet_id] = Delivery(message, qos, retain, seq, None, sub_ids)
        conn.send_parts(encoded[0], _PACKET_ID_BYTES[packet_id], encoded[1])
        self.sent += 1
        return True

    def feed_released(self, seq: int) -> None:
        """A QoS 2 delivery read from the stream whose PUBREC an earlier connection sent:
        in flight again as released, and PUBREL sent (its PUBLISH never again)."""
        conn = self.connection
        assert conn is not None
        self.released_seqs.discard(seq)
        self.fed_upto = seq
        self._unacked.append(seq)
        packet_id = packet_id_of(seq)
        self.inflight[packet_id] = Delivery(None, 2, False, seq, None, None)
        conn.send_packet(PubRel(packet_id))

    def skipped(self, seq: int) -> None:
        """A message of the stream not delivered (expired): done with, as if acknowledged."""
        self.fed_upto = seq
        self._unacked.append(seq)
        self.stream_acked(seq)

    def _acknowledged(self, seq: int) -> None:
        if seq:
            self.stream_acked(seq)
        if self.out.ram:
            self.pump()
        self.room.set()

    def stream_acked(self, seq: int) -> None:
        unacked = self._unacked
        if not unacked:
            return
        if seq != unacked[0]:
            self._acked.add(seq)
            return
        ack_subjects = self.ack_subjects
        floor = unacked.popleft()
        reply = ack_subjects.pop(floor, None)
        acked = self._acked
        while unacked and unacked[0] in acked:
            floor = unacked.popleft()
            acked.discard(floor)
            reply = ack_subjects.pop(floor, None) or reply
        self.floor = floor
        if reply is not None:
            self.floor_ack = reply
        if self.cluster is not None:
            self.cluster.acked(self)

    # -- connection lifecycle ---------------------------------------------------------------

    def attach(self, conn: Any) -> None:
        super().attach(conn)
        if self.cluster is not None:
            self.cluster.start_feeder(self)
        self.room.set()

    def detach(self) -> None:
        self.stop_feeder()
        super().detach()

    def stop_feeder(self) -> None:
        if self.feeder is not None:
            self.feeder.cancel()
            self.feeder = None
