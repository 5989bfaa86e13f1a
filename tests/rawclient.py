"""A minimal MQTT client over a real trio socket, built on mqttd's codec, for tests
that need byte-level control (malformed input, exact packet sequences)."""

from __future__ import annotations

import trio

from mqttd.codec import Decoder
from mqttd.codec.packets import (
    PROTOCOL_311,
    ConnAck,
    Connect,
    Packet,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
    Will,
)

TIMEOUT_S = 5.0


class RawClient:
    def __init__(self, stream: trio.SocketStream, protocol_level: int = PROTOCOL_311) -> None:
        self.stream = stream
        self.decoder = Decoder(protocol_level=protocol_level)
        self.received: list[Packet] = []
        self.protocol_level = protocol_level
        self._next_id = 1

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        with trio.fail_after(TIMEOUT_S):
            stream = await trio.open_tcp_stream(host, port)
        return cls(stream)

    @classmethod
    async def connected(
        cls,
        port: int,
        client_id: str = "",
        *,
        clean_session: bool = True,
        keepalive_s: int = 60,
        will: Will | None = None,
        protocol_level: int = PROTOCOL_311,
    ) -> tuple[RawClient, ConnAck]:
        client = await cls.open(port)
        client.protocol_level = client.decoder.protocol_level = protocol_level
        await client.send(Connect(client_id, clean_session, keepalive_s, protocol_level, will))
        connack = await client.expect(ConnAck)
        assert connack.return_code == 0, connack
        return client, connack

    def packet_id(self) -> int:
        pid = self._next_id
        self._next_id = pid % 65535 + 1
        return pid

    async def send(self, packet: Packet | bytes) -> None:
        data = packet if isinstance(packet, bytes | bytearray) else packet.encode(
            self.protocol_level
        )
        with trio.fail_after(TIMEOUT_S):
            await self.stream.send_all(data)

    async def recv(self, timeout_s: float = TIMEOUT_S) -> Packet | None:
        """The next packet, or None at EOF. Fails the test after ``timeout_s``."""
        with trio.fail_after(timeout_s):
            while not self.received:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                self.received.extend(self.decoder.feed(data))
        return self.received.pop(0)

    async def expect(self, kind: type, timeout_s: float = TIMEOUT_S) -> Packet:
        """The next packet, which must be a ``kind``: for exact sequences the broker
        promises (CONNACK first, acks in the order of their packets, one subscriber's
        messages in order). Where MQTT leaves the order open, use :meth:`take`."""
        packet = await self.recv(timeout_s)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    async def take(
        self, kind: type, timeout_s: float = TIMEOUT_S, *, packet_id: int | None = None
    ) -> Packet:
        """The first packet of ``kind`` (with ``packet_id``, if given) among those that
        arrive, skipping the others explicitly: they stay queued, in their order, for
        later calls. MQTT orders acknowledgements among themselves and the messages of one
        subscription among themselves, but not the one against the other: the PUBACK of a
        client's own QoS 1 PUBLISH may come before or after the messages routed to it."""
        with trio.fail_after(timeout_s):
            index = 0
            while True:
                while index < len(self.received):
                    packet = self.received[index]
                    if isinstance(packet, kind) and (
                        packet_id is None or getattr(packet, "packet_id", None) == packet_id
                    ):
                        return self.received.pop(index)
                    index += 1
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    raise AssertionError(
                        f"connection closed before a {kind.__name__}; got {self.received!r}"
                    )
                self.received.extend(self.decoder.feed(data))

    async def expect_closed(self, timeout_s: float = TIMEOUT_S) -> list[Packet]:
        """Wait for the broker to close the connection; returns packets received before."""
        got = []
        while True:
            packet = await self.recv(timeout_s)
            if packet is None:
                return got
            got.append(packet)

    async def subscribe(self, *filters: str, qos: int = 0) -> SubAck:
        pid = self.packet_id()
        await self.send(Subscribe(pid, tuple(Subscription(f, qos) for f in filters)))
        # messages of earlier subscriptions may arrive before the SUBACK: they stay queued
        suback = await self.take(SubAck, packet_id=pid)
        return suback  # type: ignore[return-value]

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> None:
        pid = self.packet_id() if qos else 0
        await self.send(Publish(topic, payload, qos, retain, False, pid))
        if qos == 1:
            # a PUBLISH routed back to this client may come before or after its PUBACK:
            # it stays queued for the caller
            await self.take(PubAck, packet_id=pid)

    async def aclose(self) -> None:
        await self.stream.aclose()
