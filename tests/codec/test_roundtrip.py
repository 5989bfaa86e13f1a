"""Hypothesis round trips: every packet value encodes to bytes that decode back to it,
alone, several in a row, and cut into arbitrary chunks."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mqttd.codec import Decoder, MQTTError, PacketTooLarge, encode_publish_parts
from mqttd.codec.packets import (
    PROTOCOL_31,
    PROTOCOL_311,
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
    encode_varint,
)

SETTINGS = settings(max_examples=200, deadline=None)
# streams of up to ten packets: fewer examples keep the suite fast
STREAM_SETTINGS = settings(max_examples=100, deadline=None)

# -- strategies ------------------------------------------------------------------------

def chars(excluded: str) -> st.SearchStrategy[str]:
    """Characters UTF-8 can encode (no surrogates), minus ``excluded``."""
    return st.characters(exclude_categories=("Cs",), exclude_characters=excluded)


# Any UTF-8 string the spec allows: no U+0000 (surrogates are excluded by default).
utf8_text = st.text(chars("\x00"), max_size=30)
# A topic name: non-empty, no wildcards, no U+0000.
topics = st.text(chars("\x00+#"), min_size=1, max_size=30)
# Structured topics as well, so slashes and empty levels are common.
topic_levels = st.lists(
    st.text(chars("\x00+#/"), max_size=5), min_size=1, max_size=6
).map("/".join).filter(bool)
topic_names = st.one_of(topics, topic_levels)
filters = st.one_of(
    utf8_text,
    st.lists(
        st.one_of(st.just("+"), st.text(chars("\x00/"), max_size=5)),
        min_size=1,
        max_size=6,
    ).map("/".join),
    topic_levels.map(lambda t: t + "/#"),
)
payloads = st.binary(max_size=300)
qos_levels = st.integers(0, 2)
packet_ids = st.integers(1, 65535)
client_ids = utf8_text
keepalives = st.integers(0, 65535)

wills = st.builds(Will, topic=topic_names, payload=payloads, qos=qos_levels, retain=st.booleans())


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    username = draw(st.none() | utf8_text)
    # MQTT-3.1.2-22: a password requires a user name.
    password = None if username is None else draw(st.none() | st.binary(max_size=40))
    return Connect(
        client_id=draw(client_ids),
        clean_session=draw(st.booleans()),
        keepalive_s=draw(keepalives),
        protocol_level=draw(st.sampled_from([PROTOCOL_31, PROTOCOL_311])),
        will=draw(st.none() | wills),
        username=username,
        password=password,
    )


connacks = st.one_of(
    st.builds(ConnAck, session_present=st.booleans(), return_code=st.just(0)),
    st.builds(ConnAck, session_present=st.just(False), return_code=st.integers(1, 5)),
)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(qos_levels)
    return Publish(
        topic=draw(topic_names),
        payload=draw(payloads),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,  # MQTT-3.3.1-2: DUP 0 for QoS 0
        packet_id=draw(packet_ids) if qos else 0,
    )


acks = st.one_of(
    st.builds(PubAck, packet_ids),
    st.builds(PubRec, packet_ids),
    st.builds(PubRel, packet_ids),
    st.builds(PubComp, packet_ids),
    st.builds(UnsubAck, packet_ids),
)
subscribes = st.builds(
    Subscribe,
    packet_id=packet_ids,
    subscriptions=st.lists(
        st.builds(Subscription, filter=filters, qos=qos_levels), min_size=1, max_size=8
    ).map(tuple),
)
subacks = st.builds(
    SubAck,
    packet_id=packet_ids,
    return_codes=st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=8).map(tuple),
)
unsubscribes = st.builds(
    Unsubscribe,
    packet_id=packet_ids,
    filters=st.lists(filters, min_size=1, max_size=8).map(tuple),
)
empties = st.sampled_from([PingReq(), PingResp(), Disconnect()])

packets = st.one_of(
    connects(), connacks, publishes(), acks, subscribes, subacks, unsubscribes, empties
)


# -- one packet ------------------------------------------------------------------------


@SETTINGS
@given(connects())
def test_connect_roundtrip(packet: Connect) -> None:
    decoder = Decoder()
    assert decoder.feed(packet.encode()) == [packet]
    assert decoder.protocol_level == packet.protocol_level
    assert decoder.buffered == 0


@SETTINGS
@given(connacks)
def test_connack_roundtrip(packet: ConnAck) -> None:
    assert Decoder().feed(packet.encode()) == [packet]


@SETTINGS
@given(publishes())
def test_publish_roundtrip(packet: Publish) -> None:
    assert Decoder().feed(packet.encode()) == [packet]


@SETTINGS
@given(publishes(), st.sampled_from([PROTOCOL_31, PROTOCOL_311]))
def test_publish_roundtrip_after_connect(packet: Publish, level: int) -> None:
    decoder = Decoder()
    connect = Connect("c", protocol_level=level)
    assert decoder.feed(connect.encode() + packet.encode(level)) == [connect, packet]


@SETTINGS
@given(acks)
def test_ack_roundtrip(packet: PubAck) -> None:
    assert Decoder().feed(packet.encode()) == [packet]


@SETTINGS
@given(subscribes)
def test_subscribe_roundtrip(packet: Subscribe) -> None:
    assert Decoder().feed(packet.encode()) == [packet]


@SETTINGS
@given(subacks)
def test_suback_roundtrip(packet: SubAck) -> None:
    assert Decoder().feed(packet.encode()) == [packet]


@SETTINGS
@given(unsubscribes)
def test_unsubscribe_roundtrip(packet: Unsubscribe) -> None:
    assert Decoder().feed(packet.encode()) == [packet]


@SETTINGS
@given(packets)
def test_any_packet_roundtrip(packet: object) -> None:
    decoder = Decoder()
    assert decoder.feed(packet.encode()) == [packet]  # type: ignore[attr-defined]
    assert decoder.buffered == 0


@SETTINGS
@given(packets)
def test_any_packet_byte_by_byte(packet: object) -> None:
    wire = packet.encode()  # type: ignore[attr-defined]
    decoder = Decoder()
    out = []
    for n, b in enumerate(wire, start=1):
        out += decoder.feed(bytes([b]))
        assert decoder.buffered == (0 if n == len(wire) else n)
    assert out == [packet]


# -- several packets, arbitrary chunks -------------------------------------------------


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@STREAM_SETTINGS
@given(st.lists(packets, min_size=1, max_size=10), st.data())
def test_stream_in_random_chunks(stream: list[object], data: st.DataObject) -> None:
    wire = b"".join(p.encode() for p in stream)  # type: ignore[attr-defined]
    decoder = Decoder()
    out = []
    fed = 0
    for chunk in data.draw(chunked(wire)):
        got = decoder.feed(chunk)
        fed += len(chunk)
        out += got
        # what is buffered is exactly the bytes after the last complete packet
        done = sum(len(p.encode()) for p in out)  # type: ignore[attr-defined]
        assert decoder.buffered == fed - done
    assert out == stream
    assert decoder.buffered == 0


@STREAM_SETTINGS
@given(st.lists(packets, min_size=1, max_size=10), st.data())
def test_stream_in_random_bytearray_chunks(stream: list[object], data: st.DataObject) -> None:
    wire = b"".join(p.encode() for p in stream)  # type: ignore[attr-defined]
    decoder = Decoder()
    out = []
    for chunk in data.draw(chunked(wire)):
        buf = bytearray(chunk)
        out += decoder.feed(buf)
        buf[:] = b"\x00" * len(buf)  # the caller reuses its buffer
    assert out == stream


@STREAM_SETTINGS
@given(st.lists(packets, min_size=1, max_size=10))
def test_stream_in_one_feed(stream: list[object]) -> None:
    wire = b"".join(p.encode() for p in stream)  # type: ignore[attr-defined]
    assert Decoder().feed(wire) == stream


# -- encoders ---------------------------------------------------------------------------


@SETTINGS
@given(publishes())
def test_encode_publish_parts_matches_encode(packet: Publish) -> None:
    head, tail = encode_publish_parts(
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup
    )
    pid = packet.packet_id.to_bytes(2, "big") if packet.qos else b""
    assert head + pid + tail == packet.encode()


def _decode_varint(data: bytes) -> int:
    """Reference decoder from the spec's pseudo-code (3.1.1 section 2.2.3)."""
    multiplier, value = 1, 0
    for b in data:
        value += (b & 0x7F) * multiplier
        multiplier *= 128
        if not b & 0x80:
            return value
    raise AssertionError("unterminated")


@SETTINGS
@given(st.integers(0, 268_435_455))
def test_encode_varint_roundtrip(n: int) -> None:
    encoded = encode_varint(n)
    assert 1 <= len(encoded) <= 4
    assert _decode_varint(encoded) == n
    # minimal: 1 byte up to 127, 2 up to 16383, 3 up to 2097151, else 4
    assert len(encoded) == 1 + (n > 127) + (n > 16383) + (n > 2_097_151)
    assert all(b & 0x80 for b in encoded[:-1]) and not encoded[-1] & 0x80


@SETTINGS
@given(st.integers(1, 268_435_455))
def test_decoder_reads_any_remaining_length(n: int) -> None:
    """The decoder's Remaining Length matches encode_varint's, read from the header alone:
    a limit below the size names the size, a limit at the size buffers the header."""
    header = b"\x30" + encode_varint(n)
    size = len(header) + n
    try:
        Decoder(max_packet_size=size - 1).feed(header)
    except PacketTooLarge as exc:
        assert f"packet of {size} bytes" in exc.message
    else:
        raise AssertionError("no PacketTooLarge")
    decoder = Decoder(max_packet_size=size)
    assert decoder.feed(header) == []
    assert decoder.buffered == len(header)


# -- arbitrary bytes ----------------------------------------------------------------------


def _outcome(decoder: Decoder, chunks: list[bytes]) -> tuple[list[object], str | None]:
    """The packets that came out, and the error class that ended the stream (if any)."""
    out: list[object] = []
    for chunk in chunks:
        try:
            out += decoder.feed(chunk)
        except MQTTError as exc:
            return out + exc.packets_before, type(exc).__name__
    return out, None


# Bytes that look like packets: a plausible first byte and length, then anything.
packet_like = st.builds(
    lambda first, body, extra: bytes((first, max(0, min(len(body) + extra, 127)))) + body,
    st.integers(0, 255),
    st.binary(max_size=40),
    st.integers(-3, 3),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(packet_like, packets.map(lambda p: p.encode())), max_size=8), st.data())
def test_arbitrary_bytes_only_raise_mqtt_errors(parts: list[bytes], data: st.DataObject) -> None:
    """Whatever the bytes, the decoder returns packets or raises an MQTTError (never an
    IndexError and the like), and chunking does not change what comes out."""
    wire = b"".join(parts)
    whole = _outcome(Decoder(max_packet_size=4096), [wire])
    chunks = data.draw(chunked(wire))
    assert _outcome(Decoder(max_packet_size=4096), chunks) == whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_mqtt_errors(wire: bytes) -> None:
    out, error = _outcome(Decoder(), [wire])
    byte_by_byte = _outcome(Decoder(), [wire[i:i + 1] for i in range(len(wire))])
    assert byte_by_byte == (out, error)
