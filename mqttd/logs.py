"""Logs an operator can use: text or JSON lines, to stderr or a file (``logging:`` in the
configuration), and the packet trace at debug.

:func:`configure_logging` sets up the root logger once at start (the command line calls it).
:class:`JsonFormatter` writes one JSON object per line: ``ts`` (ISO 8601, UTC, milliseconds),
``level``, ``logger``, ``msg``, then the fields the call site passed with ``extra={...}``
(``client_id``, ``address``, ``reason``, ...), and ``exc`` with the traceback of an exception.

The packet trace (logger ``mqttd.trace``, debug): a connection decides once, when it is
created, whether it traces (:func:`tracing`); then :func:`trace_received` gets the packets it
decoded and :func:`trace_sent` the bytes it hands to the I/O layer, whose fixed headers (and
a PUBLISH's topic and packet id) it reads again. Nothing of this runs for a connection that
does not trace: the hot path pays one boolean test per read and per write.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from mqttd.codec.kinds import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PACKET_NAMES,
    PROTOCOL_5,
    PUBLISH,
    SUBSCRIBE,
    UNSUBSCRIBE,
)
from mqttd.config_schema import ConfigError

if TYPE_CHECKING:
    from mqttd.codec.packets import Packet
    from mqttd.config_schema import Logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
trace_log = logging.getLogger("mqttd.trace")

# the attributes every LogRecord has: anything else came from ``extra``
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}
# packets whose variable header starts with a packet id
_WITH_PACKET_ID = frozenset(range(4, 12))  # PUBACK .. UNSUBACK


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module's docstring). A field passed in ``extra``
    under one of the names ts, level, logger, msg, exc is left out."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


HANDLER_NAME = "mqttd"  # the handler configure_logging installs (replaced by the next call)


def configure_logging(config: Logging, stream: IO[str] | None = None) -> logging.Handler:
    """Log at ``config.level`` in ``config.format`` to ``config.file`` (appended to; a
    :class:`~logging.handlers.WatchedFileHandler`, which reopens it when it was moved or
    deleted) or to ``stream`` (default: stderr). Replaces the handler of an earlier call,
    leaves the others alone. Returns the handler. Raises ConfigError when the file cannot be
    opened."""
    handler: logging.Handler
    if config.file is not None:
        try:
            handler = logging.handlers.WatchedFileHandler(config.file, encoding="utf-8")
        except OSError as exc:
            problem = f"cannot open {config.file}: {exc.strerror or exc}"
            raise ConfigError("logging.file", [("", problem)]) from None
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else logging.Formatter(
        TEXT_FORMAT
    ))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    return handler


# -- the packet trace --------------------------------------------------------------------------


def tracing() -> bool:
    """Whether a connection created now traces its packets (``mqttd.trace`` at debug)."""
    return trace_log.isEnabledFor(logging.DEBUG)


def _trace(direction: str, client_id: str, address: str, fields: dict[str, Any]) -> None:
    details = " ".join(
        f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
        for key, value in fields.items() if key != "packet"
    )
    trace_log.debug(
        "client %s (%s) %s %s%s", client_id or "<connecting>", address, direction,
        fields["packet"], f" {details}" if details else "",
        extra={"direction": direction, "client_id": client_id, "address": address, **fields},
    )


def trace_received(client_id: str, address: str, packets: list[Packet]) -> None:
    """Trace the packets a client sent (decoded)."""
    for packet in packets:
        _trace("in", client_id, address, packet_fields(packet))


def trace_sent(client_id: str, address: str, data: bytes, level: int) -> None:
    """Trace the packets in ``data`` (whole packets, as queued for a client at protocol
    ``level``)."""
    for fields in sent_fields(data, level):
        _trace("out", client_id, address, fields)


def packet_fields(packet: Packet) -> dict[str, Any]:
    """What the trace shows of a decoded packet (never the payload, the password)."""
    kind = packet.TYPE
    fields: dict[str, Any] = {"packet": PACKET_NAMES.get(kind, f"type {kind}")}
    p: Any = packet
    if kind == PUBLISH:
        fields.update(
            packet_id=p.packet_id if p.qos else None, topic=p.topic, qos=p.qos,
            retain=bool(p.retain), dup=bool(p.dup), payload_bytes=len(p.payload),
        )
    elif kind == CONNECT:
        fields.update(
            connect_client_id=p.client_id, protocol_level=p.protocol_level,
            clean_session=bool(p.clean_session), keepalive_s=p.keepalive_s,
            will_topic=p.will.topic if p.will is not None else None,
        )
    elif kind == SUBSCRIBE:
        fields.update(packet_id=p.packet_id, filters=[s.filter for s in p.subscriptions],
                      qos=[s.qos for s in p.subscriptions])
    elif kind == UNSUBSCRIBE:
        fields.update(packet_id=p.packet_id, filters=list(p.filters))
    elif kind in _WITH_PACKET_ID:
        fields["packet_id"] = p.packet_id
    elif kind == DISCONNECT:
        fields["reason_code"] = p.reason_code
    return fields


def sent_fields(data: bytes, level: int) -> Iterator[dict[str, Any]]:
    """What the trace shows of each packet in ``data``, read from its bytes: the type, the
    packet id, and for a PUBLISH its topic, QoS, retain, dup and payload size."""
    pos, end = 0, len(data)
    while pos < end:
        first = data[pos]
        length, body = _remaining_length(data, pos + 1)
        if length < 0 or body + length > end:
            yield {"packet": "(cut short)", "bytes": end - pos}
            return
        kind = first >> 4
        fields: dict[str, Any] = {"packet": PACKET_NAMES.get(kind, f"type {kind}")}
        if kind == PUBLISH:
            fields.update(_publish_fields(data, first, body, body + length, level))
        elif kind in _WITH_PACKET_ID and length >= 2:
            fields["packet_id"] = int.from_bytes(data[body : body + 2], "big")
        elif kind == CONNACK and length >= 2:
            fields.update(session_present=bool(data[body] & 1), reason_code=data[body + 1])
        elif kind == DISCONNECT and length >= 1:
            fields["reason_code"] = data[body]
        yield fields
        pos = body + length


def _remaining_length(data: bytes, pos: int) -> tuple[int, int]:
    """(Remaining Length, where the variable header starts); (-1, pos) if cut short."""
    length = shift = 0
    for index in range(pos, min(pos + 4, len(data))):
        byte = data[index]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return length, index + 1
        shift += 7
    return -1, pos


def _publish_fields(data: bytes, first: int, pos: int, end: int, level: int) -> dict[str, Any]:
    qos = (first >> 1) & 3
    topic_length = int.from_bytes(data[pos : pos + 2], "big")
    topic = data[pos + 2 : pos + 2 + topic_length].decode("utf-8", "replace")
    pos += 2 + topic_length
    packet_id = None
    if qos:
        packet_id = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
    if level == PROTOCOL_5:
        properties_length, pos = _remaining_length(data, pos)
        pos += max(properties_length, 0)
    return {
        "packet_id": packet_id, "topic": topic, "qos": qos, "retain": bool(first & 1),
        "dup": bool(first & 8), "payload_bytes": max(end - pos, 0),
    }
