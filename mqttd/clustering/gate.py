"""Replies wait for JetStream too: the gate between the store writer and the engine.

A QoS 1/2 PUBLISH, a SUBSCRIBE of a persistent session, ... are answered once the store's
ticket covering what handling them submitted is committed (``BrokerState.reply``). In
cluster mode some of that goes to JetStream instead of (or besides) SQLite: a retained
message to MQTTD_RET, a copy for a persistent session's queue to MQTTD_Q, a session record
to MQTTD_SESS. Each such write takes a ticket of the store (:meth:`CommitGate.hold`, which
submits a :class:`persistence.ops.Barrier` when nothing else was), and the gate passes the
store's commits on to the engine only up to just before the oldest ticket a cluster write
still holds. So a reply goes when what it acknowledges is in SQLite *and* in JetStream with
its replicas; replies behind it on any connection wait a few milliseconds too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from persistence import ops

if TYPE_CHECKING:
    from mqttd.engine.dispatch import Engine

NO_FLOOR = 1 << 62  # a source holding nothing

Source = Callable[[], int]  # the oldest ticket the source still holds, or NO_FLOOR


@attrs.define(eq=False)
class CommitGate:
    engine: Engine
    sources: list[Source] = attrs.Factory(list)
    store_committed: int = 0
    _engine_on_commit: Any = None

    def install(self) -> None:
        writer = self.engine.writer
        if writer is not None and self._engine_on_commit is None:
            self._engine_on_commit = writer.on_commit  # type: ignore[attr-defined]
            writer.on_commit = self._on_store_commit  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        writer = self.engine.writer
        if writer is not None and self._engine_on_commit is not None:
            writer.on_commit = self._engine_on_commit  # type: ignore[attr-defined]
            self._engine_on_commit = None

    def hold(self) -> int:
        """A ticket for a cluster write of the packet being handled: the store's, after a
        Barrier if handling it has submitted nothing to the store yet."""
        engine = self.engine
        writer = engine.writer
        if writer is None:
            return 0
        if writer.ticket == engine.packet_ticket:
            writer.submit(ops.Barrier())
        return writer.ticket

    def _on_store_commit(self, committed: int) -> None:
        self.store_committed = committed
        self.release()

    def release(self) -> None:
        """A source let go of a ticket (or the store committed): pass the commit on."""
        floor = NO_FLOOR
        for source in self.sources:
            oldest = source()
            if oldest < floor:
                floor = oldest
        if self._engine_on_commit is not None:
            self._engine_on_commit(min(self.store_committed, floor - 1))
