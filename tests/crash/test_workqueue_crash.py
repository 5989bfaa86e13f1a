"""Work queues and delayed publish through ``kill -9`` (subprocess broker): a persistent
worker's jobs waiting for their retry and its jobs in flight with their delivery number, the
dead letters queued for a persistent subscriber, and delayed messages acknowledged to their
publisher all survive the kill, and nothing comes earlier than it should."""

from __future__ import annotations

from pathlib import Path

import trio

from mqttd.codec.packets import (
    PROTOCOL_5,
    ConnAck,
    Connect,
    Disconnect,
    PubAck,
    Publish,
)
from tests.crash.harness import BrokerProcess, broker_process
from tests.rawclient import RawClient

JOBS = 20
GROUP = "$share/jobs/jobs/#"
TIMEOUT_S = 120.0


def write_config(data_dir: Path) -> Path:
    path = data_dir / "wq.yaml"
    path.write_text(
        "logging:\n  level: info\n"
        "work_queues:\n  retry_delay_initial_s: 2.0\n  retry_delay_jitter: 0\n"
        "  max_deliveries: 2\n"
    )
    return path


async def connect5(port: int, client_id: str, *, expiry_s: int = 0) -> tuple[RawClient, ConnAck]:
    """An MQTT 5.0 raw client; ``expiry_s``: its session outlives the connection."""
    client = await RawClient.open(port)
    client.protocol_level = client.decoder.protocol_level = PROTOCOL_5
    props = {"session_expiry_interval": expiry_s} if expiry_s else None
    await client.send(Connect(client_id, not expiry_s, 60, PROTOCOL_5, properties=props))
    connack = await client.expect(ConnAck)
    assert connack.return_code == 0, connack
    return client, connack  # type: ignore[return-value]


async def synced(client: RawClient, name: str) -> None:
    """Everything the broker did for ``client``'s packets so far is committed: the PUBACK of
    a retained message waits for the commit that holds it, and commits are in order."""
    packet_id = client.packet_id()
    await client.send(Publish(f"sync/{name}", b"1", 1, True, False, packet_id))
    await client.take(PubAck, packet_id=packet_id)


async def jobs_for(client: RawClient, count: int) -> list[Publish]:
    return [await client.take(Publish, timeout_s=30) for _ in range(count)]  # type: ignore[misc]


async def kill(broker: BrokerProcess) -> None:
    broker.kill()
    await broker.reap()


async def test_retries_in_flight_jobs_and_dead_letters_survive_kill_9(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        # 1: a persistent worker rejects every job once; the retries wait (stored); the kill
        async with broker_process(tmp_path, config) as broker:
            keeper, _ = await connect5(broker.port, "dead-keeper", expiry_s=3600)
            await keeper.subscribe("$dead/#", qos=1)
            await keeper.send(Disconnect())
            worker, _ = await connect5(broker.port, "w", expiry_s=3600)
            await worker.subscribe(GROUP, qos=1)
            producer, _ = await RawClient.connected(broker.port, "producer")
            for n in range(JOBS):
                await producer.publish(f"jobs/{n}", b"%d" % n, qos=1)
            for job in await jobs_for(worker, JOBS):
                await worker.send(PubAck(job.packet_id, 0x80))
            await synced(worker, "w")
            await kill(broker)
        # 2: the retries come (delivery 2): the worker rejects the even ones (dead letters at
        # max_deliveries 2) and holds the odd ones in flight; the kill
        async with broker_process(tmp_path, config) as broker:
            worker, connack = await connect5(broker.port, "w", expiry_s=3600)
            assert connack.session_present
            held = []
            for job in await jobs_for(worker, JOBS):
                assert not job.dup
                if int(job.payload) % 2 == 0:
                    await worker.send(PubAck(job.packet_id, 0x80))
                else:
                    held.append(int(job.payload))
            await synced(worker, "w")
            await kill(broker)
        # 3: the held ones are sent again (DUP), their delivery number kept: rejected, they
        # are dead letters too; the kill
        async with broker_process(tmp_path, config) as broker:
            worker, connack = await connect5(broker.port, "w", expiry_s=3600)
            assert connack.session_present
            resent = await jobs_for(worker, len(held))
            assert sorted(int(job.payload) for job in resent) == sorted(held)
            assert all(job.dup for job in resent)
            for job in resent:
                await worker.send(PubAck(job.packet_id, 0x80))
            await synced(worker, "w")
            await kill(broker)
        # 4: the dead-letter subscriber, away all along, gets every job once, with the reasons
        async with broker_process(tmp_path, config) as broker:
            keeper, connack = await connect5(broker.port, "dead-keeper", expiry_s=3600)
            assert connack.session_present
            letters = await jobs_for(keeper, JOBS)
            for letter in letters:
                await keeper.send(PubAck(letter.packet_id))
            log_tail = broker.tail()
    got = sorted(int(letter.payload) for letter in letters)
    assert got == list(range(JOBS)), log_tail
    for letter in letters:
        assert letter.topic == f"$dead/jobs/jobs/{int(letter.payload)}"
        user = dict(letter.properties["user_property"])  # type: ignore[index]
        assert (user["x-death-reason"], user["x-deliveries"], user["x-group"]) == (
            "rejected", "2", "jobs"
        )


async def test_delayed_messages_survive_kill_9_and_keep_their_time(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    count, delay_s = 10, 3
    with trio.fail_after(TIMEOUT_S):
        async with broker_process(tmp_path, config) as broker:
            reader, _ = await RawClient.connected(broker.port, "reader", clean_session=False)
            await reader.subscribe("later/#", qos=1)
            await reader.aclose()
            producer, _ = await RawClient.connected(broker.port, "producer")
            sent_at = trio.current_time()
            for n in range(count):  # each PUBACKed: stored
                await producer.publish(f"$delayed/{delay_s}/later/{n}", b"%d" % n, qos=1)
            await kill(broker)
        async with broker_process(tmp_path, config) as broker:
            reader, connack = await RawClient.connected(broker.port, "reader",
                                                        clean_session=False)
            assert connack.session_present
            got = []
            for _ in range(count):
                try:
                    message = await reader.take(Publish, timeout_s=30)
                except AssertionError as exc:
                    with trio.move_on_after(2):
                        await broker.proc.wait()
                    raise AssertionError(f"{exc}\nbroker log:\n{broker.tail(80)}") from None
                got.append(message)
                await reader.send(PubAck(message.packet_id))  # type: ignore[attr-defined]
            assert trio.current_time() - sent_at >= delay_s
    assert sorted((m.topic, m.payload) for m in got) == sorted(  # type: ignore[attr-defined]
        (f"later/{n}", b"%d" % n) for n in range(count)
    )
