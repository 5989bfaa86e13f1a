"""Cluster mode end to end: 3 nats-server processes (a JetStream cluster) and 3 mqttd nodes
as subprocesses (``python -m mqttd --cluster ... --node-name nX``), with real MQTT clients.

What crosses nodes here is the live path (core NATS) and the retained stream; every wait is
bounded, and the only retry loops wait for the cluster itself: a new subscription's
interest reaching the other NATS servers, a retained message reaching another node's
consumer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from mqttd.codec.packets import (
    PROTOCOL_5,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
)
from tests.cluster.brokerharness import MqttdNode, mqttd_nodes, wait_ready
from tests.cluster.natsharness import NatsCluster, free_ports
from tests.rawclient import RawClient

TIMEOUT_S = 40
MESSAGES = 1000
BATCH = 100


@attrs.define(eq=False)
class Collector:
    """A subscriber that acknowledges as it goes (QoS 1 PUBACK, QoS 2 PUBREC/PUBCOMP) and
    keeps every PUBLISH it gets."""

    client: RawClient
    messages: list[Publish] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def run(self) -> None:
        client = self.client
        while True:
            packet = await client.recv(timeout_s=3600)
            if packet is None:
                return
            if isinstance(packet, Publish):
                self.messages.append(packet)
                if packet.qos == 1:
                    await client.send(PubAck(packet.packet_id))
                elif packet.qos == 2:
                    await client.send(PubRec(packet.packet_id))
                event, self._changed = self._changed, trio.Event()
                event.set()
            elif isinstance(packet, PubRel):
                await client.send(PubComp(packet.packet_id))

    async def wait_for(self, done: Callable[[list[Publish]], bool]) -> None:
        while not done(self.messages):
            await self._changed.wait()

    def payloads(self, prefix: bytes) -> list[bytes]:
        return [m.payload for m in self.messages if m.payload.startswith(prefix)]


async def subscriber(
    nursery: trio.Nursery, node: MqttdNode, client_id: str, topic_filter: str, qos: int,
    protocol_level: int = 4,
) -> Collector:
    client, _ = await RawClient.connected(node.port, client_id, protocol_level=protocol_level)
    await client.send(Subscribe(1, (Subscription(topic_filter, qos),)))
    assert isinstance(await client.expect(SubAck), SubAck)
    collector = Collector(client)
    nursery.start_soon(collector.run)
    return collector


async def probe_until_seen(pub: RawClient, topic: str, collectors: list[Collector]) -> None:
    """Publish QoS 0 probes until every collector got one: a subscription made on one node
    reaches the NATS servers of the others a moment later (interest propagation)."""
    while not all(c.payloads(b"probe") for c in collectors):
        await pub.publish(topic, b"probe")
        with trio.move_on_after(0.05):
            for c in collectors:
                await c.wait_for(lambda messages: any(
                    m.payload == b"probe" for m in messages))


async def publish_many(pub: RawClient, topic: str, qos: int, prefix: bytes, count: int) -> None:
    """``count`` messages, pipelined in batches, every QoS 1/2 exchange completed."""
    for start in range(0, count, BATCH):
        ids = []
        for i in range(start, min(start + BATCH, count)):
            pid = pub.packet_id() if qos else 0
            ids.append(pid)
            await pub.send(Publish(topic, b"%s%d" % (prefix, i), qos, False, False, pid))
        if qos == 1:
            for pid in ids:
                await pub.take(PubAck, packet_id=pid)
        elif qos == 2:
            for pid in ids:
                await pub.take(PubRec, packet_id=pid)
                await pub.send(PubRel(pid))
            for pid in ids:
                await pub.take(PubComp, packet_id=pid)


def expected(prefix: bytes, count: int) -> list[bytes]:
    return [b"%s%d" % (prefix, i) for i in range(count)]


async def metric(node: MqttdNode, line_start: str) -> float:
    status, body = await node.get("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in /metrics")


async def test_cross_node_qos_order_exactly_once(nats3: NatsCluster, tmp_path: Path) -> None:
    """A publisher on n0; subscribers on n0 (the origin), n1 (two clients whose filters both
    match, so NATS delivers each message to n1 twice) and n2. Every message reaches each
    subscriber exactly once, in the publisher's order, at min(publish QoS, granted QoS)."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, b, c = nodes
            await wait_ready(nodes)
            s_a = await subscriber(ns, a, "s-a", "t/#", 2)
            s_b = await subscriber(ns, b, "s-b", "t/#", 2)
            s_b2 = await subscriber(ns, b, "s-b2", "+/x", 0)
            s_c = await subscriber(ns, c, "s-c", "t/#", 1)
            collectors = [s_a, s_b, s_b2, s_c]
            pub, _ = await RawClient.connected(a.port, "pub")
            await probe_until_seen(pub, "t/x", collectors)

            await publish_many(pub, "t/x", 1, b"q1-", MESSAGES)
            await publish_many(pub, "t/x", 2, b"q2-", BATCH)
            await publish_many(pub, "t/x", 0, b"q0-", BATCH)
            total = MESSAGES + 2 * BATCH
            for collector in collectors:
                await collector.wait_for(
                    lambda ms: sum(not m.payload.startswith(b"probe") for m in ms) >= total)

            for collector, granted in ((s_a, 2), (s_b, 2), (s_b2, 0), (s_c, 1)):
                assert collector.payloads(b"q1-") == expected(b"q1-", MESSAGES)
                assert collector.payloads(b"q2-") == expected(b"q2-", BATCH)
                assert collector.payloads(b"q0-") == expected(b"q0-", BATCH)
                for m in collector.messages:
                    if not m.payload.startswith(b"probe"):
                        sent_qos = int(m.payload[1:2])
                        assert m.qos == min(sent_qos, granted), (collector.client, m)

            # the node of the publisher exported each message once; n1 routed each once
            # although its two subscriptions each received it from NATS
            assert await metric(a, "mqttd_cluster_exported_total") >= total
            assert await metric(b, "mqttd_cluster_import_duplicates_total") >= total
            assert await metric(a, "mqttd_cluster_imported_total") == 0  # nobody else published

            # liveness: every node sees the three (heartbeats every 0.25 s)
            while True:
                _, body = await a.get("/metrics")
                if all(f'mqttd_cluster_node_up{{node="n{i}"}} 1' in body.decode()
                       for i in range(3)):
                    break
                await trio.sleep(0.05)
            sys_topic = await subscriber(ns, a, "sys", "$SYS/broker/mqttd/cluster/node", 0)
            await sys_topic.wait_for(lambda ms: bool(ms))
            assert sys_topic.messages[0].payload == b"n0" and sys_topic.messages[0].retain
            ns.cancel_scope.cancel()


async def test_5_0_properties_cross_nodes(nats3: NatsCluster, tmp_path: Path) -> None:
    """Content type, payload format, user properties, response topic, correlation data and
    the Message Expiry Interval travel with a message to another node."""
    props = {
        "payload_format_indicator": 1, "content_type": "application/json",
        "response_topic": "reply/here", "correlation_data": b"\x01\x02",
        "user_property": [("site", "berlin"), ("site", "paris")],
        "message_expiry_interval": 3600,
    }
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 2) as nodes, trio.open_nursery() as ns:
            a, b = nodes
            await wait_ready(nodes)
            sub = await subscriber(ns, b, "s5", "p/#", 1, protocol_level=PROTOCOL_5)
            pub, _ = await RawClient.connected(a.port, "p5", protocol_level=PROTOCOL_5)
            await probe_until_seen(pub, "p/x", [sub])
            await pub.send(Publish("p/x", b'{"t": 21}', 1, False, False, 7, props))
            await pub.take(PubAck, packet_id=7)
            await sub.wait_for(lambda ms: any(m.payload == b'{"t": 21}' for m in ms))
            (got,) = [m for m in sub.messages if m.payload == b'{"t": 21}']
            received = dict(got.properties or {})
            interval = received.pop("message_expiry_interval")
            assert 3590 <= interval <= 3600
            expected_props = {k: v for k, v in props.items() if k != "message_expiry_interval"}
            assert received == expected_props
            ns.cancel_scope.cancel()


async def retained_after_subscribe(
    node: MqttdNode, client_id: str, last: str, topic_filter: str = "r/#"
) -> list[Publish]:
    """Subscribe to ``topic_filter`` on ``node`` until the retained messages sent after the SUBACK
    include ``last`` (they come sorted by topic); returns them. Retried with a new client:
    a retained message reaches another node's store a moment after its PUBACK."""
    attempt = 0
    while True:
        attempt += 1
        client, _ = await RawClient.connected(node.port, f"{client_id}-{attempt}")
        await client.subscribe(topic_filter, qos=1)
        got: list[Publish] = []
        with trio.move_on_after(0.3):
            while not any(m.topic == last for m in got):
                packet = await client.take(Publish)
                assert isinstance(packet, Publish)
                got.append(packet)
        await client.aclose()
        if any(m.topic == last for m in got):
            assert all(m.retain for m in got)
            return got


async def test_retained_messages_are_cluster_wide(nats3: NatsCluster, tmp_path: Path) -> None:
    """Set retained on n0 (PUBACK after MQTTD_RET stored it): a new subscriber on n2 gets
    it. Deleted on n1: gone on n2 and on n0 too."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes:
            a, b, c = nodes
            await wait_ready(nodes)
            pub_a, _ = await RawClient.connected(a.port, "pub-a")
            await pub_a.publish("r/0", b"zero", qos=0, retain=True)
            await pub_a.publish("r/1", b"one", qos=1, retain=True)
            # the PUBACK came after MQTTD_RET stored both (the writes are taken in order)
            assert await metric(a, "mqttd_cluster_retained_pending") == 0
            assert await metric(a, "mqttd_cluster_retained_stored_total") == 2
            got = await retained_after_subscribe(c, "c", "r/1")
            assert [(m.topic, m.payload) for m in got] == [("r/0", b"zero"), ("r/1", b"one")]

            pub_b, _ = await RawClient.connected(b.port, "pub-b")
            await pub_b.publish("r/1", b"", qos=1, retain=True)  # a delete
            await pub_b.publish("r/2", b"two", qos=1, retain=True)  # after it, in order
            for node in (c, a, b):
                got = await retained_after_subscribe(node, f"after-{node.name}", "r/2")
                assert [(m.topic, m.payload) for m in got] == [("r/0", b"zero"),
                                                                 ("r/2", b"two")]
            assert await metric(c, "mqttd_cluster_retained_imported_total") >= 3


async def test_a_node_without_nats_serves_locally_and_is_not_ready(tmp_path: Path) -> None:
    """NATS unreachable at start: the node still binds and serves its own clients, and
    /readyz says why it is not ready."""
    (port,) = free_ports(1)
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, [f"nats://127.0.0.1:{port}"], 1) as (node,):
            status, body = await node.get("/readyz")
            assert status == 503
            assert b"NATS is not reachable" in body
            assert await metric(node, "mqttd_cluster_nats_connected") == 0
            sub, _ = await RawClient.connected(node.port, "local-sub")
            await sub.subscribe("l/#", qos=1)
            pub, _ = await RawClient.connected(node.port, "local-pub")
            await pub.publish("l/1", b"here", qos=1)
            message = await sub.take(Publish)
            assert isinstance(message, Publish) and message.payload == b"here"


async def test_one_nats_server_with_replicas_1(tmp_path: Path, nats1: NatsCluster) -> None:
    """``replicas: 1`` on a single NATS server: two nodes exchange live and retained
    messages."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats1.urls, 2, replicas=1) as nodes, \
                trio.open_nursery() as ns:
            a, b = nodes
            await wait_ready(nodes)
            sub = await subscriber(ns, b, "s", "one/#", 1)
            pub, _ = await RawClient.connected(a.port, "p")
            await probe_until_seen(pub, "one/x", [sub])
            await pub.publish("one/r", b"kept", qos=1, retain=True)
            await sub.wait_for(lambda ms: any(m.payload == b"kept" for m in ms))
            got = await retained_after_subscribe(b, "later", "one/r", "one/#")
            assert [(m.topic, m.payload) for m in got] == [("one/r", b"kept")]

            # the PUBACK of a retained QoS 1 message waits for JetStream: none while the
            # NATS server is stopped (SIGSTOP), then it comes
            nats1.servers[0].pause()
            await nats1.servers[0].wait_stopped()
            await pub.send(Publish("one/r", b"while stopped", 1, True, False, 99))
            with trio.move_on_after(0.5):
                await pub.take(PubAck, packet_id=99)
                raise AssertionError("PUBACK before the retained message was stored")
            nats1.servers[0].resume()
            await pub.take(PubAck, packet_id=99, timeout_s=TIMEOUT_S)
            assert await metric(a, "mqttd_cluster_retained_pending") == 0
            ns.cancel_scope.cancel()



async def test_a_slow_subscriber_paces_a_publisher_on_another_node(
    nats3: NatsCluster, tmp_path: Path
) -> None:
    """A clean QoS 1 subscriber on n1 that reads slowly, a publisher on n0 sending faster
    than that: n1 asks n0 to pause (mqttd.clustering.pacing) instead of overflowing the
    subscriber's queue (1,000 messages, drop_oldest by default), so every message arrives,
    in order, and n1 drops nothing."""
    count = 3000
    with trio.fail_after(TIMEOUT_S * 2):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, b, _ = nodes
            await wait_ready(nodes)
            sub, _ = await RawClient.connected(b.port, "slow")
            await sub.send(Subscribe(1, (Subscription("flood/#", 1),)))
            assert isinstance(await sub.expect(SubAck), SubAck)
            pub, _ = await RawClient.connected(a.port, "fast")
            while True:  # n1's interest reaches n0's NATS server: QoS 0 probes until one comes
                await pub.publish("flood/probe", b"probe", qos=0)
                with trio.move_on_after(0.05):
                    if isinstance(await sub.recv(timeout_s=TIMEOUT_S), Publish):
                        break
            received: list[bytes] = []
            done = trio.Event()

            async def read_slowly() -> None:
                while sum(p.startswith(b"f-") for p in received) < count:
                    packet = await sub.recv(timeout_s=TIMEOUT_S)
                    if isinstance(packet, Publish):
                        received.append(packet.payload)
                        if packet.qos == 1:
                            await sub.send(PubAck(packet.packet_id))
                        await trio.sleep(0.002)  # a slow consumer, not a synchronisation
                done.set()

            ns.start_soon(read_slowly)
            await publish_many(pub, "flood/x", 1, b"f-", count)
            await done.wait()
            assert [p for p in received if p.startswith(b"f-")] == expected(b"f-", count)
            assert await metric(b, 'mqttd_messages_dropped_total{reason="queue_full"}') == 0
            assert await metric(a, "mqttd_cluster_paces_received_total") >= 1
            # drained: n1 lets n0 go for good (it once put n0 back on its list with every
            # "off", then paused it again 50 ms later, on and off, until its NATS server
            # cut it as a slow consumer under a longer flood)
            while (await metric(b, "mqttd_cluster_pacing")
                   or await metric(a, "mqttd_cluster_paced_by")):
                await trio.sleep(0.05)  # polling, bounded by the fail_after above
            ns.cancel_scope.cancel()
