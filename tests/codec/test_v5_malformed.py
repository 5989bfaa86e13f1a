"""Malformed and forbidden MQTT 5.0 input: the exact error and reason code each gets."""

from __future__ import annotations

import pytest

from mqttd.codec import (
    Decoder,
    MalformedPacket,
    MQTTError,
    ProtocolError,
    TopicAliasInvalid,
    TopicNameInvalid,
)
from mqttd.codec.packets import PingReq
from tests.codec.v5util import decoder5, h, pkt, s16

MQTT = "0004 4d515454"


def connect5(flags: int, rest: str) -> bytes:
    """A level-5 CONNECT: name, level 5, ``flags``, keep alive 60, then ``rest`` (properties
    onwards)."""
    return pkt(0x10, f"{MQTT} 05 {flags:02x} 003c {rest}")


MAL, PROTO, TOPIC, ALIAS = MalformedPacket, ProtocolError, TopicNameInvalid, TopicAliasInvalid
CODE = {MAL: 0x81, PROTO: 0x82, TOPIC: 0x90, ALIAS: 0x94}

# (id, wire bytes, error class, part of the message)
CASES: list[tuple[str, bytes, type[MQTTError], str]] = [
    # -- CONNECT ---------------------------------------------------------------------------
    ("connect-reserved-flag", connect5(0x03, "00 0001 63"), MAL, "reserved flag"),
    ("connect-will-qos3", connect5(0x1E, "00 0001 63 00 0001 74 0000"), MAL, "will QoS 3"),
    ("connect-will-retain-no-will", connect5(0x22, "00 0001 63"), MAL, "without the will flag"),
    ("connect-no-property-length", connect5(0x02, ""), MAL, "ends before its property length"),
    ("connect-property-length-past-end", connect5(0x02, "10 11 0000"), MAL, "runs past the end"),
    ("connect-auth-data-no-method", connect5(0x02, "04 16 0001 64 0001 63"), PROTO,
     "Authentication Data without an Authentication Method"),
    ("connect-property-twice", connect5(0x02, "0a 11 00000001 11 00000002 0001 63"), PROTO,
     "Session Expiry Interval more than once"),
    ("connect-receive-maximum-0", connect5(0x02, "03 21 0000 0001 63"), PROTO,
     "Receive Maximum of 0"),
    ("connect-maximum-packet-size-0", connect5(0x02, "05 27 00000000 0001 63"), PROTO,
     "Maximum Packet Size of 0"),
    ("connect-request-problem-2", connect5(0x02, "02 17 02 0001 63"), PROTO, "must be 0 or 1"),
    ("connect-will-delay-on-connect", connect5(0x02, "05 18 00000001 0001 63"), MAL,
     "Will Delay Interval is not allowed on CONNECT"),
    ("connect-topic-alias-on-connect", connect5(0x02, "03 23 0001 0001 63"), MAL,
     "Topic Alias is not allowed on CONNECT"),
    ("connect-session-expiry-on-will", connect5(0x06, "00 0001 63 05 11 00000001 0001 74 0000"),
     MAL, "Session Expiry Interval is not allowed on Will Properties"),
    ("connect-will-no-property-length", connect5(0x06, "00 0001 63"), MAL,
     "ends before its property length"),
    ("connect-will-delay-twice", connect5(0x06, "00 0001 63 0a 18 00000001 18 00000001 0001 74"
                                          " 0000"), PROTO, "more than once"),
    ("connect-will-payload-format-2", connect5(0x06, "00 0001 63 02 01 02 0001 74 0000"), MAL,
     "must be 0 or 1"),
    ("connect-will-topic-wildcard", connect5(0x06, "00 0001 63 00 0001 23 0000"), MAL,
     "invalid will topic"),
    ("connect-trailing-byte", connect5(0x02, "00 0001 63 00"), MAL, "unexpected bytes"),
    ("connect-unknown-property", connect5(0x02, "02 05 00 0001 63"), MAL,
     "unknown property identifier 0x05"),
    ("connect-user-name-missing", connect5(0x82, "00 0001 63"), MAL, "user name"),
    ("connect-password-missing", connect5(0x42, "00 0001 63"), MAL, "password"),
    # -- CONNACK ---------------------------------------------------------------------------
    ("connack-311-layout", h("20 02 00 00"), MAL, "shorter than its variable header"),
    ("connack-fixed-flags", h("21 03 00 00 00"), MAL, "CONNACK with reserved flags"),
    ("connack-ack-flags", h("20 03 02 00 00"), MAL, "CONNACK reserved flags set"),
    ("connack-311-code-5", h("20 03 00 05 00"), MAL, "CONNACK with reason code 0x05"),
    ("connack-disconnect-only-code", h("20 03 00 8b 00"), MAL, "reason code 0x8b"),
    ("connack-present-and-refused", h("20 03 01 87 00"), MAL, "session present and a refusal"),
    ("connack-trailing", h("20 04 00 00 00 00"), MAL, "unexpected bytes at the end of CONNACK"),
    ("connack-connect-only-property", h("20 05 00 00 02 17 01"), MAL,
     "Request Problem Information is not allowed on CONNACK"),
    ("connack-maximum-qos-2", h("20 05 00 00 02 24 02"), PROTO, "must be 0 or 1"),
    ("connack-retain-available-twice", h("20 07 00 00 04 25 01 25 01"), PROTO, "more than once"),
    # -- PUBLISH ---------------------------------------------------------------------------
    ("publish-no-property-length", h("30 05 0003 612f62"), MAL, "ends before its property"),
    ("publish-qos1-no-property-length", h("32 07 0003 612f62 0001"), MAL,
     "ends before its property"),
    ("publish-property-length-past-end", h("30 07 0003 612f62 05 01"), MAL, "runs past the end"),
    ("publish-empty-topic-no-alias", h("30 03 0000 00"), PROTO, "empty topic name and no Topic"),
    ("publish-empty-topic-other-props", h("30 05 0000 02 01 00"), PROTO, "no Topic Alias"),
    ("publish-topic-alias-0", h("30 07 0001 74 03 23 0000"), ALIAS, "Topic Alias of 0"),
    ("publish-topic-wildcard", h("30 04 0001 2b 00"), TOPIC, "invalid topic name"),
    ("publish-topic-nul", h("30 04 0001 00 00"), TOPIC, "invalid topic name"),
    ("publish-topic-bad-utf8", h("30 04 0001 ff 00"), MAL, "not valid UTF-8"),
    ("publish-qos3", h("36 06 0001 74 0001 00"), MAL, "QoS 3"),
    ("publish-dup-qos0", h("38 04 0001 74 00"), MAL, "DUP"),
    ("publish-packet-id-0", h("32 06 0001 74 0000 00"), PROTO, "packet identifier 0"),
    ("publish-connack-property", h("30 06 0001 74 02 24 01"), MAL,
     "Maximum QoS is not allowed on PUBLISH"),
    ("publish-will-delay", h("30 09 0001 74 05 18 00000001"), MAL, "not allowed on PUBLISH"),
    ("publish-expiry-twice", h("30 0e 0001 74 0a 02 00000001 02 00000002"), PROTO,
     "Message Expiry Interval more than once"),
    ("publish-payload-format-2", h("30 06 0001 74 02 01 02"), MAL, "must be 0 or 1"),
    ("publish-subscription-id-0", h("30 06 0001 74 02 0b 00"), PROTO, "Identifier of 0"),
    ("publish-response-topic-wildcard", h("30 09 0001 74 05 08 0002 612b"), PROTO,
     "not a topic name"),
    ("publish-content-type-bad-utf8", h("30 08 0001 74 04 03 0001 80"), MAL, "not valid UTF-8"),
    # -- PUBACK, PUBREC, PUBREL, PUBCOMP ---------------------------------------------------
    ("puback-length-1", h("40 01 00"), MAL, "shorter than its packet identifier"),
    ("puback-packet-id-0", h("40 02 0000"), PROTO, "PUBACK with packet identifier 0"),
    ("puback-pubrel-code", h("40 03 0001 92"), MAL, "PUBACK with reason code 0x92"),
    ("pubrec-granted-qos-1", h("50 03 0001 01"), MAL, "PUBREC with reason code 0x01"),
    ("pubrel-quota-exceeded", h("62 03 0001 97"), MAL, "PUBREL with reason code 0x97"),
    ("pubcomp-no-subscribers", h("70 03 0001 10"), MAL, "PUBCOMP with reason code 0x10"),
    ("pubrel-flags-0", h("60 02 0001"), MAL, "PUBREL with reserved flags"),
    ("puback-flags-2", h("42 02 0001"), MAL, "PUBACK with reserved flags"),
    ("puback-property-length-past-end", h("40 05 0001 00 03 1f"), MAL, "runs past the end"),
    ("puback-trailing", h("40 05 0001 00 00 00"), MAL, "unexpected bytes at the end of PUBACK"),
    ("puback-topic-alias", h("40 07 0001 00 03 23 0001"), MAL,
     "Topic Alias is not allowed on PUBACK"),
    ("pubrec-reason-string-twice", h("50 0a 0001 80 06 1f 0000 1f 0000"), PROTO,
     "Reason String more than once on PUBREC"),
    # -- SUBSCRIBE -------------------------------------------------------------------------
    ("subscribe-flags-0", h("80 07 0001 00 0001 61 00"), MAL, "SUBSCRIBE with reserved flags"),
    ("subscribe-option-bit-6", h("82 07 0001 00 0001 61 40"), MAL, "reserved bits set (0x40)"),
    ("subscribe-option-bit-7", h("82 07 0001 00 0001 61 81"), MAL, "reserved bits set (0x81)"),
    ("subscribe-qos-3", h("82 07 0001 00 0001 61 03"), MAL, "maximum QoS 3"),
    ("subscribe-retain-handling-3", h("82 07 0001 00 0001 61 30"), MAL, "Retain Handling 3"),
    ("subscribe-no-local-shared", pkt(0x82, "0001 00" + s16("$share/g/a") + "04"), PROTO,
     "No Local on a shared subscription"),
    ("subscribe-no-filters", h("82 03 0001 00"), PROTO, "SUBSCRIBE without topic filters"),
    ("subscribe-filter-without-options", h("82 06 0001 00 0001 61"), MAL,
     "without subscription options"),
    ("subscribe-packet-id-0", h("82 07 0000 00 0001 61 00"), PROTO, "packet identifier 0"),
    ("subscribe-no-property-length", h("82 02 0001"), MAL, "ends before its property length"),
    ("subscribe-311-layout", h("82 06 0001 0001 61 01"), MAL, "runs past the end"),
    ("subscribe-subscription-id-0", h("82 09 0001 02 0b 00 0001 61 00"), PROTO,
     "Subscription Identifier of 0"),
    ("subscribe-subscription-id-twice", h("82 0b 0001 04 0b 01 0b 02 0001 61 00"), PROTO,
     "Subscription Identifier more than once on SUBSCRIBE"),
    ("subscribe-reason-string", h("82 0a 0001 03 1f 0000 0001 61 00"), MAL,
     "Reason String is not allowed on SUBSCRIBE"),
    ("subscribe-filter-bad-utf8", h("82 07 0001 00 0001 c0 00"), MAL, "not valid UTF-8"),
    # -- SUBACK, UNSUBSCRIBE, UNSUBACK -----------------------------------------------------
    ("suback-no-codes", h("90 03 0001 00"), PROTO, "SUBACK without reason codes"),
    ("suback-code-3", h("90 04 0001 00 03"), MAL, "SUBACK with reason code 0x03"),
    ("suback-no-subscription-existed", h("90 05 0001 00 00 11"), MAL, "reason code 0x11"),
    ("suback-311-layout", h("90 03 0001 00"), PROTO, "without reason codes"),
    ("suback-subscription-id", h("90 06 0001 02 0b 01 00"), MAL, "not allowed on SUBACK"),
    ("unsubscribe-no-filters", h("a2 03 0001 00"), PROTO, "UNSUBSCRIBE without topic filters"),
    ("unsubscribe-subscription-id", h("a2 08 0001 02 0b 01 0001 61"), MAL,
     "Subscription Identifier is not allowed on UNSUBSCRIBE"),
    ("unsubscribe-flags-0", h("a0 06 0001 00 0001 61"), MAL, "UNSUBSCRIBE with reserved flags"),
    ("unsuback-311-layout", h("b0 02 0001"), MAL, "ends before its property length"),
    ("unsuback-no-codes", h("b0 03 0001 00"), PROTO, "UNSUBACK without reason codes"),
    ("unsuback-granted-qos-1", h("b0 04 0001 00 01"), MAL, "UNSUBACK with reason code 0x01"),
    ("unsuback-packet-id-0", h("b0 04 0000 00 00"), PROTO, "packet identifier 0"),
    # -- PINGREQ, DISCONNECT, AUTH ---------------------------------------------------------
    ("pingreq-with-body", h("c0 01 00"), MAL, "PINGREQ must have a remaining length of 0"),
    ("disconnect-flags", h("e1 00"), MAL, "DISCONNECT with reserved flags"),
    ("disconnect-code-1", h("e0 01 01"), MAL, "DISCONNECT with reason code 0x01"),
    ("disconnect-connack-only-code", h("e0 01 84"), MAL, "reason code 0x84"),
    ("disconnect-property-length-past-end", h("e0 03 00 05 11"), MAL, "runs past the end"),
    ("disconnect-trailing", h("e0 03 00 00 00"), MAL, "unexpected bytes at the end of DISCON"),
    ("disconnect-topic-alias", h("e0 05 00 03 23 0001"), MAL, "not allowed on DISCONNECT"),
    ("disconnect-expiry-twice", h("e0 0c 00 0a 11 00000001 11 00000001"), PROTO,
     "more than once"),
    ("auth-flags", h("f1 00"), MAL, "AUTH with reserved flags"),
    ("auth-code-0x04", h("f0 02 04 00"), MAL, "AUTH with reason code 0x04"),
    ("auth-receive-maximum", h("f0 05 18 03 21 0001"), MAL, "not allowed on AUTH"),
    ("auth-method-twice", h("f0 08 18 06 15 0000 15 0000"), PROTO,
     "Authentication Method more than once"),
    ("auth-trailing", h("f0 03 00 00 00"), MAL, "unexpected bytes at the end of AUTH"),
    # -- fixed header ----------------------------------------------------------------------
    ("reserved-type-0", h("00 00"), MAL, "reserved packet type"),
    ("remaining-length-5-bytes", h("30 ffffffff 01"), MAL, "longer than four bytes"),
]


@pytest.mark.parametrize(
    ("wire", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed(wire: bytes, error: type[MQTTError], message: str) -> None:
    decoder = Decoder(accept_v5=True) if wire[0] >> 4 == 1 else decoder5()
    with pytest.raises(error) as info:
        decoder.feed(PingReq().encode() + wire)
    assert type(info.value) is error
    assert message in info.value.message
    assert info.value.reason_code == CODE[error]
    assert info.value.packets_before == [PingReq()]


@pytest.mark.parametrize(
    ("wire", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_byte_by_byte(wire: bytes, error: type[MQTTError], message: str) -> None:
    """The same error when the bytes arrive one at a time (the error comes with the last)."""
    decoder = Decoder(accept_v5=True) if wire[0] >> 4 == 1 else decoder5()
    with pytest.raises(error):
        for byte in wire:
            decoder.feed(bytes((byte,)))


def test_packet_too_large_at_level_5() -> None:
    decoder = decoder5(max_packet_size=10)
    with pytest.raises(MQTTError) as info:
        decoder.feed(h("30 09"))
    assert info.value.reason_code == 0x95
