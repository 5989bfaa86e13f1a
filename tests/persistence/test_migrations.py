"""A database written by an earlier schema is migrated on open, keeping its data."""

import sqlite3

from sqlite_utils import Database

from persistence import ops
from persistence.schema import SCHEMA_VERSION, migrations
from persistence.store import SqliteStore


def test_schema_1_database_is_migrated_and_keeps_its_data(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.apply(Database(conn), stop_before="0002_message_cleanup_at_commit")
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, written_by TEXT)")
    conn.execute("INSERT INTO schema_version VALUES (1, 'mqttd 0.1.0')")
    conn.execute("INSERT INTO sessions VALUES ('old-client', 1.0, 2.0)")
    conn.execute(
        "INSERT INTO messages (id, topic, payload, qos, refs) VALUES (1, 't', x'01', 1, 0)"
    )
    conn.execute("INSERT INTO deliveries VALUES ('old-client', 1, 1, 1, 0, NULL, 0)")
    conn.close()

    store = SqliteStore.open(path)
    try:
        assert store.conn.execute("SELECT max(version) FROM schema_version").fetchone() == (
            SCHEMA_VERSION,
        )
        assert SCHEMA_VERSION == 4
        snapshot = store.load(now=3.0)
        assert snapshot.sessions["old-client"].queued == 1
        # the new behaviour: a body goes at the end of the transaction that drops its last
        # delivery, even if the count touched zero in the middle of it
        store.apply([
            ops.AddMessage(2, "t", b"two", 1),
            ops.AddDelivery("old-client", 2, 2, 1, False, 0),
            ops.RemoveDelivery("old-client", 2),
            ops.AddDelivery("old-client", 3, 2, 1, False, 0),
        ])
        assert store.table_counts()["messages"] == 2
        store.apply([ops.RemoveDelivery("old-client", 3), ops.RemoveDelivery("old-client", 1)])
        assert store.table_counts()["messages"] == 0
    finally:
        store.close()
