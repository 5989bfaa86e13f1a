"""CONNECT: the client's terms (3.x keepalive, 5.0 properties), authentication (the
gatekeeper, slow password checks handed to the service, 5.0 enhanced authentication), then
acceptance: its session taken over, resumed or created, CONNACK. The security files and
their reload are here too (they decide the next CONNECTs)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import cast

from mqttd import enhanced_auth, v5
from mqttd.acl import AclFile, CachedAuthorizer
from mqttd.auth import PasswordFile
from mqttd.codec import ClientIdRejected, MQTTError, ProtocolError
from mqttd.codec.errors import NotAuthorized
from mqttd.codec.kinds import BRIDGE_LEVEL_FLAG, DISCONNECT
from mqttd.codec.packets import PROTOCOL_5, PROTOCOL_31, Auth, ConnAck, Connect, Disconnect
from mqttd.codec.reason import DISCONNECT_WITH_WILL_MESSAGE, reason_name
from mqttd.config import BRIDGE_PREFIX
from mqttd.connection import Connection
from mqttd.engine import sessions, wills
from mqttd.engine.state import BrokerState
from mqttd.security.hooks import Authorizer, SecurityFileError
from mqttd.session import Session
from persistence import ops

log = logging.getLogger("mqttd.broker")
conn_log = logging.getLogger("mqttd.connections")  # logging.connections: connects, disconnects


def on_connect(state: BrokerState, conn: Connection, packet: Connect) -> None:
    level = packet.protocol_level
    # a bridge announces itself with level | 0x80 (mosquitto's try_private): it does
    # not get its own messages back
    conn.is_bridge = bool(level & BRIDGE_LEVEL_FLAG)
    conn.protocol_level = level & ~BRIDGE_LEVEL_FLAG
    v5_client = conn.protocol_level == PROTOCOL_5
    props = packet.properties or {}
    client_id = packet.client_id
    assigned = False
    if not client_id:
        if not packet.clean_session and not v5_client:
            raise ClientIdRejected("empty client identifier with clean session 0")
        if conn.protocol_level == PROTOCOL_31:
            raise ClientIdRejected("empty client identifier is not allowed in MQTT 3.1")
        client_id = f"auto-{uuid.uuid4()}"
        assigned = True
    if client_id.startswith(BRIDGE_PREFIX):
        raise ClientIdRejected(f"client ids starting with {BRIDGE_PREFIX!r} are reserved")
    conn.client_id = client_id
    limits = state.config.limits
    max_keepalive_s = limits.max_keepalive_s
    if v5_client:
        conn.keepalive_s, connack = v5.connect_terms(
            conn, props, keepalive_s=packet.keepalive_s, max_keepalive_s=max_keepalive_s,
            receive_maximum=limits.max_receive_messages,
            max_packet_size=limits.max_packet_size_bytes,
            topic_alias_maximum=limits.max_topic_aliases,
        )
        if assigned:
            connack["assigned_client_identifier"] = client_id
        conn.connack_properties = connack
    else:
        if packet.keepalive_s > max_keepalive_s:
            # 3.x cannot tell the client another keepalive; mosquitto refuses it this way
            raise ClientIdRejected(
                f"keepalive {packet.keepalive_s}s exceeds max_keepalive_s {max_keepalive_s}"
            )
        conn.keepalive_s = packet.keepalive_s
    if "authentication_method" in props:  # 5.0 enhanced authentication
        if enhanced_auth.start(state.enhanced_authenticator, conn, packet) is not None:
            accept(state, conn, packet, packet.username)
        else:
            state.parked.setdefault(conn, [])  # until the exchange ends
        return
    ready, username = login(state, conn, packet)
    if ready:
        accept(state, conn, packet, username)


def accept(
    state: BrokerState, conn: Connection, packet: Connect, username: str | None,
    *, claimed: bool = False,
) -> None:
    """The client is authenticated: check its will, take over or create its session,
    answer CONNACK. In cluster mode the client id is claimed cluster-wide first (the
    connection is parked meanwhile; :func:`claim_done` comes back here)."""
    client_id = conn.client_id
    will = packet.will
    acl = state.acl
    if will is not None and acl is not None and not acl.can_publish(
        client_id, username, will.topic
    ):
        raise NotAuthorized(f"the ACL does not allow publishing the will to {will.topic!r}")
    persistent, expiry_s = _session_expiry(state, conn, packet)
    cluster = state.cluster
    if cluster is not None and not claimed:
        state.parked[conn] = []
        cluster.claim(conn, packet, username, persistent, expiry_s)
        return
    session = _resume_or_end(state, client_id, packet.clean_session)
    session_present = session is not None
    if session is None:
        limits = state.session_limits(client_id, persistent)
        if persistent and cluster is not None:
            session = cluster.new_session(client_id, **limits)
        else:
            # (positional, in the fields' order: keywords to a class cost a dict per call)
            session = Session(
                client_id, persistent, limits["max_inflight"],
                state.writer if persistent else None, limits["queue_limits"],
                limits["qos0_buffer_bytes"], limits["counters"],
            )
        state.sessions[client_id] = session
    _bind_session(state, conn, session, packet, username, expiry_s)
    conn.will = packet.will
    if state.cluster is not None:  # cluster mode: the will where other nodes find it
        state.cluster.will_set(client_id, will, username, session, packet.clean_session)
    conn.send_packet(ConnAck(session_present, 0, conn.connack_properties))
    conn.accepted = True
    conn.connected_at = time.time()
    session.attach(conn)
    if state.config.logging.connections:
        _log_connected(conn, session, session_present, username)


def claim_done(
    state: BrokerState, conn: Connection, packet: Connect, username: str | None,
    error: MQTTError | None,
) -> None:
    """Cluster mode: the client id is claimed (or could not be): accept, then handle what
    arrived meanwhile, or refuse."""
    pending = state.parked.pop(conn, None)
    state.notify_progress()
    if pending is None or conn.closing:
        return
    try:
        if error is not None:
            raise error
        accept(state, conn, packet, username, claimed=True)
        state.dispatch(conn, pending)
    except MQTTError as exc:
        state.protocol_error(conn, exc)
    except Exception:
        log.exception("client %s: internal error while handling its packets", conn.name)
        conn.close()


def _session_expiry(
    state: BrokerState, conn: Connection, packet: Connect
) -> tuple[bool, int | None]:
    """Whether the session outlives this connection, and its expiry in seconds (5.0
    only; None for 3.x, which has clean session instead). A 5.0 Session Expiry Interval
    the broker caps is told back in CONNACK."""
    if conn.protocol_level != PROTOCOL_5:
        return not packet.clean_session, None
    # 0 (the default): the session ends with this connection
    requested = (packet.properties or {}).get("session_expiry_interval", 0)
    expiry_s = v5.session_expiry(requested, state.config.persistence.session_expiry_s)
    if expiry_s != (-1 if requested == v5.NEVER else requested):
        conn.connack_properties["session_expiry_interval"] = (  # type: ignore[index]
            v5.NEVER if expiry_s < 0 else expiry_s
        )
    return expiry_s != 0, expiry_s


def _resume_or_end(state: BrokerState, client_id: str, clean_session: bool) -> Session | None:
    """The session the client resumes, or None when it needs a new one: the old session
    ends here if the client starts clean (or it was not kept). Either way the session's
    old connection is taken over, and a will pending under its delay is settled."""
    session = state.sessions.get(client_id)
    ends = session is not None and (clean_session or not session.persistent)
    pending = wills.take_back(state, client_id)
    if pending is not None and ends:
        # 5.0: the session ended before the will delay
        wills.publish_will(state, pending, client_id, "session ended by a clean start")
    # (otherwise the client is back within the delay: the will is not sent)
    if session is not None and session.connection is not None:
        # the engine attaches sessions to its Connections only
        sessions.take_over(state, cast(Connection, session.connection), ends)
    if ends and session is not None:
        sessions.discard(state, session)
        return None
    return session


def _bind_session(
    state: BrokerState, conn: Connection, session: Session, packet: Connect,
    username: str | None, expiry_s: int | None,
) -> None:
    """Give the session this connection's terms (expiry, in-flight window) and login,
    saving the terms if it is persistent."""
    client_id = conn.client_id
    session.expiry_s = expiry_s
    window = state.session_limits(client_id, False)["max_inflight"]
    # (conditional expressions: min() and max() of two cost an iterator each)
    wanted = window if packet.properties is None else packet.properties.get(
        "receive_maximum", window
    )
    session.max_inflight = wanted if wanted < window else window
    # pace before the queue budget drops anything (mqttd.engine.flow)
    high = state.config.limits.queue_high_watermark_messages
    budget = session.out.limits.max_messages
    if budget >= 0:
        pace = high if high < budget // 2 else budget // 2
        conn.pace_messages = pace if pace > 1 else 1
    else:
        conn.pace_messages = high
    if session.writer is not None:
        session.writer.submit(ops.SaveSession(client_id, None, expiry_s))
    conn.session = session
    if state.acl is not None and session.subscriptions and (
        not session.login_known or session.username != username
    ):
        state.router.acl_changed()  # its subscriptions now answer to another identity
    session.username = username
    session.login_known = True


def protocol_name(conn: Connection) -> str:
    return {PROTOCOL_31: "3.1", PROTOCOL_5: "5.0"}.get(conn.protocol_level, "3.1.1")


def _log_connected(
    conn: Connection, session: Session, session_present: bool, username: str | None
) -> None:
    if not conn_log.isEnabledFor(logging.INFO):
        return
    protocol = protocol_name(conn)
    kind = "persistent" if session.persistent else "clean"
    conn_log.info(
        "client %s connected from %s: MQTT %s%s, %s session%s, keepalive %ds%s",
        conn.client_id, conn.peer, protocol, " bridge" if conn.is_bridge else "", kind,
        " (resumed)" if session_present else "", conn.keepalive_s,
        "" if username is None else f", user {username!r}",
        extra={
            "event": "connect", "client_id": conn.client_id, "address": conn.peer,
            "protocol": protocol, "bridge": conn.is_bridge, "session": kind,
            "session_present": session_present, "keepalive_s": conn.keepalive_s,
            "username": username,
        },
    )


def end_reason(conn: Connection) -> str:
    """Why the connection ended, for the log: what the I/O layer or the client's DISCONNECT
    said, else the error the broker closed it with."""
    reason = conn.end_reason
    if not reason and conn.close_reason is not None:
        reason = str(conn.close_reason) or type(conn.close_reason).__name__
    return reason or "closed by the broker"


def log_disconnected(conn: Connection) -> None:
    """The line of a client's disconnect (``logging.connections``): why, and after how long."""
    reason = end_reason(conn)
    connected_s = max(0.0, time.time() - conn.connected_at)
    conn_log.info(
        "client %s disconnected from %s: %s (connected %.1fs)",
        conn.client_id, conn.peer, reason, connected_s,
        extra={
            "event": "disconnect", "client_id": conn.client_id, "address": conn.peer,
            "reason": reason, "connected_s": round(connected_s, 3),
        },
    )


def login(state: BrokerState, conn: Connection, packet: Connect) -> tuple[bool, str | None]:
    """Authenticate a CONNECT (see Gatekeeper). Returns (True, user name) when the client
    may go on; (False, user name) when its password is being checked in a worker thread
    (the connection is parked until then). Raises NotAuthorized (CONNACK 0x05) or
    BadUserNameOrPassword (0x04)."""
    if not state.security_loaded:
        load_security(state)
    login_checks = state.login_checks
    ready, username = state.gate.login(conn, packet, may_defer=login_checks is not None)
    if not ready:
        state.parked[conn] = []
        login_checks(conn, packet, cast(str, username))  # type: ignore[misc]
    return ready, username


def login_done(
    state: BrokerState, conn: Connection, packet: Connect, username: str,
    error: MQTTError | None,
) -> None:
    """The worker thread's answer: accept (then handle what arrived meanwhile) or refuse."""
    pending = state.parked.pop(conn, None)
    state.notify_progress()  # the connection's reader waits in wait_readable
    if pending is None or conn.closing:
        return
    try:
        if error is not None:
            raise error
        accept(state, conn, packet, username)
        state.dispatch(conn, pending)
    except MQTTError as exc:
        state.protocol_error(conn, exc)
    except Exception:
        log.exception("client %s: internal error while handling its packets", conn.name)
        conn.close()

def on_disconnect(state: BrokerState, conn: Connection, packet: Disconnect) -> None:
    if conn.protocol_level == PROTOCOL_5:
        requested = (packet.properties or {}).get("session_expiry_interval")
        session = conn.session
        if requested is not None and session is not None:
            if session.expiry_s == 0 and requested:
                raise ProtocolError("session expiry set on DISCONNECT after 0 at CONNECT")
            cap_s = state.config.persistence.session_expiry_s
            session.expiry_s = v5.session_expiry(requested, cap_s)
            if session.writer is not None:
                session.writer.submit(ops.SaveSession(session.client_id, None,
                                                      session.expiry_s))
        code = packet.reason_code
        conn.end_reason = "client sent DISCONNECT" + (
            f" {code:#04x} {reason_name(code, DISCONNECT)}" if code else ""
        )
        if code == DISCONNECT_WITH_WILL_MESSAGE:
            conn.close()  # the will is published as if the connection had failed
            return
    else:
        conn.end_reason = "client sent DISCONNECT"
    if conn.will is not None and state.cluster is not None:
        state.cluster.will_settled(conn.client_id)
    conn.will = None  # a clean DISCONNECT discards the will (MQTT-3.14.4-3)
    conn.close()


def on_auth(state: BrokerState, conn: Connection, packet: Auth) -> None:
    """5.0 AUTH: the enhanced authentication goes on; when it accepts a waiting CONNECT,
    the client is accepted and what arrived meanwhile is handled."""
    connect = enhanced_auth.on_auth(state.enhanced_authenticator, conn, packet)
    if connect is None:
        return
    pending = state.parked.pop(conn, None)
    accept(state, conn, connect, connect.username)
    if pending:
        state.dispatch(conn, pending)


def load_security(state: BrokerState) -> None:
    """Build the password file and ACL named by ``config.security`` (unless an embedding
    program passed its own ``authenticator``/``authorizer``). Raises SecurityFileError.
    Called by open_store(); a broker driven without I/O loads at the first CONNECT."""
    security = state.config.security
    authenticator = state.authenticator
    authorizer = state.authorizer
    if security.password_file is not None:
        if authenticator is None:
            authenticator = PasswordFile.load(security.password_file)
            log.info("password file %s: %d users", security.password_file,
                     len(authenticator))
            state.password_file_used = True
        else:
            log.info("password_file %s not used: the authenticator was given by the "
                     "program", security.password_file)
    if security.acl_file is not None:
        if authorizer is None:
            authorizer = AclFile.load(security.acl_file)
            log.info("ACL file %s: %d rules", security.acl_file, len(authorizer))
            state.acl_file_used = True
        else:
            log.info("acl_file %s not used: the authorizer was given by the program",
                     security.acl_file)
    state.authenticator = state.gate.authenticator = authenticator
    set_authorizer(state, authorizer)
    state.security_loaded = True


def set_authorizer(state: BrokerState, authorizer: Authorizer | None) -> None:
    state.authorizer = authorizer
    state.acl = CachedAuthorizer(authorizer) if authorizer is not None else None
    state.router.authorizer = state.acl
    state.router.acl_changed()


def reload_security(state: BrokerState) -> bool:
    """Re-read the password file and the ACL file (SIGHUP). A file that cannot be read
    or parsed is reported and the one in use is kept. Connected clients stay connected;
    the new ACL applies to their next publish, subscribe and delivery. Cached ACL
    answers are dropped (also for an authorizer given by the program, so it can change
    its policy and call reload). Returns True when everything was reloaded."""
    if not state.security_loaded:
        try:
            load_security(state)
        except SecurityFileError as exc:
            log.error("reload: %s", exc)
            return False
        return True
    security = state.config.security
    ok = True
    if state.password_file_used and security.password_file is not None:
        try:
            passwords = PasswordFile.load(security.password_file)
        except SecurityFileError as exc:
            log.error("reload: %s; keeping the password file loaded before", exc)
            ok = False
        else:
            state.authenticator = state.gate.authenticator = passwords
            log.info("password file %s reloaded: %d users", security.password_file,
                     len(passwords))
    if state.acl_file_used and security.acl_file is not None:
        try:
            acl = AclFile.load(security.acl_file)
        except SecurityFileError as exc:
            log.error("reload: %s; keeping the ACL loaded before", exc)
            ok = False
        else:
            set_authorizer(state, acl)
            log.info("ACL file %s reloaded: %d rules", security.acl_file, len(acl))
    if state.acl is not None:
        state.acl.clear()
    state.router.acl_changed()
    return ok
