"""The broker's state, and the services every packet handler uses: routing a message (with
its retained copy), replies that wait for the store, timers, limits, ACL log lines.

The handlers are functions over a :class:`BrokerState` in the modules beside this one
(connect, sessions, wills, security_files, publish, subscribe); :class:`mqttd.engine.dispatch.
Engine` is the state with the dispatch table, and :class:`mqttd.service.Broker` runs it with
trio. Nothing here imports trio or a module above it; what only the layers above can do (wake
a timer loop, wake paused readers, check a password in a thread) is asked through the hooks
at the end of the class."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from mqttd import enhanced_auth, v5
from mqttd.acl import CachedAuthorizer
from mqttd.codec import MQTTError, PacketTooLarge
from mqttd.codec.packets import PROTOCOL_5, ConnAck, Packet, Publish, Will
from mqttd.config import Config
from mqttd.connection import BufferAccount, Connection
from mqttd.delayed import DelayedQueue
from mqttd.engine.flow import Pacing, gate
from mqttd.engine.timers import TimerQueue
from mqttd.outqueue import DropCounters, QueueLimits
from mqttd.retained import RetainedStore
from mqttd.router import Router
from mqttd.security.gatekeeper import Gatekeeper, LoginRateLimiter
from mqttd.security.hooks import Authenticator, Authorizer
from mqttd.session import Session
from mqttd.share_groups import ShareGroups
from mqttd.workqueues import WorkQueues
from persistence import ops
from persistence.journal import Journal

log = logging.getLogger("mqttd.broker")  # one logger for the engine's modules

DENIED_LOG_INTERVAL_S = 10.0  # at most one log line per interval for ACL refusals


class ClusterLink(Protocol):
    """Cluster mode's hook (mqttd.clustering): every message this node accepts is
    published through it (exported to the other nodes, then routed here; synchronously,
    no await); while ``congested`` clients are not read. A CONNECT's client id is claimed
    cluster-wide (``claim`` parks the connection and ends in ``connect.claim_done``), and
    its persistent sessions are made by ``new_session``. ``will_set`` (every accepted
    client, with its will or None) and ``will_settled`` (the will published here,
    discarded or cancelled) keep the wills where the other nodes find them if this node
    dies."""

    @property
    def congested(self) -> bool: ...

    def publish(self, message: Publish, publisher: Session | None, bridge: bool) -> int: ...

    def claim(self, conn: Connection, packet: Any, username: str | None, persistent: bool,
              expiry_s: int | None) -> None: ...

    def new_session(self, client_id: str, **limits: Any) -> Session: ...

    def will_set(self, client_id: str, will: Will | None, username: str | None,
                 session: Session, clean_start: bool) -> None: ...

    def will_settled(self, client_id: str) -> None: ...


@attrs.define(eq=False)
class BrokerState:
    config: Config = attrs.Factory(Config)
    sessions: dict[str, Session] = attrs.Factory(dict)
    router: Router = attrs.Factory(Router)
    retained: RetainedStore = attrs.Factory(RetainedStore)
    connections: set[Connection] = attrs.Factory(set)
    # the store's group-commit writer; None until the service opens the store (or when the
    # engine is driven without I/O, in which case nothing is persisted)
    writer: Journal | None = None
    awaiting_commit: set[Connection] = attrs.Factory(set)  # they hold deferred replies
    buffers: BufferAccount = attrs.Factory(BufferAccount)
    drops: DropCounters = attrs.Factory(DropCounters)
    paused_readers: int = 0
    flow: Pacing = attrs.field(init=False)  # publishers paced by their subscribers
    # whether the store has room for new data (the writer says when not: disk full, the
    # disk budget or the free-space reserve reached); 3.1.1 publishers of messages that
    # need storing are held at ``store_gate`` meanwhile
    storage_ok: bool = True
    store_gate: Connection = attrs.field(init=False)
    limits_exceeded: dict[str, int] = attrs.Factory(dict)
    check_topic_limits: bool = attrs.field(init=False)
    publish_rate: float = attrs.field(init=False)  # per client per second; 0: no limit
    refuse_over_rate: bool = attrs.field(init=False)  # 5.0: 0x97 rather than a pause
    receive_maximum: int = attrs.field(init=False)  # 5.0, announced in CONNACK
    read_pauses: int = 0
    stalled_disconnects: int = 0
    # session_limits() by persistence, while no client_overrides make them per client id
    _session_limits: dict[bool, dict[str, Any]] = attrs.field(init=False, factory=dict)
    shares: ShareGroups = attrs.field(init=False)  # $share/<group>/<filter> subscriptions
    work_queues: WorkQueues = attrs.field(init=False)  # what groups do with their jobs
    delayed: DelayedQueue = attrs.field(init=False)  # $delayed/<seconds>/<topic>
    internal_subscriptions: int = attrs.field(init=False, default=0)  # in the trie (delayed)
    # security: hooks given by an embedding program win over the configured files; the
    # files are loaded by load_security() (at open_store, or at the first CONNECT)
    authenticator: Authenticator | None = None
    authorizer: Authorizer | None = None
    enhanced_authenticator: enhanced_auth.EnhancedAuthenticator | None = None  # 5.0 AUTH
    gate: Gatekeeper = attrs.field(init=False)
    acl: CachedAuthorizer | None = attrs.field(init=False, default=None)
    security_loaded: bool = attrs.field(init=False, default=False)
    password_file_used: bool = attrs.field(init=False, default=False)
    acl_file_used: bool = attrs.field(init=False, default=False)
    # connections whose CONNECT is not decided yet (a password checked in a worker thread,
    # an enhanced authentication going on), with the packets that arrived meanwhile
    parked: dict[Connection, list[Packet]] = attrs.field(init=False, factory=dict)
    # set by the service while serving: runs a slow password check (in a worker thread)
    # and answers with connect.login_done; None: every check runs at once
    login_checks: Callable[[Connection, Any, str], None] | None = attrs.field(
        init=False, default=None
    )
    # 5.0 wills waiting for their delay: client id -> (when, will)
    delayed_wills: dict[str, tuple[float, Will]] = attrs.field(init=False, factory=dict)
    timers: TimerQueue = attrs.field(init=False, factory=TimerQueue)
    # the journal's ticket when the packet being handled began (see begin_packet, reply)
    packet_ticket: int = attrs.field(init=False, default=0)
    next_denied_log: float = attrs.field(init=False, default=0.0)
    # cluster mode: where accepted messages go to reach the other nodes (None: one node)
    cluster: ClusterLink | None = attrs.field(init=False, default=None)
    # counters
    connections_total: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    sent_by_ended_sessions: int = 0  # messages sent to sessions that are gone
    sessions_expired: int = 0
    storage_refused: int = 0  # 5.0 PUBLISHes refused (Quota exceeded): no room to store
    storage_holds: int = 0  # 3.1.1 publishers held: no room to store their message
    rate_refused: int = 0  # 5.0 PUBLISHes refused over the publish rate (over_publish_rate)
    acl_denied_publish: int = 0
    acl_denied_subscribe: int = 0
    acl_denied_retained: int = 0

    def __attrs_post_init__(self) -> None:
        limits = self.config.limits
        self.gate = Gatekeeper(
            LoginRateLimiter(self.config.security.max_login_failures_per_minute)
        )
        self.check_topic_limits = (
            limits.max_topic_length_bytes < 65535 or limits.max_topic_levels > 0
        )
        self.publish_rate = max(0.0, limits.max_publish_rate_per_s)
        self.refuse_over_rate = limits.over_publish_rate == "refuse"
        self.receive_maximum = min(limits.max_receive_messages, 65535)
        self.shares = ShareGroups(self.router.trie)
        self.work_queues = WorkQueues(self, self.shares, self.config.work_queues)
        self.delayed = DelayedQueue(self, self.config.delayed, self.drops)
        self.internal_subscriptions = self.delayed.install(self.router.trie)
        self.flow = Pacing(limits.stalled_output_timeout_s, self.notify_progress)
        self.store_gate = gate(Connection(peer="storage", client_id="(store)"))

    # -- messages --------------------------------------------------------------------

    def publish(
        self, message: Publish, publisher: Session | None = None, bridge: bool = False
    ) -> int:
        """Store (if retained) and route a message; returns the number of deliveries.
        ``publisher``: the publishing session (5.0 No Local; with ``bridge`` it gets
        nothing back at all)."""
        if message.retain and not self.delayed.handles(message.topic):
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
        cluster = self.cluster
        if cluster is not None:  # to the other nodes (after the store op: see clustering)
            return cluster.publish(message, publisher, bridge)
        return self.router.route(message, publisher, bridge)

    def publish_sys(self, topic: str, payload: bytes) -> None:
        """A ``$SYS`` value: retained (in memory only, never stored) and routed, QoS 0."""
        message = Publish(topic, payload, 0, True)
        self.retained.set(topic, message)
        self.router.route(message)

    def bridge_stats(self) -> list[dict[str, Any]]:
        """Per bridge (the service has them): state, forwarded, queued, ..."""
        return []

    def not_ready(self) -> list[str]:
        """Why the broker cannot serve now (empty when it can; the service knows)."""
        return []

    def cluster_nodes(self) -> dict[str, bool]:
        """Cluster mode: every node known and whether it is up (the service knows)."""
        return {}

    def cluster_overview(self) -> dict[str, Any] | None:
        """Cluster mode: every node known with its last heartbeat's counters, and the
        totals (mqttd.cluster_view.overview; the service knows); None on a single node."""
        return None

    def needs_store(self, message: Publish, publisher: Session) -> bool:
        """Whether accepting this QoS 1/2 message writes to the store: it is retained, it
        is QoS 2 from a persistent session (its packet id is kept), or it reaches a
        persistent session, a consumer group or a bridge."""
        if message.retain or (message.qos == 2 and publisher.writer is not None):
            return True
        return any(
            not isinstance(target[0], Session) or target[0].writer is not None
            for target in self.router.trie.match(message.topic)
        )

    def storage_changed(self, accepting: bool, why: str) -> None:
        """The writer found the store short of room, or with room again (see
        persistence.writer): held publishers go on once there is room."""
        self.storage_ok = accepting
        if accepting:
            self.flow.release(self.store_gate)

    # -- replies ---------------------------------------------------------------------

    def begin_packet(self) -> None:
        """Handling of one packet starts (the dispatcher calls this for clients, a bridge's
        link for the packets of its remote): what it writes from now on, its reply waits for."""
        writer = self.writer
        if writer is not None:
            self.packet_ticket = writer.ticket

    def reply(self, conn: Connection, data: bytes, *, puback: bool = False) -> None:
        """The one rule of durable replies: a reply that acknowledges state (PUBACK, PUBREC,
        PUBCOMP, SUBACK, UNSUBACK, and PINGRESP to keep its place) goes at once if handling
        its packet wrote nothing to the store, else after the commit of everything submitted
        so far, which holds what the packet wrote. Replies on one connection keep their
        order: once one waits, those after it wait too. ``puback``: the PUBACK of a QoS 1
        PUBLISH, which counts against the 5.0 Receive Maximum until it is sent."""
        writer = self.writer
        if writer is None or (writer.ticket == self.packet_ticket and not conn.deferred):
            conn.send(data)
        else:
            conn.defer(writer.ticket, data, puback)
            if puback:
                conn.qos1_unacked += 1
            self.awaiting_commit.add(conn)

    def protocol_error(self, conn: Connection, exc: MQTTError) -> None:
        """Answer a protocol error the way the protocol version allows, then close.
        Replies already queued for the packets before the bad one are sent first."""
        hint = ""
        if isinstance(exc, PacketTooLarge):
            self.limit_exceeded("packet_size")
            hint = (" (for large payloads, publish a claim check, a reference to the file "
                    "stored elsewhere: README.md, 'Large payloads')")
        log.warning("client %s: %s (%s); closing%s", conn.name, exc, type(exc).__name__, hint)
        if conn.session is None:
            if conn.protocol_level == PROTOCOL_5:
                code = exc.reason_code if exc.reason_code >= 0x80 else 0x80
                props = {"reason_string": str(exc)[:200]} if str(exc) else None
                conn.send(conn.fit(ConnAck(False, code, props), ConnAck(False, code)))
            elif exc.connack_code is not None:
                conn.send_packet(ConnAck(False, exc.connack_code))
        conn.close(exc, flush=True)

    # -- limits and refusals -----------------------------------------------------------

    def limit_exceeded(self, name: str) -> None:
        """Count a limit hit (read by stats()); the I/O layer reports its own."""
        self.limits_exceeded[name] = self.limits_exceeded.get(name, 0) + 1

    def topic_limit_problem(self, topic: str) -> str | None:
        """Why ``topic`` (a name or a filter) exceeds the configured size limits, if it does."""
        limits = self.config.limits
        max_bytes = limits.max_topic_length_bytes
        if len(topic) * 4 > max_bytes and len(topic.encode()) > max_bytes:
            return f"topic longer than max_topic_length_bytes ({max_bytes})"
        max_levels = limits.max_topic_levels
        if 0 < max_levels <= topic.count("/"):
            return f"topic with more than max_topic_levels ({max_levels}) levels"
        return None

    def log_denied(self, conn: Connection, topic: str) -> None:
        """Log a PUBLISH the ACL refused, at most once per DENIED_LOG_INTERVAL_S (with the
        totals): a client may publish without end where it may not."""
        now = time.monotonic()
        if now >= self.next_denied_log:
            self.next_denied_log = now + DENIED_LOG_INTERVAL_S
            log.warning(
                "client %s: PUBLISH to %r denied by the ACL, dropped (denied so far: %d "
                "publishes, %d subscriptions; further denials are not logged for %.0fs)",
                conn.name, topic, self.acl_denied_publish, self.acl_denied_subscribe,
                DENIED_LOG_INTERVAL_S,
                extra={
                    "event": "publish_denied", "client_id": conn.client_id,
                    "address": conn.peer, "topic": topic,
                    "acl_denied_publish": self.acl_denied_publish,
                },
            )

    def session_limits(self, client_id: str, persistent: bool) -> dict[str, Any]:
        """The queue and window limits of a new or restored session of ``client_id``
        (shared: not to be changed)."""
        shared = not self.config.client_overrides
        if shared and (cached := self._session_limits.get(persistent)) is not None:
            return cached
        limits = self.config.limits_for(client_id, persistent)
        values = {
            "max_inflight": limits.max_inflight_messages,
            "queue_limits": QueueLimits(
                limits.max_queued_messages, limits.max_queued_bytes, limits.overflow_policy,
                self.config.persistence.queue_page_messages,
            ),
            "qos0_buffer_bytes": self.config.limits.qos0_buffer_bytes,
            "counters": self.drops,
        }
        if shared:
            self._session_limits[persistent] = values
        return values

    # -- timers ------------------------------------------------------------------------

    def call_at(self, when: float, callback: Callable[[], object]) -> None:
        """Run ``callback`` at ``when`` (epoch seconds), by the service's timer loop."""
        if self.timers.call_at(when, callback):
            self.timers_changed()

    # -- what the layers above provide (no-ops for a state driven without I/O) ---------

    def dispatch(self, conn: Connection, packets: list[Packet]) -> None:
        """Handle decoded packets of ``conn`` (the Engine's dispatch table)."""
        raise NotImplementedError

    def notify_progress(self) -> None:
        """Output was sent or a commit finished: paused readers look again."""

    def timers_changed(self) -> None:
        """A timer was scheduled before every other one: the timer loop must wake up."""
