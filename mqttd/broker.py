"""The broker: sessions, routing, retained messages and wills, composed.

``Broker`` handles decoded packets synchronously for a :class:`Connection` (no I/O,
no ``await``); ``Broker.serve`` runs it on the network (``mqttd.server``) inside the
caller's nursery and reports the bound addresses::

    broker = Broker(config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(broker.serve)
        ...
        broker.shutdown()          # ordered: listeners, wills, connections, storage

or ``async with mqttd.broker.running(config) as broker: broker.port``.

Security: every CONNECT passes the :class:`~mqttd.auth.Gatekeeper` (failed-login limit,
anonymous access per listener, the password file or the program's ``authenticator``; slow
password hashes are checked in a worker thread while the connection waits). With an ACL
(``security.acl_file`` or the program's ``authorizer``), PUBLISH without write access is
dropped (and still acknowledged), SUBSCRIBE without read access gets 0x80, and deliveries,
retained ones included, go only to sessions allowed to read the topic. ``reload()`` re-reads
both files (SIGHUP).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import attrs
import trio

from mqttd import enhanced_auth, v5
from mqttd.acl import AclFile, CachedAuthorizer
from mqttd.auth import (
    Authenticator,
    Authorizer,
    Gatekeeper,
    LoginRateLimiter,
    PasswordFile,
    SecurityFileError,
)
from mqttd.bridge import BRIDGE_PREFIX, Bridges
from mqttd.codec import (
    ClientIdRejected,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
)
from mqttd.codec.errors import (
    NotAuthorized,
    ReceiveMaximumExceeded,
    ServerBusy,
    SessionTakenOver,
)
from mqttd.codec.packets import (
    AUTH,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PROTOCOL_5,
    PROTOCOL_31,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
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
    Will,
)
from mqttd.codec.reason import SUBACK_FAILURE
from mqttd.config import Config, Listener
from mqttd.protocol import BufferAccount, Connection
from mqttd.retained import RetainedStore
from mqttd.router import Router
from mqttd.session import DropCounters, Session
from mqttd.shared import ShareGroups, is_shared, parse_shared
from mqttd.topics import InvalidTopic, validate_topic_filter
from persistence import ops
from persistence.store import MEMORY, Snapshot, SqliteStore
from persistence.writer import GroupCommitWriter

log = logging.getLogger(__name__)

MAX_QOS = 2
BRIDGE_FLAG = 0x80
DISCONNECT_WITH_WILL = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
SUBACK_NOT_AUTHORIZED = 0x87
TOPIC_FILTER_INVALID = 0x8F
QUOTA_EXCEEDED = 0x97
PUBLISH_NOT_AUTHORIZED = 0x87
SHUTDOWN_FLUSH_TIMEOUT_S = 5.0
DENIED_LOG_INTERVAL_S = 10.0  # at most one log line per interval for ACL refusals


@attrs.define(eq=False)
class Broker:
    config: Config = attrs.Factory(Config)
    sessions: dict[str, Session] = attrs.Factory(dict)
    router: Router = attrs.Factory(Router)
    retained: RetainedStore = attrs.Factory(RetainedStore)
    connections: set[Connection] = attrs.Factory(set)
    addresses: list[tuple[str, int]] = attrs.Factory(list)
    _shutdown_requested: trio.Event = attrs.Factory(trio.Event)
    # the store's group-commit writer; None until serve() opens the store (or when the
    # broker is driven without I/O, in which case nothing is persisted)
    writer: GroupCommitWriter | None = None
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
    _progress: trio.Event = attrs.Factory(trio.Event)
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
    # that arrived meanwhile; the services nursery runs those checks (while serving)
    _parked: dict[Connection, list[Packet]] = attrs.field(init=False, factory=dict)
    _services: trio.Nursery | None = attrs.field(init=False, default=None)
    # 5.0 wills waiting for their delay: client id -> (when, will)
    _delayed_wills: dict[str, tuple[float, Will]] = attrs.field(init=False, factory=dict)
    _timers: list[tuple[float, int, Callable[[], object]]] = attrs.field(
        init=False, factory=list
    )
    _timer_seq: int = attrs.field(init=False, default=0)
    _timer_wakeup: trio.Event = attrs.field(init=False, factory=trio.Event)
    bridges: Bridges | None = attrs.field(init=False, default=None)  # while serving
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

    @property
    def port(self) -> int:
        """The port of the first listener (useful with port 0)."""
        return self.addresses[0][1]

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
        for packet in packets:
            if conn.closing:
                return
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
                conn.send(ConnAck(False, code, props).encode(PROTOCOL_5))
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

    def _will_due(self, session: Session, will: Will, session_ended: bool) -> None:
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

    def _delayed_will(self, client_id: str, entry: tuple[float, Will]) -> None:
        if self._delayed_wills.get(client_id) is entry:
            del self._delayed_wills[client_id]
            self._publish_will(entry[1])

    def call_at(self, when: float, callback: Callable[[], object]) -> None:
        """Run ``callback`` at ``when`` (epoch seconds) in the timer service (while serving)."""
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, callback))
        if self._timers[0][2] is callback:
            self._timer_wakeup.set()

    async def _timer_loop(self) -> None:
        timers = self._timers
        while True:
            now = time.time()
            while timers and timers[0][0] <= now:
                heapq.heappop(timers)[2]()
            self._timer_wakeup = trio.Event()
            with trio.move_on_after(timers[0][0] - now if timers else math.inf):
                await self._timer_wakeup.wait()

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

    def _reply(self, conn: Connection, data: bytes, ticket_before: int) -> None:
        """Send a reply that acknowledges state: at once if handling the packet wrote
        nothing to the store, else after the commit that holds it. Replies on one
        connection keep their order."""
        writer = self.writer
        if writer is None or (writer.ticket == ticket_before and not conn.deferred):
            conn.send(data)
        else:
            conn.defer(writer.ticket, data)
            if data[0] == 0x40:
                conn.qos1_unacked += 1  # until its PUBACK is sent (5.0 Receive Maximum)
            self._awaiting_commit.add(conn)

    def reply_after_commit(self, conn: Connection, data: bytes, ticket_before: int) -> None:
        """``_reply`` for the bridges' remote connections."""
        self._reply(conn, data, ticket_before)

    def forget_connection(self, conn: Connection) -> None:
        """A bridge's remote connection is gone: hold no replies for it."""
        self._awaiting_commit.discard(conn)

    def ticket(self) -> int:
        """The store writer's ticket now (0 without a store): compare after handling a
        packet to know whether it wrote anything."""
        return self.writer.ticket if self.writer is not None else 0

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

    async def wait_readable(self, conn: Connection) -> None:
        self.read_pauses += 1
        self.paused_readers += 1
        timeout_s = self.config.limits.stalled_output_timeout_s
        try:
            while self.reading_paused(conn) and not conn.closing:
                with trio.move_on_after(timeout_s):
                    await self._progress.wait()
                    continue
                self.disconnect_stalled_clients(trio.current_time())
        finally:
            self.paused_readers -= 1

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

    def notify_progress(self) -> None:
        """Output was sent or a commit finished: paused readers look again."""
        if self.paused_readers:
            self._progress.set()
            self._progress = trio.Event()

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
            "bridges_connected": sum(
                link.state == "connected" for link in (self.bridges.links if self.bridges else ())
            ),
        }

    def bridge_stats(self) -> list[dict[str, Any]]:
        """Per bridge: state, connects, forwarded, received, queued, last error, ..."""
        return self.bridges.stats() if self.bridges is not None else []

    def client_stats(self, client_id: str) -> dict[str, int | bool] | None:
        """Per-client counters: inflight, queued, queued_bytes, sent, dropped, ..."""
        session = self.sessions.get(client_id)
        if session is None:
            return None
        result = session.stats()
        conn = session.connection
        result["buffered_bytes"] = conn.outbox_bytes if conn is not None else 0
        return result

    def _session_limits(self, client_id: str) -> dict[str, Any]:
        limits = self.config.limits_for(client_id)
        return {
            "max_inflight": limits.max_inflight_messages,
            "max_queued": limits.max_queued_messages,
            "max_queued_bytes": limits.max_queued_bytes,
            "overflow_policy": limits.overflow_policy,
            "qos0_buffer_bytes": self.config.limits.qos0_buffer_bytes,
            "counters": self.drops,
        }


    def _publish_will(self, will: Will) -> None:
        self.publish(v5.will_message(will, time.time()))

    # -- packet handlers -------------------------------------------------------------

    def _on_connect(self, conn: Connection, packet: Connect) -> None:
        level = packet.protocol_level
        # a bridge announces itself with level | 0x80 (mosquitto's try_private): it does
        # not get its own messages back
        conn.is_bridge = bool(level & BRIDGE_FLAG)
        conn.protocol_level = level & ~BRIDGE_FLAG
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

    def _accept(self, conn: Connection, packet: Connect, username: str | None) -> None:
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
        self._delayed_wills.pop(client_id, None)  # back in time: its will is not sent
        session = self.sessions.get(client_id)
        if session is not None and session.connection is not None:
            self._take_over(session.connection)
        if session is not None and (packet.clean_session or not session.persistent):
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

    # -- authentication -------------------------------------------------------------------

    def _login(self, conn: Connection, packet: Connect) -> tuple[bool, str | None]:
        """Authenticate a CONNECT (see Gatekeeper). Returns (True, user name) when the client
        may go on; (False, user name) when its password is being checked in a worker thread
        (the connection is parked until then). Raises NotAuthorized (CONNACK 0x05) or
        BadUserNameOrPassword (0x04)."""
        if not self._security_loaded:
            self.load_security()
        services = self._services
        ready, username = self.gate.login(conn, packet, may_defer=services is not None)
        if not ready:
            self._parked[conn] = []
            deadline = trio.current_time() + self.config.limits.connect_timeout_s
            services.start_soon(  # type: ignore[union-attr]
                self._login_in_thread, conn, packet, cast(str, username), deadline
            )
        return ready, username

    async def _login_in_thread(
        self, conn: Connection, packet: Connect, username: str, deadline: float
    ) -> None:
        error = await self.gate.check_in_thread(
            conn, packet, username, deadline,
            wanted=lambda: not conn.closing and conn in self._parked,
        )
        self._login_done(conn, packet, username, error)

    def _login_done(
        self, conn: Connection, packet: Connect, username: str, error: MQTTError | None
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

    # -- security files -------------------------------------------------------------------

    def load_security(self) -> None:
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

    def _set_authorizer(self, authorizer: Authorizer | None) -> None:
        self.authorizer = authorizer
        self._acl = CachedAuthorizer(authorizer) if authorizer is not None else None
        self.router.authorizer = self._acl
        self.router.acl_changed()

    def reload(self) -> bool:
        """Re-read the password file and the ACL file (SIGHUP). A file that cannot be read
        or parsed is reported and the one in use is kept. Connected clients stay connected;
        the new ACL applies to their next publish, subscribe and delivery. Cached ACL
        answers are dropped (also for an authorizer given by the program, so it can change
        its policy and call reload). TLS listeners re-read their certificate files too.
        Returns True when everything was reloaded."""
        from mqttd.server.tcp import TCPServer

        server = TCPServer.running_for(self)
        certificates_ok = server.reload_certificates() if server is not None else True
        if not self._security_loaded:
            try:
                self.load_security()
            except SecurityFileError as exc:
                log.error("reload: %s", exc)
                return False
            return certificates_ok
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
        return ok and certificates_ok

    def _log_denied(self, conn: Connection, what: str) -> None:
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

    def _take_over(self, old: Connection) -> None:
        """A second connection with the same client id: close the first. Its will is
        published (it did not send DISCONNECT; MQTT-3.1.2-8, as mosquitto does)."""
        log.info("client %s: taken over by a new connection; closing the old one", old.name)
        session = old.session
        will, old.will = old.will, None
        old.session = None
        if session is not None:
            self._detach(session)
        old.close(SessionTakenOver("session taken over by a new connection"))
        if will is not None and not (will.properties or {}).get("will_delay_interval"):
            self._publish_will(will)  # a delayed will is cancelled: the client is back

    def _detach(self, session: Session) -> None:
        """The session's connection is gone: hand what it holds from shared subscriptions
        to other members of their groups, then mark it offline."""
        shared = self._has_shared(session)
        taken = session.take_shared() if shared else []
        session.detach()
        self._session_offline(session)
        if taken:
            self.shares.hand_on(session, taken)

    @staticmethod
    def _has_shared(session: Session) -> bool:
        return any(is_shared(f) for f in session.subscriptions)

    def _add_subscription(
        self, session: Session, topic_filter: str, qos: int,
        options: v5.SubOptions | None = None,
    ) -> None:
        session.subscriptions[topic_filter] = qos
        if is_shared(topic_filter):
            self.shares.add(topic_filter, session, qos, options)
        else:
            self.router.trie.add(topic_filter, session.client_id, session, qos, options)

    def _remove_subscription(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        if is_shared(topic_filter):
            self.shares.remove(topic_filter, session.client_id)
        else:
            self.router.trie.remove(topic_filter, session.client_id)
        return True

    def _discard_session(self, session: Session) -> None:
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

    def _session_offline(self, session: Session) -> None:
        now = time.time()
        session.disconnected_at = now
        if session.writer is not None and not session.discarded:
            session.writer.submit(ops.SaveSession(session.client_id, now))

    def expire_sessions(self, now: float | None = None) -> int:
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

    def _topic_limit_problem(self, topic: str) -> str | None:
        """Why ``topic`` (a name or a filter) exceeds the configured size limits, if it does."""
        limits = self.config.limits
        max_bytes = limits.max_topic_length_bytes
        if len(topic) * 4 > max_bytes and len(topic.encode()) > max_bytes:
            return f"topic longer than max_topic_length_bytes ({max_bytes})"
        max_levels = limits.max_topic_levels
        if 0 < max_levels <= topic.count("/"):
            return f"topic with more than max_topic_levels ({max_levels}) levels"
        return None

    def limit_exceeded(self, name: str) -> None:
        """Count a limit hit (read by stats()); the I/O layer reports its own."""
        self.limits_exceeded[name] = self.limits_exceeded.get(name, 0) + 1

    def _on_publish(self, conn: Connection, packet: Publish) -> None:
        self.messages_received += 1
        v5_client = conn.protocol_level == PROTOCOL_5
        session: Session = conn.session  # type: ignore[assignment]
        qos = packet.qos
        if v5_client:
            if packet.properties or not packet.topic:
                packet = v5.inbound(conn, packet, time.time())
            if qos and conn.qos1_unacked + len(session.inbound_qos2) >= self._receive_maximum:
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
        before = self.ticket()
        if qos == 1:
            routed = self.publish(packet, session, bridge)
            if v5_client and not routed:
                self._reply(conn, _ack(0x40, packet_id, NO_MATCHING_SUBSCRIBERS,
                                       conn.problem_information), before)
            else:
                self._reply(conn, bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF)), before)
            return
        code = 0
        if packet_id not in session.inbound_qos2:  # exactly once: route on first receipt only
            if len(session.inbound_qos2) >= self.config.limits.max_inbound_qos2:
                self.limit_exceeded("inbound_qos2")
                if v5_client:  # 5.0 can refuse this one message: PUBREC Quota exceeded
                    self._reply(conn, _ack(0x50, packet_id, QUOTA_EXCEEDED,
                                           conn.problem_information), before)
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
        self._reply(conn, _ack(0x50, packet_id, code, conn.problem_information), before)

    def _publish_denied(self, conn: Connection, packet: Publish) -> None:
        """No write access: drop the message. MQTT 3.1.1 has no way to say so; QoS 1/2 are
        still acknowledged so that the client does not send them again. 5.0 says so:
        PUBACK / PUBREC 0x87 Not authorized."""
        self.acl_denied_publish += 1
        self._log_denied(conn, f"PUBLISH to {packet.topic!r} (dropped)")
        packet_id = packet.packet_id
        code = PUBLISH_NOT_AUTHORIZED if conn.protocol_level == PROTOCOL_5 else 0
        text = conn.problem_information
        if packet.qos == 1:
            self._reply(conn, _ack(0x40, packet_id, code, text), self.ticket())
        elif packet.qos == 2:
            self._reply(conn, _ack(0x50, packet_id, code, text), self.ticket())

    def _on_puback(self, conn: Connection, packet: PubAck) -> None:
        if not conn.session.on_puback(packet.packet_id):  # type: ignore[union-attr]
            log.debug("client %s: PUBACK for unknown packet id %d", conn.name, packet.packet_id)

    def _on_pubrec(self, conn: Connection, packet: PubRec) -> None:
        if not conn.session.on_pubrec(packet.packet_id):  # type: ignore[union-attr]
            log.debug("client %s: PUBREC for unknown packet id %d", conn.name, packet.packet_id)
        conn.send_packet(PubRel(packet.packet_id))

    def _on_pubrel(self, conn: Connection, packet: PubRel) -> None:
        session: Session = conn.session  # type: ignore[assignment]
        before = self.ticket()
        if packet.packet_id in session.inbound_qos2:
            session.inbound_qos2.discard(packet.packet_id)
            if session.writer is not None:
                session.writer.submit(ops.RemoveInbound(session.client_id, packet.packet_id))
        self._reply(conn, PubComp(packet.packet_id).encode(), before)

    def _on_pubcomp(self, conn: Connection, packet: PubComp) -> None:
        if not conn.session.on_pubcomp(packet.packet_id):  # type: ignore[union-attr]
            log.debug("client %s: PUBCOMP for unknown packet id %d", conn.name, packet.packet_id)

    def _on_subscribe(self, conn: Connection, packet: Subscribe) -> None:
        session: Session = conn.session  # type: ignore[assignment]
        before = self.ticket()
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
        self._reply(conn, SubAck(packet.packet_id, tuple(codes)).encode(level), before)
        for message, qos, ids in retained:
            session.deliver(message, qos, True, None, None, ids)

    def _on_unsubscribe(self, conn: Connection, packet: Unsubscribe) -> None:
        session: Session = conn.session  # type: ignore[assignment]
        before = self.ticket()
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
        self._reply(conn, UnsubAck(packet.packet_id, tuple(codes)).encode(level), before)

    def _on_pingreq(self, conn: Connection, packet: PingReq) -> None:
        conn.send(b"\xd0\x00")

    def _on_disconnect(self, conn: Connection, packet: Disconnect) -> None:
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
            if packet.reason_code == DISCONNECT_WITH_WILL:
                conn.close()  # the will is published as if the connection had failed
                return
        conn.will = None  # a clean DISCONNECT discards the will (MQTT-3.14.4-3)
        conn.close()

    def _on_auth(self, conn: Connection, packet: Auth) -> None:
        enhanced_auth.on_auth(self, conn, packet)

    def park(self, conn: Connection) -> None:
        """Hold the packets of a connection whose CONNECT is not decided yet."""
        self._parked.setdefault(conn, [])

    def unpark(self, conn: Connection, packet: Connect) -> bool:
        """Enhanced authentication accepted a parked connection: accept it and handle what
        arrived meanwhile. False if it was not parked (the caller accepts it)."""
        pending = self._parked.pop(conn, None)
        if pending is None:
            return False
        self._accept(conn, packet, packet.username)
        self._dispatch(conn, pending)
        return True

    # -- running -----------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every configured listener and serve until :meth:`shutdown`.
        Reports the bound ``[(host, port), ...]`` through ``task_status``."""
        from mqttd.server.tcp import TCPServer  # the composition root knows the I/O layer

        if self.writer is None:
            await trio.to_thread.run_sync(self.open_store)
        if not self._security_loaded:
            self.load_security()
        writer: GroupCommitWriter = self.writer  # type: ignore[assignment]
        server = TCPServer(self)
        bridges = self.bridges = Bridges(self)
        bridges.setup()  # before clients connect, so that nothing for a bridge is missed
        try:
            async with trio.open_nursery() as services:
                self._services = services  # runs the password checks in worker threads
                await services.start(writer.run)
                services.start_soon(self._expiry_loop)
                services.start_soon(self._timer_loop)
                self.addresses = await services.start(server.serve)
                await services.start(bridges.run)
                task_status.started(self.addresses)
                await self._shutdown_requested.wait()
                log.info("shutting down: %d connections", len(self.connections))
                await server.shutdown(SHUTDOWN_FLUSH_TIMEOUT_S)
                await bridges.stop()  # after the wills, which may be bridged
                await writer.flush()  # storage last: everything the connections left
                log.info(
                    "store flushed: %d commits, %d writes", writer.commits, writer.ops_written
                )
                services.cancel_scope.cancel()
        finally:
            self._services = None
            with trio.CancelScope(shield=True):
                await writer.aclose()
        log.info("mqttd stopped")

    def open_store(self) -> None:
        """Open the database (moving a corrupt one aside) and restore sessions,
        subscriptions, inflight and queued messages and retained messages from it. Loads the
        password and ACL files too (SecurityFileError if one is unusable)."""
        if not self._security_loaded:
            self.load_security()
        cfg = self.config.persistence
        path = MEMORY if cfg.in_memory else str(cfg.db_path())
        store = SqliteStore.open(path, cfg.durability)
        snapshot = store.load(time.time(), cfg.session_expiry_s)
        self.writer = GroupCommitWriter(store, cfg.max_pending_writes)
        self.writer.on_commit = self._on_commit
        self._restore(snapshot)
        log.info(
            "store %s: restored %d sessions (%d subscriptions, %d inflight, %d queued), "
            "%d retained messages; %d expired sessions deleted",
            path, len(snapshot.sessions),
            sum(len(s.subscriptions) for s in snapshot.sessions.values()),
            sum(len(s.inflight) for s in snapshot.sessions.values()),
            sum(s.queued for s in snapshot.sessions.values()),
            len(snapshot.retained), len(snapshot.expired),
        )

    def _restore(self, snapshot: Snapshot) -> None:
        writer: GroupCommitWriter = self.writer  # type: ignore[assignment]
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

    async def _expiry_loop(self) -> None:
        interval_s = self.config.persistence.expiry_check_interval_s
        while True:
            await trio.sleep(interval_s)
            self.expire_sessions()

    def shutdown(self) -> None:
        """Ask :meth:`serve` to stop: listeners first, then connections (with a deadline)."""
        self._shutdown_requested.set()

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


_REASON_STRINGS = {
    NO_MATCHING_SUBSCRIBERS: "no matching subscribers",
    PUBLISH_NOT_AUTHORIZED: "not authorized to publish to this topic",
    QUOTA_EXCEEDED: "too many QoS 2 messages awaiting PUBREL",
}


def _ack(first: int, packet_id: int, code: int, reason_string: bool = False) -> bytes:
    """PUBACK (0x40) / PUBREC (0x50) with a 5.0 reason code (none when it is 0), and its
    reason string when the client asked for problem information."""
    if code:
        if reason_string:
            text = _REASON_STRINGS[code].encode()
            props = bytes((len(text) + 3, 0x1F)) + len(text).to_bytes(2, "big") + text
            body = bytes((packet_id >> 8, packet_id & 0xFF, code)) + props
            return bytes((first, len(body))) + body
        return bytes((first, 3, packet_id >> 8, packet_id & 0xFF, code))
    return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))


@asynccontextmanager
async def running(config: Config | None = None, **options: Any) -> AsyncIterator[Broker]:
    """Run a broker for the duration of the block; ``broker.port`` is the bound port.
    ``options`` go to :class:`Broker` (e.g. ``authenticator=``, ``authorizer=``)."""
    broker = Broker(config if config is not None else Config(), **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        try:
            yield broker
        finally:
            broker.shutdown()
