"""Crash-test harness: the broker as a subprocess that can be ``kill -9``-ed, a pipelined QoS 1
publisher that records which message numbers were PUBACKed, a subscriber that drains a
persistent session, and the checks comparing what was acknowledged with what arrived.

Message payloads are message numbers as ASCII digits; numbering is ascending across rounds.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mqttd.codec import Disconnect, PubAck, Publish, SubAck, Subscribe, Subscription
from tests.rawclient import RawClient

LISTENING = re.compile(rb"mqttd listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 30.0  # python start-up on a loaded machine
_CONNECTION_LOST = (trio.BrokenResourceError, trio.ClosedResourceError)


def write_config(data_dir: Path) -> Path:
    """A config file with the default limits: a persistent session's queue is on disk with a
    budget of 1 GiB and no message count (it used to be 1000 messages, which lost 99% of
    what a crash run acknowledged)."""
    path = data_dir / "crash-test.yaml"
    path.write_text("logging:\n  level: info\n")
    return path


# -- the broker process ---------------------------------------------------------------------


@dataclass
class BrokerProcess:
    proc: trio.Process
    port: int
    log: bytearray
    killed: bool = False

    def kill(self) -> None:
        """``kill -9`` the broker now. Fails if it had already died on its own."""
        assert self.proc.returncode is None, (
            f"broker died before the kill (rc {self.proc.returncode}):\n{self.tail()}"
        )
        self.proc.kill()
        self.killed = True

    async def reap(self) -> None:
        with trio.fail_after(10):
            returncode = await self.proc.wait()
        assert returncode == -signal.SIGKILL, f"broker exited with {returncode}:\n{self.tail()}"

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.decode(errors="replace").splitlines()[-lines:])


async def _drain_stderr(proc: trio.Process, log: bytearray) -> None:
    """Keep reading the broker's stderr so a chatty broker never blocks on a full pipe."""
    assert proc.stderr is not None
    try:
        while chunk := await proc.stderr.receive_some(65536):
            log += chunk
    except _CONNECTION_LOST:
        pass


@asynccontextmanager
async def broker_process(data_dir: Path, config_file: Path) -> AsyncIterator[BrokerProcess]:
    """Run ``python -m mqttd`` on a free port with ``--data-dir data_dir``. Whatever happens,
    the process is SIGKILLed and reaped on exit: no broker outlives the block."""
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "mqttd",
            "--host",
            "127.0.0.1",
            "-p",
            "0",
            "--data-dir",
            str(data_dir),
            "-c",
            str(config_file),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        log = bytearray()
        with trio.fail_after(START_TIMEOUT_S):
            while not (match := LISTENING.search(log)):
                chunk = await proc.stderr.receive_some(65536)
                assert chunk, f"broker exited before listening:\n{log.decode(errors='replace')}"
                log += chunk
        broker = BrokerProcess(proc, int(match.group(1)), log)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain_stderr, proc, log)
            try:
                yield broker
            finally:
                if proc.returncode is None:
                    proc.kill()  # stderr then reaches EOF, which ends the drain task
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
        if proc.stderr is not None:
            await proc.stderr.aclose()


# -- publisher --------------------------------------------------------------------------------


class Publisher:
    """Publishes QoS 1 messages numbered ``first``, ``first + 1``, ... as fast as the broker
    takes them, with up to ``window`` unacknowledged at once, until the connection dies (the
    broker is killed) or :meth:`stop` is called. ``acked`` holds the numbers PUBACKed."""

    def __init__(
        self,
        port: int,
        first: int,
        topic_of: Callable[[int], str],
        *,
        retain: bool = False,
        window: int = 100,
        client_id: str = "crash-pub",
    ) -> None:
        self.port = port
        self.next_number = first
        self.topic_of = topic_of
        self.retain = retain
        self.window = window
        self.client_id = client_id
        self.sent: list[int] = []  # in order of sending
        self.acked: set[int] = set()
        self.inflight: dict[int, int] = {}  # packet id -> message number
        self.ended_by: str = "running"
        self._last_pid = 0
        self._targets: list[tuple[int, trio.Event]] = []
        self._after_acks: tuple[int, Callable[[], None]] | None = None
        self.in_flight_at_call: int | None = None
        self._stopping = False
        self._stopped = trio.Event()
        self._window_open = trio.Semaphore(window)

    async def wait_acked(self, count: int) -> None:
        """Return once at least ``count`` messages were PUBACKed (bound it with fail_after)."""
        if len(self.acked) >= count:
            return
        event = trio.Event()
        self._targets.append((count, event))
        await event.wait()

    def call_after_acks(self, count: int, action: Callable[[], None]) -> None:
        """Call ``action()`` (e.g. kill the broker) from the sending task, right after it
        wrote a batch of PUBLISHes, once ``count`` messages were PUBACKed: the action then
        happens mid-stream, with messages in flight."""
        self._after_acks = (count, action)

    async def stop(self) -> None:
        """Stop sending, wait for the PUBACKs of what is in flight, then DISCONNECT."""
        self._stopping = True
        await self._stopped.wait()

    def _packet_id(self) -> int:
        pid = self._last_pid
        while True:
            pid = pid % 65535 + 1
            if pid not in self.inflight:  # never reuse an id still waiting for its PUBACK
                self._last_pid = pid
                return pid

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        client, _ = await RawClient.connected(self.port, self.client_id, clean_session=True)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, client, nursery.cancel_scope)
                nursery.start_soon(self._receive_loop, client, nursery.cancel_scope)
            if self._stopping and self.ended_by == "running":
                self.ended_by = "stopped"
                await client.stream.send_all(Disconnect().encode())
        except _CONNECTION_LOST:
            self.ended_by = "connection lost"
        finally:
            self._stopped.set()
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _send_loop(self, client: RawClient, done: trio.CancelScope) -> None:
        try:
            while not self._stopping:
                await self._window_open.acquire()
                batch = 1
                while batch < 50:  # send what the window allows in one write
                    try:
                        self._window_open.acquire_nowait()
                    except trio.WouldBlock:
                        break
                    batch += 1
                data = bytearray()
                for _ in range(batch):
                    number = self.next_number
                    self.next_number += 1
                    pid = self._packet_id()
                    self.inflight[pid] = number
                    self.sent.append(number)
                    data += Publish(
                        self.topic_of(number), str(number).encode(), 1, self.retain, False, pid
                    ).encode()
                await client.stream.send_all(data)
                if (
                    self._after_acks is not None
                    and len(self.acked) >= self._after_acks[0]
                    and self.inflight  # not all acked during send_all: still mid-stream
                ):
                    action = self._after_acks[1]
                    self._after_acks = None
                    self.in_flight_at_call = len(self.inflight)
                    action()
        except _CONNECTION_LOST as exc:
            self.ended_by = f"connection lost while sending ({type(exc).__name__})"
            done.cancel()

    async def _receive_loop(self, client: RawClient, done: trio.CancelScope) -> None:
        assert not client.received, f"publisher got {client.received!r} after CONNACK"
        try:
            while not (self._stopping and not self.inflight):
                data = await client.stream.receive_some(65536)
                if not data:
                    self.ended_by = "connection closed by the broker"
                    break
                for packet in client.decoder.feed(data):
                    assert isinstance(packet, PubAck), f"publisher got {packet!r}"
                    number = self.inflight.pop(packet.packet_id)  # KeyError: unknown id
                    self.acked.add(number)
                    self._window_open.release()
                acked = len(self.acked)
                for target in [t for t in self._targets if t[0] <= acked]:
                    self._targets.remove(target)
                    target[1].set()
        except _CONNECTION_LOST as exc:
            self.ended_by = f"connection lost while receiving ({type(exc).__name__})"
        done.cancel()


# -- subscriber -------------------------------------------------------------------------------


@dataclass
class Delivery:
    session_present: bool | None = None
    numbers: list[int] = field(default_factory=list)  # arrival order, duplicates included
    topics: dict[int, str] = field(default_factory=dict)
    retained: dict[str, int] = field(default_factory=dict)  # topic -> last number, retain=1
    dup_flags: int = 0
    non_retained: int = 0
    ended_by: str = ""


async def subscribe_and_leave(port: int, client_id: str, topic_filter: str) -> None:
    """Create a persistent session (clean session 0) subscribed at QoS 1, then go offline."""
    client, _ = await RawClient.connected(port, client_id, clean_session=False)
    suback = await client.subscribe(topic_filter, qos=1)
    assert suback.return_codes == (1,), suback
    await client.send(Disconnect())
    await client.aclose()


async def collect(
    port: int,
    client_id: str,
    *,
    clean_session: bool,
    subscribe: str | None = None,
    done: Callable[[Delivery], bool] = lambda d: False,
    idle_s: float = 30.0,
    grace_s: float = 0.5,
    overall_s: float = 60.0,
) -> Delivery:
    """Connect, optionally subscribe at QoS 1, and take every PUBLISH (PUBACKing QoS 1 ones)
    until ``done(delivery)`` holds and ``grace_s`` passes without a message, or ``idle_s``
    passes without one, or the broker closes the connection, or ``overall_s`` is up.

    ``idle_s`` only ends a collection that is not done (so the test fails): it is generous,
    for a loaded machine, where a restarted broker or its bridge may be slow to resume.
    What comes after ``grace_s`` (more duplicates) is not needed by any check."""
    delivery = Delivery()
    client, connack = await RawClient.connected(port, client_id, clean_session=clean_session)
    delivery.session_present = connack.session_present
    try:
        with trio.move_on_after(overall_s) as overall:
            if subscribe is not None:
                # the SUBACK is read (and skipped) below, with the messages
                await client.send(Subscribe(1, (Subscription(subscribe, 1),)))
            # packets that came in the same read as the CONNACK are already decoded
            packets, client.received = client.received, []
            while True:
                acks = bytearray()
                for packet in packets:
                    if isinstance(packet, SubAck):
                        assert packet.return_codes == (1,), packet
                        continue
                    assert isinstance(packet, Publish), f"subscriber got {packet!r}"
                    number = int(packet.payload)
                    delivery.numbers.append(number)
                    delivery.topics[number] = packet.topic
                    delivery.dup_flags += packet.dup
                    if packet.retain:
                        delivery.retained[packet.topic] = number
                    else:
                        delivery.non_retained += 1
                    if packet.qos == 1:
                        acks += PubAck(packet.packet_id).encode()
                if acks:
                    await client.stream.send_all(acks)
                with trio.move_on_after(grace_s if done(delivery) else idle_s) as idle:
                    data = await client.stream.receive_some(65536)
                if idle.cancelled_caught:
                    delivery.ended_by = "done" if done(delivery) else f"idle {idle_s} s"
                    break
                if not data:
                    delivery.ended_by = "connection closed by the broker"
                    break
                packets = client.decoder.feed(data)
        if overall.cancelled_caught:
            delivery.ended_by = f"overall timeout {overall_s} s"
        else:
            await client.stream.send_all(Disconnect().encode())
    except _CONNECTION_LOST as exc:
        delivery.ended_by = f"connection lost ({type(exc).__name__})"
    finally:
        await client.aclose()
    return delivery


# -- checks -----------------------------------------------------------------------------------


def check_queue_delivery(
    acked: set[int], sent: set[int], delivery: Delivery, topic: str
) -> tuple[list[str], str]:
    """Problems (empty if the durability contract held) and a summary line."""
    problems = []
    seen = set(delivery.numbers)
    missing = sorted(acked - seen)
    unknown = sorted(seen - sent)
    duplicates = len(delivery.numbers) - len(seen)
    unacked_arrived = len(seen & (sent - acked))
    if delivery.session_present is not True:
        problems.append(f"session_present={delivery.session_present}, expected True")
    if missing:
        problems.append(
            f"{len(missing)} of {len(acked)} PUBACKed messages never arrived "
            f"(first {missing[:10]}, last {missing[-3:]})"
        )
    if unknown:
        problems.append(f"{len(unknown)} numbers arrived that were never sent: {unknown[:10]}")
    wrong_topic = [n for n, t in delivery.topics.items() if t != topic]
    if wrong_topic:
        problems.append(f"messages on an unexpected topic: {wrong_topic[:10]}")
    first_seen: list[int] = []
    already: set[int] = set()
    for number in delivery.numbers:
        if number not in already:
            already.add(number)
            first_seen.append(number)
    for i in range(1, len(first_seen)):
        if first_seen[i] < first_seen[i - 1]:
            problems.append(
                f"out of order: {first_seen[i]} first arrived after {first_seen[i - 1]} "
                f"(position {i}; context {first_seen[max(0, i - 5) : i + 5]})"
            )
            break
    summary = (
        f"sent {len(sent)}, PUBACKed {len(acked)}, received {len(delivery.numbers)} "
        f"({len(seen)} distinct): missing {len(missing)}, duplicates {duplicates} "
        f"(DUP flag on {delivery.dup_flags}), arrived without PUBACK {unacked_arrived}; "
        f"session_present={delivery.session_present}; subscriber ended: {delivery.ended_by}"
    )
    return problems, summary


def check_retained(
    acked: set[int],
    sent: set[int],
    delivery: Delivery,
    topic_of: Callable[[int], str],
) -> tuple[list[str], str]:
    """Every topic with a PUBACKed retained message must hold that message or a newer one."""
    problems = []
    last_acked: dict[str, int] = {}
    for number in acked:
        topic = topic_of(number)
        last_acked[topic] = max(number, last_acked.get(topic, number))
    missing, stale, newer = [], [], 0
    for topic, number in sorted(last_acked.items()):
        got = delivery.retained.get(topic)
        if got is None:
            missing.append(topic)
        elif got < number:
            stale.append(f"{topic}: {got} < last PUBACKed {number}")
        elif got > number:
            newer += 1
    if missing:
        problems.append(
            f"{len(missing)} of {len(last_acked)} topics lost their retained message "
            f"(e.g. {missing[:5]})"
        )
    if stale:
        problems.append(f"{len(stale)} topics hold an older retained message: {stale[:5]}")
    for topic, number in delivery.retained.items():
        if number not in sent or topic_of(number) != topic:
            problems.append(f"retained {topic} = {number}: never published to that topic")
    if delivery.non_retained:
        problems.append(f"{delivery.non_retained} messages arrived without the retain flag")
    summary = (
        f"sent {len(sent)}, PUBACKed {len(acked)}, topics {len(last_acked)}: retained "
        f"received for {len(delivery.retained)}, missing {len(missing)}, stale {len(stale)}, "
        f"newer than the last PUBACK {newer}; subscriber ended: {delivery.ended_by}"
    )
    return problems, summary
