"""A subscriber that stops reading stalls nobody, and costs bounded memory.

Its writer blocks, its output fills to ``qos0_buffer_bytes`` (QoS 0 beyond that is dropped),
its inflight window fills, its queue fills to its budget and ``overflow_policy`` applies.
The publisher and the healthy subscribers go on at full speed.

The test publisher paces itself on the *healthy* subscribers (at most ``AHEAD`` messages
ahead of the slowest): QoS 0 to a healthy but momentarily slower client may legitimately be
dropped once its output exceeds ``qos0_buffer_bytes``, and pacing keeps that from happening
so "the healthy subscriber gets every message" is exact. The publisher never waits for the
stalled subscriber.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from mqttd.broker import running
from mqttd.codec import (
    PROTOCOL_311,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
)
from mqttd.config import ClientOverride, Config
from tests.conftest import make_config
from tests.rawclient import RawClient

KIB = 1024
MIB = 1024 * KIB
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")

# the limits under test (the subprocess broker gets the same values as YAML)
INFLIGHT = 20
QUEUED_MESSAGES = 100
QUEUED_BYTES = 4 * MIB
QOS0_BUFFER = 1 * MIB
MAX_BUFFERED = 64 * MIB
HEALTHY = ClientOverride(client_id="healthy-*", max_queued_messages=100_000, max_queued_bytes=-1)

BIG = 64 * KIB  # payload size of the 200 MB run
AHEAD = 8  # messages the publisher may be ahead of the slowest healthy subscriber
PUBLISH_WINDOW = 32  # QoS 1 PUBLISHes the publisher keeps unacknowledged
STALLED_RCVBUF = 4096


def in_process_config() -> Config:
    config = make_config(
        max_inflight_messages=INFLIGHT,
        max_queued_messages=QUEUED_MESSAGES,
        max_queued_bytes=QUEUED_BYTES,
        qos0_buffer_bytes=QOS0_BUFFER,
        max_buffered_bytes=MAX_BUFFERED,
    )
    return attrs.evolve(config, client_overrides=(HEALTHY,))


def payload(index: int, size: int) -> bytes:
    return index.to_bytes(4, "big") + bytes(size - 4)


def index_of(payload: bytes) -> int:
    return int.from_bytes(payload[:4], "big")


class Progress:
    """Wakes whoever waits for a publisher ack or a healthy subscriber's receipt."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


async def wait_until(progress: Progress, condition: Callable[[], bool]) -> None:
    while not condition():
        await progress.wait()


# -- clients ---------------------------------------------------------------------------------


async def connect_stalled(
    port: int, client_id: str = "stalled", topic: str = "big/#"
) -> tuple[trio.SocketStream, Decoder]:
    """CONNECT and SUBSCRIBE at QoS 1 with a 4 KiB SO_RCVBUF (set before connecting, so the
    kernel buffers little for it), read CONNACK and SUBACK, and never read again."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, STALLED_RCVBUF)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        Connect(client_id, True, 0).encode() + Subscribe(1, (Subscription(topic, 1),)).encode()
    )
    decoder = Decoder(protocol_level=PROTOCOL_311)
    got: list[Packet] = []
    while len(got) < 2:
        data = await stream.receive_some(9)  # CONNACK (4 bytes) + SUBACK (5 bytes)
        assert data, "broker closed the stalled client"
        got += decoder.feed(data)
    assert got == [ConnAck(False, 0), SubAck(1, (1,))], got
    return stream, decoder


@attrs.define(eq=False)
class Healthy:
    """A subscriber that reads everything and acknowledges every QoS 1 PUBLISH at once."""

    client_id: str
    progress: Progress
    topic: str = "big/#"
    qos0: list[int] = attrs.Factory(list)  # payload indices, in arrival order
    qos1: list[int] = attrs.Factory(list)
    dup_flags: int = 0

    @property
    def received(self) -> int:
        return len(self.qos0) + len(self.qos1)

    async def run(self, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        client, _ = await RawClient.connected(port, self.client_id, keepalive_s=0)
        async with client.stream as stream:
            await client.subscribe(self.topic, qos=1)
            task_status.started()
            packets, client.received = client.received, []
            while True:
                acks = []
                for packet in packets:
                    assert isinstance(packet, Publish), packet
                    if packet.qos:
                        self.qos1.append(index_of(packet.payload))
                        self.dup_flags += packet.dup
                        acks.append(PubAck(packet.packet_id).encode())
                    else:
                        self.qos0.append(index_of(packet.payload))
                if acks:
                    await stream.send_all(b"".join(acks))
                if packets:
                    self.progress.notify()
                data = await stream.receive_some(1 << 20)
                assert data, f"broker closed {self.client_id}"
                packets = client.decoder.feed(data)


async def publish(
    port: int,
    count: int,
    message: Callable[[int], tuple[str, bytes, int]],
    progress: Progress,
    *,
    pace: Sequence[Healthy] = (),
    window: int = PUBLISH_WINDOW,
) -> None:
    """Publish ``message(i)`` for i in range(count) (topic, payload, QoS): pipelined, at most
    ``window`` QoS 1 PUBLISHes unacknowledged and at most ``AHEAD`` messages ahead of the
    slowest of ``pace``; returns once every QoS 1 PUBLISH is acknowledged."""
    client, _ = await RawClient.connected(port, "publisher", keepalive_s=0)
    stream = client.stream
    unacked = 0

    async def read_acks() -> None:
        nonlocal unacked
        while True:
            data = await stream.receive_some(1 << 16)
            assert data, "broker closed the publisher"
            packets = client.decoder.feed(data)
            assert all(isinstance(p, PubAck) for p in packets), packets
            unacked -= len(packets)
            progress.notify()

    async with stream:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_acks)
            sent = 0
            while sent < count:
                limit = min((h.received for h in pace), default=count) + AHEAD if pace else count
                batch = []
                new_unacked = unacked
                while sent < count and sent < limit:
                    topic, body, qos = message(sent)
                    if qos:
                        if new_unacked >= window:
                            break
                        new_unacked += 1
                    batch.append(Publish(topic, body, qos, packet_id=sent % 65535 + 1).encode())
                    sent += 1
                if not batch:
                    await progress.wait()
                    continue
                unacked = new_unacked  # no await since it was read: no ack was missed
                await stream.send_all(b"".join(batch))
            await wait_until(progress, lambda: unacked == 0)
            nursery.cancel_scope.cancel()  # before DISCONNECT: the broker closes after it
        await stream.send_all(Disconnect().encode())


def interleaved(size: int) -> Callable[[int], tuple[str, bytes, int]]:
    """Even indices at QoS 0, odd ones at QoS 1."""
    return lambda i: (f"big/{i % 2}", payload(i, size), i % 2)


# -- the broker as a subprocess, for its RSS ------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/PID/status."""
    result = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                result[key] = int(value.split()[0])
    return result


@asynccontextmanager
async def broker_process(
    data_dir: Path, *args: str
) -> AsyncIterator[tuple[trio.Process, int, bytearray]]:
    """``python -m mqttd`` on a free port with ``data_dir``: (process, port, its log so
    far, kept growing: a full stderr pipe would block the broker). The block SIGTERMs it
    when it wants its exit status; whatever happens, it is killed and reaped on the way out."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mqttd", *args, "--host", "127.0.0.1", "-p", "0",
         "--data-dir", str(data_dir)],
        stderr=subprocess.PIPE,
    )
    log = bytearray()
    try:
        with trio.fail_after(15):
            while not (match := LISTENING.search(log)):
                chunk = await proc.stderr.receive_some(4096)  # type: ignore[union-attr]
                assert chunk, f"broker exited early: {log.decode()}"
                log += chunk

        async def drain_log() -> None:
            while chunk := await proc.stderr.receive_some(65536):  # type: ignore[union-attr]
                log.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_log)
            yield proc, int(match.group(1)), log
            if proc.returncode is None:
                proc.kill()  # the log then reaches EOF, which ends drain_log
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


CONFIG_YAML = f"""\
limits:
  max_inflight_messages: {INFLIGHT}
  max_queued_messages: {QUEUED_MESSAGES}
  max_queued_bytes: {QUEUED_BYTES}
  overflow_policy: drop_oldest
  qos0_buffer_bytes: {QOS0_BUFFER}
  max_buffered_bytes: {MAX_BUFFERED}
client_overrides:
  - client_id: "healthy-*"
    max_queued_messages: 100000
    max_queued_bytes: -1
logging:
  level: info
"""


async def test_stalled_subscriber_stalls_nobody_and_broker_rss_stays_bounded(tmp_path):
    """200 MiB (3200 x 64 KiB, half QoS 0, half QoS 1) through a subprocess broker with a
    subscriber that never reads: the publisher and a healthy subscriber finish, and the
    broker's peak RSS grows by far less than the traffic."""
    count = 3200
    config = tmp_path / "mqttd.yaml"
    config.write_text(CONFIG_YAML)
    async with broker_process(tmp_path, "-c", str(config)) as (proc, port, log):
        baseline = memory_kib(proc.pid)
        with trio.fail_after(120):
            stalled, _ = await connect_stalled(port)
            progress = Progress()
            healthy = Healthy("healthy-1", progress)
            async with trio.open_nursery() as clients:
                await clients.start(healthy.run, port)
                await publish(port, count, interleaved(BIG), progress, pace=[healthy])
                await wait_until(progress, lambda: healthy.received == count)
                after = memory_kib(proc.pid)
                clients.cancel_scope.cancel()
            await stalled.aclose()

        assert healthy.qos0 == list(range(0, count, 2))  # every one, in order
        assert healthy.qos1 == list(range(1, count, 2))  # every one, exactly once
        assert healthy.dup_flags == 0

        # What the configuration lets the broker hold, in bytes of payload:
        #   stalled: its inflight window + its queue budget + its QoS 0 output allowance
        #            (plus the one message that crosses it),
        #   healthy: its inflight window + the publisher's lead + the QoS 0 allowance,
        #   publisher: one packet being decoded + one 64 KiB read.
        stalled_budget = INFLIGHT * BIG + QUEUED_BYTES + QOS0_BUFFER + BIG
        healthy_budget = INFLIGHT * BIG + AHEAD * BIG + QOS0_BUFFER
        budget = stalled_budget + healthy_budget + 2 * BIG
        # Allow 3x for copies (the writer joins what it sends) and allocator slack, plus
        # 32 MiB for the interpreter (freed memory glibc keeps, first-use allocations).
        bound = 3 * budget + 32 * MIB
        growth = after["VmHWM"] * KIB - baseline["VmRSS"] * KIB
        print(
            f"broker RSS: baseline {baseline['VmRSS'] / KIB:.1f} MiB, peak "
            f"{after['VmHWM'] / KIB:.1f} MiB, at the end {after['VmRSS'] / KIB:.1f} MiB; "
            f"growth {growth / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB "
            f"(budget {budget / MIB:.1f} MiB), traffic {count * BIG / MIB:.0f} MiB in"
        )
        assert growth < bound, (growth, bound)
        assert bound < count * BIG / 2  # the bound means something: far below the traffic

        with trio.fail_after(15):
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    text = log.decode()
    assert "client stalled: dropping messages" in text  # drops are logged (once a minute)


# -- exact accounting, in process ------------------------------------------------------------


async def test_stalled_subscriber_drops_are_counted_exactly():
    """QoS 0 then QoS 1, 160 x 64 KiB each: every message for the stalled subscriber is sent,
    queued or dropped, and the counters say which; once it reads again it gets exactly what
    was sent and kept (drop_oldest: the first 20 sent, the newest 64 kept)."""
    n = 160
    progress = Progress()
    healthy = Healthy("healthy-1", progress)
    async with running(in_process_config()) as broker:
        with trio.fail_after(60):
            stalled, decoder = await connect_stalled(broker.port)
            async with trio.open_nursery() as clients:
                await clients.start(healthy.run, broker.port)

                await publish(broker.port, n, lambda i: ("big/0", payload(i, BIG), 0), progress,
                              pace=[healthy])
                await wait_until(progress, lambda: healthy.received == n)
                s = broker.client_stats("stalled")
                assert s is not None
                sent_qos0, dropped_qos0 = s["sent"], s["dropped_qos0"]
                assert sent_qos0 + dropped_qos0 == n
                assert sent_qos0 >= QOS0_BUFFER // BIG  # it got its allowance
                assert dropped_qos0 > 0  # and no more
                assert (s["inflight"], s["queued"], s["dropped"]) == (0, 0, 0)

                await publish(broker.port, n, lambda i: ("big/1", payload(n + i, BIG), 1),
                              progress, pace=[healthy])
                await wait_until(progress, lambda: healthy.received == 2 * n)
                s = broker.client_stats("stalled")
                assert s is not None
                kept = QUEUED_BYTES // BIG  # the byte budget binds before the message budget
                assert s["inflight"] == INFLIGHT and s["sent"] == sent_qos0 + INFLIGHT
                assert s["queued"] == kept and s["queued_bytes"] == kept * BIG
                assert s["dropped"] == n - INFLIGHT - kept
                assert s["dropped_qos0"] == dropped_qos0
                assert s["sent"] - s["inflight"] + s["dropped_qos0"] == n  # QoS 0
                assert s["inflight"] + s["queued"] + s["dropped"] == n  # QoS 1

                h = broker.client_stats("healthy-1")
                assert h is not None and (h["dropped"], h["dropped_qos0"]) == (0, 0)
                total = broker.stats()
                assert total["dropped"] == s["dropped"]
                assert total["dropped_qos0"] == s["dropped_qos0"]
                assert healthy.qos0 == list(range(n)) and healthy.qos1 == list(range(n, 2 * n))
                clients.cancel_scope.cancel()

            # the stalled client reads again: exactly what was sent and kept, then a marker
            async with stalled:
                qos0: list[int] = []
                qos1: list[int] = []
                marker = 2 * n
                marker_sent = False
                while not qos1 or qos1[-1] != marker:
                    data = await stalled.receive_some(1 << 20)
                    assert data, "broker closed the stalled client"
                    acks = []
                    for packet in decoder.feed(data):
                        assert isinstance(packet, Publish), packet
                        (qos1 if packet.qos else qos0).append(index_of(packet.payload))
                        if packet.qos:
                            acks.append(PubAck(packet.packet_id).encode())
                    if acks:
                        await stalled.send_all(b"".join(acks))
                    if len(qos1) == INFLIGHT + kept and not marker_sent:  # drained: what next?
                        publisher, _ = await RawClient.connected(broker.port, "marker")
                        await publisher.publish("big/1", payload(marker, 8), qos=1)
                        await publisher.aclose()
                        marker_sent = True
                assert len(qos0) == sent_qos0 and qos0 == sorted(set(qos0))
                assert qos1 == [*range(n, n + INFLIGHT), *range(2 * n - kept, 2 * n), marker]
                s = broker.client_stats("stalled")
                assert s is not None and s["dropped"] == n - INFLIGHT - kept


# -- fairness --------------------------------------------------------------------------------


async def test_one_stalled_subscriber_does_not_slow_nine_healthy_ones():
    """5000 QoS 1 messages of 1 KiB; one subscriber never reads, nine read and ack: each of
    the nine gets all 5000, once, in order; the stalled one's drops are all counted."""
    n, size = 5000, 1 * KIB
    progress = Progress()
    healthy = [Healthy(f"healthy-{i}", progress) for i in range(9)]
    async with running(in_process_config()) as broker:
        with trio.fail_after(60):
            stalled, _ = await connect_stalled(broker.port)
            async with trio.open_nursery() as clients:
                for h in healthy:
                    await clients.start(h.run, broker.port)
                await publish(broker.port, n, lambda i: ("big/1", payload(i, size), 1), progress,
                              window=64)
                await wait_until(progress, lambda: all(h.received == n for h in healthy))
                for h in healthy:
                    assert h.qos1 == list(range(n)), h.client_id
                    assert h.dup_flags == 0
                    stats = broker.client_stats(h.client_id)
                    assert stats is not None and stats["dropped"] == 0
                clients.cancel_scope.cancel()
            s = broker.client_stats("stalled")
            assert s is not None
            kept = min(QUEUED_MESSAGES, QUEUED_BYTES // size)
            assert (s["inflight"], s["queued"]) == (INFLIGHT, kept)
            assert s["dropped"] == n - INFLIGHT - kept
            assert broker.stats()["dropped"] == s["dropped"]
            await stalled.aclose()


async def test_stalled_clients_filling_the_broker_buffer_are_disconnected_not_everyone():
    """Three stalled subscribers whose output alone exceeds max_buffered_bytes: the broker
    pauses reading, then disconnects the clients whose output has not moved for
    stalled_output_timeout_s, and the publisher and the healthy subscriber finish."""
    config = attrs.evolve(
        make_config(
            max_inflight_messages=INFLIGHT,
            qos0_buffer_bytes=QOS0_BUFFER,
            max_buffered_bytes=4 * MIB,
            stalled_output_timeout_s=0.5,
        ),
        client_overrides=(HEALTHY,),
    )
    count = 400
    progress = Progress()
    with trio.fail_after(60):
        async with running(config) as broker:
            stalled = [await connect_stalled(broker.port, f"stalled-{i}") for i in range(3)]
            healthy = Healthy("healthy-1", progress)
            async with trio.open_nursery() as nursery:
                await nursery.start(healthy.run, broker.port)
                await publish(broker.port, count, interleaved(BIG), progress, pace=[healthy])
                await wait_until(progress, lambda: healthy.received == count)
                nursery.cancel_scope.cancel()
            assert sorted(healthy.qos0 + healthy.qos1) == list(range(count))
            assert broker.stats()["stalled_disconnects"] >= 1
            assert broker.stats()["read_pauses"] >= 1
            for stream, _ in stalled:
                await stream.aclose()


async def test_at_the_default_configuration_a_stalled_subscriber_costs_a_healthy_one_nothing(
    tmp_path,
):
    """The issue's scenario at the default configuration (no config file): one publisher
    sends 100,000 x 1 KiB at QoS 0, then 100,000 at QoS 1 with 64 unacknowledged; one
    subscriber never reads, one reads and acknowledges everything. The healthy one gets every
    message of both (mqttd used to deliver only 65% of the QoS 1 ones); the broker holds the
    publisher once, until the stalled one counts as stalled (5 s), and its RSS grows by less
    than 64 MiB while 200 MiB go through."""
    count = 100_000
    async with broker_process(tmp_path) as (proc, port, log):
        baseline = memory_kib(proc.pid)
        with trio.fail_after(240):
            stalled, _ = await connect_stalled(port)
            progress = Progress()
            healthy = Healthy("healthy-1", progress)
            async with trio.open_nursery() as clients:
                await clients.start(healthy.run, port)
                await publish(
                    port, 2 * count,
                    lambda i: ("big/x", payload(i, 1024), 0 if i < count else 1),
                    progress, window=64,
                )
                await wait_until(progress, lambda: healthy.received == 2 * count)
                after = memory_kib(proc.pid)
                clients.cancel_scope.cancel()
            await stalled.aclose()
        assert healthy.qos0 == list(range(count))
        assert healthy.qos1 == list(range(count, 2 * count))
        growth = after["VmHWM"] * KIB - baseline["VmRSS"] * KIB
        print(f"broker RSS growth {growth / MIB:.1f} MiB with 200 MiB through it")
        assert growth < 64 * MIB
        with trio.fail_after(15):
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    text = log.decode()
    assert text.count("output stalled") == 1, text[-3000:]  # held once, then cut out
