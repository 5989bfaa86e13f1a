"""What the operator API shows, as JSON-ready values read from the engine in the trio
thread: clients (paged, filtered by id pattern and connection state), one client with its
subscriptions, every subscription, retained messages by filter, consumer groups (work
queues). Read only; no trio here."""

from __future__ import annotations

import base64
import fnmatch
from typing import TYPE_CHECKING, Any, cast

from mqttd.codec.packets import PROTOCOL_5, PROTOCOL_31, Publish
from mqttd.topics import is_shared, matches, parse_shared, validate_topic_filter

if TYPE_CHECKING:
    from mqttd.connection import Connection
    from mqttd.engine.dispatch import Engine
    from mqttd.session import Session

MAX_PAGE = 1000
PAYLOAD_SHOWN_BYTES = 4096  # a retained payload longer than this is shown cut
PROTOCOLS = {PROTOCOL_31: "3.1", PROTOCOL_5: "5.0"}


def client(engine: Engine, session: Session) -> dict[str, Any]:
    """One client: its connection (if any), its session's queue and counters."""
    conn = cast("Connection | None", session.connection)
    stats = engine.client_stats(session.client_id) or {}
    return {
        "client_id": session.client_id,
        "connected": conn is not None,
        "persistent": session.persistent,
        "protocol": PROTOCOLS.get(conn.protocol_level, "3.1.1") if conn is not None else None,
        "address": conn.peer if conn is not None else None,
        "connected_at": conn.connected_at if conn is not None else None,
        "disconnected_at": session.disconnected_at,
        "keepalive_s": conn.keepalive_s if conn is not None else None,
        "username": session.username,
        "subscriptions": len(session.subscriptions),
        **{key: value for key, value in stats.items() if key not in ("connected", "persistent")},
    }


def clients(
    engine: Engine, pattern: str | None = None, connected: bool | None = None,
    offset: int = 0, limit: int = 100,
) -> dict[str, Any]:
    """A page of clients, ordered by id: those matching ``pattern`` ("*", "?", "[...]")
    and, if given, ``connected`` or not."""
    ids = sorted(
        cid for cid, session in engine.sessions.items()
        if (pattern is None or fnmatch.fnmatchcase(cid, pattern))
        and (connected is None or (session.connection is not None) == connected)
    )
    page = _page(ids, offset, limit, "clients")
    page["clients"] = [client(engine, engine.sessions[cid]) for cid in page["clients"]]
    return page


def client_detail(engine: Engine, client_id: str) -> dict[str, Any] | None:
    session = engine.sessions.get(client_id)
    if session is None:
        return None
    result = client(engine, session)
    result["subscriptions"] = [
        {"filter": topic_filter, "qos": qos}
        for topic_filter, qos in sorted(session.subscriptions.items())
    ]
    return result


def _page(items: list[Any], offset: int, limit: int, name: str) -> dict[str, Any]:
    limit = max(0, min(limit, MAX_PAGE))
    return {"total": len(items), "offset": offset, "limit": limit,
            name: items[offset : offset + limit]}


def subscriptions(
    engine: Engine, client_pattern: str | None = None, topic_filter: str | None = None,
    match: str | None = None, offset: int = 0, limit: int = 100,
) -> dict[str, Any]:
    """A page of subscriptions, ordered by client id and filter: of the clients matching
    ``client_pattern``, with exactly ``topic_filter``, or whose filter matches the topic
    name ``match``. A shared subscription shows its group and inner filter."""
    found: list[dict[str, Any]] = []
    for cid in sorted(engine.sessions):
        if client_pattern is not None and not fnmatch.fnmatchcase(cid, client_pattern):
            continue
        session = engine.sessions[cid]
        for subscribed, qos in sorted(session.subscriptions.items()):
            group, inner = parse_shared(subscribed) if is_shared(subscribed) else (None, subscribed)
            if topic_filter is not None and subscribed != topic_filter:
                continue
            if match is not None and not matches(inner, match):
                continue
            found.append({"client_id": cid, "filter": subscribed, "qos": qos,
                          "share_group": group, "connected": session.connection is not None})
    return _page(found, offset, limit, "subscriptions")


def retained(
    engine: Engine, topic_filter: str = "#", offset: int = 0, limit: int = 100
) -> dict[str, Any]:
    """A page of the retained messages whose topic matches ``topic_filter``, by topic. The
    payload is shown as text when it is UTF-8, else as base64, cut at 4 KiB."""
    try:
        validate_topic_filter(topic_filter)
    except ValueError as exc:
        raise ValueError(f"filter: {exc}") from None
    entries = engine.retained.match(topic_filter)
    page = _page(entries, offset, limit, "retained")
    page["filter"] = topic_filter
    page["retained"] = [_retained_message(topic, message) for topic, message in page["retained"]]
    return page


def _retained_message(topic: str, message: object) -> dict[str, Any]:
    publish = cast("Publish", message)
    payload = publish.payload
    shown = payload[:PAYLOAD_SHOWN_BYTES]
    result: dict[str, Any] = {
        "topic": topic, "qos": publish.qos, "payload_bytes": len(payload),
        "truncated": len(shown) < len(payload), "expires_at": publish.expires_at,
    }
    try:
        result["payload"] = shown.decode()
    except UnicodeDecodeError:
        result["payload_base64"] = base64.b64encode(shown).decode()
    return result


def groups(engine: Engine, pattern: str | None = None) -> dict[str, Any]:
    """Every consumer group (``$share/<group>/<filter>``) whose group name matches
    ``pattern``: members, jobs in progress and queued, retries, dead letters (see
    mqttd.workqueues), and the delayed-publish queue."""
    found = [
        group for group in engine.work_queues.group_stats()
        if pattern is None or fnmatch.fnmatchcase(group["group"], pattern)
    ]
    return {"total": len(found), "groups": found, "delayed": engine.delayed.stats()}
