"""What a message carries from node to node, in NATS headers (sans-IO, no trio).

Every message a node exports is an HPUB whose header block is built once, by hand (the
values are known to be safe: node names are ``[A-Za-z0-9_-]``, numbers, base64):

``Mqttd-Msg: <node> <boot> <seq> <qos><retain> [<index revision>]``
    the origin node, its boot id (milliseconds since the epoch at start: a restarted node
    is told apart), the message's number on that node (1, 2, ... per boot: receivers drop
    a number they have already routed from that boot, which is also how one NATS message
    matched by two of a node's subscriptions is routed once), the publish QoS and the
    retain flag; on live messages, the revision of MQTTD_SESS the sending node's index of
    persistent subscriptions had applied (:mod:`mqttd.clustering.sessions`).
``Mqttd-Props: <base64>`` (5.0 only, when the message has properties)
    the forwarded properties as the store keeps them (an encoded property block:
    payload format, content type, response topic, correlation data, user properties).
``Mqttd-Expires: <epoch seconds>`` (5.0 Message Expiry Interval)
    when the message expires; the receiving node sends the remaining interval on, as it
    does for a stored message (node clocks are assumed synchronised, e.g. NTP).
``Mqttd-Op: del`` (retained stream only)
    a tombstone: the topic's retained message was deleted (the payload is empty).
``Nats-Msg-Id: <node>.<boot>.<seq>`` (retained stream only)
    so that a publish retried after a lost PubAck is stored once.
"""

from __future__ import annotations

import base64
import binascii
from typing import NamedTuple

from mqttd import v5
from mqttd.codec.packets import Publish

MSG = "Mqttd-Msg"
PROPS = "Mqttd-Props"
EXPIRES = "Mqttd-Expires"
OP = "Mqttd-Op"
OP_DELETE = "del"
MSG_ID = "Nats-Msg-Id"

Headers = dict[str, list[str]]


class Received(NamedTuple):
    """A message read from NATS: where it comes from and the message itself."""

    node: str
    boot: int
    seq: int
    message: Publish
    deleted: bool = False
    index_rev: int = 0


def header_block(
    origin: str, seq: int, message: Publish, *, msg_id: str | None = None,
    delete: bool = False, index_rev: int | None = None,
) -> bytes:
    """The header block of an exported message; ``origin`` is ``"<node> <boot> "``."""
    rev = "" if index_rev is None else f" {index_rev}"
    head = (
        f"NATS/1.0\r\n{MSG}: {origin}{seq} {message.qos}{1 if message.retain else 0}{rev}\r\n"
    )
    if message.properties is None and message.expires_at is None and msg_id is None and (
        not delete
    ):
        return (head + "\r\n").encode()  # the common case, on every live message
    if message.properties:
        block = v5.stored_properties(message)
        if block:
            head += f"{PROPS}: {base64.b64encode(block).decode()}\r\n"
    if message.expires_at is not None:
        head += f"{EXPIRES}: {message.expires_at!r}\r\n"
    if msg_id is not None:
        head += f"{MSG_ID}: {msg_id}\r\n"
    if delete:
        head += f"{OP}: {OP_DELETE}\r\n"
    return (head + "\r\n").encode()


def hpub(subject: str, block: bytes, payload: bytes) -> bytes:
    """The HPUB frame of a message (the subject comes from :mod:`subjects`, valid by
    construction; the header block from :func:`header_block`)."""
    size = len(block)
    return b"".join((
        f"HPUB {subject} {size} {size + len(payload)}\r\n".encode(), block, payload, b"\r\n"
    ))


def first(headers: Headers, key: str) -> str | None:
    """The first value of a header (None when absent)."""
    values = headers.get(key)
    return values[0] if values else None


def decode(topic: str, payload: bytes, headers: Headers | None) -> Received:
    """The message a node exported (ValueError when the headers are not mqttd's)."""
    if not headers:
        raise ValueError("no mqttd headers")
    meta = first(headers, MSG)
    if meta is None:
        raise ValueError(f"no {MSG} header")
    parts = meta.split(" ")
    if len(parts) not in (4, 5) or len(parts[3]) != 2 or parts[3][0] not in "012" or (
        parts[3][1] not in "01"
    ):
        raise ValueError(f"bad {MSG} header {meta!r}")
    node, boot, seq = parts[0], int(parts[1]), int(parts[2])
    index_rev = int(parts[4]) if len(parts) == 5 else 0
    qos, retain = int(parts[3][0]), parts[3][1] == "1"
    props_text = first(headers, PROPS)
    expires_text = first(headers, EXPIRES)
    if props_text is None and expires_text is None:
        message = Publish(topic, payload, qos, retain)
    else:
        try:
            block = base64.b64decode(props_text, validate=True) if props_text else None
        except binascii.Error:
            raise ValueError(f"bad {PROPS} header") from None
        expires_at = float(expires_text) if expires_text is not None else None
        message = v5.restored_message(topic, payload, qos, retain, block, expires_at)
    return Received(node, boot, seq, message, first(headers, OP) == OP_DELETE, index_rev)
