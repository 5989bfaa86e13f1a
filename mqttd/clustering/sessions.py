"""Persistent sessions cluster-wide: records in MQTTD_SESS, queues in MQTTD_Q, takeover.

**Records.** Every persistent session has a record in the key-value bucket MQTTD_SESS, key
``s.<client key>`` (:func:`subjects.client_key`): its client id, the node that owns it
(``owner``, ``boot``), an ``epoch`` that every claim raises, its expiry, when its client
left, its subscriptions (filter -> QoS, 5.0 options byte, subscription id) and the user
name its client logged in with. Only the owner writes it, always as a compare-and-set on
the revision it last read or wrote: a node that lost the session (taken over elsewhere,
while it was cut off) fails its next write and lets go (it is *fenced*). The session ops
the engine submits for a :class:`StreamSession` (SaveSession, Add/RemoveSubscription,
DeleteSession) come here (:class:`ClusterJournal`) instead of going to SQLite, and the
reply to the packet that made them (SUBACK, UNSUBACK) waits for the record's write
(:mod:`mqttd.clustering.gate`).

**The index.** Every node watches the bucket and keeps a trie of every persistent
session's subscriptions (its own sessions' changes are applied at once, before their
write). When a node accepts a QoS 1/2 message it matches that index and writes one copy to
``mqttd.q.<client key>`` (stream MQTTD_Q) per persistent session the message reaches at
QoS >= 1, on whichever node its client is, or none; the publisher's PUBACK/PUBREC waits for
the PubAcks. So what a persistent session must get is in JetStream, replicated, before the
publisher is told, and the stream is the session's queue wherever its client comes back.
Those messages also travel the live path (every node with a matching subscription gets
them); a node delivers a live QoS 1/2 copy to one of its persistent sessions only when the
sender's index (its revision travels in the message) could not know the subscription yet.

**Connecting.** In cluster mode a CONNECT is answered after a *claim*
(:meth:`ClusterSessions.claim`, while the connection is parked): read the record; if
another live node owns it, ask that node to close its connection (a request on
``mqttd.kick.<node>``: 5.0 DISCONNECT 0x8E) and to let go; then write the record with this
node as owner and the epoch raised (a new one, empty, for a clean start; the old queue is
purged). Besides, every CONNECT is announced on ``mqttd.kick.all`` so that a clean session
of the same client id on another node is closed too. A failed claim refuses the CONNECT as
server unavailable (3.1.1: 3; 5.0: 0x88).

**Feeding.** While its client is connected, the session's node reads its subject in order
through an ordered consumer, handing messages over as the inflight window has room (so the
backlog stays in JetStream), and purges the subject up to the acknowledged floor every
``PURGE_INTERVAL_S``.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import time
import zlib
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd import v5
from mqttd.cluster import pull
from mqttd.cluster.jetstream import (
    MaxMsgsPerSubjectError,
    PendingPubAck,
    StreamConfig,
    WrongLastSequenceError,
)
from mqttd.cluster.kv import KeyValue, KvEntry
from mqttd.cluster.nats_protocol import Msg
from mqttd.cluster.nats_values import ClientClosedError, NatsError
from mqttd.clustering import subjects, wire
from mqttd.clustering.context import PipelinedWrites, watch_bucket
from mqttd.clustering.gate import NO_FLOOR
from mqttd.clustering.streamsession import StreamSession
from mqttd.codec.errors import ServerUnavailable
from mqttd.codec.packets import Publish
from mqttd.subscriptions import SubOptions
from mqttd.trie import SubscriptionTrie
from persistence import ops

if TYPE_CHECKING:
    from mqttd.clustering.context import NodeContext
    from mqttd.connection import Connection
    from mqttd.session import Session

log = logging.getLogger("mqttd.cluster")

STREAM = "MQTTD_Q"
BUCKET = "MQTTD_SESS"
KICK_PREFIX = "mqttd.kick."
KICK_ALL = KICK_PREFIX + "all"
TOPIC = "Mqttd-Topic"
SUB_IDS = "Mqttd-Subs"
PURGE_INTERVAL_S = 0.1
FETCH_EXPIRES_S = 30.0  # a feeder's pull request waits this long for messages
CLAIM_ATTEMPTS = 5
KICK_TIMEOUT_S = 1.0
MAX_PENDING_WRITES = 20_000  # queue copies waiting for PubAcks: above, clients are not read
ROUTING_LOCAL = 1
ROUTING_IMPORT = 2


@attrs.define
class Record:
    client_id: str
    owner: str
    boot: int
    epoch: int
    expiry_s: int | None = None
    disconnected_at: float | None = None
    subs: dict[str, list[int]] = attrs.Factory(dict)  # filter -> [qos, options, sub id]
    username: str | None = None
    # QoS 2: packet ids of PUBLISHes received and not released yet (exactly once inbound),
    # and the queue sequences of deliveries whose PUBREC came (PUBREL, never PUBLISH again)
    inbound: list[int] = attrs.Factory(list)
    released: list[int] = attrs.Factory(list)

    def encode(self) -> bytes:
        return json.dumps({
            "client_id": self.client_id, "owner": self.owner, "boot": self.boot,
            "epoch": self.epoch, "expiry_s": self.expiry_s,
            "disconnected_at": self.disconnected_at, "subs": self.subs,
            "username": self.username, "inbound": self.inbound, "released": self.released,
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Record:
        try:
            value = json.loads(data)
            subs = {str(f): [int(q), int(o), int(i)] for f, (q, o, i) in value["subs"].items()}
            expiry = value.get("expiry_s")
            left = value.get("disconnected_at")
            return cls(
                str(value["client_id"]), str(value["owner"]), int(value["boot"]),
                int(value["epoch"]), None if expiry is None else int(expiry),
                None if left is None else float(left), subs, value.get("username"),
                [int(i) for i in value.get("inbound", ())],
                [int(i) for i in value.get("released", ())],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a session record: {exc}") from None


@attrs.frozen
class Indexed:
    """A persistent session in the index (the subscriber object of its trie entries)."""

    client_id: str
    key: str
    username: str | None


@attrs.define(eq=False)
class QueueWrite:
    ticket: int
    subject: str
    block: bytes
    payload: bytes
    client_id: str
    pending: PendingPubAck | None = None


@attrs.define(eq=False)
class Claim:
    """What a claim found and wrote, for :meth:`ClusterSessions.claimed`."""

    resume: Record | None  # the record resumed (None: a new session, or a clean one)
    read_rev: int  # the revision of the record read (0: none)
    revision: int  # the revision this node wrote (0: nothing written)
    epoch: int


def _options_byte(options: SubOptions | None) -> int:
    if options is None:
        return 0
    return (4 if options.no_local else 0) | (8 if options.retain_as_published else 0)


@attrs.define(eq=False)
class ClusterJournal:
    """The store of :class:`StreamSession`: the session ops go to their records."""

    sessions: ClusterSessions
    ticket: int = 0
    next_message_id: int = 1
    commits: int = 0
    ops_written: int = 0
    accepting: bool = True
    storage_problem: str = ""
    storage_failures: int = 0
    usage: Any = None

    @property
    def pending(self) -> int:
        return len(self.sessions.dirty)

    @property
    def congested(self) -> bool:
        return False

    def submit(self, op: ops.Op) -> None:
        self.sessions.on_op(op)

    def add_message(self, topic: str, payload: bytes, qos: int,
                    properties: bytes | None = None, expires_at: float | None = None) -> int:
        return 0  # never called: a StreamSession stores no message bodies


@attrs.define(eq=False)
class ClusterSessions(PipelinedWrites):
    node: NodeContext
    journal: ClusterJournal = attrs.field(init=False)
    kv: KeyValue | None = None
    ready: bool = False
    ready_event: trio.Event = attrs.Factory(trio.Event)
    index: SubscriptionTrie = attrs.Factory(SubscriptionTrie)
    indexed: dict[str, dict[str, tuple[int, int, int]]] = attrs.Factory(dict)
    indexed_keys: dict[str, str] = attrs.Factory(dict)  # client key -> client id
    index_rev: int = 0  # the revision of MQTTD_SESS the index has applied
    loaded: bool = False  # the first read of MQTTD_SESS is done
    # this node's records: client id -> [revision, Record]
    records: dict[str, list[Any]] = attrs.Factory(dict)
    # the other records (the watch): client id -> (revision, Record), to adopt the sessions
    # of dead nodes
    others: dict[str, tuple[int, Record]] = attrs.Factory(dict)
    dirty: dict[str, int] = attrs.Factory(dict)  # client id -> first ticket not written
    writing: dict[str, int] = attrs.Factory(dict)  # client id -> ticket being written
    deleting: set[str] = attrs.Factory(set)
    _dirty_added: trio.Event = attrs.Factory(trio.Event)
    writes: collections.deque[QueueWrite] = attrs.Factory(collections.deque)
    _unsent: int = 0
    _writes_changed: trio.Event = attrs.Factory(trio.Event)
    to_purge: set[StreamSession] = attrs.Factory(set)
    routing: int = 0  # ROUTING_LOCAL while a local publish is routed, ROUTING_IMPORT ...
    queued_for: set[str] = attrs.Factory(set)  # ... the client ids the local publish queued
    import_rev: int = 0  # ... the index revision of the node an import comes from
    # counters
    queued: int = 0  # copies written to MQTTD_Q
    queue_full: int = 0  # copies a full queue (max messages per subject) refused
    queue_retries: int = 0
    delivered: int = 0  # handed from the stream to a session
    expired: int = 0
    claims: int = 0
    claim_failures: int = 0
    claims_local: int = 0  # clean sessions accepted while NATS was out of reach
    kicks_sent: int = 0
    kicks_received: int = 0
    fenced: int = 0
    adopted: int = 0  # sessions of dead nodes (or of this node's earlier boot) taken over
    record_writes: int = 0
    purges: int = 0

    def __attrs_post_init__(self) -> None:
        self.journal = ClusterJournal(self)

    # -- setting up -------------------------------------------------------------------------

    def install(self) -> None:
        node = self.node
        node.gate.sources.append(self._oldest)
        node.client.subscribe_nowait(KICK_PREFIX + node.node, callback=self._on_kick)
        node.client.subscribe_nowait(KICK_ALL, callback=self._on_kick_all)

    def uninstall(self) -> None:
        sources = self.node.gate.sources
        if self._oldest in sources:
            sources.remove(self._oldest)

    async def ensure(self) -> None:
        node = self.node
        limit = node.engine.config.limits.persistent_max_queued_messages
        config = StreamConfig(
            STREAM, (subjects.QUEUE_PREFIX + ">",), num_replicas=node.config.replicas,
            max_msgs_per_subject=limit if limit > 0 else -1,
            discard="new", discard_new_per_subject=limit > 0, allow_direct=True,
            duplicate_window_s=120.0,
        )
        await node.js.ensure_stream(config)
        self.kv = await KeyValue.create_bucket(node.js, BUCKET, replicas=node.config.replicas)

    def start(self, nursery: trio.Nursery) -> None:
        self.ready = True
        self.ready_event.set()
        nursery.start_soon(self.watch_loop)
        nursery.start_soon(self.write_loop)
        nursery.start_soon(self.record_loop)
        nursery.start_soon(self.purge_loop)
        nursery.start_soon(self.adopt_loop)
        self._writes_changed.set()
        self._dirty_added.set()

    def _oldest(self) -> int:
        oldest = self.writes[0].ticket if self.writes else NO_FLOOR
        for ticket in self.dirty.values():
            oldest = min(oldest, ticket)
        for ticket in self.writing.values():
            oldest = min(oldest, ticket)
        return oldest

    @property
    def congested(self) -> bool:
        return len(self.writes) >= MAX_PENDING_WRITES

    # -- the index --------------------------------------------------------------------------

    def index_put(self, client_id: str, subs: dict[str, list[int]], username: str | None
                  ) -> None:
        new = {f: (v[0], v[1], v[2]) for f, v in subs.items() if not f.startswith("$share/")}
        old = self.indexed.get(client_id, {})
        if new == old and client_id in self.indexed:
            return
        key = subjects.client_key(client_id)
        entry = Indexed(client_id, key, username)
        self.indexed_keys[key] = client_id
        trie = self.index
        for topic_filter in old:
            if topic_filter not in new:
                trie.remove(topic_filter, client_id)
        for topic_filter, (qos, options, sub_id) in new.items():
            if old.get(topic_filter) != (qos, options, sub_id) or client_id not in self.indexed:
                trie.add(topic_filter, client_id, entry, qos,
                         SubOptions.of(bool(options & 4), bool(options & 8), sub_id))
        self.indexed[client_id] = new

    def index_remove(self, client_id: str) -> None:
        self.indexed_keys.pop(subjects.client_key(client_id), None)
        old = self.indexed.pop(client_id, None)
        if old:
            self.index.remove_client(client_id, list(old))

    async def watch_loop(self) -> None:
        assert self.kv is not None
        await watch_bucket(self.node, self.kv, "s.>", "sess-watch", self._seen, self._loaded)

    def _loaded(self) -> None:
        """The watch has delivered every record the bucket held."""
        self.loaded = True

    def _seen(self, entry: KvEntry) -> None:
        self.index_rev = max(self.index_rev, entry.revision)
        if entry.operation != "PUT":
            client_id = self._client_of_key(entry.key)
            if client_id is not None:
                self.others.pop(client_id, None)
                if client_id not in self.records:
                    self.index_remove(client_id)
            return
        try:
            record = Record.decode(entry.value)
        except ValueError as exc:
            self.node.warn("sess-bad", "cluster: %s in %s: %s", entry.key, BUCKET, exc)
            return
        if record.client_id in self.records:
            return  # this node's own: the index has it already (and maybe newer)
        self.others[record.client_id] = (entry.revision, record)
        self.index_put(record.client_id, record.subs, record.username)

    def _client_of_key(self, key: str) -> str | None:
        return self.indexed_keys.get(key[2:])

    # -- writing a message to the queues of the persistent sessions it reaches -----------------

    def export(self, message: Publish, publisher: Session | None, seq: int) -> None:
        """Called for every message this node accepts, before it is routed locally."""
        self.queued_for.clear()
        if not message.qos or not self.indexed:
            return
        topic = message.topic
        targets = self.index.match(topic)
        if not targets:
            return
        node = self.node
        publisher_id = publisher.client_id if publisher is not None else None
        authorizer = node.engine.router.authorizer
        ticket = node.gate.hold()
        publish_qos = message.qos
        topic_header = base64.b64encode(topic.encode()).decode()
        for index, (entry, granted, options) in enumerate(targets):
            indexed: Indexed = entry  # type: ignore[assignment]
            qos = publish_qos if publish_qos < granted else granted
            if not qos:
                continue
            retain = False
            sub_ids: tuple[int, ...] = ()
            if options is not None:
                if options.no_local and indexed.client_id == publisher_id:
                    continue
                retain = message.retain and options.retain_as_published
                sub_ids = options.subscription_ids
            if authorizer is not None and indexed.username is not None and not (
                authorizer.can_receive(indexed.client_id, indexed.username, topic)
            ):
                continue
            block = self._block(message, qos, retain, sub_ids, seq, index, topic_header)
            self.queued_for.add(indexed.client_id)
            self._write(QueueWrite(ticket, subjects.QUEUE_PREFIX + indexed.key, block,
                                   message.payload, indexed.client_id))

    def _block(self, message: Publish, qos: int, retain: bool, sub_ids: tuple[int, ...],
               seq: int, index: int, topic_header: str) -> bytes:
        node = self.node
        head = (f"NATS/1.0\r\n{wire.MSG}: {node.origin}{seq} {qos}{1 if retain else 0}\r\n"
                f"{TOPIC}: {topic_header}\r\n"
                f"{wire.MSG_ID}: {node.node}.{node.boot}.{seq}.{index}\r\n")
        if sub_ids:
            head += f"{SUB_IDS}: {','.join(map(str, sub_ids))}\r\n"
        if message.properties:
            block = v5.stored_properties(message)
            if block:
                head += f"{wire.PROPS}: {base64.b64encode(block).decode()}\r\n"
        if message.expires_at is not None:
            head += f"{wire.EXPIRES}: {message.expires_at!r}\r\n"
        return (head + "\r\n").encode()

    def _write(self, write: QueueWrite) -> None:
        self._send_now_or_later(write, self.ready)
        self.writes.append(write)
        self._writes_changed.set()

    async def write_loop(self) -> None:
        """Take the PubAcks in order; send what is unsent; retry what failed (the same
        Nats-Msg-Id: stored once)."""
        writes = self.writes
        node = self.node
        backoff = 0.05
        while True:
            if not writes:
                await self._writes_changed.wait()
                self._writes_changed = trio.Event()
                continue
            if self._unsent:
                try:
                    await self._send_unsent()
                except ClientClosedError:
                    return
            write = writes[0]
            assert write.pending is not None
            try:
                await write.pending.result()
                self.queued += 1
            except ClientClosedError:
                return
            except MaxMsgsPerSubjectError:
                self.queue_full += 1
                node.warn("queue-full", "cluster: the queue of session %s is full "
                          "(limits.persistent_max_queued_messages): a message refused",
                          write.client_id)
            except NatsError as exc:
                self.queue_retries += 1
                self._send_again(write)
                node.warn("queue", "cluster: writing to the queue of session %s failed (%s); "
                          "trying again", write.client_id, exc)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 1.0)
                continue
            backoff = 0.05
            writes.popleft()
            if not writes or writes[0].ticket != write.ticket:
                node.gate.release()
            if not writes:
                node.engine.notify_progress()


    # -- which deliveries the stream brings ----------------------------------------------------

    def in_stream(self, session: StreamSession) -> bool:
        routing = self.routing
        if routing == ROUTING_LOCAL:
            return session.client_id in self.queued_for
        if routing == ROUTING_IMPORT:
            return self.import_rev >= session.live_until_rev
        return False

    # -- records ------------------------------------------------------------------------------

    def on_op(self, op: ops.Op) -> None:
        kind = type(op)
        if kind is ops.RemoveDelivery:
            return  # acknowledgements: see StreamSession.stream_acked
        if kind is ops.SaveSession:
            entry = self.records.get(op.client_id)  # type: ignore[union-attr]
            if entry is None:
                return
            record: Record = entry[1]
            record.disconnected_at = op.disconnected_at  # type: ignore[union-attr]
            record.expiry_s = op.expiry_s  # type: ignore[union-attr]
            self._dirty(op.client_id)  # type: ignore[union-attr]
        elif kind is ops.AddSubscription:
            client_id, topic_filter, qos, options, sub_id = op  # type: ignore[misc]
            entry = self.records.get(client_id)
            if entry is None:
                return
            entry[1].subs[topic_filter] = [qos, options, sub_id]
            self.index_put(client_id, entry[1].subs, entry[1].username)
            self._dirty(client_id)
        elif kind is ops.RemoveSubscription:
            client_id, topic_filter = op  # type: ignore[misc]
            entry = self.records.get(client_id)
            if entry is None:
                return
            entry[1].subs.pop(topic_filter, None)
            self.index_put(client_id, entry[1].subs, entry[1].username)
            self._dirty(client_id)
        elif kind is ops.AddInbound or kind is ops.RemoveInbound or kind is ops.SetReleased:
            pair: tuple[str, int] = op  # type: ignore[assignment]
            client_id, number = pair
            entry = self.records.get(client_id)
            if entry is None:
                return
            record = entry[1]
            if kind is ops.AddInbound:
                record.inbound.append(number)
            elif kind is ops.RemoveInbound:
                if number in record.inbound:
                    record.inbound.remove(number)
            else:
                record.released.append(number)
            self._dirty(client_id)
        elif kind is ops.DeleteSession:
            client_id = op.client_id  # type: ignore[union-attr]
            if client_id not in self.records:
                return
            self.index_remove(client_id)
            self.deleting.add(client_id)
            self._dirty(client_id)

    def _dirty(self, client_id: str) -> None:
        if client_id not in self.dirty:
            self.dirty[client_id] = self.node.gate.hold()
            self._dirty_added.set()

    async def record_loop(self) -> None:
        while True:
            if not self.dirty:
                await self._dirty_added.wait()
                self._dirty_added = trio.Event()
                continue
            client_id, ticket = next(iter(self.dirty.items()))
            del self.dirty[client_id]
            self.writing[client_id] = ticket
            try:
                await self._write_record(client_id)
            except ClientClosedError:
                return
            finally:
                del self.writing[client_id]
                self.node.gate.release()

    async def _write_record(self, client_id: str) -> None:
        assert self.kv is not None
        key = "s." + subjects.client_key(client_id)
        backoff = 0.05
        while True:
            entry = self.records.get(client_id)
            if entry is None:
                self.deleting.discard(client_id)
                return  # let go meanwhile
            revision, record = entry
            deleting = client_id in self.deleting
            try:
                if deleting:
                    await self.kv.delete(key, revision=revision)
                    await self.node.js.purge(STREAM, subjects.QUEUE_PREFIX + record_key(client_id))
                    self.records.pop(client_id, None)
                    self.deleting.discard(client_id)
                else:
                    session = self.node.engine.sessions.get(client_id)
                    if isinstance(session, StreamSession) and record.released:
                        # released deliveries acknowledged since (under the floor) are done
                        record.released = [s for s in record.released if s > session.floor]
                    entry[0] = written = await self.kv.update(key, record.encode(), revision)
                    session = self.node.engine.sessions.get(client_id)
                    if isinstance(session, StreamSession) and client_id not in self.dirty:
                        # every subscription it has is in this revision
                        session.live_until_rev = written
                self.record_writes += 1
                return
            except WrongLastSequenceError:
                self._fenced(client_id)
                return
            except ClientClosedError:
                raise
            except NatsError as exc:
                self.node.warn("record", "cluster: writing the session record of %s failed "
                               "(%s); trying again", client_id, exc)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 1.0)

    def _fenced(self, client_id: str) -> None:
        """Another node wrote this session's record: it is that node's now."""
        self.fenced += 1
        log.warning("cluster: session %s was taken over by another node; letting go here",
                    client_id)
        self.let_go(client_id, "session taken over on another node")

    def let_go(self, client_id: str, why: str) -> None:
        """Close the client's connection here (5.0: 0x8E) and forget the session without
        touching its record or queue (another node owns them now)."""
        from mqttd.engine import sessions as engine_sessions

        self.records.pop(client_id, None)
        self.dirty.pop(client_id, None)
        self.deleting.discard(client_id)
        engine = self.node.engine
        session = engine.sessions.get(client_id)
        if session is None:
            return
        persistent_here = isinstance(session, StreamSession)
        if isinstance(session, StreamSession):
            session.writer = None  # nothing more is written for it from here
            session.stop_feeder()
            self.to_purge.discard(session)
        conn = session.connection
        if conn is not None:
            engine_sessions.take_over(engine, conn, session_ends=not persistent_here)  # type: ignore[arg-type]
        engine_sessions.discard(engine, session)

    # -- sessions whose node died while their client was away -----------------------------------

    def orphans(self) -> list[tuple[int, Record]]:
        """The records this node should adopt now: their owner is down (or is this node's
        earlier boot), and this node is the one of the live nodes chosen by the client key
        (so one node adopts each)."""
        node = self.node
        if not self.loaded or not node.nodes_loaded():
            return []
        nodes = node.nodes()
        alive = sorted(name for name, up in nodes.items() if up)
        if node.node not in alive:
            return []
        chosen = []
        for revision, record in self.others.values():
            mine_before = record.owner == node.node and record.boot != node.boot
            if not mine_before and nodes.get(record.owner, False):
                continue
            key = subjects.client_key(record.client_id)
            if mine_before or alive[zlib.crc32(key.encode()) % len(alive)] == node.node:
                chosen.append((revision, record))
        return chosen

    async def adopt_loop(self) -> None:
        """Adopt the sessions of dead nodes, so that they expire (and their queues go) in
        time even if their clients never come back."""
        interval = max(1.0, self.node.config.heartbeat_s)
        while True:
            await trio.sleep(interval)
            try:
                await self._adopt_orphans()
            except ClientClosedError:
                return
            except Exception:  # a bug must not take the node down
                log.exception("cluster: adopting the sessions of dead nodes failed")

    async def _adopt_orphans(self) -> None:
        for revision, record in self.orphans():
            if record.client_id in self.node.engine.sessions:
                continue
            try:
                await self._adopt(revision, record)
            except WrongLastSequenceError:
                continue  # its client came back somewhere, or another node adopted it
            except ClientClosedError:
                raise
            except NatsError as exc:
                self.node.warn("adopt", "cluster: adopting the session of %s failed: %s",
                               record.client_id, exc)

    async def _adopt(self, revision: int, record: Record) -> None:
        assert self.kv is not None
        node = self.node
        client_id = record.client_id
        left = record.disconnected_at if record.disconnected_at is not None else time.time()
        new = attrs.evolve(record, owner=node.node, boot=node.boot, epoch=record.epoch + 1,
                           disconnected_at=left)
        written = await self.kv.update("s." + subjects.client_key(client_id), new.encode(),
                                       revision)
        engine = node.engine
        if client_id in engine.sessions:  # a client connected here meanwhile: it won
            return
        self.others.pop(client_id, None)
        self.records[client_id] = [written, new]
        limits = engine.session_limits(client_id, True)
        session = self.restored(client_id, new, new.epoch, written, limits)
        session.disconnected_at = left
        self.adopted += 1
        log.info("cluster: adopted the session of %s (its node %s is gone): it expires here "
                 "unless its client comes back", client_id, record.owner)

    # -- acknowledgements: purging ---------------------------------------------------------------

    def acked(self, session: StreamSession) -> None:
        if session.writer is not None:
            self.to_purge.add(session)

    async def purge_loop(self) -> None:
        js = self.node.js
        while True:
            await trio.sleep(PURGE_INTERVAL_S)
            batch, self.to_purge = self.to_purge, set()
            for session in batch:
                floor = session.floor
                if floor <= session.purged or session.writer is None:
                    continue
                reply, session.floor_ack = session.floor_ack, None
                if reply is not None:  # the feeder's consumer: done up to here
                    pull.ack(js, reply)
                try:
                    await js.purge(STREAM, subjects.QUEUE_PREFIX + session.key, seq=floor + 1)
                    session.purged = floor
                    self.purges += 1
                except ClientClosedError:
                    return
                except NatsError as exc:
                    self.to_purge.add(session)
                    self.node.warn("purge", "cluster: purging the queue of %s failed: %s",
                                   session.client_id, exc)

    # -- feeding a connected session from its queue ---------------------------------------------

    def start_feeder(self, session: StreamSession) -> None:
        nursery = self.node.nursery
        if nursery is None or not self.ready:
            return
        session.stop_feeder()
        scope = trio.CancelScope()
        session.feeder = scope
        nursery.start_soon(self._feed, session, scope)

    async def _feed(self, session: StreamSession, scope: trio.CancelScope) -> None:
        """Read the session's queue in order through an ephemeral pull consumer, asking for
        as many messages as its inflight window has room for (the backlog stays in
        JetStream); a message whose packet id is still in flight waits for it."""
        node = self.node
        js = node.js
        subject = subjects.QUEUE_PREFIX + session.key
        heartbeat_s = max(1.0, node.config.heartbeat_s)
        waiting: collections.deque[tuple[int, Msg]] = collections.deque()
        backoff = 0.05

        def on_message(msg: Msg) -> None:  # in the NATS client's reader task
            info = pull.delivery_of(msg.reply or "")
            if info is None or info.stream_seq <= session.fed_upto or (waiting and (
                info.stream_seq <= waiting[-1][0]
            )):
                return
            session.ack_subjects[info.stream_seq] = msg.reply  # type: ignore[assignment]
            if not waiting and session.has_room(info.stream_seq):
                try:
                    self._hand(session, info.stream_seq, msg)
                except Exception:  # a bug must cost one message, never the NATS connection
                    log.exception("cluster: handing message %d to %s failed",
                                  info.stream_seq, session.client_id)
            else:
                waiting.append((info.stream_seq, msg))

        with scope:
            while True:
                name = None
                try:
                    start = (waiting[-1][0] if waiting else session.fed_upto) + 1
                    name = await pull.create_ephemeral(js, STREAM, subject, start_seq=start)
                    session.consumer = name
                    puller = pull.PullConsumer(js, STREAM, name, on_message)
                    backoff = 0.05
                    try:
                        while True:
                            while waiting:
                                seq, msg = waiting[0]
                                await session.wait_room(seq)
                                waiting.popleft()
                                self._hand(session, seq, msg)
                            await session.wait_window()
                            room = session.max_inflight - len(session.inflight)
                            await puller.fetch(room, FETCH_EXPIRES_S, heartbeat_s)
                            if puller.ended_by in (pull.LOST, pull.STATUS_NO_RESPONDERS,
                                                   pull.STATUS_CONFLICT):
                                break  # the consumer is gone (its server, a reconnect)
                    finally:
                        puller.close()
                except (ClientClosedError, trio.EndOfChannel):
                    return
                except NatsError as exc:
                    node.warn("feed", "cluster: reading the queue of %s failed (%s); trying "
                              "again", session.client_id, exc)
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, 2.0)
                finally:
                    if name is not None:
                        session.consumer = None
                        self._delete_consumer(name)

    def _delete_consumer(self, name: str) -> None:
        client = self.node.client
        if client.closed:
            return
        try:  # no answer wanted: the server deletes it, or its inactive threshold does
            client.publish_nowait(f"{self.node.js.prefix}.CONSUMER.DELETE.{STREAM}.{name}")
        except (trio.WouldBlock, NatsError):
            pass

    def _hand(self, session: StreamSession, seq: int, msg: Msg) -> None:
        headers = msg.headers or {}
        try:
            topic_text = wire.first(headers, TOPIC)
            if topic_text is None:
                raise ValueError(f"no {TOPIC} header")
            topic = base64.b64decode(topic_text, validate=True).decode()
            received = wire.decode(topic, msg.payload, headers)
            ids_text = wire.first(headers, SUB_IDS)
            sub_ids = tuple(int(i) for i in ids_text.split(",")) if ids_text else None
        except (ValueError, UnicodeDecodeError) as exc:
            self.node.malformed += 1
            self.node.warn("malformed", "cluster: not an mqttd message in %s at %d: %s",
                           STREAM, seq, exc)
            session.skipped(seq)
            return
        message = received.message
        if message.expires_at is not None and message.expires_at <= time.time():
            self.expired += 1
            session.out.expired += 1
            session.skipped(seq)
            return
        if seq in session.released_seqs:  # PUBREC came on an earlier connection: PUBREL
            session.feed_released(seq)
            return
        if session.feed(message, message.qos, message.retain, sub_ids, seq):
            self.delivered += 1

    # -- claiming a client id when it connects --------------------------------------------------

    def new_session(self, client_id: str, **limits: Any) -> StreamSession:
        return StreamSession(client_id, True, writer=self.journal, cluster=self,
                             key=subjects.client_key(client_id), **limits)

    async def claim(self, conn: Connection, persistent: bool, clean_start: bool,
                    expiry_s: int | None, username: str | None) -> Claim:
        """Make this node the owner of ``conn``'s client id cluster-wide (see the module)."""
        assert self.kv is not None
        node = self.node
        client_id = conn.client_id
        key = "s." + subjects.client_key(client_id)
        self.announce(client_id)
        for _ in range(CLAIM_ATTEMPTS):
            entry = await self.kv.entry(key, leader=True)
            record: Record | None = None
            if entry is not None and entry.operation == "PUT":
                try:
                    record = Record.decode(entry.value)
                except ValueError:
                    record = None
            if record is not None and record.owner != node.node and (
                node.nodes().get(record.owner, False)
            ):
                await self._kick(record.owner, client_id)
            revision = entry.revision if entry is not None else 0
            resume = record if (record is not None and not clean_start) else None
            try:
                if not persistent:
                    if record is not None:
                        await self.kv.delete(key, revision=revision)
                        await node.js.purge(STREAM, subjects.QUEUE_PREFIX + record_key(client_id))
                    self.records.pop(client_id, None)
                    self.index_remove(client_id)
                    self.claims += 1
                    return Claim(None, revision, 0, 0)
                epoch = (record.epoch + 1) if record is not None else 1
                new = Record(client_id, node.node, node.boot, epoch, expiry_s, None,
                             dict(resume.subs) if resume is not None else {}, username)
                written = await self.kv.update(key, new.encode(), revision)
                if record is not None and resume is None:
                    await node.js.purge(STREAM, subjects.QUEUE_PREFIX + record_key(client_id))
                self.claims += 1
                self.records[client_id] = [written, new]
                self.others.pop(client_id, None)
                self.index_put(client_id, new.subs, username)
                return Claim(resume, revision, written, epoch)
            except WrongLastSequenceError:
                continue
        raise ServerUnavailable("the session is being claimed by another node; try again")

    async def _kick(self, owner: str, client_id: str) -> None:
        self.kicks_sent += 1
        try:
            await self.node.client.request(KICK_PREFIX + owner, client_id.encode(),
                                           timeout_s=KICK_TIMEOUT_S)
        except NatsError as exc:
            log.info("cluster: node %s did not confirm closing client %s: %s", owner,
                     client_id, exc)

    def announce(self, client_id: str) -> None:
        """Tell every node that ``client_id`` connected here (best effort: an older
        connection of it elsewhere ends)."""
        node = self.node
        data = json.dumps({"client_id": client_id, "node": node.node, "at": time.time()})
        try:
            node.client.publish_nowait(KICK_ALL, data.encode())
        except (trio.WouldBlock, NatsError):
            pass

    def _on_kick(self, msg: Msg) -> None:
        """Another node claims a session this node owns: close and let go, then answer."""
        self.kicks_received += 1
        try:
            client_id = msg.payload.decode()
        except UnicodeDecodeError:
            return
        try:
            self.let_go(client_id, "session taken over on another node")
        except Exception:  # (in the NATS client's reader: never take it down)
            log.exception("cluster: closing client %s for another node failed", client_id)
        if msg.reply:
            try:
                self.node.client.publish_nowait(msg.reply, b"ok")
            except (trio.WouldBlock, NatsError):
                pass

    def _on_kick_all(self, msg: Msg) -> None:
        """A client connected on another node: a connection of the same client id here
        that is older ends (taken over)."""
        try:
            data = json.loads(msg.payload)
            client_id, at = str(data["client_id"]), float(data["at"])
        except (ValueError, KeyError, TypeError):
            return
        session = self.node.engine.sessions.get(client_id)
        if session is None:
            return
        conn = session.connection
        if conn is not None and getattr(conn, "connected_at", 0.0) <= at:
            self.kicks_received += 1
            try:
                self.let_go(client_id, "session taken over on another node")
            except Exception:  # (in the NATS client's reader: never take it down)
                log.exception("cluster: closing client %s for another node failed", client_id)

    def claimed(self, conn: Connection, claim: Claim, persistent: bool, limits: dict[str, Any]
                ) -> None:
        """Back in the engine after a claim: set up the session the engine will attach."""
        from mqttd.engine import sessions as engine_sessions

        engine = self.node.engine
        client_id = conn.client_id
        local = engine.sessions.get(client_id)
        if isinstance(local, StreamSession) and (
            claim.resume is None or local.epoch != claim.epoch - 1
        ):
            # not the session resumed: forget it here without touching the record
            local.writer = None
            local.stop_feeder()
            if local.connection is not None:
                engine_sessions.take_over(engine, local.connection, session_ends=True)  # type: ignore[arg-type]
            engine_sessions.discard(engine, local)
            local = None
        if isinstance(local, StreamSession):
            local.epoch = claim.epoch
            local.live_until_rev = min(local.live_until_rev, claim.read_rev)
            return
        if claim.resume is None or not persistent:
            return
        # resumed from the record (another node's, or an earlier boot's)
        self.restored(client_id, claim.resume, claim.epoch, claim.read_rev, limits)

    def restored(self, client_id: str, record: Record, epoch: int, live_until_rev: int,
                 limits: dict[str, Any]) -> StreamSession:
        """A session made here from its record, in the engine (subscriptions in the local
        trie), offline until its client attaches."""
        from mqttd.engine import sessions as engine_sessions

        engine = self.node.engine
        session = self.new_session(client_id, **limits)
        session.epoch = epoch
        session.expiry_s = record.expiry_s
        session.disconnected_at = record.disconnected_at
        session.live_until_rev = live_until_rev
        session.dup_budget = session.max_inflight
        session.inbound_qos2 = set(record.inbound)
        session.released_seqs = set(record.released)
        for topic_filter, (qos, options, sub_id) in record.subs.items():
            session.subscriptions[topic_filter] = qos
            if options or sub_id:
                session.sub_options[topic_filter] = (options, sub_id)
            engine_sessions.add_subscription(
                engine, session, topic_filter, qos,
                SubOptions.of(bool(options & 4), bool(options & 8), sub_id),
            )
        engine.sessions[client_id] = session
        self.index_put(client_id, record.subs, record.username)
        return session

    # -- state ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "cluster_sessions_owned": len(self.records),
            "cluster_sessions_indexed": len(self.indexed),
            "cluster_queue_written": self.queued,
            "cluster_queue_pending": len(self.writes),
            "cluster_queue_full": self.queue_full,
            "cluster_queue_retries": self.queue_retries,
            "cluster_queue_delivered": self.delivered,
            "cluster_queue_expired": self.expired,
            "cluster_claims": self.claims,
            "cluster_claim_failures": self.claim_failures,
            "cluster_claims_local": self.claims_local,
            "cluster_kicks_sent": self.kicks_sent,
            "cluster_kicks_received": self.kicks_received,
            "cluster_sessions_fenced": self.fenced,
            "cluster_sessions_adopted": self.adopted,
            "cluster_record_writes": self.record_writes,
            "cluster_queue_purges": self.purges,
        }


def record_key(client_id: str) -> str:
    return subjects.client_key(client_id)


