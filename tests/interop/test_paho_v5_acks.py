"""paho-mqtt at MQTT 5.0 through a recording relay: the acknowledgements the broker sends, byte
for byte, as a strict client sees them on the wire.

A QoS 1 / QoS 2 PUBLISH to a topic nobody subscribes to is answered 0x10 (No matching
subscribers) in a three-byte body (remaining length 3, five bytes on the wire) with no reason
string, although paho asks for problem information by default; with a subscriber the ack is
the four-byte Success form. Strict clients accept an ack only with a remaining length of 2, 3
or 4; before this the 0x10 ack carried a reason string (remaining length 30).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from mqttd.broker import running
from tests.conftest import make_config
from tests.interop.test_paho_v5 import paho5

TEST_TIMEOUT_S = 20


@attrs.define
class Relay:
    """A TCP relay in front of the broker that keeps what the broker sent."""

    port: int = 0
    from_broker: bytearray = attrs.field(factory=bytearray)

    def packets(self) -> list[bytes]:
        """What the broker sent, split into whole packets (fixed header + body)."""
        data, out, pos = bytes(self.from_broker), [], 0
        while pos < len(data):
            length, shift, i = 0, 0, pos + 1
            while True:
                byte = data[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            out.append(data[pos:i + length])
            pos = i + length
        return out

    def acks(self) -> list[bytes]:
        """The PUBACK / PUBREC / PUBREL / PUBCOMP packets among them."""
        return [p for p in self.packets() if p[0] >> 4 in (4, 5, 6, 7)]


@asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[Relay]:
    relay = Relay()

    async def pump(source: trio.SocketStream, sink: trio.SocketStream, keep: bool) -> None:
        with trio.move_on_after(TEST_TIMEOUT_S):
            try:
                while data := await source.receive_some(65536):
                    if keep:
                        relay.from_broker += data
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await sink.aclose()

    async def serve(client: trio.SocketStream) -> None:
        broker = await trio.open_tcp_stream("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, broker, False)
            nursery.start_soon(pump, broker, client, True)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        relay.port = listeners[0].socket.getsockname()[1]
        yield relay
        nursery.cancel_scope.cancel()


async def test_paho5_sees_four_and_five_byte_acks():
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker, relay_to(broker.port) as relay:
            async with paho5(relay.port, "acks") as (client, _flags, _props):
                # nobody subscribes: 0x10, no reason string
                assert await client.publish("nobody/listens", b"q1", 1) == 0x10
                # (for QoS 2 paho reports the PUBCOMP's code; the PUBREC's is read off the wire)
                assert await client.publish("nobody/listens", b"q2", 2) == 0
                # a subscriber (this client): Success, four bytes
                assert await client.subscribe("somebody/#", 0) == [0]
                assert await client.publish("somebody/listens", b"q1", 1) == 0
                assert await client.publish("somebody/listens", b"q2", 2) == 0
                await client.message()
                await client.message()
                await client.disconnect()
    acks = relay.acks()
    assert [(ack[0], len(ack)) for ack in acks] == [
        (0x40, 5), (0x50, 5), (0x70, 4),  # PUBACK 0x10, PUBREC 0x10, PUBCOMP
        (0x40, 4), (0x50, 4), (0x70, 4),  # PUBACK, PUBREC, PUBCOMP: Success
    ], [ack.hex(" ") for ack in acks]
    assert [ack[1] for ack in acks] == [3, 3, 2, 2, 2, 2]  # remaining lengths
    assert acks[0][4] == acks[1][4] == 0x10
