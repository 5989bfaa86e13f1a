# mypy: disable-error-code="misc"
# (the methods are typed with ``self: Broker``, the class they are mixed into; mypy wants a
# supertype there, so that one check is off for this file, the bodies are checked as Broker)
"""CONNECT and the life of a session: authentication (password file, ACL, 5.0
enhanced authentication), acceptance, takeover, detaching, expiry, wills and their 5.0 delay;
the security files and their reload. A mixin of :class:`mqttd.broker.Broker` (its methods
are typed with ``self: Broker``)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

from mqttd import enhanced_auth, v5
from mqttd.acl import AclFile, CachedAuthorizer
from mqttd.auth import PasswordFile
from mqttd.codec import (
    ClientIdRejected,
    MQTTError,
)
from mqttd.codec.errors import (
    NotAuthorized,
    SessionTakenOver,
)
from mqttd.codec.kinds import BRIDGE_LEVEL_FLAG
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_31,
    ConnAck,
    Connect,
    Will,
)
from mqttd.config import BRIDGE_PREFIX
from mqttd.protocol import Connection
from mqttd.security.hooks import Authorizer, SecurityFileError
from mqttd.session import Session
from mqttd.shared import is_shared
from persistence import ops

if TYPE_CHECKING:
    from mqttd.engine.dispatch import Engine as Broker

log = logging.getLogger("mqttd.broker")  # one logger for the broker and its mixins

DENIED_LOG_INTERVAL_S = 10.0  # at most one log line per interval for ACL refusals


class ConnectHandling:
    def _on_connect(self: Broker, conn: Connection, packet: Connect) -> None:
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
        limits = self.config.limits
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
            if enhanced_auth.start(self, conn, packet):
                self._accept(conn, packet, packet.username)
            return
        ready, username = self._login(conn, packet)
        if ready:
            self._accept(conn, packet, username)

    def _accept(self: Broker, conn: Connection, packet: Connect, username: str | None) -> None:
        """The client is authenticated: check its will, take over or create its session,
        answer CONNACK."""
        client_id = conn.client_id
        will = packet.will
        acl = self._acl
        if will is not None and acl is not None and not acl.can_publish(
            client_id, username, will.topic
        ):
            raise NotAuthorized(f"the ACL does not allow publishing the will to {will.topic!r}")
        v5_client = conn.protocol_level == PROTOCOL_5
        props = packet.properties or {}
        expiry_s: int | None = None
        if v5_client:  # Session Expiry Interval instead of clean session (0: ends with this)
            requested = props.get("session_expiry_interval", 0)
            expiry_s = v5.session_expiry(requested, self.config.persistence.session_expiry_s)
            persistent = expiry_s != 0
            if expiry_s != (-1 if requested == v5.NEVER else requested):
                conn.connack_properties["session_expiry_interval"] = (  # type: ignore[index]
                    v5.NEVER if expiry_s < 0 else expiry_s
                )
        else:
            persistent = not packet.clean_session
        session = self.sessions.get(client_id)
        # the old session ends here if the client starts clean (or it was not kept)
        ends = session is not None and (packet.clean_session or not session.persistent)
        pending = self._delayed_wills.pop(client_id, None)
        if pending is not None and ends:
            self._publish_will(pending[1])  # 5.0: the session ended before the will delay
        # (otherwise the client is back within the delay: the will is not sent)
        if session is not None and session.connection is not None:
            self._take_over(session.connection, ends)
        if ends and session is not None:
            self._discard_session(session)
            session = None
        session_present = session is not None
        if session is None:
            session = Session(
                client_id,
                persistent=persistent,
                writer=self.writer if persistent else None,
                page_size=self.config.persistence.queue_page_messages,
                **self._session_limits(client_id),
            )
            self.sessions[client_id] = session
        session.expiry_s = expiry_s
        window = self.config.limits_for(client_id).max_inflight_messages
        session.max_inflight = min(window, props.get("receive_maximum", window))
        if session.writer is not None:
            session.writer.submit(ops.SaveSession(client_id, None, expiry_s))
        conn.session = session
        if acl is not None and session.subscriptions and (
            not session.login_known or session.username != username
        ):
            self.router.acl_changed()  # its subscriptions now answer to another identity
        session.username = username
        session.login_known = True
        conn.will = packet.will
        conn.send_packet(ConnAck(session_present, 0, conn.connack_properties))
        conn.accepted = True
        session.attach(conn)
        log.info(
            "client %s connected (MQTT %s, clean session %d, keepalive %ds, session present %d"
            "%s)",
            conn.name,
            {PROTOCOL_31: "3.1", PROTOCOL_5: "5.0"}.get(conn.protocol_level, "3.1.1")
            + (" bridge" if conn.is_bridge else ""),
            packet.clean_session,
            packet.keepalive_s,
            session_present,
            "" if username is None else f", user {username!r}",
        )

    def _login(self: Broker, conn: Connection, packet: Connect) -> tuple[bool, str | None]:
        """Authenticate a CONNECT (see Gatekeeper). Returns (True, user name) when the client
        may go on; (False, user name) when its password is being checked in a worker thread
        (the connection is parked until then). Raises NotAuthorized (CONNACK 0x05) or
        BadUserNameOrPassword (0x04)."""
        if not self._security_loaded:
            self.load_security()
        login_checks = self.login_checks
        ready, username = self.gate.login(conn, packet, may_defer=login_checks is not None)
        if not ready:
            self._parked[conn] = []
            login_checks(conn, packet, cast(str, username))  # type: ignore[misc]
        return ready, username

    def _login_done(
        self: Broker, conn: Connection, packet: Connect, username: str, error: MQTTError | None
    ) -> None:
        """The worker thread's answer: accept (then handle what arrived meanwhile) or refuse."""
        pending = self._parked.pop(conn, None)
        self.notify_progress()  # the connection's reader waits in wait_readable
        if pending is None or conn.closing:
            return
        try:
            if error is not None:
                raise error
            self._accept(conn, packet, username)
            self._dispatch(conn, pending)
        except MQTTError as exc:
            self.protocol_error(conn, exc)
        except Exception:
            log.exception("client %s: internal error while handling its packets", conn.name)
            conn.close()

    def load_security(self: Broker) -> None:
        """Build the password file and ACL named by ``config.security`` (unless an embedding
        program passed its own ``authenticator``/``authorizer``). Raises SecurityFileError.
        Called by open_store(); a broker driven without I/O loads at the first CONNECT."""
        security = self.config.security
        authenticator = self.authenticator
        authorizer = self.authorizer
        if security.password_file is not None:
            if authenticator is None:
                authenticator = PasswordFile.load(security.password_file)
                log.info("password file %s: %d users", security.password_file,
                         len(authenticator))
                self._password_file_used = True
            else:
                log.info("password_file %s not used: the authenticator was given by the "
                         "program", security.password_file)
        if security.acl_file is not None:
            if authorizer is None:
                authorizer = AclFile.load(security.acl_file)
                log.info("ACL file %s: %d rules", security.acl_file, len(authorizer))
                self._acl_file_used = True
            else:
                log.info("acl_file %s not used: the authorizer was given by the program",
                         security.acl_file)
        self.authenticator = self.gate.authenticator = authenticator
        self._set_authorizer(authorizer)
        self._security_loaded = True

    def _set_authorizer(self: Broker, authorizer: Authorizer | None) -> None:
        self.authorizer = authorizer
        self._acl = CachedAuthorizer(authorizer) if authorizer is not None else None
        self.router.authorizer = self._acl
        self.router.acl_changed()

    def reload_security(self: Broker) -> bool:
        """Re-read the password file and the ACL file (SIGHUP). A file that cannot be read
        or parsed is reported and the one in use is kept. Connected clients stay connected;
        the new ACL applies to their next publish, subscribe and delivery. Cached ACL
        answers are dropped (also for an authorizer given by the program, so it can change
        its policy and call reload). Returns True when everything was reloaded."""
        if not self._security_loaded:
            try:
                self.load_security()
            except SecurityFileError as exc:
                log.error("reload: %s", exc)
                return False
            return True
        security = self.config.security
        ok = True
        if self._password_file_used and security.password_file is not None:
            try:
                passwords = PasswordFile.load(security.password_file)
            except SecurityFileError as exc:
                log.error("reload: %s; keeping the password file loaded before", exc)
                ok = False
            else:
                self.authenticator = self.gate.authenticator = passwords
                log.info("password file %s reloaded: %d users", security.password_file,
                         len(passwords))
        if self._acl_file_used and security.acl_file is not None:
            try:
                acl = AclFile.load(security.acl_file)
            except SecurityFileError as exc:
                log.error("reload: %s; keeping the ACL loaded before", exc)
                ok = False
            else:
                self._set_authorizer(acl)
                log.info("ACL file %s reloaded: %d rules", security.acl_file, len(acl))
        if self._acl is not None:
            self._acl.clear()
        self.router.acl_changed()
        return ok

    def _log_denied(self: Broker, conn: Connection, what: str) -> None:
        """Log an ACL refusal, at most once per DENIED_LOG_INTERVAL_S (with the totals)."""
        now = time.monotonic()
        if now >= self._next_denied_log:
            self._next_denied_log = now + DENIED_LOG_INTERVAL_S
            log.warning(
                "client %s: %s denied by the ACL (denied so far: %d publishes, "
                "%d subscriptions; further denials are not logged for %.0fs)",
                conn.name, what, self.acl_denied_publish, self.acl_denied_subscribe,
                DENIED_LOG_INTERVAL_S,
            )

    def _take_over(self: Broker, old: Connection, session_ends: bool = True) -> None:
        """A second connection with the same client id: close the first. Its will is
        published (it did not send DISCONNECT; MQTT-3.1.2-8, as mosquitto does), unless it
        has a 5.0 Will Delay Interval and the session goes on with the new connection."""
        log.info("client %s: taken over by a new connection; closing the old one", old.name)
        session = old.session
        will, old.will = old.will, None
        old.session = None
        if session is not None:
            self._detach(session)
        old.close(SessionTakenOver("session taken over by a new connection"))
        delayed = will is not None and (will.properties or {}).get("will_delay_interval")
        if will is not None and (session_ends or not delayed):
            self._publish_will(will)  # else a delayed will is cancelled: the client is back

    def _detach(self: Broker, session: Session) -> None:
        """The session's connection is gone: hand what it holds from shared subscriptions
        to other members of their groups, then mark it offline."""
        shared = self._has_shared(session)
        taken = session.take_shared() if shared else []
        session.detach()
        self._session_offline(session)
        if taken:
            self.shares.hand_on(session, taken)

    def _discard_session(self: Broker, session: Session) -> None:
        filters = list(session.subscriptions)
        if self._has_shared(session):
            for topic_filter in filters:
                if is_shared(topic_filter):
                    self.shares.remove(topic_filter, session.client_id)
            filters = [f for f in filters if not is_shared(f)]
        self.router.trie.remove_client(session.client_id, filters)
        session.subscriptions.clear()
        session.discarded = True
        if session.writer is not None:
            session.writer.submit(ops.DeleteSession(session.client_id))
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def _session_offline(self: Broker, session: Session) -> None:
        now = time.time()
        session.disconnected_at = now
        if session.writer is not None and not session.discarded:
            session.writer.submit(ops.SaveSession(session.client_id, now, session.expiry_s))

    def expire_sessions(self: Broker, now: float | None = None) -> int:
        """Delete persistent sessions whose client has been away longer than their 5.0
        Session Expiry Interval, or ``persistence.session_expiry_s`` (3.1.1); returns how
        many. A delayed will of an expired session is published now."""
        default_s = self.config.persistence.session_expiry_s
        now = time.time() if now is None else now
        expired = []
        for s in self.sessions.values():
            if s.connection is not None or s.disconnected_at is None:
                continue
            expiry_s = default_s if s.expiry_s is None else s.expiry_s
            if expiry_s >= 0 and s.disconnected_at + expiry_s <= now:
                expired.append(s)
        for session in expired:
            log.info("session %s expired", session.client_id)
            self._discard_session(session)
            pending = self._delayed_wills.pop(session.client_id, None)
            if pending is not None:
                self._publish_will(pending[1])
        return len(expired)

    def _will_due(self: Broker, session: Session, will: Will, session_ended: bool) -> None:
        """Publish a will now, or after its Will Delay Interval or at the end of the session,
        whichever comes first (cancelled if the client connects again before)."""
        delay = will.properties.get("will_delay_interval", 0) if will.properties else 0
        expiry = session.expiry_s
        if expiry is None:
            expiry = self.config.persistence.session_expiry_s
        if expiry >= 0:
            if session.expiry_s is not None and expiry > 0 and not session_ended:
                self.call_at(time.time() + expiry, self.expire_sessions)
            delay = min(delay, expiry)
        if not delay or session_ended:
            self._publish_will(will)
            return
        entry = (time.time() + delay, will)
        self._delayed_wills[session.client_id] = entry
        self.call_at(entry[0], lambda: self._delayed_will(session.client_id, entry))

    def _delayed_will(self: Broker, client_id: str, entry: tuple[float, Will]) -> None:
        if self._delayed_wills.get(client_id) is entry:
            del self._delayed_wills[client_id]
            self._publish_will(entry[1])

    def _publish_will(self: Broker, will: Will) -> None:
        self.publish(v5.will_message(will, time.time()))

    def park(self: Broker, conn: Connection) -> None:
        """Hold the packets of a connection whose CONNECT is not decided yet."""
        self._parked.setdefault(conn, [])

    def unpark(self: Broker, conn: Connection, packet: Connect) -> bool:
        """Enhanced authentication accepted a parked connection: accept it and handle what
        arrived meanwhile. False if it was not parked (the caller accepts it)."""
        pending = self._parked.pop(conn, None)
        if pending is None:
            return False
        self._accept(conn, packet, packet.username)
        self._dispatch(conn, pending)
        return True

    def _session_limits(self: Broker, client_id: str) -> dict[str, Any]:
        limits = self.config.limits_for(client_id)
        return {
            "max_inflight": limits.max_inflight_messages,
            "max_queued": limits.max_queued_messages,
            "max_queued_bytes": limits.max_queued_bytes,
            "overflow_policy": limits.overflow_policy,
            "qos0_buffer_bytes": self.config.limits.qos0_buffer_bytes,
            "counters": self.drops,
        }
