"""The ``$SYS`` topic tree: the broker's state as retained messages, every
``sys_interval_s``, with mosquitto 2.0's topic names and meanings (so that existing
dashboards and exporters work), plus mqttd's own under ``$SYS/broker/mqttd/``.

In cluster mode each node publishes its own tree (``$SYS`` topics never leave a node), with
``$SYS/broker/mqttd/cluster/...``: its name, its cluster counters, ``nodes/<node>`` (up
or down) for every node it knows, and ``total/<counter>``: the cluster's totals over the
nodes up, from their heartbeats (mqttd.cluster_view; the same on every node).

Values are published retained at QoS 0 when they change (the version and the uptime every
time), kept in memory only: they are rebuilt after a restart, never written to the store.
Loads are per-minute rates averaged over 1, 5 and 15 minutes, decaying exponentially as
mosquitto's are. Runs on the engine's timers (no trio here).
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from mqttd.engine.dispatch import Engine

PREFIX = "$SYS/broker/"
WINDOWS = (("1min", 60.0), ("5min", 300.0), ("15min", 900.0))


def version() -> str:
    try:
        return importlib.metadata.version("mqttd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@attrs.define(eq=False)
class Load:
    """Per-minute rate of a counter, averaged over 1, 5 and 15 minutes."""

    last: int = 0
    averages: list[float] = attrs.Factory(lambda: [0.0, 0.0, 0.0])

    def update(self, value: int, elapsed_s: float) -> None:
        if elapsed_s <= 0:
            return
        rate = (value - self.last) * 60.0 / elapsed_s
        self.last = value
        for index, (_name, window_s) in enumerate(WINDOWS):
            decay = math.exp(-elapsed_s / window_s)
            self.averages[index] = rate + decay * (self.averages[index] - rate)


@attrs.define(eq=False)
class SysTopics:
    engine: Engine
    interval_s: float
    started_at: float = attrs.Factory(time.time)
    version: str = attrs.Factory(version)
    max_connected: int = 0
    last_tick: float = 0.0
    loads: dict[str, Load] = attrs.Factory(dict)
    published: dict[str, bytes] = attrs.Factory(dict)  # topic -> last payload

    def start(self) -> None:
        self.last_tick = self.started_at
        self.engine.call_at(self.started_at, self.tick)

    def tick(self) -> None:
        """Publish what changed, and come back in ``interval_s``."""
        now = time.time()
        for topic, value in self.values(now).items():
            payload = value.encode()
            if self.published.get(topic) != payload or topic.endswith(("uptime", "version")):
                self.published[topic] = payload
                self.engine.publish_sys(topic, payload)
        self.engine.call_at(now + self.interval_s, self.tick)

    def values(self, now: float) -> dict[str, str]:
        """Every topic (without the ``$SYS/broker/`` prefix) and its value now."""
        engine = self.engine
        stats = engine.stats()
        connected = stats["connections"]
        self.max_connected = max(self.max_connected, connected)
        received, sent = stats["messages_received"], stats["messages_sent"]
        counters = {
            "messages/received": received,
            "messages/sent": sent,
            "bytes/received": stats["bytes_received"],
            "bytes/sent": stats["bytes_sent"],
            "connections": stats["connections_total"],
        }
        elapsed = now - self.last_tick
        self.last_tick = now
        values = {
            "version": f"mqttd version {self.version}",
            "uptime": f"{int(now - self.started_at)} seconds",
            "clients/connected": connected,
            "clients/disconnected": stats["sessions"] - stats["connected_sessions"],
            "clients/total": stats["sessions"],
            "clients/maximum": self.max_connected,
            "clients/expired": stats["sessions_expired"],
            "messages/received": received,
            "messages/sent": sent,
            "publish/messages/received": received,
            "publish/messages/sent": sent,
            "publish/messages/dropped": stats["dropped"] + stats["dropped_qos0"],
            "bytes/received": stats["bytes_received"],
            "bytes/sent": stats["bytes_sent"],
            "subscriptions/count": stats["subscriptions"],
            "retained messages/count": stats["retained"],
            "store/messages/count": stats["queued"] + stats["inflight"],
            "store/messages/bytes": stats["store_bytes"],
            # mqttd's own
            "mqttd/queued": stats["queued"],
            "mqttd/inflight": stats["inflight"],
            "mqttd/dropped/queue_full": stats["dropped"],
            "mqttd/dropped/qos0_backed_up": stats["dropped_qos0"],
            "mqttd/refused/queue_full": stats["refused"],
            "mqttd/refused/no_storage": stats["storage_refused"],
            "mqttd/refused/publish_rate": stats["rate_refused"],
            "mqttd/read_pauses": stats["read_pauses"],
            "mqttd/publisher_holds": stats["publisher_holds"],
            "mqttd/stalled_subscribers": stats["stalled_subscribers"],
            "mqttd/store/pending": stats["store_pending"],
            "mqttd/store/commits": stats["store_commits"],
            "mqttd/store/ok": stats["storage_ok"],
        }
        for name, value in counters.items():
            load = self.loads.setdefault(name, Load(value))
            load.update(value, elapsed)
            for (window, _), average in zip(WINDOWS, load.averages, strict=True):
                values[f"load/{name}/{window}"] = f"{average:.2f}"
        for bridge in engine.bridge_stats():
            values[f"connection/{bridge['name']}/state"] = int(bridge["state"] == "connected")
        if "cluster_ready" in stats:  # cluster mode: this node's view
            values["mqttd/cluster/node"] = engine.config.cluster.node
            for key, value in stats.items():
                if key.startswith("cluster_"):
                    values[f"mqttd/cluster/{key[8:]}"] = value
            for name, up in engine.cluster_nodes().items():
                values[f"mqttd/cluster/nodes/{name}"] = "up" if up else "down"
            overview = engine.cluster_overview()
            if overview is not None:  # the cluster's totals, from every node's heartbeat
                values["mqttd/cluster/total/nodes_up"] = overview["nodes_up"]
                for key, value in overview["totals"].items():
                    values[f"mqttd/cluster/total/{key}"] = value
        return {PREFIX + topic: str(value) for topic, value in values.items()}
