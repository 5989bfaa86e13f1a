"""Opening a database file: schema, pragmas, re-opening, move-aside of unusable files and
refusal of a database written by a newer mqttd."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlite_utils

from persistence.ops import AddDelivery, AddMessage, AddSubscription, SaveSession, SetRetained
from persistence.schema import MIGRATION_SET, SCHEMA_VERSION, migrations
from persistence.store import WRITTEN_BY, NewerSchemaError, SqliteStore, StoreError

TABLES = {
    "sessions",
    "subscriptions",
    "messages",
    "deliveries",
    "inbound_qos2",
    "retained",
    "schema_version",
    "_sqlite_migrations",
}
SQLITE_UTILS_CLI = Path(sys.executable).with_name("sqlite-utils")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mqttd.db"


def write_some_data(path: Path, sessions: int = 3) -> None:
    store = SqliteStore.open(path)
    batch: list = []
    for i in range(1, sessions + 1):
        client_id = f"client-{i}"
        batch += [
            SaveSession(client_id, 100.0 + i),
            AddSubscription(client_id, f"t/{i}/#", 1),
            AddMessage(i, f"t/{i}/x", os.urandom(300), 1),
            AddDelivery(client_id, 1, i, 1, False, 0),
        ]
    batch.append(SetRetained("ret", b"retained", 1))
    store.apply(batch)
    store.close()


def aside_files(path: Path) -> list[Path]:
    """The moved-aside database files (their -wal/-shm companions, if any, left out)."""
    return sorted(
        p for p in path.parent.glob(path.name + ".corrupt-*")
        if not p.name.endswith(("-wal", "-shm"))
    )


# -- schema and pragmas ------------------------------------------------------------------


def test_creates_parent_directory_and_schema(db_path: Path) -> None:
    assert not db_path.parent.exists()
    store = SqliteStore.open(db_path)
    assert store.moved_aside is None
    store.close()
    assert db_path.is_file()
    db = sqlite_utils.Database(db_path)
    try:
        assert TABLES <= set(db.table_names())
        assert [(r["migration_set"], r["name"]) for r in db["_sqlite_migrations"].rows] == [
            (MIGRATION_SET, m.name) for m in migrations._migrations
        ]
        assert list(db["schema_version"].rows) == [
            {"version": SCHEMA_VERSION, "written_by": WRITTEN_BY}
        ]
        assert db["deliveries"].pks == ["client_id", "seq"]
        assert db["subscriptions"].pks == ["client_id", "filter"]
        assert {t.name for t in db.triggers} >= {"deliveries_ref", "deliveries_unref"}
    finally:
        db.close()


def test_schema_listed_by_sqlite_utils_cli(db_path: Path) -> None:
    write_some_data(db_path)
    assert SQLITE_UTILS_CLI.exists(), SQLITE_UTILS_CLI
    result = subprocess.run(
        [str(SQLITE_UTILS_CLI), "tables", str(db_path), "--csv", "--no-headers"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert TABLES <= set(result.stdout.split())
    counted = subprocess.run(
        [str(SQLITE_UTILS_CLI), "rows", str(db_path), "sessions", "--csv"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert len(counted.stdout.strip().splitlines()) == 1 + 3  # header + rows


def test_wal_mode(db_path: Path) -> None:
    store = SqliteStore.open(db_path)
    try:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()
    # WAL is persistent: another connection to the file sees it too
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("durability", "expected"),
    [("process_crash", 1), ("power_loss", 2)],  # NORMAL, FULL
)
def test_durability_sets_synchronous(db_path: Path, durability: str, expected: int) -> None:
    store = SqliteStore.open(db_path, durability)
    try:
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == expected
    finally:
        store.close()


def test_default_durability_is_process_crash(db_path: Path) -> None:
    store = SqliteStore.open(db_path)
    try:
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        store.close()


def test_reopen_keeps_data_and_applies_no_migration_twice(db_path: Path) -> None:
    write_some_data(db_path)
    for _ in range(3):
        store = SqliteStore.open(db_path)
        assert store.moved_aside is None
        counts = store.table_counts()
        store.close()
        assert counts == {
            "sessions": 3, "subscriptions": 3, "messages": 3, "deliveries": 3,
            "inbound_qos2": 0, "retained": 1,
        }
    db = sqlite_utils.Database(db_path)
    try:
        names = [r["name"] for r in db["_sqlite_migrations"].rows]
        assert len(names) == len(set(names)) == len(migrations._migrations)
        assert db["schema_version"].count == 1
    finally:
        db.close()
    store = SqliteStore.open(db_path)
    try:
        snapshot = store.load(now=1000.0)
        assert set(snapshot.sessions) == {"client-1", "client-2", "client-3"}
        assert snapshot.retained == [("ret", b"retained", 1, None, None)]
    finally:
        store.close()
    assert aside_files(db_path) == []


# -- unusable files are moved aside ----------------------------------------------------------


def _assert_fresh_store_works(store: SqliteStore, path: Path) -> None:
    assert store.table_counts() == {
        "sessions": 0, "subscriptions": 0, "messages": 0, "deliveries": 0,
        "inbound_qos2": 0, "retained": 0,
    }
    store.apply([SaveSession("new", 1.0)])
    assert set(store.load(now=10.0).sessions) == {"new"}
    store.close()
    db = sqlite_utils.Database(path)
    try:
        assert TABLES <= set(db.table_names())
        assert db["sessions"].count == 1
    finally:
        db.close()


def test_garbage_file_is_moved_aside(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    garbage = b"not a database " + os.urandom(4096 - 15)
    db_path.write_bytes(garbage)
    store = SqliteStore.open(db_path)
    aside = store.moved_aside
    assert aside is not None
    assert aside_files(db_path) == [aside]
    assert aside.name.startswith("mqttd.db.corrupt-")
    assert aside.read_bytes() == garbage
    _assert_fresh_store_works(store, db_path)
    assert aside.read_bytes() == garbage  # kept, never touched


def test_empty_file_is_a_fresh_database(db_path: Path) -> None:
    # a zero-length file is a valid, empty SQLite database: nothing to move aside
    db_path.parent.mkdir(parents=True)
    db_path.touch()
    store = SqliteStore.open(db_path)
    assert store.moved_aside is None
    _assert_fresh_store_works(store, db_path)


def test_moved_aside_twice_keeps_both_files(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    first, second = os.urandom(4096), os.urandom(8192)
    db_path.write_bytes(first)
    store = SqliteStore.open(db_path)
    aside_1 = store.moved_aside
    store.close()
    db_path.write_bytes(second)
    store = SqliteStore.open(db_path)
    aside_2 = store.moved_aside
    store.close()
    assert aside_1 is not None and aside_2 is not None and aside_1 != aside_2
    assert aside_1.read_bytes() == first
    assert aside_2.read_bytes() == second
    assert set(aside_files(db_path)) == {aside_1, aside_2}


def _corrupt_page_2(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(os.urandom(4096))


def _corrupt_middle(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 4096)


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage", [_corrupt_page_2, _corrupt_middle, _truncate],
                         ids=["page-2", "middle", "truncated"])
def test_damaged_database_is_moved_aside(db_path: Path, damage) -> None:
    write_some_data(db_path, sessions=300)  # many pages
    assert not Path(str(db_path) + "-wal").exists()  # checkpointed into the main file
    size = db_path.stat().st_size
    assert size >= 16 * 4096
    damage(db_path, size)
    damaged = db_path.read_bytes()
    store = SqliteStore.open(db_path)
    aside = store.moved_aside
    assert aside is not None
    assert aside_files(db_path) == [aside]
    assert aside.read_bytes() == damaged
    _assert_fresh_store_works(store, db_path)


# -- a newer schema is refused, not moved ------------------------------------------------


def _assert_refused_untouched(db_path: Path) -> None:
    before = db_path.read_bytes()
    with pytest.raises(NewerSchemaError) as info:
        SqliteStore.open(db_path)
    assert "newer" in str(info.value).lower()
    assert db_path.read_bytes() == before
    assert aside_files(db_path) == []
    # data still there
    db = sqlite_utils.Database(db_path)
    try:
        assert db["sessions"].count == 3
    finally:
        db.close()


def test_newer_schema_version_is_refused(db_path: Path) -> None:
    write_some_data(db_path)
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    _assert_refused_untouched(db_path)
    _assert_refused_untouched(db_path)  # and again: nothing changed the first time


def test_unknown_migration_is_refused(db_path: Path) -> None:
    write_some_data(db_path)
    db = sqlite_utils.Database(db_path)
    db["_sqlite_migrations"].insert(
        {"migration_set": MIGRATION_SET, "name": "9999_from_the_future",
         "applied_at": "2099-01-01 00:00:00+00:00"}
    )
    db.close()
    _assert_refused_untouched(db_path)


def test_other_migration_sets_are_ignored(db_path: Path) -> None:
    """Another tool's migrations in the same file are none of mqttd's business."""
    write_some_data(db_path)
    db = sqlite_utils.Database(db_path)
    db["_sqlite_migrations"].insert(
        {"migration_set": "some-other-tool", "name": "0001_whatever",
         "applied_at": "2099-01-01 00:00:00+00:00"}
    )
    db.close()
    store = SqliteStore.open(db_path)
    try:
        assert store.moved_aside is None
        assert store.table_counts()["sessions"] == 3
    finally:
        store.close()


# -- a database that is merely locked is not corrupt ----------------------------------------


def test_locked_database_is_not_moved_aside(db_path: Path) -> None:
    """A healthy database held by another process with an exclusive lock (SQLITE_BUSY,
    "database is locked") is not corrupt: it must not be renamed aside (which would also
    rename the other process's live -wal file) and replaced with an empty store. Opening
    may fail, but it must leave the file, its data and its companions where they are."""
    write_some_data(db_path)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        other.execute(
            "INSERT INTO sessions (client_id, created_at, disconnected_at) "
            "VALUES ('other-process', 1, 1)"
        )
        other.execute("COMMIT")  # exclusive locking mode: the lock stays held
        with pytest.raises(StoreError, match=r"cannot open database .*locked"):
            SqliteStore.open(db_path)  # waits for the busy timeout, then refuses clearly
        assert aside_files(db_path) == []
        assert Path(str(db_path) + "-wal").exists()  # the other process's WAL is untouched
        assert other.execute("SELECT count(*) FROM sessions").fetchone()[0] == 4
    finally:
        other.close()
    store = SqliteStore.open(db_path)
    try:
        assert store.moved_aside is None
        assert store.table_counts()["sessions"] == 4
    finally:
        store.close()
