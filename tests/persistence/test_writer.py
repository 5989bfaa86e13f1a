"""GroupCommitWriter: group commit on a worker thread, tickets, read callbacks, congestion.

Every test is bounded by ``trio.fail_after``; nothing synchronises by sleeping. Where a
test needs a commit to be "in progress", the store's ``apply`` is wrapped so that it
signals the trio side and blocks on a ``threading.Event`` until the test releases it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from persistence import ops
from persistence.ops import AddDelivery, AddSubscription, LoadQueued, QueuedRow, SaveSession
from persistence.store import MEMORY, SqliteStore, Usage
from persistence.writer import GroupCommitWriter

TIMEOUT = 20


class RecordingStore:
    """Wraps a SqliteStore: records every batch; with ``block_first`` the first apply()
    tells the trio side it started and waits until ``release()``."""

    def __init__(self, store: SqliteStore, block_first: bool = False) -> None:
        self.store = store
        self.batches: list[list[ops.Op]] = []
        self.block_first = block_first
        self.started = trio.Event()
        self._release = threading.Event()
        self.threads: set[int] = set()

    def apply(self, batch: Sequence[ops.Op]) -> list:
        self.threads.add(threading.get_ident())
        first = not self.batches
        self.batches.append(list(batch))
        if first and self.block_first:
            trio.from_thread.run_sync(self.started.set)
            # bounded, so that a failing test cannot hang forever in an uncancellable thread
            assert self._release.wait(TIMEOUT), "test never released the blocked commit"
        return self.store.apply(batch)

    def release(self) -> None:
        self._release.set()

    def usage(self) -> Usage:
        return self.store.usage()

    def make_room(self) -> None:
        self.store.make_room()

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def store() -> Iterator[SqliteStore]:
    s = SqliteStore.open(MEMORY)
    yield s
    s.close()


def session_ops(i: int) -> list[ops.Op]:
    client_id = f"c{i}"
    return [SaveSession(client_id, float(i)), AddSubscription(client_id, f"t/{i}", 1)]


async def test_flush_commits_everything(store: SqliteStore) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store)
            await nursery.start(writer.run)
            await writer.flush()  # nothing submitted: returns at once
            for i in range(500):
                for op in session_ops(i):
                    writer.submit(op)
                message_id = writer.add_message(f"t/{i}", b"p%d" % i, 1)
                writer.submit(AddDelivery(f"c{i}", 1, message_id, 1, False, 0))
            assert writer.ticket == 500 * 4
            await writer.flush()
            assert writer.committed == writer.ticket
            assert writer.pending == 0
            assert writer.ops_written == 2000
            assert store.table_counts() == {
                "sessions": 500, "subscriptions": 500, "messages": 500, "deliveries": 500,
                "inbound_qos2": 0, "retained": 0,
            }
            snapshot = store.load(now=1e9)
            assert snapshot.next_message_id == writer.next_message_id == 501
            assert snapshot.sessions["c7"].subscriptions == {"t/7": 1}
            assert snapshot.sessions["c7"].queued == 1
            nursery.cancel_scope.cancel()


async def test_add_message_ids_follow_next_message_id(store: SqliteStore) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store)
            writer.next_message_id = 41  # as restored from Snapshot.next_message_id
            await nursery.start(writer.run)
            ids = [writer.add_message("t", b"x", 0) for _ in range(3)]
            assert ids == [41, 42, 43]
            assert writer.next_message_id == 44
            writer.submit(SaveSession("c", 1.0))
            for seq, message_id in enumerate(ids, 1):
                writer.submit(AddDelivery("c", seq, message_id, 0, False, 0))
            await writer.flush()
            assert store.load(now=2.0).next_message_id == 44
            nursery.cancel_scope.cancel()


async def test_on_commit_tickets_increase_to_the_last(store: SqliteStore) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store)
            seen: list[tuple[int, int]] = []  # (committed ticket, ticket when called)
            writer.on_commit = lambda committed: seen.append((committed, writer.ticket))
            await nursery.start(writer.run)
            for wave in range(20):
                for i in range(wave * 10 + 1):
                    writer.submit(SaveSession(f"w{wave}-{i}", None))
                    if i % 7 == 0:
                        await trio.lowlevel.checkpoint()
                if wave % 3 == 0:
                    await writer.flush()
            await writer.flush()
            tickets = [committed for committed, _ in seen]
            assert tickets, "on_commit was never called"
            assert tickets == sorted(set(tickets)), tickets  # strictly increasing
            assert all(committed <= ticket for committed, ticket in seen)
            assert tickets[-1] == writer.ticket == writer.committed
            assert len(tickets) == writer.commits
            assert store.table_counts()["sessions"] == writer.ticket
            nursery.cancel_scope.cancel()


async def test_a_batch_of_barriers_only_is_committed_without_a_transaction(
    store: SqliteStore,
) -> None:
    """Cluster mode's tickets for writes stored elsewhere (ops.Barrier): a batch of nothing
    else is passed on to on_commit without touching the database; mixed with real ops it is
    one transaction as usual."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store)
            seen: list[int] = []
            writer.on_commit = seen.append
            await nursery.start(writer.run)
            writer.submit(ops.Barrier())
            writer.submit(ops.Barrier())
            await writer.flush()
            assert seen == [2] and writer.commits == 0 and writer.committed == 2
            writer.submit(ops.Barrier())
            writer.submit(SaveSession("s", None))
            await writer.flush()
            assert seen == [2, 4] and writer.commits == 1
            assert store.table_counts()["sessions"] == 1
            nursery.cancel_scope.cancel()


async def test_ops_submitted_during_a_commit_go_into_the_next_batch(store: SqliteStore) -> None:
    recording = RecordingStore(store, block_first=True)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(recording)  # type: ignore[arg-type]
            committed: list[int] = []
            writer.on_commit = committed.append
            await nursery.start(writer.run)
            first = SaveSession("first", None)
            writer.submit(first)
            await recording.started.wait()  # the first commit is running (and blocked)
            later = [SaveSession(f"later-{i}", None) for i in range(5)]
            for op in later:
                writer.submit(op)
            assert writer.pending == 5
            assert writer.committed == 0
            assert committed == []
            recording.release()
            await writer.flush()
            assert recording.batches == [[first], later]
            assert committed == [1, 6]
            assert writer.commits == 2
            assert writer.largest_batch == 5
            nursery.cancel_scope.cancel()
    # one worker thread at a time, never the trio thread
    assert threading.get_ident() not in recording.threads


async def test_burst_of_10k_ops_is_group_committed(store: SqliteStore) -> None:
    recording = RecordingStore(store)
    n = 10_000
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(recording)  # type: ignore[arg-type]
            await nursery.start(writer.run)
            for i in range(n):
                writer.submit(SaveSession(f"c{i}", float(i)))
                if i % 100 == 99:
                    await trio.lowlevel.checkpoint()  # let the writer take what is pending
            await writer.flush()
            assert writer.ops_written == n
            assert writer.commits < n
            assert writer.commits == len(recording.batches)
            assert writer.largest_batch >= 100
            # every op exactly once, in submission order
            flat = [op for batch in recording.batches for op in batch]
            assert [op.client_id for op in flat] == [f"c{i}" for i in range(n)]
            assert store.table_counts()["sessions"] == n
            nursery.cancel_scope.cancel()


async def test_load_queued_callback_runs_after_commit_and_sees_prior_writes(
    store: SqliteStore,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store)
            commits: list[int] = []
            writer.on_commit = commits.append
            await nursery.start(writer.run)

            # committed in an earlier batch
            writer.submit(SaveSession("c", None))
            for seq in (1, 2):
                mid = writer.add_message(f"t/{seq}", b"p%d" % seq, 1)
                writer.submit(AddDelivery("c", seq, mid, 1, False, 0))
            await writer.flush()

            calls: list[tuple[list[QueuedRow], int, list[int], bool]] = []
            trio_thread = threading.get_ident()

            def callback(rows: list[QueuedRow]) -> None:
                calls.append(
                    (rows, writer.committed, list(commits), threading.get_ident() == trio_thread)
                )

            # written in the same batch, before the read
            for seq in (3, 4):
                mid = writer.add_message(f"t/{seq}", b"p%d" % seq, 1)
                writer.submit(AddDelivery("c", seq, mid, 1, False, 0))
            writer.submit(LoadQueued("c", 1, 10, callback))
            read_ticket = writer.ticket
            # written after the read: not seen
            mid = writer.add_message("t/5", b"p5", 1)
            writer.submit(AddDelivery("c", 5, mid, 1, False, 0))
            assert calls == []
            await writer.flush()

            assert len(calls) == 1
            rows, committed_then, commits_then, on_trio_thread = calls[0]
            assert [row.seq for row in rows] == [2, 3, 4]
            assert rows[0] == QueuedRow(2, 1, False, "t/2", b"p2")
            assert committed_then >= read_ticket
            assert commits_then and commits_then[-1] >= read_ticket  # on_commit came first
            assert on_trio_thread
            nursery.cancel_scope.cancel()


async def test_congested_at_max_pending_until_writer_catches_up(store: SqliteStore) -> None:
    recording = RecordingStore(store, block_first=True)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(recording, max_pending=10)  # type: ignore[arg-type]
            await nursery.start(writer.run)
            assert not writer.congested
            await writer.wait_uncongested()  # not congested: returns at once
            writer.submit(SaveSession("first", None))
            await recording.started.wait()  # the writer is busy with the first batch
            for i in range(9):
                writer.submit(SaveSession(f"c{i}", None))
            assert writer.pending == 9
            assert not writer.congested
            writer.submit(SaveSession("c9", None))
            assert writer.pending == 10
            assert writer.congested

            done = trio.Event()

            async def waiter() -> None:
                await writer.wait_uncongested()
                done.set()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # still congested: the commit is blocked
            recording.release()
            await done.wait()
            assert not writer.congested
            await writer.flush()
            assert store.table_counts()["sessions"] == 11
            nursery.cancel_scope.cancel()


async def test_congested_burst_without_blocking(store: SqliteStore) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store, max_pending=100)
            await nursery.start(writer.run)
            for i in range(250):  # no checkpoint: the writer cannot take any of it yet
                writer.submit(SaveSession(f"c{i}", None))
            assert writer.congested
            await writer.wait_uncongested()
            assert not writer.congested
            await writer.flush()
            assert store.table_counts()["sessions"] == 250
            nursery.cancel_scope.cancel()


async def test_file_store_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "mqttd.db"
    store = SqliteStore.open(path)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store)
            await nursery.start(writer.run)
            for i in range(100):
                for op in session_ops(i):
                    writer.submit(op)
            await writer.flush()
            nursery.cancel_scope.cancel()
        await writer.aclose()
    reopened = SqliteStore.open(path)
    try:
        assert reopened.moved_aside is None
        snapshot = reopened.load(now=1000.0)
        assert len(snapshot.sessions) == 100
        assert snapshot.sessions["c42"].subscriptions == {"t/42": 1}
    finally:
        reopened.close()


async def test_failed_commit_is_not_acknowledged(store: SqliteStore) -> None:
    """A batch that fails to commit must not release its acks: run() raises and
    on_commit is not called for it."""
    committed: list[int] = []
    with trio.fail_after(TIMEOUT):
        with pytest.RaisesGroup(sqlite3.IntegrityError, flatten_subgroups=True):
            async with trio.open_nursery() as nursery:
                writer = GroupCommitWriter(store)
                writer.on_commit = committed.append
                await nursery.start(writer.run)
                writer.submit(SaveSession("ok", None))
                await writer.flush()
                writer.submit(ops.AddMessage(1, "t", b"x", 0))
                writer.submit(ops.AddMessage(1, "t", b"x", 0))  # duplicate id
                await writer.flush()
    assert committed == [1]
    assert writer.committed == 1
    assert store.table_counts()["messages"] == 0
