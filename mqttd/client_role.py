"""The client side of an MQTT connection, as far as this broker's bridges
(:mod:`mqttd.bridge.link`) and the device simulators (``devices/client.py``) do it the same
way: the CONNECT / CONNACK exchange (with the packets that arrive behind the CONNACK), the
names of the 3.1.1 refusals, PINGREQ, a packet id beside those in use.

Sans-IO apart from :func:`handshake`, which drives a :class:`Handshake` over any stream with
``send_all`` and ``receive_some`` (the caller bounds it in time); no trio here.

What each keeps for itself, and why: a bridge's link answers its remote broker's PUBLISH,
PUBREL and acks with the engine's handlers (``mqttd.engine.publish``), because for a bridge
they are the broker's own state: inbound QoS 2 ids are stored and its acks wait for the
commit of what they acknowledge, outbound messages are the ``$bridge/<name>`` session's
stored queue. A simulated device keeps all of that in memory. A link pings every keepalive
period; a device pings when it has been quiet for one and checks that PINGRESP came.
"""

from __future__ import annotations

from collections.abc import Awaitable, Container, Iterable, Iterator
from typing import Protocol

from mqttd.codec import Decoder, ProtocolError
from mqttd.codec.kinds import BRIDGE_LEVEL_FLAG
from mqttd.codec.packets import ConnAck, Connect, Packet, PingReq

PINGREQ = PingReq().encode()
RECEIVE_SIZE = 65536

CONNACK_ERRORS = {  # 3.1.1 CONNACK return codes (5.0 reason codes are >= 0x80)
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class UnexpectedPacket(ProtocolError):
    """The server answered CONNECT with something else than CONNACK."""

    def __init__(self, packet: Packet) -> None:
        self.packet = packet
        super().__init__(f"expected CONNACK, got {type(packet).__name__}")


class Handshake:
    """CONNECT out, CONNACK in. The decoder goes on with the connection afterwards (it may
    hold the start of the next packet); ``leftovers``: the packets that came with the
    CONNACK (a resumed session's messages may follow it in the same read)."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect
        self.decoder = Decoder(protocol_level=connect.protocol_level & ~BRIDGE_LEVEL_FLAG)
        self.leftovers: list[Packet] = []

    def request(self) -> bytes:
        return self.connect.encode()

    def receive(self, data: bytes) -> ConnAck | None:
        """The CONNACK once ``data`` completes it (None before). Raises
        :class:`UnexpectedPacket` when the first packet is another, MQTTError when the bytes
        are no MQTT."""
        packets = self.decoder.feed(data)
        if not packets:
            return None
        first = packets[0]
        if not isinstance(first, ConnAck):
            raise UnexpectedPacket(first)
        self.leftovers = packets[1:]
        return first


class _Stream(Protocol):
    def send_all(self, data: bytes) -> Awaitable[None]: ...

    def receive_some(self, max_bytes: int) -> Awaitable[bytes | bytearray]: ...


async def handshake(stream: _Stream, exchange: Handshake) -> ConnAck | None:
    """Send the CONNECT and read until the CONNACK; None when the server closed the stream
    first. The return code is the caller's to judge."""
    await stream.send_all(exchange.request())
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return None
        connack = exchange.receive(bytes(data))
        if connack is not None:
            return connack


def refusal(return_code: int) -> str:
    """``5 (not authorized)``"""
    return f"{return_code} ({CONNACK_ERRORS.get(return_code, 'unknown reason')})"


def free_packet_id(candidates: Iterable[int], *in_use: Container[int]) -> int:
    """The first of ``candidates`` in none of ``in_use``."""
    for packet_id in candidates:
        if not any(packet_id in ids for ids in in_use):
            return packet_id
    raise RuntimeError("no free packet id")


def ids_after(last: int) -> Iterator[int]:
    """Every packet id once, starting after ``last`` (65535 is followed by 1)."""
    packet_id = last
    for _ in range(65535):
        packet_id = packet_id % 65535 + 1
        yield packet_id
