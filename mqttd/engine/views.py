"""What the operator API shows, as JSON-ready values read from the engine in the trio
thread: clients (paged, filtered by id pattern and connection state), one client with its
subscriptions, broker-wide counters, bridges. Read only; no trio here."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, cast

from mqttd.codec.packets import PROTOCOL_5, PROTOCOL_31

if TYPE_CHECKING:
    from mqttd.connection import Connection
    from mqttd.engine.dispatch import Engine
    from mqttd.session import Session

MAX_PAGE = 1000
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
    limit = max(0, min(limit, MAX_PAGE))
    page = ids[offset : offset + limit]
    return {
        "total": len(ids), "offset": offset, "limit": limit,
        "clients": [client(engine, engine.sessions[cid]) for cid in page],
    }


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
