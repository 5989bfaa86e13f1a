"""The cluster-wide view, from the nodes' heartbeats (bucket MQTTD_NODES,
:mod:`mqttd.clustering.liveness`): every node known, up or down, with the counters its last
heartbeat carried, and the totals over the nodes that are up. Pure functions over the
snapshots (no trio, no NATS): the admin API (``GET /api/v1/cluster``), ``$SYS``
(``$SYS/broker/mqttd/cluster/total/<counter>``), ``/metrics``
(``mqttd_cluster_node_<counter>{node=...}``) and ``mqttd ctl cluster`` show what
:func:`overview` returns.

The view is as fresh as the heartbeats (``cluster.heartbeat_s``), and every node computes
it from the same snapshots, its own included: each node shows the same totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# (counter, what it is): in the heartbeat, per node in the view, and in the totals
COUNTERS: tuple[tuple[str, str], ...] = (
    ("connections", "Clients connected to the node."),
    ("sessions", "Sessions held by the node (its connected clients, and persistent sessions "
     "away)."),
    ("messages_received", "PUBLISH packets the node received from its clients."),
    ("messages_sent", "PUBLISH packets the node sent to its clients."),
    ("bytes_received", "Bytes the node received from its clients."),
    ("bytes_sent", "Bytes the node sent to its clients."),
    ("retained", "Retained messages of the cluster held by the node (not its own $SYS "
     "topics)."),
    ("queued", "Messages queued for the node's sessions."),
    ("dropped", "Messages the node dropped, every reason summed."),
    ("exported", "Messages accepted by the node and published to the other nodes."),
    ("imported", "Messages from other nodes routed to the node's subscribers."),
)
COUNTER_NAMES = tuple(name for name, _ in COUNTERS)
# every node holds the whole retained set of the cluster: the total is the largest count,
# not the sum (the nodes converge to the same one)
LARGEST = frozenset({"retained"})
# the engine's stats keys of every drop reason (mqttd.metrics: mqttd_messages_dropped_total)
DROP_KEYS = ("dropped", "dropped_qos0")


@dataclass(frozen=True)
class Heartbeat:
    """A node's last heartbeat: its name, how old it is, and its JSON document."""

    node: str
    age_s: float
    data: Mapping[str, Any]


def counters(stats: Mapping[str, Any], retained: int, exported: int,
             imported: int) -> dict[str, int]:
    """The counters a heartbeat carries, from the engine's stats (``Engine.stats()``)."""
    return {
        "connections": int(stats["connections"]),
        "sessions": int(stats["sessions"]),
        "messages_received": int(stats["messages_received"]),
        "messages_sent": int(stats["messages_sent"]),
        "bytes_received": int(stats["bytes_received"]),
        "bytes_sent": int(stats["bytes_sent"]),
        "retained": retained,
        "queued": int(stats["queued"]),
        "dropped": sum(int(stats.get(key, 0)) for key in DROP_KEYS),
        "exported": exported,
        "imported": imported,
    }


def is_up(state: str, age_s: float, dead_after_s: float) -> bool:
    """A node is up while it says ``alive`` and its last heartbeat is recent."""
    return state == "alive" and age_s < dead_after_s


def _counter(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None  # not there (a node of an older version) or not a count


def totals(nodes: Iterable[Mapping[str, int | None]]) -> dict[str, int]:
    """The counters over the given nodes: summed, but ``retained`` (the largest). A node
    without a counter adds nothing to it."""
    result = dict.fromkeys(COUNTER_NAMES, 0)
    for node in nodes:
        for name in COUNTER_NAMES:
            value = node.get(name)
            if value is None:
                continue
            result[name] = max(result[name], value) if name in LARGEST else result[name] + value
    return result


def overview(this: str, heartbeats: Iterable[Heartbeat], dead_after_s: float) -> dict[str, Any]:
    """The view of node ``this``: every node (by name) with ``up``, ``state``, ``boot``,
    ``heartbeat_age_s`` and ``counters`` (None where its heartbeat lacks one), and the
    ``totals`` over the nodes that are up. ``this`` node is up (it is answering)."""
    nodes: list[dict[str, Any]] = []
    counted: list[dict[str, int | None]] = []  # of the nodes up
    for beat in sorted(heartbeats, key=lambda b: b.node):
        data = beat.data
        state = str(data.get("state", "unknown"))
        boot = data.get("boot")
        up = beat.node == this or is_up(state, beat.age_s, dead_after_s)
        values = {name: _counter(data, name) for name in COUNTER_NAMES}
        nodes.append({
            "node": beat.node,
            "up": up,
            "state": state,
            "boot": boot if isinstance(boot, int) and not isinstance(boot, bool) else None,
            "heartbeat_age_s": round(max(0.0, beat.age_s), 3),
            "counters": values,
        })
        if up:
            counted.append(values)
    return {
        "node": this,
        "nodes_known": len(nodes),
        "nodes_up": len(counted),
        "nodes": nodes,
        "totals": totals(counted),
    }
