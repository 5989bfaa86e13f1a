"""MQTT 5.0 properties: every property against hand-written bytes (5.0 section 2.2.2.2 and
section 3), on every packet type, duplicated, out of range, truncated and with bad strings;
the table and the bytes cross-checked against paho-mqtt's independent implementation."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from mqttd.codec import MalformedPacket, MQTTError, ProtocolError, TopicAliasInvalid
from mqttd.codec.kinds import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
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
from mqttd.codec.properties import (
    BY_ID,
    BY_NAME,
    PROPERTIES,
    TYPE_NAMES,
    allowed,
    decode_properties,
    encode_properties,
)
from tests.codec.v5util import h, s16

ALL_KINDS = (CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK,
             UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH, WILL)
PAHO_KIND = {kind: kind for kind in ALL_KINDS if kind != WILL} | {WILL: PacketTypes.WILLMESSAGE}

# (name, packet type, value, the property's bytes: identifier then value) - by hand from 5.0
EXAMPLES: list[tuple[str, int, Any, str]] = [
    ("payload_format_indicator", PUBLISH, 1, "01 01"),
    ("message_expiry_interval", PUBLISH, 3600, "02 00000e10"),
    ("content_type", PUBLISH, "json", "03" + s16("json")),
    ("response_topic", WILL, "r/t", "08 0003 722f74"),
    ("correlation_data", PUBLISH, b"\x00\xff", "09 0002 00ff"),
    ("subscription_identifier", SUBSCRIBE, 268_435_455, "0b ffffff7f"),
    ("session_expiry_interval", CONNECT, 0xFFFFFFFF, "11 ffffffff"),
    ("assigned_client_identifier", CONNACK, "id", "12 0002 6964"),
    ("server_keep_alive", CONNACK, 30, "13 001e"),
    ("authentication_method", AUTH, "SCRAM-SHA-1", "15" + s16("SCRAM-SHA-1")),
    ("authentication_data", CONNECT, b"abc", "16 0003 616263"),
    ("request_problem_information", CONNECT, 0, "17 00"),
    ("will_delay_interval", WILL, 10, "18 0000000a"),
    ("request_response_information", CONNECT, 1, "19 01"),
    ("response_information", CONNACK, "resp", "1a 0004 72657370"),
    ("server_reference", DISCONNECT, "other:1883", "1c" + s16("other:1883")),
    ("reason_string", PUBACK, "bad", "1f 0003 626164"),
    ("receive_maximum", CONNECT, 65535, "21 ffff"),
    ("topic_alias_maximum", CONNACK, 0, "22 0000"),
    ("topic_alias", PUBLISH, 1, "23 0001"),
    ("maximum_qos", CONNACK, 1, "24 01"),
    ("retain_available", CONNACK, 0, "25 00"),
    ("user_property", SUBSCRIBE, [("k", "é")], "26 0001 6b 0002 c3a9"),
    ("maximum_packet_size", CONNECT, 1024, "27 00000400"),
    ("wildcard_subscription_available", CONNACK, 1, "28 01"),
    ("subscription_identifier_available", CONNACK, 0, "29 00"),
    ("shared_subscription_available", CONNACK, 1, "2a 01"),
]
IDS = [name for name, *_ in EXAMPLES]


def block(body_hex: str) -> bytes:
    body = h(body_hex)
    assert len(body) < 128
    return bytes((len(body),)) + body


def decode(data: bytes, kind: int) -> dict[str, Any]:
    props, i = decode_properties(data, 0, len(data), kind)
    assert i == len(data)
    return props


def test_every_property_has_an_example() -> None:
    assert sorted(IDS) == sorted(p.name for p in PROPERTIES)
    assert len(PROPERTIES) == 27


@pytest.mark.parametrize(("name", "kind", "value", "body"), EXAMPLES, ids=IDS)
def test_property_decodes_and_encodes(name: str, kind: int, value: Any, body: str) -> None:
    wire = block(body)
    assert decode(wire, kind) == {name: value}
    assert encode_properties({name: value}, kind) == wire
    # and inside a longer buffer: the block ends where its length says
    props, i = decode_properties(b"xx" + wire + b"payload", 2, len(wire) + 9, kind)
    assert (props, i) == ({name: value}, 2 + len(wire))


@pytest.mark.parametrize(("name", "kind", "value", "body"), EXAMPLES, ids=IDS)
def test_property_on_every_packet_type(name: str, kind: int, value: Any, body: str) -> None:
    """Allowed where table 2-4 says, a Malformed Packet anywhere else (section 2.2.2.2)."""
    spec = BY_NAME[name]
    for other in ALL_KINDS:
        if other in spec.packets:
            assert allowed(name, other)
            got = decode(block(body), other)
            if name == "subscription_identifier" and other == PUBLISH:
                assert got == {name: [value]}
            else:
                assert got == {name: value}
        else:
            assert not allowed(name, other)
            with pytest.raises(MalformedPacket, match="not allowed on") as info:
                decode(block(body), other)
            assert info.value.reason_code == 0x81
            with pytest.raises(ValueError, match="not allowed on"):
                encode_properties({name: value}, other)


@pytest.mark.parametrize(("name", "kind", "value", "body"), EXAMPLES, ids=IDS)
def test_property_twice(name: str, kind: int, value: Any, body: str) -> None:
    """Only User Property (anywhere) and Subscription Identifier (on PUBLISH) may repeat;
    any other property twice is a Protocol Error (section 3, for each property)."""
    twice = block(body + body)
    if name == "user_property":
        assert decode(twice, kind) == {name: value + value}
        return
    with pytest.raises(ProtocolError, match="more than once") as info:
        decode(twice, kind)
    assert info.value.reason_code == 0x82


def test_repeated_properties_keep_their_order() -> None:
    wire = block("0b 01 26 0001 61 0001 62 0b 8001 26 0001 61 0001 63 0b 05")
    assert decode(wire, PUBLISH) == {
        "subscription_identifier": [1, 128, 5],
        "user_property": [("a", "b"), ("a", "c")],
    }
    # encoding groups by identifier, keeping each list's order
    assert encode_properties(decode(wire, PUBLISH), PUBLISH) == block(
        "0b 01 0b 8001 0b 05 26 0001 61 0001 62 26 0001 61 0001 63"
    )
    assert encode_properties({"subscription_identifier": 7}, PUBLISH) == block("0b 07")


def test_empty_block() -> None:
    assert decode(b"\x00", CONNECT) == {}
    assert encode_properties({}, CONNECT) == b"\x00"
    assert encode_properties(None) == b"\x00"


def test_encoding_order_is_by_identifier() -> None:
    props = {"user_property": [("a", "b")], "topic_alias": 2, "payload_format_indicator": 0}
    reverse = dict(reversed(props.items()))
    wire = block("01 00 23 0002 26 0001 61 0001 62")
    assert encode_properties(props, PUBLISH) == encode_properties(reverse, PUBLISH) == wire


def test_encoding_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown MQTT 5\.0 property 'colour'"):
        encode_properties({"colour": 1})


def test_long_block_has_a_multi_byte_length() -> None:
    props = {"user_property": [("k" * 60, "v" * 60)] * 3}
    wire = encode_properties(props, CONNECT)
    body_length = 3 * (1 + 2 + 60 + 2 + 60)
    assert wire[:2] == bytes((body_length & 0x7F | 0x80, body_length >> 7))
    assert decode(wire, CONNECT) == props


# -- malformed and forbidden values ---------------------------------------------------

MAL, PROTO, ALIAS = MalformedPacket, ProtocolError, TopicAliasInvalid

# (id, packet type, property bytes, error, reason code, part of the message)
BAD_VALUES: list[tuple[str, int, str, type[MQTTError], int, str]] = [
    ("payload-format-2", PUBLISH, "01 02", MAL, 0x81, "must be 0 or 1"),
    ("payload-format-ff-will", WILL, "01 ff", MAL, 0x81, "must be 0 or 1"),
    ("request-problem-2", CONNECT, "17 02", PROTO, 0x82, "must be 0 or 1"),
    ("request-response-2", CONNECT, "19 02", PROTO, 0x82, "must be 0 or 1"),
    ("maximum-qos-2", CONNACK, "24 02", PROTO, 0x82, "must be 0 or 1"),
    ("retain-available-2", CONNACK, "25 02", PROTO, 0x82, "must be 0 or 1"),
    ("wildcard-available-2", CONNACK, "28 02", PROTO, 0x82, "must be 0 or 1"),
    ("subid-available-2", CONNACK, "29 02", PROTO, 0x82, "must be 0 or 1"),
    ("shared-available-ff", CONNACK, "2a ff", PROTO, 0x82, "must be 0 or 1"),
    ("receive-maximum-0", CONNECT, "21 0000", PROTO, 0x82, "Receive Maximum of 0"),
    ("receive-maximum-0-connack", CONNACK, "21 0000", PROTO, 0x82, "Receive Maximum of 0"),
    ("maximum-packet-size-0", CONNECT, "27 00000000", PROTO, 0x82, "Maximum Packet Size of 0"),
    ("subscription-id-0", SUBSCRIBE, "0b 00", PROTO, 0x82, "Subscription Identifier of 0"),
    ("subscription-id-0-publish", PUBLISH, "0b 01 0b 00", PROTO, 0x82, "Identifier of 0"),
    ("subscription-id-5-bytes", SUBSCRIBE, "0b ffffffff01", MAL, 0x81, "longer than four"),
    ("subscription-id-twice-subscribe", SUBSCRIBE, "0b 01 0b 02", PROTO, 0x82, "more than once"),
    ("topic-alias-0", PUBLISH, "23 0000", ALIAS, 0x94, "Topic Alias of 0"),
    ("response-topic-wildcard", PUBLISH, "08 0003 612f23", PROTO, 0x82, "not a topic name"),
    ("response-topic-plus-will", WILL, "08 0001 2b", PROTO, 0x82, "not a topic name"),
    ("response-topic-empty", PUBLISH, "08 0000", PROTO, 0x82, "not a topic name"),
    ("unknown-id-0", PUBLISH, "00 00", MAL, 0x81, "unknown property identifier 0x00"),
    ("unknown-id-4", PUBLISH, "04 00", MAL, 0x81, "unknown property identifier 0x04"),
    ("unknown-id-2b", CONNACK, "2b 00", MAL, 0x81, "unknown property identifier 0x2b"),
    ("id-as-2-byte-varint", PUBLISH, "81 00 00", MAL, 0x81, "unknown property identifier 0x81"),
    ("string-bad-utf8", PUBLISH, "03 0002 c328", MAL, 0x81, "not valid UTF-8"),
    ("string-surrogate", PUBLISH, "03 0003 eda080", MAL, 0x81, "not valid UTF-8"),
    ("string-nul", CONNACK, "1f 0001 00", MAL, 0x81, r"contains U\+0000"),
    ("pair-name-bad-utf8", CONNECT, "26 0001 ff 0001 61", MAL, 0x81, "not valid UTF-8"),
    ("pair-value-nul", CONNECT, "26 0001 61 0001 00", MAL, 0x81, r"contains U\+0000"),
    ("pair-without-value", CONNECT, "26 0001 61", MAL, 0x81, "runs past the property length"),
    ("string-longer-than-block", PUBLISH, "03 0005 6162", MAL, 0x81, "runs past the property"),
    ("binary-longer-than-block", PUBLISH, "09 0005 6162", MAL, 0x81, "runs past the property"),
    ("byte-missing", CONNACK, "24", MAL, 0x81, "runs past the property length"),
    ("two-byte-cut", CONNACK, "13 00", MAL, 0x81, "runs past the property length"),
    ("four-byte-cut", CONNECT, "11 000000", MAL, 0x81, "runs past the property length"),
    ("varint-cut", SUBSCRIBE, "0b 80", MAL, 0x81, "ends inside"),
]


@pytest.mark.parametrize(
    ("kind", "body", "error", "code", "message"),
    [case[1:] for case in BAD_VALUES],
    ids=[case[0] for case in BAD_VALUES],
)
def test_bad_property(kind: int, body: str, error: type[MQTTError], code: int,
                      message: str) -> None:
    with pytest.raises(error, match=message) as info:
        decode(block(body), kind)
    assert type(info.value) is error
    assert info.value.reason_code == code


def test_every_unknown_identifier_is_malformed() -> None:
    for ident in range(256):
        if ident in BY_ID:
            continue
        with pytest.raises(MalformedPacket, match="unknown property identifier"):
            decode(bytes((2, ident, 0)), PUBLISH)


@pytest.mark.parametrize(("name", "kind", "value", "body"), EXAMPLES, ids=IDS)
def test_truncated_property(name: str, kind: int, value: Any, body: str) -> None:
    """Cut anywhere inside the property: a block length that stops inside the value, and a
    block length that runs past the end of the packet, are both malformed."""
    raw = h(body)
    for k in range(1, len(raw)):
        with pytest.raises(MalformedPacket):
            decode(bytes((k,)) + raw[:k], kind)
        with pytest.raises(MalformedPacket, match="runs past the end"):
            decode_properties(bytes((len(raw),)) + raw[:k], 0, 1 + k, kind)


def test_block_length_cut_or_too_long() -> None:
    with pytest.raises(MalformedPacket, match="ends before its property length"):
        decode_properties(b"", 0, 0, PUBLISH)
    with pytest.raises(MalformedPacket, match="property length"):
        decode_properties(h("80"), 0, 1, PUBLISH)
    with pytest.raises(MalformedPacket, match="longer than four bytes"):
        decode_properties(h("ffffffff01"), 0, 5, PUBLISH)
    with pytest.raises(MalformedPacket, match="runs past the end of the PUBLISH"):
        decode_properties(h("8001 00"), 0, 3, PUBLISH)


# -- cross-check with paho-mqtt -------------------------------------------------------


def test_table_matches_paho() -> None:
    """paho-mqtt's own transcription of table 2-4: same identifiers, types and packets."""
    paho = PahoProperties(PacketTypes.PUBLISH)
    assert sorted(paho.names.values()) == sorted(BY_ID)
    for title, ident in paho.names.items():
        spec = BY_ID[ident]
        assert spec.name == title.lower().replace(" ", "_")
        paho_type, paho_packets = paho.properties[ident]
        assert TYPE_NAMES[spec.type] == paho.types[paho_type]
        assert {PAHO_KIND[k] for k in spec.packets} == set(paho_packets)


def _paho_attr(name: str) -> str:
    return PahoProperties(PacketTypes.PUBLISH).getNameFromIdent(BY_NAME[name].identifier)


@pytest.mark.parametrize(("name", "kind", "value", "body"), EXAMPLES, ids=IDS)
def test_paho_packs_the_same_bytes(name: str, kind: int, value: Any, body: str) -> None:
    props = PahoProperties(PAHO_KIND[kind])
    setattr(props, _paho_attr(name), value)
    packed = props.pack()
    assert packed == block(body)
    assert decode(packed, kind) == {name: value}


@pytest.mark.parametrize(("name", "kind", "value", "body"), EXAMPLES, ids=IDS)
def test_paho_unpacks_ours(name: str, kind: int, value: Any, body: str) -> None:
    ours = encode_properties({name: value}, kind)
    props, length = PahoProperties(PAHO_KIND[kind]).unpack(ours)
    assert length == len(ours)
    got = getattr(props, _paho_attr(name).replace(" ", ""))
    if name == "subscription_identifier":
        got = got[0]  # paho keeps a list everywhere
    assert got == value


def test_paho_many_properties_both_ways() -> None:
    ours = {
        "payload_format_indicator": 1,
        "message_expiry_interval": 120,
        "content_type": "text/plain; charset=utf-8",
        "response_topic": "reply/ü",
        "correlation_data": bytes(range(40)),
        "subscription_identifier": [3, 2_000_000],
        "topic_alias": 9,
        "user_property": [("a", "1"), ("b", ""), ("a", "2")],
    }
    paho = PahoProperties(PacketTypes.PUBLISH)
    paho.PayloadFormatIndicator = 1
    paho.MessageExpiryInterval = 120
    paho.ContentType = "text/plain; charset=utf-8"
    paho.ResponseTopic = "reply/ü"
    paho.CorrelationData = bytes(range(40))
    paho.SubscriptionIdentifier = [3, 2_000_000]
    paho.TopicAlias = 9
    paho.UserProperty = [("a", "1"), ("b", ""), ("a", "2")]
    assert encode_properties(ours, PUBLISH) == paho.pack()
    assert decode(paho.pack(), PUBLISH) == ours
