"""The store side of MQTT 5.0: session expiry, subscription options and identifiers, message
properties and expiry; migration 0003 from a schema 2 database.

Everything runs on a real file; the store is closed and opened again before every ``load()``
so that what is checked is what reached the file. ``now`` is passed explicitly: no clock,
no sleeps.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from sqlite_utils import Database

from persistence import ops
from persistence.ops import (
    AddDelivery,
    AddInbound,
    AddMessage,
    AddSubscription,
    LoadQueued,
    QueuedRow,
    SaveSession,
    SetInflight,
    SetReleased,
    SetRetained,
)
from persistence.schema import MIGRATION_SET, SCHEMA_VERSION, migrations
from persistence.store import Snapshot, SqliteStore
from persistence.writer import GroupCommitWriter

NOW = 1_000_000.0
PAST = NOW - 1.0
FUTURE = NOW + 1.0
PROPS = b"\x01\x01\x23\x00\x0atext/plain"  # an opaque property block (never decoded)


class FileStore:
    """A store on a file; ``load()`` closes and reopens it first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SqliteStore.open(path)
        assert self.store.moved_aside is None

    def apply(self, *batch: ops.Op) -> list:
        return self.store.apply(list(batch))

    def reopen(self) -> None:
        self.store.close()
        self.store = SqliteStore.open(self.path)
        assert self.store.moved_aside is None

    def load(self, now: float = NOW, session_expiry_s: int = -1) -> Snapshot:
        self.reopen()
        return self.store.load(now=now, session_expiry_s=session_expiry_s)

    def load_queued(self, client_id: str, after_seq: int = 0, limit: int = 1000) -> list:
        [(_, rows)] = self.apply(LoadQueued(client_id, after_seq, limit, _never_called))
        return rows

    def counts(self) -> dict[str, int]:
        return self.store.table_counts()


def _never_called(rows: list[QueuedRow]) -> None:
    raise AssertionError("apply() must not call LoadQueued callbacks itself")


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FileStore]:
    store = FileStore(tmp_path / "mqttd.db")
    yield store
    store.store.close()


def queue(client_id: str, seq: int, message_id: int, packet_id: int = 0, qos: int = 1,
          retain: bool = False) -> AddDelivery:
    return AddDelivery(client_id, seq, message_id, qos, retain, packet_id)


# -- migration from schema 2 --------------------------------------------------------------


def _build_schema_2_database(path: Path) -> None:
    """A database as mqttd wrote it before 0003: the first two migrations, then rows in the
    schema 2 column layout (the INSERT statements of that version)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    db = Database(conn)
    migrations.apply(db, stop_before="0003_mqtt5")
    assert [m.name for m in migrations.applied(db)] == [
        "0001_initial", "0002_message_cleanup_at_commit",
    ]
    conn.execute("BEGIN")
    conn.execute("INSERT INTO schema_version (version, written_by) VALUES (2, 'mqttd 0.1.0')")
    conn.executemany(
        "INSERT INTO sessions (client_id, created_at, disconnected_at) VALUES (?, ?, ?)",
        [("gone", 1.0, 500.0), ("online", 2.0, None)],
    )
    conn.executemany(
        "INSERT OR REPLACE INTO subscriptions (client_id, filter, qos) VALUES (?, ?, ?)",
        [("gone", "a/#", 1), ("gone", "b/+", 2), ("online", "c", 0)],
    )
    conn.executemany(
        "INSERT INTO messages (id, topic, payload, qos) VALUES (?, ?, ?, ?)",
        [
            (1, "q/1", b"queued", 1),
            (2, "i/1", b"\x00sent", 1),
            (3, "i/2", b"released", 2),
            (4, "shared", b"both", 1),
        ],
    )
    conn.executemany(
        "INSERT INTO deliveries (client_id, seq, message_id, qos, retain, packet_id, state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            ("gone", 1, 2, 1, 0, 7, 1),
            ("gone", 2, 3, 2, 0, 8, 2),
            ("gone", 3, 1, 1, 0, None, 0),
            ("gone", 4, 4, 1, 1, None, 0),
            ("online", 1, 4, 0, 0, None, 0),
        ],
    )
    conn.execute("INSERT INTO inbound_qos2 (client_id, packet_id) VALUES ('gone', 9)")
    conn.execute("INSERT INTO retained (topic, payload, qos) VALUES ('r/1', x'cafe', 1)")
    conn.execute("COMMIT")
    conn.close()


def test_schema_2_database_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    _build_schema_2_database(path)
    fs = FileStore(path)
    try:
        assert SCHEMA_VERSION == 4
        conn = fs.store.conn
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]
        db = Database(conn)
        assert [(r["migration_set"], r["name"]) for r in db["_sqlite_migrations"].rows] == [
            (MIGRATION_SET, "0001_initial"),
            (MIGRATION_SET, "0002_message_cleanup_at_commit"),
            (MIGRATION_SET, "0003_mqtt5"),
            (MIGRATION_SET, "0004_work_queues"),
        ]
        assert {"expiry_s"} <= set(db["sessions"].columns_dict)
        assert {"options", "subscription_id"} <= set(db["subscriptions"].columns_dict)
        assert {"properties", "expires_at"} <= set(db["messages"].columns_dict)
        assert {"properties", "expires_at"} <= set(db["retained"].columns_dict)
        assert db["subscriptions"].pks == ["client_id", "filter"]

        snapshot = fs.load(now=NOW, session_expiry_s=-1)
        assert snapshot.expired == []
        assert snapshot.expired_messages == 0
        assert snapshot.expired_retained == 0
        assert snapshot.next_message_id == 5
        assert snapshot.retained == [("r/1", b"\xca\xfe", 1, None, None)]

        gone = snapshot.sessions["gone"]
        assert gone.disconnected_at == 500.0
        assert gone.expiry_s is None
        assert gone.subscriptions == {"a/#": 1, "b/+": 2}
        assert gone.subscription_options == {}
        assert gone.inflight == [
            (1, 7, 1, 1, False, "i/1", b"\x00sent", None, None),
            (2, 8, 2, 2, False, "i/2", b"released", None, None),
        ]
        assert gone.queued == 2
        assert list(gone.queued_sizes) == [len(b"queued"), len(b"both")]
        assert gone.queued_after == 2
        assert gone.next_seq == 5
        assert gone.inbound_qos2 == {9}
        assert fs.load_queued("gone") == [
            QueuedRow(3, 1, False, "q/1", b"queued", None, None),
            QueuedRow(4, 1, True, "shared", b"both", None, None),
        ]

        online = snapshot.sessions["online"]
        assert online.disconnected_at == NOW  # connected when it stopped
        assert online.expiry_s is None
        assert online.subscriptions == {"c": 0}
        assert online.queued == 1
        assert fs.load_queued("online") == [QueuedRow(1, 0, False, "shared", b"both")]

        # the migrated file takes the new fields, and the old rows keep the old meaning
        fs.apply(
            SaveSession("gone", NOW - 10, 3600),
            AddSubscription("online", "v5/#", 1, 0b1100, 42),
            AddMessage(5, "v5", b"new", 1, PROPS, FUTURE),
            queue("online", 2, 5),
        )
        again = fs.load(now=NOW, session_expiry_s=-1)
        assert again.sessions["gone"].expiry_s == 3600
        assert again.sessions["online"].subscriptions == {"c": 0, "v5/#": 1}
        assert again.sessions["online"].subscription_options == {"v5/#": (0b1100, 42)}
        assert fs.load_queued("online") == [
            QueuedRow(1, 0, False, "shared", b"both", None, None),
            QueuedRow(2, 1, False, "v5", b"new", PROPS, FUTURE),
        ]
        # "online" (no expiry of its own, disconnected at NOW by the first load) follows the
        # configured expiry; "gone" now has its own
        assert fs.load(now=NOW + 50, session_expiry_s=100).expired == []
        assert fs.load(now=NOW + 101, session_expiry_s=100).expired == ["online"]
        assert fs.load(now=NOW + 3591, session_expiry_s=-1).expired == ["gone"]
    finally:
        fs.store.close()


def test_migration_is_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    _build_schema_2_database(path)
    for _ in range(3):
        SqliteStore.open(path).close()
    db = Database(path)
    try:
        names = [r["name"] for r in db["_sqlite_migrations"].rows]
        assert names.count("0003_mqtt5") == 1
        assert db["schema_version"].count == 1
    finally:
        db.close()


# -- round trips ---------------------------------------------------------------------------


def test_session_expiry_round_trip(fs: FileStore) -> None:
    fs.apply(
        SaveSession("v311", 10.0),
        SaveSession("never", 10.0, -1),
        SaveSession("hour", None, 3600),
        SaveSession("changes", None, 60),
    )
    snapshot = fs.load()
    assert {c: s.expiry_s for c, s in snapshot.sessions.items()} == {
        "v311": None, "never": -1, "hour": 3600, "changes": 60,
    }
    # every SaveSession sets the value it carries, None included
    fs.apply(SaveSession("changes", NOW - 20, 120), SaveSession("hour", 20.0))
    snapshot = fs.load()
    assert snapshot.sessions["changes"].expiry_s == 120
    assert snapshot.sessions["changes"].disconnected_at == NOW - 20
    assert snapshot.sessions["hour"].expiry_s is None
    assert fs.store.conn.execute(
        "SELECT expiry_s FROM sessions WHERE client_id = 'never'"
    ).fetchone() == (-1,)


def test_subscription_options_and_identifier_round_trip(fs: FileStore) -> None:
    no_local, retain_as_published = 0b0100, 0b1000
    retain_handling_2 = 0b10_0000
    fs.apply(
        SaveSession("c", 10.0),
        AddSubscription("c", "plain", 1),  # 3.1.1: nothing extra kept
        AddSubscription("c", "zero", 2, 0, 0),
        AddSubscription("c", "nl", 0, no_local),
        AddSubscription("c", "id-only", 1, 0, 268_435_455),  # the largest identifier
        AddSubscription("c", "all", 2, no_local | retain_as_published | retain_handling_2, 7),
        AddSubscription("c", "replaced", 1, retain_as_published, 3),
    )
    c = fs.load().sessions["c"]
    assert c.subscriptions == {
        "plain": 1, "zero": 2, "nl": 0, "id-only": 1, "all": 2, "replaced": 1,
    }
    assert c.subscription_options == {
        "nl": (no_local, 0),
        "id-only": (0, 268_435_455),
        "all": (no_local | retain_as_published | retain_handling_2, 7),
        "replaced": (retain_as_published, 3),
    }
    # a later SUBSCRIBE to the same filter replaces qos, options and identifier
    fs.apply(
        AddSubscription("c", "replaced", 2),
        AddSubscription("c", "plain", 0, retain_handling_2, 9),
    )
    c = fs.load().sessions["c"]
    assert c.subscriptions["replaced"] == 2
    assert c.subscriptions["plain"] == 0
    assert "replaced" not in c.subscription_options
    assert c.subscription_options["plain"] == (retain_handling_2, 9)
    fs.apply(ops.RemoveSubscription("c", "all"))
    c = fs.load().sessions["c"]
    assert "all" not in c.subscriptions and "all" not in c.subscription_options


def test_message_properties_and_expiry_round_trip(fs: FileStore) -> None:
    fs.apply(
        SaveSession("c", 10.0),
        AddMessage(1, "i/1", b"one", 1, PROPS, FUTURE),
        AddMessage(2, "i/2", b"two", 2, b"", None),  # an empty block is not None
        AddMessage(3, "q/3", b"three", 1, None, NOW + 3600.5),
        AddMessage(4, "q/4", b"four", 0),
        queue("c", 1, 1, packet_id=11),
        queue("c", 2, 2, packet_id=12, qos=2),
        queue("c", 3, 3),
        queue("c", 4, 4, qos=0, retain=True),
    )
    fs.apply(SetReleased("c", 2))
    c = fs.load().sessions["c"]
    assert c.inflight == [
        (1, 11, 1, 1, False, "i/1", b"one", PROPS, FUTURE),
        (2, 12, 2, 2, False, "i/2", b"two", b"", None),
    ]
    assert type(c.inflight[0][7]) is bytes
    assert c.queued == 2
    assert fs.load_queued("c") == [
        QueuedRow(3, 1, False, "q/3", b"three", None, NOW + 3600.5),
        QueuedRow(4, 0, True, "q/4", b"four", None, None),
    ]
    assert fs.store.conn.execute(
        "SELECT typeof(properties), typeof(expires_at) FROM messages ORDER BY id"
    ).fetchall() == [("blob", "real"), ("blob", "null"), ("null", "real"), ("null", "null")]


def test_retained_properties_and_expiry_round_trip(fs: FileStore) -> None:
    fs.apply(
        SetRetained("r/props", b"p", 1, PROPS, FUTURE),
        SetRetained("r/plain", b"plain", 0),
        SetRetained("r/replaced", b"old", 1, PROPS, FUTURE),
        SetRetained("r/replaced", b"new", 2),  # a new retained message drops the old fields
    )
    snapshot = fs.load()
    assert snapshot.retained == [
        ("r/plain", b"plain", 0, None, None),
        ("r/props", b"p", 1, PROPS, FUTURE),
        ("r/replaced", b"new", 2, None, None),
    ]
    assert type(snapshot.retained[1][3]) is bytes


# -- session expiry at load ----------------------------------------------------------------


def _populate_sessions(fs: FileStore) -> None:
    fs.apply(
        SaveSession("v311", NOW - 1000),  # expiry NULL: the configured one
        SaveSession("never", NOW - 10**9, -1),
        SaveSession("short", NOW - 1000, 100),
        SaveSession("long", NOW - 1000, 5000),
        SaveSession("boundary", NOW - 1000, 1000),  # exactly at its limit: not yet
        SaveSession("zero", None, 0),  # ends with its connection: gone at restart
        SaveSession("online", None, 10),  # connected at the stop: disconnected now
        AddSubscription("short", "s/#", 1, 0b0100, 5),
        AddMessage(1, "t", b"body", 1),
        queue("short", 1, 1),
        queue("long", 1, 1),
        AddInbound("short", 3),
    )


@pytest.mark.parametrize(
    ("configured", "v311_expired"),
    [(-1, False), (100, True), (999, True), (1000, False), (5000, False)],
)
def test_session_expiry_per_session(fs: FileStore, configured: int, v311_expired: bool) -> None:
    _populate_sessions(fs)
    snapshot = fs.load(now=NOW, session_expiry_s=configured)
    expected = ["short", "v311", "zero"] if v311_expired else ["short", "zero"]
    assert snapshot.expired == expected
    assert set(snapshot.sessions) == (
        {"v311", "never", "short", "long", "boundary", "zero", "online"} - set(expected)
    )
    assert snapshot.sessions["online"].disconnected_at == NOW
    assert snapshot.sessions["long"].queued == 1
    # everything of an expired session went with it (the shared body stays for "long")
    assert fs.counts() == {
        "sessions": 7 - len(expected), "subscriptions": 0, "messages": 1, "deliveries": 1,
        "inbound_qos2": 0, "retained": 0,
    }
    assert snapshot.expired_messages == 0
    # committed: the next load finds nothing more to expire at the same time
    assert fs.load(now=NOW, session_expiry_s=configured).expired == []


def test_session_expiry_counts_from_the_disconnect(fs: FileStore) -> None:
    _populate_sessions(fs)
    fs.load(now=NOW, session_expiry_s=-1)  # "online" now disconnected at NOW
    assert fs.load(now=NOW + 10, session_expiry_s=-1).expired == ["boundary"]
    assert fs.load(now=NOW + 10.5, session_expiry_s=-1).expired == ["online"]
    assert fs.load(now=NOW + 4001, session_expiry_s=-1).expired == ["long"]
    assert set(fs.load(now=NOW * 1000, session_expiry_s=-1).sessions) == {"v311", "never"}


# -- message expiry at load ----------------------------------------------------------------


def _populate_messages(fs: FileStore) -> None:
    fs.apply(
        SaveSession("c", 10.0, -1),
        SaveSession("d", 10.0, -1),
        SaveSession("gone", NOW - 1000, 10),  # expires as a session: not counted per message
        AddMessage(1, "expired/queued", b"a", 1, None, PAST),
        AddMessage(2, "kept/none", b"bb", 1),
        AddMessage(3, "expired/sent", b"ccc", 1, PROPS, PAST),
        AddMessage(4, "expired/released", b"dddd", 2, PROPS, PAST),
        AddMessage(5, "kept/future", b"eeeee", 1, None, FUTURE),
        AddMessage(6, "kept/now", b"ffffff", 1, None, NOW),  # expires_at == now: not yet
        AddMessage(7, "expired/gone", b"g", 1, None, PAST),
        queue("c", 1, 3, packet_id=1),  # state 1 (sent), expired: kept (MQTT-3.3.2-5)
        queue("c", 2, 4, packet_id=2, qos=2),  # state 2 below, expired: kept
        queue("c", 3, 1),  # queued, expired: deleted
        queue("c", 4, 2),
        queue("c", 5, 5),
        queue("c", 6, 6),
        queue("c", 7, 1),  # the same expired body queued twice
        queue("d", 1, 1),  # and for another session
        queue("gone", 1, 7),
        SetRetained("r/expired", b"x", 1, None, PAST),
        SetRetained("r/now", b"y", 1, PROPS, NOW),
        SetRetained("r/forever", b"z", 0),
    )
    fs.apply(SetReleased("c", 2))


def test_expired_messages_are_deleted_at_load(fs: FileStore) -> None:
    _populate_messages(fs)
    snapshot = fs.load(now=NOW, session_expiry_s=-1)
    assert snapshot.expired == ["gone"]
    assert snapshot.expired_messages == 3  # c/3, c/7, d/1
    assert snapshot.expired_retained == 1

    c = snapshot.sessions["c"]
    assert c.inflight == [  # onward delivery has started: resent, never expired
        (1, 1, 1, 1, False, "expired/sent", b"ccc", PROPS, PAST),
        (2, 2, 2, 2, False, "expired/released", b"dddd", PROPS, PAST),
    ]
    assert c.queued == 3
    assert list(c.queued_sizes) == [2, 5, 6]
    assert c.queued_after == 3
    assert c.next_seq == 7
    assert [row.seq for row in fs.load_queued("c")] == [4, 5, 6]
    d = snapshot.sessions["d"]
    assert (d.queued, d.inflight, list(d.queued_sizes)) == (0, [], [])

    assert snapshot.retained == [
        ("r/forever", b"z", 0, None, None),
        ("r/now", b"y", 1, PROPS, NOW),
    ]
    # bodies with no delivery left are gone; the released one stays for its PUBREL
    assert [row[0] for row in fs.store.conn.execute("SELECT id FROM messages ORDER BY id")] == [
        2, 3, 4, 5, 6,
    ]
    assert fs.counts() == {
        "sessions": 2, "subscriptions": 0, "messages": 5, "deliveries": 5,
        "inbound_qos2": 0, "retained": 2,
    }
    # committed: a second load at the same time has nothing to expire
    again = fs.load(now=NOW, session_expiry_s=-1)
    assert (again.expired_messages, again.expired_retained, again.expired) == (0, 0, [])
    assert again.sessions["c"].queued == 3


def test_message_expiry_moves_with_the_clock(fs: FileStore) -> None:
    _populate_messages(fs)
    early = fs.load(now=PAST - 1, session_expiry_s=-1)  # nothing has expired yet
    assert (early.expired_messages, early.expired_retained) == (0, 0)
    assert early.sessions["c"].queued == 5
    assert len(early.sessions["c"].inflight) == 2
    late = fs.load(now=FUTURE + 1, session_expiry_s=-1)
    assert late.expired_messages == 3 + 2  # and now kept/now and kept/future
    assert late.expired_retained == 2
    c = late.sessions["c"]
    assert c.queued == 1 and list(c.queued_sizes) == [2]
    assert [entry[0] for entry in c.inflight] == [1, 2]  # in flight: never expires
    assert c.queued_after == 3 and c.next_seq == 5
    assert [row.seq for row in fs.load_queued("c")] == [4]
    assert late.retained == [("r/forever", b"z", 0, None, None)]


# -- LoadQueued pages ----------------------------------------------------------------------


def test_load_queued_pages_carry_properties_and_expiry(fs: FileStore) -> None:
    fs.apply(SaveSession("c", 10.0, -1))
    batch: list[ops.Op] = []
    for i in range(1, 8):
        properties = None if i % 3 == 0 else b"\x23\x00" + bytes([i])
        expires_at = None if i % 2 == 0 else NOW + i
        batch += [AddMessage(i, f"t/{i}", b"p%d" % i, 1, properties, expires_at),
                  queue("c", i, i, retain=i == 4)]
    fs.apply(*batch)
    expected = [
        QueuedRow(i, 1, i == 4, f"t/{i}", b"p%d" % i,
                  None if i % 3 == 0 else b"\x23\x00" + bytes([i]),
                  None if i % 2 == 0 else NOW + i)
        for i in range(1, 8)
    ]
    fs.reopen()
    pages: list[list[QueuedRow]] = []
    after = 0
    while True:
        page = fs.load_queued("c", after, 3)
        if not page:
            break
        pages.append(page)
        after = page[-1].seq
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [row for page in pages for row in page] == expected
    assert all(type(row.properties) is bytes for row in expected if row.properties is not None)
    # LoadQueued reads back what is stored, expired or not: the session counts the rows it
    # asked for, and the caller drops expired ones (load() deletes them at start-up)
    assert fs.load_queued("c", 0, 100)[0].expires_at == NOW + 1
    snapshot = fs.load(now=NOW + 4.5)
    assert snapshot.expired_messages == 2  # t/1 and t/3
    assert [row.seq for row in fs.load_queued("c")] == [2, 4, 5, 6, 7]


# -- the group-commit writer ---------------------------------------------------------------


async def test_writer_add_message_stores_properties_and_expiry(tmp_path: Path) -> None:
    path = tmp_path / "mqttd.db"
    store = SqliteStore.open(path)
    pages: list[list[QueuedRow]] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            writer = GroupCommitWriter(store)
            writer.next_message_id = 10
            await nursery.start(writer.run)
            writer.submit(SaveSession("c", None, 300))
            writer.submit(AddSubscription("c", "t/#", 2, 0b1000, 17))
            v5 = writer.add_message("t/5", b"five", 1, properties=PROPS, expires_at=FUTURE)
            plain = writer.add_message("t/3", b"three", 1)  # 3.1.1 callers unchanged
            sent = writer.add_message("t/s", b"sent", 2, PROPS, None)
            assert (v5, plain, sent) == (10, 11, 12)
            writer.submit(AddDelivery("c", 1, v5, 1, False, 0))
            writer.submit(AddDelivery("c", 2, plain, 1, False, 0))
            writer.submit(AddDelivery("c", 3, sent, 2, False, 0))
            writer.submit(SetInflight("c", 3, 4))
            writer.submit(LoadQueued("c", 0, 10, pages.append))
            await writer.flush()
            nursery.cancel_scope.cancel()
    await writer.aclose()
    assert pages == [[
        QueuedRow(1, 1, False, "t/5", b"five", PROPS, FUTURE),
        QueuedRow(2, 1, False, "t/3", b"three", None, None),
    ]]
    store = SqliteStore.open(path)
    try:
        snapshot = store.load(now=NOW, session_expiry_s=-1)
    finally:
        store.close()
    c = snapshot.sessions["c"]
    assert c.expiry_s == 300
    assert c.subscription_options == {"t/#": (0b1000, 17)}
    assert c.inflight == [(3, 4, 1, 2, False, "t/s", b"sent", PROPS, None)]
    assert c.queued == 2
    assert snapshot.next_message_id == 13
