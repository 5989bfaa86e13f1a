"""Consumer groups as work queues over real sockets, with paho-mqtt 5.0 workers: a negative
acknowledgement (PUBACK/PUBREC reason code >= 0x80) is retried on another member after a
backoff, a job held past the ack deadline goes to another worker, a job that keeps failing
becomes a dead letter with its reasons in user properties, 3.1.1 and 5.0 workers share a
group. Time is measured with trio's clock; nothing sleeps to synchronise."""

from __future__ import annotations

import datetime
import queue
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from paho.mqtt.client import MQTTMessage

from mqttd.broker import running
from mqttd.codec.packets import PROTOCOL_5, PubAck, Publish, PubRec
from mqttd.config import Config, GroupOverride, WorkQueues
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.interop.test_paho import bounded_get
from tests.interop.test_paho_v5 import Paho5, paho5, prop
from tests.rawclient import RawClient

TIMEOUT_S = 30.0
JOB_WAIT_S = 15.0  # for one job to reach a paho worker: generous, for a loaded machine
GROUP = "$share/jobs/jobs/#"
PUBACK = 0x40


def wq_config(data_dir: Any = None, **settings: Any) -> Config:
    """The test broker with these work_queues settings (no jitter unless given)."""
    settings.setdefault("retry_delay_jitter", 0.0)
    return attrs.evolve(make_config(data_dir), work_queues=WorkQueues(**settings))


def nack(worker: Paho5, message: MQTTMessage, code: int = 0x80) -> None:
    """PUBACK with a reason code (paho has no API for it): queued on paho's network thread
    like its own acks."""
    packet = struct.pack("!BBHB", PUBACK, 3, message.mid, code)
    worker.client._packet_queue(PUBACK, packet, message.mid, 1)


Got = queue.Queue[tuple[str, MQTTMessage]]


@asynccontextmanager
async def worker(
    port: int, name: str, got: Got, *, qos: int = 1, topic_filter: str = GROUP
) -> AsyncIterator[Paho5]:
    """A paho 5.0 worker in the group; its messages go to ``got`` as (name, message) and it
    acknowledges nothing by itself."""
    async with paho5(port, name, client_id=name, manual_ack=True) as (client, _, _):
        client.client.on_message = lambda _c, _u, message: got.put((name, message))
        assert await client.subscribe(topic_filter, qos) == [qos]
        yield client


async def publisher(port: int) -> RawClient:
    client, _ = await RawClient.connected(port, "producer")
    return client


async def test_a_job_rejected_twice_is_retried_on_the_other_worker_with_backoff() -> None:
    """Rejected twice, then acknowledged: three deliveries alternating between the two
    workers (a retry goes to another member), each after its backoff (0.4 s, then 0.8 s),
    and nothing after the acknowledgement."""
    got: Got = queue.Queue()
    config = wq_config(retry_delay_initial_s=0.4, retry_delay_multiplier=2.0)
    with trio.fail_after(TIMEOUT_S):
        async with (
            running(config) as broker,
            worker(broker.port, "w-a", got) as a,
            worker(broker.port, "w-b", got) as b,
        ):
            workers = {"w-a": a, "w-b": b}
            pub = await publisher(broker.port)
            await pub.publish("jobs/1", b"job-1", qos=1)
            seen = []
            rejected_at = None
            for attempt, backoff_s in ((1, None), (2, 0.4), (3, 0.8)):
                name, message = await bounded_get(got, JOB_WAIT_S)
                now = trio.current_time()
                if backoff_s is not None:
                    assert now - rejected_at >= backoff_s, (attempt, now - rejected_at)
                assert message.payload == b"job-1" and not message.dup
                seen.append(name)
                if attempt < 3:
                    rejected_at = trio.current_time()
                    nack(workers[name], message)
                else:
                    workers[name].client.ack(message.mid, 1)
            assert seen[0] != seen[1] and seen[1] != seen[2]  # always another member
            # processed once: the next job is the next thing a worker gets
            await pub.publish("jobs/2", b"job-2", qos=1)
            name, message = await bounded_get(got, JOB_WAIT_S)
            assert message.payload == b"job-2"
            workers[name].client.ack(message.mid, 1)
            await wait_until(lambda: broker.stats()["jobs_acked"] == 2)
            stats = broker.stats()
            assert (stats["jobs_rejected"], stats["jobs_retries"], stats["jobs_dead_lettered"]) \
                == (2, 2, 0)
            assert got.empty()


async def test_a_job_always_rejected_becomes_a_dead_letter_with_its_reasons() -> None:
    """A lone worker rejects a job every time: it gets it back each time (alone in the
    group), max_deliveries times, then the job is published to $dead/jobs/<topic> with its
    own properties and the reasons: 5.0 subscribers see them, 3.1.1 ones the payload."""
    got: Got = queue.Queue()
    dead: Got = queue.Queue()
    config = wq_config(retry_delay_initial_s=0.05, max_deliveries=3)
    with trio.fail_after(TIMEOUT_S):
        async with (
            running(config) as broker,
            worker(broker.port, "lone", got) as lone,
            paho5(broker.port, "dl5", client_id="dl5") as (dl5, _, _),
        ):
            dl5.client.on_message = lambda _c, _u, message: dead.put(("dl5", message))
            assert await dl5.subscribe("$dead/#", 1) == [1]
            dl3, _ = await RawClient.connected(broker.port, "dl311")
            await dl3.subscribe("$dead/#", qos=1)
            async with paho5(broker.port, "prod5", client_id="prod5") as (prod, _, _):
                assert await prod.publish(
                    "jobs/poison", b"bad job", 1, content_type="text/plain",
                    user_property=[("trace", "t-17")],
                ) == 0
            started = datetime.datetime.now(datetime.UTC)
            for _ in range(3):
                name, message = await bounded_get(got, JOB_WAIT_S)
                assert (name, message.payload) == ("lone", b"bad job")
                nack(lone, message, 0x83)
            _, letter = await bounded_get(dead)
            assert (letter.topic, letter.payload, letter.qos) == ("$dead/jobs/jobs/poison",
                                                                  b"bad job", 1)
            assert prop(letter.properties, "content_type") == "text/plain"
            user = dict(prop(letter.properties, "user_property"))
            assert user["trace"] == "t-17"  # its own properties are kept
            assert (user["x-death-reason"], user["x-deliveries"], user["x-group"],
                    user["x-reason-code"]) == ("rejected", "3", "jobs", "0x83")
            first_failure = datetime.datetime.fromisoformat(user["x-first-failure"])
            assert started - datetime.timedelta(seconds=1) <= first_failure
            plain = await dl3.take(Publish)
            assert (plain.topic, plain.payload) == ("$dead/jobs/jobs/poison", b"bad job")
            assert broker.stats()["jobs_dead_lettered"] == 1
            assert got.empty()  # the worker does not get it again


async def test_a_worker_holding_a_job_past_the_ack_deadline_loses_it_to_another() -> None:
    """Group "slow" has ack_timeout_s 0.5: the job a worker holds unacknowledged goes to the
    other connected worker no earlier than that; the first one's late acknowledgement
    counts as a duplicate (at-least-once)."""
    got: Got = queue.Queue()
    config = wq_config(group_overrides=(GroupOverride(group="slow*", ack_timeout_s=0.5),))
    slow_group = "$share/slow-1/jobs/#"
    with trio.fail_after(TIMEOUT_S):
        async with (
            running(config) as broker,
            worker(broker.port, "hold", got, topic_filter=slow_group) as hold,
            worker(broker.port, "take", got, topic_filter=slow_group) as take,
        ):
            workers = {"hold": hold, "take": take}
            pub = await publisher(broker.port)
            # the deadline runs from the first delivery, which comes after this moment (the
            # moment the test sees the first delivery may be later than the broker sent it)
            published_at = trio.current_time()
            await pub.publish("jobs/slow", b"long job", qos=1)
            first, message = await bounded_get(got, JOB_WAIT_S)
            second, copy = await bounded_get(got, JOB_WAIT_S)
            assert trio.current_time() - published_at >= 0.5
            assert second != first and copy.payload == b"long job"
            workers[second].client.ack(copy.mid, 1)
            workers[first].client.ack(message.mid, 1)  # too late: it was redelivered
            # two workers, two connections: the broker may read either ack first
            await wait_until(lambda: (broker.stats()["jobs_duplicates"],
                                      broker.stats()["jobs_acked"]) == (1, 1))
            stats = broker.stats()
            assert (stats["jobs_ack_timeouts"], stats["jobs_retries"]) == (1, 1)
            [group] = [g for g in broker.work_queues.group_stats() if g["group"] == "slow-1"]
            assert (group["in_progress"], group["queued"], group["members"]) == (0, 0, 2)


async def test_3_1_1_and_5_0_workers_share_a_group() -> None:
    """A 3.1.1 worker (which cannot reject) and a 5.0 worker that rejects everything:
    every job ends up processed by the 3.1.1 worker, exactly once."""
    got: Got = queue.Queue()
    config = wq_config(retry_delay_initial_s=0.05)
    jobs = 10
    with trio.fail_after(TIMEOUT_S):
        async with running(config) as broker, worker(broker.port, "picky", got) as picky:
            plain, _ = await RawClient.connected(broker.port, "plain-311")
            await plain.subscribe(GROUP, qos=1)
            pub = await publisher(broker.port)
            for n in range(jobs):
                await pub.publish(f"jobs/{n}", b"%d" % n, qos=1)
            processed: list[bytes] = []
            rejected = 0

            async def reject_all() -> None:
                nonlocal rejected
                while True:
                    try:
                        _, message = await trio.to_thread.run_sync(
                            got.get, True, 0.2, abandon_on_cancel=True
                        )
                    except queue.Empty:
                        continue
                    rejected += 1
                    nack(picky, message)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reject_all)
                while len(processed) < jobs:
                    packet = await plain.take(Publish)
                    processed.append(packet.payload)
                    await plain.send(PubAck(packet.packet_id))
                nursery.cancel_scope.cancel()
            assert sorted(processed) == sorted(b"%d" % n for n in range(jobs))
            await wait_until(lambda: broker.stats()["jobs_acked"] == jobs)
            stats = broker.stats()
            assert stats["jobs_rejected"] == rejected == stats["jobs_retries"]
            assert rejected > 0 and stats["jobs_dead_lettered"] == 0


async def test_a_qos_2_job_rejected_at_pubrec_is_retried() -> None:
    """QoS 2: PUBREC with 0x80 ends the exchange and the job comes back; PUBREC Success
    then PUBCOMP completes it."""
    config = wq_config(retry_delay_initial_s=0.05)
    with trio.fail_after(TIMEOUT_S):
        async with running(config) as broker:
            member, _ = await RawClient.connected(broker.port, "q2", protocol_level=PROTOCOL_5)
            await member.subscribe(GROUP, qos=2)
            pub = await publisher(broker.port)
            await pub.send(Publish("jobs/q2", b"two", 2, False, False, 1))
            first = await member.take(Publish)
            await member.send(PubRec(first.packet_id, 0x80))
            again = await member.take(Publish)
            assert (again.payload, again.qos) == (b"two", 2)
            await member.send(PubRec(again.packet_id))
            await wait_until(lambda: broker.stats()["jobs_acked"] == 1)
            assert broker.stats()["jobs_rejected"] == 1


async def test_retries_and_dead_letters_survive_a_restart(tmp_path: Any) -> None:
    """A persistent 5.0 worker rejects a job (its retry waits, stored); the broker stops;
    after the restart the retry comes (delivery 2), the worker holds it unacknowledged; the
    broker stops again; after that restart delivery 2 comes again (its number kept: had it
    been forgotten, two more rejections would not make a dead letter), is rejected, and
    delivery 3 too: a dead letter, queued for a persistent dead-letter subscriber that was
    away all along."""
    config = wq_config(tmp_path, retry_delay_initial_s=0.3, max_deliveries=3)
    got: Got = queue.Queue()
    expiry = {"session_expiry_interval": 3600}

    @asynccontextmanager
    async def durable_worker(port: int) -> AsyncIterator[Paho5]:
        async with paho5(port, "dw", client_id="durable-w", manual_ack=True, clean_start=False,
                         **expiry) as (client, flags, _):
            client.client.on_message = lambda _c, _u, message: got.put(("dw", message))
            if not flags.session_present:
                assert await client.subscribe(GROUP, 1) == [1]
            yield client

    with trio.fail_after(TIMEOUT_S):
        async with running(config) as broker:
            dl, _ = await RawClient.connected(broker.port, "dead-keeper", clean_session=False)
            await dl.subscribe("$dead/#", qos=1)
            await dl.aclose()
            async with durable_worker(broker.port) as w:
                pub = await publisher(broker.port)
                await pub.publish("jobs/keep", b"durable job", qos=1)
                _, message = await bounded_get(got, JOB_WAIT_S)
                nack(w, message)
                await wait_until(lambda: len(broker.work_queues.waiting) == 1)
        async with running(config) as broker:
            assert broker.stats()["jobs_waiting_retry"] == 1
            async with durable_worker(broker.port):
                # delivery 2: held, not acknowledged
                _, message = await bounded_get(got, JOB_WAIT_S)
                assert message.payload == b"durable job"
                await wait_until(lambda: broker.work_queues.group_stats()[0]["in_progress"] == 1)
        async with running(config) as broker:
            async with durable_worker(broker.port) as w:
                # (a clean stop took it back from the worker's window into its queue, with
                # its attempt number: it is sent again as delivery 2)
                _, message = await bounded_get(got, JOB_WAIT_S)
                assert message.payload == b"durable job"
                nack(w, message)
                # delivery 3: its rejection is the last
                _, message = await bounded_get(got, JOB_WAIT_S)
                nack(w, message)
                await wait_until(lambda: broker.stats()["jobs_dead_lettered"] == 1)
        async with running(config) as broker:
            dl, connack = await RawClient.connected(broker.port, "dead-keeper",
                                                    clean_session=False)
            assert connack.session_present
            letter = await dl.take(Publish)
            assert (letter.topic, letter.payload) == ("$dead/jobs/jobs/keep", b"durable job")
            await dl.send(PubAck(letter.packet_id))
    assert got.empty()
