"""Fuzzing the decoder with hypothesis: arbitrary bytes, and packets of every type mutated.

Whatever the input, only packets or an ``MQTTError`` come out, the result does not depend on
how the bytes are split into reads, and a decoded packet survives encode -> decode unchanged
(``tools.fuzz.check_decoder`` checks all of this). How long an input takes is not checked
here: on a loaded machine that says nothing about the decoder; ``python -m tools.fuzz``
(which runs the same checks on millions of inputs) keeps its hang limit.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqttd.codec import Decoder, MQTTError, PacketTooLarge
from mqttd.codec.packets import (
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
from tools.fuzz import (
    CORRUPT_LENGTHS,
    FILTER_LEVELS,
    LEVELS,
    MAX_PACKET_SIZES,
    MUTATION_OPS,
    apply_mutations,
    check_decoder,
    decode_stream,
)

EXAMPLES = int(os.environ.get("MQTTD_FUZZ_EXAMPLES", "300"))
HANG_S = math.inf  # no time limit: the outcome must not depend on the machine's speed

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies -----------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # encodable as UTF-8
topics = st.one_of(
    st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join),
    text,
)
filters = st.one_of(
    st.lists(st.sampled_from(FILTER_LEVELS), min_size=1, max_size=4).map("/".join),
    text,
)
packet_ids = st.one_of(st.sampled_from((1, 2, 3, 65535)), st.integers(0, 65535))
payloads = st.binary(max_size=40)
qos = st.integers(0, 2)

wills = st.builds(Will, topics, payloads, qos, st.booleans())
connects = st.builds(
    Connect,
    client_id=text,
    clean_session=st.booleans(),
    keepalive_s=st.integers(0, 65535),
    protocol_level=st.sampled_from((3, 4)),
    will=st.none() | wills,
    username=st.none() | text,
    password=st.none() | st.binary(max_size=8),
)
publishes = st.builds(
    Publish,
    topic=topics,
    payload=payloads,
    qos=st.integers(0, 3),  # 3 is malformed
    retain=st.booleans(),
    dup=st.booleans(),
    packet_id=packet_ids,
)
subscribes = st.builds(
    Subscribe,
    packet_ids,
    st.lists(st.builds(Subscription, filters, st.integers(0, 3)), max_size=3).map(tuple),
)
unsubscribes = st.builds(Unsubscribe, packet_ids, st.lists(filters, max_size=3).map(tuple))
acks = st.builds(
    lambda cls, packet_id: cls(packet_id),
    st.sampled_from((PubAck, PubRec, PubRel, PubComp, UnsubAck)),
    packet_ids,
)
server_packets = st.one_of(
    st.builds(ConnAck, st.booleans(), st.integers(0, 6)),
    st.builds(
        SubAck, packet_ids,
        st.lists(st.sampled_from((0, 1, 2, 0x80, 3)), max_size=3).map(tuple),
    ),
)
packets = st.one_of(
    connects, publishes, publishes, subscribes, unsubscribes, acks, server_packets,
    st.sampled_from((PingReq(), PingResp(), Disconnect())),
)
encoded = packets.map(lambda p: p.encode())
mutations = st.lists(
    st.tuples(st.integers(0, MUTATION_OPS - 1), st.integers(0, 65535), st.integers(0, 65535)),
    min_size=1, max_size=4,
)
cut_lists = st.lists(st.integers(0, 400), max_size=6)
sizes = st.sampled_from(MAX_PACKET_SIZES)


# -- properties -----------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=300), cut_lists, sizes)
def test_arbitrary_bytes(data: bytes, cuts: list[int], size: int) -> None:
    check_decoder(data, cuts, size, HANG_S)


@fuzz
@given(st.sampled_from(range(256)), st.binary(max_size=40), cut_lists, sizes)
def test_every_first_byte(first: int, rest: bytes, cuts: list[int], size: int) -> None:
    check_decoder(bytes((first,)) + rest, cuts, size, HANG_S)


@fuzz
@given(st.lists(encoded, min_size=1, max_size=4), st.data(), mutations, encoded, cut_lists, sizes)
def test_mutated_packets(
    parts: list[bytes], data: st.DataObject, ops: list[tuple[int, int, int]], other: bytes,
    cuts: list[int], size: int,
) -> None:
    """Bit flips, interesting bytes, insertions, deletions, truncation, another Remaining
    Length, another type/flags nibble, a duplicated slice, a splice, in one packet of a stream."""
    k = data.draw(st.integers(0, len(parts) - 1))
    parts[k] = apply_mutations(parts[k], ops, other)
    check_decoder(b"".join(parts), cuts, size, HANG_S)


@fuzz
@given(
    st.lists(encoded, min_size=1, max_size=3), st.data(),
    st.one_of(st.sampled_from(CORRUPT_LENGTHS), st.integers(0, 268_435_455).map(encode_varint),
              st.binary(min_size=1, max_size=5)),
    cut_lists, sizes,
)
def test_corrupted_remaining_length(
    parts: list[bytes], data: st.DataObject, length: bytes, cuts: list[int], size: int
) -> None:
    k = data.draw(st.integers(0, len(parts) - 1))
    packet = parts[k]
    end = 1
    while end < len(packet) and end < 5 and packet[end] & 0x80:
        end += 1
    parts[k] = packet[:1] + length + packet[end + 1 :]
    check_decoder(b"".join(parts), cuts, size, HANG_S)


@fuzz
@given(encoded, encoded, st.integers(0, 300), st.integers(0, 300), encoded, cut_lists)
def test_spliced_packets(
    a: bytes, b: bytes, i: int, j: int, after: bytes, cuts: list[int]
) -> None:
    """The head of one packet joined to the tail of another (then a whole packet)."""
    check_decoder(a[: i % (len(a) + 1)] + b[j % (len(b) + 1) :] + after, cuts, hang_s=HANG_S)


@fuzz
@given(st.lists(encoded, min_size=1, max_size=4), mutations, st.integers(0, 2000), sizes)
def test_truncation_gives_a_prefix(
    parts: list[bytes], ops: list[tuple[int, int, int]], cut: int, size: int
) -> None:
    """Reading less of a stream never gives other packets, or another error, than reading all
    of it: what ``data[:k]`` decodes to is a prefix of what ``data`` decodes to."""
    data = apply_mutations(b"".join(parts), ops[:1])
    full, full_error, _ = check_decoder(data, (), size, HANG_S)
    head, head_error, _ = check_decoder(data[: cut % (len(data) + 1)], (), size, HANG_S)
    assert head == full[: len(head)]
    if head_error is not None:
        assert (head, head_error) == (full, full_error)


@fuzz
@given(st.lists(encoded, min_size=1, max_size=5))
def test_byte_by_byte_equals_whole(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert decode_stream(data, range(1, len(data)), 268_435_460) == decode_stream(
        data, (), 268_435_460
    )


@fuzz
@given(st.integers(0, 15), st.integers(2, 300), st.integers(0, 268_435_455))
def test_too_large_is_refused_from_the_fixed_header_alone(
    kind: int, limit: int, length: int
) -> None:
    """A Remaining Length above max_packet_size is refused before the body is buffered."""
    header = bytes((kind << 4,)) + encode_varint(length)
    decoder = Decoder(limit)
    if len(header) + length <= limit:
        try:
            decoder.feed(header)
        except MQTTError:
            pass
        return
    with pytest.raises(PacketTooLarge):
        decoder.feed(header)  # the header alone: no body was ever given to buffer
