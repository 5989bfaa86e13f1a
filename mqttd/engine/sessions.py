"""The life of a session after CONNECT: taken over by a new connection, detached when its
connection ends, expired after its client stayed away too long, discarded; subscriptions
added and removed; its will when the connection ends without DISCONNECT."""

from __future__ import annotations

import logging
import time

from mqttd.codec.errors import SessionTakenOver
from mqttd.codec.packets import Will
from mqttd.connection import Connection
from mqttd.engine import wills
from mqttd.engine.state import BrokerState
from mqttd.session import Session
from mqttd.subscriptions import SubOptions
from mqttd.topics import is_shared
from persistence import ops

log = logging.getLogger("mqttd.broker")


def take_over(state: BrokerState, old: Connection, session_ends: bool = True) -> None:
    """A second connection with the same client id: close the first. Its will is published
    (it did not send DISCONNECT; MQTT-3.1.2-8, as mosquitto does), unless it has a 5.0 Will
    Delay Interval and the session goes on with the new connection."""
    session = old.session
    will, old.will = old.will, None
    old.session = None
    if session is not None:
        detach(state, session)
    old.close(SessionTakenOver("session taken over by a new connection"))
    delayed = will is not None and (will.properties or {}).get("will_delay_interval")
    if will is not None and state.cluster is not None:  # published below, or cancelled
        state.cluster.will_settled(old.client_id)
    if will is not None and (session_ends or not delayed):
        # else a delayed will is cancelled: the client is back
        wills.publish_will(state, will, old.client_id, "session taken over")


def detach(state: BrokerState, session: Session) -> None:
    """The session's connection is gone: hand what it holds from shared subscriptions to
    other members of their groups, then mark it offline."""
    taken = session.take_shared() if has_shared(session) else []
    session.detach()
    session_offline(session)
    if taken:
        state.work_queues.hand_on(session, taken)


def session_offline(session: Session) -> None:
    now = time.time()
    session.disconnected_at = now
    if session.writer is not None and not session.discarded:
        session.writer.submit(ops.SaveSession(session.client_id, now, session.expiry_s))


def discard(state: BrokerState, session: Session) -> None:
    """The session ends: its subscriptions go, and its stored state."""
    filters = list(session.subscriptions)
    if has_shared(session):
        for topic_filter in filters:
            if is_shared(topic_filter):
                state.shares.remove(topic_filter, session.client_id)
        filters = [f for f in filters if not is_shared(f)]
    state.router.trie.remove_client(session.client_id, filters)
    session.subscriptions.clear()
    session.discarded = True
    state.sent_by_ended_sessions += session.sent
    state.drops.full.discard(session.out)
    if session.writer is not None:
        session.writer.submit(ops.DeleteSession(session.client_id))
    if state.sessions.get(session.client_id) is session:
        del state.sessions[session.client_id]


def expire_sessions(state: BrokerState, now: float | None = None) -> int:
    """Delete persistent sessions whose client has been away longer than their 5.0 Session
    Expiry Interval, or ``persistence.session_expiry_s`` (3.1.1); returns how many. A
    delayed will of an expired session is published now."""
    default_s = state.config.persistence.session_expiry_s
    now = time.time() if now is None else now
    expired = []
    for s in state.sessions.values():
        if s.connection is not None or s.disconnected_at is None:
            continue
        expiry_s = default_s if s.expiry_s is None else s.expiry_s
        if expiry_s >= 0 and s.disconnected_at + expiry_s <= now:
            expired.append(s)
    state.sessions_expired += len(expired)
    for session in expired:
        log.info("session %s expired", session.client_id)
        discard(state, session)
        will = wills.take_back(state, session.client_id)
        if will is not None:
            wills.publish_will(state, will, session.client_id, "session expired")
    return len(expired)


def expire_at(state: BrokerState, when: float) -> None:
    """Look for expired sessions at ``when``."""
    state.call_at(when, lambda: expire_sessions(state))


def will_due(
    state: BrokerState, session: Session, will: Will, session_ended: bool,
    why: str = "connection lost",
) -> None:
    """Publish a will now, or after its Will Delay Interval or at the end of the session,
    whichever comes first (cancelled if the client connects again before). ``why``: how
    the connection ended, for the log."""
    delay = will.properties.get("will_delay_interval", 0) if will.properties else 0
    expiry = session.expiry_s
    if expiry is None:
        expiry = state.config.persistence.session_expiry_s
    if expiry >= 0:
        if session.expiry_s is not None and expiry > 0 and not session_ended:
            expire_at(state, time.time() + expiry)
        delay = min(delay, expiry)
    if not delay or session_ended:
        wills.publish_will(state, will, session.client_id, why)
        return
    wills.publish_later(state, session.client_id, delay, will)


def has_shared(session: Session) -> bool:
    return any(is_shared(f) for f in session.subscriptions)


def add_subscription(
    state: BrokerState, session: Session, topic_filter: str, qos: int,
    options: SubOptions | None = None,
) -> None:
    session.subscriptions[topic_filter] = qos
    if is_shared(topic_filter):
        state.shares.add(topic_filter, session, qos, options)
    else:
        state.router.trie.add(topic_filter, session.client_id, session, qos, options)


def remove_subscription(state: BrokerState, session: Session, topic_filter: str) -> bool:
    if session.subscriptions.pop(topic_filter, None) is None:
        return False
    if is_shared(topic_filter):
        state.shares.remove(topic_filter, session.client_id)
    else:
        state.router.trie.remove(topic_filter, session.client_id)
    return True
