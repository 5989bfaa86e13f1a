"""Every MQTT 3.1/3.1.1 packet against hand-written bytes from the spec, decoded three ways.

Each case is (packet value, expected wire bytes). The bytes were written out by hand from
the MQTT 3.1.1 spec (sections 2 and 3) and the 3.1 spec for "MQIsdp", not produced by the
encoder. Every case is checked:

* encoded: ``packet.encode()`` equals the bytes;
* whole: one ``feed`` of the bytes gives ``[packet]`` and leaves nothing buffered;
* byte by byte: ``feed(bytes([b]))`` per byte gives nothing until the last byte, the
  buffered count grows by one each time, and the last byte gives ``[packet]``;
* with trailing bytes: the bytes followed by the first ``k`` bytes of another packet give
  ``[packet]`` with ``k`` bytes buffered, and the rest completes the second packet.
"""

from __future__ import annotations

import itertools

import attrs
import pytest

from mqttd.codec import Decoder, PacketTooLarge, encode_publish_parts
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


def h(text: str) -> bytes:
    """Hex with spaces between fields, for readable expected bytes."""
    return bytes.fromhex(text)


# The protocol names as they appear on the wire (length prefix included).
MQTT = "0004 4d515454"  # "MQTT"
MQISDP = "0006 4d5149736470"  # "MQIsdp"

CASES: list[tuple[str, object, bytes]] = [
    # -- CONNECT (3.1.1 section 3.1) ----------------------------------------------
    (
        "connect-minimal",
        Connect("abc", clean_session=True, keepalive_s=60),
        # type 1, remaining 15 | name | level 4 | flags: clean | keepalive 60 | client id
        h("10 0f" + MQTT + "04 02 003c 0003 616263"),
    ),
    (
        "connect-no-clean-keepalive-0",
        Connect("abc", clean_session=False, keepalive_s=0),
        h("10 0f" + MQTT + "04 00 0000 0003 616263"),
    ),
    (
        "connect-empty-client-id",
        Connect("", clean_session=True, keepalive_s=60),
        h("10 0c" + MQTT + "04 02 003c 0000"),
    ),
    (
        "connect-keepalive-max",
        Connect("c", keepalive_s=65535),
        h("10 0d" + MQTT + "04 02 ffff 0001 63"),
    ),
    (
        "connect-utf8-client-id",
        Connect("é", keepalive_s=60),
        h("10 0e" + MQTT + "04 02 003c 0002 c3a9"),
    ),
    (
        "connect-will-qos1-retain-username-password",
        Connect(
            "c1",
            clean_session=False,
            keepalive_s=10,
            will=Will("w/t", b"bye", qos=1, retain=True),
            username="u",
            password=b"pw",
        ),
        # flags: username 0x80 | password 0x40 | will retain 0x20 | will QoS 1 0x08 | will 0x04
        h(
            "10 1f" + MQTT + "04 ec 000a"
            " 0002 6331"  # client id "c1"
            " 0003 772f74"  # will topic "w/t"
            " 0003 627965"  # will message "bye"
            " 0001 75"  # user name "u"
            " 0002 7077"  # password "pw"
        ),
    ),
    (
        "connect-will-qos0",
        Connect("c", will=Will("t", b"")),
        # flags: will 0x04 | clean 0x02
        h("10 12" + MQTT + "04 06 003c 0001 63 0001 74 0000"),
    ),
    (
        "connect-will-qos2-binary-message",
        Connect("c", will=Will("t", b"\x00\xff", qos=2)),
        # flags: will QoS 2 0x10 | will 0x04 | clean 0x02
        h("10 14" + MQTT + "04 16 003c 0001 63 0001 74 0002 00ff"),
    ),
    (
        "connect-username-only",
        Connect("c", username="user"),
        h("10 13" + MQTT + "04 82 003c 0001 63 0004 75736572"),
    ),
    (
        "connect-username-and-empty-password",
        Connect("c", username="", password=b""),
        h("10 11" + MQTT + "04 c2 003c 0001 63 0000 0000"),
    ),
    (
        "connect-mqtt31-mqisdp",
        Connect("abc", keepalive_s=60, protocol_level=PROTOCOL_31),
        h("10 11" + MQISDP + "03 02 003c 0003 616263"),
    ),
    (
        "connect-mqtt31-will-username-password",
        Connect(
            "abc",
            clean_session=False,
            keepalive_s=30,
            protocol_level=PROTOCOL_31,
            will=Will("a", b"x", qos=2, retain=True),
            username="u",
            password=b"p",
        ),
        # flags: 0x80 | 0x40 | 0x20 | QoS 2 0x10 | 0x04 = 0xf4
        h("10 1d" + MQISDP + "03 f4 001e 0003 616263 0001 61 0001 78 0001 75 0001 70"),
    ),
    # -- CONNACK (3.2) ------------------------------------------------------------
    ("connack-accepted", ConnAck(), h("20 02 00 00")),
    ("connack-session-present", ConnAck(session_present=True), h("20 02 01 00")),
    ("connack-unacceptable-version", ConnAck(return_code=1), h("20 02 00 01")),
    ("connack-not-authorized", ConnAck(return_code=5), h("20 02 00 05")),
    # -- PUBLISH (3.3) ------------------------------------------------------------
    ("publish-qos0", Publish("a/b", b"hello"), h("30 0a 0003 612f62 68656c6c6f")),
    ("publish-qos0-empty-payload", Publish("a/b", b""), h("30 05 0003 612f62")),
    (
        "publish-qos0-retain",
        Publish("a/b", b"hello", retain=True),
        h("31 0a 0003 612f62 68656c6c6f"),
    ),
    (
        "publish-qos1",
        Publish("a/b", b"hello", qos=1, packet_id=10),
        h("32 0c 0003 612f62 000a 68656c6c6f"),
    ),
    (
        "publish-qos1-retain",
        Publish("a/b", b"hello", qos=1, retain=True, packet_id=10),
        h("33 0c 0003 612f62 000a 68656c6c6f"),
    ),
    (
        "publish-qos1-dup",
        Publish("a/b", b"hello", qos=1, dup=True, packet_id=1),
        h("3a 0c 0003 612f62 0001 68656c6c6f"),
    ),
    (
        "publish-qos2",
        Publish("a/b", b"hello", qos=2, packet_id=0x1234),
        h("34 0c 0003 612f62 1234 68656c6c6f"),
    ),
    (
        "publish-qos2-dup-retain",
        Publish("a/b", b"hello", qos=2, retain=True, dup=True, packet_id=65535),
        h("3d 0c 0003 612f62 ffff 68656c6c6f"),
    ),
    (
        "publish-qos2-empty-payload",
        Publish("t", b"", qos=2, packet_id=7),
        h("34 05 0001 74 0007"),
    ),
    (
        "publish-utf8-topic-binary-payload",
        Publish("ü/€", b"\x00\x01\xff"),
        h("30 0b 0006 c3bc 2f e282ac 0001ff"),
    ),
    (
        # MQTT-1.5.3-3: a BOM is U+FEFF, neither skipped nor stripped
        "publish-topic-with-bom",
        Publish("\ufeffa", b""),
        h("30 06 0004 efbbbf 61"),
    ),
    (
        # 4-byte UTF-8 (outside the BMP) and a non-character are valid in a topic
        "publish-topic-astral-and-noncharacter",
        Publish("\U0001f600/\uffff", b""),
        h("30 0a 0008 f09f9880 2f efbfbf"),
    ),
    (
        "publish-topic-with-spaces-and-slashes",
        Publish("/ a//b /", b"x"),
        h("30 0b 0008 2f20612f2f62202f 78"),
    ),
    # -- acknowledgements (3.4 - 3.7) ----------------------------------------------
    ("puback", PubAck(10), h("40 02 000a")),
    ("puback-max-id", PubAck(65535), h("40 02 ffff")),
    ("pubrec", PubRec(0x0102), h("50 02 0102")),
    ("pubrel", PubRel(0x0102), h("62 02 0102")),
    ("pubcomp", PubComp(1), h("70 02 0001")),
    # -- SUBSCRIBE / SUBACK (3.8, 3.9) ---------------------------------------------
    (
        "subscribe-one-filter",
        Subscribe(1, (Subscription("a/b", 1),)),
        h("82 08 0001 0003 612f62 01"),
    ),
    (
        "subscribe-several-filters",
        Subscribe(
            0x0a0b,
            (Subscription("a/+", 0), Subscription("b/#", 1), Subscription("c", 2)),
        ),
        h("82 12 0a0b 0003 612f2b 00 0003 622f23 01 0001 63 02"),
    ),
    (
        "subscribe-wildcards-and-system-topic",
        Subscribe(2, (Subscription("#", 0), Subscription("+/+", 2), Subscription("$SYS/#", 1))),
        h("82 15 0002 0001 23 00 0003 2b2f2b 02 0006 24535953 2f23 01"),
    ),
    ("suback-one", SubAck(1, (1,)), h("90 03 0001 01")),
    ("suback-with-failure", SubAck(0x0a0b, (0, 1, 0x80, 2)), h("90 06 0a0b 00 01 80 02")),
    ("suback-all-failures", SubAck(9, (0x80, 0x80)), h("90 04 0009 80 80")),
    # -- UNSUBSCRIBE / UNSUBACK (3.10, 3.11) ---------------------------------------
    ("unsubscribe-one", Unsubscribe(2, ("a/b",)), h("a2 07 0002 0003 612f62")),
    (
        "unsubscribe-several",
        Unsubscribe(0x0203, ("a/+", "b", "#")),
        h("a2 0d 0203 0003 612f2b 0001 62 0001 23"),
    ),
    ("unsuback", UnsubAck(0x0203), h("b0 02 0203")),
    # -- PINGREQ, PINGRESP, DISCONNECT (3.12 - 3.14) -------------------------------
    ("pingreq", PingReq(), h("c0 00")),
    ("pingresp", PingResp(), h("d0 00")),
    ("disconnect", Disconnect(), h("e0 00")),
]

PARAMS = [pytest.param(packet, wire, id=name) for name, packet, wire in CASES]

# The packet that follows in the trailing-bytes test: long enough to split in many places.
NEXT = Publish("x/y", b"next", qos=1, packet_id=0x4242)
NEXT_WIRE = h("32 0b 0003 782f79 4242 6e657874")


def test_next_packet_bytes() -> None:
    assert NEXT.encode() == NEXT_WIRE
    assert Decoder().feed(NEXT_WIRE) == [NEXT]


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_encode(packet: object, wire: bytes) -> None:
    assert packet.encode() == wire  # type: ignore[attr-defined]


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_decode_whole(packet: object, wire: bytes) -> None:
    decoder = Decoder()
    assert decoder.feed(wire) == [packet]
    assert decoder.buffered == 0


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_decode_whole_from_bytearray(packet: object, wire: bytes) -> None:
    decoder = Decoder()
    assert decoder.feed(bytearray(wire)) == [packet]
    assert decoder.buffered == 0


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_decode_byte_by_byte(packet: object, wire: bytes) -> None:
    decoder = Decoder()
    out = []
    for n, b in enumerate(wire[:-1], start=1):
        got = decoder.feed(bytes([b]))
        assert got == [], f"a packet came out after {n} of {len(wire)} bytes"
        assert decoder.buffered == n
        out += got
    out += decoder.feed(wire[-1:])
    assert out == [packet]
    assert decoder.buffered == 0


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_decode_with_trailing_bytes(packet: object, wire: bytes) -> None:
    for k in range(1, len(NEXT_WIRE)):
        decoder = Decoder()
        assert decoder.feed(wire + NEXT_WIRE[:k]) == [packet], f"k={k}"
        assert decoder.buffered == k
        assert decoder.feed(NEXT_WIRE[k:]) == [NEXT], f"k={k}"
        assert decoder.buffered == 0


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_decode_with_trailing_bytes_from_reused_bytearray(packet: object, wire: bytes) -> None:
    """The caller may reuse its read buffer: what the decoder keeps must be a copy."""
    decoder = Decoder()
    chunk = bytearray(wire + NEXT_WIRE[:3])
    assert decoder.feed(chunk) == [packet]
    chunk[:] = b"\xff" * len(chunk)
    assert decoder.buffered == 3
    assert decoder.feed(NEXT_WIRE[3:]) == [NEXT]


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_decode_after_packet_in_previous_feed(packet: object, wire: bytes) -> None:
    """A packet split across feeds right after a complete one."""
    decoder = Decoder()
    half = len(wire) // 2
    assert decoder.feed(NEXT_WIRE + wire[:half]) == [NEXT]
    assert decoder.buffered == half
    assert decoder.feed(wire[half:]) == [packet]
    assert decoder.buffered == 0


@pytest.mark.parametrize(("packet", "wire"), PARAMS)
def test_decode_split_then_trailing_bytes(packet: object, wire: bytes) -> None:
    """The start of a packet is buffered; the next feed completes it and starts another."""
    for k in (1, len(wire) - 1):
        for j in (1, 2, len(NEXT_WIRE) - 1):
            decoder = Decoder()
            assert decoder.feed(wire[:k]) == []
            assert decoder.buffered == k
            assert decoder.feed(wire[k:] + NEXT_WIRE[:j]) == [packet], f"k={k} j={j}"
            assert decoder.buffered == j
            assert decoder.feed(NEXT_WIRE[j:]) == [NEXT], f"k={k} j={j}"
            assert decoder.buffered == 0


def test_cases_cover_every_packet_type() -> None:
    types = {type(packet).TYPE for _, packet, _ in CASES}  # type: ignore[attr-defined]
    assert types == set(range(1, 15))


def test_several_packets_in_one_feed_come_out_in_order() -> None:
    packets = [packet for _, packet, _ in CASES]
    wire = b"".join(w for _, _, w in CASES)
    decoder = Decoder()
    assert decoder.feed(wire) == packets
    assert decoder.buffered == 0


def test_several_packets_fed_byte_by_byte_come_out_in_order() -> None:
    packets = [packet for _, packet, _ in CASES]
    wire = b"".join(w for _, _, w in CASES)
    decoder = Decoder()
    out = []
    for b in wire:
        out += decoder.feed(bytes([b]))
    assert out == packets
    assert decoder.buffered == 0


def test_several_packets_in_one_feed_with_a_partial_one() -> None:
    decoder = Decoder()
    wire = h("c0 00") + h("40 02 000a") + h("e0 00") + NEXT_WIRE[:5]
    assert decoder.feed(wire) == [PingReq(), PubAck(10), Disconnect()]
    assert decoder.buffered == 5
    assert decoder.feed(NEXT_WIRE[5:] + h("d0 00")) == [NEXT, PingResp()]
    assert decoder.buffered == 0


def test_empty_feed() -> None:
    decoder = Decoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0
    decoder.feed(b"\x30")
    assert decoder.feed(b"") == []
    assert decoder.buffered == 1


# -- protocol level ----------------------------------------------------------------


def test_protocol_level_learned_from_connect() -> None:
    decoder = Decoder()
    assert decoder.protocol_level == 0
    decoder.feed(Connect("a").encode())
    assert decoder.protocol_level == PROTOCOL_311

    decoder = Decoder()
    decoder.feed(Connect("a", protocol_level=PROTOCOL_31).encode())
    assert decoder.protocol_level == PROTOCOL_31


def test_protocol_name_follows_level() -> None:
    assert Connect("a").protocol_name == "MQTT"
    assert Connect("a", protocol_level=PROTOCOL_31).protocol_name == "MQIsdp"


def test_server_packets_decode_without_connect() -> None:
    decoder = Decoder()
    wire = h("20 02 01 00") + h("90 03 0001 80") + h("b0 02 0001") + h("d0 00")
    assert decoder.feed(wire) == [ConnAck(True, 0), SubAck(1, (0x80,)), UnsubAck(1), PingResp()]
    assert decoder.protocol_level == 0


def test_connack_session_present_not_sent_to_mqtt31() -> None:
    """3.1 has no Session Present flag: the byte is 0 (3.1 CONNACK's first byte is reserved)."""
    assert ConnAck(session_present=True).encode(PROTOCOL_31) == h("20 02 00 00")
    assert ConnAck(session_present=True).encode(PROTOCOL_311) == h("20 02 01 00")
    assert ConnAck(return_code=2).encode(PROTOCOL_31) == h("20 02 00 02")


# -- Remaining Length ----------------------------------------------------------------

# (value, encoding) at every boundary of the 1-4 byte encoding (3.1.1 table 2.4)
VARINTS = [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "8001"),
    (321, "c102"),
    (16383, "ff7f"),
    (16384, "808001"),
    (2097151, "ffff7f"),
    (2097152, "80808001"),
    (268435455, "ffffff7f"),
]


@pytest.mark.parametrize(("value", "encoding"), VARINTS, ids=[str(v) for v, _ in VARINTS])
def test_encode_varint(value: int, encoding: str) -> None:
    assert encode_varint(value) == h(encoding)


@pytest.mark.parametrize(("value", "encoding"), VARINTS, ids=[str(v) for v, _ in VARINTS])
def test_decoder_reads_remaining_length_from_header(value: int, encoding: str) -> None:
    """The decoder's reading of the Remaining Length, without any body: a limit one byte
    below the packet's size rejects it and names its size; a limit equal to the size
    accepts the header and waits for the body."""
    header = h("30" + encoding)
    size = len(header) + value
    with pytest.raises(PacketTooLarge, match=f"packet of {size} bytes"):
        Decoder(max_packet_size=size - 1).feed(header)
    if value:
        decoder = Decoder(max_packet_size=size)
        assert decoder.feed(header) == []
        assert decoder.buffered == len(header)


def test_largest_remaining_length_header_is_buffered() -> None:
    decoder = Decoder()
    assert decoder.feed(h("30 ffffff7f")) == []
    assert decoder.buffered == 5


def test_zero_remaining_length_packets() -> None:
    assert Decoder().feed(h("c0 00 d0 00 e0 00")) == [PingReq(), PingResp(), Disconnect()]


PUBLISH_LENGTHS = [127, 128, 16383, 16384, 2097151, 2097152]


@pytest.mark.parametrize("remaining", PUBLISH_LENGTHS)
def test_publish_across_remaining_length_boundaries(remaining: int) -> None:
    topic = "t"
    payload = bytes(range(256)) * (remaining // 256 + 1)
    payload = payload[: remaining - 2 - len(topic)]
    packet = Publish(topic, payload)
    wire = packet.encode()
    varint = encode_varint(remaining)
    assert wire[:1] == b"\x30"
    assert wire[1:1 + len(varint)] == varint
    assert wire[1 + len(varint):1 + len(varint) + 3] == h("0001 74")
    assert len(wire) == 1 + len(varint) + remaining

    assert Decoder().feed(wire) == [packet]

    # header byte by byte, then the body in a few uneven chunks, then a trailing packet
    decoder = Decoder()
    head = 1 + len(varint)
    for n in range(head):
        assert decoder.feed(wire[n:n + 1]) == []
    cuts = sorted({head, head + 1, head + 3, len(wire) // 3, len(wire) - 1, len(wire)})
    out = []
    for a, b in itertools.pairwise(cuts):
        out += decoder.feed(wire[a:b])
        if b < len(wire):
            assert decoder.buffered == b
    assert out == [packet]
    assert decoder.buffered == 0

    decoder = Decoder()
    assert decoder.feed(wire + h("c0")) == [packet]
    assert decoder.buffered == 1
    assert decoder.feed(h("00")) == [PingReq()]


def test_publish_qos1_across_remaining_length_boundary() -> None:
    # 2 (topic length) + 1 (topic) + 2 (packet id) + 123 = 128
    packet = Publish("t", b"p" * 123, qos=1, packet_id=5)
    wire = packet.encode()
    assert wire[:8] == h("32 8001 0001 74 0005")
    assert Decoder().feed(wire) == [packet]
    packet = Publish("t", b"p" * 122, qos=1, packet_id=5)
    assert packet.encode()[:2] == h("32 7f")


# -- encode_publish_parts -------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        Publish("a/b", b"hello"),
        Publish("a/b", b"", retain=True),
        Publish("a/b", b"hello", qos=1, packet_id=10),
        Publish("a/b", b"hello", qos=1, retain=True, dup=True, packet_id=1),
        Publish("ü/€", b"\x00" * 200, qos=2, packet_id=65535),
        Publish("t", b"x" * 20000, qos=2, retain=True, packet_id=300),
    ],
    ids=["qos0", "qos0-retain-empty", "qos1", "qos1-dup-retain", "qos2-utf8-200", "qos2-20000"],
)
def test_encode_publish_parts(packet: Publish) -> None:
    head, tail = encode_publish_parts(
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup
    )
    pid = packet.packet_id.to_bytes(2, "big") if packet.qos else b""
    assert head + pid + tail == packet.encode()
    assert tail == packet.payload


def test_encode_publish_parts_shared_by_several_packet_ids() -> None:
    head, tail = encode_publish_parts("a/b", b"hello", 1, False)
    assert head == h("32 0c 0003 612f62")
    assert tail == b"hello"
    for pid in (1, 2, 0x1234, 65535):
        wire = head + pid.to_bytes(2, "big") + tail
        assert wire == Publish("a/b", b"hello", qos=1, packet_id=pid).encode()
        assert Decoder().feed(wire) == [Publish("a/b", b"hello", qos=1, packet_id=pid)]


def test_encode_publish_parts_dup_defaults_to_false() -> None:
    head, _ = encode_publish_parts("a", b"", 2, True)
    assert head[0] == 0x35
    head, _ = encode_publish_parts("a", b"", 2, True, True)
    assert head[0] == 0x3D


def test_bridge_flag_on_the_protocol_level_is_kept_and_decoded_at_the_plain_level() -> None:
    """mosquitto's try_private: a bridge sends level 0x84 (3.1.1 | 0x80). The Connect keeps
    the level as sent; the stream after it is decoded as 3.1.1."""
    from mqttd.codec import Decoder
    from mqttd.codec.packets import Connect, PingReq

    data = bytearray(Connect("bridge-1", keepalive_s=30).encode())
    data[data.index(b"\x00\x04MQTT") + 6] |= 0x80
    decoder = Decoder()
    connect, ping = decoder.feed(bytes(data) + PingReq().encode())
    assert isinstance(connect, Connect) and connect.protocol_level == 0x84
    assert connect.client_id == "bridge-1" and isinstance(ping, PingReq)
    assert decoder.protocol_level == 4


def test_decoded_publish_is_a_frozen_publish() -> None:
    """The decoder builds a Publish through a twin class of the same slots (see
    packets._WirePublish): what comes out is a Publish in every way, frozen like one."""
    sent = Publish("a/b", b"payload", 1, True, True, 7)
    (got,) = Decoder(protocol_level=4).feed(sent.encode())
    assert type(got) is Publish
    assert got == sent and hash(got) == hash(sent)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        got.topic = "c"  # type: ignore[misc]
    (qos0,) = Decoder(protocol_level=4).feed(Publish("t", b"").encode())
    assert qos0 == Publish("t", b"") and type(qos0) is Publish
