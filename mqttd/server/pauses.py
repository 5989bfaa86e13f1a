"""Where readers wait while the engine's flow control pauses them (the store writer is
behind, the broker's unsent output is over its budget, a connection has too many acks
waiting for a commit): one trio Event per wave of progress, set when output was sent or a
commit finished. Used by the client connections and the bridges' links alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from mqttd.connection import Connection
    from mqttd.engine.dispatch import Engine


class ReadPauses:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._progress = trio.Event()
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Also call ``listener`` at every :meth:`notify` while readers are paused (the
        reactor's paused connections: mqttd.server.reactor)."""
        self._listeners.append(listener)

    def notify(self) -> None:
        """Output was sent or a commit finished: paused readers look again."""
        if self.engine.paused_readers:
            self._progress.set()
            self._progress = trio.Event()
            for listener in self._listeners:
                listener()

    async def wait_readable(self, conn: Connection) -> None:
        """Wait until reading from ``conn`` may go on (Engine.reading_paused); while it waits
        past ``stalled_output_timeout_s``, disconnect the stalled clients."""
        engine = self.engine
        engine.read_pauses += 1
        engine.paused_readers += 1
        try:
            while engine.reading_paused(conn) and not conn.closing:
                with trio.move_on_after(self.stall_wait_s(conn)):
                    await self._progress.wait()
                    continue
                self.stall_check(conn)
        finally:
            engine.paused_readers -= 1

    # (the reactor's paused connections wait on its timers with these two)

    def stall_wait_s(self, conn: Connection) -> float:
        """How long the paused reader of ``conn`` waits for progress before it looks at
        what holds it: held by subscribers it feeds, until the first of them would count
        as stalled (mqttd.engine.flow); else ``stalled_output_timeout_s``."""
        deadline = self.engine.flow.stall_deadline(conn)
        if deadline is None:
            return self.engine.config.limits.stalled_output_timeout_s
        return max(deadline - time.monotonic(), 0.0)

    def stall_check(self, conn: Connection) -> None:
        """That wait ran out: the subscribers holding ``conn`` whose output has not moved
        count as stalled (releasing it), and stalled clients are disconnected while the
        broker is over its buffer limit."""
        engine = self.engine
        engine.flow.release_stalled(conn, time.monotonic())
        engine.disconnect_stalled_clients(trio.current_time())
