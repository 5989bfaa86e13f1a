"""PUBLISH and its acknowledgements: a client's message checked (5.0 aliases and Receive
Maximum, topic limits, the ACL), routed, acknowledged after the commit that holds it (QoS 2
exactly once: routed on first receipt only); the acks of what the broker delivered
(mosquitto's handle_publish.c and handle_pubackcomp.c)."""

from __future__ import annotations

import logging
import time

from mqttd import v5
from mqttd.codec import ProtocolError, TopicNameInvalid
from mqttd.codec.errors import ReceiveMaximumExceeded
from mqttd.codec.kinds import PUBACK, PUBCOMP, PUBREC, PUBREL
from mqttd.codec.packets import PROTOCOL_5, PubAck, PubComp, Publish, PubRec, PubRel
from mqttd.codec.reason import (
    NO_MATCHING_SUBSCRIBERS,
    NOT_AUTHORIZED,
    PACKET_IDENTIFIER_NOT_FOUND,
    QUOTA_EXCEEDED,
)
from mqttd.connection import Connection
from mqttd.engine.state import BrokerState
from mqttd.session import _PACKET_ID_BYTES, Session
from persistence import ops

log = logging.getLogger("mqttd.broker")

PUBLISH_NOT_AUTHORIZED = NOT_AUTHORIZED
# reason strings of refusals (sent when the client allows problem information: acks.py)
_REASON_STRINGS = {
    PUBLISH_NOT_AUTHORIZED: "not authorized to publish to this topic",
    QUOTA_EXCEEDED: "too many QoS 2 messages awaiting PUBREL",
}
NO_ROOM = "the broker's storage is full; try again later"
QUEUE_FULL = "a subscriber's queue is full"
OVER_RATE = "over the publish rate limit"
REFUSAL_LOG_INTERVAL_S = 60.0


def on_publish(state: BrokerState, conn: Connection, packet: Publish) -> None:
    state.messages_received += 1
    v5_client = conn.protocol_level == PROTOCOL_5
    session: Session = conn.session  # type: ignore[assignment]
    qos = packet.qos
    if v5_client:
        if packet.properties or not packet.topic:
            packet = v5.inbound(conn, packet, time.time())
        if (
            qos and conn.qos1_unacked + len(session.inbound_qos2) >= state.receive_maximum
            and not (qos == 2 and packet.packet_id in session.inbound_qos2)  # a resend
        ):
            raise ReceiveMaximumExceeded(
                f"more than the Receive Maximum ({state.receive_maximum}) unacknowledged "
                "QoS 1/2 PUBLISHes"
            )
    if state.check_topic_limits:
        problem = state.topic_limit_problem(packet.topic)
        if problem is not None:
            state.limit_exceeded("topic")
            raise TopicNameInvalid(problem)
    if state.publish_rate:
        conn.publish_tokens -= 1.0
        if conn.publish_tokens < 0 and v5_client and state.refuse_over_rate:
            conn.publish_tokens += 1.0  # refused: not spent, and the client is not paused
            over_rate(state, conn, packet)
            return
    acl = state.acl
    if acl is not None and not acl.can_publish(
        conn.client_id, session.username, state.delayed.acl_topic(packet.topic)
    ):
        publish_denied(state, conn, packet)
        return
    bridge = conn.is_bridge
    if not qos:
        state.publish(packet, session, bridge)
        return
    if (state.drops.full or not state.storage_ok) and not_taken(state, conn, packet, session):
        return
    packet_id = packet.packet_id
    if qos == 1:
        refused = state.drops.refused
        routed = state.publish(packet, session, bridge)
        if v5_client and (not routed or state.drops.refused != refused):
            # (a queue that filled while this message was routed refused it: the others
            # got it; Quota exceeded tells the publisher it did not reach everyone)
            code = NO_MATCHING_SUBSCRIBERS if not routed else QUOTA_EXCEEDED
            reason = QUEUE_FULL if routed else ""
            state.reply(conn, conn.encode_ack(PUBACK, packet_id, code, reason), puback=True)
        else:
            state.reply(conn, b"\x40\x02" + _PACKET_ID_BYTES[packet_id], puback=True)
        return
    on_publish_qos2(state, conn, packet, session, bridge)


def on_publish_qos2(
    state: BrokerState, conn: Connection, packet: Publish, session: Session, bridge: bool
) -> None:
    """QoS 2, step 1: route on the first receipt of a packet id only, answer PUBREC."""
    packet_id = packet.packet_id
    v5_client = conn.protocol_level == PROTOCOL_5
    code = 0
    if packet_id not in session.inbound_qos2:  # exactly once: route on first receipt only
        if len(session.inbound_qos2) >= state.config.limits.max_inbound_qos2:
            state.limit_exceeded("inbound_qos2")
            if v5_client:  # 5.0 can refuse this one message: PUBREC Quota exceeded
                state.reply(conn, conn.encode_ack(
                    PUBREC, packet_id, QUOTA_EXCEEDED, _REASON_STRINGS[QUOTA_EXCEEDED]
                ))
                return
            raise ProtocolError(
                f"more than max_inbound_qos2 ({state.config.limits.max_inbound_qos2}) "
                "QoS 2 messages awaiting PUBREL"
            )
        remember_qos2(session, packet_id)
        if not state.publish(packet, session, bridge) and v5_client:
            code = NO_MATCHING_SUBSCRIBERS
    state.reply(conn, conn.encode_ack(PUBREC, packet_id, code))


def not_taken(state: BrokerState, conn: Connection, packet: Publish, session: Session) -> bool:
    """A QoS 1/2 PUBLISH while a queue under overflow_policy refuse is full or the store has
    no room: True when it is refused (5.0) or its publisher held (3.1.1), and answered."""
    qos, packet_id = packet.qos, packet.packet_id
    v5_client = conn.protocol_level == PROTOCOL_5
    if state.drops.full and v5_client and queue_refuses(state, packet):
        refused_publish(state, conn, "a subscriber's queue is full")
        state.reply(conn, conn.encode_ack(
            PUBACK if qos == 1 else PUBREC, packet_id, QUOTA_EXCEEDED, QUEUE_FULL
        ), puback=qos == 1)
        return True
    if (
        not state.storage_ok
        and not (qos == 2 and packet_id in session.inbound_qos2)  # a resend: stored already
        and state.needs_store(packet, session)
    ):
        no_room(state, conn, packet)
        return True
    return False


def refused_publish(state: BrokerState, conn: Connection, why: str) -> None:
    """Count a PUBLISH of ``conn``'s client the broker did not take (refused, or held), and
    log it at most once a minute per client."""
    session: Session = conn.session  # type: ignore[assignment]
    session.publishes_refused += 1
    now = time.monotonic()
    if now >= session.next_refusal_log:
        session.next_refusal_log = now + REFUSAL_LOG_INTERVAL_S
        log.warning("client %s: a PUBLISH was not taken: %s (%d so far)", conn.name, why,
                    session.publishes_refused)


def over_rate(state: BrokerState, conn: Connection, packet: Publish) -> None:
    """A 5.0 client over max_publish_rate_per_s, with over_publish_rate refuse: its QoS 1/2
    PUBLISH is answered 0x97 Quota exceeded, its QoS 0 one dropped; both counted."""
    state.limit_exceeded("publish_rate")
    state.rate_refused += 1
    refused_publish(state, conn, "over the publish rate limit")
    if packet.qos:
        kind = PUBACK if packet.qos == 1 else PUBREC
        state.reply(conn, conn.encode_ack(kind, packet.packet_id, QUOTA_EXCEEDED, OVER_RATE),
                    puback=packet.qos == 1)


def queue_refuses(state: BrokerState, packet: Publish) -> bool:
    """Whether a full queue under overflow_policy ``refuse`` is among the message's
    subscribers: then a 5.0 publisher's message is refused as a whole (routed to no one),
    so that Quota exceeded means "not accepted" for QoS 2 too. Counted as refused by each
    such queue. Queues that have room again leave the set of full ones."""
    full = state.drops.full
    size = len(packet.payload)
    for queue in list(full):
        if not queue.over_budget(1, size):
            full.discard(queue)
    if not full:
        return False
    refusing = [
        queue for queue in (
            target[0].out if isinstance(target[0], Session) else target[0]  # (the delayed queue)
            for target in state.router.trie.match(packet.topic)
        ) if queue in full
    ]
    for queue in refusing:
        queue.count_refused()
    return bool(refusing)


def no_room(state: BrokerState, conn: Connection, packet: Publish) -> None:
    """The store has no room for what accepting ``packet`` would write: nothing of it is
    acknowledged as stored. 5.0 is told: PUBACK / PUBREC 0x97 Quota exceeded (the client
    may send it again later). 3.1.1 cannot be told: the publisher is held with this packet
    and what followed it, unread, until there is room (see BrokerState.storage_changed)."""
    if conn.protocol_level == PROTOCOL_5:
        state.storage_refused += 1
        refused_publish(state, conn, "the store has no room")
        kind = PUBACK if packet.qos == 1 else PUBREC
        state.reply(conn, conn.encode_ack(kind, packet.packet_id, QUOTA_EXCEEDED, NO_ROOM),
                    puback=packet.qos == 1)
        return
    state.storage_holds += 1
    refused_publish(state, conn, "the store has no room (held until there is)")
    held = conn.held_packets
    conn.held_packets = [packet] if held is None else [packet, *held]
    state.flow.hold(conn, state.store_gate)


def publish_denied(state: BrokerState, conn: Connection, packet: Publish) -> None:
    """No write access: drop the message. MQTT 3.1.1 has no way to say so; QoS 1/2 are
    still acknowledged so that the client does not send them again. 5.0 says so:
    PUBACK / PUBREC 0x87 Not authorized."""
    state.acl_denied_publish += 1
    state.log_denied(conn, packet.topic)
    if packet.qos:
        kind = PUBACK if packet.qos == 1 else PUBREC
        reason = _REASON_STRINGS[PUBLISH_NOT_AUTHORIZED]
        state.reply(conn, conn.encode_ack(kind, packet.packet_id, PUBLISH_NOT_AUTHORIZED,
                                         reason), puback=packet.qos == 1)


def remember_qos2(session: Session, packet_id: int) -> None:
    """A QoS 2 PUBLISH received for the first time: its id is kept (and stored) until the
    PUBREL, so that a resend is acknowledged again and not routed again. (A bridge's link
    does this for what its remote broker sends too.)"""
    session.inbound_qos2.add(packet_id)
    if session.writer is not None:
        session.writer.submit(ops.AddInbound(session.client_id, packet_id))


# The acks of what the broker sent, and PUBREL: handlers of a client's connection, also used
# by a bridge's link for the packets of its remote broker (which acknowledges what the link
# forwarded and sends PUBREL for what it published through the link). The acks return
# whether the packet id was in flight (a link counts what it forwarded).


def on_puback(state: BrokerState, conn: Connection, packet: PubAck) -> bool:
    session: Session = conn.session  # type: ignore[assignment]
    entry = session.on_puback(packet.packet_id)
    if entry is not None:
        if session.group_member and entry.share is not None:  # a job: done, or to retry
            state.work_queues.settled(session, entry, packet.reason_code)
        return True
    log.debug("client %s: PUBACK for unknown packet id %d", conn.name, packet.packet_id)
    return False


def on_pubrec(state: BrokerState, conn: Connection, packet: PubRec) -> bool:
    session: Session = conn.session  # type: ignore[assignment]
    if packet.reason_code >= 0x80:  # 5.0: the client refused it; the exchange ends
        entry = session.on_pubrec_refused(packet.packet_id)
    else:
        entry = session.on_pubrec(packet.packet_id)
        code = 0
        if entry is None:
            log.debug("client %s: PUBREC for unknown packet id %d", conn.name, packet.packet_id)
            code = PACKET_IDENTIFIER_NOT_FOUND  # 5.0 says so; 3.x answers PUBREL all the same
        conn.send(conn.encode_ack(PUBREL, packet.packet_id, code))
    if entry is None:
        return False
    if session.group_member and entry.share is not None and entry.message is not None:
        state.work_queues.settled(session, entry, packet.reason_code)
    return True


def on_pubrel(state: BrokerState, conn: Connection, packet: PubRel) -> None:
    session: Session = conn.session  # type: ignore[assignment]
    code = 0
    if packet.packet_id in session.inbound_qos2:
        session.inbound_qos2.discard(packet.packet_id)
        if session.writer is not None:
            session.writer.submit(ops.RemoveInbound(session.client_id, packet.packet_id))
    else:
        # e.g. a PUBREL sent again after a reconnect, for an exchange that completed:
        # 5.0 says Packet Identifier not found, 3.x answers PUBCOMP all the same
        code = PACKET_IDENTIFIER_NOT_FOUND
    state.reply(conn, conn.encode_ack(PUBCOMP, packet.packet_id, code))


def on_pubcomp(state: BrokerState, conn: Connection, packet: PubComp) -> bool:
    if conn.session.on_pubcomp(packet.packet_id):  # type: ignore[union-attr]
        return True
    log.debug("client %s: PUBCOMP for unknown packet id %d", conn.name, packet.packet_id)
    return False
