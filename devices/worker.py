"""A backend worker of a consumer group that fails some jobs on purpose (MQTT 5.0).

    python -m devices worker --group jobs --filter 'jobs/#' --fail-rate 0.1

The worker subscribes to ``$share/<group>/<filter>`` at QoS 1 (``--qos 2``: QoS 2) and
"processes" each message it gets (a job). A fraction ``--fail-rate`` of them fail: the
worker answers PUBACK (PUBREC at QoS 2) with reason code 0x80 (``--fail-code``), which mqttd
takes as "retry this later, elsewhere" (README.md, "Work queues"): the job comes back after
a backoff, to another worker of the group when there is one, and after
``work_queues.max_deliveries`` failed deliveries it is published to
``$dead/<group>/<topic>``. Every interval it prints what it did; at the end a summary.

As a library::

    worker = Worker("127.0.0.1", port, client_id="worker-1", fail_rate=0.1, seed=1)
    await nursery.start(worker.run)        # returns once subscribed
    ...; worker.stats.failed; worker.stop()
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import attrs
import trio

from devices.client import Backoff, Client
from devices.consumer import shared_filter
from devices.subscriber import Subscriber
from mqttd import codec

UNSPECIFIED_ERROR = 0x80


@attrs.define
class WorkerStats:
    received: int = 0  # jobs delivered to this worker
    processed: int = 0  # acknowledged
    failed: int = 0  # rejected on purpose
    redelivered: int = 0  # jobs this worker had seen before (by payload)
    errors: int = 0  # lost connections and failed connection attempts
    elapsed_s: float = 0.0


@attrs.define(eq=False)
class Worker:
    host: str
    port: int
    client_id: str = "worker-1"
    filter: str = "jobs/#"
    group: str = "jobs"
    qos: int = 1
    fail_rate: float = 0.1
    fail_code: int = UNSPECIFIED_ERROR
    persistent: bool = False  # a session the broker keeps for an hour while it is away
    username: str | None = None
    password: str | None = None
    count: int | None = None  # stop after this many jobs processed
    duration_s: float | None = None
    seed: int | None = None
    report: Callable[[str], None] | None = None
    report_interval_s: float = 2.0
    # decides instead of the fail rate: True processes the job, False rejects it
    decide: Callable[[codec.Publish], bool] | None = None
    stats: WorkerStats = attrs.field(init=False, factory=WorkerStats)
    client: Client = attrs.field(init=False)
    _seen: set[bytes] = attrs.field(init=False, factory=set)
    _rng: random.Random = attrs.field(init=False)
    _subscriber: Subscriber = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.client = Client(
            self.host, self.port, self.client_id, clean_session=not self.persistent,
            username=self.username,
            password=self.password.encode() if self.password is not None else None,
            on_message=self._on_message, protocol_level=codec.PROTOCOL_5,
            session_expiry_s=3600 if self.persistent else 0,
        )
        self._subscriber = Subscriber(self.client)

    @property
    def subscription(self) -> str:
        return shared_filter(self.filter, self.group)

    def stop(self) -> None:
        self._subscriber.stop()

    def _on_message(self, packet: codec.Publish) -> int:
        """Process a job: 0 (PUBACK Success) or the failure's reason code."""
        stats = self.stats
        stats.received += 1
        if packet.payload in self._seen:
            stats.redelivered += 1
        elif len(self._seen) < 1_000_000:
            self._seen.add(packet.payload)
        ok = self.decide(packet) if self.decide is not None else (
            self._rng.random() >= self.fail_rate
        )
        if not ok:
            stats.failed += 1
            return self.fail_code
        stats.processed += 1
        if self.count is not None and stats.processed >= self.count:
            self.stop()
        return 0

    async def _session(self, client: Client, connack: codec.ConnAck) -> bool:
        if not connack.session_present:
            (code,) = await client.subscribe((self.subscription, self.qos))
            if code >= 0x80:
                raise RuntimeError(f"subscription to {self.subscription!r} refused: {code:#x}")
        return await self._subscriber.subscribed()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> WorkerStats:
        """Work until ``count`` jobs, ``duration_s`` or :meth:`stop`; reconnects when the
        broker goes away. Reports started once subscribed."""
        started = trio.current_time()
        try:
            await self._subscriber.run(
                self._session, backoff=Backoff(0.5), on_error=self._on_error,
                task_status=task_status, started_with=self,
                report_loop=(functools.partial(self._report_loop, started)
                             if self.report is not None else None),
                duration_s=self.duration_s,
            )
        finally:
            self.stats.elapsed_s = trio.current_time() - started
        return self.stats

    def _on_error(self, exc: BaseException) -> None:
        if self._subscriber.lost_while_stopping():
            return
        self.stats.errors += 1
        if self.report is not None:
            self.report(f"connection error: {exc or repr(exc)} (reconnecting)")

    def line(self) -> str:
        s = self.stats
        return (f"received {s.received:,}  processed {s.processed:,}  failed {s.failed:,}  "
                f"seen before {s.redelivered:,}")

    def summary(self) -> str:
        s = self.stats
        rate = s.processed / s.elapsed_s if s.elapsed_s else 0.0
        return (f"worker {self.client_id} done in {s.elapsed_s:.1f}s: {self.line()}  "
                f"({rate:,.1f} jobs/s)")

    async def _report_loop(self, started: float) -> None:
        assert self.report is not None
        while True:
            await trio.sleep(self.report_interval_s)
            self.report(f"[{trio.current_time() - started:7.1f}s] {self.line()}")
