import trio

from mqttd.codec.packets import Publish
from tests.rawclient import RawClient


async def test_publish_subscribe_roundtrip(broker):
    with trio.fail_after(10):
        sub, _ = await RawClient.connected(broker.port, "sub")
        await sub.subscribe("a/+", qos=1)
        pub, _ = await RawClient.connected(broker.port, "pub")
        await pub.publish("a/b", b"hello", qos=1)
        msg = await sub.expect(Publish)
        assert (msg.topic, msg.payload, msg.qos) == ("a/b", b"hello", 1)
