"""overflow_policy refuse (the default for persistent sessions): a full queue keeps what it
has (nothing acknowledged is dropped later) and refuses what is new. An MQTT 5 publisher is
told, PUBACK/PUBREC 0x97 Quota exceeded, and its message is refused as a whole (routed to no
one, so 0x97 means "not accepted" even at QoS 2, whose packet id is not kept); a 3.1.1
publisher cannot be told: its message goes to everyone else and is counted as refused for
the full queue."""

from __future__ import annotations

import trio

from mqttd.broker import running
from mqttd.codec.packets import PROTOCOL_5, PubAck, PubComp, Publish, PubRec, PubRel
from tests.conftest import make_config
from tests.rawclient import RawClient

TIMEOUT_S = 30.0
QUOTA_EXCEEDED = 0x97
BUDGET = 5


async def publish5(client: RawClient, payload: bytes, qos: int = 1, pid: int = 0) -> int:
    """Send one 5.0 PUBLISH; the reason code of its PUBACK / PUBREC."""
    pid = pid or client.packet_id()
    await client.send(Publish("jobs/x", payload, qos, packet_id=pid))
    ack = await client.take(PubAck if qos == 1 else PubRec, packet_id=pid)
    return ack.reason_code  # type: ignore[attr-defined]


async def test_a_full_persistent_queue_refuses_new_messages_and_keeps_the_old() -> None:
    config = make_config(persistent_max_queued_messages=BUDGET)
    async with running(config) as broker:
        with trio.fail_after(TIMEOUT_S):
            worker, _ = await RawClient.connected(broker.port, "worker", clean_session=False,
                                                  keepalive_s=0)
            await worker.subscribe("jobs/#", qos=1)
            await worker.aclose()
            watcher, _ = await RawClient.connected(broker.port, "watcher", keepalive_s=0)
            await watcher.subscribe("jobs/#", qos=1)
            pub5, _ = await RawClient.connected(broker.port, "pub5", keepalive_s=0,
                                                protocol_level=PROTOCOL_5)
            codes = [await publish5(pub5, b"job %d" % n) for n in range(BUDGET)]
            assert codes == [0] * BUDGET
            # full: the next one is refused as a whole, QoS 1 and QoS 2 alike
            assert await publish5(pub5, b"refused 1") == QUOTA_EXCEEDED
            assert await publish5(pub5, b"refused 2", qos=2, pid=900) == QUOTA_EXCEEDED
            # a 3.1.1 publisher cannot be told: the others get it, the full queue does not
            pub3, _ = await RawClient.connected(broker.port, "pub3", keepalive_s=0)
            await pub3.publish("jobs/x", b"from 3.1.1", qos=1)
            seen = [(await watcher.take(Publish)).payload for _ in range(BUDGET + 1)]  # type: ignore[attr-defined]
            assert seen == [b"job %d" % n for n in range(BUDGET)] + [b"from 3.1.1"]
            stats = broker.client_stats("worker")
            assert stats is not None
            assert (stats["queued"], stats["refused"], stats["dropped"]) == (BUDGET, 3, 0)
            assert broker.stats()["refused"] == 3
            assert broker.client_stats("pub5")["publishes_refused"] == 2  # type: ignore[index]

            # the worker comes back and takes its jobs: exactly the ones accepted
            worker, _ = await RawClient.connected(broker.port, "worker", clean_session=False,
                                                  keepalive_s=0)
            got = []
            for _ in range(BUDGET):
                packet = await worker.take(Publish)
                got.append(packet.payload)  # type: ignore[attr-defined]
                await worker.send(PubAck(packet.packet_id))  # type: ignore[attr-defined]
            assert got == [b"job %d" % n for n in range(BUDGET)]
            # room again: accepted, and QoS 2's packet id 900 was not kept as "received"
            assert await publish5(pub5, b"after", qos=2, pid=900) == 0
            await pub5.send(PubRel(900))
            await pub5.take(PubComp, packet_id=900)
            packet = await worker.take(Publish)
            assert packet.payload == b"after"  # type: ignore[attr-defined]
            for client in (worker, watcher, pub5, pub3):
                await client.aclose()
