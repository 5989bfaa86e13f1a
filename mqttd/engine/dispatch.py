"""The engine: the broker without I/O. Sessions, routing, retained messages and wills over
one state, driven synchronously by the I/O layer (no ``await``, no trio): ``new_connection``,
``handle_data`` (decode, then handle every packet), ``protocol_error``, ``connection_lost``;
output waits in each :class:`~mqttd.protocol.Connection`'s outbox for the I/O layer to send.

CONNECT and sessions are handled in :mod:`mqttd.connect`, the other packets in
:mod:`mqttd.handlers` (mixins of :class:`Engine` for now). :class:`mqttd.service.Broker` runs an
engine on the network: it opens the store, serves the listeners and bridges, runs the timers,
wakes paused readers and checks slow passwords in worker threads, through the hooks at the end
of this class (``notify_progress``, ``timers_changed``, ``login_checks``).

Security: every CONNECT passes the :class:`~mqttd.security.gatekeeper.Gatekeeper` (failed-login
limit, anonymous access per listener, the password file or the program's ``authenticator``).
With an ACL (``security.acl_file`` or the program's ``authorizer``), PUBLISH without write
access is dropped (and still acknowledged), SUBSCRIBE without read access gets 0x80, and
deliveries, retained ones included, go only to sessions allowed to read the topic.
``reload()`` re-reads both files (SIGHUP).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs

from mqttd import enhanced_auth, v5
from mqttd.acl import CachedAuthorizer
from mqttd.auth import LoginRateLimiter
from mqttd.codec import (
    MQTTError,
    PacketTooLarge,
)
from mqttd.codec.errors import (
    ServerBusy,
)
from mqttd.codec.packets import (
    AUTH,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PROTOCOL_5,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    ConnAck,
    Packet,
    Publish,
    Will,
)
from mqttd.config import Config, Listener
from mqttd.connect import ConnectHandling
from mqttd.engine.timers import TimerQueue
from mqttd.handlers import PacketHandlers
from mqttd.protocol import BufferAccount, Connection
from mqttd.retained import RetainedStore
from mqttd.router import Router
from mqttd.security.gatekeeper import Gatekeeper
from mqttd.security.hooks import Authenticator, Authorizer
from mqttd.session import DropCounters, Session
from mqttd.shared import ShareGroups, is_shared
from mqttd.topics import InvalidTopic
from persistence import ops
from persistence.journal import Journal
from persistence.store import Snapshot

log = logging.getLogger("mqttd.broker")  # one logger for the engine and its mixins


@attrs.define(eq=False)
class Engine(ConnectHandling, PacketHandlers):
    config: Config = attrs.Factory(Config)
    sessions: dict[str, Session] = attrs.Factory(dict)
    router: Router = attrs.Factory(Router)
    retained: RetainedStore = attrs.Factory(RetainedStore)
    connections: set[Connection] = attrs.Factory(set)
    # the store's group-commit writer; None until the service opens the store (or when the
    # engine is driven without I/O, in which case nothing is persisted)
    writer: Journal | None = None
    _awaiting_commit: set[Connection] = attrs.Factory(set)
    buffers: BufferAccount = attrs.Factory(BufferAccount)
    drops: DropCounters = attrs.Factory(DropCounters)
    paused_readers: int = 0
    limits_exceeded: dict[str, int] = attrs.Factory(dict)
    _check_topic_limits: bool = attrs.field(init=False)
    _publish_rate: float = attrs.field(init=False)  # per client per second; 0: no limit
    _receive_maximum: int = attrs.field(init=False)  # 5.0, announced in CONNACK
    read_pauses: int = 0
    stalled_disconnects: int = 0
    _handlers: dict[int, Callable[[Connection, Any], None]] = attrs.field(init=False)
    shares: ShareGroups = attrs.field(init=False)  # $share/<group>/<filter> subscriptions
    # security: hooks given by an embedding program win over the configured files; the
    # files are loaded by load_security() (at open_store, or at the first CONNECT)
    authenticator: Authenticator | None = None
    authorizer: Authorizer | None = None
    enhanced_authenticator: enhanced_auth.EnhancedAuthenticator | None = None  # 5.0 AUTH
    gate: Gatekeeper = attrs.field(init=False)
    _acl: CachedAuthorizer | None = attrs.field(init=False, default=None)
    _security_loaded: bool = attrs.field(init=False, default=False)
    _password_file_used: bool = attrs.field(init=False, default=False)
    _acl_file_used: bool = attrs.field(init=False, default=False)
    # connections whose password is being checked in a worker thread, with the packets
    # that arrived meanwhile
    _parked: dict[Connection, list[Packet]] = attrs.field(init=False, factory=dict)
    # set by the service while serving: runs a slow password check (in a worker thread)
    # and answers with _login_done; None: every check runs at once, on the caller's thread
    login_checks: Callable[[Connection, Any, str], None] | None = attrs.field(
        init=False, default=None
    )
    # 5.0 wills waiting for their delay: client id -> (when, will)
    _delayed_wills: dict[str, tuple[float, Will]] = attrs.field(init=False, factory=dict)
    timers: TimerQueue = attrs.field(init=False, factory=TimerQueue)
    # the journal's ticket when the packet being handled began (see begin_packet, reply)
    _packet_ticket: int = attrs.field(init=False, default=0)
    _next_denied_log: float = attrs.field(init=False, default=0.0)
    # counters
    connections_total: int = 0
    messages_received: int = 0
    acl_denied_publish: int = 0
    acl_denied_subscribe: int = 0
    acl_denied_retained: int = 0

    def __attrs_post_init__(self) -> None:
        limits = self.config.limits
        self.gate = Gatekeeper(
            LoginRateLimiter(self.config.security.max_login_failures_per_minute)
        )
        self._check_topic_limits = (
            limits.max_topic_length_bytes < 65535 or limits.max_topic_levels > 0
        )
        self._publish_rate = max(0.0, limits.max_publish_rate_per_s)
        self._receive_maximum = min(limits.max_receive_messages, 65535)
        self.shares = ShareGroups(self.router.trie)
        self._handlers = {
            CONNECT: self._on_connect,
            PUBLISH: self._on_publish,
            PUBACK: self._on_puback,
            PUBREC: self._on_pubrec,
            PUBREL: self._on_pubrel,
            PUBCOMP: self._on_pubcomp,
            SUBSCRIBE: self._on_subscribe,
            UNSUBSCRIBE: self._on_unsubscribe,
            PINGREQ: self._on_pingreq,
            DISCONNECT: self._on_disconnect,
            AUTH: self._on_auth,
        }

    # -- connections (called by the I/O layer) ---------------------------------------

    def new_connection(
        self, peer: str, listener: Listener | None = None, tls_identity: str | None = None
    ) -> Connection:
        conn = Connection(
            peer=peer,
            listener=listener,
            tls_identity=tls_identity,
            max_packet_size=self.config.limits.max_packet_size_bytes,
            account=self.buffers,
        )
        self.connections.add(conn)
        self.connections_total += 1
        return conn

    def handle_data(self, conn: Connection, data: bytes) -> None:
        """Decode and handle everything complete in ``data``. Raises MQTTError (after
        handling the packets that preceded the bad one) when the connection must end."""
        try:
            packets = conn.receive_data(data)
        except MQTTError as exc:
            self._dispatch(conn, exc.packets_before)
            raise
        self._dispatch(conn, packets)

    def _dispatch(self, conn: Connection, packets: list[Packet]) -> None:
        handlers = self._handlers
        parked = self._parked
        if parked and conn in parked:  # its login is being decided: handle these later
            if conn.auth_exchange is None:
                parked[conn].extend(packets)
                return
            for index, packet in enumerate(packets):  # enhanced authentication goes on
                if conn not in parked:  # accepted by the last AUTH: the rest as usual
                    self._dispatch(conn, packets[index:])
                    return
                if packet.TYPE == AUTH:
                    self._on_auth(conn, packet)  # type: ignore[arg-type]
                else:
                    parked[conn].append(packet)
            return
        if packets and packets[0].TYPE == CONNECT:  # only ever first in the first batch
            self._on_connect(conn, packets[0])  # type: ignore[arg-type]
            if conn in parked:
                self._dispatch(conn, packets[1:])
                return
            packets = packets[1:]
        writer = self.writer
        for packet in packets:
            if conn.closing:
                return
            if writer is not None:
                self._packet_ticket = writer.ticket  # see reply()
            handlers[packet.TYPE](conn, packet)

    def protocol_error(self, conn: Connection, exc: MQTTError) -> None:
        """Answer a protocol error the way the protocol version allows, then close.
        Replies already queued for the packets before the bad one are sent first."""
        log.warning("client %s: %s (%s); closing", conn.name, exc, type(exc).__name__)
        if isinstance(exc, PacketTooLarge):
            self.limit_exceeded("packet_size")
        if conn.session is None:
            if conn.protocol_level == PROTOCOL_5:
                code = exc.reason_code if exc.reason_code >= 0x80 else 0x80
                props = {"reason_string": str(exc)[:200]} if str(exc) else None
                conn.send(conn.fit(ConnAck(False, code, props), ConnAck(False, code)))
            elif exc.connack_code is not None:
                conn.send_packet(ConnAck(False, exc.connack_code))
        conn.close(exc, flush=True)

    def connection_lost(self, conn: Connection) -> None:
        """The connection is over, for whatever reason: publish the will unless the
        client sent DISCONNECT, detach the session, discard it if clean."""
        self.connections.discard(conn)
        self._awaiting_commit.discard(conn)
        self._parked.pop(conn, None)
        conn.discard_output()
        self.notify_progress()
        session = conn.session
        if session is None:
            return
        conn.session = None
        will, conn.will = conn.will, None
        if session.connection is conn:
            self._detach(session)
        ends = not session.persistent or session.expiry_s == 0
        if ends and self.sessions.get(session.client_id) is session:
            self._discard_session(session)
        reason = conn.close_reason
        log.info(
            "client %s disconnected%s", conn.name, f" ({reason})" if reason is not None else ""
        )
        if will is not None:
            self._will_due(session, will, ends)
        elif session.expiry_s is not None and session.expiry_s > 0 and not ends:
            self.call_at(time.time() + session.expiry_s, self.expire_sessions)

    # -- timers: 5.0 will delay and session expiry -----------------------------------------

    def call_at(self, when: float, callback: Callable[[], object]) -> None:
        """Run ``callback`` at ``when`` (epoch seconds), by the service's timer loop."""
        if self.timers.call_at(when, callback):
            self.timers_changed()

    # -- messages --------------------------------------------------------------------

    def publish(
        self, message: Publish, publisher: Session | None = None, bridge: bool = False
    ) -> int:
        """Store (if retained) and route a message; returns the number of deliveries.
        ``publisher``: the publishing session (5.0 No Local; with ``bridge`` it gets
        nothing back at all)."""
        if message.retain:
            writer = self.writer
            if message.payload:
                self.retained.set(message.topic, message)
                if writer is not None:
                    if message.properties is None and message.expires_at is None:
                        writer.submit(ops.SetRetained(message.topic, message.payload, message.qos))
                    else:
                        writer.submit(ops.SetRetained(
                            message.topic, message.payload, message.qos,
                            v5.stored_properties(message), message.expires_at,
                        ))
            elif self.retained.delete(message.topic) and writer is not None:
                writer.submit(ops.DeleteRetained(message.topic))
        return self.router.route(message, publisher, bridge)

    def begin_packet(self) -> None:
        """Handling of one packet starts (the dispatcher calls this for clients, a bridge's
        link for the packets of its remote): what it writes from now on, its reply waits for."""
        writer = self.writer
        if writer is not None:
            self._packet_ticket = writer.ticket

    def reply(self, conn: Connection, data: bytes, *, puback: bool = False) -> None:
        """The one rule of durable replies: a reply that acknowledges state (PUBACK, PUBREC,
        PUBCOMP, SUBACK, UNSUBACK, and PINGRESP to keep its place) goes at once if handling
        its packet wrote nothing to the store, else after the commit of everything submitted
        so far, which holds what the packet wrote. Replies on one connection keep their
        order: once one waits, those after it wait too. ``puback``: the PUBACK of a QoS 1
        PUBLISH, which counts against the 5.0 Receive Maximum until it is sent."""
        writer = self.writer
        if writer is None or (writer.ticket == self._packet_ticket and not conn.deferred):
            conn.send(data)
        else:
            conn.defer(writer.ticket, data, puback)
            if puback:
                conn.qos1_unacked += 1
            self._awaiting_commit.add(conn)

    def forget_connection(self, conn: Connection) -> None:
        """A bridge's remote connection is gone: hold no replies for it."""
        self._awaiting_commit.discard(conn)

    def _on_commit(self, committed: int) -> None:
        released = []
        for conn in self._awaiting_commit:
            if conn.release_deferred(committed):
                released.append(conn)
        for conn in released:
            self._awaiting_commit.discard(conn)
        self.notify_progress()

    # -- inbound flow control ---------------------------------------------------------------

    def reading_paused(self, conn: Connection) -> bool:
        """Whether to stop reading from ``conn`` for now: the broker's unsent output is over
        ``max_buffered_bytes``, the store's writer is behind, or ``conn`` has
        ``max_receive_messages`` acknowledgements waiting for a commit."""
        limits = self.config.limits
        if 0 <= limits.max_buffered_bytes < self.buffers.bytes:
            return True
        if self._parked and conn in self._parked and conn.auth_exchange is None:
            return True  # until its password check ends (it has no CONNACK yet)
        writer = self.writer
        if writer is not None and writer.congested:
            return True
        return len(conn.deferred) >= limits.max_receive_messages

    def disconnect_stalled_clients(self, now: float) -> int:
        """Over ``max_buffered_bytes`` for a while: disconnect the clients whose output has
        not moved for ``stalled_output_timeout_s`` (they stopped reading), so that stalled
        clients cannot keep every publisher paused. Returns how many."""
        limits = self.config.limits
        if not 0 <= limits.max_buffered_bytes < self.buffers.bytes:
            return 0
        stalled = [
            conn for conn in self.connections
            if conn.send_blocked_since is not None
            and now - conn.send_blocked_since >= limits.stalled_output_timeout_s
            and not conn.closing
        ]
        for conn in stalled:
            log.warning(
                "client %s: output stalled for %.1fs with %d bytes unsent while the broker "
                "is over max_buffered_bytes; disconnecting it", conn.name,
                now - conn.send_blocked_since, conn.outbox_bytes,  # type: ignore[operator]
            )
            self.stalled_disconnects += 1
            conn.close(ServerBusy("output stalled while the broker is over its buffer limit"))
        return len(stalled)

    def publish_rate_delay(self, conn: Connection, now: float) -> float:
        """Token bucket for ``limits.max_publish_rate_per_s``: refill ``conn``'s tokens (a
        burst of one second's worth at most) and return how long to stop reading from it so
        that its rate stays under the limit (0: no need)."""
        rate = self._publish_rate
        if not rate:
            return 0.0
        burst = max(rate, 1.0)
        tokens = min(burst, conn.publish_tokens + (now - conn.tokens_at) * rate)
        conn.tokens_at = now
        conn.publish_tokens = tokens
        if tokens >= 0:
            return 0.0
        self.limit_exceeded("publish_rate")
        return -tokens / rate

    # -- counters ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Broker-wide counters (read by the metrics work)."""
        writer = self.writer
        return {
            "connections": len(self.connections),
            "sessions": len(self.sessions),
            "subscriptions": len(self.router.trie),
            "retained": len(self.retained),
            "messages_received": self.messages_received,
            "deliveries": self.router.deliveries,
            "inflight": sum(len(s.inflight) for s in self.sessions.values()),
            "queued": sum(s.queued for s in self.sessions.values()),
            "dropped": self.drops.dropped,
            "dropped_qos0": self.drops.dropped_qos0,
            "buffered_bytes": self.buffers.bytes,
            "read_pauses": self.read_pauses,
            "stalled_disconnects": self.stalled_disconnects,
            "limits_exceeded": sum(self.limits_exceeded.values()),
            "rate_limited": self.limits_exceeded.get("publish_rate", 0),
            "auth_failures": self.gate.limiter.failures,
            "auth_rate_limited": self.gate.limiter.refused,
            "acl_denied_publish": self.acl_denied_publish,
            "acl_denied_subscribe": self.acl_denied_subscribe,
            "acl_denied_deliveries": self.router.denied + self.acl_denied_retained,
            "store_commits": writer.commits if writer is not None else 0,
            "store_writes": writer.ops_written if writer is not None else 0,
            "store_pending": writer.pending if writer is not None else 0,
            **self.shares.stats(),
        }

    def client_stats(self, client_id: str) -> dict[str, int | bool] | None:
        """Per-client counters: inflight, queued, queued_bytes, sent, dropped, ..."""
        session = self.sessions.get(client_id)
        if session is None:
            return None
        result = session.stats()
        conn = session.connection
        result["buffered_bytes"] = conn.outbox_bytes if conn is not None else 0
        return result


    def limit_exceeded(self, name: str) -> None:
        """Count a limit hit (read by stats()); the I/O layer reports its own."""
        self.limits_exceeded[name] = self.limits_exceeded.get(name, 0) + 1

    # -- restoring and closing ---------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Take the sessions (subscriptions, inflight, queues) and retained messages read
        back from the store; expiry timers for the 5.0 sessions that are away."""
        writer: Journal = self.writer  # type: ignore[assignment]
        trie = self.router.trie
        for row in snapshot.sessions.values():
            session = Session.restore(
                row, writer,
                page_size=self.config.persistence.queue_page_messages,
                **self._session_limits(row.client_id),
            )
            self.sessions[session.client_id] = session
            for topic_filter, qos in session.subscriptions.items():
                stored = session.sub_options.get(topic_filter)
                options = v5.options_from_byte(*stored) if stored else None
                if is_shared(topic_filter):
                    try:
                        self.shares.add(topic_filter, session, qos, options)
                    except InvalidTopic:
                        log.warning("session %s: ignoring stored subscription %r",
                                    session.client_id, topic_filter)
                else:
                    trie.add(topic_filter, session.client_id, session, qos, options)
        for topic, payload, qos, props, expires_at in snapshot.retained:
            self.retained.set(
                topic, v5.restored_message(topic, payload, qos, True, props, expires_at)
            )
        writer.next_message_id = snapshot.next_message_id
        for session in self.sessions.values():  # 5.0 expiry intervals run on a timer
            if session.expiry_s and session.expiry_s > 0 and session.disconnected_at:
                self.call_at(session.disconnected_at + session.expiry_s, self.expire_sessions)

    def close_all_connections(self, reason: MQTTError) -> None:
        """Server shutdown: publish the wills of connected clients (as mosquitto does at
        exit), then close every connection after flushing what is queued for it."""
        wills = [will for _when, will in self._delayed_wills.values()]
        self._delayed_wills.clear()
        for conn in list(self.connections):
            if conn.will is not None:
                wills.append(conn.will)
                conn.will = None
        for will in wills:
            self._publish_will(will)
        for conn in list(self.connections):
            conn.close(reason, flush=conn.session is not None)


    # -- what the service provides (no-ops for an engine driven without I/O) ---------------

    def notify_progress(self) -> None:
        """Output was sent or a commit finished: paused readers look again."""

    def timers_changed(self) -> None:
        """A timer was scheduled before every other one: the timer loop must wake up."""

    def reload(self) -> bool:
        """Re-read the security files (the service re-reads TLS certificates too)."""
        return self.reload_security()
