"""Durability across restarts of an in-process broker on a real database file."""

from __future__ import annotations

import logging
import sqlite3
import time

import attrs
import pytest
import trio

from mqttd.broker import running
from mqttd.codec.packets import PubAck, PubComp, Publish, PubRec, PubRel
from persistence import ops
from persistence.store import NewerSchemaError, SqliteStore
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient


def config(tmp_path, **limits):
    return make_config(data_dir=tmp_path, **limits)


async def fill_offline_queue(port: int, client_id: str, count: int, topic: str = "q/x") -> None:
    sub, _ = await RawClient.connected(port, client_id, clean_session=False)
    await sub.subscribe("q/#", qos=1)
    await sub.aclose()
    pub, _ = await RawClient.connected(port, "publisher")
    for i in range(count):
        await pub.publish(topic, str(i).encode(), qos=1)
    await pub.aclose()


async def drain(client: RawClient, count: int) -> list[Publish]:
    """The next ``count`` PUBLISHes, each PUBACKed. Other packets are skipped explicitly
    (they stay queued: MQTT does not order acks against messages)."""
    got: list[Publish] = []
    while len(got) < count:
        packet: Publish = await client.take(Publish)  # type: ignore[assignment]
        got.append(packet)
        await client.send(PubAck(packet.packet_id))
    return got


async def test_queued_messages_subscriptions_and_retained_survive_a_restart(tmp_path):
    count = 300
    with trio.fail_after(30):
        async with running(config(tmp_path, max_queued_messages=10_000)) as broker:
            await fill_offline_queue(broker.port, "resume-me", count)
            keeper, _ = await RawClient.connected(broker.port, "keeper")
            await keeper.publish("status/keeper", b"online", qos=1, retain=True)
            await keeper.aclose()
        async with running(config(tmp_path, max_queued_messages=10_000)) as broker:
            session = broker.sessions["resume-me"]
            assert session.subscriptions == {"q/#": 1}
            assert session.queued == count
            sub, connack = await RawClient.connected(broker.port, "resume-me", clean_session=False)
            assert connack.session_present
            got = await drain(sub, count)
            assert [int(p.payload) for p in got] == list(range(count))
            # the subscription survived: a new message arrives without subscribing again
            pub, _ = await RawClient.connected(broker.port, "publisher")
            await pub.publish("q/after", b"after restart", qos=1)
            assert (await sub.expect(Publish)).payload == b"after restart"
            # the retained message survived
            late, _ = await RawClient.connected(broker.port, "late")
            await late.subscribe("status/#")
            retained = await late.expect(Publish)
            assert (retained.topic, retained.payload, retained.retain) == (
                "status/keeper", b"online", True,
            )


async def test_offline_backlog_stays_on_disk_and_streams_back_in_pages(tmp_path):
    count, page = 2000, 50
    cfg = config(tmp_path, max_queued_messages=100_000)
    cfg = attrs.evolve(  # (keeps the rest: no HTTP listener, no fixed port)
        cfg,
        persistence=type(cfg.persistence)(data_dir=str(tmp_path), queue_page_messages=page),
    )
    with trio.fail_after(60):
        async with running(cfg) as broker:
            await fill_offline_queue(broker.port, "backlog", count)
            session = broker.sessions["backlog"]
            assert len(session.out.ram or ()) <= page  # the rest is on disk only
            assert session.queued == count
        async with running(cfg) as broker:
            session = broker.sessions["backlog"]
            assert len(session.out.ram or ()) == 0 and session.out.disk_count == count
            sub, _ = await RawClient.connected(broker.port, "backlog", clean_session=False)
            received = []
            most_in_ram = 0
            while len(received) < count:
                packet = await sub.expect(Publish)
                received.append(int(packet.payload))
                most_in_ram = max(most_in_ram, len(session.out.ram or ()))
                await sub.send(PubAck(packet.packet_id))
            assert received == list(range(count))
            assert most_in_ram <= page
            await wait_until(lambda: session.queued == 0 and not session.inflight)
        store = SqliteStore.open(tmp_path / "mqttd.db")
        try:
            counts = store.table_counts()
        finally:
            store.close()
        # delivered and acknowledged messages are deleted, bodies included
        assert counts["deliveries"] == 0 and counts["messages"] == 0


async def test_inflight_messages_resent_with_dup_and_same_ids_after_restart(tmp_path):
    with trio.fail_after(20):
        async with running(config(tmp_path)) as broker:
            sub, _ = await RawClient.connected(broker.port, "slow", clean_session=False)
            await sub.subscribe("q/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "publisher")
            for i in range(5):
                await pub.publish("q/x", f"m{i}".encode(), qos=1)
            first = [await sub.expect(Publish) for _ in range(5)]  # never acknowledged
        async with running(config(tmp_path)) as broker:
            sub, _ = await RawClient.connected(broker.port, "slow", clean_session=False)
            again = [await sub.expect(Publish) for _ in range(5)]
            assert [(p.packet_id, p.payload, p.dup) for p in again] == [
                (p.packet_id, p.payload, True) for p in first
            ]


async def test_qos2_inbound_state_survives_restart(tmp_path):
    """A QoS 2 PUBLISH acknowledged with PUBREC before the restart is not delivered a
    second time when the publisher resends it afterwards (exactly once)."""
    with trio.fail_after(20):
        async with running(config(tmp_path)) as broker:
            watcher, _ = await RawClient.connected(broker.port, "watcher", clean_session=False)
            await watcher.subscribe("q2/#", qos=2)
            await watcher.aclose()
            pub, _ = await RawClient.connected(broker.port, "q2-pub", clean_session=False)
            await pub.send(Publish("q2/x", b"exactly once", 2, packet_id=9))
            assert await pub.expect(PubRec) == PubRec(9)
        async with running(config(tmp_path)) as broker:
            assert broker.sessions["q2-pub"].inbound_qos2 == {9}
            pub, _ = await RawClient.connected(broker.port, "q2-pub", clean_session=False)
            await pub.send(Publish("q2/x", b"exactly once", 2, dup=True, packet_id=9))
            assert await pub.expect(PubRec) == PubRec(9)
            await pub.send(PubRel(9))
            assert await pub.expect(PubComp) == PubComp(9)
            assert broker.sessions["watcher"].queued == 1  # once, not twice


async def test_puback_means_the_message_is_committed(tmp_path):
    """Read the database with a second connection right after each PUBACK: the message
    is already there for the persistent subscriber."""
    with trio.fail_after(20):
        async with running(config(tmp_path)) as broker:
            sub, _ = await RawClient.connected(broker.port, "durable", clean_session=False)
            await sub.subscribe("d/#", qos=1)
            await sub.aclose()
            pub, _ = await RawClient.connected(broker.port, "publisher")
            reader = sqlite3.connect(tmp_path / "mqttd.db")
            try:
                for i in range(20):
                    await pub.publish("d/x", f"n{i}".encode(), qos=1)  # returns after PUBACK
                    rows = reader.execute(
                        "SELECT count(*) FROM deliveries WHERE client_id = 'durable'"
                    ).fetchone()[0]
                    assert rows == i + 1
            finally:
                reader.close()


async def test_clean_sessions_never_touch_the_disk(tmp_path):
    with trio.fail_after(20):
        async with running(config(tmp_path)) as broker:
            sub, _ = await RawClient.connected(broker.port, "clean-sub")
            await sub.subscribe("c/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "clean-pub")
            for i in range(50):
                await pub.publish("c/x", b"%d" % i, qos=1)
            await drain(sub, 50)
            counts = broker.writer.store.table_counts()
            assert set(counts.values()) == {0}
            assert broker.writer.ops_written == 0


async def test_expired_sessions_are_deleted_on_a_timer(tmp_path):
    cfg = config(tmp_path)
    cfg = attrs.evolve(  # (keeps the rest: no HTTP listener, no fixed port)
        cfg,
        persistence=type(cfg.persistence)(
            data_dir=str(tmp_path), session_expiry_s=1, expiry_check_interval_s=0.1
        ),
    )
    with trio.fail_after(20):
        async with running(cfg) as broker:
            client, _ = await RawClient.connected(broker.port, "ephemeral", clean_session=False)
            await client.subscribe("e/#", qos=1)
            await client.aclose()
            await wait_until(lambda: "ephemeral" not in broker.sessions, timeout_s=10)
            assert broker.stats()["subscriptions"] == 0
            await broker.writer.flush()
            assert broker.writer.store.table_counts()["sessions"] == 0


async def test_expired_sessions_are_deleted_at_startup(tmp_path):
    store = SqliteStore.open(tmp_path / "mqttd.db")
    store.apply([
        ops.SaveSession("old", time.time() - 3600),
        ops.AddSubscription("old", "a/#", 1),
        ops.SaveSession("recent", time.time() - 10),
    ])
    store.close()
    cfg = config(tmp_path)
    cfg = attrs.evolve(  # (keeps the rest: no HTTP listener, no fixed port)
        cfg,
        persistence=type(cfg.persistence)(data_dir=str(tmp_path), session_expiry_s=600),
    )
    with trio.fail_after(10):
        async with running(cfg) as broker:
            assert set(broker.sessions) == {"recent"}


async def test_corrupt_database_is_moved_aside_and_the_broker_starts_empty(tmp_path, caplog):
    garbage = bytes(range(256)) * 64
    (tmp_path / "mqttd.db").write_bytes(garbage)
    caplog.set_level(logging.ERROR)
    with trio.fail_after(10):
        async with running(config(tmp_path)) as broker:
            assert broker.sessions == {}
            client, _ = await RawClient.connected(broker.port, "fresh", clean_session=False)
            await client.publish("f/x", b"works", qos=1)
    (aside,) = tmp_path.glob("mqttd.db.corrupt-*")
    assert aside.read_bytes() == garbage
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(tmp_path / "mqttd.db") in message and str(aside) in message


async def test_database_from_a_newer_schema_refuses_to_start(tmp_path):
    store = SqliteStore.open(tmp_path / "mqttd.db")
    store.conn.execute("UPDATE schema_version SET version = version + 1")
    store.close()
    before = (tmp_path / "mqttd.db").read_bytes()
    refused = pytest.RaisesGroup(
        pytest.RaisesExc(NewerSchemaError, match="newer mqttd"), flatten_subgroups=True
    )
    with trio.fail_after(10), refused:
        async with running(config(tmp_path)):
            pass  # pragma: no cover - must not start
    assert (tmp_path / "mqttd.db").read_bytes() == before


@pytest.mark.parametrize("restart", [False, True], ids=["same-run", "after-restart"])
async def test_queue_budget_drops_the_oldest_across_ram_and_disk(tmp_path, restart):
    """Page of 10 in RAM, budget of 30: 100 messages for an offline session keep the
    newest 30 (70 dropped and counted), whether they are in RAM or on disk."""
    cfg = config(tmp_path, persistent_max_queued_messages=30,
                 persistent_overflow_policy="drop_oldest")
    cfg = attrs.evolve(  # (keeps the rest: no HTTP listener, no fixed port)
        cfg,
        persistence=type(cfg.persistence)(data_dir=str(tmp_path), queue_page_messages=10),
    )
    with trio.fail_after(30):
        async with running(cfg) as broker:
            await fill_offline_queue(broker.port, "bounded", 100)
            session = broker.sessions["bounded"]
            assert session.queued == 30 and session.out.dropped == 70
            if not restart:
                sub, _ = await RawClient.connected(broker.port, "bounded", clean_session=False)
                got = await drain(sub, 30)
                assert [int(p.payload) for p in got] == list(range(70, 100))
                return
        async with running(cfg) as broker:
            session = broker.sessions["bounded"]
            assert session.queued == 30
            # more while offline after the restart: still the newest 30
            pub, _ = await RawClient.connected(broker.port, "publisher")
            for i in range(100, 110):
                await pub.publish("q/x", str(i).encode(), qos=1)
            assert session.queued == 30
            sub, _ = await RawClient.connected(broker.port, "bounded", clean_session=False)
            got = await drain(sub, 30)
            assert [int(p.payload) for p in got] == list(range(80, 110))
            await wait_until(lambda: session.queued == 0 and not session.inflight)
            await broker.writer.flush()
            counts = broker.writer.store.table_counts()
            assert counts["deliveries"] == 0 and counts["messages"] == 0


async def test_going_offline_moves_the_ram_queue_to_disk_and_resume_keeps_order(tmp_path):
    with trio.fail_after(20):
        async with running(config(tmp_path, max_inflight_messages=2)) as broker:
            sub, _ = await RawClient.connected(broker.port, "evict", clean_session=False)
            await sub.subscribe("q/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "publisher")
            for i in range(10):
                await pub.publish("q/x", str(i).encode(), qos=1)
            session = broker.sessions["evict"]
            first = [await sub.expect(Publish) for _ in range(2)]  # the window; never acked
            assert (len(session.out.ram or ()), session.out.disk_count) == (8, 0)
            bytes_before = session.out.bytes
            await sub.aclose()
            await wait_until(lambda: session.connection is None)
            # no RAM while away
            assert (len(session.out.ram or ()), session.out.disk_count) == (0, 8)
            assert session.out.bytes == bytes_before
            await pub.publish("q/x", b"10", qos=1)  # offline: straight to disk
            assert (len(session.out.ram or ()), session.out.disk_count) == (0, 9)
            sub, _ = await RawClient.connected(broker.port, "evict", clean_session=False)
            got = []
            while len(got) < 11:
                packet = await sub.expect(Publish)
                got.append((int(packet.payload), packet.dup))
                await sub.send(PubAck(packet.packet_id))
            assert got == [(0, True), (1, True)] + [(i, False) for i in range(2, 11)]
            assert [int(p.payload) for p in first] == [0, 1]
