"""What an operator can change through the API: end a client's connection (kick), delete a
session with its queue, delete a retained message. No trio here; the HTTP layer checks the
credential."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from mqttd.codec.errors import AdministrativeAction
from mqttd.engine import sessions
from persistence import ops

if TYPE_CHECKING:
    from mqttd.connection import Connection
    from mqttd.engine.dispatch import Engine

log = logging.getLogger("mqttd.broker")


def kick(engine: Engine, client_id: str) -> bool:
    """Close the client's connection (5.0: DISCONNECT 0x98 Administrative action); its
    session stays if persistent, and its will is published as after any lost connection.
    False when it is not connected."""
    session = engine.sessions.get(client_id)
    conn = cast("Connection | None", session.connection if session is not None else None)
    if conn is None:
        return False
    log.warning("client %s: disconnected by an operator", conn.name)
    conn.close(AdministrativeAction("disconnected by an operator"))
    return True


def delete_session(engine: Engine, client_id: str) -> bool:
    """Delete the client's session, its subscriptions and its queue (closing its connection
    first, if any). False when there is no such session."""
    session = engine.sessions.get(client_id)
    if session is None:
        return False
    conn = cast("Connection | None", session.connection)
    if conn is not None:
        conn.close(AdministrativeAction("session deleted by an operator"))
    log.warning("session %s deleted by an operator (%d queued messages)", client_id,
                session.queued)
    sessions.discard(engine, session)
    return True


def delete_retained(engine: Engine, topic: str) -> bool:
    """Delete the retained message of ``topic`` (from the store too) without publishing
    anything to subscribers. False when there is none."""
    if not engine.retained.delete(topic):
        return False
    log.warning("retained message of %r deleted by an operator", topic)
    if engine.writer is not None and not topic.startswith("$SYS/"):
        engine.writer.submit(ops.DeleteRetained(topic))
    return True
