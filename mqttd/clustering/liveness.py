"""Which nodes are up: the key-value bucket MQTTD_NODES, one key ``n.<node>`` per node.

Every ``cluster.heartbeat_s`` a node puts a small JSON snapshot under its key: its boot id,
``state`` (``alive``; ``stopped`` when it shuts down in order), the time (epoch seconds)
and the counters an operator sums over the nodes (:data:`mqttd.cluster_view.COUNTERS`:
connections, sessions, messages and bytes received and sent, retained, queued, dropped,
exported, imported): one JSON document of about 300 bytes. Every node watches the bucket
(``peers``), which gives the cluster-wide view (:meth:`Liveness.overview`); a node whose
last heartbeat is older than
``cluster.node_dead_after_s``, or that said ``stopped``, is reported down (``$SYS``,
``/metrics``) and its clients' wills are published by another node
(:mod:`mqttd.clustering.wills`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd import cluster_view
from mqttd.cluster.kv import KeyValue, KvEntry
from mqttd.cluster.nats_values import ClientClosedError, NatsError
from mqttd.clustering.context import watch_bucket
from mqttd.clustering.subjects import NODE_LOCAL_PREFIXES

if TYPE_CHECKING:
    from mqttd.clustering.context import NodeContext

log = logging.getLogger("mqttd.cluster")

BUCKET = "MQTTD_NODES"
MAX_AGE_S = 86400.0  # a node gone for a day leaves the bucket


@attrs.define(eq=False)
class Peer:
    state: str
    seen_at: float  # trio clock: when its last heartbeat was written
    data: dict[str, Any]


@attrs.define(eq=False)
class Liveness:
    node: NodeContext
    kv: KeyValue | None = None
    peers: dict[str, Peer] = attrs.Factory(dict)
    heartbeats: int = 0
    failures: int = 0
    loaded: bool = False  # the watch delivered every node's last heartbeat (wills wait)

    async def ensure_bucket(self) -> None:
        self.kv = await KeyValue.create_bucket(
            self.node.js, BUCKET, replicas=self.node.config.replicas, max_age_s=MAX_AGE_S
        )

    def snapshot(self, state: str = "alive") -> bytes:
        return json.dumps(self.snapshot_data(state), separators=(",", ":")).encode()

    def snapshot_data(self, state: str = "alive") -> dict[str, Any]:
        node = self.node
        engine = node.engine
        retained = engine.retained
        shared = len(retained) - sum(len(retained.match(prefix + "/#"))
                                     for prefix in NODE_LOCAL_PREFIXES)
        return {
            "node": node.node, "boot": node.boot, "state": state, "time": time.time(),
            **cluster_view.counters(engine.stats(), shared, node.exported, node.imported),
        }

    async def heartbeat_loop(self) -> None:
        assert self.kv is not None
        key = f"n.{self.node.node}"
        while True:
            try:
                await self.kv.put(key, self.snapshot())
                self.heartbeats += 1
            except ClientClosedError:
                return
            except NatsError as exc:
                self.failures += 1
                self.node.warn("heartbeat", "cluster: heartbeat to %s failed: %s", BUCKET, exc)
            await trio.sleep(self.node.config.heartbeat_s)

    async def farewell(self) -> None:
        """Shutting down in order: say so, so that the others do not take it for dead."""
        if self.kv is not None:
            await self.kv.put(f"n.{self.node.node}", self.snapshot("stopped"))

    async def watch_loop(self) -> None:
        assert self.kv is not None
        await watch_bucket(self.node, self.kv, "n.>", "watch", self._seen, self._loaded)

    def _loaded(self) -> None:
        """The watch has delivered every node's last heartbeat."""
        self.loaded = True

    def _seen(self, entry: KvEntry) -> None:
        name = entry.key[2:]
        if entry.operation != "PUT":
            self.peers.pop(name, None)
            return
        try:
            data = json.loads(entry.value)
            age = max(0.0, time.time() - float(data["time"]))
            state = str(data["state"])
        except (ValueError, KeyError, TypeError):
            return
        self.peers[name] = Peer(state, trio.current_time() - age, data)

    def nodes(self) -> dict[str, bool]:
        """Every node known (this one included): whether it is up."""
        now = trio.current_time()
        dead_after = self.node.config.node_dead_after_s
        result = {
            name: cluster_view.is_up(peer.state, now - peer.seen_at, dead_after)
            for name, peer in self.peers.items()
        }
        result[self.node.node] = True
        return result

    def overview(self) -> dict[str, Any]:
        """The cluster-wide view (:func:`mqttd.cluster_view.overview`) from the last
        heartbeat of every node known; this node's own until the watch brings back the
        one of this boot is a snapshot taken now."""
        node = self.node
        now = trio.current_time()
        beats = [cluster_view.Heartbeat(name, now - peer.seen_at, peer.data)
                 for name, peer in self.peers.items() if name != node.node]
        own = self.peers.get(node.node)
        if own is not None and own.data.get("boot") == node.boot:
            beats.append(cluster_view.Heartbeat(node.node, now - own.seen_at, own.data))
        else:
            beats.append(cluster_view.Heartbeat(node.node, 0.0, self.snapshot_data()))
        return cluster_view.overview(node.node, beats, node.config.node_dead_after_s)
