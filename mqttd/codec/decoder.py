"""Incremental, sans-IO packet decoder.

``Decoder.feed(data)`` appends bytes and returns every packet that is now complete.
Packets are parsed from one buffer with an offset; the remainder is kept once per
call. A Remaining Length above ``max_packet_size`` is rejected as soon as the fixed
header is read, before the body is buffered.

The decoder is symmetric: it decodes client-to-server and server-to-client packets
alike (the broker rejects the ones a client may not send; the load generators and
tests use the same decoder for the broker's replies). The protocol level is learned
from CONNECT (or set by the caller) and selects the 3.x or 5.0 layout: a level-5 CONNECT
switches the decoder to the 5.0 layout for the rest of the stream, including the packets
after it in the same read. A level-5 CONNECT is refused (UnsupportedProtocolVersion, CONNACK
0x01) unless the decoder was built with ``accept_v5=True`` or is already at level 5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from mqttd.codec import decoder5 as v5
from mqttd.codec.decoder5 import decode_connect_v5
from mqttd.codec.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_31,
    PROTOCOL_311,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
    _Ack,
    _new_object,
    _slot_setters,
)
from mqttd.codec.packets import wire_publish as _wire_publish
from mqttd.codec.wire import Buffer
from mqttd.codec.wire import expect_flags as _expect_flags
from mqttd.codec.wire import read_bin as _read_bin
from mqttd.codec.wire import read_str as _read_str
from mqttd.codec.wire import read_u16 as _read_u16

MAX_REMAINING_LENGTH = 268_435_455
MAX_PACKET_SIZE = MAX_REMAINING_LENGTH + 5

_set_ack_id, _set_ack_code, _set_ack_properties = _slot_setters(
    _Ack, "packet_id", "reason_code", "properties"
)
_PINGREQ = PingReq()
_PINGRESP = PingResp()
_DISCONNECT = Disconnect()

class _LayoutChanged(Exception):  # a signal inside feed(), never seen outside
    """Raised by the CONNECT decoder after it switched the decoding table."""

    def __init__(self, packet: Packet, end: int) -> None:
        self.packet = packet
        self.end = end


# Topic names already decoded and checked (bytes -> str), shared by every connection.
_TOPICS: dict[bytes, str] = {}
_MAX_TOPICS = 4096


def _topic_name(raw: bytes) -> str:
    """A PUBLISH topic name: valid UTF-8 with no wildcard and no NUL (then remembered)."""
    try:
        topic = str(raw, "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("topic name is not valid UTF-8") from None
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise TopicNameInvalid(f"invalid topic name {topic!r}")
    if len(_TOPICS) >= _MAX_TOPICS:
        _TOPICS.clear()
    _TOPICS[raw] = topic
    return topic


class Decoder:
    """Turns a byte stream into packets. One per connection."""

    __slots__ = ("_buf", "_decoders", "_level", "accept_v5", "max_packet_size")
    _DECODERS: ClassVar[tuple[Callable[[Decoder, int, Buffer, int, int], Packet], ...]]
    _DECODERS_V5: ClassVar[tuple[Callable[[Decoder, int, Buffer, int, int], Packet], ...]]

    def __init__(
        self,
        max_packet_size: int = MAX_PACKET_SIZE,
        protocol_level: int = 0,
        accept_v5: bool = False,
    ) -> None:
        self._buf = b""
        self.max_packet_size = max_packet_size
        self.accept_v5 = accept_v5
        # 0 until a CONNECT is seen (or set by a client-side caller)
        self.protocol_level = protocol_level

    @property
    def protocol_level(self) -> int:
        return self._level

    @protocol_level.setter
    def protocol_level(self, level: int) -> None:
        self._level = level
        self._decoders = self._DECODERS_V5 if level == PROTOCOL_5 else self._DECODERS

    @property
    def buffered(self) -> int:
        """Bytes held for a packet that is not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[Packet]:
        """Add ``data``; return the packets completed by it, in order.

        Raises :class:`MQTTError` for bad input; the exception's ``packets_before``
        holds the packets that were complete before the bad one. After an error the
        decoder must not be used again (the connection is closed).
        """
        buf: bytes
        held = self._buf
        if held:
            # the bytes of an unfinished packet, then ``data``: joined as bytes, whose
            # slices (the topics and payloads below) are bytes without another copy, as
            # a bytearray's are not
            buf = held + data
        elif type(data) is bytes:
            buf = data
        else:
            buf = bytes(data)
        n = len(buf)
        pos = 0
        out: list[Packet] = []
        decoders = self._decoders
        limit = self.max_packet_size
        try:
            while True:
                try:
                    while n - pos >= 2:
                        # Remaining Length: at most four bytes
                        i = pos + 1
                        byte = buf[i]
                        length = byte & 0x7F
                        shift = 7
                        while byte & 0x80:
                            i += 1
                            if i - pos > 4:
                                raise MalformedPacket("Remaining Length longer than four bytes")
                            if i >= n:
                                break
                            byte = buf[i]
                            length |= (byte & 0x7F) << shift
                            shift += 7
                        else:
                            i += 1
                            end = i + length
                            if end - pos > limit:
                                raise PacketTooLarge(
                                    f"packet of {end - pos} bytes exceeds the maximum of {limit}"
                                )
                            if end > n:
                                break
                            first = buf[pos]
                            out.append(decoders[first >> 4](self, first & 0x0F, buf, i, end))
                            pos = end
                            continue
                        break  # Remaining Length incomplete
                    break
                except _LayoutChanged as change:
                    # a CONNECT switched between the 3.x and 5.0 layouts: go on with the new
                    # table (no per-packet check on the hot path; this happens once at most)
                    out.append(change.packet)
                    pos = change.end
                    decoders = self._decoders
        except MQTTError as exc:
            exc.packets_before = out
            self._buf = b""
            raise
        if pos < n:
            self._buf = buf[pos:]
        elif held:
            self._buf = b""
        return out

    # -- one method per packet type: (flags, buffer, body start, body end) -> packet --

    def _reserved(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        raise MalformedPacket("reserved packet type (0, or 15 before MQTT 5.0)")

    def _connect(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        _expect_flags(flags, 0, "CONNECT")
        name, i = _read_str(data, i, end, "protocol name")
        if i + 4 > end:
            raise MalformedPacket("CONNECT ends inside its variable header")
        level = data[i]
        cflags = data[i + 1]
        keepalive = (data[i + 2] << 8) | data[i + 3]
        i += 4
        # a bridge may set the top bit of the level (mosquitto's try_private); the
        # Connect keeps it, the stream is decoded at the plain level
        if (name, level & 0x7F) not in (("MQTT", PROTOCOL_311), ("MQIsdp", PROTOCOL_31)):
            if (
                name == "MQTT"
                and level == PROTOCOL_5
                and (self.accept_v5 or self._level == PROTOCOL_5)
            ):
                packet: Packet = decode_connect_v5(data, i, end, cflags, keepalive)
                self._learn_level(PROTOCOL_5, packet, end)
                return packet
            if name in ("MQTT", "MQIsdp"):
                # MQTT-3.1.2-2: answer CONNACK 0x01 and close. 5.0 comes with its own issue.
                raise UnsupportedProtocolVersion(f"protocol level {level} is not supported")
            raise ProtocolError(f"unknown protocol name {name!r}")
        if cflags & 0x01:
            raise MalformedPacket("CONNECT reserved flag is set")
        clean = bool(cflags & 0x02)
        will_flag = cflags & 0x04
        will_qos = (cflags >> 3) & 0x03
        will_retain = bool(cflags & 0x20)
        has_password = cflags & 0x40
        has_username = cflags & 0x80
        if will_qos == 3:
            raise MalformedPacket("will QoS 3")
        if not will_flag and (will_qos or will_retain):
            raise MalformedPacket("will QoS/retain set without the will flag")
        if has_password and not has_username:
            raise MalformedPacket("password flag set without the user name flag")
        client_id, i = _read_str(data, i, end, "client identifier")
        will = None
        if will_flag:
            will_topic, i = _read_str(data, i, end, "will topic")
            will_payload, i = _read_bin(data, i, end, "will message")
            if not will_topic or "+" in will_topic or "#" in will_topic:
                raise MalformedPacket(f"invalid will topic {will_topic!r}")
            will = Will(will_topic, will_payload, will_qos, will_retain)
        username = password = None
        if has_username:
            username, i = _read_str(data, i, end, "user name")
        if has_password:
            password, i = _read_bin(data, i, end, "password")
        if i != end:
            raise MalformedPacket(f"{end - i} unexpected bytes at the end of CONNECT")
        packet = Connect(client_id, clean, keepalive, level, will, username, password)
        self._learn_level(level & 0x7F, packet, end)
        return packet

    def _learn_level(self, level: int, packet: Packet, end: int) -> None:
        """Take the CONNECT's protocol level; if the layout changes, tell ``feed``."""
        changed = (level == PROTOCOL_5) != (self._level == PROTOCOL_5)
        self.protocol_level = level
        if changed:
            raise _LayoutChanged(packet, end)

    def _connack(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        _expect_flags(flags, 0, "CONNACK")
        if end - i != 2:
            raise MalformedPacket("CONNACK must have a remaining length of 2")
        if data[i] & 0xFE:
            raise MalformedPacket("CONNACK reserved flags set")
        present, code = bool(data[i] & 1), data[i + 1]
        if self.protocol_level < PROTOCOL_5:
            if code > 5:
                raise MalformedPacket(f"CONNACK return code {code:#04x} is reserved")
            if present and code:
                raise MalformedPacket("CONNACK with session present and a refusal (MQTT-3.2.2-4)")
        return ConnAck(present, code)

    def _publish(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        dup = flags & 0x08 != 0
        if dup and not qos:
            raise MalformedPacket("DUP set on a QoS 0 PUBLISH")
        if i + 2 > end:
            raise MalformedPacket("packet ends inside topic name")
        n = (data[i] << 8) | data[i + 1]
        i += 2
        if i + n > end:
            raise MalformedPacket(f"topic name length {n} runs past the end of the packet")
        raw = data[i:i + n]
        topic = _TOPICS.get(raw)  # a device publishes to the same topics again and again
        if topic is None:
            topic = _topic_name(raw)
        i += n
        packet_id = 0
        if qos:
            if i + 2 > end:
                raise MalformedPacket("packet ends inside packet identifier")
            packet_id = (data[i] << 8) | data[i + 1]
            if not packet_id:
                raise ProtocolError("PUBLISH with packet identifier 0")
            i += 2
        # (a call: in the compiled build the interpreted helper's slot stores cost less than
        # the generic attribute sets an inlined copy compiles to)
        return _wire_publish(topic, data[i:end], qos, flags & 1 != 0, dup, packet_id)

    def _ack_id(self, flags: int, expected: int, data: Buffer, i: int, end: int, name: str) -> int:
        _expect_flags(flags, expected, name)
        if end - i != 2:
            raise MalformedPacket(f"{name} must have a remaining length of 2")
        packet_id = (data[i] << 8) | data[i + 1]
        if not packet_id:
            raise ProtocolError(f"{name} with packet identifier 0")
        return packet_id

    def _puback(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        if flags or end - i != 2:
            return PubAck(self._ack_id(flags, 0, data, i, end, "PUBACK"))  # raises
        packet_id = (data[i] << 8) | data[i + 1]
        if not packet_id:
            raise ProtocolError("PUBACK with packet identifier 0")
        # PubAck(packet_id) through its slots' setters (once per QoS 1 delivery; here: an
        # interpreted helper doing the same costs more from the compiled build, unlike
        # wire_publish)
        packet = _new_object(PubAck)
        _set_ack_id(packet, packet_id)
        _set_ack_code(packet, 0)
        _set_ack_properties(packet, None)
        return packet

    def _pubrec(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        return PubRec(self._ack_id(flags, 0, data, i, end, "PUBREC"))

    def _pubrel(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        return PubRel(self._ack_id(self._v31_dup(flags), 2, data, i, end, "PUBREL"))

    def _v31_dup(self, flags: int) -> int:
        """MQTT 3.1 sets DUP on a PUBREL, SUBSCRIBE or UNSUBSCRIBE it sends again (3.1 section
        2.1, fixed header 0x6A / 0x8A / 0xAA); 3.1.1 made those flags reserved (0x2). The
        flags as 3.1.1 would have them: DUP cleared on a level-3 stream, kept otherwise."""
        if flags == 0x0A and self._level == PROTOCOL_31:
            return 0x02
        return flags

    def _pubcomp(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        return PubComp(self._ack_id(flags, 0, data, i, end, "PUBCOMP"))

    def _packet_id(self, data: Buffer, i: int, end: int, name: str) -> int:
        packet_id = _read_u16(data, i, end, "packet identifier")
        if not packet_id:
            raise ProtocolError(f"{name} with packet identifier 0")
        return packet_id

    def _subscribe(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        _expect_flags(self._v31_dup(flags), 2, "SUBSCRIBE")
        packet_id = self._packet_id(data, i, end, "SUBSCRIBE")
        i += 2
        subs = []
        while i < end:
            topic_filter, i = _read_str(data, i, end, "topic filter")
            if i >= end:
                raise MalformedPacket("SUBSCRIBE topic filter without requested QoS")
            options = data[i]
            i += 1
            if options & 0xFC:
                raise MalformedPacket(f"SUBSCRIBE options reserved bits set ({options:#04x})")
            if options == 3:
                raise MalformedPacket("SUBSCRIBE requested QoS 3")
            subs.append(Subscription(topic_filter, options))
        if not subs:
            raise ProtocolError("SUBSCRIBE without topic filters")
        return Subscribe(packet_id, tuple(subs))

    def _suback(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        _expect_flags(flags, 0, "SUBACK")
        packet_id = self._packet_id(data, i, end, "SUBACK")
        codes = tuple(data[i + 2:end])
        if not codes:
            raise ProtocolError("SUBACK without return codes")
        if self.protocol_level < PROTOCOL_5 and any(c not in (0, 1, 2, 0x80) for c in codes):
            raise MalformedPacket(f"SUBACK with a reserved return code in {codes}")
        return SubAck(packet_id, codes)

    def _unsubscribe(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        _expect_flags(self._v31_dup(flags), 2, "UNSUBSCRIBE")
        packet_id = self._packet_id(data, i, end, "UNSUBSCRIBE")
        i += 2
        filters = []
        while i < end:
            topic_filter, i = _read_str(data, i, end, "topic filter")
            filters.append(topic_filter)
        if not filters:
            raise ProtocolError("UNSUBSCRIBE without topic filters")
        return Unsubscribe(packet_id, tuple(filters))

    def _unsuback(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        return UnsubAck(self._ack_id(flags, 0, data, i, end, "UNSUBACK"))

    def _empty(self, flags: int, i: int, end: int, name: str) -> None:
        _expect_flags(flags, 0, name)
        if end != i:
            raise MalformedPacket(f"{name} must have a remaining length of 0")

    def _pingreq(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        self._empty(flags, i, end, "PINGREQ")
        return _PINGREQ

    def _pingresp(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        self._empty(flags, i, end, "PINGRESP")
        return _PINGRESP

    def _disconnect(self, flags: int, data: Buffer, i: int, end: int) -> Packet:
        self._empty(flags, i, end, "DISCONNECT")
        return _DISCONNECT


# the dispatch tables, indexed by packet type: 3.1/3.1.1 (and level 0, before CONNECT) and 5.0
Decoder._DECODERS = (
    Decoder._reserved, Decoder._connect, Decoder._connack, Decoder._publish, Decoder._puback,
    Decoder._pubrec, Decoder._pubrel, Decoder._pubcomp, Decoder._subscribe, Decoder._suback,
    Decoder._unsubscribe, Decoder._unsuback, Decoder._pingreq, Decoder._pingresp,
    Decoder._disconnect, Decoder._reserved,
)
Decoder._DECODERS_V5 = (
    Decoder._reserved, Decoder._connect, v5.connack, v5.publish, v5.puback, v5.pubrec,
    v5.pubrel, v5.pubcomp, v5.subscribe, v5.suback, v5.unsubscribe, v5.unsuback,
    Decoder._pingreq, Decoder._pingresp, v5.disconnect, v5.auth,
)

__all__ = ["MAX_PACKET_SIZE", "MAX_REMAINING_LENGTH", "PROTOCOL_5", "Decoder"]
