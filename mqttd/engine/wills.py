"""Wills: published when a connection ends without DISCONNECT, at once or after the 5.0 Will
Delay Interval (sessions.will_due decides which), cancelled when the client comes back within
the delay, published at once when the session ends first (mosquitto's will_delay.c)."""

from __future__ import annotations

import logging
import time

from mqttd import v5
from mqttd.codec.packets import Will
from mqttd.engine.state import BrokerState

log = logging.getLogger("mqttd.broker")


def publish_will(state: BrokerState, will: Will, client_id: str, why: str) -> None:
    """Publish the will of ``client_id``; ``why`` goes in the log line (connection lost,
    will delay over, session ended, ...)."""
    log.info(
        "client %s: will published to %r (%s)", client_id, will.topic, why,
        extra={"event": "will", "client_id": client_id, "topic": will.topic, "reason": why},
    )
    if state.cluster is not None:  # cluster mode: settled here, not for another node
        state.cluster.will_settled(client_id)
    state.publish(v5.will_message(will, time.time()))


def publish_later(state: BrokerState, client_id: str, delay_s: float, will: Will) -> None:
    """Publish ``will`` after ``delay_s`` unless taken back (:func:`take_back`) before."""
    log.info(
        "client %s: will to %r due in %.0fs unless the client comes back",
        client_id, will.topic, delay_s,
        extra={"event": "will_delayed", "client_id": client_id, "topic": will.topic,
               "delay_s": delay_s},
    )
    entry = (time.time() + delay_s, will)
    state.delayed_wills[client_id] = entry
    state.call_at(entry[0], lambda: _delay_over(state, client_id, entry))


def take_back(state: BrokerState, client_id: str) -> Will | None:
    """The will of ``client_id`` waiting for its delay, no longer waiting (None if none)."""
    entry = state.delayed_wills.pop(client_id, None)
    if entry is not None and state.cluster is not None:
        state.cluster.will_settled(client_id)
    return entry[1] if entry is not None else None


def _delay_over(state: BrokerState, client_id: str, entry: tuple[float, Will]) -> None:
    if state.delayed_wills.get(client_id) is entry:
        del state.delayed_wills[client_id]
        publish_will(state, entry[1], client_id, "will delay over")


def publish_waiting_wills(state: BrokerState) -> None:
    """Server shutdown: the wills still waiting for their delay go out now."""
    wills = [(client_id, will) for client_id, (_when, will) in state.delayed_wills.items()]
    state.delayed_wills.clear()
    for client_id, will in wills:
        publish_will(state, will, client_id, "broker shutting down")
