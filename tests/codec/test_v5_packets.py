"""Every MQTT 5.0 packet against hand-written bytes, decoded three ways.

The bytes were written out by hand from the MQTT 5.0 specification (section 3), not produced
by the encoder. Each case is checked encoded, decoded whole, byte by byte, and followed by the
first bytes of the next packet (as in test_packets.py for 3.1.1). Decoded 5.0 packets carry
``properties={}`` where the value has ``None`` (see ``v5``).
"""

from __future__ import annotations

import pytest

from mqttd.codec import (
    Decoder,
    MalformedPacket,
    UnsupportedProtocolVersion,
    encode_properties,
    encode_publish_parts_v5,
    kinds,
)
from mqttd.codec import reason as rc
from mqttd.codec.kinds import (
    AUTH,
    CONNACK,
    DISCONNECT,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    UNSUBACK,
)
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_311,
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
from tests.codec.v5util import decode5, decoder5, h, v5

MQTT = "0004 4d515454"

CASES: list[tuple[str, object, bytes]] = [
    # -- CONNECT (5.0 section 3.1) ---------------------------------------------------
    (
        "connect-minimal",
        Connect("abc", protocol_level=5),
        # name | level 5 | flags: clean start | keep alive 60 | no properties | client id
        h("10 10" + MQTT + "05 02 003c 00 0003 616263"),
    ),
    (
        "connect-properties",
        Connect("c", keepalive_s=10, protocol_level=5, properties={
            "session_expiry_interval": 3600, "receive_maximum": 20,
            "maximum_packet_size": 65536, "topic_alias_maximum": 5,
            "request_response_information": 1, "request_problem_information": 0,
            "user_property": [("a", "b")], "authentication_method": "m",
            "authentication_data": b"d",
        }),
        h("10 31" + MQTT + "05 02 000a 23"
          " 11 00000e10  15 0001 6d  16 0001 64  17 00  19 01  21 0014  22 0005"
          " 26 0001 61 0001 62  27 00010000"
          " 0001 63"),
    ),
    (
        "connect-will-properties-username-password",
        Connect(
            "c", clean_session=False, protocol_level=5,
            will=Will("w/t", b"bye", qos=1, retain=True, properties={
                "will_delay_interval": 30, "payload_format_indicator": 1,
                "message_expiry_interval": 60, "content_type": "t", "response_topic": "r",
                "correlation_data": b"\x01",
            }),
            username="u", password=b"pw",
        ),
        # flags: user name | password | will retain | will QoS 1 | will
        h("10 38" + MQTT + "05 ec 003c 00"
          " 0001 63"  # client id
          " 18 01 01  02 0000003c  03 0001 74  08 0001 72  09 0001 01  18 0000001e"
          " 0003 772f74  0003 627965  0001 75  0002 7077"),
    ),
    (
        "connect-password-without-username",  # allowed in 5.0 (section 3.1.2.9)
        Connect("c", protocol_level=5, password=b"p"),
        h("10 11" + MQTT + "05 42 003c 00 0001 63 0001 70"),
    ),
    # -- CONNACK (3.2) ---------------------------------------------------------------
    ("connack-minimal", ConnAck(), h("20 03 00 00 00")),
    (
        "connack-session-present-properties",
        ConnAck(True, 0, {
            "session_expiry_interval": 0, "assigned_client_identifier": "x",
            "server_keep_alive": 20, "receive_maximum": 10, "maximum_qos": 1,
            "retain_available": 0,
        }),
        h("20 16 01 00 13  11 00000000  12 0001 78  13 0014  21 000a  24 01  25 00"),
    ),
    (
        "connack-refused-reason-string",
        ConnAck(False, 0x87, {"reason_string": "no"}),
        h("20 08 00 87 05 1f 0002 6e6f"),
    ),
    # -- PUBLISH (3.3) ---------------------------------------------------------------
    ("publish-qos0", Publish("a/b", b"hi"), h("30 08 0003 612f62 00 6869")),
    (
        "publish-qos1-properties",
        Publish("a/b", b"hi", 1, packet_id=10, properties={
            "message_expiry_interval": 60, "subscription_identifier": [1, 2],
        }),
        h("32 13 0003 612f62 000a 09 02 0000003c 0b 01 0b 02 6869"),
    ),
    (
        "publish-topic-alias-empty-topic-qos2-dup-retain",
        Publish("", b"x", 2, True, True, 65535, {"topic_alias": 4}),
        h("3d 09 0000 ffff 03 23 0004 78"),
    ),
    (
        "publish-retain-empty-payload-user-property",
        Publish("t", b"", retain=True, properties={"user_property": [("a", "")]}),
        h("31 0a 0001 74 06 26 0001 61 0000"),
    ),
    # -- PUBACK, PUBREC, PUBREL, PUBCOMP (3.4-3.7) -----------------------------------
    ("puback-success-short", PubAck(1), h("40 02 0001")),
    ("puback-no-matching-subscribers", PubAck(2, 0x10), h("40 03 0002 10")),
    (
        "puback-quota-exceeded-reason-string",
        PubAck(3, 0x97, {"reason_string": "q"}),
        h("40 08 0003 97 04 1f 0001 71"),
    ),
    (
        "puback-success-user-property",
        PubAck(4, 0, {"user_property": [("a", "b")]}),
        h("40 0b 0004 00 07 26 0001 61 0001 62"),
    ),
    ("pubrec-unspecified-error", PubRec(5, 0x80), h("50 03 0005 80")),
    ("pubrel-not-found", PubRel(6, 0x92), h("62 03 0006 92")),
    ("pubrel-success-short", PubRel(7), h("62 02 0007")),
    (
        "pubcomp-not-found-empty-reason-string",
        PubComp(8, 0x92, {"reason_string": ""}),
        h("70 07 0008 92 03 1f 0000"),
    ),
    # -- SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK (3.8-3.11) -------------------------
    (
        "subscribe-all-options-subscription-identifier",
        Subscribe(1, (Subscription("a/#", 2, True, True, 2),), {"subscription_identifier": 5}),
        # options: QoS 2 | No Local 0x04 | Retain As Published 0x08 | Retain Handling 2 << 4
        h("82 0b 0001 02 0b 05 0003 612f23 2e"),
    ),
    (
        "subscribe-two-filters-shared",
        Subscribe(2, (Subscription("x"), Subscription("$share/g/y", 1, retain_handling=1))),
        h("82 14 0002 00 0001 78 00 000a 2473686172652f672f79 11"),
    ),
    (
        "suback-every-suback-code",
        SubAck(1, (0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2)),
        h("90 0f 0001 00 00 01 02 80 83 87 8f 91 97 9e a1 a2"),
    ),
    (
        "suback-properties",
        SubAck(2, (1,), {"reason_string": "r", "user_property": [("a", "b")]}),
        h("90 0f 0002 0b 1f 0001 72 26 0001 61 0001 62 01"),
    ),
    ("unsubscribe", Unsubscribe(3, ("a", "b/+")), h("a2 0b 0003 00 0001 61 0003 622f2b")),
    (
        "unsubscribe-user-property",
        Unsubscribe(4, ("#",), {"user_property": [("k", "v")]}),
        h("a2 0d 0004 07 26 0001 6b 0001 76 0001 23"),
    ),
    (
        "unsuback-every-unsuback-code",
        UnsubAck(3, (0, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91)),
        h("b0 0a 0003 00 00 11 80 83 87 8f 91"),
    ),
    (
        "unsuback-reason-string",
        UnsubAck(4, (0,), {"reason_string": "x"}),
        h("b0 08 0004 04 1f 0001 78 00"),
    ),
    # -- PINGREQ, PINGRESP, DISCONNECT, AUTH (3.12-3.15) -----------------------------
    ("pingreq", PingReq(), h("c0 00")),
    ("pingresp", PingResp(), h("d0 00")),
    ("disconnect-normal-short", Disconnect(), h("e0 00")),
    ("disconnect-with-will", Disconnect(4), h("e0 01 04")),
    (
        "disconnect-session-taken-over-properties",
        Disconnect(0x8E, {"reason_string": "t", "session_expiry_interval": 0,
                          "server_reference": "s", "user_property": [("a", "b")]}),
        h("e0 16 8e 14 11 00000000 1c 0001 73 1f 0001 74 26 0001 61 0001 62"),
    ),
    ("auth-success-short", Auth(), h("f0 00")),
    (
        "auth-continue",
        Auth(0x18, {"authentication_method": "SCRAM", "authentication_data": b"\x01\x02"}),
        h("f0 0f 18 0d 15 0005 5343 52 41 4d 16 0002 0102"),
    ),
    ("auth-re-authenticate", Auth(0x19), h("f0 02 19 00")),
]

# another packet, to follow each case in the trailing-bytes check
NEXT = Publish("n", b"next", 1, packet_id=9, properties={"content_type": "x"})
NEXT_WIRE = NEXT.encode(PROTOCOL_5)


def decoder_for(packet: object) -> Decoder:
    if isinstance(packet, Connect):
        return Decoder(accept_v5=True)
    return decoder5()


@pytest.mark.parametrize(("packet", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_encoded(packet: object, wire: bytes) -> None:
    assert packet.encode(PROTOCOL_5) == wire  # type: ignore[attr-defined]


@pytest.mark.parametrize(("packet", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decoded_whole(packet: object, wire: bytes) -> None:
    decoder = decoder_for(packet)
    assert decoder.feed(wire) == [v5(packet)]
    assert decoder.buffered == 0
    assert decoder.protocol_level == PROTOCOL_5


@pytest.mark.parametrize(("packet", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decoded_byte_by_byte(packet: object, wire: bytes) -> None:
    decoder = decoder_for(packet)
    for n, byte in enumerate(wire[:-1]):
        assert decoder.feed(bytes((byte,))) == []
        assert decoder.buffered == n + 1
    assert decoder.feed(wire[-1:]) == [v5(packet)]
    assert decoder.buffered == 0


@pytest.mark.parametrize(("packet", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decoded_with_trailing_bytes(packet: object, wire: bytes) -> None:
    for k in range(len(NEXT_WIRE)):
        decoder = decoder_for(packet)
        assert decoder.feed(wire + NEXT_WIRE[:k]) == [v5(packet)]
        assert decoder.buffered == k
        assert decoder.feed(NEXT_WIRE[k:]) == [NEXT]
        assert decoder.buffered == 0


def test_all_cases_in_one_stream() -> None:
    wire = b"".join(w for _, _, w in CASES)
    assert Decoder(accept_v5=True).feed(wire) == [v5(p) for _, p, _ in CASES]


# forms the encoder does not produce but a peer may send
ALTERNATE_FORMS = [
    ("puback-success-empty-properties", h("40 04 0001 00 00"), PubAck(1, 0, {})),
    ("pubrec-code-empty-properties", h("50 04 0001 10 00"), PubRec(1, 0x10, {})),
    ("disconnect-code-only-0", h("e0 01 00"), Disconnect(0, {})),
    ("disconnect-empty-properties", h("e0 02 00 00"), Disconnect(0, {})),
    ("auth-code-only", h("f0 01 18"), Auth(0x18, {})),
    ("auth-success-empty-properties", h("f0 02 00 00"), Auth(0, {})),
    (
        "property-length-two-bytes",
        h("40 8601 0001 00 8101 1f 007e") + b"r" * 126,
        PubAck(1, 0, {"reason_string": "r" * 126}),
    ),
]


@pytest.mark.parametrize(
    ("wire", "packet"), [c[1:] for c in ALTERNATE_FORMS], ids=[c[0] for c in ALTERNATE_FORMS]
)
def test_alternate_forms(wire: bytes, packet: object) -> None:
    assert decode5(wire) == [packet]


# -- the level: refused, accepted, learned ---------------------------------------------


def test_level_5_connect_refused_by_default() -> None:
    """Until the broker speaks 5.0: CONNACK 0x01 (3.1.1) and close, as before."""
    for decoder in (Decoder(), Decoder(1000), Decoder(protocol_level=PROTOCOL_311)):
        with pytest.raises(UnsupportedProtocolVersion) as info:
            decoder.feed(Connect("a", protocol_level=5).encode())
        assert info.value.connack_code == 0x01
        assert info.value.reason_code == 0x84


def test_level_5_connect_accepted_with_flag() -> None:
    decoder = Decoder(accept_v5=True)
    assert decoder.protocol_level == 0
    assert decoder.feed(Connect("a", protocol_level=5).encode()) == [
        Connect("a", protocol_level=5, properties={})
    ]
    assert decoder.protocol_level == PROTOCOL_5


def test_3x_connect_with_flag_stays_3x() -> None:
    decoder = Decoder(accept_v5=True)
    wire = Connect("a").encode() + PubAck(1).encode()
    assert decoder.feed(wire) == [Connect("a"), PubAck(1)]
    assert decoder.protocol_level == PROTOCOL_311


def test_connect_switches_layout_within_one_read() -> None:
    """CONNECT, SUBSCRIBE and PUBLISH in one TCP segment: the two after the CONNECT are read
    with the 5.0 layout."""
    packets = [
        Connect("a", protocol_level=5, properties={"receive_maximum": 5}),
        Subscribe(1, (Subscription("a/+", 1, no_local=True),), {"subscription_identifier": 3}),
        Publish("a/b", b"x", 1, packet_id=2, properties={"topic_alias": 1}),
        Disconnect(4),
    ]
    wire = b"".join(p.encode(PROTOCOL_5) for p in packets)
    assert Decoder(accept_v5=True).feed(wire) == [v5(p) for p in packets]
    decoder = Decoder(accept_v5=True)
    out = []
    for byte in wire:
        out += decoder.feed(bytes((byte,)))
    assert out == [v5(p) for p in packets]


def test_error_after_the_switch_keeps_packets_before() -> None:
    connect = Connect("a", protocol_level=5)
    wire = connect.encode() + h("40 02 0001") + h("40 03 0001 05")  # 0x05: not a PUBACK code
    with pytest.raises(MalformedPacket, match="PUBACK with reason code 0x05") as info:
        Decoder(accept_v5=True).feed(wire)
    assert info.value.packets_before == [v5(connect), PubAck(1, 0, {})]


def test_auth_is_reserved_before_5() -> None:
    for level in (0, 3, 4):
        with pytest.raises(MalformedPacket, match="reserved packet type"):
            Decoder(protocol_level=level).feed(h("f0 00"))


def test_setting_the_level_selects_the_layout() -> None:
    """A client-side caller sets the level it sent in CONNECT (tests/rawclient does)."""
    decoder = Decoder()
    decoder.protocol_level = PROTOCOL_5
    assert decoder.feed(h("20 03 00 00 00")) == [ConnAck(False, 0, {})]
    decoder.protocol_level = PROTOCOL_311
    assert decoder.feed(h("20 02 00 00")) == [ConnAck(False, 0)]


# -- reason codes on each packet ---------------------------------------------------------


def _with_code(kind: int, code: int) -> bytes:
    if kind == CONNACK:
        return bytes((0x20, 3, 0, code, 0))
    if kind in (PUBACK, PUBREC, PUBCOMP):
        return bytes((kind << 4, 3, 0, 1, code))
    if kind == PUBREL:
        return bytes((0x62, 3, 0, 1, code))
    if kind in (SUBACK, UNSUBACK):
        return bytes((kind << 4, 4, 0, 1, 0, code))
    return bytes(((kind << 4), 1, code))  # DISCONNECT, AUTH


@pytest.mark.parametrize(
    "kind", [CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH]
)
def test_every_reason_code_on_every_packet(kind: int) -> None:
    """Table 2-6: each code decodes where it is allowed and is malformed elsewhere."""
    valid = {code for code, _, kinds in rc.TABLE if kind in kinds}
    assert rc.VALID[kind] == valid
    for code in range(256):
        wire = _with_code(kind, code)
        if code in valid:
            (packet,) = decode5(wire)
            got = packet.return_codes if kind == SUBACK else getattr(packet, "reason_code", None)
            if kind == UNSUBACK:
                got = packet.reason_codes  # type: ignore[union-attr]
            assert got in (code, (code,))
            assert rc.is_valid(code, kind)
        else:
            with pytest.raises(MalformedPacket, match="reason code"):
                decode5(wire)
            assert not rc.is_valid(code, kind)


def test_reason_code_names() -> None:
    assert len({code for code, _, _ in rc.TABLE}) == 43
    assert rc.reason_name(0x00, DISCONNECT) == "Normal disconnection"
    assert rc.reason_name(0x00, SUBACK) == "Granted QoS 0"
    assert rc.reason_name(0x00, PUBACK) == "Success"
    assert rc.reason_name(0x00) == "Success"
    assert rc.reason_name(0x97) == "Quota exceeded"
    assert rc.reason_name(0xA2) == "Wildcard Subscriptions not supported"
    assert rc.reason_name(0x03) == "reason code 0x03"
    assert rc.is_error(0x80) and not rc.is_error(0x19)
    # every named constant in the module is a code of the table
    codes = {code for code, _, _ in rc.TABLE}
    constants = {
        name: value for name, value in vars(rc).items()
        if name.isupper() and isinstance(value, int) and not name.startswith(("CONNACK_", "SUBACK"))
        and name not in vars(kinds) and not name.startswith("_")
    }
    assert set(constants.values()) == codes
    assert constants["TOPIC_ALIAS_INVALID"] == 0x94
    assert constants["RE_AUTHENTICATE"] == 0x19


def test_session_present_with_a_refusal_is_malformed() -> None:
    with pytest.raises(MalformedPacket, match="session present and a refusal"):
        decode5(h("20 03 01 80 00"))


# -- encode_publish_parts_v5 -------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        Publish("a/b", b"hello"),
        Publish("a/b", b"", retain=True, properties={"message_expiry_interval": 9}),
        Publish("a/b", b"hello", qos=1, packet_id=10),
        Publish("a/b", b"x" * 300, 1, True, True, 1, {"subscription_identifier": [7, 8]}),
        Publish("", b"\x00" * 200, qos=2, packet_id=65535, properties={"topic_alias": 2}),
    ],
    ids=["qos0", "qos0-retain-expiry", "qos1", "qos1-dup-retain-subids", "qos2-alias"],
)
def test_encode_publish_parts_v5(packet: Publish) -> None:
    pid = packet.packet_id.to_bytes(2, "big") if packet.qos else b""
    head, tail = encode_publish_parts_v5(
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.properties
    )
    assert head + pid + tail == packet.encode(PROTOCOL_5)
    assert tail.endswith(packet.payload)
    # with the property block encoded beforehand: the same bytes
    block = encode_properties(packet.properties, PUBLISH)
    assert encode_publish_parts_v5(
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, block
    ) == (head, tail)
    assert decode5(head + pid + tail) == [v5(packet)]


def test_encode_publish_parts_v5_shared_by_several_packet_ids() -> None:
    props = {"subscription_identifier": [4], "content_type": "c"}
    head, tail = encode_publish_parts_v5("a/b", b"hello", 1, False, properties=props)
    assert head == h("32 13 0003 612f62")
    assert tail == h("06 03 0001 63 0b 04") + b"hello"
    for pid in (1, 0x1234, 65535):
        assert decode5(head + pid.to_bytes(2, "big") + tail) == [
            Publish("a/b", b"hello", 1, packet_id=pid, properties=props)
        ]


def test_3x_encoding_ignores_5_0_fields() -> None:
    """Reason codes and properties have no 3.x encoding: the 3.1.1 bytes are unchanged."""
    assert PubAck(1, 0x10, {"reason_string": "x"}).encode(PROTOCOL_311) == h("40 02 0001")
    assert Disconnect(4, {"reason_string": "x"}).encode(PROTOCOL_311) == h("e0 00")
    assert ConnAck(True, 0, {"receive_maximum": 3}).encode(PROTOCOL_311) == h("20 02 01 00")
    assert SubAck(1, (1,), {"reason_string": "x"}).encode(PROTOCOL_311) == h("90 03 0001 01")
    assert UnsubAck(1, (0,), {}).encode(PROTOCOL_311) == h("b0 02 0001")
    assert Subscribe(1, (Subscription("a", 1, True, True, 2),)).encode() == h(
        "82 06 0001 0001 61 01"
    )
    assert Publish("a", b"p", properties={"topic_alias": 1}).encode() == h("30 04 0001 61 70")
    assert Connect("c", properties={"receive_maximum": 1}).encode() == h(
        "10 0d" + MQTT + "04 02 003c 0001 63"
    )
