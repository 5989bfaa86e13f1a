"""What the parts of a cluster node (retained, liveness) use of the node itself
(:class:`mqttd.clustering.node.ClusterNode` is it; the parts sit below it), and what they
share: pipelined writes to a stream, and the watch of a KV bucket."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from mqttd.cluster.jetstream import PendingPubAck
from mqttd.cluster.nats_values import ClientClosedError, NatsError

if TYPE_CHECKING:
    from mqttd.cluster.jetstream import JetStream
    from mqttd.cluster.kv import KeyValue, KvEntry
    from mqttd.cluster.nats_client import NatsClient
    from mqttd.clustering.gate import CommitGate
    from mqttd.config import Cluster
    from mqttd.engine.dispatch import Engine


class NodeContext(Protocol):
    engine: Engine
    config: Cluster
    client: NatsClient
    js: JetStream
    gate: CommitGate
    node: str  # the node's name
    boot: int
    origin: str  # "<node> <boot> "
    seq: int  # the number of the last message exported
    streams_ready: bool
    exported: int
    imported: int
    malformed: int

    def warn(self, kind: str, message: str, *args: Any) -> None: ...

    @property
    def nursery(self) -> trio.Nursery | None: ...

    def nodes(self) -> dict[str, bool]:
        """Every node known: whether it is up (mqttd.clustering.liveness)."""
        ...

    def nodes_loaded(self) -> bool:
        """Whether every node's last heartbeat has been read once."""
        ...


class PipelinedWrite(Protocol):
    subject: str
    payload: bytes
    block: bytes  # the header block
    pending: PendingPubAck | None  # None: not sent yet (or to be sent again)


class PipelinedWrites:
    """What the writers of retained messages, queue copies and group copies share: their
    writes are pipelined, each to be sent (again) while its ``pending`` is None."""

    node: NodeContext
    writes: Sequence[PipelinedWrite]
    _unsent: int  # writes with pending None

    def _send_now_or_later(self, write: PipelinedWrite, ready: bool) -> None:
        """Send ``write`` at once when the stream is ``ready`` and no earlier write waits to
        be sent (that keeps them in order); otherwise, or when the client cannot take it now,
        count it unsent, for :meth:`_send_unsent`. The caller then queues it in ``writes``."""
        if ready and not self._unsent:
            node = self.node
            try:
                write.pending = PendingPubAck(node.client.request_nowait(
                    write.subject, write.payload, write.block, node.config.js_timeout_s))
            except (trio.WouldBlock, NatsError):
                pass
        if write.pending is None:
            self._unsent += 1

    def _send_again(self, write: PipelinedWrite) -> None:
        """``write`` failed: :meth:`_send_unsent` sends it again (with the same Nats-Msg-Id,
        so the stream stores it once)."""
        write.pending = None
        self._unsent += 1

    async def _send_unsent(self) -> None:
        """Send, in order, the writes not sent yet (or to be sent again)."""
        client = self.node.client
        timeout_s = self.node.config.js_timeout_s
        for write in list(self.writes):
            if write.pending is None:
                reply = await client.request_start(write.subject, write.payload, write.block,
                                                   timeout_s)
                write.pending = PendingPubAck(reply)
                self._unsent -= 1


async def watch_bucket(
    node: NodeContext,
    kv: KeyValue,
    keys: str,
    warn_kind: str,
    on_entry: Callable[[KvEntry], None],
    on_loaded: Callable[[], None],
    max_backoff_s: float = 2.0,
) -> None:
    """Follow the ``keys`` of a KV bucket: every entry (deletes included) to ``on_entry``,
    ``on_loaded`` once the current ones are all delivered, then every change. When the
    watch fails, warn and watch again after a backoff; return when the client closes."""
    backoff = 0.05
    while True:
        try:
            async with kv.watch(keys, heartbeat_s=max(1.0, node.config.heartbeat_s)) as entries:
                backoff = 0.05
                async for entry in entries:
                    if entry is None:
                        on_loaded()
                    else:
                        on_entry(entry)
        except (ClientClosedError, trio.EndOfChannel):
            return  # stopping
        except NatsError as exc:
            node.warn(warn_kind, "cluster: watching %s failed (%s); trying again",
                      kv.bucket, exc)
            await trio.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)
