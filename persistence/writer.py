"""Group commit: one writer task applies every pending operation in one transaction on a
worker thread, then tells the broker how far the commits reach.

``submit(op)`` is synchronous and cheap (the broker calls it while routing); each op
gets a ticket number (``ticket`` after the call). After a commit the writer calls
``on_commit(committed)``: every reply the broker held back for a ticket at or below
``committed`` may now go out, since what it acknowledges is on disk. Reads submitted
as ``LoadQueued`` run in order with the writes; their callbacks run after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from persistence.ops import AddMessage, Op
from persistence.store import SqliteStore

log = logging.getLogger(__name__)


def _noop(committed: int) -> None:
    pass


class GroupCommitWriter:
    def __init__(self, store: SqliteStore, max_pending: int = 50_000) -> None:
        self.store = store
        self.max_pending = max_pending
        self.on_commit: Callable[[int], None] = _noop
        self.next_message_id = 1
        self.ticket = 0  # operations submitted
        self.committed = 0  # operations committed
        self._pending: list[Op] = []
        self._idle = False
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        # counters
        self.commits = 0
        self.ops_written = 0
        self.largest_batch = 0
        self.commit_seconds = 0.0

    def submit(self, op: Op) -> None:
        self._pending.append(op)
        self.ticket += 1
        if self._idle:
            self._idle = False
            self._wakeup.set()

    def add_message(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: bytes | None = None,
        expires_at: float | None = None,
    ) -> int:
        """Store a message body once; returns its id for the deliveries that refer to it.
        ``properties``/``expires_at``: the MQTT 5 property block and expiry (see AddMessage)."""
        message_id = self.next_message_id
        self.next_message_id = message_id + 1
        self.submit(AddMessage(message_id, topic, payload, qos, properties, expires_at))
        return message_id

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def congested(self) -> bool:
        return len(self._pending) >= self.max_pending

    async def wait_uncongested(self) -> None:
        while self.congested:
            await self._progress.wait()

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed."""
        target = self.ticket
        while self.committed < target:
            await self._progress.wait()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._pending:
                self._idle = True
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            batch, self._pending = self._pending, []
            upto = self.ticket
            started = trio.current_time()
            # not cancellable: a transaction that started is finished
            results = await trio.to_thread.run_sync(
                self.store.apply, batch, limiter=self._limiter
            )
            self.commit_seconds += trio.current_time() - started
            self.commits += 1
            self.ops_written += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            self.committed = upto
            self.on_commit(upto)
            for callback, rows in results:
                callback(rows)
            self._progress.set()
            self._progress = trio.Event()

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.store.close, limiter=self._limiter)
