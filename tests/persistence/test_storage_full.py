"""The writer when the disk cannot take more: a commit that fails is rolled back and tried
again, in order, until there is room; the broker is told (``on_storage``) when the store
stops and starts accepting new data; a disk budget and a free-space reserve are kept.

"Disk full" here is SQLite's own: ``PRAGMA max_page_count`` makes a real database file
answer SQLITE_FULL ("database or disk is full") exactly as a full filesystem does, and
raising it again is the room coming back. (tests/backpressure/test_disk_full.py fills a
real small filesystem.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from persistence import ops
from persistence.ops import AddDelivery, DeleteSession, SaveSession
from persistence.store import SqliteStore, Usage
from persistence.writer import GroupCommitWriter

TIMEOUT = 20
PAYLOAD = bytes(4096)


class LimitedStore:
    """A SqliteStore on a file whose size is capped at ``limit_pages`` (None: no cap), the
    cap applied on the writer's thread before each operation."""

    def __init__(self, path: Path) -> None:
        self.store = SqliteStore.open(path)
        self.limit_pages: int | None = None

    def _limit(self) -> None:
        limit = self.limit_pages if self.limit_pages is not None else 1 << 30
        self.store.conn.execute(f"PRAGMA max_page_count = {limit}")

    def apply(self, batch: Sequence[ops.Op]) -> list:
        self._limit()
        return self.store.apply(batch)

    def usage(self) -> Usage:
        self._limit()
        return self.store.usage()

    def make_room(self) -> None:
        self.store.make_room()

    def close(self) -> None:
        self.store.close()

    def page_count(self) -> int:
        return int(self.store.conn.execute("PRAGMA page_count").fetchone()[0])


def stored_messages(path: Path) -> list[int]:
    """The packet ids of session c's deliveries in the database, in delivery order."""
    store = SqliteStore.open(path)
    try:
        session = store.load(now=1.0).sessions["c"]
    finally:
        store.close()
    return [row[1] for row in sorted(session.inflight)]


async def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition the writer's task changes, with a bound."""
    with trio.fail_after(TIMEOUT):
        while not condition():
            await trio.sleep(0.01)


async def test_a_commit_the_disk_cannot_take_is_retried_in_order_until_there_is_room(
    tmp_path: Path,
) -> None:
    limited = LimitedStore(tmp_path / "full.db")
    changes: list[tuple[bool, str]] = []
    committed: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(limited, retry_s=0.02)  # type: ignore[arg-type]
            writer.on_storage = lambda accepting, why: changes.append((accepting, why))
            writer.on_commit = committed.append
            await nursery.start(writer.run)
            writer.submit(SaveSession("c", None))
            await writer.flush()
            limited.limit_pages = limited.page_count() + 20  # ~80 KiB more, then "full"
            for seq in range(1, 101):  # 100 x 4 KiB: cannot fit
                message_id = writer.add_message("t", PAYLOAD, 1)
                writer.submit(AddDelivery("c", seq, message_id, 1, False, seq))
            await wait_for(lambda: writer.storage_failures >= 2, "two failed commits")
            assert not writer.accepting
            assert changes == [(False, changes[0][1])]
            assert "database or disk is full" in changes[0][1]
            assert writer.committed < writer.ticket  # nothing of the batch was applied
            limited.limit_pages = None  # room again
            await writer.flush()
            assert writer.committed == writer.ticket
            assert [c[0] for c in changes] == [False, True]
            nursery.cancel_scope.cancel()
    limited.close()
    # every delivery is stored, with the packet ids given in submission order
    assert stored_messages(tmp_path / "full.db") == list(range(1, 101))


async def test_the_disk_budget_stops_and_resumes_accepting(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "budget.db")
    changes: list[bool] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store, max_disk_bytes=512 * 1024, retry_s=0.02)
            writer.on_storage = lambda accepting, why: changes.append(accepting)
            await nursery.start(writer.run)
            writer.submit(SaveSession("c", None))
            seq = 0
            while writer.accepting:  # the broker would stop storing here
                for _ in range(20):
                    seq += 1
                    writer.submit(AddDelivery("c", seq, writer.add_message("t", PAYLOAD, 1),
                                              1, False, 0))
                await writer.flush()
            assert changes == [False]
            assert writer.usage is not None and writer.usage.used >= 512 * 1024
            assert "persistence.max_disk_bytes" in writer.storage_problem
            writer.submit(DeleteSession("c"))  # a consumer took it all: the pages are free
            await writer.flush()
            await wait_for(lambda: writer.accepting, "accepting again")
            assert changes == [False, True]
            nursery.cancel_scope.cancel()
    store.close()


async def test_the_free_space_reserve_stops_accepting_and_says_why(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "reserve.db")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            # a reserve larger than any disk: never accepting, and it keeps looking
            writer = GroupCommitWriter(store, min_free_bytes=1 << 62, retry_s=0.02)
            await nursery.start(writer.run)
            writer.submit(SaveSession("c", None))
            await writer.flush()
            assert not writer.accepting
            assert "persistence.min_free_disk_bytes" in writer.storage_problem
            writer.min_free_bytes = 0  # as if space had been freed on the filesystem
            await wait_for(lambda: writer.accepting, "accepting again while idle")
            nursery.cancel_scope.cancel()
    store.close()
