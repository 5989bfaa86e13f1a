"""Malformed and forbidden input: the exact error each gets, and what the error carries."""

from __future__ import annotations

import pytest

from mqttd.codec import (
    ClientIdRejected,
    Decoder,
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)
from mqttd.codec.packets import Connect, Disconnect, PingReq, PubAck, Publish, PubRel


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def pkt(first: int, body_hex: str) -> bytes:
    """A packet with a one-byte Remaining Length computed from the body (< 128 bytes)."""
    body = h(body_hex)
    assert len(body) < 128
    return bytes((first, len(body))) + body


MQTT = "0004 4d515454"
MQISDP = "0006 4d5149736470"


def connect(flags: int, payload_hex: str, *, name: str = MQTT, level: int = 4) -> bytes:
    """A CONNECT: protocol name, level, flags, keepalive 60, then ``payload_hex``."""
    return pkt(0x10, f"{name} {level:02x} {flags:02x} 003c {payload_hex}")


MAL, PROTO, TOPIC, VERSION = (
    MalformedPacket, ProtocolError, TopicNameInvalid, UnsupportedProtocolVersion
)

# (id, wire bytes, error class, part of the message)
CASES = [
    # -- fixed header ---------------------------------------------------------------
    ("remaining-length-5-bytes", h("30 ffffffff 01"), MAL, "longer than four bytes"),
    ("remaining-length-5-bytes-zero", h("c0 80808080 00"), MAL, "longer than four"),
    ("remaining-length-4-continued", h("30 ffffffff"), MAL, "longer than four bytes"),
    ("reserved-type-0", h("00 00"), MAL, "reserved packet type"),
    ("reserved-type-0-with-body", h("02 02 0001"), MAL, "reserved packet type"),
    ("reserved-type-15", h("f0 00"), MAL, "reserved packet type"),
    # -- fixed header flags (3.1.1 section 2.2.2) -----------------------------------
    ("connect-flags-1", h("11") + connect(0x02, "0001 63")[1:], MAL, "CONNECT with reserved flags"),
    ("connect-flags-8", h("18") + connect(0x02, "0001 63")[1:], MAL, "CONNECT with reserved flags"),
    ("connack-flags", h("21 02 0000"), MAL, "CONNACK with reserved flags"),
    ("puback-flags-2", h("42 02 0001"), MAL, "PUBACK with reserved flags"),
    ("pubrec-flags-1", h("51 02 0001"), MAL, "PUBREC with reserved flags"),
    ("pubrel-flags-0", h("60 02 0001"), MAL, "PUBREL with reserved flags"),
    ("pubrel-flags-3", h("63 02 0001"), MAL, "PUBREL with reserved flags"),
    ("pubrel-flags-a", h("6a 02 0001"), MAL, "PUBREL with reserved flags"),
    ("pubcomp-flags-2", h("72 02 0001"), MAL, "PUBCOMP with reserved flags"),
    ("subscribe-flags-0", h("80 06 0001 0001 61 00"), MAL, "SUBSCRIBE with reserved flags"),
    ("subscribe-flags-3", h("83 06 0001 0001 61 00"), MAL, "SUBSCRIBE with reserved flags"),
    ("suback-flags-2", h("92 03 0001 00"), MAL, "SUBACK with reserved flags"),
    ("unsubscribe-flags-0", h("a0 05 0001 0001 61"), MAL, "UNSUBSCRIBE with reserved flags"),
    ("unsubscribe-flags-6", h("a6 05 0001 0001 61"), MAL, "UNSUBSCRIBE with reserved flags"),
    ("unsuback-flags-2", h("b2 02 0001"), MAL, "UNSUBACK with reserved flags"),
    ("pingreq-flags-1", h("c1 00"), MAL, "PINGREQ with reserved flags"),
    ("pingresp-flags-8", h("d8 00"), MAL, "PINGRESP with reserved flags"),
    ("disconnect-flags-2", h("e2 00"), MAL, "DISCONNECT with reserved flags"),
    # -- PUBLISH (3.3) --------------------------------------------------------------
    ("publish-qos3", h("36 07 0003 612f62 0001"), MAL, "QoS 3"),
    ("publish-qos3-dup-retain", h("3f 07 0003 612f62 0001"), MAL, "QoS 3"),
    ("publish-dup-qos0", h("38 05 0003 612f62"), MAL, "DUP"),
    ("publish-dup-qos0-retain", h("39 06 0003 612f62 78"), MAL, "DUP"),
    ("publish-topic-plus", h("30 05 0003 612f2b"), TOPIC, "invalid topic name"),
    ("publish-topic-plus-inside", h("30 04 0002 612b"), TOPIC, "invalid topic name"),
    ("publish-topic-hash", h("30 03 0001 23"), TOPIC, "invalid topic name"),
    ("publish-topic-hash-qos1", h("32 07 0003 612f23 0001"), TOPIC, "invalid topic name"),
    ("publish-topic-nul", h("30 05 0003 610062"), TOPIC, "invalid topic name"),
    ("publish-topic-empty", h("30 04 0000 7878"), TOPIC, "invalid topic name"),
    ("publish-topic-bad-utf8", h("30 04 0002 c328"), MAL, "not valid UTF-8"),
    ("publish-topic-overlong-utf8", h("30 04 0002 c0af"), MAL, "not valid UTF-8"),
    ("publish-topic-surrogate", h("30 05 0003 eda080"), MAL, "not valid UTF-8"),
    ("publish-topic-modified-utf8-nul", h("30 05 0003 61c080"), MAL, "not valid UTF-8"),
    ("publish-topic-above-10ffff", h("30 06 0004 f4908080"), MAL, "not valid UTF-8"),
    ("publish-topic-truncated-sequence", h("30 04 0002 61e2"), MAL, "not valid UTF-8"),
    ("publish-topic-lone-ff", h("30 03 0001 ff"), MAL, "not valid UTF-8"),
    ("publish-no-topic-length", h("30 00"), MAL, "inside topic name"),
    ("publish-half-topic-length", h("30 01 00"), MAL, "inside topic name"),
    ("publish-topic-past-end", h("30 03 0005 61"), MAL, "runs past the end"),
    ("publish-qos1-no-packet-id", h("32 05 0003 612f62"), MAL, "inside packet identifier"),
    ("publish-qos2-half-packet-id", h("34 06 0003 612f62 00"), MAL, "inside packet identifier"),
    ("publish-qos1-packet-id-0", h("32 07 0003 612f62 0000"), PROTO, "packet identifier 0"),
    ("publish-qos2-packet-id-0", h("34 08 0003 612f62 0000 78"), PROTO, "packet identifier 0"),
    # -- acknowledgements -----------------------------------------------------------
    ("puback-packet-id-0", h("40 02 0000"), PROTO, "PUBACK with packet identifier 0"),
    ("pubrec-packet-id-0", h("50 02 0000"), PROTO, "PUBREC with packet identifier 0"),
    ("pubrel-packet-id-0", h("62 02 0000"), PROTO, "PUBREL with packet identifier 0"),
    ("pubcomp-packet-id-0", h("70 02 0000"), PROTO, "PUBCOMP with packet identifier 0"),
    ("unsuback-packet-id-0", h("b0 02 0000"), PROTO, "UNSUBACK with packet identifier 0"),
    ("suback-packet-id-0", h("90 03 0000 00"), PROTO, "SUBACK with packet identifier 0"),
    ("puback-length-3", h("40 03 0001 00"), MAL, "remaining length of 2"),
    ("puback-length-1", h("40 01 01"), MAL, "remaining length of 2"),
    ("puback-length-0", h("40 00"), MAL, "remaining length of 2"),
    ("pubrec-length-3", h("50 03 0001 00"), MAL, "remaining length of 2"),
    ("pubrel-length-4", h("62 04 0001 0000"), MAL, "remaining length of 2"),
    ("pubcomp-length-1", h("70 01 01"), MAL, "remaining length of 2"),
    ("unsuback-length-3", h("b0 03 0001 00"), MAL, "remaining length of 2"),
    ("suback-no-packet-id", h("90 01 00"), MAL, "packet identifier"),
    # -- CONNACK --------------------------------------------------------------------
    ("connack-length-3", h("20 03 000000"), MAL, "remaining length of 2"),
    ("connack-length-1", h("20 01 00"), MAL, "remaining length of 2"),
    ("connack-reserved-ack-flags", h("20 02 0200"), MAL, "reserved flags"),
    ("connack-reserved-code", h("20 02 0006"), MAL, "return code 0x06 is reserved"),
    ("connack-present-with-refusal", h("20 02 0103"), MAL, "MQTT-3.2.2-4"),
    ("suback-no-return-codes", h("90 02 0001"), PROTO, "SUBACK without return codes"),
    ("suback-reserved-code-3", h("90 03 0001 03"), MAL, "reserved return code"),
    ("suback-reserved-code-7f", h("90 03 0001 7f"), MAL, "reserved return code"),
    # -- SUBSCRIBE (3.8) ------------------------------------------------------------
    (
        "subscribe-packet-id-0", h("82 06 0000 0001 61 00"),
        PROTO, "SUBSCRIBE with packet identifier 0",
    ),
    ("subscribe-no-filters", h("82 02 0001"), PROTO, "SUBSCRIBE without topic filters"),
    ("subscribe-no-packet-id", h("82 00"), MAL, "packet identifier"),
    ("subscribe-half-packet-id", h("82 01 00"), MAL, "packet identifier"),
    ("subscribe-qos3", h("82 06 0001 0001 61 03"), MAL, "requested QoS 3"),
    ("subscribe-second-qos3", h("82 0a 0001 0001 61 00 0001 62 03"), MAL, "requested QoS 3"),
    ("subscribe-reserved-bit-2", h("82 06 0001 0001 61 04"), MAL, "reserved bits"),
    ("subscribe-reserved-bit-7", h("82 06 0001 0001 61 81"), MAL, "reserved bits"),
    ("subscribe-reserved-bits-5-0", h("82 06 0001 0001 61 fc"), MAL, "reserved bits"),
    ("subscribe-filter-without-qos", h("82 05 0001 0001 61"), MAL, "without requested QoS"),
    (
        "subscribe-second-filter-without-qos", h("82 09 0001 0001 61 00 0001 62"),
        MAL, "without requested QoS",
    ),
    ("subscribe-half-filter-length", h("82 03 0001 00"), MAL, "topic filter"),
    ("subscribe-filter-past-end", h("82 06 0001 0009 6100"), MAL, "runs past the end"),
    (
        "subscribe-filter-bad-utf8", h("82 06 0001 0001 ff 00"),
        MAL, "topic filter is not valid UTF-8",
    ),
    ("subscribe-filter-nul", h("82 07 0001 0002 6100 00"), MAL, "U+0000"),
    # -- UNSUBSCRIBE (3.10) ---------------------------------------------------------
    (
        "unsubscribe-packet-id-0", h("a2 05 0000 0001 61"),
        PROTO, "UNSUBSCRIBE with packet identifier 0",
    ),
    ("unsubscribe-no-filters", h("a2 02 0001"), PROTO, "UNSUBSCRIBE without topic filters"),
    ("unsubscribe-no-packet-id", h("a2 00"), MAL, "packet identifier"),
    ("unsubscribe-filter-past-end", h("a2 05 0001 0002 61"), MAL, "runs past the end"),
    ("unsubscribe-trailing-byte", h("a2 06 0001 0001 61 00"), MAL, "topic filter"),
    (
        "unsubscribe-filter-bad-utf8", h("a2 06 0001 0002 c328"),
        MAL, "topic filter is not valid UTF-8",
    ),
    ("unsubscribe-filter-nul", h("a2 05 0001 0001 00"), MAL, "U+0000"),
    # -- PINGREQ, PINGRESP, DISCONNECT ----------------------------------------------
    ("pingreq-with-body", h("c0 01 00"), MAL, "PINGREQ must have a remaining length of 0"),
    ("pingresp-with-body", h("d0 02 0000"), MAL, "PINGRESP must have a remaining length of 0"),
    ("disconnect-with-body", h("e0 01 00"), MAL, "DISCONNECT must have a remaining length of 0"),
    # -- CONNECT (3.1) --------------------------------------------------------------
    (
        "connect-name-mqtx", connect(0x02, "0001 63", name="0004 4d515458"),
        PROTO, "unknown protocol name",
    ),
    (
        "connect-name-lowercase", connect(0x02, "0001 63", name="0004 6d717474"),
        PROTO, "unknown protocol name",
    ),
    ("connect-name-empty", connect(0x02, "0001 63", name="0000"), PROTO, "unknown protocol name"),
    (
        "connect-name-mqisdp-short", connect(0x02, "0001 63", name="0005 4d51497364", level=3),
        PROTO, "unknown protocol name",
    ),
    ("connect-level-5", connect(0x02, "0001 63", level=5), VERSION, "protocol level 5"),
    ("connect-level-2", connect(0x02, "0001 63", level=2), VERSION, "protocol level 2"),
    ("connect-level-3-named-mqtt", connect(0x02, "0001 63", level=3), VERSION, "protocol level 3"),
    (
        "connect-level-4-named-mqisdp", connect(0x02, "0001 63", name=MQISDP, level=4),
        VERSION, "protocol level 4",
    ),
    ("connect-level-0", connect(0x02, "0001 63", level=0), VERSION, "protocol level 0"),
    ("connect-level-255", connect(0x02, "0001 63", level=255), VERSION, "protocol level 255"),
    ("connect-reserved-flag", connect(0x03, "0001 63"), MAL, "reserved flag"),
    (
        "connect-reserved-flag-mqtt31", connect(0x01, "0001 63", name=MQISDP, level=3),
        MAL, "reserved flag",
    ),
    ("connect-will-qos3", connect(0x1E, "0001 63 0001 74 0000"), MAL, "will QoS 3"),
    ("connect-will-retain-without-will", connect(0x22, "0001 63"), MAL, "without the will flag"),
    ("connect-will-qos1-without-will", connect(0x0A, "0001 63"), MAL, "without the will flag"),
    ("connect-will-qos2-without-will", connect(0x12, "0001 63"), MAL, "without the will flag"),
    (
        "connect-password-without-username", connect(0x42, "0001 63 0002 7077"),
        MAL, "password flag set without the user name flag",
    ),
    ("connect-trailing-byte", connect(0x02, "0001 63 00"), MAL, "1 unexpected bytes"),
    (
        "connect-trailing-bytes-after-password", connect(0xC2, "0001 63 0001 75 0001 70 abcd"),
        MAL, "2 unexpected bytes",
    ),
    ("connect-username-not-flagged", connect(0x02, "0001 63 0001 75"), MAL, "unexpected bytes"),
    ("connect-empty-body", h("10 00"), MAL, "protocol name"),
    (
        "connect-protocol-name-past-end", h("10 04 0004 4d51"),
        MAL, "protocol name length 4 runs past the end",
    ),
    ("connect-no-level", h("10 06") + h(MQTT), MAL, "variable header"),
    ("connect-no-keepalive", h("10 09") + h(MQTT) + h("04 02 00"), MAL, "variable header"),
    ("connect-no-client-id", connect(0x02, ""), MAL, "client identifier"),
    (
        "connect-client-id-past-end", connect(0x02, "0005 616263"),
        MAL, "client identifier length 5 runs past the end",
    ),
    (
        "connect-client-id-bad-utf8", connect(0x02, "0002 c328"),
        MAL, "client identifier is not valid UTF-8",
    ),
    ("connect-client-id-nul", connect(0x02, "0002 6300"), MAL, "client identifier contains U+0000"),
    ("connect-no-will-topic", connect(0x06, "0001 63"), MAL, "will topic"),
    (
        "connect-will-topic-past-end", connect(0x06, "0001 63 0009 74"),
        MAL, "will topic length 9 runs past the end",
    ),
    (
        "connect-will-topic-bad-utf8", connect(0x06, "0001 63 0001 ff 0000"),
        MAL, "will topic is not valid UTF-8",
    ),
    ("connect-no-will-message", connect(0x06, "0001 63 0001 74"), MAL, "will message"),
    (
        "connect-will-message-past-end", connect(0x06, "0001 63 0001 74 0003 78"),
        MAL, "will message length 3 runs past the end",
    ),
    (
        "connect-will-topic-wildcard", connect(0x06, "0001 63 0003 612f23 0000"),
        MAL, "invalid will topic",
    ),
    ("connect-will-topic-plus", connect(0x06, "0001 63 0001 2b 0000"), MAL, "invalid will topic"),
    ("connect-will-topic-empty", connect(0x06, "0001 63 0000 0000"), MAL, "invalid will topic"),
    ("connect-no-username", connect(0x82, "0001 63"), MAL, "user name"),
    (
        "connect-username-past-end", connect(0x82, "0001 63 0004 7573"),
        MAL, "user name length 4 runs past the end",
    ),
    (
        "connect-username-bad-utf8", connect(0x82, "0001 63 0001 80"),
        MAL, "user name is not valid UTF-8",
    ),
    ("connect-no-password", connect(0xC2, "0001 63 0001 75"), MAL, "password"),
    (
        "connect-password-past-end", connect(0xC2, "0001 63 0001 75 0003 7077"),
        MAL, "password length 3 runs past the end",
    ),
]

PARAMS = [pytest.param(wire, cls, text, id=name) for name, wire, cls, text in CASES]

ERROR_CLASSES = (
    MalformedPacket, ProtocolError, PacketTooLarge, TopicNameInvalid, UnsupportedProtocolVersion
)


def test_case_ids_are_unique() -> None:
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


def raises_exactly(cls: type[MQTTError], wire: bytes, decoder: Decoder | None = None) -> MQTTError:
    decoder = decoder or Decoder()
    with pytest.raises(MQTTError) as info:
        decoder.feed(wire)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


@pytest.mark.parametrize(("wire", "cls", "text"), PARAMS)
def test_malformed_whole(wire: bytes, cls: type[MQTTError], text: str) -> None:
    decoder = Decoder()
    exc = raises_exactly(cls, wire, decoder)
    assert text in exc.message
    assert exc.packets_before == []
    assert decoder.buffered == 0


@pytest.mark.parametrize(("wire", "cls", "text"), PARAMS)
def test_malformed_byte_by_byte(wire: bytes, cls: type[MQTTError], text: str) -> None:
    """Fed a byte at a time, nothing comes out until the error, which comes by the last byte
    (sooner when the header alone shows it, as for a five-byte Remaining Length)."""
    decoder = Decoder()
    for n in range(len(wire)):
        try:
            assert decoder.feed(wire[n:n + 1]) == []
        except MQTTError as exc:
            assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
            assert text in exc.message
            assert exc.packets_before == []
            return
    raise AssertionError(f"no error after all {len(wire)} bytes; buffered {decoder.buffered}")


@pytest.mark.parametrize(("wire", "cls", "text"), PARAMS)
def test_malformed_after_good_packets(wire: bytes, cls: type[MQTTError], text: str) -> None:
    """The good packets before a bad one in the same feed ride on the error."""
    good = [PingReq(), Publish("a/b", b"x", qos=1, packet_id=3), PubRel(7)]
    prefix = b"".join(p.encode() for p in good)
    exc = raises_exactly(cls, prefix + wire + h("c0 00"))
    assert text in exc.message
    assert exc.packets_before == good


@pytest.mark.parametrize(("wire", "cls", "text"), PARAMS)
def test_reason_code_follows_class(wire: bytes, cls: type[MQTTError], text: str) -> None:
    exc = raises_exactly(cls, wire)
    assert isinstance(exc, ERROR_CLASSES)
    assert exc.reason_code == {
        MalformedPacket: 0x81,
        ProtocolError: 0x82,
        PacketTooLarge: 0x95,
        TopicNameInvalid: 0x90,
        UnsupportedProtocolVersion: 0x84,
    }[cls]
    assert exc.connack_code == (1 if cls is UnsupportedProtocolVersion else None)


# -- whole-stream behaviour -----------------------------------------------------------


def test_five_byte_remaining_length_rejected_before_the_fifth_byte_arrives() -> None:
    decoder = Decoder()
    assert decoder.feed(h("30 ff ff ff")) == []
    with pytest.raises(MalformedPacket, match="longer than four bytes"):
        decoder.feed(h("ff"))


def test_incomplete_remaining_length_waits() -> None:
    decoder = Decoder()
    assert decoder.feed(h("30 80 80 80")) == []
    assert decoder.buffered == 4


def test_packets_before_holds_only_this_feeds_packets() -> None:
    decoder = Decoder()
    assert decoder.feed(h("c0 00 40 02 00")) == [PingReq()]
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(h("01 e0 00 f0 00 c0 00"))
    # the PUBACK completed by this feed and the DISCONNECT came before the bad packet
    assert info.value.packets_before == [PubAck(1), Disconnect()]


def test_packets_before_with_bad_header_after_good_packets() -> None:
    with pytest.raises(MalformedPacket) as info:
        Decoder().feed(h("c0 00 e0 00 30 ff ff ff ff"))
    assert info.value.packets_before == [PingReq(), Disconnect()]


def test_packets_before_with_too_large_packet() -> None:
    decoder = Decoder(max_packet_size=64)
    with pytest.raises(PacketTooLarge) as info:
        decoder.feed(h("c0 00 30 80 01"))
    assert info.value.packets_before == [PingReq()]


def test_packets_before_with_unsupported_version() -> None:
    wire = h("c0 00") + connect(0x02, "0001 63", level=5)
    with pytest.raises(UnsupportedProtocolVersion) as info:
        Decoder().feed(wire)
    assert info.value.packets_before == [PingReq()]
    assert info.value.connack_code == 1


def test_error_clears_buffer() -> None:
    decoder = Decoder()
    decoder.feed(h("c0"))
    with pytest.raises(MalformedPacket):
        decoder.feed(h("01 00 32 05"))
    assert decoder.buffered == 0


def test_unsupported_version_leaves_protocol_level_unset() -> None:
    decoder = Decoder()
    with pytest.raises(UnsupportedProtocolVersion):
        decoder.feed(connect(0x02, "0001 63", level=5))
    assert decoder.protocol_level == 0


def test_good_connect_variants_still_decode() -> None:
    """Controls for the CONNECT table: the same builder with valid values decodes."""
    assert Decoder().feed(connect(0x02, "0001 63")) == [Connect("c")]
    assert Decoder().feed(connect(0x02, "0001 63", name=MQISDP, level=3)) == [
        Connect("c", protocol_level=3)
    ]
    assert Decoder().feed(connect(0xC2, "0001 63 0001 75 0001 70")) == [
        Connect("c", username="u", password=b"p")
    ]


# -- packet size limit ------------------------------------------------------------------


def test_too_large_rejected_from_fixed_header_alone() -> None:
    decoder = Decoder(max_packet_size=1024)
    # remaining length 268435455: only the five header bytes are fed, no body
    with pytest.raises(PacketTooLarge, match="exceeds the maximum of 1024") as info:
        decoder.feed(h("30 ffffff7f"))
    assert info.value.reason_code == 0x95
    assert info.value.connack_code is None
    assert decoder.buffered == 0


def test_too_large_rejected_as_header_arrives_byte_by_byte() -> None:
    decoder = Decoder(max_packet_size=1024)
    assert decoder.feed(h("30")) == []
    assert decoder.feed(h("ff")) == []
    assert decoder.feed(h("ff")) == []
    with pytest.raises(PacketTooLarge):
        decoder.feed(h("7f"))  # remaining length 2097151 is now known


@pytest.mark.parametrize("first", [0x10, 0x30, 0x82, 0x40, 0xC0])
def test_too_large_checked_before_the_packet_type(first: int) -> None:
    with pytest.raises(PacketTooLarge):
        Decoder(max_packet_size=100).feed(bytes((first,)) + h("ffff7f"))


def test_size_limit_counts_the_fixed_header() -> None:
    # remaining length 1021 + 3 header bytes = 1024: allowed
    body = h("0001 74") + b"x" * 1018
    wire = h("30 fd07") + body
    assert len(wire) == 1024
    assert Decoder(max_packet_size=1024).feed(wire) == [Publish("t", b"x" * 1018)]
    # one more byte of payload: 1025 bytes, rejected from the header
    with pytest.raises(PacketTooLarge, match="packet of 1025 bytes"):
        Decoder(max_packet_size=1024).feed(h("30 fe07"))


def test_size_limit_with_small_packets_unaffected() -> None:
    decoder = Decoder(max_packet_size=4)
    assert decoder.feed(h("c0 00 40 02 0001")) == [PingReq(), PubAck(1)]
    with pytest.raises(PacketTooLarge):
        decoder.feed(h("62 03"))


# -- error values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "reason_code", "connack_code"),
    [
        (MalformedPacket, 0x81, None),
        (ProtocolError, 0x82, None),
        (PacketTooLarge, 0x95, None),
        (TopicNameInvalid, 0x90, None),
        (UnsupportedProtocolVersion, 0x84, 1),
        (ClientIdRejected, 0x85, 2),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_error_codes(cls: type[MQTTError], reason_code: int, connack_code: int | None) -> None:
    exc = cls("boom")
    assert isinstance(exc, MQTTError)
    assert exc.reason_code == reason_code
    assert exc.connack_code == connack_code
    assert exc.message == "boom"
    assert exc.packets_before == []


def test_error_codes_can_be_overridden() -> None:
    exc = ProtocolError("x", reason_code=0x87, connack_code=5)
    assert (exc.reason_code, exc.connack_code) == (0x87, 5)
    # the class defaults are untouched
    assert (ProtocolError.reason_code, ProtocolError.connack_code) == (0x82, None)
