# mypy: disable-error-code="misc"
# (the methods are typed with ``self: Broker``, the class they are mixed into; mypy wants a
# supertype there, so that one check is off for this file, the bodies are checked as Broker)
"""Packet handlers of the broker after CONNECT: PUBLISH and its acknowledgements,
SUBSCRIBE / UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH. A mixin of :class:`mqttd.broker.Broker`
(its methods are typed with ``self: Broker``); synchronous, no I/O."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, cast

from mqttd import enhanced_auth, v5
from mqttd.codec import (
    ProtocolError,
    TopicNameInvalid,
)
from mqttd.codec.errors import (
    ReceiveMaximumExceeded,
)
from mqttd.codec.kinds import PUBACK, PUBCOMP, PUBREC, PUBREL
from mqttd.codec.packets import (
    PROTOCOL_5,
    Auth,
    Disconnect,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
)
from mqttd.codec.reason import (
    DISCONNECT_WITH_WILL_MESSAGE,
    NO_MATCHING_SUBSCRIBERS,
    NO_SUBSCRIPTION_EXISTED,
    NOT_AUTHORIZED,
    PACKET_IDENTIFIER_NOT_FOUND,
    QUOTA_EXCEEDED,
    SUBACK_FAILURE,
    TOPIC_FILTER_INVALID,
)
from mqttd.protocol import Connection
from mqttd.session import Session
from mqttd.shared import is_shared, parse_shared
from mqttd.topics import InvalidTopic, validate_topic_filter
from persistence import ops

if TYPE_CHECKING:
    from mqttd.engine.dispatch import Engine as Broker

log = logging.getLogger("mqttd.broker")  # one logger for the broker and its mixins

MAX_QOS = 2
SUBACK_NOT_AUTHORIZED = PUBLISH_NOT_AUTHORIZED = NOT_AUTHORIZED


class PacketHandlers:
    def _on_publish(self: Broker, conn: Connection, packet: Publish) -> None:
        self.messages_received += 1
        v5_client = conn.protocol_level == PROTOCOL_5
        session: Session = conn.session  # type: ignore[assignment]
        qos = packet.qos
        if v5_client:
            if packet.properties or not packet.topic:
                packet = v5.inbound(conn, packet, time.time())
            if (
                qos and conn.qos1_unacked + len(session.inbound_qos2) >= self._receive_maximum
                and not (qos == 2 and packet.packet_id in session.inbound_qos2)  # a resend
            ):
                raise ReceiveMaximumExceeded(
                    f"more than the Receive Maximum ({self._receive_maximum}) unacknowledged "
                    "QoS 1/2 PUBLISHes"
                )
        if self._check_topic_limits:
            problem = self._topic_limit_problem(packet.topic)
            if problem is not None:
                self.limit_exceeded("topic")
                raise TopicNameInvalid(problem)
        if self._publish_rate:
            conn.publish_tokens -= 1.0
        acl = self._acl
        if acl is not None and not acl.can_publish(conn.client_id, session.username, packet.topic):
            self._publish_denied(conn, packet)
            return
        bridge = conn.is_bridge
        if not qos:
            self.publish(packet, session, bridge)
            return
        packet_id = packet.packet_id
        if qos == 1:
            routed = self.publish(packet, session, bridge)
            if v5_client and not routed:
                self.reply(conn, conn.encode_ack(PUBACK, packet_id, NO_MATCHING_SUBSCRIBERS),
                           puback=True)
            else:
                self.reply(conn, bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF)), puback=True)
            return
        code = 0
        if packet_id not in session.inbound_qos2:  # exactly once: route on first receipt only
            if len(session.inbound_qos2) >= self.config.limits.max_inbound_qos2:
                self.limit_exceeded("inbound_qos2")
                if v5_client:  # 5.0 can refuse this one message: PUBREC Quota exceeded
                    self.reply(conn, conn.encode_ack(
                        PUBREC, packet_id, QUOTA_EXCEEDED, _REASON_STRINGS[QUOTA_EXCEEDED]
                    ))
                    return
                raise ProtocolError(
                    f"more than max_inbound_qos2 ({self.config.limits.max_inbound_qos2}) "
                    "QoS 2 messages awaiting PUBREL"
                )
            session.inbound_qos2.add(packet_id)
            if session.writer is not None:
                session.writer.submit(ops.AddInbound(session.client_id, packet_id))
            if not self.publish(packet, session, bridge) and v5_client:
                code = NO_MATCHING_SUBSCRIBERS
        self.reply(conn, conn.encode_ack(PUBREC, packet_id, code))

    def _publish_denied(self: Broker, conn: Connection, packet: Publish) -> None:
        """No write access: drop the message. MQTT 3.1.1 has no way to say so; QoS 1/2 are
        still acknowledged so that the client does not send them again. 5.0 says so:
        PUBACK / PUBREC 0x87 Not authorized."""
        self.acl_denied_publish += 1
        self._log_denied(conn, f"PUBLISH to {packet.topic!r} (dropped)")
        if packet.qos:
            kind = PUBACK if packet.qos == 1 else PUBREC
            reason = _REASON_STRINGS[PUBLISH_NOT_AUTHORIZED]
            self.reply(conn, conn.encode_ack(kind, packet.packet_id, PUBLISH_NOT_AUTHORIZED,
                                             reason), puback=packet.qos == 1)

    def _on_puback(self: Broker, conn: Connection, packet: PubAck) -> None:
        if not conn.session.on_puback(packet.packet_id):  # type: ignore[union-attr]
            log.debug("client %s: PUBACK for unknown packet id %d", conn.name, packet.packet_id)

    def _on_pubrec(self: Broker, conn: Connection, packet: PubRec) -> None:
        if packet.reason_code >= 0x80:  # 5.0: the client refused it; the exchange ends
            conn.session.on_pubrec_refused(packet.packet_id)  # type: ignore[union-attr]
            return
        code = 0
        if not conn.session.on_pubrec(packet.packet_id):  # type: ignore[union-attr]
            log.debug("client %s: PUBREC for unknown packet id %d", conn.name, packet.packet_id)
            code = PACKET_IDENTIFIER_NOT_FOUND  # 5.0 says so; 3.x answers PUBREL all the same
        conn.send(conn.encode_ack(PUBREL, packet.packet_id, code))

    def _on_pubrel(self: Broker, conn: Connection, packet: PubRel) -> None:
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
        self.reply(conn, conn.encode_ack(PUBCOMP, packet.packet_id, code))

    def _on_pubcomp(self: Broker, conn: Connection, packet: PubComp) -> None:
        if not conn.session.on_pubcomp(packet.packet_id):  # type: ignore[union-attr]
            log.debug("client %s: PUBCOMP for unknown packet id %d", conn.name, packet.packet_id)

    def _on_subscribe(self: Broker, conn: Connection, packet: Subscribe) -> None:
        session: Session = conn.session  # type: ignore[assignment]
        codes = []
        retained: list[tuple[Publish, int, tuple[int, ...] | None]] = []
        acl = self._acl
        client_id = session.client_id
        username = session.username
        level = conn.protocol_level
        v5_client = level == PROTOCOL_5
        sub_id = (packet.properties or {}).get("subscription_identifier", 0) if v5_client else 0
        now = time.time()
        for sub in packet.subscriptions:
            shared = is_shared(sub.filter)
            try:
                validate_topic_filter(sub.filter)
                acl_filter = parse_shared(sub.filter)[1] if shared else sub.filter
                problem = None
                if self._check_topic_limits:
                    problem = self._topic_limit_problem(sub.filter)
                if problem is not None:
                    self.limit_exceeded("topic")
                    raise InvalidTopic(problem)
            except InvalidTopic as exc:
                log.info("client %s: refused subscription %r: %s", conn.name, sub.filter, exc)
                codes.append(TOPIC_FILTER_INVALID if v5_client else SUBACK_FAILURE)
                continue
            if acl is not None and not acl.can_subscribe(client_id, username, acl_filter):
                self.acl_denied_subscribe += 1
                self._log_denied(conn, f"SUBSCRIBE to {sub.filter!r}")
                codes.append(SUBACK_NOT_AUTHORIZED if v5_client else SUBACK_FAILURE)
                continue
            qos = min(sub.qos, MAX_QOS)
            existed = sub.filter in session.subscriptions
            options = 0
            if v5_client:
                options = v5.options_byte(
                    sub.no_local, sub.retain_as_published, sub.retain_handling
                )
            self._add_subscription(
                session, sub.filter, qos,
                v5.SubOptions.of(sub.no_local, sub.retain_as_published, sub_id)
                if v5_client else None,
            )
            if options or sub_id:
                session.sub_options[sub.filter] = (options, sub_id)
            else:
                session.sub_options.pop(sub.filter, None)
            if session.writer is not None:
                session.writer.submit(ops.AddSubscription(
                    session.client_id, sub.filter, qos, options, sub_id
                ))
            codes.append(qos)
            if shared:
                continue  # no retained messages on a shared subscription (MQTT 5.0, 4.8.2)
            if sub.retain_handling == 2 or (sub.retain_handling == 1 and existed):
                continue  # 5.0 Retain Handling: never, or only for a new subscription
            for topic, stored in self.retained.match(sub.filter):
                if acl is not None and not acl.can_receive(client_id, username, topic):
                    self.acl_denied_retained += 1
                    continue
                message = cast(Publish, stored)
                if message.expires_at is not None and message.expires_at <= now:
                    continue
                retained.append((message, min(message.qos, qos), (sub_id,) if sub_id else None))
        self.reply(conn, SubAck(packet.packet_id, tuple(codes)).encode(level))
        for message, qos, ids in retained:
            session.deliver(message, qos, True, None, None, ids)

    def _on_unsubscribe(self: Broker, conn: Connection, packet: Unsubscribe) -> None:
        session: Session = conn.session  # type: ignore[assignment]
        codes = []
        for topic_filter in packet.filters:
            if self._remove_subscription(session, topic_filter):
                session.sub_options.pop(topic_filter, None)
                codes.append(0)
                if session.writer is not None:
                    session.writer.submit(ops.RemoveSubscription(session.client_id, topic_filter))
            else:
                codes.append(NO_SUBSCRIPTION_EXISTED)
        level = conn.protocol_level
        self.reply(conn, UnsubAck(packet.packet_id, tuple(codes)).encode(level))

    def _on_pingreq(self: Broker, conn: Connection, packet: PingReq) -> None:
        # behind the replies that wait for a commit, like every reply on this connection:
        # a PINGRESP then tells the client that everything it sent before was answered
        self.reply(conn, b"\xd0\x00")

    def _on_disconnect(self: Broker, conn: Connection, packet: Disconnect) -> None:
        if conn.protocol_level == PROTOCOL_5:
            requested = (packet.properties or {}).get("session_expiry_interval")
            session = conn.session
            if requested is not None and session is not None:
                if session.expiry_s == 0 and requested:
                    raise ProtocolError("session expiry set on DISCONNECT after 0 at CONNECT")
                cap_s = self.config.persistence.session_expiry_s
                session.expiry_s = v5.session_expiry(requested, cap_s)
                if session.writer is not None:
                    session.writer.submit(ops.SaveSession(session.client_id, None,
                                                          session.expiry_s))
            if packet.reason_code == DISCONNECT_WITH_WILL_MESSAGE:
                conn.close()  # the will is published as if the connection had failed
                return
        conn.will = None  # a clean DISCONNECT discards the will (MQTT-3.14.4-3)
        conn.close()

    def _on_auth(self: Broker, conn: Connection, packet: Auth) -> None:
        enhanced_auth.on_auth(self, conn, packet)

    @staticmethod
    def _has_shared(session: Session) -> bool:
        return any(is_shared(f) for f in session.subscriptions)

    def _add_subscription(
        self: Broker, session: Session, topic_filter: str, qos: int,
        options: v5.SubOptions | None = None,
    ) -> None:
        session.subscriptions[topic_filter] = qos
        if is_shared(topic_filter):
            self.shares.add(topic_filter, session, qos, options)
        else:
            self.router.trie.add(topic_filter, session.client_id, session, qos, options)

    def _remove_subscription(self: Broker, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        if is_shared(topic_filter):
            self.shares.remove(topic_filter, session.client_id)
        else:
            self.router.trie.remove(topic_filter, session.client_id)
        return True

    def _topic_limit_problem(self: Broker, topic: str) -> str | None:
        """Why ``topic`` (a name or a filter) exceeds the configured size limits, if it does."""
        limits = self.config.limits
        max_bytes = limits.max_topic_length_bytes
        if len(topic) * 4 > max_bytes and len(topic.encode()) > max_bytes:
            return f"topic longer than max_topic_length_bytes ({max_bytes})"
        max_levels = limits.max_topic_levels
        if 0 < max_levels <= topic.count("/"):
            return f"topic with more than max_topic_levels ({max_levels}) levels"
        return None


# reason strings of refusals (sent when the client allows problem information: acks.py)
_REASON_STRINGS = {
    PUBLISH_NOT_AUTHORIZED: "not authorized to publish to this topic",
    QUOTA_EXCEEDED: "too many QoS 2 messages awaiting PUBREL",
}

