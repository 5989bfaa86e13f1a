"""The cluster-wide view end to end: 3 nats-server and 3 mqttd nodes; clients on different
nodes; every node's GET /api/v1/cluster, its ``$SYS/broker/mqttd/cluster/total/...``, its
/metrics and ``mqttd ctl cluster`` show every node's counters and the same totals.

The totals travel in the heartbeats (every 0.25 s here): each check polls until they carry
what was done, bounded by ``TIMEOUT_S``; nothing waits a fixed time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from mqttd import ctl
from mqttd.codec.packets import Publish
from tests.cluster.brokerharness import MqttdNode, mqttd_nodes, wait_ready
from tests.cluster.natsharness import NatsCluster
from tests.cluster.test_cluster_broker import Collector, subscriber
from tests.rawclient import RawClient

TIMEOUT_S = 60
POLL_S = 0.05
TOTAL = "$SYS/broker/mqttd/cluster/total/"


async def cluster_view(node: MqttdNode) -> dict[str, Any]:
    status, body = await node.get("/api/v1/cluster")
    assert status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


async def poll_view(node: MqttdNode, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """GET /api/v1/cluster until ``done`` says the heartbeats carry what is expected."""
    while not done(view := await cluster_view(node)):
        await trio.sleep(POLL_S)
    return view


def counts(view: dict[str, Any], counter: str) -> dict[str, int | None]:
    return {n["node"]: n["counters"][counter] for n in view["nodes"]}


def latest(collector: Collector, counter: str) -> bytes | None:
    values = [m.payload for m in collector.messages if m.topic == TOTAL + counter]
    return values[-1] if values else None


async def run_ctl(*argv: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(ctl.main, list(argv))


async def test_every_node_reports_the_cluster_totals(
    nats3: NatsCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MQTTD_URL", raising=False)
    monkeypatch.delenv("MQTTD_TOKEN", raising=False)
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, b, c = nodes
            await wait_ready(nodes)
            # one $SYS watcher per node (3 connections), 2 more clients on n0, 1 on n1
            watchers = [await subscriber(ns, node, f"sys-{node.name}", TOTAL + "#", 0)
                        for node in nodes]
            a1, _ = await RawClient.connected(a.port, "a1")
            a2, _ = await RawClient.connected(a.port, "a2")
            b1, _ = await RawClient.connected(b.port, "b1")
            for i in range(4):
                await a1.publish("agg/x", b"%d" % i, qos=1)
            await a2.publish("agg/r", b"kept", qos=1, retain=True)  # retained: cluster-wide
            for i in range(3):
                await b1.publish("agg/y", b"%d" % i, qos=0)
            expected_connections = {"n0": 3, "n1": 2, "n2": 1}
            expected_received = {"n0": 5, "n1": 3, "n2": 0}

            def complete(view: dict[str, Any]) -> bool:
                return (view["nodes_up"] == 3
                        and counts(view, "connections") == expected_connections
                        and counts(view, "messages_received") == expected_received
                        and set(counts(view, "retained").values()) == {1})

            for node in nodes:  # every node, from the same heartbeats
                view = await poll_view(node, complete)
                assert view["node"] == node.name
                assert [(n["node"], n["up"], n["state"]) for n in view["nodes"]] == [
                    ("n0", True, "alive"), ("n1", True, "alive"), ("n2", True, "alive")]
                assert all(isinstance(n["boot"], int) for n in view["nodes"])
                totals = view["totals"]
                assert (totals["connections"], totals["sessions"]) == (6, 6)
                assert totals["messages_received"] == 8
                assert totals["retained"] == 1  # the largest, not 3 x 1
                assert totals["dropped"] == 0
                assert totals["exported"] >= 8  # every accepted PUBLISH went to NATS

            # $SYS on every node: the totals, as the heartbeats bring them
            for watcher in watchers:
                await watcher.wait_for(lambda _, w=watcher: (  # type: ignore[misc]
                    latest(w, "connections") == b"6"
                    and latest(w, "messages_received") == b"8"
                    and latest(w, "retained") == b"1" and latest(w, "nodes_up") == b"3"))
                assert all(isinstance(m, Publish) and m.payload.isdigit()
                           for m in watcher.messages)

            # one scrape of n2 shows every node's counters
            status, body = await c.get("/metrics")
            lines = body.decode().splitlines()
            assert status == 200
            for name, value in expected_connections.items():
                assert f'mqttd_cluster_node_connections{{node="{name}"}} {value}' in lines
            for name, value in expected_received.items():
                assert f'mqttd_cluster_node_messages_received{{node="{name}"}} {value}' in lines

            # mqttd ctl cluster, against n1 (open reads on loopback: no token)
            url = f"http://127.0.0.1:{b.http_port}"
            code = await run_ctl("--url", url, "cluster", "--json")
            out, err = capsys.readouterr()
            assert (code, err) == (0, ""), err
            assert json.loads(out)["totals"]["connections"] == 6
            code = await run_ctl("--url", url, "cluster")
            out, err = capsys.readouterr()
            assert (code, err) == (0, ""), err
            rows = [line.split() for line in out.splitlines()]
            assert rows[0][:4] == ["NODE", "UP", "STATE", "HEARTBEAT"]
            assert rows[2][:3] == ["n1", "*", "up"] and rows[2][5] == "2"  # CONN
            assert rows[4][:3] == ["TOTAL", "(3", "up)"] and rows[4][3] == "6"

            # n1 stops in order: it says so, and the totals leave it out at once
            await b.stop()
            view = await poll_view(a, lambda v: v["nodes_up"] == 2)
            assert {n["node"]: (n["up"], n["state"]) for n in view["nodes"]} == {
                "n0": (True, "alive"), "n1": (False, "stopped"), "n2": (True, "alive")}
            assert view["totals"]["connections"] == 4  # n0's 3, n2's 1
            assert view["totals"]["messages_received"] == 5
            for client in (a1, a2, b1):
                await client.aclose()
            ns.cancel_scope.cancel()
