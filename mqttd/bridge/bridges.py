"""Every configured bridge: the local sessions set up before clients connect, the links
run in one nursery and stopped before the store is flushed."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from mqttd.bridge.link import BridgeLink
from mqttd.bridge.mapping import TopicMapping
from mqttd.config import BRIDGE_PREFIX
from persistence import ops

if TYPE_CHECKING:
    from mqttd.engine.dispatch import Engine as Broker
    from mqttd.server.pauses import ReadPauses

log = logging.getLogger("mqttd.bridge")


class Bridges:
    """Every configured bridge, run in one nursery; stopped before the store is flushed."""

    def __init__(self, broker: Broker, pauses: ReadPauses) -> None:
        self.broker = broker
        self.links = [
            BridgeLink(broker, cfg, pauses, TopicMapping(cfg.topics))
            for cfg in broker.config.bridges
        ]
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    def setup(self) -> None:
        """Set up the local side of every bridge (after the store is restored, before
        clients connect). A stored ``$bridge/...`` session of a bridge no longer configured
        is left to expire like any offline session."""
        configured = {link.client_id for link in self.links}
        for client_id, session in self.broker.sessions.items():
            if client_id.startswith(BRIDGE_PREFIX) and client_id not in configured:
                if session.disconnected_at is None:
                    session.disconnected_at = time.time()
                    self.broker.writer.submit(  # type: ignore[union-attr]
                        ops.SaveSession(client_id, session.disconnected_at)
                    )
                log.warning(
                    "session %s belongs to a bridge that is no longer configured: its %d "
                    "stored messages are deleted when the session expires", client_id,
                    session.queued + len(session.inflight),
                )
        for link in self.links:
            link.setup()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for link in self.links:
                        nursery.start_soon(link.run)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._done.wait()

    def stats(self) -> list[dict[str, Any]]:
        return [link.stats() for link in self.links]
