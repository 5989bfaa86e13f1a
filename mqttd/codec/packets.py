"""MQTT control packets as values, each able to encode itself.

Packets are frozen attrs classes. Every class has room for MQTT 5.0: ``properties``
(``None`` in 3.x) and reason codes where 5.0 has them; ``encode(version)`` takes the
protocol level and selects the 3.x or the 5.0 layout (``Connect`` uses its own
``protocol_level``). Decoded at level 5, ``properties`` is always a dict (empty when the
packet has none); ``None`` is encoded as no properties.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs

from mqttd.codec.kinds import (
    AUTH,
    BRIDGE_LEVEL_FLAG,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PACKET_NAMES,
    PINGREQ,
    PINGRESP,
    PROTOCOL_5,
    PROTOCOL_31,
    PROTOCOL_311,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    WILL,
)
from mqttd.codec.properties import Properties, encode_properties
from mqttd.codec.wire import encode_bin, encode_publish_parts, encode_str, encode_varint


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
    clean_session: bool = True  # Clean Start in 5.0
    keepalive_s: int = 60
    protocol_level: int = PROTOCOL_311
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties | None = None

    @property
    def protocol_name(self) -> str:
        # a bridge sets the top bit of the level (mosquitto's try_private)
        return "MQIsdp" if self.protocol_level & ~BRIDGE_LEVEL_FLAG == PROTOCOL_31 else "MQTT"

    def encode(self, version: int | None = None) -> bytes:
        v5 = self.protocol_level & ~BRIDGE_LEVEL_FLAG == PROTOCOL_5
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
        if v5:
            body += encode_properties(self.properties, CONNECT)
        body += encode_str(self.client_id)
        if self.will is not None:
            if v5:
                body += encode_properties(self.will.properties, WILL)
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
    return_code: int = 0  # the Connect Reason Code in 5.0
    properties: Properties | None = None

    @property
    def reason_code(self) -> int:
        return self.return_code

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        present = 1 if (self.session_present and version >= PROTOCOL_311) else 0
        if version == PROTOCOL_5:
            body = bytes((present, self.return_code)) + encode_properties(self.properties, CONNACK)
            return _packet(CONNACK << 4, body)
        return bytes((CONNACK << 4, 2, present, self.return_code))


@attrs.frozen(weakref_slot=False)  # (no __weakref__ slot: see _WirePublish)
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
    # the broker's own bookkeeping, never on the wire: when a message with a 5.0 Message
    # Expiry Interval expires (epoch seconds; see ExpiringPublish); the interval itself is
    # not kept in ``properties`` but recomputed for each onward delivery. A class attribute
    # here, so that the common message pays nothing for it.
    expires_at: ClassVar[float | None] = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        if version == PROTOCOL_5:
            head, tail = encode_publish_parts_v5(
                self.topic, self.payload, self.qos, self.retain, self.dup, self.properties
            )
        else:
            head, tail = encode_publish_parts(
                self.topic, self.payload, self.qos, self.retain, self.dup
            )
        if self.qos:
            return head + self.packet_id.to_bytes(2, "big") + tail
        return head + tail


@attrs.frozen
class ExpiringPublish(Publish):
    """A message with a 5.0 Message Expiry Interval: ``expires_at`` is when (epoch s)."""

    expires_at: float | None = attrs.field(default=None, eq=False, repr=False)  # type: ignore[misc]


def _slot_setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    return tuple(cls.__dict__[name].__set__ for name in names)


_new_object = object.__new__


class _WirePublish:
    """The same slots as :class:`Publish` and nothing else: the decoder makes one, sets its
    slots with plain attribute stores (one bytecode each, where the frozen class's slot
    setters cost a call each) and turns it into a Publish (``__class__`` assignment, which
    CPython allows between classes of the same slots; Publish has no ``__weakref__`` slot,
    with which CPython would refuse). Never seen outside :func:`wire_publish`."""

    __slots__ = Publish.__slots__  # type: ignore[attr-defined]
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    properties: Properties | None


def wire_publish(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int
) -> Publish:
    """``Publish(topic, payload, qos, retain, dup, packet_id)`` as the decoder builds it,
    once per PUBLISH received, without the frozen class's per-field ``object.__setattr__``
    (Publish has no validators or converters); see _WirePublish."""
    packet = _new_object(_WirePublish)
    packet.topic = topic
    packet.payload = payload
    packet.qos = qos
    packet.retain = retain
    packet.dup = dup
    packet.packet_id = packet_id
    packet.properties = None
    packet.__class__ = Publish  # type: ignore[assignment]
    return packet  # type: ignore[return-value]


def encode_publish_parts_v5(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool = False,
    properties: Mapping[str, Any] | bytes | None = None,
) -> tuple[bytes, bytes]:
    """The MQTT 5.0 :func:`encode_publish_parts`: ``head + packet_id + tail`` for QoS > 0,
    ``head + tail`` for QoS 0, the properties at the start of ``tail``.

    ``properties`` is a dict, or a property block already encoded by
    ``encode_properties(props, PUBLISH)`` (length prefix included) so that a group of
    subscribers with the same properties (e.g. the same subscription identifier) shares it.
    ``topic`` may be empty when the properties carry a ``topic_alias``."""
    if properties is None:
        block = b"\x00"
    elif isinstance(properties, bytes):
        block = properties
    else:
        block = encode_properties(properties, PUBLISH)
    t = topic.encode("utf-8")
    remaining = 2 + len(t) + len(block) + len(payload) + (2 if qos else 0)
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    head = bytes((first,)) + encode_varint(remaining) + len(t).to_bytes(2, "big") + t
    return head, block + payload


@attrs.frozen
class _Ack:
    """PUBACK, PUBREC, PUBREL, PUBCOMP. In 5.0 the reason code and the properties may be left
    out: remaining length 2 means Success and no properties, 3 a reason code and none."""

    TYPE: ClassVar[int] = 0
    FLAGS: ClassVar[int] = 0
    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        first = self.TYPE << 4 | self.FLAGS
        pid = self.packet_id.to_bytes(2, "big")
        if version == PROTOCOL_5:
            if self.properties:
                body = pid + bytes((self.reason_code,)) + encode_properties(
                    self.properties, self.TYPE
                )
                return _packet(first, body)
            if self.reason_code:
                return bytes((first, 3)) + pid + bytes((self.reason_code,))
        return bytes((first, 2)) + pid


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

    @property
    def options(self) -> int:
        """The 5.0 Subscription Options byte (section 3.8.3.1)."""
        return (
            self.qos
            | (4 if self.no_local else 0)
            | (8 if self.retain_as_published else 0)
            | (self.retain_handling << 4)
        )


@attrs.frozen
class Subscribe:
    TYPE: ClassVar[int] = SUBSCRIBE
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        body = bytearray(self.packet_id.to_bytes(2, "big"))
        if version == PROTOCOL_5:
            body += encode_properties(self.properties, SUBSCRIBE)
            for sub in self.subscriptions:
                body += encode_str(sub.filter) + bytes((sub.options,))
        else:
            for sub in self.subscriptions:
                body += encode_str(sub.filter) + bytes((sub.qos,))
        return _packet(SUBSCRIBE << 4 | 0x02, bytes(body))


@attrs.frozen
class SubAck:
    TYPE: ClassVar[int] = SUBACK
    packet_id: int
    return_codes: tuple[int, ...]  # the reason codes in 5.0
    properties: Properties | None = None

    @property
    def reason_codes(self) -> tuple[int, ...]:
        return self.return_codes

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        pid = self.packet_id.to_bytes(2, "big")
        if version == PROTOCOL_5:
            props = encode_properties(self.properties, SUBACK)
            return _packet(SUBACK << 4, pid + props + bytes(self.return_codes))
        return _packet(SUBACK << 4, pid + bytes(self.return_codes))


@attrs.frozen
class Unsubscribe:
    TYPE: ClassVar[int] = UNSUBSCRIBE
    packet_id: int
    filters: tuple[str, ...]
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        body = self.packet_id.to_bytes(2, "big")
        if version == PROTOCOL_5:
            body += encode_properties(self.properties, UNSUBSCRIBE)
        body += b"".join(encode_str(f) for f in self.filters)
        return _packet(UNSUBSCRIBE << 4 | 0x02, body)


@attrs.frozen
class UnsubAck:
    TYPE: ClassVar[int] = UNSUBACK
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 5.0 only
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        pid = self.packet_id.to_bytes(2, "big")
        if version == PROTOCOL_5:
            props = encode_properties(self.properties, UNSUBACK)
            return _packet(UNSUBACK << 4, pid + props + bytes(self.reason_codes))
        return bytes((UNSUBACK << 4, 2)) + pid


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


def _reason_and_properties(first: int, code: int, props: Properties | None, kind: int) -> bytes:
    """DISCONNECT and AUTH in 5.0: nothing for Success without properties, else the reason
    code and the property block (DISCONNECT may end after the reason code)."""
    if props:
        return _packet(first, bytes((code,)) + encode_properties(props, kind))
    if not code:
        return bytes((first, 0))
    if kind == DISCONNECT:
        return bytes((first, 1, code))
    return bytes((first, 2, code, 0))


@attrs.frozen
class Disconnect:
    TYPE: ClassVar[int] = DISCONNECT
    reason_code: int = 0
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_311) -> bytes:
        if version == PROTOCOL_5:
            return _reason_and_properties(0xE0, self.reason_code, self.properties, DISCONNECT)
        return b"\xe0\x00"


@attrs.frozen
class Auth:
    """AUTH (5.0 only): extended authentication exchange (section 3.15, 4.12)."""

    TYPE: ClassVar[int] = AUTH
    reason_code: int = 0
    properties: Properties | None = None

    def encode(self, version: int = PROTOCOL_5) -> bytes:
        return _reason_and_properties(0xF0, self.reason_code, self.properties, AUTH)


Packet = (
    Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck
    | Unsubscribe | UnsubAck | PingReq | PingResp | Disconnect | Auth
)

__all__ = [
    "AUTH", "CONNACK", "CONNECT", "DISCONNECT", "PACKET_NAMES", "PINGREQ", "PINGRESP",
    "PROTOCOL_5", "PROTOCOL_31", "PROTOCOL_311", "PUBACK", "PUBCOMP", "PUBLISH", "PUBREC",
    "PUBREL", "SUBACK", "SUBSCRIBE", "UNSUBACK", "UNSUBSCRIBE", "WILL", "Auth", "ConnAck",
    "Connect", "Disconnect", "Packet", "PingReq", "PingResp", "Properties", "PubAck", "PubComp",
    "PubRec", "PubRel", "Publish", "SubAck", "Subscribe", "Subscription", "UnsubAck",
    "Unsubscribe", "Will", "encode_bin", "encode_publish_parts", "encode_publish_parts_v5",
    "encode_str", "encode_varint",
]
