"""One mqttd node of a cluster: the service that joins a broker to the others over NATS.

Live routing (core NATS, at most once between nodes):

* **Interest.** The subscription trie tells the node when a filter gets its first local
  subscriber and loses its last one (``filter_added`` / ``filter_removed``); the node holds
  one NATS subscription per distinct subject those filters need (refcounted: ``a/#`` and
  ``a`` share ``mqttd.t.a``). nats-server's interest propagation is then the route table:
  a message goes only to the nodes that want it.
* **Export.** Every PUBLISH this node accepts (clients, wills, bridges) is handed to
  :meth:`ClusterNode.export` synchronously by ``BrokerState.publish``: it builds one header
  block and appends one HPUB to the NATS client's output buffer (``publish_nowait``: no
  await, no task per message); the client's one writer task sends everything queued in one
  ``send_all``. When that buffer is full (``cluster.max_pending_bytes``, NATS slow or being
  reconnected to), messages wait in an overflow queue, in order, and ``congested`` makes
  the broker stop reading its clients (as it does when its store writer is behind) until a
  drain task has handed them on: nothing is dropped, the pauses are counted.
* **Import.** A message from NATS is decoded in the client's reader task and routed like a
  local publish (``router.route``: the local trie, min(publish QoS, granted QoS), shared
  ACL, No Local not applicable; shared groups get their copies from MQTTD_GQ instead) but
  never exported again, so there are no loops. A
  node does not receive its own messages (``echo`` off); each message carries
  ``<node> <boot> <seq>``, and a number already routed from that node is dropped, which
  routes a message matched by two of this node's subscriptions once.
* **Order.** One NATS connection and one writer per node, and per node one reader: what one
  client publishes reaches every other node in the order it was accepted.

Retained messages live in the stream MQTTD_RET (:mod:`mqttd.clustering.retained`); node
liveness in the bucket MQTTD_NODES (:mod:`mqttd.clustering.liveness`); the wills of the
clients connected here in the bucket MQTTD_WILLS, whence a surviving node publishes them if
this node dies (:mod:`mqttd.clustering.wills`); persistent sessions in MQTTD_SESS and
MQTTD_Q (:mod:`mqttd.clustering.sessions`); shared subscriptions span the nodes through the
stream MQTTD_GQ and the bucket MQTTD_GROUPS (:mod:`mqttd.clustering.groups`).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd.cluster.jetstream import JetStream
from mqttd.cluster.nats_client import NatsClient
from mqttd.cluster.nats_protocol import Msg
from mqttd.cluster.nats_values import (
    ClientClosedError,
    ClientOptions,
    NatsError,
    ServerAddress,
    Subscription,
)
from mqttd.clustering import subjects, wire
from mqttd.clustering.gate import CommitGate
from mqttd.clustering.groups import ClusterGroups
from mqttd.clustering.liveness import Liveness
from mqttd.clustering.pacing import RemotePacing
from mqttd.clustering.retained import RetainedSync
from mqttd.clustering.sessions import ROUTING_IMPORT, ROUTING_LOCAL, Claim, ClusterSessions
from mqttd.clustering.wills import ClusterWills
from mqttd.codec.errors import MQTTError, ServerUnavailable

if TYPE_CHECKING:
    from mqttd.codec.packets import Publish, Will
    from mqttd.config import Cluster
    from mqttd.connection import Connection
    from mqttd.engine.dispatch import Engine
    from mqttd.session import Session

log = logging.getLogger("mqttd.cluster")

SUBJECT_CACHE_SIZE = 16384  # topic -> subject, both ways; cleared when full
LOG_INTERVAL_S = 10.0  # at most one line per kind of problem per interval
STOP_TIMEOUT_S = 5.0  # at shutdown: what is queued for NATS, retained writes, farewell
CLAIM_TIMEOUT_FACTOR = 3  # times js_timeout_s: a claim takes a read, a kick and a write


@attrs.define(eq=False)
class _Throttled:
    """A warning logged at most once per LOG_INTERVAL_S, with how many were not logged."""

    next_at: float = 0.0
    skipped: int = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.skipped += 1
            return
        suffix = f" ({self.skipped} more like this not logged)" if self.skipped else ""
        log.warning(message + suffix, *args)
        self.next_at, self.skipped = now + LOG_INTERVAL_S, 0


@attrs.define(eq=False)
class ClusterNode:
    engine: Engine
    config: Cluster
    client: NatsClient
    node: str
    boot: int  # milliseconds since the epoch at start: a restarted node's are larger
    js: JetStream = attrs.field(init=False)
    gate: CommitGate = attrs.field(init=False)
    retained: RetainedSync = attrs.field(init=False)
    groups: ClusterGroups = attrs.field(init=False)  # shared subscriptions cluster-wide
    liveness: Liveness = attrs.field(init=False)
    sessions: ClusterSessions = attrs.field(init=False)
    pacing: RemotePacing = attrs.field(init=False)
    wills: ClusterWills = attrs.field(init=False)
    origin: str = attrs.field(init=False)  # "<node> <boot> ", the start of every Mqttd-Msg
    seq: int = 0  # the number of the last message exported
    streams_ready: bool = False
    setup_problem: str | None = None
    _subjects: dict[str, str] = attrs.Factory(dict)  # topic -> live subject
    _topics: dict[str, str] = attrs.Factory(dict)  # live subject -> topic
    _interest: dict[str, list[Any]] = attrs.Factory(dict)  # subject -> [count, Subscription]
    _overflow: collections.deque[bytes] = attrs.Factory(collections.deque)  # HPUB frames
    _overflow_added: trio.Event = attrs.Factory(trio.Event)
    _idle: trio.Event = attrs.Factory(trio.Event)  # set when the overflow drained
    _last: dict[str, tuple[int, int]] = attrs.Factory(dict)  # node -> (boot, seq) routed
    _nursery: trio.Nursery | None = None
    _installed: bool = False
    _warnings: collections.defaultdict[str, _Throttled] = attrs.Factory(
        lambda: collections.defaultdict(_Throttled)
    )
    # counters
    exported: int = 0
    imported: int = 0
    duplicates: int = 0  # imports dropped: a number already routed
    malformed: int = 0  # imports that are not mqttd's messages
    expired: int = 0  # imports whose 5.0 Message Expiry Interval had passed
    not_exported: int = 0  # topic too long for a subject, payload over NATS max_payload
    backpressure: int = 0  # times the output to NATS was full (clients' reads paused)

    def __attrs_post_init__(self) -> None:
        self.js = JetStream(self.client, timeout_s=self.config.js_timeout_s)
        self.origin = f"{self.node} {self.boot} "
        self.gate = CommitGate(self.engine)
        self.retained = RetainedSync(self)
        self.groups = ClusterGroups(self)
        self.liveness = Liveness(self)
        self.sessions = ClusterSessions(self)
        self.pacing = RemotePacing(self)
        self.wills = ClusterWills(self, self.liveness)
        self._idle.set()

    @classmethod
    def create(cls, engine: Engine, config: Cluster) -> ClusterNode:
        node = config.node
        servers = tuple(ServerAddress.parse(url) for url in config.nats_servers)
        options = ClientOptions(
            name=f"mqttd {node}", user=config.user, password=config.password,
            token=config.token, echo=False, max_pending_bytes=config.max_pending_bytes,
            request_timeout_s=config.js_timeout_s, wait_for_servers=True,
            reconnect_backoff_max_s=1.0,
        )
        return cls(engine, config, NatsClient(servers, options), node, int(time.time() * 1000))

    # -- the service --------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Join the broker (interest for its subscriptions, the export hook) and serve until
        :meth:`stop`. Starts at once: NATS may be unreachable (``not_ready`` says so)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.client.run)
                self.install()
                nursery.start_soon(self._drain_overflow)
                nursery.start_soon(self.pacing.run)
                nursery.start_soon(self._setup, nursery)
                log.info("cluster node %s (boot %d): NATS %s, replicas %d", self.node,
                         self.boot, ", ".join(s.url for s in self.client.servers),
                         self.config.replicas)
                task_status.started()
        finally:
            self.uninstall()

    def install(self) -> None:
        engine = self.engine
        trie = engine.router.trie
        for topic_filter in trie.filters():
            self.filter_added(topic_filter)
        trie.watcher = self
        engine.cluster = self
        self.gate.install()
        self.retained.install()
        self.sessions.install()
        self.pacing.install()
        self.groups.install()  # after retained: its commit floor wraps retained's
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        engine = self.engine
        engine.router.trie.watcher = None
        engine.cluster = None
        self.groups.uninstall()
        self.retained.uninstall()
        self.sessions.uninstall()
        self.gate.uninstall()

    async def _setup(self, nursery: trio.Nursery) -> None:
        """The streams and the bucket, tried until they exist; then the tasks that use them."""
        backoff = 0.05
        connected_once = False
        while True:
            try:
                await self.client.wait_connected()
                if not connected_once:
                    connected_once = True
                    self._check_max_payload()
                await self.retained.ensure_stream()
                await self.liveness.ensure_bucket()
                await self.sessions.ensure()
                await self.wills.ensure_bucket()
                await self.groups.ensure_stream()
                break
            except (NatsError, trio.WouldBlock) as exc:
                if isinstance(exc, ClientClosedError):
                    return
                self.setup_problem = f"setting up JetStream: {exc}"
                self.warn("setup", "cluster: %s (trying again)", self.setup_problem)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
        self.setup_problem = None
        self.streams_ready = True
        log.info("cluster node %s: JetStream ready (MQTTD_RET, MQTTD_NODES, MQTTD_SESS, "
                 "MQTTD_Q, MQTTD_WILLS, MQTTD_GQ, MQTTD_GROUPS, replicas %d)", self.node,
                 self.config.replicas)
        self.sessions.start(nursery)
        nursery.start_soon(self.retained.write_loop)
        nursery.start_soon(self.retained.follow)
        nursery.start_soon(self.liveness.heartbeat_loop)
        nursery.start_soon(self.liveness.watch_loop)
        self.wills.start(nursery)
        nursery.start_soon(self.groups.run)

    def _check_max_payload(self) -> None:
        limit = self.engine.config.limits.max_packet_size_bytes
        if self.client.max_payload < limit:
            log.warning(
                "cluster: the NATS server's max_payload (%d bytes) is below "
                "limits.max_packet_size_bytes (%d): larger messages reach this node's "
                "subscribers only (counted as not exported); raise max_payload in the NATS "
                "configuration", self.client.max_payload, limit,
            )

    async def stop(self) -> None:
        """Shutdown, after the listeners and the wills: hand on what waits for NATS and the
        retained writes (bounded), say goodbye in MQTTD_NODES, close the connection."""
        with trio.move_on_after(STOP_TIMEOUT_S):
            while self._overflow:
                await self._idle.wait()
            await self.retained.wait_written()
            await self.wills.wait_written()  # the wills published at shutdown: deleted
            await self.groups.wait_written()
        if self.groups.writes:
            log.error("cluster: stopping with %d messages for groups not stored in MQTTD_GQ "
                      "(their QoS 1/2 PUBLISHes were not acknowledged)", len(self.groups.writes))
        if self._overflow or self.retained.writes:
            log.error(
                "cluster: stopping with %d messages not handed to NATS and %d retained "
                "messages not stored in MQTTD_RET (their QoS 1/2 PUBLISHes were not "
                "acknowledged)", len(self._overflow), len(self.retained.writes),
            )
        if self.streams_ready and self.client.is_connected:
            with trio.move_on_after(1.0):
                try:
                    await self.liveness.farewell()
                except NatsError as exc:
                    log.info("cluster: no farewell in MQTTD_NODES: %s", exc)
        await self.client.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- connecting: the client id is claimed cluster-wide -------------------------------------

    def claim(self, conn: Connection, packet: Any, username: str | None, persistent: bool,
              expiry_s: int | None) -> None:
        """The engine parked ``conn``; claim its client id (clustering.sessions) and go
        back to the engine (connect.claim_done)."""
        from mqttd.engine import connect

        nursery = self._nursery
        if nursery is None:
            connect.claim_done(self.engine, conn, packet, username,
                               ServerUnavailable("cluster mode is not running"))
            return
        nursery.start_soon(self._claim, conn, packet, username, persistent, expiry_s)

    async def _claim(self, conn: Connection, packet: Any, username: str | None,
                     persistent: bool, expiry_s: int | None) -> None:
        from mqttd.engine import connect

        error: MQTTError | None = None
        claim: Claim | None = None
        sessions = self.sessions
        if not persistent and not (sessions.ready and self.client.is_connected):
            # NATS out of reach: a clean session is served here alone (no takeover of its
            # client id on other nodes); a persistent one waits for the cluster, or is
            # refused (its state lives in JetStream)
            sessions.claims_local += 1
            sessions.announce(conn.client_id)
            connect.claim_done(self.engine, conn, packet, username, None)
            return
        try:
            with trio.fail_after(CLAIM_TIMEOUT_FACTOR * self.config.js_timeout_s):
                await sessions.ready_event.wait()
                claim = await sessions.claim(conn, persistent, packet.clean_session, expiry_s,
                                             username)
        except ServerUnavailable as exc:
            error = exc
        except (NatsError, trio.TooSlowError) as exc:
            error = ServerUnavailable(f"cluster: cannot claim the client id: {exc!r}")
        if error is not None:
            sessions.claim_failures += 1
            self.warn("claim", "cluster: client %s refused: %s", conn.client_id, error)
        elif claim is not None and not conn.closing:
            sessions.claimed(conn, claim, persistent,
                             self.engine.session_limits(conn.client_id, persistent))
        connect.claim_done(self.engine, conn, packet, username, error)

    def nodes(self) -> dict[str, bool]:
        return self.liveness.nodes()

    def nodes_loaded(self) -> bool:
        return self.liveness.loaded

    def new_session(self, client_id: str, **limits: Any) -> Session:
        return self.sessions.new_session(client_id, **limits)

    # -- interest: one NATS subscription per subject the local filters need ------------------

    def filter_added(self, filter: str) -> None:
        for subject in subjects.filter_subjects(filter):
            entry = self._interest.get(subject)
            if entry is not None:
                entry[0] += 1
                continue
            sub: Subscription | None = None
            if not self.client.closed:
                sub = self.client.subscribe_nowait(subject, callback=self._on_live)
            self._interest[subject] = [1, sub]

    def filter_removed(self, filter: str) -> None:
        for subject in subjects.filter_subjects(filter):
            entry = self._interest.get(subject)
            if entry is None:
                continue
            entry[0] -= 1
            if entry[0] <= 0:
                del self._interest[subject]
                if entry[1] is not None and not self.client.closed:
                    self.client._unsubscribe(entry[1])

    # -- export: every message this node accepts --------------------------------------------

    @property
    def congested(self) -> bool:
        return (bool(self._overflow) or self.sessions.congested or self.pacing.paused
                or self.groups.congested)

    @property
    def nursery(self) -> trio.Nursery | None:
        return self._nursery

    def publish(self, message: Publish, publisher: Session | None, bridge: bool) -> int:
        """BrokerState.publish in cluster mode: export, then route locally (a persistent
        session gets its QoS 1/2 copy through its queue, see clustering.sessions)."""
        sessions = self.sessions
        sessions.queued_for.clear()
        self.export(message, publisher)
        sessions.routing = ROUTING_LOCAL
        try:
            return self.engine.router.route(message, publisher, bridge)
        finally:
            sessions.routing = 0

    def export(self, message: Publish, publisher: Session | None = None) -> None:
        """Hand ``message`` to NATS (and to MQTTD_RET when retained, to MQTTD_Q for the
        persistent sessions it reaches, to MQTTD_GQ for the groups). Synchronous: called
        by BrokerState.publish in the publisher's reader."""
        if self.groups.known:  # a copy for each matching group of the cluster (MQTTD_GQ)
            self.groups.export(message)
        topic = message.topic
        subject = self._subjects.get(topic)
        if subject is None:
            subject = self._live_subject(topic)
            if subject is None:
                return
        self.seq = seq = self.seq + 1
        if message.retain:
            self.retained.export(message, seq)
        sessions = self.sessions
        if message.qos and sessions.indexed:
            sessions.export(message, publisher, seq)
        payload = message.payload
        block = wire.header_block(self.origin, seq, message, index_rev=sessions.index_rev)
        if len(block) + len(payload) > self.client.max_payload:
            self._too_large(topic, len(payload))
            return
        frame = wire.hpub(subject, block, payload)
        if self._overflow:
            self._overflow.append(frame)
            return
        try:
            self.client.write_nowait(frame)
        except trio.WouldBlock:
            self._overflow.append(frame)
            self.backpressure += 1
            self._idle = trio.Event()
            self._overflow_added.set()
            self.warn("backpressure", "cluster: the output to NATS is full (%d bytes "
                      "pending); clients are not read until it drains",
                      self.client.pending_bytes)
            return
        except ClientClosedError:
            return  # stopping
        self.exported += 1

    def _live_subject(self, topic: str) -> str | None:
        subject = subjects.subject(subjects.LIVE_PREFIX, topic)
        if subject is None:
            if not subjects.is_node_local(topic):
                self.not_exported += 1
                self.warn("long", "cluster: topic %r... too long for a NATS subject; its "
                          "messages reach this node's subscribers only", topic[:80])
            return None
        cache = self._subjects
        if len(cache) >= SUBJECT_CACHE_SIZE:
            cache.clear()
        cache[topic] = subject
        return subject

    def _too_large(self, topic: str, size: int) -> None:
        self.not_exported += 1
        self.warn("large", "cluster: a message of %d bytes on %r is over the NATS server's "
                  "max_payload (%d); it reaches this node's subscribers only", size, topic,
                  self.client.max_payload)

    async def _drain_overflow(self) -> None:
        """Hand the messages that found the NATS output full on, in order, waiting for
        room; then wake the paused readers."""
        client = self.client
        overflow = self._overflow
        while True:
            await self._overflow_added.wait()
            self._overflow_added = trio.Event()
            while overflow:
                try:
                    await client.write(overflow[0])
                except ClientClosedError:
                    return
                self.exported += 1
                overflow.popleft()
            self._idle.set()
            self.engine.notify_progress()

    # -- wills: kept in MQTTD_WILLS (mqttd.clustering.wills) --------------------------------

    def will_set(self, client_id: str, will: Will | None, username: str | None,
                 session: Session, clean_start: bool) -> None:
        self.wills.will_set(client_id, will, username, session, clean_start)

    def will_settled(self, client_id: str) -> None:
        self.wills.will_settled(client_id)

    # -- import: messages from the other nodes --------------------------------------------------

    def _on_live(self, msg: Msg) -> None:
        """A message from NATS (in the client's reader task): route it locally, once."""
        try:
            topic = self._topics.get(msg.subject)
            if topic is None:
                topic = subjects.topic_of(msg.subject, subjects.LIVE_PREFIX)
                if len(self._topics) >= SUBJECT_CACHE_SIZE:
                    self._topics.clear()
                self._topics[msg.subject] = topic
            received = wire.decode(topic, msg.payload, msg.headers)
        except ValueError as exc:
            self.malformed += 1
            self.warn("malformed", "cluster: not an mqttd message on %s: %s", msg.subject, exc)
            return
        node, boot, seq, message, _, index_rev = received
        if node == self.node:
            if boot != self.boot:
                self.warn("name", "cluster: another node is named %s (boot %d): node names "
                          "must be unique; its messages are ignored", node, boot)
            self.duplicates += 1
            return
        last = self._last.get(node)
        if last is not None and boot == last[0] and seq <= last[1]:
            self.duplicates += 1
            return  # (another boot id: the node restarted; its numbers start again)
        self._last[node] = (boot, seq)
        if message.expires_at is not None and message.expires_at <= time.time():
            self.expired += 1
            return
        self.imported += 1
        sessions = self.sessions
        sessions.routing = ROUTING_IMPORT
        sessions.import_rev = index_rev
        flow = self.engine.flow
        stand_in = flow.current = self.pacing.stand_in(node)  # backlogged subscribers hold it
        try:
            self.engine.router.route(message)
        except Exception:  # a bug must cost one message, never the NATS connection
            log.exception("cluster: routing a message from node %s on %r failed", node, topic)
        finally:
            sessions.routing = 0
            flow.current = None
        self.pacing.routed(node, stand_in)

    # -- state ------------------------------------------------------------------------------------

    def warn(self, kind: str, message: str, *args: Any) -> None:
        self._warnings[kind].warn(message, *args)

    def not_ready(self) -> list[str]:
        """Why this node cannot serve as part of the cluster now (empty when it can)."""
        client = self.client
        if not client.is_connected:
            return [f"NATS is not reachable: {client.last_error or 'connecting'}"]
        if not self.streams_ready:
            return [self.setup_problem or "setting up the JetStream streams"]
        problems = []
        if not self.retained.loaded:
            problems.append("reading the retained messages from MQTTD_RET")
        if not self.sessions.loaded:
            problems.append("reading the session records from MQTTD_SESS")
        if not self.groups.loaded:
            problems.append("reading the shared subscriptions of the cluster from MQTTD_GROUPS")
        if self._overflow:
            problems.append(f"the output to NATS is full ({len(self._overflow)} messages "
                            "waiting)")
        return problems

    def stats(self) -> dict[str, int]:
        client = self.client
        retained = self.retained
        return {
            "cluster_nats_connected": int(client.is_connected),
            "cluster_ready": int(not self.not_ready()),
            "cluster_exported": self.exported,
            "cluster_imported": self.imported,
            "cluster_import_duplicates": self.duplicates,
            "cluster_import_malformed": self.malformed,
            "cluster_import_expired": self.expired,
            "cluster_not_exported": self.not_exported,
            "cluster_backpressure": self.backpressure,
            "cluster_writer_waiting": len(self._overflow),
            "cluster_writer_pending_bytes": client.pending_bytes,
            "cluster_discarded_bytes": client.stats.discarded_bytes,
            "cluster_nats_reconnects": client.stats.reconnects,
            "cluster_subjects": len(self._interest),
            "cluster_retained_stored": retained.stored,
            "cluster_retained_pending": len(retained.writes),
            "cluster_retained_retries": retained.retries,
            "cluster_retained_imported": retained.imported,
            "cluster_nodes_alive": sum(self.liveness.nodes().values()),
            "cluster_heartbeat_failures": self.liveness.failures,
            **self.sessions.stats(),
            **self.pacing.stats(),
            **self.wills.stats(),
            **self.groups.stats(),
        }
