"""Wire primitives shared by the encoders and decoders: Variable Byte Integers, two-byte
integers, UTF-8 strings and binary data (5.0 section 1.5, 3.1.1 section 1.5); and the 3.1.1
PUBLISH encoder of the delivery path (here, and not with the packets, because this module is
compiled with mypyc and the packets' module is not: see mqttd.build_info)."""

from __future__ import annotations

from mqttd.codec.errors import MalformedPacket

# What the decoders read: bytes only, so that the compiled build indexes and slices it
# without a generic call per access (Decoder.feed turns a bytearray into bytes first)
Buffer = bytes

MAX_VARINT = 268_435_455


def encode_varint(n: int) -> bytes:
    """Encode a Variable Byte Integer (1-4 bytes); ``n`` must be below 268435456."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def encode_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(2, "big") + b


def encode_bin(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def read_u16(data: Buffer, i: int, end: int, what: str) -> int:
    if i + 2 > end:
        raise MalformedPacket(f"packet ends inside {what}")
    return (data[i] << 8) | data[i + 1]


def read_varint(data: Buffer, i: int, end: int, what: str) -> tuple[int, int]:
    """A Variable Byte Integer at ``i`` (at most four bytes) and the index after it."""
    value = 0
    shift = 0
    for k in range(4):
        if i + k >= end:
            raise MalformedPacket(f"packet ends inside {what}")
        byte = data[i + k]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + k + 1
        shift += 7
    raise MalformedPacket(f"{what} is longer than four bytes")


def read_bin(data: Buffer, i: int, end: int, what: str) -> tuple[bytes, int]:
    n = read_u16(data, i, end, what)
    i += 2
    if i + n > end:
        raise MalformedPacket(f"{what} length {n} runs past the end of the packet")
    return data[i:i + n], i + n


def read_str(data: Buffer, i: int, end: int, what: str) -> tuple[str, int]:
    raw, i = read_bin(data, i, end, what)
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not valid UTF-8") from None
    if "\x00" in s:
        raise MalformedPacket(f"{what} contains U+0000")
    return s, i


def expect_flags(flags: int, expected: int, name: str) -> None:
    if flags != expected:
        raise MalformedPacket(f"{name} with reserved flags {flags:#06b}")


# Heads of 3.1.1 PUBLISHes by topic, then by first byte and payload size (one int): a device
# publishes to the same topic with payloads of the same size again and again, so the head
# is built once. (Two lookups with a str key whose hash is kept and a small int, cheaper
# than one with a (topic, first, size) tuple, which is built, hashed and compared.)
_HEADS: dict[str, dict[int, bytes]] = {}
_MAX_HEADS = 4096
_heads_count = 0  # heads in _HEADS, all topics


def encode_publish_parts(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool = False
) -> tuple[bytes, bytes]:
    """Encode a PUBLISH once as ``(head, tail)``; the packet is ``head + packet_id + tail``
    for QoS > 0 (two bytes) and ``head + tail`` for QoS 0. The parts are shared by every
    subscriber the message goes to; only the packet id differs."""
    global _heads_count
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    key = (len(payload) << 8) | first
    heads = _HEADS.get(topic)
    head = heads.get(key) if heads is not None else None
    if head is None:
        t = topic.encode("utf-8")
        remaining = 2 + len(t) + len(payload) + (2 if qos else 0)
        head = bytes((first,)) + encode_varint(remaining) + len(t).to_bytes(2, "big") + t
        if _heads_count >= _MAX_HEADS:
            _HEADS.clear()
            _heads_count = 0
            heads = None
        if heads is None:
            heads = _HEADS[topic] = {}
        heads[key] = head
        _heads_count += 1
    return head, payload
