"""The MQTT 5.0 packet layouts for :class:`mqttd.codec.decoder.Decoder`.

One function per packet type with the decoder's method signature ``(decoder, flags, buffer,
body start, body end) -> packet``; the decoder puts them in its 5.0 dispatch table. PINGREQ
and PINGRESP are as in 3.1.1 and decoded there; CONNECT is recognised there and handed to
:func:`decode_connect_v5`.

Decoded 5.0 packets always carry a ``properties`` dict (empty when the packet has none) and
their reason codes; a reason code that table 2-6 does not allow on the packet is malformed.
"""

from __future__ import annotations

from mqttd.codec import reason
from mqttd.codec.errors import MalformedPacket, ProtocolError, TopicNameInvalid
from mqttd.codec.kinds import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PACKET_NAMES,
    PROTOCOL_5,
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
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
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
from mqttd.codec.properties import Properties, decode_properties
from mqttd.codec.wire import Buffer, expect_flags, read_bin, read_str, read_u16

_VALID = reason.VALID


def _check_reason(code: int, kind: int) -> None:
    if code not in _VALID[kind]:
        raise MalformedPacket(f"{PACKET_NAMES[kind]} with reason code {code:#04x}")


def _end_of(i: int, end: int, name: str) -> None:
    if i != end:
        raise MalformedPacket(f"{end - i} unexpected bytes at the end of {name}")


def decode_connect_v5(data: Buffer, i: int, end: int, cflags: int, keepalive: int) -> Connect:
    """The rest of a level-5 CONNECT, after the protocol level, flags and keep alive."""
    if cflags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")
    will_flag = cflags & 0x04
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    if will_qos == 3:
        raise MalformedPacket("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("will QoS/retain set without the will flag")
    # 5.0 allows a password without a user name (section 3.1.2.9)
    props, i = decode_properties(data, i, end, CONNECT)
    if "authentication_data" in props and "authentication_method" not in props:
        raise ProtocolError("Authentication Data without an Authentication Method")
    client_id, i = read_str(data, i, end, "client identifier")
    will = None
    if will_flag:
        will_props, i = decode_properties(data, i, end, WILL)
        will_topic, i = read_str(data, i, end, "will topic")
        will_payload, i = read_bin(data, i, end, "will payload")
        if not will_topic or "+" in will_topic or "#" in will_topic:
            raise MalformedPacket(f"invalid will topic {will_topic!r}")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = password = None
    if cflags & 0x80:
        username, i = read_str(data, i, end, "user name")
    if cflags & 0x40:
        password, i = read_bin(data, i, end, "password")
    _end_of(i, end, "CONNECT")
    return Connect(
        client_id, bool(cflags & 0x02), keepalive, PROTOCOL_5, will, username, password, props
    )


def connack(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    expect_flags(flags, 0, "CONNACK")
    if end - i < 3:
        raise MalformedPacket("CONNACK shorter than its variable header")
    ack_flags, code = data[i], data[i + 1]
    if ack_flags & 0xFE:
        raise MalformedPacket("CONNACK reserved flags set")
    _check_reason(code, CONNACK)
    if ack_flags and code:
        raise MalformedPacket("CONNACK with session present and a refusal (MQTT-3.2.2-6)")
    props, i = decode_properties(data, i + 2, end, CONNACK)
    _end_of(i, end, "CONNACK")
    return ConnAck(bool(ack_flags), code, props)


def publish(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    dup = bool(flags & 0x08)
    if dup and not qos:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")
    if i + 2 > end:
        raise MalformedPacket("packet ends inside topic name")
    n = (data[i] << 8) | data[i + 1]
    i += 2
    if i + n > end:
        raise MalformedPacket(f"topic name length {n} runs past the end of the packet")
    try:
        topic = str(data[i:i + n], "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("topic name is not valid UTF-8") from None
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise TopicNameInvalid(f"invalid topic name {topic!r}")
    i += n
    packet_id = 0
    if qos:
        if i + 2 > end:
            raise MalformedPacket("packet ends inside packet identifier")
        packet_id = (data[i] << 8) | data[i + 1]
        if not packet_id:
            raise ProtocolError("PUBLISH with packet identifier 0")
        i += 2
    props: Properties
    if i < end and not data[i]:
        props = {}
        i += 1
    else:
        props, i = decode_properties(data, i, end, PUBLISH)
    if not topic and "topic_alias" not in props:
        # 5.0 section 3.3.2.1: an empty topic name needs a Topic Alias
        raise ProtocolError("PUBLISH with an empty topic name and no Topic Alias")
    return Publish(topic, data[i:end], qos, bool(flags & 1), dup, packet_id, props)


def _ack(flags: int, data: Buffer, i: int, end: int, kind: int, expected: int
         ) -> tuple[int, int, Properties]:
    """Packet id, reason code and properties of PUBACK/PUBREC/PUBREL/PUBCOMP."""
    name = PACKET_NAMES[kind]
    expect_flags(flags, expected, name)
    if end - i < 2:
        raise MalformedPacket(f"{name} shorter than its packet identifier")
    packet_id = (data[i] << 8) | data[i + 1]
    if not packet_id:
        raise ProtocolError(f"{name} with packet identifier 0")
    if end - i == 2:
        return packet_id, 0, {}
    code = data[i + 2]
    _check_reason(code, kind)
    if end - i == 3:
        return packet_id, code, {}
    props, i = decode_properties(data, i + 3, end, kind)
    _end_of(i, end, name)
    return packet_id, code, props


def puback(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    return PubAck(*_ack(flags, data, i, end, PUBACK, 0))


def pubrec(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    return PubRec(*_ack(flags, data, i, end, PUBREC, 0))


def pubrel(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    return PubRel(*_ack(flags, data, i, end, PUBREL, 2))


def pubcomp(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    return PubComp(*_ack(flags, data, i, end, PUBCOMP, 0))


def _id_and_properties(data: Buffer, i: int, end: int, kind: int) -> tuple[int, Properties, int]:
    name = PACKET_NAMES[kind]
    packet_id = read_u16(data, i, end, "packet identifier")
    if not packet_id:
        raise ProtocolError(f"{name} with packet identifier 0")
    props, i = decode_properties(data, i + 2, end, kind)
    return packet_id, props, i


def subscribe(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    expect_flags(flags, 2, "SUBSCRIBE")
    packet_id, props, i = _id_and_properties(data, i, end, SUBSCRIBE)
    subs = []
    while i < end:
        topic_filter, i = read_str(data, i, end, "topic filter")
        if i >= end:
            raise MalformedPacket("SUBSCRIBE topic filter without subscription options")
        options = data[i]
        i += 1
        if options & 0xC0:
            raise MalformedPacket(f"SUBSCRIBE options reserved bits set ({options:#04x})")
        qos = options & 0x03
        if qos == 3:
            raise MalformedPacket("SUBSCRIBE maximum QoS 3")
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:
            raise MalformedPacket("SUBSCRIBE Retain Handling 3")
        no_local = bool(options & 0x04)
        if no_local and topic_filter.startswith("$share/"):
            raise ProtocolError("No Local on a shared subscription (MQTT-3.8.3-4)")
        subs.append(
            Subscription(topic_filter, qos, no_local, bool(options & 0x08), retain_handling)
        )
    if not subs:
        raise ProtocolError("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(subs), props)


def _codes(data: Buffer, i: int, end: int, kind: int) -> tuple[int, ...]:
    codes = tuple(data[i:end])
    if not codes:
        raise ProtocolError(f"{PACKET_NAMES[kind]} without reason codes")
    valid = _VALID[kind]
    for code in codes:
        if code not in valid:
            raise MalformedPacket(f"{PACKET_NAMES[kind]} with reason code {code:#04x}")
    return codes


def suback(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    expect_flags(flags, 0, "SUBACK")
    packet_id, props, i = _id_and_properties(data, i, end, SUBACK)
    return SubAck(packet_id, _codes(data, i, end, SUBACK), props)


def unsubscribe(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    expect_flags(flags, 2, "UNSUBSCRIBE")
    packet_id, props, i = _id_and_properties(data, i, end, UNSUBSCRIBE)
    filters = []
    while i < end:
        topic_filter, i = read_str(data, i, end, "topic filter")
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, tuple(filters), props)


def unsuback(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    expect_flags(flags, 0, "UNSUBACK")
    packet_id, props, i = _id_and_properties(data, i, end, UNSUBACK)
    return UnsubAck(packet_id, _codes(data, i, end, UNSUBACK), props)


def _reason_and_properties(flags: int, data: Buffer, i: int, end: int, kind: int
                           ) -> tuple[int, Properties]:
    """DISCONNECT and AUTH: remaining length 0 is Success (Normal disconnection) without
    properties, 1 a reason code without properties."""
    name = PACKET_NAMES[kind]
    expect_flags(flags, 0, name)
    if i == end:
        return 0, {}
    code = data[i]
    _check_reason(code, kind)
    if end - i == 1:
        return code, {}
    props, i = decode_properties(data, i + 1, end, kind)
    _end_of(i, end, name)
    return code, props


def disconnect(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    return Disconnect(*_reason_and_properties(flags, data, i, end, DISCONNECT))


def auth(dec: object, flags: int, data: Buffer, i: int, end: int) -> Packet:
    return Auth(*_reason_and_properties(flags, data, i, end, AUTH))
