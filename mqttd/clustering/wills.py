"""Wills across nodes: the key-value bucket MQTTD_WILLS (``cluster.replicas`` replicas), one
key ``w.<client_key>`` per client id whose connection holds a will, so that the wills of a
node that dies (kill -9, power loss) are published by a surviving node.

Writing. When a client with a will is accepted on a node, the engine calls
:meth:`ClusterWills.will_set` (synchronously, no await): the node queues a put of a JSON
record (node, boot, client id, the will's topic, payload (base64), QoS, retain, 5.0
properties (an encoded property block, base64), the effective Will Delay in seconds - 0
when the session ends with the connection, else min(Will Delay Interval, session expiry)
as ``sessions.will_due`` computes it - the user name for the ACL, the time). When the will
is settled on the node (clean DISCONNECT; the will published by the node itself: connection
lost, delay over, session taken over or expired, shutdown; a delayed will taken back
because the client came back) :meth:`ClusterWills.will_settled` queues a delete that
expects the revision this node wrote (a CAS: a newer writer's key is never removed). One
task sends the queued writes, pipelined, and takes their PubAcks in order; a write that
fails is retried (with a backoff) while the node lives, and counted.

**The window.** CONNACK does not wait for the write: a node killed within a few milliseconds
of accepting a client (before its put reached JetStream: normally about a millisecond, up
to ``js_timeout_s`` and the retries while NATS is unreachable or a stream leader is being
elected) takes that client's will with it. Likewise a will settled just before the kill may
still be in the bucket: it is then published although the client disconnected cleanly.

Claiming. Every node follows ``w.>`` (an index: key -> owner node, boot, revision, delay)
and, every ``TICK_S``, asks :class:`~mqttd.clustering.liveness.Liveness` whether each owner
is up. The wills of an owner that is down (its heartbeat is older than
``node_dead_after_s``, it stopped, or it restarted under the same name: an older boot; a
node never seen in MQTTD_NODES counts as down once its record is older than
``node_dead_after_s``) are claimed after their Will Delay, counted from when this node
found the owner down: a claim is a delete expecting the revision indexed, and only the
node whose delete succeeds publishes the will, through the engine's ``publish`` (every
node's subscribers, retained if flagged, the ACL checked again with the client's user name).
To spare the compare-and-set a race, one of the live nodes (chosen by the key) claims at
once and the others ``claim_grace_s`` later, if the key is still there. A client that
reconnected meanwhile has changed the key: the claim fails and no will is sent.

Reconnecting elsewhere. A client that connects on node C while the index holds a will of
another owner for its client id (its old node died, it came back before the death was
noticed) makes C replace that record by a CAS. If the replace succeeds, C settles the old
will as the single-node engine settles a connection it takes over: a Will Delay with the
session going on (Clean Start 0) cancels it; otherwise it is published - at once when the
old owner is down, else when the old owner is found down; if the old owner is seen alive
after the reconnect it still holds that connection (no takeover across nodes yet) and
publishes the will itself if the connection ends.

What is not covered: exactly once needs nats-server 2.9.21 or later (before it, two
concurrent compare-and-set writes to an R3 stream can both succeed, nats-server#4320: the
delayed second claimer makes that rare, not impossible); a node cut from NATS for longer
than ``node_dead_after_s`` is taken for dead and its clients' wills are published although
they may still be connected.
"""

from __future__ import annotations

import base64
import collections
import heapq
import json
import logging
import time
import zlib
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd import v5
from mqttd.cluster.jetstream import (
    EXPECTED_LAST_SUBJECT_SEQ,
    PendingPubAck,
    WrongLastSequenceError,
)
from mqttd.cluster.kv import KV_OPERATION, KeyValue, KvEntry
from mqttd.cluster.nats_values import ClientClosedError, MaxPayloadError, NatsError
from mqttd.clustering import subjects
from mqttd.clustering.context import watch_bucket
from mqttd.codec import MQTTError
from mqttd.codec.kinds import WILL
from mqttd.codec.packets import Will
from mqttd.codec.properties import decode_properties, encode_properties

if TYPE_CHECKING:
    from mqttd.clustering.context import NodeContext
    from mqttd.clustering.liveness import Liveness
    from mqttd.session import Session

log = logging.getLogger("mqttd.cluster")

BUCKET = "MQTTD_WILLS"
PREFIX = "w."
TICK_S = 0.1  # how often owners are checked for being down (a few dict lookups)
MAX_BACKOFF_S = 2.0


def will_key(client_id: str) -> str:
    return PREFIX + subjects.client_key(client_id)


def effective_delay(will: Will, session: Session, default_expiry_s: int) -> int:
    """The Will Delay the single-node engine would apply (``sessions.will_due``): 0 when
    the session ends with the connection, else min(Will Delay Interval, session expiry)."""
    delay = int((will.properties or {}).get("will_delay_interval", 0) or 0)
    if not delay or not session.persistent or session.expiry_s == 0:
        return 0
    expiry = default_expiry_s if session.expiry_s is None else session.expiry_s
    return min(delay, expiry) if expiry >= 0 else delay


@attrs.frozen
class WillRecord:
    """What MQTTD_WILLS holds for one client."""

    node: str
    boot: int
    client_id: str
    will: Will
    delay_s: int
    username: str | None = None
    time: float = 0.0

    def encode(self) -> bytes:
        will = self.will
        data: dict[str, Any] = {
            "node": self.node, "boot": self.boot, "client_id": self.client_id,
            "topic": will.topic, "payload": base64.b64encode(will.payload).decode(),
            "qos": will.qos, "retain": will.retain, "delay_s": self.delay_s,
            "username": self.username, "time": self.time or time.time(),
        }
        if will.properties:
            data["properties"] = base64.b64encode(
                encode_properties(will.properties, WILL)).decode()
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> WillRecord:
        """ValueError when ``value`` is not a record."""
        try:
            data = json.loads(value)
            properties = None
            if data.get("properties"):
                block = base64.b64decode(data["properties"], validate=True)
                properties = decode_properties(block, 0, len(block), WILL)[0] or None
            will = Will(str(data["topic"]), base64.b64decode(data["payload"], validate=True),
                        int(data["qos"]), bool(data["retain"]), properties)
            username = data.get("username")
            return cls(str(data["node"]), int(data["boot"]), str(data["client_id"]), will,
                       int(data["delay_s"]), None if username is None else str(username),
                       float(data["time"]))
        except (ValueError, KeyError, TypeError, MQTTError) as exc:
            raise ValueError(f"not a will record: {exc}") from None


@attrs.frozen
class Indexed:
    """A will in the bucket, as the index keeps it."""

    key: str
    revision: int
    node: str
    boot: int
    delay_s: int
    time: float  # epoch seconds, when it was written
    value: bytes


@attrs.define(eq=False)
class _Slot:
    """This node's view of one key: what it wants there and what it wrote."""

    key: str
    value: bytes | None = None  # the record this node wants in the bucket (None: none)
    written: bytes | None = None  # the value of its last successful put
    revision: int = 0  # that put's revision
    takeover: Indexed | None = None  # another owner's will, to replace first (CAS)
    clean_start: bool = False  # of the connect that found ``takeover``
    busy: bool = False  # a write in flight


@attrs.define(eq=False)
class ClusterWills:
    node: NodeContext
    liveness: Liveness
    kv: KeyValue | None = None
    claim_grace_s: float = attrs.field(init=False)
    slots: dict[str, _Slot] = attrs.Factory(dict)
    index: dict[str, Indexed] = attrs.Factory(dict)
    by_owner: dict[tuple[str, int], set[str]] = attrs.Factory(dict)
    loaded: bool = False  # the watch delivered the bucket's current keys
    _dirty: dict[str, None] = attrs.Factory(dict)  # keys with something to write, in order
    _inflight: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)
    _claims: dict[tuple[str, int], float] = attrs.Factory(dict)  # (key, revision) -> due
    _due: list[tuple[float, str, int]] = attrs.Factory(list)  # heap of claims
    _parked: list[tuple[Indexed, float]] = attrs.Factory(list)  # (will, wall time parked)
    _announced: set[tuple[str, int]] = attrs.Factory(set)
    # counters
    written: int = 0
    write_failures: int = 0
    deleted: int = 0
    stale_deletes: int = 0  # settled, but a newer writer had the key: left alone
    claimed: int = 0
    published: int = 0  # wills of down nodes published by this node
    claim_conflicts: int = 0  # claims (or replaces) another writer won
    claim_failures: int = 0
    cancelled: int = 0  # delayed wills cancelled: the client came back here
    denied: int = 0  # the ACL no longer allows the will's topic
    malformed: int = 0

    def __attrs_post_init__(self) -> None:
        self.claim_grace_s = max(1.0, 2 * self.node.config.heartbeat_s)

    async def ensure_bucket(self) -> None:
        self.kv = await KeyValue.create_bucket(self.node.js, BUCKET,
                                               replicas=self.node.config.replicas)

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.write_loop)
        nursery.start_soon(self.watch_loop)
        nursery.start_soon(self.claim_loop)

    # -- the engine's hooks (synchronous, in the reader) ------------------------------------

    def will_set(self, client_id: str, will: Will | None, username: str | None,
                 session: Session, clean_start: bool) -> None:
        """A client was accepted (``will``: its will, or None)."""
        key = will_key(client_id)
        indexed = self.index.get(key)
        foreign = indexed is not None and not self._own(indexed)
        slot = self.slots.get(key)
        if slot is None:
            if will is None and not foreign:
                return  # the common case of a client without a will
            slot = self.slots[key] = _Slot(key)
        if foreign and slot.takeover is None:
            slot.takeover, slot.clean_start = indexed, clean_start
        if will is None:
            slot.value = None
        else:
            node = self.node
            delay = effective_delay(will, session,
                                    node.engine.config.persistence.session_expiry_s)
            slot.value = WillRecord(node.node, node.boot, client_id, will, delay,
                                    username).encode()
        self._mark(key)

    def will_settled(self, client_id: str) -> None:
        """The will of ``client_id``'s connection here is published, discarded or
        cancelled."""
        key = will_key(client_id)
        slot = self.slots.get(key)
        if slot is not None and slot.value is not None:
            slot.value = None
            self._mark(key)

    def _mark(self, key: str) -> None:
        self._dirty[key] = None
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    @property
    def pending(self) -> int:
        return len(self._dirty) + self._inflight

    async def wait_written(self) -> None:
        while self.pending and self.kv is not None:
            await self._changed.wait()

    # -- writing -----------------------------------------------------------------------------

    async def write_loop(self) -> None:
        """Send what the slots want (pipelined), take the PubAcks in order, retry failures."""
        inflight: collections.deque[tuple[_Slot, str, Any, PendingPubAck]] = (
            collections.deque())
        backoff = 0.05
        while True:
            try:
                while self._dirty:
                    key = next(iter(self._dirty))
                    del self._dirty[key]
                    slot = self.slots.get(key)
                    if slot is None or slot.busy:
                        continue  # (a busy slot is looked at again when its write is done)
                    op = self._next_op(slot)
                    if op is None:
                        self._forget(slot)
                        continue
                    try:
                        pending = await self._send(slot, *op)
                    except MaxPayloadError as exc:  # a will as large as max_payload
                        self.write_failures += 1
                        self.node.warn("wills-large", "cluster: a will cannot be kept in "
                                       "%s: %s; it dies with this node", BUCKET, exc)
                        slot.value = None
                        self._dirty[slot.key] = None  # (delete what it wrote before)
                        continue
                    inflight.append((slot, op[0], op[1], pending))
                    slot.busy = True
                    self._inflight += 1
                if not inflight:
                    self._wake()  # (wait_written: nothing left)
                    await self._changed.wait()
                    continue
                slot, kind, arg, pending = inflight.popleft()
                try:
                    seq: int | None = (await pending.result()).seq
                except WrongLastSequenceError:
                    seq = None
                except ClientClosedError:
                    return
                except NatsError as exc:
                    self.write_failures += 1
                    self.node.warn("wills", "cluster: writing a will to %s failed (%s); "
                                   "trying again", BUCKET, exc)
                    self._done(slot)
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, MAX_BACKOFF_S)
                    continue
                backoff = 0.05
                self._applied(slot, kind, arg, seq)
                self._done(slot)
            except ClientClosedError:
                return

    def _next_op(self, slot: _Slot) -> tuple[str, Any] | None:
        if slot.takeover is not None:
            return "replace", slot.value
        if slot.value is not None and slot.value is not slot.written:
            return "put", slot.value
        if slot.value is None and slot.revision:
            return "delete", slot.revision
        return None

    async def _send(self, slot: _Slot, kind: str, arg: Any) -> PendingPubAck:
        assert self.kv is not None
        node = self.node
        subject = self.kv.subject(slot.key)
        headers: dict[str, str] = {}
        payload = b""
        if kind == "put":
            payload = arg
        elif kind == "delete":
            headers = {KV_OPERATION: "DEL", EXPECTED_LAST_SUBJECT_SEQ: str(arg)}
        else:  # replace another owner's will
            assert slot.takeover is not None
            headers = {EXPECTED_LAST_SUBJECT_SEQ: str(slot.takeover.revision)}
            if arg is None:
                headers[KV_OPERATION] = "DEL"
            else:
                payload = arg
        return PendingPubAck(await node.client.request_start(
            subject, payload, headers or None, node.config.js_timeout_s))

    def _applied(self, slot: _Slot, kind: str, arg: Any, seq: int | None) -> None:
        """A write's answer: ``seq`` its revision, None when the expected one was not the
        last (another writer came first)."""
        if kind == "put":
            assert seq is not None
            slot.written, slot.revision = arg, seq
            self.written += 1
        elif kind == "delete":
            if seq is None:
                self.stale_deletes += 1
            else:
                self.deleted += 1
            slot.written, slot.revision = None, 0
        else:
            taken, slot.takeover = slot.takeover, None
            if seq is None:
                self.claim_conflicts += 1  # claimed by a survivor, or rewritten
                return
            if arg is None:
                slot.written, slot.revision = None, 0
            else:
                slot.written, slot.revision = arg, seq
                self.written += 1
            assert taken is not None
            self._taken_back(taken, slot.clean_start)

    def _done(self, slot: _Slot) -> None:
        slot.busy = False
        self._inflight -= 1
        if self._next_op(slot) is None:
            self._forget(slot)
        else:
            self._dirty[slot.key] = None
        self._wake()

    def _forget(self, slot: _Slot) -> None:
        if slot.value is None and not slot.busy and self.slots.get(slot.key) is slot:
            del self.slots[slot.key]

    def _taken_back(self, taken: Indexed, clean_start: bool) -> None:
        """The client came back here and its will from another owner is no longer in the
        bucket: settle it as a takeover on one node would."""
        if taken.delay_s and not clean_start:
            self.cancelled += 1
            log.info("cluster: a client came back within its Will Delay: the will of its "
                     "connection on node %s is cancelled", taken.node)
            return
        if self._owner_up(taken.node, taken.boot, taken.time, self.liveness.nodes()):
            self._parked.append((taken, time.time()))  # published if its node is down
        else:
            self._publish(taken, f"node {taken.node} down, the client reconnected here")

    # -- the index -----------------------------------------------------------------------

    async def watch_loop(self) -> None:
        assert self.kv is not None
        await watch_bucket(self.node, self.kv, PREFIX + ">", "wills-watch", self._indexed,
                           self._loaded, max_backoff_s=MAX_BACKOFF_S)

    def _loaded(self) -> None:
        """The watch has delivered the bucket's current keys."""
        self.loaded = True

    def _indexed(self, entry: KvEntry) -> None:
        key = entry.key
        old = self.index.pop(key, None)
        if old is not None:
            owner = (old.node, old.boot)
            keys = self.by_owner.get(owner)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_owner[owner]
            self._claims.pop((key, old.revision), None)
        if entry.operation != "PUT":
            return
        try:
            data = json.loads(entry.value)
            item = Indexed(key, entry.revision, str(data["node"]), int(data["boot"]),
                           int(data["delay_s"]), float(data["time"]), entry.value)
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            self.node.warn("wills-malformed", "cluster: %s holds a key %s that is not a "
                           "will record; ignored", BUCKET, key)
            return
        self.index[key] = item
        self.by_owner.setdefault((item.node, item.boot), set()).add(key)

    def _own(self, item: Indexed) -> bool:
        return item.node == self.node.node and item.boot == self.node.boot

    def _owner_up(self, node: str, boot: int, written: float, up: dict[str, bool]) -> bool:
        """Whether the owner (node, boot) of a will may still hold its connection."""
        if node == self.node.node:
            return boot >= self.node.boot
        peer = self.liveness.peers.get(node)
        if peer is None:  # never seen: new (its heartbeat not read yet), or long gone
            return time.time() - written < self.node.config.node_dead_after_s
        try:
            peer_boot = int(peer.data["boot"])
        except (KeyError, TypeError, ValueError):
            return True
        if peer_boot != boot:
            return peer_boot < boot  # restarted (older boot: down), or not heard of yet
        return up.get(node, False)

    # -- claiming ------------------------------------------------------------------------

    async def claim_loop(self) -> None:
        while True:
            self._check()
            now = trio.current_time()
            if self._due and self._due[0][0] <= now:
                batch = []
                while self._due and self._due[0][0] <= now:
                    batch.append(heapq.heappop(self._due))
                try:
                    await self._claim(batch)
                except ClientClosedError:
                    return
                continue
            wait = TICK_S if not self._due else min(TICK_S, self._due[0][0] - now)
            await trio.sleep(wait)

    def _check(self) -> None:
        """Schedule claims for the wills of owners that are down; settle parked wills."""
        if not (self.loaded and self.liveness.loaded):
            return
        up = self.liveness.nodes()
        if self._parked:
            self._check_parked(up)
        now = trio.current_time()
        live = sorted(name for name, alive in up.items() if alive)
        for owner, keys in list(self.by_owner.items()):
            if not keys:
                continue
            sample = self.index[next(iter(keys))]
            if self._owner_up(owner[0], owner[1], sample.time, up):
                continue
            new = [self.index[key] for key in keys
                   if (key, self.index[key].revision) not in self._claims]
            if not new:
                continue
            if owner not in self._announced:
                self._announced.add(owner)
                log.warning("cluster: node %s (boot %d) dead: publishing %d wills of its "
                            "clients (%d after their Will Delay)", owner[0], owner[1],
                            len(keys), sum(1 for i in new if i.delay_s))
            for item in new:
                due = now + item.delay_s
                if live and live[zlib.crc32(item.key.encode()) % len(live)] != self.node.node:
                    due += self.claim_grace_s
                self._claims[(item.key, item.revision)] = due
                heapq.heappush(self._due, (due, item.key, item.revision))

    def _check_parked(self, up: dict[str, bool]) -> None:
        keep = []
        for item, parked_at in self._parked:
            if not self._owner_up(item.node, item.boot, item.time, up):
                self._publish(item, f"node {item.node} down, the client reconnected elsewhere")
                continue
            peer = self.liveness.peers.get(item.node)
            heard = float(peer.data.get("time", 0)) if peer is not None else 0.0
            if heard > parked_at + self.node.config.heartbeat_s:
                continue  # its node was alive after the reconnect: it holds that connection
            keep.append((item, parked_at))
        self._parked = keep

    async def _claim(self, batch: list[tuple[float, str, int]]) -> None:
        """Delete each will expecting the revision indexed (pipelined); publish those this
        node won."""
        assert self.kv is not None
        node = self.node
        sent = []
        for _due, key, revision in batch:
            item = self.index.get(key)
            if item is None or item.revision != revision:
                continue  # settled, rewritten or claimed meanwhile
            headers = {KV_OPERATION: "DEL", EXPECTED_LAST_SUBJECT_SEQ: str(revision)}
            reply = await node.client.request_start(self.kv.subject(key), b"", headers,
                                                    node.config.js_timeout_s)
            sent.append((item, PendingPubAck(reply)))
        for item, pending in sent:
            try:
                await pending.result()
            except WrongLastSequenceError:
                self.claim_conflicts += 1
                continue
            except ClientClosedError:
                raise
            except NatsError as exc:
                self.claim_failures += 1
                log.warning("cluster: claiming the will %s of node %s failed (%s); trying "
                            "again", item.key, item.node, exc)
                retry = trio.current_time() + min(MAX_BACKOFF_S, 0.5)
                heapq.heappush(self._due, (retry, item.key, item.revision))
                continue
            self.claimed += 1
            self._publish(item, f"node {item.node} dead")

    def _publish(self, item: Indexed, why: str) -> None:
        try:
            record = WillRecord.decode(item.value)
        except ValueError as exc:
            self.malformed += 1
            log.warning("cluster: the will %s of node %s cannot be read: %s", item.key,
                        item.node, exc)
            return
        engine = self.node.engine
        will = record.will
        acl = engine.acl
        if acl is not None and not acl.can_publish(record.client_id, record.username,
                                                   will.topic):
            self.denied += 1
            log.warning("cluster: the will of client %s (node %s) to %r is not published: "
                        "the ACL does not allow it", record.client_id, item.node, will.topic)
            return
        log.info("client %s: will published to %r (%s)", record.client_id, will.topic, why,
                 extra={"event": "will", "client_id": record.client_id, "topic": will.topic,
                        "reason": why})
        self.published += 1
        try:
            engine.publish(v5.will_message(will, time.time()))
        except Exception:  # a bug must cost one will, not the claiming task
            log.exception("cluster: publishing the will of client %s failed",
                          record.client_id)

    # -- state -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "cluster_wills_local": sum(1 for s in self.slots.values() if s.value is not None),
            "cluster_wills_indexed": len(self.index),
            "cluster_wills_pending_writes": self.pending,
            "cluster_wills_written": self.written,
            "cluster_wills_write_failures": self.write_failures,
            "cluster_wills_deleted": self.deleted,
            "cluster_wills_stale_deletes": self.stale_deletes,
            "cluster_wills_claimed": self.claimed,
            "cluster_wills_published_for_dead_nodes": self.published,
            "cluster_wills_claim_conflicts": self.claim_conflicts,
            "cluster_wills_claim_failures": self.claim_failures,
            "cluster_wills_cancelled": self.cancelled,
            "cluster_wills_denied": self.denied,
        }
