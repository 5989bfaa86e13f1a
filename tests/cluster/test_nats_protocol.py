"""Every server-to-client operation against hand-written bytes, parsed three ways, and the
client-side encoders against hand-written bytes.

The bytes follow the NATS client protocol reference (docs.nats.io, "Client Protocol") and
what nats-server 2.9.10 was seen to send (two spaces where the reply subject is empty,
a space after INFO's JSON, ``NATS/1.0 503`` with no description). Every case is checked:

* whole: one ``feed`` gives ``[event]`` and leaves nothing buffered;
* byte by byte: nothing until the last byte, the buffered count grows by one each time;
* with trailing bytes: the bytes followed by the first ``k`` bytes of another operation
  give ``[event]`` with ``k`` bytes buffered; the rest completes the second one.
"""

from __future__ import annotations

import pytest

from mqttd.cluster import nats_protocol as proto
from mqttd.cluster.nats_protocol import (
    OK_EVENT,
    PING_EVENT,
    PONG_EVENT,
    Err,
    Info,
    InvalidHeader,
    InvalidSubject,
    Msg,
    NatsParser,
)

CASES: list[tuple[str, object, bytes]] = [
    # -- INFO --------------------------------------------------------------------------
    ("info", Info({"server_id": "S", "max_payload": 1048576, "headers": True}),
     b'INFO {"server_id":"S","max_payload":1048576,"headers":true}\r\n'),
    ("info-trailing-space", Info({"version": "2.9.10"}), b'INFO {"version":"2.9.10"} \r\n'),
    ("info-lowercase", Info({}), b"info {}\r\n"),
    # -- MSG -----------------------------------------------------------------------------
    ("msg", Msg("foo.bar", 9, None, b"Hello World"), b"MSG foo.bar 9 11\r\nHello World\r\n"),
    ("msg-reply", Msg("foo.bar", 9, "GREETING.34", b"Hello World"),
     b"MSG foo.bar 9 GREETING.34 11\r\nHello World\r\n"),
    ("msg-empty-reply-two-spaces", Msg("_INBOX.x.1", 1, None, b'{"seq":1}'),
     b'MSG _INBOX.x.1 1  9\r\n{"seq":1}\r\n'),
    ("msg-tabs", Msg("a", 2, "r", b"x"), b"MSG\ta\t2\tr\t1\r\nx\r\n"),
    ("msg-lowercase", Msg("a", 2, None, b"x"), b"msg a 2 1\r\nx\r\n"),
    ("msg-empty-payload", Msg("a", 1, None, b""), b"MSG a 1 0\r\n\r\n"),
    ("msg-payload-with-crlf", Msg("a", 1, None, b"\r\nMSG a 1 0\r\n"),
     b"MSG a 1 13\r\n\r\nMSG a 1 0\r\n\r\n"),
    ("msg-binary-payload", Msg("a", 1, None, bytes(range(256))),
     b"MSG a 1 256\r\n" + bytes(range(256)) + b"\r\n"),
    ("msg-utf8-subject", Msg("t.é", 1, None, b""), b"MSG t.\xc3\xa9 1 0\r\n\r\n"),
    # -- HMSG ----------------------------------------------------------------------------
    ("hmsg", Msg("foo", 1, None, b"hi", {"A": ["1"]}),
     b"HMSG foo 1 18 20\r\nNATS/1.0\r\nA: 1\r\n\r\nhi\r\n"),
    ("hmsg-reply", Msg("foo", 1, "r.1", b"hi", {"A": ["1"]}),
     b"HMSG foo 1 r.1 18 20\r\nNATS/1.0\r\nA: 1\r\n\r\nhi\r\n"),
    ("hmsg-repeated-key", Msg("foo", 1, None, b"", {"A": ["1", "2"], "B": ["x"]}),
     b"HMSG foo 1 30 30\r\nNATS/1.0\r\nA: 1\r\nA: 2\r\nB: x\r\n\r\n\r\n"),
    ("hmsg-keys-keep-case", Msg("foo", 1, None, b"", {"a": ["1"], "A": ["2"]}),
     b"HMSG foo 1 24 24\r\nNATS/1.0\r\na: 1\r\nA: 2\r\n\r\n\r\n"),
    ("hmsg-value-with-colon", Msg("foo", 1, None, b"", {"T": ["12:00:01"]}),
     b"HMSG foo 1 25 25\r\nNATS/1.0\r\nT: 12:00:01\r\n\r\n\r\n"),
    ("hmsg-value-no-space", Msg("foo", 1, None, b"", {"T": ["v"]}),
     b"HMSG foo 1 17 17\r\nNATS/1.0\r\nT:v\r\n\r\n\r\n"),
    ("hmsg-empty-value", Msg("foo", 1, None, b"", {"T": [""]}),
     b"HMSG foo 1 16 16\r\nNATS/1.0\r\nT:\r\n\r\n\r\n"),
    ("hmsg-no-headers", Msg("foo", 1, None, b"x", {}),
     b"HMSG foo 1 12 13\r\nNATS/1.0\r\n\r\nx\r\n"),
    ("hmsg-no-responders", Msg("_INBOX.x.1", 1, None, b"", {}, 503),
     b"HMSG _INBOX.x.1 1  16 16\r\nNATS/1.0 503\r\n\r\n\r\n"),
    ("hmsg-not-found", Msg("_INBOX.x.1", 1, None, b"", {}, 404, "Message Not Found"),
     b"HMSG _INBOX.x.1 1  34 34\r\nNATS/1.0 404 Message Not Found\r\n\r\n\r\n"),
    ("hmsg-request-timeout", Msg("_INBOX.x.2", 1, None, b"", {}, 408, "Request Timeout"),
     b"HMSG _INBOX.x.2 1 32 32\r\nNATS/1.0 408 Request Timeout\r\n\r\n\r\n"),
    ("hmsg-idle-heartbeat",
     Msg("_INBOX.w", 2, None, b"", {"Nats-Last-Consumer": ["2"], "Nats-Last-Stream": ["5"]},
         100, "Idle Heartbeat"),
     b"HMSG _INBOX.w 2  75 75\r\nNATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 2\r\n"
     b"Nats-Last-Stream: 5\r\n\r\n\r\n"),
    ("hmsg-flow-control", Msg("_INBOX.w", 2, "$JS.FC.S.x.1", b"", {}, 100, "FlowControl Request"),
     b"HMSG _INBOX.w 2 $JS.FC.S.x.1 36 36\r\nNATS/1.0 100 FlowControl Request\r\n\r\n\r\n"),
    ("hmsg-kv-delete", Msg("$KV.b.k2", 1, "$JS.ACK.KV_b.c.1.5.2.17.1", b"",
                           {"KV-Operation": ["DEL"]}),
     b"HMSG $KV.b.k2 1 $JS.ACK.KV_b.c.1.5.2.17.1 31 31\r\nNATS/1.0\r\nKV-Operation: DEL\r\n"
     b"\r\n\r\n"),
    # -- the rest ------------------------------------------------------------------------
    ("ping", PING_EVENT, b"PING\r\n"),
    ("pong", PONG_EVENT, b"PONG\r\n"),
    ("ping-lowercase", PING_EVENT, b"ping\r\n"),
    ("ok", OK_EVENT, b"+OK\r\n"),
    ("err", Err("Authorization Violation"), b"-ERR 'Authorization Violation'\r\n"),
    ("err-unquoted", Err("Stale Connection"), b"-ERR Stale Connection\r\n"),
    ("err-permissions", Err("Permissions Violation for Publish to foo"),
     b"-ERR 'Permissions Violation for Publish to foo'\r\n"),
]

PARAMS = [pytest.param(event, wire, id=name) for name, event, wire in CASES]

NEXT = Msg("next", 7, None, b"0123456789")
NEXT_WIRE = b"MSG next 7 10\r\n0123456789\r\n"


def test_next_bytes() -> None:
    assert NatsParser().feed(NEXT_WIRE) == [NEXT]


@pytest.mark.parametrize(("event", "wire"), PARAMS)
def test_parse_whole(event: object, wire: bytes) -> None:
    parser = NatsParser()
    assert parser.feed(wire) == [event]
    assert parser.buffered == 0


@pytest.mark.parametrize(("event", "wire"), PARAMS)
def test_parse_whole_from_bytearray_and_memoryview(event: object, wire: bytes) -> None:
    assert NatsParser().feed(bytearray(wire)) == [event]
    assert NatsParser().feed(memoryview(wire)) == [event]


@pytest.mark.parametrize(("event", "wire"), PARAMS)
def test_parse_byte_by_byte(event: object, wire: bytes) -> None:
    parser = NatsParser()
    for n, b in enumerate(wire[:-1], start=1):
        assert parser.feed(bytes([b])) == [], f"an event came out after {n} of {len(wire)}"
        assert parser.buffered == n
    assert parser.feed(wire[-1:]) == [event]
    assert parser.buffered == 0


@pytest.mark.parametrize(("event", "wire"), PARAMS)
def test_parse_with_trailing_bytes(event: object, wire: bytes) -> None:
    for k in range(1, len(NEXT_WIRE)):
        parser = NatsParser()
        assert parser.feed(wire + NEXT_WIRE[:k]) == [event], f"k={k}"
        assert parser.buffered == k
        assert parser.feed(NEXT_WIRE[k:]) == [NEXT], f"k={k}"
        assert parser.buffered == 0


@pytest.mark.parametrize(("event", "wire"), PARAMS)
def test_parse_with_trailing_bytes_from_reused_bytearray(event: object, wire: bytes) -> None:
    """The caller may reuse its read buffer: what the parser keeps must be a copy."""
    parser = NatsParser()
    chunk = bytearray(wire + NEXT_WIRE[:3])
    assert parser.feed(chunk) == [event]
    chunk[:] = b"\xff" * len(chunk)
    assert parser.feed(NEXT_WIRE[3:]) == [NEXT]


@pytest.mark.parametrize(("event", "wire"), PARAMS)
def test_parse_split_then_trailing_bytes(event: object, wire: bytes) -> None:
    for k in (1, len(wire) // 2, len(wire) - 1):
        for j in (1, len(NEXT_WIRE) - 1):
            parser = NatsParser()
            assert parser.feed(wire[:k]) == []
            assert parser.feed(wire[k:] + NEXT_WIRE[:j]) == [event], f"k={k} j={j}"
            assert parser.buffered == j
            assert parser.feed(NEXT_WIRE[j:]) == [NEXT]


def test_every_case_in_one_feed_in_order() -> None:
    wire = b"".join(w for _, _, w in CASES)
    assert NatsParser().feed(wire) == [e for _, e, _ in CASES]


def test_msg_header_lookup() -> None:
    msg = Msg("a", 1, None, b"", {"A": ["1", "2"]})
    assert msg.header("A") == "1"
    assert msg.header("a") is None
    assert Msg("a", 1, None, b"").header("A") is None


def test_payload_at_max_payload_is_accepted() -> None:
    parser = NatsParser(max_payload=4)
    assert parser.feed(b"MSG a 1 4\r\nabcd\r\n") == [Msg("a", 1, None, b"abcd")]


def test_long_control_line_within_the_limit() -> None:
    subject = "a" * 4000
    wire = f"MSG {subject} 1 0\r\n\r\n".encode()
    assert NatsParser().feed(wire) == [Msg(subject, 1, None, b"")]


# -- encoders --------------------------------------------------------------------------------

ENCODED = [
    ("pub", proto.pub("foo", b"Hello NATS!"), b"PUB foo 11\r\nHello NATS!\r\n"),
    ("pub-reply", proto.pub("frontend.help", b"help", "INBOX.22"),
     b"PUB frontend.help INBOX.22 4\r\nhelp\r\n"),
    ("pub-empty", proto.pub("notify"), b"PUB notify 0\r\n\r\n"),
    ("hpub", proto.pub("FOO", b"Hello NATS!", headers={"Bar": "Baz"}),
     b"HPUB FOO 22 33\r\nNATS/1.0\r\nBar: Baz\r\n\r\nHello NATS!\r\n"),
    ("hpub-reply-multi", proto.pub("FRONT.DOOR", b"Knock Knock", "JOKE.22",
                                   {"BREAKFAST": ["donut", "eggs"]}),
     b"HPUB FRONT.DOOR JOKE.22 47 58\r\nNATS/1.0\r\nBREAKFAST: donut\r\nBREAKFAST: eggs\r\n"
     b"\r\nKnock Knock\r\n"),
    ("hpub-empty-headers", proto.pub("a", b"x", headers={}),
     b"HPUB a 12 13\r\nNATS/1.0\r\n\r\nx\r\n"),
    ("hpub-preencoded", proto.pub("a", b"", headers=b"NATS/1.0\r\nK: v\r\n\r\n"),
     b"HPUB a 18 18\r\nNATS/1.0\r\nK: v\r\n\r\n\r\n"),
    ("sub", proto.sub("FOO", 1), b"SUB FOO 1\r\n"),
    ("sub-queue", proto.sub("BAR", 44, "G1"), b"SUB BAR G1 44\r\n"),
    ("sub-wildcards", proto.sub("a.*.>", 3), b"SUB a.*.> 3\r\n"),
    ("unsub", proto.unsub(1), b"UNSUB 1\r\n"),
    ("unsub-max", proto.unsub(1, 5), b"UNSUB 1 5\r\n"),
    ("connect", proto.connect({"verbose": False, "headers": True, "name": "n1"}),
     b'CONNECT {"verbose":false,"headers":true,"name":"n1"}\r\n'),
    ("ping", proto.PING, b"PING\r\n"),
    ("pong", proto.PONG, b"PONG\r\n"),
    ("headers-status", proto.encode_headers({"A": "1"}, 404, "Message Not Found"),
     b"NATS/1.0 404 Message Not Found\r\nA: 1\r\n\r\n"),
]


@pytest.mark.parametrize(("encoded", "wire"), [pytest.param(e, w, id=n) for n, e, w in ENCODED])
def test_encode(encoded: bytes, wire: bytes) -> None:
    assert encoded == wire


SUBJECTS = [
    # (subject, ok to publish, ok to subscribe)
    ("a", True, True),
    ("a.b.c", True, True),
    ("$JS.API.STREAM.CREATE.KV_b", True, True),
    ("_INBOX.abc-_=", True, True),
    ("t.é", True, True),
    ("a*b.c>", True, True),  # wildcards only as whole tokens
    ("a.*", False, True),
    ("*", False, True),
    ("a.>", False, True),
    (">", False, True),
    ("a.>.b", False, False),
    ("", False, False),
    (".a", False, False),
    ("a.", False, False),
    ("a..b", False, False),
    ("a b", False, False),
    ("a\tb", False, False),
    ("a\r\nPUB", False, False),
    ("a\u2003b", False, False),
]


@pytest.mark.parametrize(("subject", "publish", "subscribe"), SUBJECTS)
def test_subject_validation(subject: str, publish: bool, subscribe: bool) -> None:
    for wildcards, ok in ((False, publish), (True, subscribe)):
        if ok:
            proto.check_subject(subject, wildcards=wildcards)
        else:
            with pytest.raises(InvalidSubject):
                proto.check_subject(subject, wildcards=wildcards)


def test_encoders_validate_subjects() -> None:
    with pytest.raises(InvalidSubject, match="wildcard"):
        proto.pub("a.*", b"")
    with pytest.raises(InvalidSubject, match="whitespace"):
        proto.pub("a", b"", reply="r x")
    with pytest.raises(InvalidSubject, match="not the last token"):
        proto.sub("a.>.b", 1)
    with pytest.raises(InvalidSubject, match="queue"):
        proto.sub("a", 1, "g 1")
    with pytest.raises(ValueError, match="sid"):
        proto.sub("a", 0)
    with pytest.raises(ValueError, match="max_msgs"):
        proto.unsub(1, -1)


@pytest.mark.parametrize(
    "headers",
    [
        {"": "v"},
        {"A B": "v"},
        {"A:B": "v"},
        {"Ä": "v"},
        {"A": "v\r\nB: w"},
        {"A": "v\n"},
        {"A": " v"},
        {"A": ["ok", "bad\r"]},
    ],
)
def test_bad_headers_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidHeader):
        proto.encode_headers(headers)


def test_bad_status_and_preencoded_block_are_refused() -> None:
    with pytest.raises(InvalidHeader):
        proto.encode_headers(None, 42)
    with pytest.raises(InvalidHeader):
        proto.pub("a", b"", headers=b"A: 1\r\n\r\n")
