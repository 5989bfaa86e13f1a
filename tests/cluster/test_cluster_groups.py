"""Shared subscriptions across the cluster (mqttd.clustering.groups): 3 nats-server and 3 mqttd
subprocesses; group members on n0 and n1 (paho-mqtt 5.0 clients, or a raw client that never
acknowledges), the publisher on n2.

Every wait is bounded; the only polls read a node's /metrics (the cluster-wide index of
groups reaching the publisher's node, acknowledgements counted) - the state the test waits
for, not a guess of how long it takes.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from paho.mqtt.client import MQTTMessage

from mqttd.codec.packets import Publish
from tests.cluster.brokerharness import MqttdNode, mqttd_nodes, wait_ready
from tests.cluster.natsharness import NatsCluster
from tests.cluster.test_cluster_broker import metric, publish_many
from tests.interop.test_paho import bounded_get
from tests.interop.test_paho_v5 import Paho5, paho5
from tests.rawclient import RawClient

TIMEOUT_S = 90
GROUP = "$share/workers/jobs/#"
MESSAGES = 300
WAIT_S = 20.0  # for one message to reach a member on a loaded machine
ACK_WAIT_S = 2.0  # cluster.group_ack_wait_s in these tests
POLL_S = 0.05

Got = queue.Queue[tuple[str, MQTTMessage]]


@asynccontextmanager
async def member(node: MqttdNode, name: str, got: Got, qos: int) -> AsyncIterator[Paho5]:
    """A paho 5.0 member of GROUP on ``node`` that acknowledges each message (paho's own
    PUBACK, PUBREC/PUBCOMP) and reports it to ``got`` as (name, message)."""
    async with paho5(node.port, name, client_id=name) as (client, _, _):
        client.client.on_message = lambda _c, _u, message: got.put((name, message))
        assert await client.subscribe(GROUP, qos) == [qos]
        yield client


async def wait_metric(node: MqttdNode, name: str, done: float, timeout_s: float = WAIT_S) -> None:
    """Poll ``node``'s /metrics until ``name`` reaches ``done``."""
    with trio.fail_after(timeout_s):
        while await metric(node, name) < done:
            await trio.sleep(POLL_S)


async def wait_known(nodes: list[MqttdNode], local: list[MqttdNode]) -> None:
    """The group is in every node's index, and the member nodes' pull requests reach its
    consumer (a consumer made a moment ago may not answer yet)."""
    for node in nodes:
        await wait_metric(node, "mqttd_cluster_groups_known", 1)
    for node in local:
        await wait_metric(node, "mqttd_cluster_groups_serving", 1)


def payloads(prefix: bytes, count: int) -> set[bytes]:
    return {b"%s%d" % (prefix, i) for i in range(count)}


async def collect(got: Got, count: int) -> dict[str, list[bytes]]:
    """What each member got, until ``count`` messages came in all."""
    by_member: dict[str, list[bytes]] = {}
    for _ in range(count):
        name, message = await bounded_get(got, WAIT_S)
        by_member.setdefault(name, []).append(message.payload)
    return by_member


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_each_message_reaches_one_member_of_the_cluster(
    nats3: NatsCluster, tmp_path: Path, qos: int
) -> None:
    """Members on n0 and n1, the publisher on n2: every message reaches exactly one member
    (both get some), none twice; the QoS 1/2 PUBACK/PUBREC came after MQTTD_GQ stored it."""
    got: Got = queue.Queue()
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes:
            a, b, c = nodes
            await wait_ready(nodes)
            async with member(a, "m-a", got, 2), member(b, "m-b", got, 2):
                await wait_known(nodes, [a, b])
                pub, _ = await RawClient.connected(c.port, "pub")
                await publish_many(pub, "jobs/x", qos, b"j", MESSAGES)
                if qos:  # acknowledged only once stored
                    assert await metric(c, "mqttd_cluster_groups_pending") == 0
                    assert await metric(c, "mqttd_cluster_groups_written_total") == MESSAGES
                by_member = await collect(got, MESSAGES)
                everything = [p for ps in by_member.values() for p in ps]
                assert len(everything) == len(set(everything)) == MESSAGES
                assert set(everything) == payloads(b"j", MESSAGES)
                # both nodes' members take part (which one gets what is up to the nodes'
                # pull requests: on a loaded machine one node may be late for a whole
                # batch, so more come, one at a time, until the other took one)
                extra = 0
                while set(by_member) != {"m-a", "m-b"}:
                    assert extra < 200, {k: len(v) for k, v in by_member.items()}
                    await publish_many(pub, "jobs/x", qos, b"k%d-" % extra, 1)
                    name, message = await bounded_get(got, WAIT_S)
                    by_member.setdefault(name, []).append(message.payload)
                    extra += 1
                # settled in the stream, nothing more to come
                for node in (a, b):
                    await wait_metric(node, "mqttd_cluster_groups_acked_total",
                                      len(by_member["m-a" if node is a else "m-b"]))
                acked = sum([await metric(n, "mqttd_cluster_groups_acked_total") for n in (a, b)])
                assert acked == MESSAGES + extra
                assert await metric(a, "mqttd_cluster_groups_redelivered_total") == 0
                assert await metric(b, "mqttd_cluster_groups_redelivered_total") == 0
                assert got.empty()
                # the API still shows each node's own members and counters
                status, body = await a.get("/api/v1/groups")
                assert status == 200 and b'"connected_members": 1' in body


async def holding_member(node: MqttdNode, client_id: str, count: int) -> tuple[RawClient,
                                                                              list[bytes]]:
    """A raw member of GROUP at QoS 1 that acknowledges nothing, once it holds ``count``
    messages."""
    client, _ = await RawClient.connected(node.port, client_id)
    await client.subscribe(GROUP, qos=1)
    return client, []


async def take_held(client: RawClient, held: list[bytes], count: int) -> None:
    while len(held) < count:
        packet = await client.take(Publish, timeout_s=WAIT_S)
        assert isinstance(packet, Publish) and packet.qos == 1
        held.append(packet.payload)


@pytest.mark.parametrize("how", ["disconnect", "kill -9"])
async def test_jobs_of_a_member_that_drops_reach_the_other(
    nats3: NatsCluster, tmp_path: Path, how: str
) -> None:
    """A member on n0 holds 10 jobs unacknowledged; then its connection drops (n0 gives
    them back at once) or n0 is killed (they come back after the ack wait): the member on
    n1 gets each of them, once."""
    held_count = 10
    got: Got = queue.Queue()
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3,
                               cluster_options=f"  group_ack_wait_s: {ACK_WAIT_S}\n") as nodes:
            a, b, c = nodes
            await wait_ready(nodes)
            holder, held = await holding_member(a, "holder", held_count)
            await wait_known(nodes, [a])
            pub, _ = await RawClient.connected(c.port, "pub")
            await publish_many(pub, "jobs/held", 1, b"h", held_count)
            await take_held(holder, held, held_count)
            assert set(held) == payloads(b"h", held_count)

            async with member(b, "m-b", got, 1):
                await wait_known(nodes, [b])
                started = trio.current_time()
                if how == "disconnect":
                    await holder.aclose()
                else:
                    await a.kill9()
                by_member = await collect(got, held_count)
                took = trio.current_time() - started
                assert sorted(by_member["m-b"]) == sorted(held)
                print(f"{how}: {held_count} held jobs reached the other member in {took:.2f} s")
                if how == "disconnect":  # given back at once (nak), not after the ack wait
                    await wait_metric(a, "mqttd_cluster_groups_nacked_total", held_count)
                await wait_metric(b, "mqttd_cluster_groups_redelivered_total", held_count)
                await wait_metric(b, "mqttd_cluster_groups_acked_total", held_count)
                # and nothing more but, on a loaded machine, a held job redelivered once
                # more (an ack that came after the ack wait: QoS 1 allows the duplicate)
                await publish_many(pub, "jobs/after", 1, b"after", 1)
                while True:
                    name, message = await bounded_get(got, WAIT_S)
                    if message.payload == b"after0":
                        break
                    assert message.payload in set(held), message
                assert name == "m-b"
                assert got.empty()
