"""Hypothesis round trips through the parser.

Server-side encoders (``encode_msg``, ``encode_info``, ``encode_err``) turn event values into
bytes the parser must give back, alone, several in a row and cut into arbitrary chunks. The
client-side PUB/HPUB encoder is round-tripped by turning its control line into the MSG/HMSG
a server would deliver for it (``PUB s [r] n`` -> ``MSG s <sid> [r] n``): the framing,
sizes, header block and payload must survive unchanged.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mqttd.cluster import nats_protocol as proto
from mqttd.cluster.nats_protocol import (
    OK_EVENT,
    PING_EVENT,
    PONG_EVENT,
    Err,
    Event,
    Info,
    Msg,
    NatsParser,
)

SETTINGS = settings(max_examples=200, deadline=None)
STREAM_SETTINGS = settings(max_examples=100, deadline=None)
BYTEWISE_SETTINGS = settings(max_examples=50, deadline=None)

# a subject token: no whitespace, no '.', no control characters, not a wildcard
token_chars = st.characters(
    exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), exclude_characters=".*>\x85"
)
tokens = st.text(token_chars, min_size=1, max_size=8)
subjects = st.lists(tokens, min_size=1, max_size=5).map(".".join)
sids = st.integers(min_value=1, max_value=10**12 - 1)  # the parser takes 12 digits
payloads = st.binary(max_size=300)
header_keys = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1, max_size=12,
)
# values are stripped on decoding: no leading or trailing whitespace, no CR or LF
header_values = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters="\x85"),
    max_size=20,
).map(str.strip)
headers = st.dictionaries(header_keys, st.lists(header_values, min_size=1, max_size=3),
                          max_size=5)
statuses = st.one_of(st.none(), st.integers(100, 999))
descriptions = header_values


@st.composite
def msgs(draw: st.DrawFn) -> Msg:
    subject, sid, payload = draw(subjects), draw(sids), draw(payloads)
    reply = draw(st.one_of(st.none(), subjects))
    kind = draw(st.sampled_from(["MSG", "HMSG", "HMSG-status"]))
    if kind == "MSG":
        return Msg(subject, sid, reply, payload)
    if kind == "HMSG":
        return Msg(subject, sid, reply, payload, draw(headers))
    status = draw(st.integers(100, 999))
    return Msg(subject, sid, reply, payload, draw(headers), status, draw(descriptions))


json_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                        st.text(max_size=10))
infos = st.dictionaries(st.text(max_size=10), json_values, max_size=6).map(Info)
errs = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters="'\x85"),
    max_size=40,
).map(str.strip).map(Err)
events = st.one_of(msgs(), infos, errs, st.sampled_from([PING_EVENT, PONG_EVENT, OK_EVENT]))


def encode(event: Event) -> bytes:
    """The server's encoding of ``event`` (test-side, through the module's server encoders)."""
    if isinstance(event, Msg):
        if event.headers is None and event.status is None:
            return proto.encode_msg(event.subject, event.sid, event.payload, event.reply)
        return proto.encode_msg(event.subject, event.sid, event.payload, event.reply,
                                event.headers or {}, event.status, event.description)
    if isinstance(event, Info):
        return proto.encode_info(event.data)
    if isinstance(event, Err):
        return proto.encode_err(event.text)
    return {PING_EVENT: proto.PING, PONG_EVENT: proto.PONG, OK_EVENT: proto.OK}[event]


def delivered(pub: bytes, sid: int) -> bytes:
    """What a server sends a subscriber for the client's PUB/HPUB ``pub``."""
    line, _, rest = pub.partition(b"\r\n")
    op, subject, *args = line.split(b" ")
    head = b" ".join([b"MSG" if op == b"PUB" else b"HMSG", subject, b"%d" % sid, *args])
    return head + b"\r\n" + rest


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@SETTINGS
@given(msgs())
def test_msg_round_trip(msg: Msg) -> None:
    parser = NatsParser()
    assert parser.feed(encode(msg)) == [msg]
    assert parser.buffered == 0


@SETTINGS
@given(subjects, sids, payloads, st.one_of(st.none(), subjects), st.one_of(st.none(), headers))
def test_pub_round_trip(
    subject: str, sid: int, payload: bytes, reply: str | None, hdrs: proto.Headers | None
) -> None:
    wire = delivered(proto.pub(subject, payload, reply, hdrs), sid)
    expected = Msg(subject, sid, reply, payload, None if hdrs is None else hdrs)
    assert NatsParser().feed(wire) == [expected]


@SETTINGS
@given(headers, statuses, descriptions)
def test_headers_round_trip(hdrs: proto.Headers, status: int | None, description: str) -> None:
    block = proto.encode_headers(hdrs, status, description)
    assert proto.decode_headers(block) == (
        hdrs, status, description if status is not None else ""
    )


@SETTINGS
@given(infos)
def test_info_round_trip(info: Info) -> None:
    assert NatsParser().feed(encode(info)) == [info]


@SETTINGS
@given(errs)
def test_err_round_trip(err: Err) -> None:
    assert NatsParser().feed(encode(err)) == [err]


@STREAM_SETTINGS
@given(st.lists(events, min_size=1, max_size=10), st.lists(st.integers(0, 10_000), max_size=8))
def test_streams_cut_anywhere(stream: list[Event], points: list[int]) -> None:
    data = b"".join(encode(e) for e in stream)
    parser = NatsParser()
    out: list[Event] = []
    for chunk in cut(data, points):
        out += parser.feed(chunk)
    assert out == stream
    assert parser.buffered == 0


@BYTEWISE_SETTINGS
@given(st.lists(msgs(), min_size=1, max_size=5))
def test_stream_byte_by_byte(stream: list[Msg]) -> None:
    data = b"".join(encode(e) for e in stream)
    parser = NatsParser()
    out: list[Event] = []
    for b in data:
        out += parser.feed(bytes([b]))
    assert out == stream
