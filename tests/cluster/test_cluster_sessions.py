"""Persistent sessions cluster-wide (mqttd.clustering.sessions): 3 nats-server processes and
3 mqttd nodes as subprocesses, raw MQTT clients.

A persistent session's QoS 1/2 messages are written to its queue in JetStream by the node
that accepts them, so its client can come back on any node and get them; a client id
connecting on one node closes its connection on another. Every wait is bounded; the loops
that poll wait for the cluster itself (a record reaching every node's index).
"""

from __future__ import annotations

from pathlib import Path

import trio

from mqttd.codec.packets import (
    PROTOCOL_5,
    ConnAck,
    Connect,
    Disconnect,
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
from tests.cluster.natsharness import NatsCluster
from tests.cluster.test_cluster_broker import Collector, expected, metric, publish_many
from tests.rawclient import RawClient

TIMEOUT_S = 60
MESSAGES = 500


async def connect(node: MqttdNode, client_id: str, *, clean: bool,
                  protocol_level: int = 4) -> tuple[RawClient, ConnAck]:
    client = await RawClient.open(node.port)
    client.protocol_level = client.decoder.protocol_level = protocol_level
    properties = {"session_expiry_interval": 3600} if protocol_level == PROTOCOL_5 and (
        not clean) else None
    await client.send(Connect(client_id, clean, 60, protocol_level, None,
                              properties=properties))
    connack = await client.expect(ConnAck)
    assert isinstance(connack, ConnAck)
    return client, connack


async def indexed_everywhere(nodes: list[MqttdNode], count: int) -> None:
    """Until every node's index holds ``count`` persistent sessions."""
    while True:
        values = [await metric(n, "mqttd_cluster_sessions_indexed") for n in nodes]
        if all(v >= count for v in values):
            return
        await trio.sleep(0.05)


async def test_a_persistent_session_resumes_on_another_node(
    nats3: NatsCluster, tmp_path: Path
) -> None:
    """Subscribe (clean session 0, QoS 1) on n1 and leave; QoS 1 and 2 messages are
    published on n0; the client comes back on n2 with its session present and gets every
    message, in order, without a new SUBSCRIBE."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, b, c = nodes
            await wait_ready(nodes)
            sub, connack = await connect(b, "dev-1", clean=False)
            assert not connack.session_present
            await sub.send(Subscribe(1, (Subscription("cmd/dev-1/#", 2),)))
            assert isinstance(await sub.expect(SubAck), SubAck)
            await sub.send(Disconnect())
            await sub.expect_closed()
            await indexed_everywhere(nodes, 1)

            pub, _ = await RawClient.connected(a.port, "backend")
            await publish_many(pub, "cmd/dev-1/set", 1, b"q1-", MESSAGES)
            await publish_many(pub, "cmd/dev-1/set", 2, b"q2-", 50)

            back, connack = await connect(c, "dev-1", clean=False)
            assert connack.session_present
            collector = Collector(back)
            ns.start_soon(collector.run)
            await collector.wait_for(lambda ms: len(ms) >= MESSAGES + 50)
            assert collector.payloads(b"q1-") == expected(b"q1-", MESSAGES)
            assert collector.payloads(b"q2-") == expected(b"q2-", 50)
            assert {m.qos for m in collector.messages if m.payload.startswith(b"q2-")} == {2}

            # everything acknowledged: the queue is purged (the floor reaches the end)
            while await metric(c, "mqttd_cluster_queue_purges_total") < 1:
                await trio.sleep(0.05)
            ns.cancel_scope.cancel()


async def test_new_messages_reach_a_connected_persistent_session_on_another_node(
    nats3: NatsCluster, tmp_path: Path
) -> None:
    """A connected persistent subscriber on n2, a publisher on n0: live delivery through
    the queue, each message once, in order; then the session moves to n1 while messages
    keep coming and nothing acknowledged by the broker is missing afterwards."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, b, c = nodes
            await wait_ready(nodes)
            sub, _ = await connect(c, "app", clean=False)
            await sub.send(Subscribe(1, (Subscription("tele/#", 1),)))
            assert isinstance(await sub.expect(SubAck), SubAck)
            first = Collector(sub)
            first_closed = trio.Event()

            async def run_first() -> None:
                await first.run()
                first_closed.set()

            ns.start_soon(run_first)
            await indexed_everywhere(nodes, 1)
            pub, _ = await RawClient.connected(a.port, "sensor")
            await publish_many(pub, "tele/x", 1, b"m-", MESSAGES)
            await first.wait_for(lambda ms: len(ms) >= MESSAGES)
            assert first.payloads(b"m-") == expected(b"m-", MESSAGES)

            # the same client id on n1: n2 closes the first connection (takeover)
            moved, connack = await connect(b, "app", clean=False)
            assert connack.session_present
            second = Collector(moved)
            ns.start_soon(second.run)
            with trio.fail_after(10):
                await first_closed.wait()
            await publish_many(pub, "tele/x", 1, b"n-", MESSAGES)
            # (QoS 1: what n2 had in flight may come again, DUP)
            await second.wait_for(lambda ms: len({m.payload for m in ms
                                                  if m.payload.startswith(b"n-")}) >= MESSAGES)
            got = second.payloads(b"n-")
            assert sorted(set(got), key=lambda p: int(p[2:])) == expected(b"n-", MESSAGES)
            ns.cancel_scope.cancel()


async def test_takeover_across_nodes_closes_the_old_connection_with_0x8e(
    nats3: NatsCluster, tmp_path: Path
) -> None:
    """MQTT 5.0: a client id connected on n0 connects on n1; n0 sends DISCONNECT 0x8E
    (session taken over) and closes; a clean 3.1.1 client moving the same way is closed
    too."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes:
            a, b, _ = nodes
            await wait_ready(nodes)
            old, _ = await connect(a, "gw-5", clean=False, protocol_level=PROTOCOL_5)
            _new, connack = await connect(b, "gw-5", clean=False, protocol_level=PROTOCOL_5)
            assert connack.session_present
            packets = await old.expect_closed(timeout_s=10)
            assert any(isinstance(p, Disconnect) and p.reason_code == 0x8E for p in packets)

            clean_old, _ = await RawClient.connected(a.port, "gw-311")
            clean_new, _ = await RawClient.connected(b.port, "gw-311")
            await clean_old.expect_closed(timeout_s=10)
            await clean_new.send(Publish("ping", b"", 1, False, False, 1))
            assert isinstance(await clean_new.expect(PubAck), PubAck)


async def test_qos2_state_moves_with_the_session(nats3: NatsCluster, tmp_path: Path) -> None:
    """Exactly once across a takeover. Inbound: a PUBLISH QoS 2 acknowledged (PUBREC) on n0
    and sent again (DUP) on n1 after the client moved is not routed a second time.
    Outbound: a delivery whose PUBREC came on n0 is continued on n1 with PUBREL, never a
    second PUBLISH."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, b, c = nodes
            await wait_ready(nodes)
            watcher, _ = await RawClient.connected(c.port, "watcher")
            await watcher.send(Subscribe(1, (Subscription("once/#", 2),)))
            assert isinstance(await watcher.expect(SubAck), SubAck)
            seen = Collector(watcher)
            ns.start_soon(seen.run)
            # the receiving side: a persistent QoS 2 subscriber on n0
            rx, _ = await connect(a, "rx", clean=False)
            await rx.send(Subscribe(1, (Subscription("once/#", 2),)))
            assert isinstance(await rx.expect(SubAck), SubAck)
            await indexed_everywhere(nodes, 1)

            # inbound: PUBLISH on n0, PUBREC, the client leaves before PUBREL
            tx, _ = await connect(a, "tx", clean=False)
            await tx.send(Publish("once/x", b"one", 2, False, False, 7))
            await tx.take(PubRec, packet_id=7)
            await tx.aclose()
            await seen.wait_for(lambda ms: any(m.payload == b"one" for m in ms))

            # outbound: rx gets it, PUBREC, PUBREL comes, rx leaves before PUBCOMP
            first = await rx.expect(Publish)
            assert isinstance(first, Publish) and first.payload == b"one" and first.qos == 2
            await rx.send(PubRec(first.packet_id))
            await rx.take(PubRel, packet_id=first.packet_id)
            await rx.aclose()

            # both clients come back on n1
            tx, connack = await connect(b, "tx", clean=False)
            assert connack.session_present
            await tx.send(Publish("once/x", b"one", 2, True, False, 7))  # DUP
            await tx.take(PubRec, packet_id=7)
            await tx.send(PubRel(7))
            await tx.take(PubComp, packet_id=7)
            rx, connack = await connect(b, "rx", clean=False)
            assert connack.session_present
            again = await rx.recv()
            assert isinstance(again, PubRel) and again.packet_id == first.packet_id, again
            await rx.send(PubComp(first.packet_id))

            # a marker through the same path: the watcher and rx got "one" exactly once
            await tx.send(Publish("once/x", b"marker", 2, False, False, 8))
            await tx.take(PubRec, packet_id=8)
            await tx.send(PubRel(8))
            await tx.take(PubComp, packet_id=8)
            await seen.wait_for(lambda ms: any(m.payload == b"marker" for m in ms))
            assert [m.payload for m in seen.messages] == [b"one", b"marker"]
            marker = await rx.expect(Publish)
            assert isinstance(marker, Publish) and marker.payload == b"marker", marker
            ns.cancel_scope.cancel()


async def test_the_session_of_a_dead_node_is_adopted_and_expires(
    nats3: NatsCluster, tmp_path: Path
) -> None:
    """A 5.0 persistent session (expiry 3 s) leaves n1, and n1 is killed (kill -9) before it
    could expire it: another node adopts the record and expires the session in time, so
    its record leaves every node's index and its queue is purged."""
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3,
                               extra="persistence: {expiry_check_interval_s: 0.5}\n") as nodes:
            a, b, c = nodes
            await wait_ready(nodes)
            client = await RawClient.open(b.port)
            client.protocol_level = client.decoder.protocol_level = PROTOCOL_5
            await client.send(Connect("short-lived", False, 60, PROTOCOL_5, None,
                                      properties={"session_expiry_interval": 3}))
            assert isinstance(await client.expect(ConnAck), ConnAck)
            await client.send(Subscribe(1, (Subscription("gone/#", 1),)))
            assert isinstance(await client.expect(SubAck), SubAck)
            await indexed_everywhere(nodes, 1)
            await client.send(Disconnect())
            await client.expect_closed()
            await b.kill9()
            while (await metric(a, "mqttd_cluster_sessions_adopted_total")
                   + await metric(c, "mqttd_cluster_sessions_adopted_total")) < 1:
                await trio.sleep(0.05)
            for node in (a, c):
                while await metric(node, "mqttd_cluster_sessions_indexed") != 0:
                    await trio.sleep(0.05)
            await b.restart()  # (the harness stops every node in order)
