"""What a PUBACK promises in cluster mode, under ``kill -9``: 3 nats-server processes and 3
mqttd nodes as subprocesses, a persistent QoS 1 subscriber on n2, a QoS 1 publisher that
keeps a window of messages in flight and moves to another node when its node dies.

* the publisher's node is killed (SIGKILL) mid-stream three times (n0, n1, n0; each is
  restarted before the next kill): every message the broker acknowledged reaches the
  subscriber;
* one NATS server (the leader of the queue stream MQTTD_Q) is killed mid-stream: the same.

Duplicates are allowed (QoS 1: a message whose PUBACK was lost with its node is sent again
by the publisher). The longest time between two PUBACKs (the publish stall) is printed
(``pytest -s``) for the record.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import trio

from mqttd.codec.packets import PubAck, Publish, SubAck, Subscribe, Subscription
from tests.cluster.brokerharness import MqttdNode, mqttd_nodes, wait_ready
from tests.cluster.natsharness import NatsCluster, NatsServer, http_json
from tests.cluster.test_cluster_broker import Collector, metric
from tests.cluster.test_cluster_sessions import connect
from tests.rawclient import RawClient

TIMEOUT_S = 150
WINDOW = 10
TOPIC = "plant/line1/counter"


@attrs.define(eq=False)
class Producer:
    """Publishes 0, 1, 2, ... at QoS 1 with up to WINDOW unacknowledged; when its
    connection dies it connects to ``target`` (clean session) and sends again what was not
    acknowledged."""

    target: MqttdNode
    total: int
    acked: set[int] = attrs.Factory(set)
    next: int = 0
    longest_stall_s: float = 0.0
    reconnects: int = 0
    _last_ack: float = attrs.Factory(time.monotonic)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def wait_acked(self, count: int) -> None:
        while len(self.acked) < count:
            await self._changed.wait()

    def _ack(self, number: int) -> None:
        now = time.monotonic()
        self.longest_stall_s = max(self.longest_stall_s, now - self._last_ack)
        self._last_ack = now
        self.acked.add(number)
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def run(self) -> None:
        while len(self.acked) < self.total:
            try:
                client, _ = await RawClient.connected(self.target.port, "producer")
            except (OSError, AssertionError, trio.TooSlowError):
                await trio.sleep(0.05)  # its node is being killed or restarted: try again
                continue
            try:
                await self._publish(client)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                    trio.TooSlowError, ConnectionError):
                pass
            self.reconnects += 1
            await client.aclose()

    async def _publish(self, client: RawClient) -> None:
        in_flight: dict[int, int] = {}  # packet id -> number
        resend = sorted(set(range(self.next)) - self.acked)
        while len(self.acked) < self.total:
            while len(in_flight) < WINDOW and (resend or self.next < self.total):
                number = resend.pop(0) if resend else self.next
                if number == self.next:
                    self.next += 1
                pid = client.packet_id()
                in_flight[pid] = number
                await client.send(Publish(TOPIC, b"%d" % number, 1, False, False, pid))
            packet = await client.recv(timeout_s=60)
            if packet is None:
                return  # closed: its node died
            if isinstance(packet, PubAck) and packet.packet_id in in_flight:
                self._ack(in_flight.pop(packet.packet_id))


async def persistent_subscriber(nursery: trio.Nursery, node: MqttdNode) -> Collector:
    client, _ = await connect(node, "historian", clean=False)
    await client.send(Subscribe(1, (Subscription("plant/#", 1),)))
    assert isinstance(await client.expect(SubAck), SubAck)
    collector = Collector(client)
    nursery.start_soon(collector.run)
    return collector


def numbers(collector: Collector) -> set[int]:
    return {int(m.payload) for m in collector.messages}


async def indexed_everywhere(nodes: list[MqttdNode]) -> None:
    while not all([await metric(n, "mqttd_cluster_sessions_indexed") >= 1 for n in nodes]):
        await trio.sleep(0.05)


async def test_kill_9_of_the_publishers_node_three_times_loses_nothing_acknowledged(
    nats3: NatsCluster, tmp_path: Path
) -> None:
    total, kill_every = 3000, 700
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, b, c = nodes
            await wait_ready(nodes)
            sub = await persistent_subscriber(ns, c)
            await indexed_everywhere(nodes)
            producer = Producer(a, total)
            ns.start_soon(producer.run)
            victims = [a, b, a]
            for kill, victim in enumerate(victims, start=1):
                await producer.wait_acked(kill * kill_every)
                survivor = b if victim is a else a
                producer.target = survivor
                await victim.kill9()
                await victim.restart()  # back before the next kill
                await victim.wait_ready()
            await producer.wait_acked(total)
            acked = set(producer.acked)
            await sub.wait_for(lambda ms: acked <= numbers(sub))
            duplicates = len(sub.messages) - len(numbers(sub))
            print(f"\nkill -9 of the publisher's node x3: {len(acked)} acknowledged, all "
                  f"received; {duplicates} duplicates; longest publish stall "
                  f"{producer.longest_stall_s:.2f} s; publisher reconnects "
                  f"{producer.reconnects}")
            assert a.kills == 2 and b.kills == 1
            ns.cancel_scope.cancel()


async def queue_stream_leader(nats: NatsCluster) -> NatsServer:
    """The nats-server leading MQTTD_Q (from /jsz with stream details)."""
    while True:
        for server in nats.servers:
            try:
                jsz = await http_json(server.http_port, "/jsz?accounts=true&streams=true")
            except (OSError, RuntimeError, ValueError):
                continue
            for account in jsz.get("account_details") or []:  # type: ignore[attr-defined]
                for stream in account.get("stream_detail") or []:
                    if stream.get("name") == "MQTTD_Q":
                        leader = (stream.get("cluster") or {}).get("leader")
                        for candidate in nats.servers:
                            if candidate.name == leader:
                                return candidate
        await trio.sleep(0.05)


async def test_kill_9_of_the_queue_streams_nats_leader_loses_nothing_acknowledged(
    nats3: NatsCluster, tmp_path: Path
) -> None:
    total = 3000
    with trio.fail_after(TIMEOUT_S):
        async with mqttd_nodes(tmp_path, nats3.urls, 3) as nodes, trio.open_nursery() as ns:
            a, _, c = nodes
            await wait_ready(nodes)
            sub = await persistent_subscriber(ns, c)
            await indexed_everywhere(nodes)
            producer = Producer(a, total)
            ns.start_soon(producer.run)
            await producer.wait_acked(total // 3)
            leader = await queue_stream_leader(nats3)
            stall_before = producer.longest_stall_s
            leader.kill()
            await producer.wait_acked(total)
            acked = set(producer.acked)
            await sub.wait_for(lambda ms: acked <= numbers(sub))
            duplicates = len(sub.messages) - len(numbers(sub))
            print(f"\nkill -9 of NATS server {leader.name} (MQTTD_Q leader): {len(acked)} "
                  f"acknowledged, all received; {duplicates} duplicates; longest publish "
                  f"stall {producer.longest_stall_s:.2f} s (before the kill "
                  f"{stall_before:.2f} s)")
            ns.cancel_scope.cancel()
