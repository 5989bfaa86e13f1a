"""Hypothesis round trips at level 5: every packet type with random properties encodes to
bytes that decode back to it, alone, in streams, cut into arbitrary chunks; random property
blocks read the same by paho-mqtt; arbitrary bytes at level 5 only raise MQTTError."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.properties import Properties as PahoProperties

from mqttd.codec import Decoder, MQTTError, encode_publish_parts_v5
from mqttd.codec import reason as rc
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
from mqttd.codec.packets import (
    PROTOCOL_5,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from mqttd.codec.properties import (
    BINARY,
    BY_NAME,
    BYTE,
    FOUR_BYTE,
    PROPERTIES,
    TWO_BYTE,
    UTF8,
    UTF8_PAIR,
    VARINT,
    decode_properties,
    encode_properties,
)
from tests.codec.test_roundtrip import (
    chunked,
    client_ids,
    filters,
    keepalives,
    packet_ids,
    payloads,
    qos_levels,
    topic_names,
    utf8_text,
)
from tests.codec.test_v5_properties import PAHO_KIND
from tests.codec.v5util import decoder5

SETTINGS = settings(max_examples=150, deadline=None)
STREAM_SETTINGS = settings(max_examples=80, deadline=None)

# -- strategies ------------------------------------------------------------------------

FLAGS = {
    "payload_format_indicator", "request_problem_information", "request_response_information",
    "maximum_qos", "retain_available", "wildcard_subscription_available",
    "subscription_identifier_available", "shared_subscription_available",
}
NOT_ZERO = {"receive_maximum", "topic_alias", "maximum_packet_size", "subscription_identifier"}


def value_of(name: str, kind: int) -> st.SearchStrategy[Any]:
    """Valid values of property ``name`` on packet type ``kind``."""
    spec = BY_NAME[name]
    low = 1 if name in NOT_ZERO else 0
    if name in FLAGS:
        return st.integers(0, 1)
    if name == "response_topic":
        return topic_names
    if spec.type == BYTE:
        return st.integers(0, 255)
    if spec.type == TWO_BYTE:
        return st.integers(low, 0xFFFF)
    if name == "maximum_packet_size":  # a packet is never larger than 268435455 + 5 bytes;
        return st.integers(1, 268_435_455)  # paho refuses larger values
    if spec.type == FOUR_BYTE:
        return st.integers(low, 0xFFFF_FFFF)
    if spec.type == VARINT:
        ints = st.integers(1, 268_435_455)
        return st.lists(ints, min_size=1, max_size=4) if kind == PUBLISH else ints
    if spec.type == UTF8:
        return utf8_text
    if spec.type == UTF8_PAIR:
        return st.lists(st.tuples(utf8_text, utf8_text), min_size=1, max_size=4)
    assert spec.type == BINARY
    return st.binary(max_size=40)


@st.composite
def properties_for(draw: st.DrawFn, kind: int) -> dict[str, Any]:
    names = sorted(p.name for p in PROPERTIES if kind in p.packets)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    props = {name: draw(value_of(name, kind)) for name in chosen}
    if kind == CONNECT and "authentication_data" in props:
        props.setdefault("authentication_method", draw(utf8_text))
    return props


ALL_KINDS = (CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK,
             UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH, WILL)
kinds_and_properties = st.sampled_from(ALL_KINDS).flatmap(
    lambda kind: st.tuples(st.just(kind), properties_for(kind))
)


def codes(kind: int) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted(rc.VALID[kind]))


@st.composite
def wills(draw: st.DrawFn) -> Will:
    return Will(draw(topic_names), draw(payloads), draw(qos_levels), draw(st.booleans()),
                draw(properties_for(WILL)))


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    return Connect(
        client_id=draw(client_ids),
        clean_session=draw(st.booleans()),
        keepalive_s=draw(keepalives),
        protocol_level=PROTOCOL_5,
        will=draw(st.none() | wills()),
        username=draw(st.none() | utf8_text),
        password=draw(st.none() | st.binary(max_size=40)),  # no user name needed in 5.0
        properties=draw(properties_for(CONNECT)),
    )


@st.composite
def connacks(draw: st.DrawFn) -> ConnAck:
    code = draw(codes(CONNACK))
    present = draw(st.booleans()) if code == 0 else False
    return ConnAck(present, code, draw(properties_for(CONNACK)))


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(qos_levels)
    props = draw(properties_for(PUBLISH))
    topic = draw(topic_names | st.just(""))
    if not topic:
        props["topic_alias"] = draw(st.integers(1, 0xFFFF))
    return Publish(
        topic=topic,
        payload=draw(payloads),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
        packet_id=draw(packet_ids) if qos else 0,
        properties=props,
    )


def acks(cls: type[PubAck], kind: int) -> st.SearchStrategy[PubAck]:
    return st.builds(cls, packet_ids, codes(kind), properties_for(kind))


@st.composite
def subscriptions(draw: st.DrawFn) -> Subscription:
    topic_filter = draw(filters | filters.map(lambda f: "$share/g/" + f))
    shared = topic_filter.startswith("$share/")
    return Subscription(
        topic_filter,
        draw(qos_levels),
        False if shared else draw(st.booleans()),  # MQTT-3.8.3-4
        draw(st.booleans()),
        draw(st.integers(0, 2)),
    )


def code_lists(kind: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(codes(kind), min_size=1, max_size=8).map(tuple)


subscribes = st.builds(
    Subscribe, packet_ids, st.lists(subscriptions(), min_size=1, max_size=6).map(tuple),
    properties_for(SUBSCRIBE),
)
subacks = st.builds(SubAck, packet_ids, code_lists(SUBACK), properties_for(SUBACK))
unsubscribes = st.builds(
    Unsubscribe, packet_ids, st.lists(filters, min_size=1, max_size=6).map(tuple),
    properties_for(UNSUBSCRIBE),
)
unsubacks = st.builds(UnsubAck, packet_ids, code_lists(UNSUBACK), properties_for(UNSUBACK))
disconnects = st.builds(Disconnect, codes(DISCONNECT), properties_for(DISCONNECT))
auths = st.builds(Auth, codes(AUTH), properties_for(AUTH))

packets = st.one_of(
    connects(), connacks(), publishes(), acks(PubAck, PUBACK), acks(PubRec, PUBREC),
    acks(PubRel, PUBREL), acks(PubComp, PUBCOMP), subscribes, subacks, unsubscribes,
    unsubacks, st.sampled_from([PingReq(), PingResp()]), disconnects, auths,
)


def encode(packet: Any) -> bytes:
    return packet.encode(PROTOCOL_5)  # type: ignore[no-any-return]


# -- properties --------------------------------------------------------------------------


@SETTINGS
@given(kinds_and_properties)
def test_properties_roundtrip(kind_props: tuple[int, dict[str, Any]]) -> None:
    kind, props = kind_props
    wire = encode_properties(props, kind)
    assert decode_properties(wire, 0, len(wire), kind) == (props, len(wire))


@SETTINGS
@given(kinds_and_properties)
def test_paho_reads_random_properties(kind_props: tuple[int, dict[str, Any]]) -> None:
    """paho-mqtt's Properties.unpack reads our bytes as the same values, and packs them back
    to the same bytes."""
    kind, props = kind_props
    wire = encode_properties(props, kind)
    paho, length = PahoProperties(PAHO_KIND[kind]).unpack(wire)
    assert length == len(wire)
    for name, value in props.items():
        got = getattr(paho, BY_NAME[name].title.replace(" ", ""))
        if name == "subscription_identifier" and kind != PUBLISH:
            got = got[0]
        assert got == value, name
    assert paho.pack() == wire


# -- packets -----------------------------------------------------------------------------


@SETTINGS
@given(connects())
def test_connect_roundtrip(packet: Connect) -> None:
    decoder = Decoder(accept_v5=True)
    assert decoder.feed(encode(packet)) == [packet]
    assert decoder.protocol_level == PROTOCOL_5


@SETTINGS
@given(publishes())
def test_publish_roundtrip(packet: Publish) -> None:
    assert decoder5().feed(encode(packet)) == [packet]


@SETTINGS
@given(publishes())
def test_encode_publish_parts_v5_matches_encode(packet: Publish) -> None:
    head, tail = encode_publish_parts_v5(
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.properties
    )
    pid = packet.packet_id.to_bytes(2, "big") if packet.qos else b""
    assert head + pid + tail == encode(packet)


@SETTINGS
@given(packets)
def test_any_packet_roundtrip(packet: object) -> None:
    decoder = decoder5()
    assert decoder.feed(encode(packet)) == [packet]
    assert decoder.buffered == 0


@SETTINGS
@given(packets)
def test_any_packet_byte_by_byte(packet: object) -> None:
    wire = encode(packet)
    decoder = decoder5()
    out = []
    for n, b in enumerate(wire, start=1):
        out += decoder.feed(bytes([b]))
        assert decoder.buffered == (0 if n == len(wire) else n)
    assert out == [packet]


@STREAM_SETTINGS
@given(connects(), st.lists(packets, min_size=1, max_size=10), st.data())
def test_stream_after_connect_in_random_chunks(
    connect: Connect, stream: list[object], data: st.DataObject
) -> None:
    """A level-5 CONNECT and what follows it, cut anywhere: the level switch happens at the
    right byte whatever the chunking."""
    wire = encode(connect) + b"".join(encode(p) for p in stream)
    decoder = Decoder(accept_v5=True)
    out = []
    for chunk in data.draw(chunked(wire)):
        out += decoder.feed(chunk)
    assert out == [connect, *stream]
    assert decoder.buffered == 0


# -- arbitrary bytes ---------------------------------------------------------------------


def _outcome(decoder: Decoder, chunks: list[bytes]) -> tuple[list[object], str | None]:
    out: list[object] = []
    for chunk in chunks:
        try:
            out += decoder.feed(chunk)
        except MQTTError as exc:
            return out + exc.packets_before, type(exc).__name__
    return out, None


def _mutate(wire: bytes, at: int, byte: int) -> bytes:
    if not wire:
        return wire
    at %= len(wire)
    return wire[:at] + bytes((byte,)) + wire[at + 1:]


@settings(max_examples=300, deadline=None)
@given(st.lists(packets.map(encode), min_size=1, max_size=4), st.integers(0, 10_000),
       st.integers(0, 255), st.data())
def test_mutated_v5_bytes_only_raise_mqtt_errors(
    parts: list[bytes], at: int, byte: int, data: st.DataObject
) -> None:
    """One byte of a valid 5.0 stream changed: packets or an MQTTError, never another
    exception, and the chunking does not change the outcome."""
    wire = _mutate(b"".join(parts), at, byte)
    whole = _outcome(decoder5(4096), [wire])
    assert _outcome(decoder5(4096), data.draw(chunked(wire))) == whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_at_level_5_only_raise_mqtt_errors(wire: bytes) -> None:
    whole = _outcome(decoder5(), [wire])
    assert _outcome(decoder5(), [wire[i:i + 1] for i in range(len(wire))]) == whole
