"""The consumer-group worker that fails some jobs on purpose (``devices/worker.py``, MQTT 5.0
through ``devices/client.py``) against the real broker: rejected jobs come back, on another
worker, and every job is processed exactly once; the ``python -m devices worker`` command."""

from __future__ import annotations

import re

import attrs
import trio

from devices.client import Client
from devices.worker import Worker
from mqttd import codec
from mqttd.broker import running
from mqttd.config import WorkQueues
from tests.conftest import make_config
from tests.devices.test_fleet import run_cli
from tests.integration.test_broker_tcp import wait_until

FAST_RETRY = WorkQueues(retry_delay_initial_s=0.05, retry_delay_jitter=0.0)


async def test_workers_reject_some_jobs_and_every_job_is_processed_once() -> None:
    jobs = 40
    seen: set[bytes] = set()  # across the workers: a job fails the first time it is seen
    processed: list[bytes] = []

    def decide(packet: codec.Publish) -> bool:
        first_time = packet.payload not in seen
        seen.add(packet.payload)
        if first_time and int(packet.payload) % 4 == 0:
            return False
        processed.append(packet.payload)
        return True

    config = attrs.evolve(make_config(), work_queues=FAST_RETRY)
    with trio.fail_after(30):
        async with running(config) as broker, trio.open_nursery() as nursery:
            workers = [Worker("127.0.0.1", broker.port, client_id=f"w-{n}", decide=decide)
                       for n in range(3)]
            for worker in workers:
                await nursery.start(worker.run)
            producer = Client("127.0.0.1", broker.port, "producer", keepalive_s=0)
            async with producer.connected():
                for n in range(jobs):
                    await producer.publish(f"jobs/{n % 3}", b"%d" % n, qos=1)
                await producer.wait_acked()
            await wait_until(lambda: len(processed) == jobs)
            await wait_until(lambda: broker.stats()["jobs_acked"] == jobs)
            for worker in workers:
                worker.stop()
        assert sorted(processed) == sorted(b"%d" % n for n in range(jobs))
        assert sum(w.stats.failed for w in workers) == jobs // 4
        assert broker.stats()["jobs_rejected"] == jobs // 4
        assert all(w.stats.received for w in workers)


async def test_cli_worker_fails_jobs_and_prints_a_summary() -> None:
    config = attrs.evolve(make_config(), work_queues=FAST_RETRY)
    with trio.fail_after(40):
        async with running(config) as broker, trio.open_nursery() as nursery:
            result: list[object] = []

            async def worker() -> None:
                result.append(await run_cli(
                    "worker", "--port", str(broker.port), "--client-id", "cli-w", "--count",
                    "10", "--fail-rate", "0.5", "--seed", "3", "--report-interval", "60",
                ))

            nursery.start_soon(worker)
            await wait_until(lambda: broker.stats()["shared_members"] == 1, timeout_s=30)
            producer = Client("127.0.0.1", broker.port, "producer", keepalive_s=0)
            async with producer.connected():
                for n in range(10):
                    await producer.publish("jobs/cli", b"%d" % n, qos=1)
                await producer.wait_acked()
        [done] = result
        assert done.returncode == 0, done.stderr.decode()  # type: ignore[attr-defined]
        lines = done.stdout.decode().splitlines()  # type: ignore[attr-defined]
        assert lines[0] == ("cli-w: working on $share/jobs/jobs/# (MQTT 5.0, QoS 1), failing "
                            "50% of the jobs with reason code 0x80")
        summary = re.match(r"worker cli-w done in .*: received (\d+)  processed 10  failed (\d+)"
                           r"  seen before (\d+)", lines[-1])
        assert summary, lines[-1]
        received, failed, again = (int(n) for n in summary.groups())
        assert failed > 0 and received == 10 + failed and again >= 1
