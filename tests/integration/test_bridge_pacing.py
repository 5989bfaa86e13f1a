"""A bridge is a subscriber like any other for flow control: a remote broker that stops
reading holds the local publishers feeding the link (once, until the link counts as
stalled), after which the link's QoS 0 over its buffer is dropped and counted and local
publishers go on at full speed."""

from __future__ import annotations

import socket

import attrs
import trio

from mqttd.broker import running
from mqttd.codec import Decoder
from mqttd.codec.packets import ConnAck, PingReq, PingResp, Publish
from mqttd.config import Bridge, BridgeTopic
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient

TIMEOUT_S = 60.0


async def silent_remote(task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    """A "broker" that answers the bridge's CONNECT and then never reads again."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted
    await sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    listener = trio.SocketListener(sock)
    task_status.started(sock.getsockname()[1])
    async with listener:
        stream = await listener.accept()
        decoder = Decoder(accept_v5=True)
        while not decoder.feed(await stream.receive_some(4096)):
            pass
        await stream.send_all(ConnAck(False, 0).encode())
        await trio.sleep_forever()  # read nothing more


async def test_a_remote_that_stops_reading_holds_local_publishers_once() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            remote_port = await nursery.start(silent_remote)
            config = attrs.evolve(
                make_config(stalled_output_timeout_s=0.5),
                bridges=(Bridge(
                    name="cloud", port=remote_port, client_id="edge-1",
                    topics=(BridgeTopic(pattern="tele/#", direction="out", qos=0),),
                ),),
            )
            async with running(config) as edge:
                await wait_until(lambda: edge.bridge_stats()[0]["state"] == "connected")
                pub, _ = await RawClient.connected(edge.port, "pub", keepalive_s=0)
                await pub.send(b"".join(
                    Publish("tele/x", b"%06d" % i + bytes(1018)).encode() for i in range(3000)
                ))
                await pub.send(PingReq())
                assert await pub.expect(PingResp) == PingResp()  # handled every one of them
                stats = edge.stats()
                assert stats["publisher_holds"] >= 1  # the link held it ...
                assert stats["stalled_subscribers"] == 1  # ... once, until found stalled
                assert stats["dropped_qos0"] > 0  # then its QoS 0 over the buffer: counted
                await pub.aclose()
            nursery.cancel_scope.cancel()
