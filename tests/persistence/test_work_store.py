"""The store's work-queue and delayed-publish operations (schema 0004): deliveries through a
consumer group keep their group and attempt, jobs waiting for a retry keep their message,
delayed publishes come back whole; migration from schema 3 keeps the data."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlite_utils import Database

from persistence import ops
from persistence.schema import migrations
from persistence.store import DelayedRow, JobRow, SqliteStore
from tests.persistence.test_store import Harness

MORE = ("jobs", "delayed")


@pytest.fixture(params=["memory", "file"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(request.param, tmp_path / "mqttd.db")
    yield harness
    harness.close()


def session(client_id: str) -> ops.SaveSession:
    return ops.SaveSession(client_id, None)


def test_a_shared_delivery_keeps_its_group_and_attempt(h: Harness) -> None:
    h.apply(
        session("w"),
        ops.AddMessage(1, "jobs/1", b"one", 1),
        ops.AddMessage(2, "jobs/2", b"two", 1),
        ops.AddMessage(3, "jobs/3", b"three", 1),
        ops.AddSharedDelivery("w", 1, 1, 1, False, 7, "$share/g/jobs/#"),  # inflight
        ops.AddSharedDelivery("w", 2, 2, 1, False, 0, "$share/g/jobs/#", 3, 123.5),  # queued
        ops.AddDelivery("w", 3, 3, 1, False, 0),  # an ordinary one
    )
    snapshot = h.load()
    w = snapshot.sessions["w"]
    assert [entry[:2] for entry in w.inflight] == [(1, 7)]
    assert w.shares == {1: ("$share/g/jobs/#", 1, None)}
    rows = h.load_queued("w")
    assert [(r.seq, r.share, r.attempt, r.first_failure) for r in rows] == [
        (2, "$share/g/jobs/#", 3, 123.5), (3, None, 0, None),
    ]


def test_a_waiting_job_keeps_its_message_until_it_is_removed(h: Harness) -> None:
    h.apply(
        session("w"),
        ops.AddMessage(1, "jobs/1", b"body", 1, None, None),
        ops.AddSharedDelivery("w", 1, 1, 1, False, 5, "$share/g/jobs/#"),
    )
    # rejected: the delivery goes, the job (a new copy of the body) waits
    h.apply(
        ops.RemoveDelivery("w", 1),
        ops.AddMessage(2, "jobs/1", b"body", 1, b"\x03\x00\x0atext/plain", 99.0),
        ops.AddJob(1, "$share/g/jobs/#", 2, 1, 10.0, 11.0, "rejected", "w"),
    )
    assert h.counts()["messages"] == 1
    snapshot = h.load()
    assert snapshot.jobs == [JobRow(1, "$share/g/jobs/#", 2, 1, 10.0, 11.0, "rejected", "w",
                                    "jobs/1", b"body", 1, b"\x03\x00\x0atext/plain", 99.0)]
    assert snapshot.next_message_id == 3
    # the retry hands it to a persistent member (referring to the body), the job goes
    h.apply(
        ops.AddSharedDelivery("w", 2, 2, 1, False, 6, "$share/g/jobs/#", 2, 10.0),
        ops.RemoveJob(1),
    )
    assert h.store.table_counts(*MORE)["jobs"] == 0
    assert h.counts()["messages"] == 1
    h.apply(ops.RemoveDelivery("w", 2))
    assert h.counts()["messages"] == 0


def test_a_job_acknowledged_in_the_batch_that_queued_it_leaves_nothing(h: Harness) -> None:
    """The group commit leaves out a delivery settled within its batch: a job handed to a
    member and acknowledged before the commit (its AddJob / RemoveJob cancel out)."""
    h.apply(session("w"))
    h.apply(
        ops.AddMessage(1, "jobs/1", b"body", 1),
        ops.AddJob(1, "$share/g/jobs/#", 1, 1, 10.0, 11.0, "rejected", None),
        ops.AddSharedDelivery("w", 1, 1, 1, False, 3, "$share/g/jobs/#", 2, 10.0),
        ops.RemoveJob(1),
        ops.RemoveDelivery("w", 1),
    )
    assert h.store.table_counts(*MORE) == {
        "sessions": 1, "subscriptions": 0, "messages": 0, "deliveries": 0,
        "inbound_qos2": 0, "retained": 0, "jobs": 0, "delayed": 0,
    }


def test_delayed_publishes_come_back_in_due_order(h: Harness) -> None:
    h.apply(
        ops.AddDelayed(1, 50.0, "later/b", b"b", 1, False),
        ops.AddDelayed(2, 20.0, "later/a", b"a", 2, True, b"\x01\x01", 80.0),
        ops.AddDelayed(3, 30.0, "later/c", b"c", 0, False),
        ops.RemoveDelayed(3),
    )
    assert h.load().delayed == [
        DelayedRow(2, 20.0, "later/a", b"a", 2, True, b"\x01\x01", 80.0),
        DelayedRow(1, 50.0, "later/b", b"b", 1, False, None, None),
    ]


def test_schema_3_database_is_migrated_to_4_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.apply(Database(conn), stop_before="0004_work_queues")
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, written_by TEXT)")
    conn.execute("INSERT INTO schema_version VALUES (3, 'mqttd 0.1.0')")
    conn.execute("INSERT INTO sessions (client_id, created_at, disconnected_at) "
                 "VALUES ('old', 1.0, 2.0)")
    conn.execute("INSERT INTO messages (id, topic, payload, qos, refs) "
                 "VALUES (1, 't', x'01', 1, 1)")
    conn.execute("INSERT INTO deliveries (client_id, seq, message_id, qos, retain, packet_id, "
                 "state) VALUES ('old', 1, 1, 1, 0, 4, 1)")
    conn.close()
    store = SqliteStore.open(path)
    try:
        assert store.conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]
        snapshot = store.load(now=3.0)
        old = snapshot.sessions["old"]
        assert [entry[:2] for entry in old.inflight] == [(1, 4)] and old.shares == {}
        assert snapshot.jobs == [] and snapshot.delayed == []
    finally:
        store.close()
