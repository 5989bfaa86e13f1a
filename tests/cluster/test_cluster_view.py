"""The cluster-wide view (mqttd.cluster_view): a pure function over the nodes' heartbeat
snapshots, and how /metrics renders it. No NATS here."""

from __future__ import annotations

from typing import Any

from mqttd import cluster_view, metrics
from mqttd.cluster_view import COUNTER_NAMES, Heartbeat, overview

DEAD_AFTER_S = 2.0


def beat(node: str, age_s: float = 0.1, state: str = "alive", boot: int = 7,
         **values: int) -> Heartbeat:
    counters = dict.fromkeys(COUNTER_NAMES, 0)
    counters.update(values)
    return Heartbeat(node, age_s, {"node": node, "boot": boot, "state": state, "time": 0.0,
                                   **counters})


def test_totals_sum_the_nodes_up_and_retained_is_the_largest() -> None:
    view = overview("a", [
        beat("b", connections=2, messages_received=10, messages_sent=4, bytes_received=100,
             bytes_sent=40, sessions=3, queued=5, dropped=1, retained=8, exported=10,
             imported=3),
        beat("a", connections=1, messages_received=5, messages_sent=7, bytes_received=50,
             bytes_sent=70, sessions=1, queued=0, dropped=2, retained=9, exported=5,
             imported=10),
    ], DEAD_AFTER_S)
    assert view["node"] == "a"
    assert [n["node"] for n in view["nodes"]] == ["a", "b"]  # by name
    assert (view["nodes_known"], view["nodes_up"]) == (2, 2)
    assert view["totals"] == {
        "connections": 3, "sessions": 4, "messages_received": 15, "messages_sent": 11,
        "bytes_received": 150, "bytes_sent": 110, "retained": 9, "queued": 5, "dropped": 3,
        "exported": 15, "imported": 13,
    }
    b = view["nodes"][1]
    assert b == {"node": "b", "up": True, "state": "alive", "boot": 7,
                 "heartbeat_age_s": 0.1, "counters": b["counters"]}
    assert b["counters"]["connections"] == 2 and list(b["counters"]) == list(COUNTER_NAMES)


def test_nodes_down_are_listed_but_not_counted() -> None:
    view = overview("a", [
        beat("a", connections=1),
        beat("late", age_s=DEAD_AFTER_S + 0.5, connections=100),  # heartbeat too old
        beat("gone", state="stopped", connections=1000),  # stopped in order
        beat("c", age_s=DEAD_AFTER_S - 0.5, connections=10),
    ], DEAD_AFTER_S)
    up = {n["node"]: n["up"] for n in view["nodes"]}
    assert up == {"a": True, "c": True, "gone": False, "late": False}
    assert (view["nodes_known"], view["nodes_up"]) == (4, 2)
    assert view["totals"]["connections"] == 11
    gone = next(n for n in view["nodes"] if n["node"] == "gone")
    assert gone["state"] == "stopped" and gone["counters"]["connections"] == 1000


def test_this_node_is_up_whatever_its_last_heartbeat_says() -> None:
    """The node answering is up (as Liveness.nodes() says), even if its own heartbeat is
    late (NATS slow) or not there yet."""
    view = overview("a", [beat("a", age_s=60.0, connections=3)], DEAD_AFTER_S)
    assert view["nodes"][0]["up"] and view["totals"]["connections"] == 3


def test_missing_or_odd_counters_add_nothing() -> None:
    """A node of an older version carries fewer counters: None in its row, nothing in the
    totals; values that are not counts are not trusted."""
    old = Heartbeat("old", 0.2, {"state": "alive", "boot": 1, "connections": 4,
                                 "messages_received": 9})
    odd = Heartbeat("odd", 0.2, {"state": "alive", "boot": True, "connections": "5",
                                 "sessions": -1, "queued": True, "dropped": 2.5})
    view = overview("a", [old, odd, beat("a", connections=1, sessions=2)], DEAD_AFTER_S)
    rows = {n["node"]: n for n in view["nodes"]}
    assert rows["old"]["counters"]["connections"] == 4
    assert rows["old"]["counters"]["bytes_sent"] is None
    assert set(rows["odd"]["counters"].values()) == {None}
    assert rows["odd"]["boot"] is None
    assert view["totals"]["connections"] == 5 and view["totals"]["sessions"] == 2
    assert view["totals"]["messages_received"] == 9


def test_no_heartbeat_at_all() -> None:
    view = overview("a", [], DEAD_AFTER_S)
    assert view == {"node": "a", "nodes_known": 0, "nodes_up": 0, "nodes": [],
                    "totals": dict.fromkeys(COUNTER_NAMES, 0)}


def test_counters_from_the_engine_stats_sum_every_drop_reason() -> None:
    stats: dict[str, Any] = {
        "connections": 1, "sessions": 2, "messages_received": 3, "messages_sent": 4,
        "bytes_received": 5, "bytes_sent": 6, "retained": 999, "queued": 7, "dropped": 8,
        "dropped_qos0": 9, "refused": 100,
    }
    assert cluster_view.counters(stats, retained=10, exported=11, imported=12) == {
        "connections": 1, "sessions": 2, "messages_received": 3, "messages_sent": 4,
        "bytes_received": 5, "bytes_sent": 6, "retained": 10, "queued": 7, "dropped": 17,
        "exported": 11, "imported": 12,
    }
    # the same drop reasons as mqttd_messages_dropped_total
    assert cluster_view.DROP_KEYS == tuple(key for _, key in metrics._DROPPED)


def test_metrics_show_every_node_counters() -> None:
    view = overview("a", [beat("a", connections=1, messages_sent=5),
                          Heartbeat("old", 0.5, {"state": "alive", "connections": 2})],
                    DEAD_AFTER_S)
    text = metrics.render({"cluster_ready": 1}, cluster_nodes={"a": True, "old": True},
                          cluster=view, process={"cpu": 0.0, "rss": 0.0, "fds": 0.0})
    lines = text.splitlines()
    assert 'mqttd_cluster_node_connections{node="a"} 1' in lines
    assert 'mqttd_cluster_node_connections{node="old"} 2' in lines
    assert 'mqttd_cluster_node_messages_sent{node="a"} 5' in lines
    assert not any(line.startswith('mqttd_cluster_node_messages_sent{node="old"}')
                   for line in lines)  # its heartbeat has none
    assert 'mqttd_cluster_node_heartbeat_age_seconds{node="old"} 0.5' in lines
    assert "# TYPE mqttd_cluster_node_dropped gauge" in lines
    # a single node: none of it
    single = metrics.render({}, process={"cpu": 0.0, "rss": 0.0, "fds": 0.0})
    assert "mqttd_cluster_node_" not in single
