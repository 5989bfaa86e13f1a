"""MQTT control packets as values, each able to encode itself.

Packets are frozen attrs classes. Every class has room for MQTT 5.0: ``properties``
(``None`` in 3.x) and reason codes where 5.0 has them; ``encode(version)`` takes the
protocol level so the 5.0 layout can be added per packet without touching callers.
Only protocol levels 3 (3.1, "MQIsdp") and 4 (3.1.1) are encoded for now.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

PROTOCOL_31 = 3
PROTOCOL_311 = 4
PROTOCOL_5 = 5

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}

Properties = dict[str, Any]


# -- encoding helpers --------------------------------------------------------------


def encode_varint(n: int) -> bytes:
    """Encode a Remaining Length (1-4 bytes); ``n`` must be below 268435456."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def encode_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(2, "big") + b


def encode_bin(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


# -- packets -----------------------------------------------------------------------


@attrs.frozen
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties | None = None


@attrs.frozen
class Connect:
    TYPE: ClassVar[int] = CONNECT
    client_id: str
    clean_session: bool = True
    keepalive_s: int = 60
    protocol_level: int = PROTOCOL_311
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties | None = None

    @property
    def protocol_name(self) -> str:
        return "MQIsdp" if self.protocol_level == PROTOCOL_31 else "MQTT"

    def encode(self, version: int | None = None) -> bytes:
        flags = 0x02 if self.clean_session else 0
        if self.will is not None:
            flags |= 0x04 | (self.will.qos << 3) | (0x20 if self.will.retain else 0)
        if self.username is not None:
            flags |= 0x80
        if self.password is not None:
            flags |= 0x40
        body = bytearray(encode_str(self.protocol_name))
        body += bytes((self.protocol_level, flags))
        body += self.keepalive_s.to_bytes(2, "big")
        body += encode_str(self.client_id)
        if self.will is not None:
            body += encode_str(self.will.topic) + encode_bin(self.will.payload)
        if self.username is not None:
            body += encode_str(self.username)
        if self.password is not None:
            body += encode_bin(self.password)
        return _packet(CONNECT << 4, bytes(body))


@attrs.frozen
class ConnAck:
    TYPE: ClassVar[int] = CONNACK
    session_present: bool = False
    return_code: int = 0
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        present = 1 if (self.session_present and version >= PROTOCOL_311) else 0
        return bytes((CONNACK << 4, 2, present, self.return_code))


@attrs.frozen
class Publish:
    """A PUBLISH packet; also the broker's message value (one per publish, shared by all
    deliveries)."""

    TYPE: ClassVar[int] = PUBLISH
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        head, tail = encode_publish_parts(self.topic, self.payload, self.qos, self.retain, self.dup)
        if self.qos:
            return head + self.packet_id.to_bytes(2, "big") + tail
        return head + tail


def encode_publish_parts(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool = False
) -> tuple[bytes, bytes]:
    """Encode a PUBLISH once as ``(head, tail)``; the packet is ``head + packet_id + tail``
    for QoS > 0 (two bytes) and ``head + tail`` for QoS 0. The parts are shared by every
    subscriber the message goes to; only the packet id differs."""
    t = topic.encode("utf-8")
    remaining = 2 + len(t) + len(payload) + (2 if qos else 0)
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    head = bytes((first,)) + encode_varint(remaining) + len(t).to_bytes(2, "big") + t
    return head, payload


@attrs.frozen
class _Ack:
    TYPE: ClassVar[int] = 0
    FLAGS: ClassVar[int] = 0
    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        return bytes((self.TYPE << 4 | self.FLAGS, 2)) + self.packet_id.to_bytes(2, "big")


@attrs.frozen
class PubAck(_Ack):
    TYPE: ClassVar[int] = PUBACK


@attrs.frozen
class PubRec(_Ack):
    TYPE: ClassVar[int] = PUBREC


@attrs.frozen
class PubRel(_Ack):
    TYPE: ClassVar[int] = PUBREL
    FLAGS: ClassVar[int] = 0x02


@attrs.frozen
class PubComp(_Ack):
    TYPE: ClassVar[int] = PUBCOMP


@attrs.frozen
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (5.0 options default to 3.x behaviour)."""

    filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@attrs.frozen
class Subscribe:
    TYPE: ClassVar[int] = SUBSCRIBE
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        body = bytearray(self.packet_id.to_bytes(2, "big"))
        for sub in self.subscriptions:
            body += encode_str(sub.filter) + bytes((sub.qos,))
        return _packet(SUBSCRIBE << 4 | 0x02, bytes(body))


@attrs.frozen
class SubAck:
    TYPE: ClassVar[int] = SUBACK
    packet_id: int
    return_codes: tuple[int, ...]
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        return _packet(SUBACK << 4, self.packet_id.to_bytes(2, "big") + bytes(self.return_codes))


@attrs.frozen
class Unsubscribe:
    TYPE: ClassVar[int] = UNSUBSCRIBE
    packet_id: int
    filters: tuple[str, ...]
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        body = self.packet_id.to_bytes(2, "big") + b"".join(encode_str(f) for f in self.filters)
        return _packet(UNSUBSCRIBE << 4 | 0x02, body)


@attrs.frozen
class UnsubAck:
    TYPE: ClassVar[int] = UNSUBACK
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 5.0 only
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        return bytes((UNSUBACK << 4, 2)) + self.packet_id.to_bytes(2, "big")


@attrs.frozen
class PingReq:
    TYPE: ClassVar[int] = PINGREQ

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        return b"\xc0\x00"


@attrs.frozen
class PingResp:
    TYPE: ClassVar[int] = PINGRESP

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        return b"\xd0\x00"


@attrs.frozen
class Disconnect:
    TYPE: ClassVar[int] = DISCONNECT
    reason_code: int = 0
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        return b"\xe0\x00"


Packet = (
    Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck
    | Unsubscribe | UnsubAck | PingReq | PingResp | Disconnect
)
