"""Limits from issue #7 that the core enforces: topic size, inbound QoS 2, publish rate."""

from __future__ import annotations

import trio

from mqttd.broker import running
from mqttd.codec.packets import PingReq, PingResp, Publish, PubRec, SubAck
from tests.conftest import make_config
from tests.integration.test_broker_tcp import assert_healthy
from tests.rawclient import RawClient


async def test_topic_longer_than_the_limit_closes_the_publisher():
    async with running(make_config(max_topic_length_bytes=16)) as broker:
        with trio.fail_after(10):
            client, _ = await RawClient.connected(broker.port, "long")
            await client.publish("short/topic", b"ok")  # 11 bytes: fine
            await client.send(Publish("a/topic/longer/than/16", b"x"))
            assert await client.expect_closed() == []
            assert broker.limits_exceeded == {"topic": 1}
            await assert_healthy(broker.port)


async def test_multibyte_topic_is_measured_in_utf8_bytes():
    async with running(make_config(max_topic_length_bytes=8)) as broker:
        with trio.fail_after(10):
            client, _ = await RawClient.connected(broker.port, "utf8")
            await client.send(Publish("ééééé", b"x"))  # 5 characters, 10 bytes
            assert await client.expect_closed() == []


async def test_too_many_levels_refused_for_publish_and_subscribe():
    async with running(make_config(max_topic_levels=3)) as broker:
        with trio.fail_after(10):
            sub, _ = await RawClient.connected(broker.port, "levels")
            suback = await sub.subscribe("a/b/c", "a/b/c/d", "a/+/#", qos=1)
            assert suback == SubAck(suback.packet_id, (1, 0x80, 1))
            pub, _ = await RawClient.connected(broker.port, "publisher")
            await pub.publish("a/b/c", b"three levels", qos=1)
            assert (await sub.expect(Publish)).payload == b"three levels"
            await pub.send(Publish("a/b/c/d", b"four levels"))
            assert await pub.expect_closed() == []
            assert broker.limits_exceeded == {"topic": 2}


async def test_inbound_qos2_beyond_the_maximum_closes_the_connection():
    async with running(make_config(max_inbound_qos2=3)) as broker:
        with trio.fail_after(10):
            client, _ = await RawClient.connected(broker.port, "q2")
            for packet_id in (1, 2, 3):
                await client.send(Publish("q2/x", b"x", 2, packet_id=packet_id))
                assert await client.expect(PubRec) == PubRec(packet_id)
            await client.send(Publish("q2/x", b"x", 2, dup=True, packet_id=3))  # a resend: fine
            assert await client.expect(PubRec) == PubRec(3)
            await client.send(Publish("q2/x", b"x", 2, packet_id=4))  # a fourth awaiting PUBREL
            assert await client.expect_closed() == []
            assert broker.limits_exceeded == {"inbound_qos2": 1}
            await assert_healthy(broker.port)


async def test_publish_rate_limit_slows_the_publisher_without_losing_messages():
    """At 200 messages/s a burst of 600 is throttled (reads pause), never dropped."""
    count = 600
    async with running(make_config(max_publish_rate_per_s=200)) as broker:
        with trio.fail_after(20):
            sub, _ = await RawClient.connected(broker.port, "sub")
            await sub.subscribe("rate/#", qos=0)
            # keepalive 2: the broker allows 3 s of silence, a margin for a slow machine
            # between the last PUBLISH read and the PINGREQ below
            pub, _ = await RawClient.connected(broker.port, "pub", keepalive_s=2)
            await pub.send(b"".join(Publish("rate/x", b"%d" % i).encode() for i in range(count)))
            received = [int((await sub.expect(Publish)).payload) for _ in range(count)]
            assert received == list(range(count))
            assert broker.stats()["rate_limited"] > 0
            # the throttled publisher was not expired for keepalive while we paused it
            await pub.send(PingReq())
            assert await pub.expect(PingResp) == PingResp()
