"""SUBSCRIBE and UNSUBSCRIBE: filters checked (syntax, topic limits, the ACL), subscriptions
added with their 5.0 options and stored, SUBACK / UNSUBACK after the commit, then the retained
messages that match (5.0 Retain Handling; none for a shared subscription)."""

from __future__ import annotations

import logging
import time
from typing import cast

from mqttd import v5
from mqttd.codec.kinds import SUBACK
from mqttd.codec.packets import (
    PROTOCOL_5,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
)
from mqttd.codec.reason import (
    NO_SUBSCRIPTION_EXISTED,
    NOT_AUTHORIZED,
    SUBACK_FAILURE,
    TOPIC_FILTER_INVALID,
    reason_name,
)
from mqttd.connection import Connection
from mqttd.engine import sessions
from mqttd.engine.state import BrokerState
from mqttd.session import Session
from mqttd.subscriptions import SubOptions
from mqttd.topics import InvalidTopic, is_shared, parse_shared, validate_topic_filter
from persistence import ops

log = logging.getLogger("mqttd.broker")

MAX_QOS = 2
SUBACK_NOT_AUTHORIZED = NOT_AUTHORIZED

_Retained = tuple[Publish, int, tuple[int, ...] | None]
"""A retained message to deliver after SUBACK: (message, QoS, subscription ids)."""


def on_subscribe(state: BrokerState, conn: Connection, packet: Subscribe) -> None:
    """Grant or refuse each filter, answer SUBACK, then deliver the retained messages that
    match the granted ones."""
    session: Session = conn.session  # type: ignore[assignment]
    codes = []
    retained: list[_Retained] = []
    level = conn.protocol_level
    v5_client = level == PROTOCOL_5
    sub_id = (packet.properties or {}).get("subscription_identifier", 0) if v5_client else 0
    now = time.time()
    for sub in packet.subscriptions:
        refused = _check_filter(state, session, sub.filter)
        if refused is not None:
            code = refused[0] if v5_client else SUBACK_FAILURE
            codes.append(code)
            _log_refused(conn, packet.packet_id, sub.filter, code, refused[1])
            continue
        existed = sub.filter in session.subscriptions
        qos = _add_subscription(state, session, sub, sub_id, v5_client)
        codes.append(qos)
        if is_shared(sub.filter):
            continue  # no retained messages on a shared subscription (MQTT 5.0, 4.8.2)
        if sub.retain_handling == 2 or (sub.retain_handling == 1 and existed):
            continue  # 5.0 Retain Handling: never, or only for a new subscription
        retained += _retained_for(state, session, sub.filter, qos, sub_id, now)
    state.reply(conn, SubAck(packet.packet_id, tuple(codes)).encode(level))
    for message, qos, ids in retained:
        session.deliver(message, qos, True, None, None, ids)


def _check_filter(
    state: BrokerState, session: Session, topic_filter: str
) -> tuple[int, str] | None:
    """None when the client may subscribe to ``topic_filter``; otherwise the 5.0 reason
    code that refuses it and why: an invalid filter (syntax, share name, topic limits) or
    one the ACL does not allow."""
    shared = is_shared(topic_filter)
    try:
        validate_topic_filter(topic_filter)
        acl_filter = parse_shared(topic_filter)[1] if shared else topic_filter
        problem = None
        if state.check_topic_limits:
            problem = state.topic_limit_problem(topic_filter)
        if problem is not None:
            state.limit_exceeded("topic")
            raise InvalidTopic(problem)
    except InvalidTopic as exc:
        return TOPIC_FILTER_INVALID, str(exc)
    acl = state.acl
    if acl is not None and not acl.can_subscribe(session.client_id, session.username, acl_filter):
        state.acl_denied_subscribe += 1
        return SUBACK_NOT_AUTHORIZED, "denied by the ACL"
    return None


def _log_refused(conn: Connection, packet_id: int, topic_filter: str, code: int, why: str) -> None:
    """One line per refused filter: SUBSCRIBE is not on the hot path, and an operator wants
    to see every client that asks for what it may not have."""
    log.info(
        "client %s: SUBSCRIBE to %r refused with %#04x %s: %s", conn.name, topic_filter, code,
        reason_name(code, SUBACK) if conn.protocol_level == PROTOCOL_5 else "Failure", why,
        extra={
            "event": "subscribe_refused", "client_id": conn.client_id, "address": conn.peer,
            "packet_id": packet_id, "filter": topic_filter, "reason_code": code, "reason": why,
        },
    )


def _add_subscription(
    state: BrokerState, session: Session, sub: Subscription, sub_id: int, v5_client: bool
) -> int:
    """Add (or replace) the subscription with its 5.0 options, and store it if the session
    is persistent. Returns the granted QoS."""
    qos = min(sub.qos, MAX_QOS)
    options = 0
    if v5_client:
        options = v5.options_byte(sub.no_local, sub.retain_as_published, sub.retain_handling)
    sessions.add_subscription(state,
        session, sub.filter, qos,
        SubOptions.of(sub.no_local, sub.retain_as_published, sub_id) if v5_client else None,
    )
    if options or sub_id:
        session.sub_options[sub.filter] = (options, sub_id)
    else:
        session.sub_options.pop(sub.filter, None)
    if session.writer is not None:
        session.writer.submit(ops.AddSubscription(
            session.client_id, sub.filter, qos, options, sub_id
        ))
    return qos


def _retained_for(
    state: BrokerState, session: Session, topic_filter: str, qos: int, sub_id: int,
    now: float,
) -> list[_Retained]:
    """The retained messages a new subscription gets: those matching its filter that the
    ACL lets the client receive and that have not expired, at most at its granted QoS."""
    acl = state.acl
    found: list[_Retained] = []
    for topic, stored in state.retained.match(topic_filter):
        if acl is not None and not acl.can_receive(session.client_id, session.username, topic):
            state.acl_denied_retained += 1
            continue
        message = cast(Publish, stored)
        if message.expires_at is not None and message.expires_at <= now:
            continue
        found.append((message, min(message.qos, qos), (sub_id,) if sub_id else None))
    return found


def on_unsubscribe(state: BrokerState, conn: Connection, packet: Unsubscribe) -> None:
    session: Session = conn.session  # type: ignore[assignment]
    codes = []
    for topic_filter in packet.filters:
        if sessions.remove_subscription(state, session, topic_filter):
            session.sub_options.pop(topic_filter, None)
            codes.append(0)
            if session.writer is not None:
                session.writer.submit(ops.RemoveSubscription(session.client_id, topic_filter))
        else:
            codes.append(NO_SUBSCRIPTION_EXISTED)
    level = conn.protocol_level
    state.reply(conn, UnsubAck(packet.packet_id, tuple(codes)).encode(level))
