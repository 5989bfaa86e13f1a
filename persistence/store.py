"""The SQLite store: opening (with integrity check and move-aside), migrations, applying a
batch of operations in one transaction, and reading the state back at start-up.

Everything here is synchronous and runs on the writer's worker thread (one connection,
``check_same_thread=False``, used by one thread at a time).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from sqlite_utils import Database

from persistence import ops
from persistence.ops import DelayedRow, JobRow
from persistence.schema import MIGRATION_SET, SCHEMA_VERSION, migrations

log = logging.getLogger(__name__)

MEMORY = ":memory:"
WRITTEN_BY = "mqttd 0.1.0"


class StoreError(Exception):
    """The store cannot be used; the message says why and what to do."""


class NewerSchemaError(StoreError):
    pass


class CorruptDatabase(sqlite3.DatabaseError):
    """The file is not a SQLite database, or fails its integrity check."""


class StorageFull(StoreError):
    """A transaction could not be written: the disk (or the filesystem's quota) is full, or
    writing failed. Nothing of it was applied; the same batch can be applied again later."""


@attrs.frozen
class Usage:
    """How much the database holds and how much room its filesystem has left, in bytes
    (``free`` is None for a database in memory)."""

    used: int
    free: int | None


# result codes that mean the file itself is damaged (sqlite3.h); anything else (locked,
# busy, cannot open, permissions) must never cause a healthy file to be moved aside
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
# result codes of a write the disk could not take (disk full, I/O error): the transaction is
# rolled back and can be retried once there is room
_SQLITE_IOERR = 10
_SQLITE_FULL = 13


InflightRow = tuple[int, int, int, int, bool, str, bytes, bytes | None, float | None]
"""(seq, packet_id, state, qos, retain, topic, payload, properties, expires_at)"""

RetainedRow = tuple[str, bytes, int, bytes | None, float | None]
"""(topic, payload, qos, properties, expires_at)"""

ShareRow = tuple[str, int, float | None]
"""(share, attempt, first_failure) of a delivery through a consumer group"""


@attrs.define(eq=False)
class RestoredSession:
    client_id: str
    disconnected_at: float
    subscriptions: dict[str, int] = attrs.Factory(dict)  # filter -> granted QoS
    # in seq order; state 1 (sent) or 2 (PUBREL sent: payload and properties not needed)
    inflight: list[InflightRow] = attrs.Factory(list)
    queued: int = 0  # queued deliveries (state 0), all on disk
    queued_sizes: array[int] = attrs.Factory(lambda: array("Q"))  # their payload sizes
    queued_after: int = 0  # every queued seq is above this
    next_seq: int = 1
    inbound_qos2: set[int] = attrs.Factory(set)
    expiry_s: int | None = None  # as stored by SaveSession: None = configured, -1 = never
    # filter -> (options, subscription_id), only for subscriptions with either non-zero
    subscription_options: dict[str, tuple[int, int]] = attrs.Factory(dict)
    # seq -> the consumer group of an inflight delivery that came through one
    shares: dict[int, ShareRow] = attrs.Factory(dict)


@attrs.define(eq=False)
class Snapshot:
    sessions: dict[str, RestoredSession]
    retained: list[RetainedRow]  # by topic; expired ones already deleted
    next_message_id: int
    expired: list[str]  # client ids of the sessions deleted as expired
    expired_messages: int = 0  # queued (never sent) deliveries deleted as expired
    expired_retained: int = 0  # retained messages deleted as expired
    jobs: list[JobRow] = attrs.Factory(list)  # consumer-group jobs waiting for a retry
    delayed: list[DelayedRow] = attrs.Factory(list)  # delayed publishes, by due time


# Operations applied with one executemany per run of the same type (NamedTuple fields are
# the statement's parameters, in order).
_STATEMENTS: dict[type, tuple[str, ...]] = {
    ops.SaveSession: (
        "INSERT INTO sessions (client_id, created_at, disconnected_at, expiry_s) "
        "VALUES (?1, (julianday('now') - 2440587.5) * 86400.0, ?2, ?3) "
        "ON CONFLICT (client_id) DO UPDATE SET disconnected_at = excluded.disconnected_at, "
        "expiry_s = excluded.expiry_s",
    ),
    ops.DeleteSession: (
        "DELETE FROM deliveries WHERE client_id = ?",
        "DELETE FROM subscriptions WHERE client_id = ?",
        "DELETE FROM inbound_qos2 WHERE client_id = ?",
        "DELETE FROM sessions WHERE client_id = ?",
    ),
    ops.AddSubscription: (
        "INSERT OR REPLACE INTO subscriptions (client_id, filter, qos, options, "
        "subscription_id) VALUES (?, ?, ?, ?, ?)",
    ),
    ops.RemoveSubscription: ("DELETE FROM subscriptions WHERE client_id = ? AND filter = ?",),
    ops.AddMessage: (
        "INSERT INTO messages (id, topic, payload, qos, properties, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
    ),
    ops.AddDelivery: (
        "INSERT INTO deliveries (client_id, seq, message_id, qos, retain, packet_id, state) "
        "VALUES (?1, ?2, ?3, ?4, ?5, NULLIF(?6, 0), CASE WHEN ?6 THEN 1 ELSE 0 END)",
    ),
    ops.AddSharedDelivery: (
        "INSERT INTO deliveries (client_id, seq, message_id, qos, retain, packet_id, state, "
        "share, attempt, first_failure) VALUES (?1, ?2, ?3, ?4, ?5, NULLIF(?6, 0), "
        "CASE WHEN ?6 THEN 1 ELSE 0 END, ?7, ?8, ?9)",
    ),
    ops.AddJob: (
        "INSERT INTO jobs (id, share, message_id, deliveries, first_failure, due_at, reason, "
        "exclude) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    ),
    ops.RemoveJob: ("DELETE FROM jobs WHERE id = ?",),
    ops.AddDelayed: (
        "INSERT INTO delayed (id, due_at, topic, payload, qos, retain, properties, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    ),
    ops.RemoveDelayed: ("DELETE FROM delayed WHERE id = ?",),
    ops.SetInflight: (
        "UPDATE deliveries SET packet_id = ?3, state = 1 WHERE client_id = ?1 AND seq = ?2",
    ),
    ops.SetReleased: ("UPDATE deliveries SET state = 2 WHERE client_id = ?1 AND seq = ?2",),
    ops.RemoveDelivery: ("DELETE FROM deliveries WHERE client_id = ? AND seq = ?",),
    ops.DropOldestQueued: (
        "DELETE FROM deliveries WHERE client_id = ?1 AND seq = (SELECT min(seq) FROM "
        "deliveries WHERE client_id = ?1 AND state = 0 AND seq > ?2)",
    ),
    ops.AddInbound: ("INSERT OR IGNORE INTO inbound_qos2 (client_id, packet_id) VALUES (?, ?)",),
    ops.RemoveInbound: ("DELETE FROM inbound_qos2 WHERE client_id = ? AND packet_id = ?",),
    ops.SetRetained: (
        "INSERT OR REPLACE INTO retained (topic, payload, qos, properties, expires_at) "
        "VALUES (?, ?, ?, ?, ?)",
    ),
    ops.DeleteRetained: ("DELETE FROM retained WHERE topic = ?",),
    ops.Barrier: (),
}

# bodies no delivery refers to any more (partial index messages_unreferenced)
_DELETE_UNREFERENCED = "DELETE FROM messages WHERE refs <= 0"

_LOAD_QUEUED = (
    "SELECT d.seq, d.qos, d.retain, m.topic, m.payload, m.properties, m.expires_at, "
    "d.share, d.attempt, d.first_failure "
    "FROM deliveries d "
    "JOIN messages m ON m.id = d.message_id "
    "WHERE d.client_id = ? AND d.state = 0 AND d.seq > ? ORDER BY d.seq LIMIT ?"
)

# ?1 now, ?2 the configured expiry (for sessions with expiry_s NULL); a negative expiry
# means never, and a session's own expiry 0 means it ended with its connection
_EXPIRED_SESSIONS = (
    "SELECT client_id FROM sessions WHERE CASE "
    "WHEN expiry_s IS NULL THEN ?2 >= 0 AND disconnected_at < ?1 - ?2 "
    "WHEN expiry_s = 0 THEN 1 "
    "ELSE expiry_s > 0 AND disconnected_at < ?1 - expiry_s END "
    "ORDER BY client_id"
)

_LOAD_JOBS = (
    "SELECT j.id, j.share, j.message_id, j.deliveries, j.first_failure, j.due_at, j.reason, "
    "j.exclude, m.topic, m.payload, m.qos, m.properties, m.expires_at "
    "FROM jobs j JOIN messages m ON m.id = j.message_id ORDER BY j.due_at, j.id"
)
_LOAD_DELAYED = (
    "SELECT id, due_at, topic, payload, qos, retain, properties, expires_at FROM delayed "
    "ORDER BY due_at, id"
)

LoadResult = tuple[Callable[[list[ops.QueuedRow]], None], list[ops.QueuedRow]]


class SqliteStore:
    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.conn = conn
        self.path = path
        self.moved_aside: Path | None = None

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, durability: str = "process_crash") -> SqliteStore:
        """Open (creating if needed) and migrate the database. A file that is not a
        database or fails its integrity check is renamed aside, never deleted, and an
        empty store is started in its place. A database written by a newer schema
        raises :class:`NewerSchemaError`."""
        synchronous = "FULL" if durability == "power_loss" else "NORMAL"
        if str(path) == MEMORY:
            store = cls(_connect(MEMORY, synchronous), MEMORY)
            store._migrate()
            return store
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        moved_aside = None
        conn = None
        try:
            conn = _connect(str(path), synchronous)
            _check_integrity(conn)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if not _is_corruption(exc):
                raise StoreError(f"cannot open database {path}: {exc}") from exc
            moved_aside = _move_aside(path)
            log.error(
                "database %s cannot be used (%s): moved it aside to %s and started with an "
                "EMPTY store; the old file is kept for inspection or recovery",
                path, exc, moved_aside,
            )
            conn = _connect(str(path), synchronous)
        store = cls(conn, str(path))
        store.moved_aside = moved_aside
        try:
            store._migrate()
        except BaseException:
            conn.close()
            raise
        return store

    def _migrate(self) -> None:
        db = Database(self.conn)
        known = {m.name for m in migrations._migrations}
        applied = {m.name for m in migrations.applied(db)}
        stored_version = 0
        if "schema_version" in db.table_names():
            row = self.conn.execute("SELECT max(version) FROM schema_version").fetchone()
            stored_version = row[0] or 0
        if applied - known or stored_version > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"database {self.path} has schema version {stored_version} (migrations "
                f"{sorted(applied - known)}) written by a newer mqttd; this mqttd knows "
                f"version {SCHEMA_VERSION}. Upgrade mqttd, or point persistence.data_dir "
                "elsewhere."
            )
        migrations.apply(db)
        if stored_version < SCHEMA_VERSION:
            with db.atomic():
                self.conn.execute("DELETE FROM schema_version")
                self.conn.execute(
                    "INSERT INTO schema_version (version, written_by) VALUES (?, ?)",
                    (SCHEMA_VERSION, WRITTEN_BY),
                )

    def close(self) -> None:
        self.conn.close()

    # -- writing -------------------------------------------------------------------------

    def apply(self, batch: Sequence[ops.Op]) -> list[LoadResult]:
        """Apply ``batch`` in order in one transaction; return the results of the reads."""
        batch = _without_settled(batch)
        conn = self.conn
        results: list[LoadResult] = []
        conn.execute("BEGIN")
        try:
            i, n = 0, len(batch)
            while i < n:
                kind = type(batch[i])
                j = i + 1
                while j < n and type(batch[j]) is kind:
                    j += 1
                if kind is ops.LoadQueued:
                    for op in batch[i:j]:
                        rows = conn.execute(_LOAD_QUEUED, op[:3]).fetchall()  # type: ignore[misc]
                        queued = [
                            ops.QueuedRow(seq, qos, bool(retain), *row)
                            for seq, qos, retain, *row in rows
                        ]
                        results.append((op.callback, queued))  # type: ignore[union-attr]
                elif kind is ops.Barrier:
                    pass
                elif kind is ops.DeleteSession:
                    params = [(op[0],) for op in batch[i:j]]  # type: ignore[misc]
                    for statement in _STATEMENTS[kind]:
                        conn.executemany(statement, params)
                else:
                    for statement in _STATEMENTS[kind]:
                        conn.executemany(statement, batch[i:j])
                i = j
            conn.execute(_DELETE_UNREFERENCED)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and _is_storage_failure(exc):
                raise StorageFull(f"cannot write to {self.path}: {exc}") from exc
            raise
        return results

    def usage(self) -> Usage:
        """Bytes in use by the database (pages holding data; the write-ahead log is reused
        and not counted, though the filesystem's free space reflects it), and the room it
        has for new data: bytes free on its filesystem for an unprivileged
        writer plus the database's own free pages (reused before the file grows; the file
        does not shrink when messages are deleted)."""
        conn = self.conn
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        used = (pages - free_pages) * page_size
        if self.path == MEMORY:
            return Usage(used, None)
        try:
            stat = os.statvfs(Path(self.path).parent)
        except OSError:
            return Usage(used, None)
        return Usage(used, stat.f_bavail * stat.f_frsize + free_pages * page_size)

    def make_room(self) -> None:
        """After a write the disk could not take: copy the write-ahead log into the database
        and truncate it, which gives its space back to the filesystem when the database has
        free pages to take it (best effort)."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.debug("checkpoint after a failed write: %s", exc)

    # -- reading back ----------------------------------------------------------------------

    def load(self, now: float | None = None, session_expiry_s: int = -1) -> Snapshot:
        """Read everything back at start-up, after deleting what expired (see
        `_expire_on_start`), in one transaction."""
        now = time.time() if now is None else now
        conn = self.conn
        conn.execute("BEGIN")
        try:
            expired, expired_messages, expired_retained = _expire_on_start(
                conn, now, session_expiry_s
            )
            sessions, retained, next_message_id = _load_snapshot(conn)
            jobs = [JobRow(*row) for row in conn.execute(_LOAD_JOBS)]
            delayed = [
                DelayedRow(delayed_id, due, topic, payload, qos, bool(retain), props, expires)
                for delayed_id, due, topic, payload, qos, retain, props, expires
                in conn.execute(_LOAD_DELAYED)
            ]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Snapshot(
            sessions, retained, next_message_id, expired, expired_messages, expired_retained,
            jobs, delayed,
        )

    def table_counts(self, *more: str) -> dict[str, int]:
        """Rows per table: the sessions' and retained messages' tables, and ``more`` (e.g.
        "jobs", "delayed")."""
        names = (
            "sessions", "subscriptions", "messages", "deliveries", "inbound_qos2", "retained",
            *more,
        )
        return {
            name: self.conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            for name in names
        }


def _expire_on_start(
    conn: sqlite3.Connection, now: float, session_expiry_s: int
) -> tuple[list[str], int, int]:
    """Delete what expired while the broker was down; return the client ids of the expired
    sessions, and the numbers of expired queued deliveries and retained messages.

    - Sessions that were connected when the broker stopped count as disconnected now.
      A session expires ``expiry_s`` seconds after it disconnected (its own value, from
      SaveSession; 0 ends it with its connection, so it goes now) or, when it has none
      (3.1.1), ``session_expiry_s`` seconds after; -1 never. Expired sessions are deleted
      with everything they hold.
    - Deliveries of messages whose ``expires_at`` is before ``now`` are deleted if still
      queued (state 0); once sent (state 1 or 2) onward delivery has started and the
      message is resent as it was (MQTT-3.3.2-5); expired retained messages are deleted
      too.
    """
    conn.execute("UPDATE sessions SET disconnected_at = ? WHERE disconnected_at IS NULL", (now,))
    expired = [row[0] for row in conn.execute(_EXPIRED_SESSIONS, (now, session_expiry_s))]
    for statement in _STATEMENTS[ops.DeleteSession]:
        conn.executemany(statement, [(c,) for c in expired])
    # rows of sessions that no longer exist, and bodies nothing refers to
    for table in ("deliveries", "subscriptions", "inbound_qos2"):
        conn.execute(
            f"DELETE FROM {table} WHERE client_id NOT IN (SELECT client_id FROM sessions)"
        )
    expired_messages = conn.execute(
        "DELETE FROM deliveries WHERE state = 0 AND message_id IN "
        "(SELECT id FROM messages WHERE expires_at < ?)",
        (now,),
    ).rowcount
    conn.execute(_DELETE_UNREFERENCED)
    expired_retained = conn.execute("DELETE FROM retained WHERE expires_at < ?", (now,)).rowcount
    return expired, expired_messages, expired_retained


def _load_snapshot(
    conn: sqlite3.Connection,
) -> tuple[dict[str, RestoredSession], list[RetainedRow], int]:
    """Read back the sessions, the retained messages (by topic) and the next message id."""
    sessions = {
        client_id: RestoredSession(client_id, disconnected_at, expiry_s=expiry_s)
        for client_id, disconnected_at, expiry_s in conn.execute(
            "SELECT client_id, disconnected_at, expiry_s FROM sessions"
        )
    }
    _load_subscriptions(conn, sessions)
    _load_deliveries(conn, sessions)
    for client_id, packet_id in conn.execute("SELECT client_id, packet_id FROM inbound_qos2"):
        sessions[client_id].inbound_qos2.add(packet_id)
    retained: list[RetainedRow] = conn.execute(
        "SELECT topic, payload, qos, properties, expires_at FROM retained ORDER BY topic"
    ).fetchall()
    (max_id,) = conn.execute("SELECT max(id) FROM messages").fetchone()
    return sessions, retained, (max_id or 0) + 1


def _load_subscriptions(conn: sqlite3.Connection, sessions: dict[str, RestoredSession]) -> None:
    for client_id, topic_filter, qos, options, subscription_id in conn.execute(
        "SELECT client_id, filter, qos, options, subscription_id FROM subscriptions"
    ):
        session = sessions[client_id]
        session.subscriptions[topic_filter] = qos
        if options or subscription_id:
            session.subscription_options[topic_filter] = (options, subscription_id)


def _load_deliveries(conn: sqlite3.Connection, sessions: dict[str, RestoredSession]) -> None:
    """Each session's in-flight deliveries in full (state 1 or 2); of its queued ones
    (state 0, read page by page later) only the count, the sizes and where they start."""
    for (
        client_id, seq, packet_id, state, qos, retain, topic, payload, properties, expires_at,
        share, attempt, first_failure,
    ) in conn.execute(
        "SELECT d.client_id, d.seq, d.packet_id, d.state, d.qos, d.retain, m.topic, "
        "m.payload, m.properties, m.expires_at, d.share, d.attempt, d.first_failure "
        "FROM deliveries d JOIN messages m ON m.id = d.message_id "
        "WHERE d.state > 0 ORDER BY d.client_id, d.seq"
    ):
        session = sessions[client_id]
        session.inflight.append(
            (seq, packet_id, state, qos, bool(retain), topic, payload, properties, expires_at)
        )
        if share is not None:
            session.shares[seq] = (share, attempt, first_failure)
    for client_id, count, first_seq, last_seq in conn.execute(
        "SELECT client_id, sum(state = 0), min(CASE WHEN state = 0 THEN seq END), "
        "max(seq) FROM deliveries GROUP BY client_id"
    ):
        session = sessions[client_id]
        session.queued = count
        session.queued_after = (first_seq - 1) if first_seq is not None else last_seq
        session.next_seq = last_seq + 1
    for client_id, size in conn.execute(
        "SELECT d.client_id, length(m.payload) FROM deliveries d "
        "JOIN messages m ON m.id = d.message_id WHERE d.state = 0 "
        "ORDER BY d.client_id, d.seq"
    ):
        sessions[client_id].queued_sizes.append(size)


def _without_settled(batch: Sequence[ops.Op]) -> Sequence[ops.Op]:
    """Leave out deliveries queued and acknowledged within this batch (a connected
    subscriber acked before the commit), the updates to them, and message bodies that no
    delivery in the batch keeps: the end state of the transaction is the same, with less
    to write."""
    # A delivery is (client, epoch, seq): a session deleted and created again within the
    # batch numbers its deliveries from 1 again, so DeleteSession starts a new epoch.
    epochs: dict[str, int] = {}
    keys: list[tuple[str, int, int] | None] = []
    added: dict[tuple[str, int, int], int] = {}  # delivery -> message id, added in batch
    settled: set[tuple[str, int, int]] = set()
    for op in batch:
        key = None
        if isinstance(op, ops.DeleteSession):
            epochs[op.client_id] = epochs.get(op.client_id, 0) + 1
        elif isinstance(op, _DELIVERY_OPS):
            key = (op.client_id, epochs.get(op.client_id, 0), op.seq)
            if isinstance(op, ops.AddDelivery | ops.AddSharedDelivery):
                added[key] = op.message_id
            elif isinstance(op, ops.RemoveDelivery) and key in added:
                settled.add(key)
        keys.append(key)
    if not settled:
        return batch
    adds_per_message: dict[int, int] = {}
    for message_id in added.values():
        adds_per_message[message_id] = adds_per_message.get(message_id, 0) + 1
    for key in settled:
        adds_per_message[added[key]] -= 1
    dead_messages = {m for m, live in adds_per_message.items() if live == 0}
    kept: list[ops.Op] = []
    for op, key in zip(batch, keys, strict=True):
        if isinstance(op, ops.AddMessage):
            if op.message_id in dead_messages:
                continue
        elif key is not None and key in settled:
            continue
        kept.append(op)
    return kept


_DELIVERY_OPS = (
    ops.AddDelivery, ops.AddSharedDelivery, ops.RemoveDelivery, ops.SetInflight, ops.SetReleased,
)


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


def _check_integrity(conn: sqlite3.Connection) -> None:
    rows: list[Any] = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        raise CorruptDatabase(f"integrity check failed: {rows[:3]}")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()


def _is_storage_failure(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (_SQLITE_FULL, _SQLITE_IOERR)


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, CorruptDatabase):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            extra.rename(aside.with_name(aside.name + suffix))
    return aside


__all__ = [
    "MIGRATION_SET", "DelayedRow", "JobRow", "NewerSchemaError", "Snapshot", "SqliteStore",
    "StorageFull", "StoreError", "Usage",
]
