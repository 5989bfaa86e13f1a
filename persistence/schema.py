"""Database schema, created and migrated with sqlite-utils' ``Migrations``.

Inspect a database with the sqlite-utils CLI, e.g.::

    sqlite-utils tables data/mqttd.db --counts
    sqlite-utils rows data/mqttd.db sessions

Tables:

- ``sessions``: one row per persistent session (``disconnected_at`` NULL while connected).
  A session expires ``expiry_s`` seconds after it; ``expiry_s`` NULL (3.1.1 sessions) means
  the configured ``persistence.session_expiry_s``, -1 never.
- ``subscriptions``: (client_id, filter) -> granted QoS, the MQTT 5 subscription ``options``
  (the options byte without the QoS bits: No Local, Retain As Published, Retain Handling;
  0 for 3.1.1) and ``subscription_id`` (0: none).
- ``messages``: message bodies (payload as BLOB, never decoded), stored once; ``refs``
  counts the deliveries that refer to a message, kept by triggers, and the row is
  deleted when the last delivery goes. ``properties`` is the encoded MQTT 5 property
  block of the PUBLISH (opaque here; NULL for none), ``expires_at`` the wall-clock epoch
  seconds after which it is not delivered any more (NULL: never).
- ``deliveries``: the per-session queue, in ``seq`` order; ``state`` 0 = queued,
  1 = sent and awaiting PUBACK/PUBREC (``packet_id`` set), 2 = PUBREL sent.
  A delivery through a consumer group keeps ``share`` (its ``$share/<group>/<filter>``),
  ``attempt`` (the number of this delivery of the job; 0 otherwise) and ``first_failure``.
- ``jobs``: consumer-group jobs waiting for a retry (``due_at``), their body in
  ``messages`` (counted in ``refs``).
- ``delayed``: delayed publishes (``$delayed/<seconds>/<topic>``), body included, until
  ``due_at``.
- ``inbound_qos2``: QoS 2 packet ids received and not yet released by PUBREL.
- ``retained``: the retained message per topic, with ``properties`` and ``expires_at`` as
  in ``messages``.
- ``schema_version``: the schema version number and the mqttd version that wrote it
  (``_sqlite_migrations`` lists the migrations applied).
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATION_SET = "mqttd"
migrations = Migrations(MIGRATION_SET)


_INITIAL = [
    """CREATE TABLE sessions (
        client_id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        disconnected_at REAL
    )""",
    """CREATE TABLE subscriptions (
        client_id TEXT NOT NULL,
        filter TEXT NOT NULL,
        qos INTEGER NOT NULL,
        PRIMARY KEY (client_id, filter)
    ) WITHOUT ROWID""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        refs INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE deliveries (
        client_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        packet_id INTEGER,
        state INTEGER NOT NULL,
        PRIMARY KEY (client_id, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE inbound_qos2 (
        client_id TEXT NOT NULL,
        packet_id INTEGER NOT NULL,
        PRIMARY KEY (client_id, packet_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL
    )""",
    """CREATE TRIGGER deliveries_ref AFTER INSERT ON deliveries BEGIN
        UPDATE messages SET refs = refs + 1 WHERE id = NEW.message_id;
    END""",
    """CREATE TRIGGER deliveries_unref AFTER DELETE ON deliveries BEGIN
        UPDATE messages SET refs = refs - 1 WHERE id = OLD.message_id;
        DELETE FROM messages WHERE id = OLD.message_id AND refs <= 0;
    END""",
    """CREATE TABLE schema_version (
        version INTEGER NOT NULL,
        written_by TEXT NOT NULL
    )""",
]


@migrations(name="0001_initial")
def _initial(db: Database) -> None:
    for statement in _INITIAL:
        db.execute(statement)


@migrations(name="0002_message_cleanup_at_commit")
def _message_cleanup_at_commit(db: Database) -> None:
    """Delete a message body at the end of the transaction that drops its last delivery,
    not inside it: a route may drop one session's delivery of a message before it inserts
    another session's (the count touches 0 in between). A partial index finds them."""
    db.execute("DROP TRIGGER deliveries_unref")
    db.execute(
        """CREATE TRIGGER deliveries_unref AFTER DELETE ON deliveries BEGIN
            UPDATE messages SET refs = refs - 1 WHERE id = OLD.message_id;
        END"""
    )
    db.execute("CREATE INDEX messages_unreferenced ON messages (refs) WHERE refs <= 0")


@migrations(name="0003_mqtt5")
def _mqtt5(db: Database) -> None:
    """What MQTT 5.0 adds to a session, a subscription and a message. Every new column is
    NULL or 0 for the rows already there, which is what a 3.1.1 row means."""
    for statement in (
        "ALTER TABLE sessions ADD COLUMN expiry_s INTEGER",
        "ALTER TABLE subscriptions ADD COLUMN options INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE subscriptions ADD COLUMN subscription_id INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE messages ADD COLUMN properties BLOB",
        "ALTER TABLE messages ADD COLUMN expires_at REAL",
        "ALTER TABLE retained ADD COLUMN properties BLOB",
        "ALTER TABLE retained ADD COLUMN expires_at REAL",
        # messages with an expiry only: costs nothing for 3.1.1 traffic
        "CREATE INDEX messages_expiring ON messages (expires_at) WHERE expires_at IS NOT NULL",
    ):
        db.execute(statement)


@migrations(name="0004_work_queues")
def _work_queues(db: Database) -> None:
    """Consumer groups as work queues and delayed publish: a delivery through a group
    keeps the group (``share``), the number of this delivery of the job (``attempt``, 0 for
    a delivery not through a group) and when the job first failed; ``jobs`` holds the jobs
    waiting for a retry (their bodies in ``messages``, counted in ``refs`` like a
    delivery's); ``delayed`` the delayed publishes, whole."""
    for statement in (
        "ALTER TABLE deliveries ADD COLUMN share TEXT",
        "ALTER TABLE deliveries ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN first_failure REAL",
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            share TEXT NOT NULL,
            message_id INTEGER NOT NULL,
            deliveries INTEGER NOT NULL,
            first_failure REAL NOT NULL,
            due_at REAL NOT NULL,
            reason TEXT NOT NULL,
            exclude TEXT
        )""",
        """CREATE TRIGGER jobs_ref AFTER INSERT ON jobs BEGIN
            UPDATE messages SET refs = refs + 1 WHERE id = NEW.message_id;
        END""",
        """CREATE TRIGGER jobs_unref AFTER DELETE ON jobs BEGIN
            UPDATE messages SET refs = refs - 1 WHERE id = OLD.message_id;
        END""",
        """CREATE TABLE delayed (
            id INTEGER PRIMARY KEY,
            due_at REAL NOT NULL,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            properties BLOB,
            expires_at REAL
        )""",
    ):
        db.execute(statement)


SCHEMA_VERSION = len(migrations._migrations)
