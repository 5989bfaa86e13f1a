"""MQTT 5.0 properties (5.0 section 2.2.2): the table, a decoder and an encoder.

A property block is a Variable Byte Integer length followed by properties, each an identifier
and a value of the identifier's type. Decoded, a block is a :data:`Properties` dict keyed by
the snake_case name of the property (``PROPERTIES`` lists them), with these value types:

* Byte, Two Byte, Four Byte and Variable Byte Integer properties: ``int`` (the 0/1 "available"
  and "request" flags stay ``int`` so a round trip is exact);
* UTF-8 strings: ``str``; binary data: ``bytes``;
* ``user_property``: a list of ``(name, value)`` tuples in wire order (it may repeat anywhere);
* ``subscription_identifier``: on PUBLISH a list of ``int`` (one per matching subscription, it
  may repeat there), on SUBSCRIBE one ``int``.

Errors (the reason code each carries in brackets):

* unknown identifier, a property not allowed on the packet, a value running past the property
  length or the packet, invalid UTF-8 or U+0000 in a string, a Payload Format Indicator other
  than 0 or 1: :class:`MalformedPacket` (0x81) - 5.0 section 2.2.2.2 calls a packet with an
  identifier not valid for its type, or a value not of the specified type, malformed;
* a property given twice (except ``user_property``, and ``subscription_identifier`` on
  PUBLISH), Receive Maximum / Maximum Packet Size / Subscription Identifier of 0, a
  request/available/Maximum QoS flag other than 0 or 1, a Response Topic with wildcards:
  :class:`ProtocolError` (0x82), as the spec says for each;
* Topic Alias 0: :class:`TopicAliasInvalid` (0x94, section 3.3.2.3.4).

Encoding writes properties in identifier order (repeated ones in list order), so equal dicts
give equal bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from mqttd.codec.errors import MalformedPacket, ProtocolError, TopicAliasInvalid
from mqttd.codec.kinds import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PACKET_NAMES,
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
from mqttd.codec.wire import Buffer, encode_bin, encode_str, encode_varint, read_varint

Properties = dict[str, Any]

# property value types (5.0 section 1.5)
BYTE, TWO_BYTE, FOUR_BYTE, VARINT, UTF8, UTF8_PAIR, BINARY = range(7)
TYPE_NAMES = ("Byte", "Two Byte Integer", "Four Byte Integer", "Variable Byte Integer",
              "UTF-8 Encoded String", "UTF-8 String Pair", "Binary Data")

_ACKS = (PUBACK, PUBREC, PUBREL, PUBCOMP)


@attrs.frozen
class PropertySpec:
    """One row of 5.0 table 2-4: identifier, name, type and the packets it may appear on."""

    identifier: int
    name: str
    type: int
    packets: frozenset[int]
    repeats_on: frozenset[int] = frozenset()

    @property
    def title(self) -> str:
        """The spec's name, e.g. ``"Maximum QoS"``."""
        return " ".join(w.capitalize() for w in self.name.split("_")).replace("Qos", "QoS")


def _spec(ident: int, name: str, kind: int, *packets: int, repeats_on: tuple[int, ...] = ()
          ) -> PropertySpec:
    return PropertySpec(ident, name, kind, frozenset(packets), frozenset(repeats_on))


_EVERY = (CONNECT, CONNACK, PUBLISH, WILL, *_ACKS, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK,
          DISCONNECT, AUTH)

PROPERTIES: tuple[PropertySpec, ...] = (
    _spec(0x01, "payload_format_indicator", BYTE, PUBLISH, WILL),
    _spec(0x02, "message_expiry_interval", FOUR_BYTE, PUBLISH, WILL),
    _spec(0x03, "content_type", UTF8, PUBLISH, WILL),
    _spec(0x08, "response_topic", UTF8, PUBLISH, WILL),
    _spec(0x09, "correlation_data", BINARY, PUBLISH, WILL),
    _spec(0x0B, "subscription_identifier", VARINT, PUBLISH, SUBSCRIBE, repeats_on=(PUBLISH,)),
    _spec(0x11, "session_expiry_interval", FOUR_BYTE, CONNECT, CONNACK, DISCONNECT),
    _spec(0x12, "assigned_client_identifier", UTF8, CONNACK),
    _spec(0x13, "server_keep_alive", TWO_BYTE, CONNACK),
    _spec(0x15, "authentication_method", UTF8, CONNECT, CONNACK, AUTH),
    _spec(0x16, "authentication_data", BINARY, CONNECT, CONNACK, AUTH),
    _spec(0x17, "request_problem_information", BYTE, CONNECT),
    _spec(0x18, "will_delay_interval", FOUR_BYTE, WILL),
    _spec(0x19, "request_response_information", BYTE, CONNECT),
    _spec(0x1A, "response_information", UTF8, CONNACK),
    _spec(0x1C, "server_reference", UTF8, CONNACK, DISCONNECT),
    _spec(0x1F, "reason_string", UTF8, CONNACK, *_ACKS, SUBACK, UNSUBACK, DISCONNECT, AUTH),
    _spec(0x21, "receive_maximum", TWO_BYTE, CONNECT, CONNACK),
    _spec(0x22, "topic_alias_maximum", TWO_BYTE, CONNECT, CONNACK),
    _spec(0x23, "topic_alias", TWO_BYTE, PUBLISH),
    _spec(0x24, "maximum_qos", BYTE, CONNACK),
    _spec(0x25, "retain_available", BYTE, CONNACK),
    _spec(0x26, "user_property", UTF8_PAIR, *_EVERY, repeats_on=_EVERY),
    _spec(0x27, "maximum_packet_size", FOUR_BYTE, CONNECT, CONNACK),
    _spec(0x28, "wildcard_subscription_available", BYTE, CONNACK),
    _spec(0x29, "subscription_identifier_available", BYTE, CONNACK),
    _spec(0x2A, "shared_subscription_available", BYTE, CONNACK),
)

BY_NAME: dict[str, PropertySpec] = {p.name: p for p in PROPERTIES}
BY_ID: dict[int, PropertySpec] = {p.identifier: p for p in PROPERTIES}
# identifier -> spec for the decoder, None where the identifier is unknown (every byte value)
_TABLE: tuple[PropertySpec | None, ...] = tuple(BY_ID.get(i) for i in range(256))

USER_PROPERTY = 0x26
SUBSCRIPTION_IDENTIFIER = 0x0B


def allowed(name: str, packet_type: int) -> bool:
    """Whether property ``name`` may appear on ``packet_type`` (``WILL`` for will properties)."""
    spec = BY_NAME.get(name)
    return spec is not None and packet_type in spec.packets


# -- value checks -------------------------------------------------------------------------


def _zero_or_one(exc: type[Exception]) -> Callable[[PropertySpec, Any], None]:
    def check(spec: PropertySpec, value: Any) -> None:
        if value > 1:
            raise exc(f"{spec.title} must be 0 or 1, not {value}")
    return check


def _not_zero(spec: PropertySpec, value: Any) -> None:
    if not value:
        raise ProtocolError(f"{spec.title} of 0")


def _topic_alias(spec: PropertySpec, value: Any) -> None:
    if not value:
        raise TopicAliasInvalid("Topic Alias of 0")


def _response_topic(spec: PropertySpec, value: Any) -> None:
    if not value or "+" in value or "#" in value:
        raise ProtocolError(f"Response Topic {value!r} is not a topic name")


_CHECKS: dict[int, Callable[[PropertySpec, Any], None]] = {
    0x01: _zero_or_one(MalformedPacket),
    0x08: _response_topic,
    0x0B: _not_zero,
    0x17: _zero_or_one(ProtocolError),
    0x19: _zero_or_one(ProtocolError),
    0x21: _not_zero,
    0x23: _topic_alias,
    0x24: _zero_or_one(ProtocolError),
    0x25: _zero_or_one(ProtocolError),
    0x27: _not_zero,
    0x28: _zero_or_one(ProtocolError),
    0x29: _zero_or_one(ProtocolError),
    0x2A: _zero_or_one(ProtocolError),
}


# -- decoding -----------------------------------------------------------------------------


def _string(data: Buffer, i: int, stop: int, spec: PropertySpec) -> tuple[str, int]:
    if i + 2 > stop:
        raise MalformedPacket(f"{spec.title} runs past the property length")
    n = (data[i] << 8) | data[i + 1]
    i += 2
    if i + n > stop:
        raise MalformedPacket(f"{spec.title} of {n} bytes runs past the property length")
    try:
        s = str(data[i:i + n], "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{spec.title} is not valid UTF-8") from None
    if "\x00" in s:
        raise MalformedPacket(f"{spec.title} contains U+0000")
    return s, i + n


def decode_properties(data: Buffer, i: int, end: int, packet_type: int) -> tuple[Properties, int]:
    """Decode the property block at ``data[i:end]`` of a ``packet_type`` packet (``WILL`` for
    will properties); return the properties and the index after the block."""
    if i >= end:
        raise MalformedPacket(f"{PACKET_NAMES[packet_type]} ends before its property length")
    length = data[i]
    if not length:
        return {}, i + 1
    if length & 0x80:
        length, i = read_varint(data, i, end, "property length")
    else:
        i += 1
    stop = i + length
    if stop > end:
        raise MalformedPacket(
            f"property length {length} runs past the end of the {PACKET_NAMES[packet_type]}"
        )
    props: Properties = {}
    while i < stop:
        ident = data[i]
        i += 1
        spec = _TABLE[ident]
        if spec is None:
            raise MalformedPacket(f"unknown property identifier {ident:#04x}")
        if packet_type not in spec.packets:
            raise MalformedPacket(f"{spec.title} is not allowed on {PACKET_NAMES[packet_type]}")
        kind = spec.type
        value: Any
        if kind == BYTE:
            if i >= stop:
                raise MalformedPacket(f"{spec.title} runs past the property length")
            value = data[i]
            i += 1
        elif kind == TWO_BYTE:
            if i + 2 > stop:
                raise MalformedPacket(f"{spec.title} runs past the property length")
            value = (data[i] << 8) | data[i + 1]
            i += 2
        elif kind == FOUR_BYTE:
            if i + 4 > stop:
                raise MalformedPacket(f"{spec.title} runs past the property length")
            value = int.from_bytes(data[i:i + 4], "big")
            i += 4
        elif kind == VARINT:
            value, i = read_varint(data, i, stop, spec.title)
        elif kind == UTF8:
            value, i = _string(data, i, stop, spec)
        elif kind == UTF8_PAIR:
            key, i = _string(data, i, stop, spec)
            val, i = _string(data, i, stop, spec)
            value = (key, val)
        else:  # BINARY
            if i + 2 > stop:
                raise MalformedPacket(f"{spec.title} runs past the property length")
            n = (data[i] << 8) | data[i + 1]
            i += 2
            if i + n > stop:
                raise MalformedPacket(f"{spec.title} of {n} bytes runs past the property length")
            value = data[i:i + n]
            i += n
        check = _CHECKS.get(ident)
        if check is not None:
            check(spec, value)
        name = spec.name
        if packet_type in spec.repeats_on:
            props.setdefault(name, []).append(value)
        elif name in props:
            raise ProtocolError(
                f"{spec.title} more than once on {PACKET_NAMES[packet_type]}"
            )
        else:
            props[name] = value
    return props, stop


# -- encoding -----------------------------------------------------------------------------


def _encode_value(kind: int, value: Any) -> bytes:
    if kind == BYTE:
        return bytes((value,))
    if kind == TWO_BYTE:
        return int(value).to_bytes(2, "big")
    if kind == FOUR_BYTE:
        return int(value).to_bytes(4, "big")
    if kind == VARINT:
        if not 0 <= value <= 268_435_455:
            raise ValueError(f"Variable Byte Integer out of range: {value}")
        return encode_varint(value)
    if kind == UTF8:
        return encode_str(value)
    if kind == UTF8_PAIR:
        key, val = value
        return encode_str(key) + encode_str(val)
    return encode_bin(bytes(value))


def _order(name: str) -> int:
    spec = BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"unknown MQTT 5.0 property {name!r}")
    return spec.identifier


def encode_property_list(props: Mapping[str, Any] | None, packet_type: int | None = None
                         ) -> bytes:
    """The properties of ``props`` without the length prefix, in identifier order.

    ``packet_type`` (``WILL`` for will properties), when given, is checked: a property not
    allowed there raises ``ValueError``. ``user_property`` is a sequence of pairs;
    ``subscription_identifier`` an ``int`` or a sequence of them."""
    if not props:
        return b""
    out = bytearray()
    for name in sorted(props, key=_order):
        spec = BY_NAME[name]
        if packet_type is not None and packet_type not in spec.packets:
            raise ValueError(f"{spec.title} is not allowed on {PACKET_NAMES[packet_type]}")
        value = props[name]
        ident = bytes((spec.identifier,))
        if spec.identifier == USER_PROPERTY or (
            spec.identifier == SUBSCRIPTION_IDENTIFIER and not isinstance(value, int)
        ):
            for item in value:
                out += ident + _encode_value(spec.type, item)
        else:
            out += ident + _encode_value(spec.type, value)
    return bytes(out)


def encode_properties(props: Mapping[str, Any] | None, packet_type: int | None = None) -> bytes:
    """A property block: the Variable Byte Integer length, then the properties."""
    if not props:
        return b"\x00"
    body = encode_property_list(props, packet_type)
    return encode_varint(len(body)) + body


__all__ = [
    "BY_ID",
    "BY_NAME",
    "PROPERTIES",
    "Properties",
    "PropertySpec",
    "allowed",
    "decode_properties",
    "encode_properties",
    "encode_property_list",
]
