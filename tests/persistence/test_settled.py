"""Deliveries queued and acknowledged in the same batch are not written at all, and the
end state equals applying every operation one by one."""

from persistence import ops
from persistence.store import SqliteStore


def rows(store: SqliteStore) -> tuple[list, list]:
    deliveries = store.conn.execute(
        "SELECT client_id, seq, state FROM deliveries ORDER BY client_id, seq").fetchall()
    messages = store.conn.execute("SELECT id, refs FROM messages ORDER BY id").fetchall()
    return deliveries, messages


BATCH = [
    ops.SaveSession("a", None),
    ops.SaveSession("b", None),
    ops.AddMessage(1, "t", b"one", 1),
    ops.AddDelivery("a", 1, 1, 1, False, 7),
    ops.AddDelivery("b", 1, 1, 1, False, 0),
    ops.AddMessage(2, "t", b"two", 1),
    ops.AddDelivery("a", 2, 2, 1, False, 0),
    ops.SetInflight("a", 2, 8),
    ops.RemoveDelivery("a", 1),  # acked in the same batch
    ops.RemoveDelivery("a", 2),  # acked in the same batch: message 2 has no delivery left
]


# The same operations in the smallest transactions the broker can produce: a message and the
# deliveries of the route that stored it always travel together.
ROUTES = [BATCH[0:2], BATCH[2:5], BATCH[5:7], BATCH[7:8], BATCH[8:9], BATCH[9:10]]


def test_settled_deliveries_leave_the_same_state_as_one_route_at_a_time(tmp_path):
    assert [op for route in ROUTES for op in route] == BATCH
    together = SqliteStore.open(":memory:")
    together.apply(BATCH)
    one_by_one = SqliteStore.open(tmp_path / "ref.db")
    for route in ROUTES:
        one_by_one.apply(route)
    assert rows(together) == rows(one_by_one) == ([("b", 1, 0)], [(1, 1)])


def test_settled_pairs_are_not_written(monkeypatch):
    store = SqliteStore.open(":memory:")
    executed: list[str] = []
    real = store.conn

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def executemany(self, sql, params):
            params = list(params)
            executed.extend([sql.split()[0] + " " + sql.split()[2]] * len(params))
            return real.executemany(sql, params)

    store.conn = Spy()  # type: ignore[assignment]
    store.apply(BATCH)
    # message 2 and both deliveries of client a were never written
    assert executed.count("INSERT messages") == 1
    assert executed.count("INSERT deliveries") == 1
    assert not [e for e in executed if e.startswith(("DELETE", "UPDATE"))]
