"""Shared subscriptions across the cluster: each message to one member of a group, whatever
node the member is on, with redelivery to another member when one fails or drops.

**Registry** (bucket MQTTD_GROUPS). While a node has at least one local member of
``$share/<group>/<filter>`` it keeps the key ``g.<name_key(name)>.<node>`` (the value: the
name). Every node watches the bucket and keeps a cluster-wide index of the groups (a
subscription trie of their filters). At start, after reading the bucket, a node deletes its
own keys of groups it no longer has (left there by a crash).

**Writing** (stream MQTTD_GQ, work-queue retention, ``cluster.replicas``). The node that
accepts a PUBLISH (client, will, bridge, dead letter, due delayed message) writes one copy
per matching group of the index to ``mqttd.g.<name_key(name)>``: the message's headers
(:mod:`~mqttd.clustering.wire`), its topic (``Mqttd-Topic``, as subject tokens) and a
``Nats-Msg-Id``. The writes are pipelined and their PubAcks taken in order by one task; a
failed write is sent again with the same id (the stream drops a duplicate). **The
PUBACK/PUBREC of a QoS 1/2 PUBLISH waits for the PubAcks of its copies**: the write submits
a :class:`persistence.ops.Barrier` to the store writer and this module holds the writer's
commits back below the ticket of the oldest write not yet stored (as
:mod:`~mqttd.clustering.retained` does). QoS 0 messages take the same path (one path, and a
group's QoS 0 messages are not lost while its members are away), without holding anything.
Above ``MAX_PENDING_WRITES`` writes waiting (NATS slow or away), the node stops reading its
clients until they drain.

**Reading.** Per group with local members the node runs one puller on the group's one
durable consumer (``g_<name_key>``, explicit acks, ``cluster.group_ack_wait_s``): it asks
for messages only when a connected local member has room in its inflight window (and its
unsent output is small), never more than that room, so nothing piles up here. Each message
goes to a local member (``ShareGroup.pick``, connected members only) as a
:class:`~mqttd.delivery.RemoteJob`, whose answer comes back here:

* acknowledged (PUBACK; QoS 2: PUBREC, when the member has the message; QoS 0 delivery: on
  sending): ``+ACK`` - the stream forgets it;
* rejected (5.0 reason code >= 0x80): ``-NAK`` with the work queue's retry delay, so any
  member on any node gets it again; after ``work_queues.max_deliveries`` deliveries it is a
  dead letter (published like any message) and acknowledged;
* its member's connection ended with it unacknowledged: ``-NAK`` at once;
* its node died: the stream delivers it again after the ack wait. While a member holds a
  job, its node says so every third of the ack wait (``+WPI``), so a slow member on a live
  node is not overtaken; a job delivered more than ``max_deliveries`` times is a dead
  letter (``ack_timeout``).

In cluster mode the router does not hand a group the messages itself (neither local
publishes nor those imported from other nodes: ``ShareGroup.cluster``); only node-local
topics (``$SYS``) reach a group directly.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd.cluster import pull
from mqttd.cluster.jetstream import PendingPubAck, StreamConfig, check_applied
from mqttd.cluster.kv import KeyValue, KvEntry
from mqttd.cluster.nats_protocol import Msg
from mqttd.cluster.nats_values import ClientClosedError, NatsError
from mqttd.clustering import subjects, wire
from mqttd.clustering.context import PipelinedWrites, watch_bucket
from mqttd.clustering.gate import NO_FLOOR
from mqttd.delivery import RemoteJob
from mqttd.share_groups import ShareGroup, deliver_to
from mqttd.topics import parse_shared
from mqttd.trie import SubscriptionTrie
from mqttd.workqueues import ACK_TIMEOUT, DISCONNECTED, REJECTED

if TYPE_CHECKING:
    from mqttd.clustering.context import NodeContext
    from mqttd.codec.packets import Publish

log = logging.getLogger("mqttd.cluster")

STREAM = "MQTTD_GQ"
BUCKET = "MQTTD_GROUPS"
GROUP_PREFIX = "mqttd.g."
TOPIC = "Mqttd-Topic"
MAX_PENDING_WRITES = 10_000  # above: clients are not read until the writes drain
MAX_BATCH = 64  # messages asked for at once per group
PULL_EXPIRES_S = 5.0  # how long one pull request waits for messages
PULL_HEARTBEAT_S = 0.25  # the server's idle heartbeat meanwhile (none for two: asked again)
ROOM_POLL_S = 0.25  # no room: look again after this (or when a member answers)
OUTBOX_ROOM_BYTES = 256 * 1024  # a member with more unsent output has no room
DUPLICATE_WINDOW_S = 120.0


@attrs.define(eq=False)
class GroupWrite:
    ticket: int  # the store's ticket of its Barrier (QoS 1/2) or at its time (QoS 0)
    hold: bool  # a QoS 1/2 message: its publisher's reply waits for the PubAck
    subject: str
    payload: bytes
    block: bytes
    pending: PendingPubAck | None = None  # None: not sent yet (or to be sent again)


@attrs.define(eq=False)
class KnownGroup:
    """A group of the cluster-wide index: its name and the nodes that have members."""

    name: str
    key: str
    filter: str
    nodes: set[str] = attrs.Factory(set)


@attrs.define(eq=False)
class LocalGroup:
    """A group with members on this node, and its puller."""

    name: str
    key: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    wake: trio.Event = attrs.Factory(trio.Event)
    held: dict[str, RemoteJob] = attrs.Factory(dict)  # ack subject -> job held by a member
    serving: bool = False  # a pull request of its consumer was answered
    consumer: pull.PullConsumer | None = None


def group_key(name: str) -> str:
    return subjects.name_key(name)


@attrs.define(eq=False)
class ClusterGroups(PipelinedWrites):
    node: NodeContext
    known: dict[str, KnownGroup] = attrs.Factory(dict)  # by key
    index: SubscriptionTrie = attrs.Factory(SubscriptionTrie)
    local: dict[str, LocalGroup] = attrs.Factory(dict)  # by name
    loaded: bool = False  # the bucket was read once
    published: set[str] = attrs.Factory(set)  # keys of this node's groups in the bucket
    writes: collections.deque[GroupWrite] = attrs.Factory(collections.deque)
    kv: KeyValue | None = None
    _unsent: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)  # writes
    _registry_changed: trio.Event = attrs.Factory(trio.Event)
    _nursery: trio.Nursery | None = None
    _seq: int = 0  # copies written by this boot (their Nats-Msg-Id)
    # counters
    written: int = 0  # copies stored in MQTTD_GQ
    write_retries: int = 0
    not_written: int = 0  # too large for the NATS server's max_payload
    delivered: int = 0  # jobs handed to a local member
    redelivered: int = 0  # of which were delivered before (anywhere)
    acked: int = 0
    nacked: int = 0  # given back to the stream (rejected, member gone, no member)
    dead_lettered: int = 0
    expired: int = 0
    malformed: int = 0

    # -- joining the engine ---------------------------------------------------------------

    def install(self) -> None:
        engine = self.node.engine
        shares = engine.shares
        shares.cluster = self
        for group in shares.groups.values():
            group.cluster = self
            self.group_added(group)
        self.node.gate.sources.append(self._oldest)

    def uninstall(self) -> None:
        engine = self.node.engine
        shares = engine.shares
        shares.cluster = None
        for group in shares.groups.values():
            group.cluster = None
        sources = self.node.gate.sources
        if self._oldest in sources:
            sources.remove(self._oldest)

    def _oldest(self) -> int:
        """The ticket of the oldest write a reply waits for (clustering.gate)."""
        for write in self.writes:
            if write.hold:
                return write.ticket
        return NO_FLOOR

    def _release(self) -> None:
        self.node.gate.release()

    async def ensure_stream(self) -> None:
        config = StreamConfig(
            STREAM, (GROUP_PREFIX + ">",), retention="workqueue",
            num_replicas=self.node.config.replicas, duplicate_window_s=DUPLICATE_WINDOW_S,
        )
        info = await self.node.js.ensure_stream(config)
        check_applied(config, info.config)
        self.kv = await KeyValue.create_bucket(self.node.js, BUCKET,
                                               replicas=self.node.config.replicas)

    async def run(self) -> None:
        """The tasks (after ensure_stream): writes, registry, index, pullers, progress."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._watch_loop)
            nursery.start_soon(self._registry_loop)
            nursery.start_soon(self._progress_loop)
            for group in list(self.local.values()):
                nursery.start_soon(self._serve, group)

    # -- ShareGroups' hooks ---------------------------------------------------------------

    def node_local(self, topic: str) -> bool:
        return subjects.is_node_local(topic)

    def group_added(self, group: ShareGroup) -> None:
        name = group.name
        if name in self.local:
            return
        local = self.local[name] = LocalGroup(name, group_key(name))
        self._registry_changed.set()
        if self._nursery is not None:
            self._nursery.start_soon(self._serve, local)

    def group_removed(self, group: ShareGroup) -> None:
        local = self.local.pop(group.name, None)
        if local is not None:
            local.scope.cancel()
            self._stop_pulling(local)
            self._registry_changed.set()

    # -- writing ------------------------------------------------------------------------------

    @property
    def congested(self) -> bool:
        return len(self.writes) >= MAX_PENDING_WRITES

    def export(self, message: Publish) -> None:
        """Write a copy of ``message`` for each group of the cluster it matches (called for
        every message this node accepts, in the publisher's reader)."""
        topic = message.topic
        if topic[:1] == "$" and subjects.is_node_local(topic):
            return
        matches = self.index.match(topic)
        if not matches:
            return
        node = self.node
        hold = message.qos > 0
        writer = node.engine.writer
        # the publisher's reply waits for this ticket (a Barrier's, if the packet wrote
        # nothing else to the store)
        ticket = node.gate.hold() if hold else (writer.ticket if writer is not None else 0)
        head = wire.header_block(node.origin, node.seq, message)[:-2] + (
            f"{TOPIC}: {subjects.tokens(topic)}\r\n".encode()
        )
        payload = message.payload
        client = node.client
        for target, _, _ in matches:
            known: KnownGroup = target  # type: ignore[assignment]
            self._seq += 1
            block = head + f"Nats-Msg-Id: {node.node}.{node.boot}.g{self._seq}\r\n\r\n".encode()
            if len(block) + len(payload) > client.max_payload:
                self.not_written += 1
                node.warn("group-large", "cluster: a message of %d bytes on %r is over the "
                          "NATS server's max_payload (%d); group %s does not get it",
                          len(payload), topic, client.max_payload, known.name)
                continue
            write = GroupWrite(ticket, hold, GROUP_PREFIX + known.key, payload, block)
            self._send_now_or_later(write, node.streams_ready)
            self.writes.append(write)
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_written(self) -> None:
        while self.writes:
            await self._changed.wait()

    async def _write_loop(self) -> None:
        """Take the PubAcks in order; send what is unsent (in order); retry failures."""
        writes = self.writes
        backoff = 0.05
        while True:
            if not writes:
                await self._changed.wait()
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
            except ClientClosedError:
                return
            except NatsError as exc:
                self.write_retries += 1
                self._send_again(write)
                self.node.warn("group-write", "cluster: storing a message for a group in "
                               "%s failed (%s); trying again", STREAM, exc)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 1.0)
                continue
            backoff = 0.05
            was_congested = self.congested
            writes.popleft()
            self.written += 1
            if write.hold:
                self._release()
            if was_congested and not self.congested:
                self.node.engine.notify_progress()
            self._wake()


    # -- the registry and the index ---------------------------------------------------------

    async def _watch_loop(self) -> None:
        assert self.kv is not None
        await watch_bucket(self.node, self.kv, "g.>", "groups-watch",
                           self._index_entry, self._index_loaded)

    def _index_entry(self, entry: KvEntry) -> None:
        parts = entry.key.split(".")
        if len(parts) != 3 or parts[0] != "g":
            return
        key, owner = parts[1], parts[2]
        if entry.operation != "PUT":
            self._index_remove(key, owner)
            return
        try:
            name = str(json.loads(entry.value)["name"])
            topic_filter = parse_shared(name)[1]
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        if owner == self.node.node and not self.loaded:
            self.published.add(key)
        known = self.known.get(key)
        if known is None:
            known = self.known[key] = KnownGroup(name, key, topic_filter)
            self.index.add(topic_filter, name, known, 2)
        known.nodes.add(owner)

    def _index_remove(self, key: str, owner: str) -> None:
        if owner == self.node.node and not self.loaded:
            self.published.discard(key)
        known = self.known.get(key)
        if known is None:
            return
        known.nodes.discard(owner)
        if not known.nodes:
            del self.known[key]
            self.index.remove(known.filter, known.name)

    def _index_loaded(self) -> None:
        if not self.loaded:
            self.loaded = True
            self._registry_changed.set()

    async def _registry_loop(self) -> None:
        """Keep this node's keys in the bucket as its local groups are (once it was read)."""
        kv = self.kv
        assert kv is not None
        me = self.node.node
        backoff = 0.05
        while True:
            await self._registry_changed.wait()
            self._registry_changed = trio.Event()
            if not self.loaded:
                continue
            try:
                for local in list(self.local.values()):
                    if local.key not in self.published:
                        value = json.dumps({"name": local.name}).encode()
                        await kv.put(f"g.{local.key}.{me}", value)
                        self.published.add(local.key)
                wanted = {local.key for local in self.local.values()}
                for key in list(self.published - wanted):
                    await kv.delete(f"g.{key}.{me}")
                    self.published.discard(key)
            except ClientClosedError:
                return
            except NatsError as exc:
                self.node.warn("groups-registry", "cluster: updating %s failed (%s); trying "
                               "again", BUCKET, exc)
                self._registry_changed.set()
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
                continue
            backoff = 0.05

    # -- reading: one puller per local group ---------------------------------------------------

    def _room(self, name: str) -> int:
        """Messages the group's connected members here can take now."""
        group = self.node.engine.shares.groups.get(name)
        if group is None:
            return 0
        room = 0
        for session, _, _ in group.members.values():
            conn = session.connection
            if conn is None or session.queued or conn.outbox_bytes >= OUTBOX_ROOM_BYTES:
                continue
            room += max(0, session.max_inflight - len(session.inflight))
        return room

    async def _serve(self, local: LocalGroup) -> None:
        node = self.node
        durable = f"g_{local.key}"
        config = pull.DurableConfig(durable, GROUP_PREFIX + local.key,
                                    ack_wait_s=node.config.group_ack_wait_s)
        consumer = local.consumer = pull.PullConsumer(node.js, STREAM, durable,
                                                      lambda msg: self._on_job(local, msg))
        backoff = 0.05
        with local.scope:
            try:
                while True:
                    try:
                        await pull.ensure_durable(node.js, STREAM, config)
                        break
                    except ClientClosedError:
                        return
                    except NatsError as exc:
                        node.warn("groups-consumer", "cluster: creating the consumer of %s "
                                  "failed (%s); trying again", local.name, exc)
                        await trio.sleep(backoff)
                        backoff = min(2 * backoff, 2.0)
                consumer.open()
                while True:
                    room = self._room(local.name)
                    if room <= 0:
                        local.wake = trio.Event()
                        with trio.move_on_after(ROOM_POLL_S):
                            await local.wake.wait()
                        continue
                    await consumer.fetch(min(room, MAX_BATCH), PULL_EXPIRES_S, PULL_HEARTBEAT_S)
                    local.serving = consumer.ended_by != pull.LOST
                    if consumer.ended_by == pull.STATUS_NO_RESPONDERS:
                        await self._recreate(local, config)
                    elif consumer.ended_by == pull.STATUS_CONFLICT:
                        await trio.sleep(0.1)
            except ClientClosedError:
                return
            finally:
                consumer.close()
                local.consumer = None

    async def _recreate(self, local: LocalGroup, config: pull.DurableConfig) -> None:
        """The consumer is not there (deleted, JetStream unavailable): make it again."""
        node = self.node
        try:
            await pull.ensure_durable(node.js, STREAM, config)
        except ClientClosedError:
            raise
        except NatsError as exc:
            node.warn("groups-consumer", "cluster: the consumer of %s is not available (%s)",
                      local.name, exc)
            await trio.sleep(0.5)

    def _on_job(self, local: LocalGroup, msg: Msg) -> None:
        """A message of the group from the stream (in the NATS reader task): to a member."""
        js = self.node.js
        reply = msg.reply or ""
        info = pull.delivery_of(reply)
        if info is None:
            self.malformed += 1
            return
        try:
            tokens = msg.header(TOPIC)
            if tokens is None:
                raise ValueError(f"no {TOPIC} header")
            topic = subjects.topic_of(subjects.LIVE_PREFIX + tokens, subjects.LIVE_PREFIX)
            message = wire.decode(topic, msg.payload, msg.headers).message
        except ValueError as exc:
            self.malformed += 1
            self.node.warn("malformed", "cluster: not an mqttd message in %s: %s", STREAM, exc)
            pull.term(js, reply)
            return
        name = local.name
        engine = self.node.engine
        group = engine.shares.groups.get(name)
        member = group.pick(message.qos, connected=True) if group is not None else None
        if member is None:  # its members left a moment ago
            pull.nak(js, reply)
            self.nacked += 1
            return
        if message.expires_at is not None and message.expires_at <= time.time():
            pull.ack(js, reply)
            self.expired += 1
            engine.work_queues.counts(name).expired += 1
            return
        work_queues = engine.work_queues
        if info.delivered > work_queues.settings(name).max_deliveries:
            # delivered that often and never settled: its members' nodes died holding it
            self._dead_letter(name, message, info.delivered - 1, ACK_TIMEOUT, reply)
            return
        job = RemoteJob(name, info.delivered, 0.0, False, self, reply)
        assert group is not None
        group.delivered += 1
        self.delivered += 1
        if info.delivered > 1:
            self.redelivered += 1
            group.redelivered += 1
        deliver_to(member, message, message.qos, None, job)
        if not (message.qos and member[1]):  # a QoS 0 delivery: done once sent
            pull.ack(js, reply)
            self.acked += 1
            work_queues.counts(name).acked += 1
        else:
            local.held[reply] = job

    def _dead_letter(self, name: str, message: Publish, deliveries: int, reason: str,
                     reply: str, reason_code: int | None = None) -> None:
        self.node.engine.work_queues.dead_letter(name, message, deliveries, time.time(),
                                                 reason, reason_code)
        self.dead_lettered += 1
        pull.ack(self.node.js, reply)

    # -- what members answer (JobOwner) ----------------------------------------------------------

    def _settle(self, job: RemoteJob) -> None:
        local = self.local.get(job.share)
        if local is not None:
            local.held.pop(job.token, None)
            local.wake.set()

    def settled(self, job: RemoteJob, session: Any, message: Publish, reason_code: int) -> None:
        self._settle(job)
        work_queues = self.node.engine.work_queues
        counts = work_queues.counts(job.share)
        if reason_code < 0x80:
            pull.ack(self.node.js, job.token)
            self.acked += 1
            counts.acked += 1
            return
        counts.rejected += 1
        if job.deliveries >= work_queues.settings(job.share).max_deliveries:
            self._dead_letter(job.share, message, job.deliveries, REJECTED, job.token,
                              reason_code)
            return
        counts.retries += 1
        pull.nak(self.node.js, job.token, work_queues.retry_delay(job.share, job.deliveries))
        self.nacked += 1

    def _stop_pulling(self, local: LocalGroup) -> None:
        """No connected member here: end the open pull request (its reply subscription
        goes, so the server skips it) before anything is given back, or the stream would
        hand it straight back to that request."""
        if local.consumer is not None:
            local.consumer.close()

    def given_back(self, job: RemoteJob, session: Any, message: Publish, sent: bool) -> None:
        local = self.local.get(job.share)
        group = self.node.engine.shares.groups.get(job.share)
        if local is not None and (group is None or not any(
            member[0].connection is not None for member in group.members.values()
        )):
            self._stop_pulling(local)
        self._settle(job)
        work_queues = self.node.engine.work_queues
        if sent and job.deliveries >= work_queues.settings(job.share).max_deliveries:
            self._dead_letter(job.share, message, job.deliveries, DISCONNECTED, job.token)
            return
        if sent:
            work_queues.counts(job.share).retries += 1
        pull.nak(self.node.js, job.token)
        self.nacked += 1

    async def _progress_loop(self) -> None:
        """Tell the stream every third of the ack wait that held jobs are being worked on."""
        js = self.node.js
        interval = self.node.config.group_ack_wait_s / 3
        while True:
            await trio.sleep(interval)
            for local in list(self.local.values()):
                for token in list(local.held):
                    pull.in_progress(js, token)

    # -- state ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "cluster_groups_known": len(self.known),
            "cluster_groups_local": len(self.local),
            "cluster_groups_serving": sum(local.serving for local in self.local.values()),
            "cluster_groups_written": self.written,
            "cluster_groups_pending": len(self.writes),
            "cluster_groups_write_retries": self.write_retries,
            "cluster_groups_not_written": self.not_written,
            "cluster_groups_delivered": self.delivered,
            "cluster_groups_redelivered": self.redelivered,
            "cluster_groups_acked": self.acked,
            "cluster_groups_nacked": self.nacked,
            "cluster_groups_dead_lettered": self.dead_lettered,
            "cluster_groups_expired": self.expired,
            "cluster_groups_held": sum(len(local.held) for local in self.local.values()),
        }
