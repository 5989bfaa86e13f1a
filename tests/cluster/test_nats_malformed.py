"""Malformed server input: the exact error each gets, fed whole and byte by byte."""

from __future__ import annotations

import pytest

from mqttd.cluster.nats_protocol import PING_EVENT, Msg, NatsParser, ProtocolError


def hmsg(block: bytes, payload: bytes = b"") -> bytes:
    """An HMSG whose sizes match ``block`` (so only the block is wrong)."""
    n = len(block)
    return b"HMSG a 1 %d %d\r\n" % (n, n + len(payload)) + block + payload + b"\r\n"


# (id, wire bytes, the error message)
CASES = [
    # -- control lines -------------------------------------------------------------------
    ("unknown-operation", b"FOO bar\r\n", "unknown operation b'FOO'"),
    ("pub-from-server", b"PUB a 0\r\n\r\n", "unknown operation b'PUB'"),
    ("empty-line", b"\r\n", "empty control line"),
    ("blank-line", b"  \r\n", "empty control line"),
    ("ping-with-argument", b"PING x\r\n", "unexpected arguments after PING: b'PING x'"),
    ("ok-with-argument", b"+OK 1\r\n", "unexpected arguments after +OK: b'+OK 1'"),
    ("info-not-json", b"INFO {\r\n", "INFO is not JSON: b'{'"),
    ("info-not-object", b"INFO [1]\r\n", "INFO is not a JSON object: b'[1]'"),
    ("info-empty", b"INFO\r\n", "INFO is not JSON: b''"),
    ("err-not-utf8", b"-ERR '\xff'\r\n", "-ERR text is not valid UTF-8: b\"'\\xff'\""),
    ("control-line-too-long", b"MSG " + b"a" * 4100, "control line longer than 4096 bytes"),
    ("control-line-too-long-crlf-late", b"INFO " + b" " * 4092 + b"{}\r\n",
     "control line longer than 4096 bytes"),
    # -- MSG -----------------------------------------------------------------------------
    ("msg-2-args", b"MSG a 1\r\n", "MSG needs 3 or 4 arguments, got 2"),
    ("msg-5-args", b"MSG a 1 r x 3\r\n", "MSG needs 3 or 4 arguments, got 5"),
    ("msg-size-word", b"MSG a 1 x\r\n", "message size is not a number: b'x'"),
    ("msg-size-negative", b"MSG a 1 -1\r\n", "message size is not a number: b'-1'"),
    ("msg-size-plus", b"MSG a 1 +1\r\nx\r\n", "message size is not a number: b'+1'"),
    ("msg-size-underscore", b"MSG a 1 1_0\r\n", "message size is not a number: b'1_0'"),
    ("msg-size-13-digits", b"MSG a 1 1234567890123\r\n",
     "message size is not a number: b'1234567890123'"),
    ("msg-sid-word", b"MSG a x 1\r\nx\r\n", "sid is not a number: b'x'"),
    ("msg-sid-word-before-payload", b"MSG a x 5\r\nab", "sid is not a number: b'x'"),
    ("msg-payload-longer", b"MSG a 1 1\r\nxy\r\n", "message payload not followed by CRLF"),
    ("msg-payload-shorter", b"MSG a 1 3\r\nx\r\nPING\r\n", "message payload not followed by CRLF"),
    ("msg-payload-lf-only", b"MSG a 1 1\r\nx\nMSG", "message payload not followed by CRLF"),
    ("msg-above-max-payload", b"MSG a 1 1048577\r\n",
     "message of 1048577 bytes exceeds max_payload 1048576"),
    ("msg-subject-not-utf8", b"MSG \xff 1 0\r\n\r\n", "subject is not valid UTF-8: b'\\xff'"),
    ("msg-reply-not-utf8", b"MSG a 1 \xfe 0\r\n\r\n",
     "reply subject is not valid UTF-8: b'\\xfe'"),
    # -- HMSG ----------------------------------------------------------------------------
    ("hmsg-3-args", b"HMSG a 1 3\r\n", "HMSG needs 4 or 5 arguments, got 3"),
    ("hmsg-6-args", b"HMSG a 1 r x 12 12\r\n", "HMSG needs 4 or 5 arguments, got 6"),
    ("hmsg-header-size-word", b"HMSG a 1 x 12\r\n", "HMSG header size is not a number: b'x'"),
    ("hmsg-header-above-total", b"HMSG a 1 20 10\r\n", "HMSG header size 20 > total size 10"),
    ("hmsg-header-above-total-complete", b"HMSG a 1 13 12\r\nNATS/1.0\r\n\r\n\r\n",
     "HMSG header size 13 > total size 12"),
    ("hmsg-above-max-payload", b"HMSG a 1 12 1048577\r\n",
     "message of 1048577 bytes exceeds max_payload 1048576"),
    ("hmsg-not-nats", hmsg(b"HTTP/1.0\r\n\r\n"),
     "header block does not start with NATS/1.0: b'HTTP/1.0\\r\\n\\r\\n'"),
    ("hmsg-no-empty-line", hmsg(b"NATS/1.0\r\n"), "header block does not end with an empty line"),
    ("hmsg-header-size-cuts-block", b"HMSG a 1 12 14\r\nNATS/1.0\r\nA:\r\n\r\n",
     "header block does not end with an empty line"),
    ("hmsg-version-glued", hmsg(b"NATS/1.01\r\n\r\n"), "bad header version line b'NATS/1.01'"),
    ("hmsg-status-letters", hmsg(b"NATS/1.0 5O3\r\n\r\n"),
     "bad status code in b'NATS/1.0 5O3'"),
    ("hmsg-status-2-digits", hmsg(b"NATS/1.0 50\r\n\r\n"), "bad status code in b'NATS/1.0 50'"),
    ("hmsg-status-4-digits", hmsg(b"NATS/1.0 5030\r\n\r\n"),
     "bad status code in b'NATS/1.0 5030'"),
    ("hmsg-line-without-colon", hmsg(b"NATS/1.0\r\nAB\r\n\r\n"), "bad header line b'AB'"),
    ("hmsg-empty-key", hmsg(b"NATS/1.0\r\n: v\r\n\r\n"), "bad header line b': v'"),
    ("hmsg-key-with-space", hmsg(b"NATS/1.0\r\nA B: v\r\n\r\n"), "bad header line b'A B: v'"),
    ("hmsg-key-leading-space", hmsg(b"NATS/1.0\r\n A: v\r\n\r\n"), "bad header line b' A: v'"),
    ("hmsg-empty-line-inside", hmsg(b"NATS/1.0\r\n\r\nA: v\r\n\r\n"), "bad header line b''"),
    ("hmsg-value-not-utf8", hmsg(b"NATS/1.0\r\nA: \xff\r\n\r\n"),
     "header value is not valid UTF-8: b'\\xff'"),
    ("hmsg-description-not-utf8", hmsg(b"NATS/1.0 404 \xff\r\n\r\n"),
     "status description is not valid UTF-8: b'\\xff'"),
]

PARAMS = [pytest.param(wire, message, id=name) for name, wire, message in CASES]


@pytest.mark.parametrize(("wire", "message"), PARAMS)
def test_whole(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        NatsParser().feed(wire)
    assert str(info.value) == message


@pytest.mark.parametrize(("wire", "message"), PARAMS)
def test_byte_by_byte(wire: bytes, message: str) -> None:
    """The same error, at the latest on the last byte, and no event before it."""
    parser = NatsParser()
    with pytest.raises(ProtocolError) as info:
        for b in wire:
            assert parser.feed(bytes([b])) == []
    assert str(info.value) == message


@pytest.mark.parametrize(("wire", "message"), PARAMS)
def test_events_before_the_error_are_kept(wire: bytes, message: str) -> None:
    good = b"PING\r\nMSG a 1 1\r\nx\r\n"
    with pytest.raises(ProtocolError) as info:
        NatsParser().feed(good + wire)
    assert str(info.value) == message
    assert info.value.events_before == [PING_EVENT, Msg("a", 1, None, b"x")]


def test_max_payload_is_refused_before_the_payload_arrives() -> None:
    parser = NatsParser(max_payload=10)
    assert parser.feed(b"MSG a 1 10\r\n0123456789\r\n") == [Msg("a", 1, None, b"0123456789")]
    with pytest.raises(ProtocolError, match="message of 11 bytes exceeds max_payload 10"):
        parser.feed(b"MSG a 1 11\r\n")


def test_control_line_limit_is_configurable() -> None:
    assert NatsParser(max_control_line=10).feed(b"MSG a 1 0\r\n\r\n") == [Msg("a", 1, None, b"")]
    assert NatsParser(max_control_line=9).feed(b"MSG a 1 0\r\n\r\n") == [Msg("a", 1, None, b"")]
    with pytest.raises(ProtocolError, match="control line longer than 8 bytes"):
        NatsParser(max_control_line=8).feed(b"MSG a 1 0\r\n\r\n")
