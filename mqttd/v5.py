"""What MQTT 5.0 adds on the broker's side of a connection: subscription options, the
properties a message carries onward, topic aliases both ways, message expiry, the client's
Maximum Packet Size. Synchronous helpers for the broker and the sessions.

A message keeps in ``Publish.properties`` only what is forwarded as it came (payload format
indicator, content type, response topic, correlation data, user properties in order); the
Message Expiry Interval becomes ``Publish.expires_at`` (epoch seconds) and is recomputed for
every onward delivery; topic aliases and subscription identifiers belong to one connection
or one subscription and are never part of the message.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import attrs

from mqttd.codec import MQTTError, ProtocolError
from mqttd.codec.errors import TopicAliasInvalid
from mqttd.codec.kinds import PUBLISH
from mqttd.codec.packets import ExpiringPublish, Publish, encode_publish_parts_v5
from mqttd.codec.properties import decode_properties, encode_properties
from mqttd.subscriptions import SubOptions


class Terms(Protocol):
    """What the 5.0 functions here read and set on a client's connection
    (:class:`mqttd.connection.Connection` has them): the terms agreed at CONNECT and the topic
    aliases of each direction."""

    max_send_size: int
    problem_information: bool
    topic_alias_in_max: int
    topic_alias_out_max: int
    topic_aliases_in: dict[int, str] | None
    topic_aliases_out: dict[str, int] | None

# 0xFFFFFFFF as a Session Expiry Interval: the session does not expire
NEVER = 0xFFFFFFFF
# the properties a message carries to its subscribers unchanged (MQTT 5.0, 3.3.2.3)
FORWARDED = frozenset({
    "payload_format_indicator", "content_type", "response_topic", "correlation_data",
    "user_property",
})
# a topic alias costs 3 bytes (identifier + two-byte value): worth it for longer topics
ALIAS_MIN_TOPIC_BYTES = 4


def options_byte(no_local: bool, retain_as_published: bool, retain_handling: int) -> int:
    """The stored subscription options (the 5.0 options byte without the QoS bits)."""
    return (4 if no_local else 0) | (8 if retain_as_published else 0) | (retain_handling << 4)


def options_from_byte(options: int, subscription_id: int) -> SubOptions | None:
    return SubOptions.of(bool(options & 4), bool(options & 8), subscription_id)


# -- messages ------------------------------------------------------------------------------


def inbound(conn: Terms, packet: Publish, now: float) -> Publish:
    """A 5.0 PUBLISH from a client as the broker's message: the topic alias resolved (and
    learnt), the expiry made absolute, only the forwarded properties kept. Raises
    TopicAliasInvalid (0x94) or ProtocolError (0x82) as the specification says."""
    props = packet.properties
    topic = packet.topic
    if not props:
        if not topic:
            raise ProtocolError("PUBLISH with an empty topic and no topic alias")
        return packet if props is None else attrs.evolve(packet, properties=None)
    if "subscription_identifier" in props:
        raise ProtocolError("a client must not send a subscription identifier in PUBLISH")
    alias = props.get("topic_alias")
    if alias is not None:
        if alias == 0 or alias > conn.topic_alias_in_max:
            raise TopicAliasInvalid(
                f"topic alias {alias} outside 1..{conn.topic_alias_in_max}"
            )
        aliases = conn.topic_aliases_in
        if aliases is None:
            aliases = conn.topic_aliases_in = {}
        if topic:
            aliases[alias] = topic
        else:
            known = aliases.get(alias)
            if known is None:
                raise ProtocolError(f"topic alias {alias} used before it was set")
            topic = known
    elif not topic:
        raise ProtocolError("PUBLISH with an empty topic and no topic alias")
    return _message(
        topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id, props, now
    )


def _message(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int,
    props: dict[str, Any], now: float,
) -> Publish:
    """The broker's message for 5.0 ``props``: only the forwarded properties kept, the
    Message Expiry Interval made absolute (on an ExpiringPublish)."""
    kept = {name: value for name, value in props.items() if name in FORWARDED} or None
    interval = props.get("message_expiry_interval")
    if interval is None:
        return Publish(topic, payload, qos, retain, dup, packet_id, kept)
    return ExpiringPublish(
        topic, payload, qos, retain, dup, packet_id, kept, expires_at=now + interval
    )


def expired(message: Publish, now: float | None = None) -> bool:
    expires_at = message.expires_at
    return expires_at is not None and expires_at <= (time.time() if now is None else now)


def onward_properties(
    message: Publish, subscription_ids: tuple[int, ...] | None, now: float | None = None
) -> dict[str, Any] | None:
    """The properties of a delivery: the message's, its remaining expiry, the matching
    subscriptions' identifiers."""
    props = message.properties
    expires_at = message.expires_at
    if expires_at is None and not subscription_ids:
        return props
    out = dict(props) if props else {}
    if expires_at is not None:
        remaining = expires_at - (time.time() if now is None else now)
        out["message_expiry_interval"] = max(1, math.ceil(remaining))
    if subscription_ids:
        out["subscription_identifier"] = list(subscription_ids)
    return out


def publish_parts(
    conn: Terms,
    message: Publish,
    qos: int,
    retain: bool,
    parts: list[Any] | None,
    subscription_ids: tuple[int, ...] | None,
    dup: bool = False,
) -> tuple[bytes, bytes] | None:
    """The 5.0 encoding of one delivery as (head, tail) around the packet id, shared through
    ``parts`` (slots 4-6, per QoS) when nothing in it is specific to this connection; None
    when it is larger than the client's Maximum Packet Size (the caller drops it)."""
    if (
        parts is not None and not retain and not dup and not subscription_ids
        and not conn.topic_alias_out_max
    ):
        encoded = parts[4 + qos]
        if encoded is None:
            encoded = parts[4 + qos] = encode_publish_parts_v5(
                message.topic, message.payload, qos, False, False,
                onward_properties(message, None),
            )
    else:
        props = onward_properties(message, subscription_ids)
        topic = message.topic
        if conn.topic_alias_out_max:
            topic, props = _alias_out(conn, topic, props)
        encoded = encode_publish_parts_v5(topic, message.payload, qos, retain, dup, props)
    limit = conn.max_send_size
    if limit and len(encoded[0]) + len(encoded[1]) + (2 if qos else 0) > limit:
        return None
    return encoded


def _alias_out(
    conn: Terms, topic: str, props: dict[str, Any] | None
) -> tuple[str, dict[str, Any] | None]:
    """Use (or set up) a topic alias towards the client when it saves bytes."""
    aliases = conn.topic_aliases_out
    if aliases is None:
        aliases = conn.topic_aliases_out = {}
    alias = aliases.get(topic)
    if alias is not None:
        out = dict(props) if props else {}
        out["topic_alias"] = alias
        return "", out
    if len(topic) < ALIAS_MIN_TOPIC_BYTES or len(aliases) >= conn.topic_alias_out_max:
        return topic, props
    alias = aliases[topic] = len(aliases) + 1
    out = dict(props) if props else {}
    out["topic_alias"] = alias
    return topic, out


# -- storage -------------------------------------------------------------------------------


def stored_properties(message: Publish) -> bytes | None:
    """The forwarded properties as the store keeps them (an encoded property block)."""
    props = message.properties
    return encode_properties(props, PUBLISH) if props else None


def restored_properties(block: bytes | None) -> dict[str, Any] | None:
    if not block:
        return None
    try:
        props, _end = decode_properties(block, 0, len(block), PUBLISH)
    except MQTTError:
        return None  # unreadable: deliver the message without them
    return props or None


def restored_message(
    topic: str, payload: bytes, qos: int, retain: bool, block: bytes | None,
    expires_at: float | None,
) -> Publish:
    if expires_at is None:
        return Publish(topic, payload, qos, retain, False, 0, restored_properties(block))
    return ExpiringPublish(
        topic, payload, qos, retain, False, 0, restored_properties(block), expires_at=expires_at
    )


# -- CONNECT -------------------------------------------------------------------------------


def session_expiry(requested: int, cap_s: int) -> int:
    """The Session Expiry Interval granted: the client's, capped by the configuration
    (``cap_s``, -1: no cap); -1 means never."""
    wanted = -1 if requested == NEVER else requested
    if cap_s < 0:
        return wanted
    return cap_s if wanted < 0 else min(wanted, cap_s)


def connect_terms(
    conn: Terms,
    props: dict[str, Any],
    *,
    keepalive_s: int,
    max_keepalive_s: int,
    receive_maximum: int,
    max_packet_size: int,
    topic_alias_maximum: int,
) -> tuple[int, dict[str, Any]]:
    """Apply what a 5.0 CONNECT asks of the connection (its Maximum Packet Size, Topic
    Alias Maximum, Request Problem Information) and return the keepalive granted and the
    CONNACK properties that say what the broker allows."""
    conn.max_send_size = props.get("maximum_packet_size", 0)
    conn.topic_alias_out_max = props.get("topic_alias_maximum", 0)
    conn.topic_alias_in_max = topic_alias_maximum
    conn.problem_information = bool(props.get("request_problem_information", 1))
    connack: dict[str, Any] = {
        "receive_maximum": min(receive_maximum, 65535),
        "maximum_packet_size": min(max_packet_size, 268_435_455),
    }
    if topic_alias_maximum:
        connack["topic_alias_maximum"] = topic_alias_maximum
    if max_keepalive_s < 65535 and (keepalive_s > max_keepalive_s or keepalive_s == 0):
        keepalive_s = max_keepalive_s  # 5.0 can tell the client: Server Keep Alive
        connack["server_keep_alive"] = keepalive_s
    return keepalive_s, connack


def will_message(will: Any, now: float) -> Publish:
    """A will as the message it becomes (its 5.0 properties as a PUBLISH's)."""
    props = will.properties
    if not props:
        return Publish(will.topic, will.payload, will.qos, will.retain)
    return _message(will.topic, will.payload, will.qos, will.retain, False, 0, props, now)
