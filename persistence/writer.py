"""Group commit: one writer task applies every pending operation in one transaction on a
worker thread, then tells the broker how far the commits reach.

``submit(op)`` is synchronous and cheap (the broker calls it while routing); each op
gets a ticket number (``ticket`` after the call). After a commit the writer calls
``on_commit(committed)``: every reply the broker held back for a ticket at or below
``committed`` may now go out, since what it acknowledges is on disk. Reads submitted
as ``LoadQueued`` run in order with the writes; their callbacks run after the commit.

Room on disk. After every commit the writer measures the database and its filesystem: the
store is *accepting* while the database is under ``max_disk_bytes`` (-1: no budget) and the
filesystem has at least ``min_free_bytes`` free. A commit the disk cannot take (full, I/O
error) is rolled back and the same batch is tried again every ``retry_s``, ahead of what came
meanwhile, so nothing submitted is lost or reordered and no reply waiting for it goes out.
While the store is not accepting, the writer looks at the disk every ``retry_s`` even when
idle, and ``on_storage(accepting, why)`` tells the broker when that changes, so that it
refuses (or holds) what would need storing and continues by itself when room returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from persistence.ops import AddMessage, Barrier, Op
from persistence.store import SqliteStore, StorageFull, Usage

log = logging.getLogger(__name__)


def _noop(committed: int) -> None:
    pass


def _noop_storage(accepting: bool, why: str) -> None:
    pass


MIB = 1024 * 1024
RESUME_BELOW = 0.9  # of max_disk_bytes: accepting again once the database is under this
RESUME_ABOVE = 1.1  # of min_free_bytes: accepting again once this much is free


class GroupCommitWriter:
    def __init__(
        self,
        store: SqliteStore,
        max_pending: int = 50_000,
        *,
        max_disk_bytes: int = -1,
        min_free_bytes: int = 0,
        retry_s: float = 1.0,
    ) -> None:
        self.store = store
        self.max_pending = max_pending
        self.max_disk_bytes = max_disk_bytes
        self.min_free_bytes = min_free_bytes
        self.retry_s = retry_s
        self.accepting = True  # room for new data (see the module's docstring)
        self.storage_problem = ""  # why not, while not accepting
        self.usage: Usage | None = None  # as measured after the last commit
        self.on_commit: Callable[[int], None] = _noop
        self.on_storage: Callable[[bool, str], None] = _noop_storage
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
        self.storage_failures = 0  # commits the disk could not take (tried again later)

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
                await self._wait_for_work()
                if not self._pending:
                    continue  # looked at the disk again (not accepting)
            batch, self._pending = self._pending, []
            upto = self.ticket
            if batch[0].__class__ is Barrier and all(op.__class__ is Barrier for op in batch):
                # only tickets for writes stored elsewhere (cluster mode): no transaction
                self.committed = upto
                self.on_commit(upto)
                self._progress.set()
                self._progress = trio.Event()
                continue
            started = trio.current_time()
            try:
                # not cancellable: a transaction that started is finished
                results, usage = await trio.to_thread.run_sync(
                    self._apply, batch, limiter=self._limiter
                )
            except StorageFull as exc:
                self._pending[:0] = batch  # the same batch again, ahead of what came since
                self.storage_failures += 1
                self._set_accepting(False, str(exc))
                await trio.sleep(self.retry_s)
                await trio.to_thread.run_sync(self.store.make_room, limiter=self._limiter)
                continue
            self.commit_seconds += trio.current_time() - started
            self.commits += 1
            self.ops_written += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            self.committed = upto
            self._measured(usage)
            self.on_commit(upto)
            for callback, rows in results:
                callback(rows)
            self._progress.set()
            self._progress = trio.Event()

    async def _wait_for_work(self) -> None:
        """Until something is submitted; while not accepting, at most ``retry_s``, after
        which the disk is measured again."""
        self._idle = True
        if self.accepting:
            await self._wakeup.wait()
        else:
            with trio.move_on_after(self.retry_s):
                await self._wakeup.wait()
            if self._idle:  # nothing came: is there room again?
                self._idle = False
                usage = await trio.to_thread.run_sync(self.store.usage, limiter=self._limiter)
                self._measured(usage)
                return
        self._wakeup = trio.Event()

    def _apply(self, batch: list[Op]) -> tuple[list[Any], Usage]:
        results = self.store.apply(batch)
        return results, self.store.usage()

    def _measured(self, usage: Usage) -> None:
        self.usage = usage
        budget, reserve = self.max_disk_bytes, self.min_free_bytes
        resume = not self.accepting
        if budget >= 0 and usage.used >= budget * (RESUME_BELOW if resume else 1.0):
            self._set_accepting(False, (
                f"the database uses {usage.used / MIB:.1f} MiB, at its budget "
                f"(persistence.max_disk_bytes {budget / MIB:.1f} MiB)"
            ))
        elif usage.free is not None and usage.free < reserve * (RESUME_ABOVE if resume else 1.0):
            self._set_accepting(False, (
                f"{usage.free / MIB:.1f} MiB free on the data directory's filesystem, under "
                f"persistence.min_free_disk_bytes ({reserve / MIB:.1f} MiB)"
            ))
        else:
            self._set_accepting(True, "")

    def _set_accepting(self, accepting: bool, why: str) -> None:
        changed = accepting != self.accepting
        self.accepting = accepting
        self.storage_problem = why
        if not changed:
            return
        if accepting:
            log.warning("storage has room again: accepting messages that need storing")
        else:
            log.error(
                "storage is short: %s. Messages that need storing are refused (MQTT 5: "
                "Quota exceeded) or their publishers held (3.1.1) until there is room; "
                "everything acknowledged so far is kept", why,
            )
        self.on_storage(accepting, why)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.store.close, limiter=self._limiter)
