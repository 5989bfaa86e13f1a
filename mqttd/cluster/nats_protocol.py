"""The NATS client protocol, sans-IO: a parser for what a server sends, encoders for what a
client sends. No trio, no sockets.

Wire format (https://docs.nats.io/reference/reference-protocols/nats-protocol): every
operation is a control line ended by CRLF, fields separated by spaces or tabs (servers send
two spaces where an optional field is empty: ``MSG subj 1  5``), operation names are case
insensitive. ``MSG <subject> <sid> [reply-to] <#bytes>`` and ``HMSG <subject> <sid>
[reply-to] <#header bytes> <#total bytes>`` are followed by that many bytes and a CRLF. A
header block is ``NATS/1.0[ <status>[ <description>]]\\r\\n`` then ``Key: Value\\r\\n`` lines
(a key may repeat) and an empty line; a status (503 no responders, 404, 408, 100 idle
heartbeat or flow control) has no payload of its own.

:class:`NatsParser` decodes in batches from one buffer with an offset and rejects a message
above ``max_payload`` as soon as its control line is read, before buffering the payload.
Bad bytes raise :class:`ProtocolError` carrying the events decoded before them; the
connection is then closed. Encoders validate subjects (no whitespace, no empty token,
wildcards only in SUB) and header keys and values, raising ``ValueError`` subclasses:
those are the caller's mistakes, not the peer's.

``sid`` is an integer here: the client assigns them and the server echoes them back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

CRLF = b"\r\n"
PING = b"PING\r\n"
PONG = b"PONG\r\n"
OK = b"+OK\r\n"

# nats-server's defaults: MAX_CONTROL_LINE_SIZE and MAX_PAYLOAD_SIZE (server/const.go)
MAX_CONTROL_LINE = 4096
DEFAULT_MAX_PAYLOAD = 1024 * 1024
HEADER_VERSION = b"NATS/1.0"
_MAX_DIGITS = 12  # sizes and sids: anything longer is not a number a server sends

# status codes the server puts in the header line
STATUS_CONTROL = 100  # idle heartbeat or flow control request (JetStream push consumers)
STATUS_NOT_FOUND = 404
STATUS_TIMEOUT = 408
STATUS_NO_RESPONDERS = 503

Headers = dict[str, list[str]]
"""Decoded headers: each key (case kept, case sensitive) with its values in order."""

HeadersIn = Mapping[str, str | Sequence[str]]
"""Headers to encode: a value may be one string or several."""


class ProtocolError(Exception):
    """The server sent bytes that are not the NATS protocol. ``events_before`` holds the
    events that were complete in the same feed before the bad bytes."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.events_before: list[Event] = []


class InvalidSubject(ValueError):
    """A subject, reply subject or queue group the protocol does not allow."""


class InvalidHeader(ValueError):
    """A header key or value that cannot be encoded."""


# -- events --------------------------------------------------------------------------------


@attrs.frozen
class Info:
    """INFO: the server's JSON object (``max_payload``, ``headers``, ``connect_urls``...)."""

    data: dict[str, Any]


@attrs.frozen
class Msg:
    """MSG or HMSG. ``headers`` is ``None`` for MSG; ``status``/``description`` come from
    the header line (``NATS/1.0 503``)."""

    subject: str
    sid: int
    reply: str | None
    payload: bytes
    headers: Headers | None = None
    status: int | None = None
    description: str = ""

    def header(self, key: str) -> str | None:
        """The first value of ``key``, or ``None``."""
        if self.headers is None:
            return None
        values = self.headers.get(key)
        return values[0] if values else None


@attrs.frozen
class Ping:
    pass


@attrs.frozen
class Pong:
    pass


@attrs.frozen
class Ok:
    pass


@attrs.frozen
class Err:
    """-ERR with its text, quotes removed (``Unknown Protocol Operation``)."""

    text: str


Event = Info | Msg | Ping | Pong | Ok | Err

PING_EVENT = Ping()
PONG_EVENT = Pong()
OK_EVENT = Ok()


# -- parser --------------------------------------------------------------------------------


def _size(raw: bytes, what: str) -> int:
    if not raw.isdigit() or len(raw) > _MAX_DIGITS:
        raise ProtocolError(f"{what} is not a number: {raw!r}")
    return int(raw)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8: {raw!r}") from None


class NatsParser:
    """Turns the bytes a NATS server sends into events. One per connection."""

    __slots__ = ("_buf", "max_control_line", "max_payload")

    def __init__(
        self, max_payload: int = DEFAULT_MAX_PAYLOAD, max_control_line: int = MAX_CONTROL_LINE
    ) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload
        self.max_control_line = max_control_line

    @property
    def buffered(self) -> int:
        """Bytes held for an event that is not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Add ``data``; return the events it completes, in order. Raises
        :class:`ProtocolError` for bad input; the parser must not be used after that."""
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data if not isinstance(data, memoryview) else bytes(data)
        events: list[Event] = []
        pos = 0
        n = len(buf)
        limit = self.max_control_line
        try:
            while pos < n:
                eol = buf.find(CRLF, pos, pos + limit + 2)
                if eol < 0:
                    if n - pos >= limit + 2:
                        raise ProtocolError(f"control line longer than {limit} bytes")
                    break
                line = bytes(buf[pos:eol])
                parts = line.split()
                op = parts[0].upper() if parts else b""
                if op == b"MSG" or op == b"HMSG":
                    msg = self._msg(buf, n, eol + 2, parts, op == b"HMSG")
                    if msg is None:
                        break
                    events.append(msg[0])
                    pos = msg[1]
                    continue
                events.append(_control(op, line))
                pos = eol + 2
        except ProtocolError as exc:
            exc.events_before = events
            self._buf = bytearray()
            raise
        if pos >= n:
            self._buf = bytearray()
        elif buf is not self._buf or pos:
            self._buf = bytearray(buf[pos:])
        return events

    def _msg(
        self,
        buf: bytes | bytearray,
        n: int,
        start: int,
        parts: list[bytes],
        has_headers: bool,
    ) -> tuple[Msg, int] | None:
        """MSG or HMSG whose control line ends at ``start``: (event, end) or ``None`` when
        the payload is not all here yet."""
        nargs = len(parts) - 1
        if has_headers:
            if nargs not in (4, 5):
                raise ProtocolError(f"HMSG needs 4 or 5 arguments, got {nargs}")
            header_len = _size(parts[-2], "HMSG header size")
        elif nargs not in (3, 4):
            raise ProtocolError(f"MSG needs 3 or 4 arguments, got {nargs}")
        total = _size(parts[-1], "message size")
        if total > self.max_payload:
            raise ProtocolError(f"message of {total} bytes exceeds max_payload {self.max_payload}")
        end = start + total
        if end + 2 > n:
            # validate what can be validated now, so a bad message fails before its payload
            if has_headers and header_len > total:
                raise ProtocolError(f"HMSG header size {header_len} > total size {total}")
            _size(parts[2], "sid")
            return None
        if buf[end : end + 2] != CRLF:
            raise ProtocolError("message payload not followed by CRLF")
        subject = _text(parts[1], "subject")
        sid = _size(parts[2], "sid")
        has_reply = len(parts) == (6 if has_headers else 5)
        reply = _text(parts[3], "reply subject") if has_reply else None
        if not has_headers:
            return Msg(subject, sid, reply, bytes(buf[start:end])), end + 2
        if header_len > total:
            raise ProtocolError(f"HMSG header size {header_len} > total size {total}")
        headers, status, description = decode_headers(bytes(buf[start : start + header_len]))
        payload = bytes(buf[start + header_len : end])
        return Msg(subject, sid, reply, payload, headers, status, description), end + 2


def _control(op: bytes, line: bytes) -> Event:
    """Every operation but MSG and HMSG (one control line, nothing after it)."""
    if op == b"PING" or op == b"PONG" or op == b"+OK":
        if line.strip().upper() != op:
            raise ProtocolError(f"unexpected arguments after {op.decode()}: {line!r}")
        return PING_EVENT if op == b"PING" else PONG_EVENT if op == b"PONG" else OK_EVENT
    rest = line.strip()[len(op) :].strip()
    if op == b"-ERR":
        return Err(_text(rest, "-ERR text").strip("'"))
    if op == b"INFO":
        try:
            data = json.loads(rest)
        except ValueError:
            raise ProtocolError(f"INFO is not JSON: {rest[:80]!r}") from None
        if not isinstance(data, dict):
            raise ProtocolError(f"INFO is not a JSON object: {rest[:80]!r}")
        return Info(data)
    if not op:
        raise ProtocolError("empty control line")
    raise ProtocolError(f"unknown operation {op[:20]!r}")


def decode_headers(block: bytes) -> tuple[Headers, int | None, str]:
    """A header block (status line, ``Key: Value`` lines, empty line) -> (headers, status,
    description)."""
    if not block.startswith(HEADER_VERSION):
        raise ProtocolError(f"header block does not start with NATS/1.0: {block[:20]!r}")
    if not block.endswith(b"\r\n\r\n"):
        raise ProtocolError("header block does not end with an empty line")
    lines = block[:-4].split(CRLF)
    status: int | None = None
    description = ""
    first = lines[0][len(HEADER_VERSION) :]
    if first:
        if first[:1] not in (b" ", b"\t"):
            raise ProtocolError(f"bad header version line {lines[0]!r}")
        code, _, desc = first.strip().partition(b" ")
        if len(code) != 3 or not code.isdigit():
            raise ProtocolError(f"bad status code in {lines[0]!r}")
        status = int(code)
        description = _text(desc.strip(), "status description")
    headers: Headers = {}
    for raw in lines[1:]:
        key, sep, value = raw.partition(b":")
        if not sep or not key or key != key.strip() or b" " in key or b"\t" in key:
            raise ProtocolError(f"bad header line {raw!r}")
        headers.setdefault(_text(key, "header key"), []).append(
            _text(value.strip(), "header value")
        )
    return headers, status, description


# -- encoders (client to server) -------------------------------------------------------------

_WHITESPACE = re.compile(r"\s")
_HEADER_KEY = re.compile(r"[!-9;-~]+")  # printable ASCII without ':' and space
_VALID: dict[tuple[str, bool], None] = {}  # subjects already checked
_MAX_VALID = 4096


def check_subject(subject: str, *, wildcards: bool = False) -> None:
    """Raise :class:`InvalidSubject` unless ``subject`` may be published to (``wildcards``
    false) or subscribed to (``wildcards`` true: ``*`` tokens, ``>`` as the last token)."""
    if (subject, wildcards) in _VALID:
        return
    if not isinstance(subject, str) or not subject:
        raise InvalidSubject(f"empty subject {subject!r}")
    if _WHITESPACE.search(subject):
        raise InvalidSubject(f"whitespace in subject {subject!r}")
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token:
            raise InvalidSubject(f"empty token in subject {subject!r}")
        if token == "*" or token == ">":
            if not wildcards:
                raise InvalidSubject(f"wildcard in a subject to publish to: {subject!r}")
            if token == ">" and i != len(tokens) - 1:
                raise InvalidSubject(f"'>' is not the last token in {subject!r}")
    if len(_VALID) >= _MAX_VALID:
        _VALID.clear()
    _VALID[(subject, wildcards)] = None


def encode_headers(
    headers: HeadersIn | None = None, status: int | None = None, description: str = ""
) -> bytes:
    """A header block. ``status`` (and ``description``) only for server-side encoders."""
    out = ["NATS/1.0"]
    if status is not None:
        if not 100 <= status <= 999:
            raise InvalidHeader(f"status {status} is not three digits")
        out.append(f" {status}")
        if description:
            _check_value(description)
            out.append(f" {description}")
    for key, value in (headers or {}).items():
        if not _HEADER_KEY.fullmatch(key):
            raise InvalidHeader(f"bad header key {key!r}")
        for v in (value,) if isinstance(value, str) else value:
            _check_value(v)
            out.append(f"\r\n{key}: {v}")
    out.append("\r\n\r\n")
    return "".join(out).encode()


def _check_value(value: str) -> None:
    if not isinstance(value, str) or "\r" in value or "\n" in value:
        raise InvalidHeader(f"bad header value {value!r}")
    if value != value.strip():
        raise InvalidHeader(f"header value with leading or trailing whitespace {value!r}")


def connect(options: Mapping[str, Any]) -> bytes:
    """CONNECT with ``options`` as JSON (verbose, pedantic, headers, no_responders, name...)."""
    return b"CONNECT " + json.dumps(dict(options), separators=(",", ":")).encode() + CRLF


def pub(
    subject: str,
    payload: bytes | bytearray | memoryview = b"",
    reply: str | None = None,
    headers: HeadersIn | bytes | None = None,
) -> bytes:
    """PUB, or HPUB when ``headers`` is given (an empty mapping still sends HPUB). Headers
    may be a block already encoded by :func:`encode_headers` (shared by many messages)."""
    check_subject(subject)
    if reply is not None:
        check_subject(reply)
    size = len(payload)
    if headers is None:
        head = f"PUB {subject} {reply} {size}\r\n" if reply else f"PUB {subject} {size}\r\n"
        return b"".join((head.encode(), payload, CRLF))
    if isinstance(headers, bytes):
        if not (headers.startswith(HEADER_VERSION) and headers.endswith(b"\r\n\r\n")):
            raise InvalidHeader(f"not an encoded header block: {headers[:20]!r}")
        block = headers
    else:
        block = encode_headers(headers)
    hl = len(block)
    head = (
        f"HPUB {subject} {reply} {hl} {hl + size}\r\n"
        if reply
        else f"HPUB {subject} {hl} {hl + size}\r\n"
    )
    return b"".join((head.encode(), block, payload, CRLF))


def sub(subject: str, sid: int, queue: str | None = None) -> bytes:
    """SUB, with a queue group when ``queue`` is given."""
    check_subject(subject, wildcards=True)
    _check_sid(sid)
    if queue is None:
        return f"SUB {subject} {sid}\r\n".encode()
    if not queue or _WHITESPACE.search(queue):
        raise InvalidSubject(f"bad queue group {queue!r}")
    return f"SUB {subject} {queue} {sid}\r\n".encode()


def unsub(sid: int, max_msgs: int | None = None) -> bytes:
    """UNSUB now, or after ``max_msgs`` messages in all."""
    _check_sid(sid)
    if max_msgs is None:
        return f"UNSUB {sid}\r\n".encode()
    if max_msgs < 0:
        raise ValueError(f"negative max_msgs {max_msgs}")
    return f"UNSUB {sid} {max_msgs}\r\n".encode()


def _check_sid(sid: int) -> None:
    if not isinstance(sid, int) or sid <= 0:
        raise ValueError(f"sid must be a positive integer, not {sid!r}")


# -- encoders (server to client): for tests and fake servers ---------------------------------


def encode_msg(
    subject: str,
    sid: int,
    payload: bytes = b"",
    reply: str | None = None,
    headers: HeadersIn | None = None,
    status: int | None = None,
    description: str = "",
) -> bytes:
    """MSG, or HMSG when ``headers`` or ``status`` is given, as a server sends it."""
    r = f" {reply}" if reply else ""
    if headers is None and status is None:
        return f"MSG {subject} {sid}{r} {len(payload)}\r\n".encode() + payload + CRLF
    block = encode_headers(headers, status, description)
    hl = len(block)
    return f"HMSG {subject} {sid}{r} {hl} {hl + len(payload)}\r\n".encode() + block + payload + CRLF


def encode_info(data: Mapping[str, Any]) -> bytes:
    return b"INFO " + json.dumps(dict(data), separators=(",", ":")).encode() + CRLF


def encode_err(text: str) -> bytes:
    return f"-ERR '{text}'\r\n".encode()
