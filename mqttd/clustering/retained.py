"""Retained messages cluster-wide: the JetStream stream MQTTD_RET (subjects ``mqttd.r.>``, one
message per subject, ``cluster.replicas`` replicas).

Writing. A retained PUBLISH accepted on a node is set in its local store at once (as on a
single node: SQLite too, so a restart starts from it) and published to
``mqttd.r.<topic>`` with ``Nats-Msg-Id`` (an empty payload and ``Mqttd-Op: del`` for a
delete: a tombstone, kept as the subject's last message). The writes are pipelined and
their PubAcks taken in order by one task; a write that fails (no responders during a
stream leader election, a timeout, a lost connection) is sent again with the same id until
it is stored, unless a later write to the same topic is already on its way. Writes wait, in
order, while NATS is unreachable.

Acknowledging. A QoS 1/2 retained PUBLISH writes to the local store, so its PUBACK/PUBREC
already waits for a store ticket (``BrokerState.reply``). The node sits between the store
writer and the engine: the commit it passes on is the store's, but never at or past the
ticket of the oldest retained write not yet acknowledged by JetStream. So the reply goes
only when the message is in SQLite *and* in MQTTD_RET with its replicas (replies queued
behind it on any connection wait too, a few milliseconds; during a NATS outage, until
NATS is back).

Reading. Each node follows the stream with an ordered consumer (the last message per
subject, then every new one) and applies it to its local store, so a subscriber on any node
gets what was retained on any other. The stream's order decides between nodes writing the
same topic; a node's own write is in its local store before the stream has it, so while
one of its writes to a topic is on its way it skips what the stream delivers for that
topic before it (the stream will end on its write). At the end of the first replay
(``loaded``; /readyz waits for it), a retained message the local store had at start and
the stream does not (a node that was single before, a write lost with a crash before it
reached NATS) is published to the stream.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd import v5
from mqttd.cluster import consumer
from mqttd.cluster.jetstream import PendingPubAck, StoredMsg, StreamConfig, check_applied
from mqttd.cluster.nats_values import ClientClosedError, NatsError
from mqttd.clustering import subjects, wire
from mqttd.clustering.context import PipelinedWrites
from mqttd.clustering.gate import NO_FLOOR
from mqttd.codec.packets import Publish
from persistence import ops

if TYPE_CHECKING:
    from mqttd.clustering.context import NodeContext

log = logging.getLogger("mqttd.cluster")

STREAM = "MQTTD_RET"


@attrs.define(eq=False)
class RetainedWrite:
    ticket: int  # the store's ticket after this message's SetRetained/DeleteRetained
    subject: str
    topic: str
    seq: int
    payload: bytes
    block: bytes
    pending: PendingPubAck | None = None  # None: not sent yet (or to be sent again)


@attrs.define(eq=False)
class RetainedSync(PipelinedWrites):
    node: NodeContext
    writes: collections.deque[RetainedWrite] = attrs.Factory(collections.deque)
    loaded: bool = False  # the first replay of the stream is done
    # topic -> the number of this node's last write to it, until the stream delivers it
    own_pending: dict[str, int] = attrs.Factory(dict)
    # topics the local store held at start that the stream has not delivered yet
    restored: set[str] | None = None
    _unsent: int = 0  # writes with pending None
    _changed: trio.Event = attrs.Factory(trio.Event)
    _last_seq: int = 0  # the stream sequence last applied
    # counters
    stored: int = 0
    retries: int = 0
    imported: int = 0

    # -- joining the engine ---------------------------------------------------------------

    def install(self) -> None:
        engine = self.node.engine
        self.restored = {
            topic for topic, _ in engine.retained.items() if not subjects.is_node_local(topic)
        }
        self.node.gate.sources.append(self._oldest)

    def uninstall(self) -> None:
        sources = self.node.gate.sources
        if self._oldest in sources:
            sources.remove(self._oldest)

    def _oldest(self) -> int:
        return self.writes[0].ticket if self.writes else NO_FLOOR

    def _release(self) -> None:
        self.node.gate.release()

    async def ensure_stream(self) -> None:
        config = StreamConfig(
            STREAM, (subjects.RETAINED_PREFIX + ">",), num_replicas=self.node.config.replicas,
            max_msgs_per_subject=1, allow_direct=True,
        )
        info = await self.node.js.ensure_stream(config)
        check_applied(config, info.config)

    # -- writing ------------------------------------------------------------------------------

    def export(self, message: Publish, seq: int) -> None:
        """Queue the write of a retained message (or of its delete) to MQTTD_RET."""
        node = self.node
        topic = message.topic
        subject = subjects.subject(subjects.RETAINED_PREFIX, topic)
        if subject is None:
            return  # $SYS, or too long (counted by the live path)
        block = wire.header_block(node.origin, seq, message,
                                  msg_id=f"{node.node}.{node.boot}.{seq}",
                                  delete=not message.payload)
        writer = node.engine.writer
        write = RetainedWrite(writer.ticket if writer is not None else 0, subject, topic, seq,
                              message.payload, block)
        self.own_pending[topic] = seq
        if self.restored is not None:
            self.restored.discard(topic)
        self._send_now_or_later(write, node.streams_ready)
        self.writes.append(write)
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_written(self) -> None:
        while self.writes:
            await self._changed.wait()

    async def write_loop(self) -> None:
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
                if not self._superseded(write):
                    self.retries += 1
                    self._send_again(write)
                    self.node.warn("retained", "cluster: storing the retained message of "
                                   "%r in MQTTD_RET failed (%s); trying again", write.topic, exc)
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, 1.0)
                    continue
            backoff = 0.05
            writes.popleft()
            self.stored += 1
            self._release()
            self._wake()


    def _superseded(self, write: RetainedWrite) -> bool:
        """A later write to the same topic is queued: it wins, this one need not be stored."""
        later = False
        for other in self.writes:
            if later and other.subject == write.subject:
                return True
            later = later or other is write
        return False

    # -- reading --------------------------------------------------------------------------------

    async def follow(self) -> None:
        """Apply the stream to the local store: the last message per subject, then every
        new one; after a failure, from the next sequence."""
        node = self.node
        backoff = 0.05
        while True:
            try:
                start: dict[str, Any] = (
                    {"start_seq": self._last_seq + 1, "deliver_policy": "all"}
                    if self._last_seq else {"deliver_policy": "last_per_subject"}
                )
                async with consumer.watch(
                    node.js, STREAM, subjects.RETAINED_PREFIX + ">",
                    heartbeat_s=max(1.0, node.config.heartbeat_s), **start,
                ) as messages:
                    backoff = 0.05
                    async for stored in messages:
                        if stored is None:
                            self._loaded()
                        else:
                            self._apply(stored)
            except (ClientClosedError, trio.EndOfChannel):
                return  # stopping
            except NatsError as exc:
                node.warn("follow", "cluster: following MQTTD_RET failed (%s); trying again",
                          exc)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)

    def _apply(self, stored: StoredMsg) -> None:
        node = self.node
        self._last_seq = max(self._last_seq, stored.seq)
        try:
            topic = subjects.topic_of(stored.subject, subjects.RETAINED_PREFIX)
            received = wire.decode(topic, stored.payload, stored.headers)
        except ValueError as exc:
            node.malformed += 1
            node.warn("malformed", "cluster: not an mqttd message in MQTTD_RET on %s: %s",
                      stored.subject, exc)
            return
        pending = self.own_pending.get(topic)
        if pending is not None:
            # this node wrote the topic and the stream has not given that write back yet:
            # the stream will end on it, and the local store already has it
            if received.node == node.node and received.boot == node.boot and (
                received.seq >= pending
            ):
                del self.own_pending[topic]
            return
        if self.restored is not None:
            self.restored.discard(topic)
        self.imported += 1
        engine = node.engine
        writer = engine.writer
        message = received.message
        if received.deleted or not message.payload:
            if engine.retained.delete(topic) and writer is not None:
                writer.submit(ops.DeleteRetained(topic))
            return
        engine.retained.set(topic, message)
        if writer is not None:
            writer.submit(ops.SetRetained(
                topic, message.payload, message.qos,
                v5.stored_properties(message) if message.properties else None,
                message.expires_at,
            ))

    def _loaded(self) -> None:
        """The first replay is done: publish what only the local store has."""
        if self.loaded:
            return
        self.loaded = True
        restored, self.restored = self.restored or set(), None
        retained = self.node.engine.retained
        local_only = [m for m in (retained.get(t) for t in sorted(restored))
                      if isinstance(m, Publish)]
        for message in local_only:
            self.node.seq += 1
            self.export(message, self.node.seq)
        log.info("cluster node %s: retained messages loaded from MQTTD_RET (%d kept here; %d "
                 "of them were not in the stream and were published to it)", self.node.node,
                 sum(not subjects.is_node_local(t) for t, _ in retained.items()),
                 len(local_only))
