"""Helpers shared by the MQTT 5.0 codec tests."""

from __future__ import annotations

from typing import Any

import attrs

from mqttd.codec import Decoder
from mqttd.codec.packets import PROTOCOL_5, Connect, Packet, Will
from mqttd.codec.wire import encode_varint


def h(text: str) -> bytes:
    """Hex with spaces between fields, for readable expected bytes."""
    return bytes.fromhex(text)


def pkt(first: int, body: bytes | str) -> bytes:
    """A packet with its Remaining Length computed from the body."""
    raw = h(body) if isinstance(body, str) else body
    return bytes((first,)) + encode_varint(len(raw)) + raw


def s16(text: str) -> str:
    """A UTF-8 string field as hex: two-byte length then the bytes."""
    raw = text.encode()
    return f"{len(raw):04x}" + raw.hex()


def v5(packet: Any) -> Any:
    """``packet`` as the 5.0 decoder gives it: ``properties`` always a dict (``None`` is
    encoded as no properties), the will's too."""
    if attrs.has(type(packet)) and hasattr(packet, "properties"):
        changes: dict[str, Any] = {}
        if packet.properties is None:
            changes["properties"] = {}
        if isinstance(packet, Connect) and packet.will is not None:
            changes["will"] = v5(packet.will)
        if isinstance(packet, Will) and packet.properties is None:
            changes["properties"] = {}
        return attrs.evolve(packet, **changes) if changes else packet
    return packet


def decoder5(max_packet_size: int | None = None) -> Decoder:
    """A decoder already at level 5 (the client side, or a server after CONNECT)."""
    if max_packet_size is None:
        return Decoder(protocol_level=PROTOCOL_5)
    return Decoder(max_packet_size, protocol_level=PROTOCOL_5)


def decode5(wire: bytes) -> list[Packet]:
    return decoder5().feed(wire)
