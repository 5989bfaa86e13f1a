"""What the parts of a cluster node (retained, liveness) use of the node itself
(:class:`mqttd.clustering.node.ClusterNode` is it; the parts sit below it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from mqttd.cluster.jetstream import JetStream
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
