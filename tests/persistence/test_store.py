"""SqliteStore: every operation applied, then restored through ``load()``.

Each test runs against ``:memory:`` and against a real file; for the file, the store is
closed and opened again from disk before ``load()`` (and before the counts that follow a
reload), so what is checked is what reached the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from persistence import ops
from persistence.ops import (
    AddDelivery,
    AddInbound,
    AddMessage,
    AddSubscription,
    DeleteRetained,
    DeleteSession,
    DropOldestQueued,
    LoadQueued,
    QueuedRow,
    RemoveDelivery,
    RemoveInbound,
    RemoveSubscription,
    SaveSession,
    SetInflight,
    SetReleased,
    SetRetained,
)
from persistence.store import MEMORY, RestoredSession, Snapshot, SqliteStore

NOW = 1_000_000.0
EMPTY_COUNTS = {
    "sessions": 0,
    "subscriptions": 0,
    "messages": 0,
    "deliveries": 0,
    "inbound_qos2": 0,
    "retained": 0,
}


class Harness:
    """One store, opened from ``:memory:`` or a file; ``reopen()`` closes and re-opens the
    file (a no-op in memory)."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self.store = SqliteStore.open(MEMORY if kind == "memory" else path)
        assert self.store.moved_aside is None

    def apply(self, *batch: ops.Op) -> list:
        return self.store.apply(list(batch))

    def reopen(self) -> None:
        if self.kind == "file":
            self.store.close()
            self.store = SqliteStore.open(self.path)
            assert self.store.moved_aside is None

    def load(self, now: float = NOW, session_expiry_s: int = -1) -> Snapshot:
        self.reopen()
        return self.store.load(now=now, session_expiry_s=session_expiry_s)

    def counts(self) -> dict[str, int]:
        return self.store.table_counts()

    def load_queued(self, client_id: str, after_seq: int = 0, limit: int = 1000) -> list:
        [(_, rows)] = self.apply(LoadQueued(client_id, after_seq, limit, _ignore))
        return rows

    def close(self) -> None:
        self.store.close()


def _ignore(rows: list[QueuedRow]) -> None:
    raise AssertionError("apply() must not call LoadQueued callbacks itself")


@pytest.fixture(params=["memory", "file"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(request.param, tmp_path / "mqttd.db")
    yield harness
    harness.close()


def message(message_id: int) -> AddMessage:
    return AddMessage(message_id, f"topic/{message_id}", b"payload-%d" % message_id, 1)


def queue(client_id: str, seq: int, message_id: int, packet_id: int = 0, qos: int = 1,
          retain: bool = False) -> AddDelivery:
    return AddDelivery(client_id, seq, message_id, qos, retain, packet_id)


# -- empty -----------------------------------------------------------------------------


def test_empty_store_loads_empty(h: Harness) -> None:
    snapshot = h.load()
    assert snapshot.sessions == {}
    assert snapshot.retained == []
    assert snapshot.expired == []
    assert snapshot.next_message_id == 1
    assert h.counts() == EMPTY_COUNTS


def test_apply_empty_batch(h: Harness) -> None:
    assert h.apply() == []
    assert h.counts() == EMPTY_COUNTS


# -- sessions --------------------------------------------------------------------------


def test_save_session_connected_and_disconnected(h: Harness) -> None:
    h.apply(SaveSession("connected", None), SaveSession("gone", 500.0))
    snapshot = h.load(now=NOW)
    assert set(snapshot.sessions) == {"connected", "gone"}
    connected = snapshot.sessions["connected"]
    assert isinstance(connected, RestoredSession)
    # connected when the broker stopped: counts as disconnected at load time
    assert connected.disconnected_at == NOW
    assert snapshot.sessions["gone"].disconnected_at == 500.0
    # an empty session
    assert connected.subscriptions == {}
    assert connected.inflight == []
    assert connected.queued == 0
    assert connected.queued_after == 0
    assert connected.next_seq == 1
    assert connected.inbound_qos2 == set()
    # load() wrote the disconnect time back: a later load keeps it
    again = h.load(now=NOW + 50)
    assert again.sessions["connected"].disconnected_at == NOW


def test_save_session_updates_disconnected_at(h: Harness) -> None:
    h.apply(SaveSession("c", 100.0))
    h.apply(SaveSession("c", None))  # reconnected
    h.apply(SaveSession("c", 250.0))  # disconnected again
    snapshot = h.load()
    assert snapshot.sessions["c"].disconnected_at == 250.0
    assert h.counts()["sessions"] == 1


def _populate_two_sessions(h: Harness) -> None:
    h.apply(
        SaveSession("a", None),
        SaveSession("b", None),
        AddSubscription("a", "x/#", 1),
        AddSubscription("a", "y", 2),
        AddSubscription("b", "x/#", 0),
        message(1),  # only for a
        message(2),  # for a and b
        message(3),  # only for a, inflight
        queue("a", 1, 3, packet_id=11),
        queue("a", 2, 1),
        queue("a", 3, 2),
        queue("b", 1, 2),
        AddInbound("a", 5),
        AddInbound("a", 6),
        AddInbound("b", 5),
        SetRetained("r", b"kept", 1),
    )


def test_delete_session_removes_everything_it_owns(h: Harness) -> None:
    _populate_two_sessions(h)
    assert h.counts() == {
        "sessions": 2, "subscriptions": 3, "messages": 3, "deliveries": 4,
        "inbound_qos2": 3, "retained": 1,
    }
    h.apply(DeleteSession("a"))
    # done by the operation itself, not by load()'s clean-up
    expected = {
        "sessions": 1, "subscriptions": 1, "messages": 1, "deliveries": 1,
        "inbound_qos2": 1, "retained": 1,
    }
    assert h.counts() == expected
    snapshot = h.load()
    assert h.counts() == expected
    assert set(snapshot.sessions) == {"b"}
    b = snapshot.sessions["b"]
    assert b.subscriptions == {"x/#": 0}
    assert b.queued == 1
    assert b.inbound_qos2 == {5}
    assert h.load_queued("b") == [QueuedRow(1, 1, False, "topic/2", b"payload-2")]
    assert snapshot.retained == [("r", b"kept", 1, None, None)]


def test_delete_unknown_session_is_harmless(h: Harness) -> None:
    _populate_two_sessions(h)
    before = h.counts()
    h.apply(DeleteSession("nobody"))
    assert h.counts() == before


def test_delete_then_recreate_session_in_one_batch(h: Harness) -> None:
    _populate_two_sessions(h)
    h.apply(DeleteSession("a"), SaveSession("a", 42.0), AddSubscription("a", "new", 1))
    snapshot = h.load()
    a = snapshot.sessions["a"]
    assert a.disconnected_at == 42.0
    assert a.subscriptions == {"new": 1}
    assert a.inflight == []
    assert a.queued == 0
    assert a.inbound_qos2 == set()


# -- subscriptions ---------------------------------------------------------------------


def test_add_and_remove_subscriptions(h: Harness) -> None:
    h.apply(
        SaveSession("c", None),
        AddSubscription("c", "x/#", 1),
        AddSubscription("c", "y", 0),
        AddSubscription("c", "z/+/w", 2),
    )
    h.apply(
        AddSubscription("c", "x/#", 2),  # re-subscribe: replaces the qos
        RemoveSubscription("c", "y"),
        RemoveSubscription("c", "not-subscribed"),
    )
    snapshot = h.load()
    assert snapshot.sessions["c"].subscriptions == {"x/#": 2, "z/+/w": 2}
    assert h.counts()["subscriptions"] == 2


def test_readd_subscription_in_same_batch_keeps_last_qos(h: Harness) -> None:
    h.apply(
        SaveSession("c", None),
        AddSubscription("c", "t", 0),
        AddSubscription("c", "t", 2),
        AddSubscription("c", "t", 1),
    )
    assert h.load().sessions["c"].subscriptions == {"t": 1}


# -- deliveries ------------------------------------------------------------------------


def test_queued_and_inflight_deliveries(h: Harness) -> None:
    h.apply(
        SaveSession("c", 10.0),
        AddMessage(1, "a/b", b"\x00\xff\xfe binary", 1),
        AddMessage(2, "a/c", b"two", 2),
        AddMessage(3, "q/1", b"three", 1),
        AddMessage(4, "q/2", b"four", 0),
        AddMessage(5, "q/3", b"", 1),
        queue("c", 5, 1, packet_id=7, qos=1, retain=True),
        queue("c", 6, 2, packet_id=8, qos=2),
        queue("c", 7, 3, qos=1),
        queue("c", 8, 4, qos=0, retain=True),
        queue("c", 9, 5, qos=1),
    )
    snapshot = h.load()
    c = snapshot.sessions["c"]
    assert c.inflight == [
        (5, 7, 1, 1, True, "a/b", b"\x00\xff\xfe binary", None, None),
        (6, 8, 1, 2, False, "a/c", b"two", None, None),
    ]
    for entry in c.inflight:
        assert type(entry[4]) is bool
        assert type(entry[6]) is bytes
    assert c.queued == 3
    assert c.queued_after == 6
    assert c.next_seq == 10
    assert snapshot.next_message_id == 6
    assert h.load_queued("c") == [
        QueuedRow(7, 1, False, "q/1", b"three"),
        QueuedRow(8, 0, True, "q/2", b"four"),
        QueuedRow(9, 1, False, "q/3", b""),
    ]
    # the delivery row stores the state the store derived from packet_id
    rows = h.store.conn.execute(
        "SELECT seq, packet_id, state FROM deliveries WHERE client_id = 'c' ORDER BY seq"
    ).fetchall()
    assert rows == [(5, 7, 1), (6, 8, 1), (7, None, 0), (8, None, 0), (9, None, 0)]


def test_session_with_only_inflight(h: Harness) -> None:
    h.apply(
        SaveSession("c", 10.0),
        message(1),
        message(2),
        queue("c", 3, 1, packet_id=1),
        queue("c", 4, 2, packet_id=2),
    )
    c = h.load().sessions["c"]
    assert [entry[0] for entry in c.inflight] == [3, 4]
    assert c.queued == 0
    assert c.queued_after == 4  # nothing queued: everything is at or below the last seq
    assert c.next_seq == 5


def test_set_inflight_and_set_released(h: Harness) -> None:
    h.apply(
        SaveSession("c", 10.0),
        message(1),
        message(2),
        message(3),
        AddMessage(4, "t/4", b"p4", 2),
        queue("c", 1, 1),
        queue("c", 2, 2),
        queue("c", 3, 3),
        queue("c", 4, 4, qos=2),
    )
    h.apply(SetInflight("c", 1, 100), SetInflight("c", 4, 101))
    h.apply(SetReleased("c", 4))
    c = h.load().sessions["c"]
    assert c.inflight == [
        (1, 100, 1, 1, False, "topic/1", b"payload-1", None, None),
        (4, 101, 2, 2, False, "t/4", b"p4", None, None),
    ]
    assert c.queued == 2
    assert c.queued_after == 1
    assert c.next_seq == 5
    assert [row.seq for row in h.load_queued("c")] == [2, 3]


def test_remove_delivery_deletes_unreferenced_body(h: Harness) -> None:
    h.apply(
        SaveSession("c", 10.0),
        message(1),
        message(2),
        queue("c", 1, 1, packet_id=9),
        queue("c", 2, 2),
    )
    h.apply(RemoveDelivery("c", 1))
    assert h.counts()["messages"] == 1
    assert h.counts()["deliveries"] == 1
    h.apply(RemoveDelivery("c", 2))
    assert h.counts()["messages"] == 0
    assert h.counts()["deliveries"] == 0
    h.apply(RemoveDelivery("c", 3))  # unknown: harmless
    c = h.load().sessions["c"]
    assert c.inflight == []
    assert c.queued == 0


def test_shared_message_stored_once_until_last_delivery_goes(h: Harness) -> None:
    h.apply(
        SaveSession("a", 1.0),
        SaveSession("b", 1.0),
        SaveSession("c", 1.0),
        AddMessage(1, "shared", b"body", 1),
        queue("a", 1, 1),
        queue("b", 1, 1, packet_id=3),
        queue("c", 1, 1),
    )
    assert h.counts()["messages"] == 1
    assert h.counts()["deliveries"] == 3

    h.apply(RemoveDelivery("a", 1))
    assert h.counts()["messages"] == 1
    snapshot = h.load()
    # survives a reload and load()'s clean-up of unreferenced bodies
    assert h.counts()["messages"] == 1
    assert snapshot.sessions["b"].inflight == [(1, 3, 1, 1, False, "shared", b"body", None, None)]
    assert snapshot.next_message_id == 2

    h.apply(RemoveDelivery("b", 1))
    h.reopen()
    assert h.counts()["messages"] == 1
    assert h.load_queued("c") == [QueuedRow(1, 1, False, "shared", b"body")]

    h.apply(RemoveDelivery("c", 1))
    assert h.counts()["messages"] == 0
    h.load()
    assert h.counts()["messages"] == 0


def test_drop_oldest_queued_skips_inflight(h: Harness) -> None:
    h.apply(
        SaveSession("c", 1.0),
        *(message(i) for i in range(1, 6)),
        queue("c", 1, 1, packet_id=1),  # inflight: never dropped
        queue("c", 2, 2),
        queue("c", 3, 3),
        queue("c", 4, 4),
        queue("c", 5, 5),
    )
    h.apply(DropOldestQueued("c", 0))
    assert h.counts()["deliveries"] == 4
    assert h.counts()["messages"] == 4  # the body of seq 2 went with it
    h.apply(DropOldestQueued("c", 3))  # oldest queued above seq 3: seq 4
    assert h.counts()["messages"] == 3
    h.apply(DropOldestQueued("c", 5))  # nothing queued above 5: no-op
    h.apply(DropOldestQueued("other", 0))  # another session: no-op
    c = h.load().sessions["c"]
    assert [entry[0] for entry in c.inflight] == [1]
    assert c.queued == 2
    assert c.queued_after == 2
    assert c.next_seq == 6
    assert [row.seq for row in h.load_queued("c")] == [3, 5]


def test_drop_oldest_queued_only_touches_its_session(h: Harness) -> None:
    h.apply(
        SaveSession("a", 1.0),
        SaveSession("b", 1.0),
        message(1),
        message(2),
        queue("a", 2, 1),
        queue("b", 1, 2),
    )
    h.apply(DropOldestQueued("a", 0))
    snapshot = h.load()
    assert snapshot.sessions["a"].queued == 0
    assert snapshot.sessions["b"].queued == 1


# -- inbound QoS 2 ---------------------------------------------------------------------


def test_add_and_remove_inbound(h: Harness) -> None:
    h.apply(
        SaveSession("c", 1.0),
        SaveSession("d", 1.0),
        AddInbound("c", 1),
        AddInbound("c", 2),
        AddInbound("c", 3),
        AddInbound("d", 2),
    )
    h.apply(
        AddInbound("c", 2),  # duplicate PUBLISH: no error, one row
        RemoveInbound("c", 2),
        RemoveInbound("c", 99),
    )
    snapshot = h.load()
    assert snapshot.sessions["c"].inbound_qos2 == {1, 3}
    assert snapshot.sessions["d"].inbound_qos2 == {2}
    assert h.counts()["inbound_qos2"] == 3


# -- retained --------------------------------------------------------------------------


def test_set_and_delete_retained(h: Harness) -> None:
    h.apply(
        SetRetained("a/b", b"first", 1),
        SetRetained("a/c", b"\x00\x01\xff", 0),
        SetRetained("z", b"zed", 2),
    )
    h.apply(
        SetRetained("a/b", b"second", 2),  # replaces
        DeleteRetained("a/c"),
        DeleteRetained("never-set"),
    )
    snapshot = h.load()
    assert snapshot.retained == [("a/b", b"second", 2, None, None), ("z", b"zed", 2, None, None)]
    assert type(snapshot.retained[0][1]) is bytes
    assert h.counts()["retained"] == 2


# -- LoadQueued ------------------------------------------------------------------------


def test_load_queued_pages_in_seq_order_and_reads_own_batch(h: Harness) -> None:
    h.apply(SaveSession("c", 1.0), SaveSession("other", 1.0))
    first: list[QueuedRow] = []
    second: list[QueuedRow] = []
    batch: list[ops.Op] = [AddMessage(i, f"t/{i}", b"p%d" % i, 1) for i in range(1, 12)]
    # written out of order; seq 5 is inflight, so not "queued"
    batch += [queue("c", seq, seq, retain=seq == 6) for seq in (10, 3, 1, 2, 4, 6, 7, 8, 9)]
    batch += [queue("c", 5, 5, packet_id=55), queue("other", 1, 11)]
    batch += [
        LoadQueued("c", 3, 4, first.extend),
        LoadQueued("c", 8, 100, second.extend),
        # written after the reads: not seen by them
        AddMessage(12, "late", b"late", 1),
        queue("c", 11, 12),
    ]
    results = h.apply(*batch)
    assert first == [] and second == []  # apply() returns the rows; the caller calls back
    assert [callback for callback, _ in results] == [first.extend, second.extend]
    rows_first, rows_second = (rows for _, rows in results)
    assert rows_first == [
        QueuedRow(4, 1, False, "t/4", b"p4"),
        QueuedRow(6, 1, True, "t/6", b"p6"),
        QueuedRow(7, 1, False, "t/7", b"p7"),
        QueuedRow(8, 1, False, "t/8", b"p8"),
    ]
    assert all(isinstance(row, QueuedRow) for row in rows_first)
    assert [row.seq for row in rows_second] == [9, 10]
    for callback, rows in results:
        callback(rows)
    assert first == rows_first

    # a later batch sees the later write; after a reload too
    h.reopen()
    assert [row.seq for row in h.load_queued("c", after_seq=8)] == [9, 10, 11]
    assert [row.seq for row in h.load_queued("c", after_seq=0, limit=3)] == [1, 2, 3]
    assert h.load_queued("c", after_seq=11) == []
    assert h.load_queued("nobody") == []
    assert h.load_queued("other") == [QueuedRow(1, 1, False, "t/11", b"p11")]


def test_load_queued_retain_is_bool(h: Harness) -> None:
    """QueuedRow.retain is declared ``bool`` (and load() converts the inflight retain flag
    with ``bool()``); the rows LoadQueued returns should agree."""
    h.apply(
        SaveSession("c", 1.0),
        message(1),
        message(2),
        queue("c", 1, 1, retain=True),
        queue("c", 2, 2, retain=False),
    )
    rows = h.load_queued("c")
    assert [row.retain for row in rows] == [True, False]
    assert [type(row.retain) for row in rows] == [bool, bool]


# -- expiry and message ids ------------------------------------------------------------


def _populate_for_expiry(h: Harness) -> None:
    h.apply(
        SaveSession("old", NOW - 1000),
        SaveSession("recent", NOW - 10),
        SaveSession("connected", None),
        AddSubscription("old", "o/#", 1),
        AddSubscription("recent", "r/#", 1),
        message(1),  # old only
        message(2),  # old and recent
        queue("old", 1, 1, packet_id=4),
        queue("old", 2, 2),
        queue("recent", 1, 2),
        AddInbound("old", 9),
    )


def test_load_expires_old_sessions(h: Harness) -> None:
    _populate_for_expiry(h)
    snapshot = h.load(now=NOW, session_expiry_s=100)
    assert snapshot.expired == ["old"]
    assert set(snapshot.sessions) == {"recent", "connected"}
    assert snapshot.sessions["connected"].disconnected_at == NOW
    assert snapshot.sessions["recent"].subscriptions == {"r/#": 1}
    assert snapshot.sessions["recent"].queued == 1
    assert h.counts() == {
        "sessions": 2, "subscriptions": 1, "messages": 1, "deliveries": 1,
        "inbound_qos2": 0, "retained": 0,
    }
    # the deletion was committed: a later load (from disk, for the file) agrees
    again = h.load(now=NOW, session_expiry_s=100)
    assert again.expired == []
    assert set(again.sessions) == {"recent", "connected"}


def test_load_never_expires_with_minus_one(h: Harness) -> None:
    _populate_for_expiry(h)
    snapshot = h.load(now=NOW * 10, session_expiry_s=-1)
    assert snapshot.expired == []
    assert set(snapshot.sessions) == {"old", "recent", "connected"}
    assert h.counts()["messages"] == 2
    assert h.counts()["deliveries"] == 3
    # and -1 is the default
    assert h.load(now=NOW * 20).expired == []
    assert len(h.load().sessions) == 3


def test_next_message_id_is_max_id_plus_one(h: Harness) -> None:
    h.apply(
        SaveSession("c", 1.0),
        message(5),
        message(17),
        message(3),
        queue("c", 1, 5),
        queue("c", 2, 17),
        queue("c", 3, 3),
    )
    assert h.load().next_message_id == 18


# -- transactions ----------------------------------------------------------------------


def _good_batch() -> list[ops.Op]:
    return [
        SaveSession("keep", 1.0),
        AddSubscription("keep", "k", 1),
        message(1),
        queue("keep", 1, 1),
        SetRetained("kept", b"k", 0),
    ]


@pytest.mark.parametrize(
    "violation",
    [
        pytest.param(message(1), id="duplicate-message-id"),
        pytest.param(queue("keep", 1, 2), id="duplicate-delivery-seq"),
    ],
)
def test_failing_batch_applies_nothing(h: Harness, violation: ops.Op) -> None:
    h.apply(*_good_batch())
    committed = h.counts()
    bad: list[ops.Op] = [
        SaveSession("new", None),
        AddSubscription("new", "n", 2),
        AddSubscription("keep", "k", 0),  # would replace the qos
        message(2),
        message(3),
        queue("new", 1, 2),
        queue("new", 2, 3, packet_id=5),
        AddInbound("new", 7),
        SetRetained("new-retained", b"n", 1),
        DeleteRetained("kept"),
        SetInflight("keep", 1, 9),  # would make it inflight
        violation,
        SaveSession("after", None),
    ]
    with pytest.raises(sqlite3.IntegrityError):
        h.apply(*bad)
    assert not h.store.conn.in_transaction
    assert h.counts() == committed
    snapshot = h.load()
    assert set(snapshot.sessions) == {"keep"}
    assert snapshot.sessions["keep"].subscriptions == {"k": 1}
    assert snapshot.sessions["keep"].queued == 1
    assert snapshot.sessions["keep"].inflight == []
    assert snapshot.retained == [("kept", b"k", 0, None, None)]
    assert snapshot.next_message_id == 2
    # the store is still usable
    h.apply(SaveSession("later", 2.0))
    assert set(h.load().sessions) == {"keep", "later"}


def test_failing_first_batch_leaves_store_empty(h: Harness) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        h.apply(SaveSession("x", 1.0), message(1), queue("x", 1, 1), message(1))
    assert h.counts() == EMPTY_COUNTS
    assert h.load().sessions == {}
