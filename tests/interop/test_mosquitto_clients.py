"""mosquitto_pub / mosquitto_sub (MQTT 3.1.1 and 3.1) against the in-process broker.

The clients are subprocesses started with ``trio.lowlevel.open_process``; each is killed through
its own handle when its block ends, so none outlives its test. A subscriber's readiness is
observed in the broker (its session holds the filter), never assumed after a sleep.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from mqttd.broker import Broker

TEST_TIMEOUT_S = 20
WAIT_S = 5.0
POLL_S = 0.01
KILL_WAIT_S = 5.0

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
    reason="mosquitto_pub / mosquitto_sub are not installed (apt-get install mosquitto-clients)",
)

VERSIONS = ["mqttv311", "mqttv31"]
FORMAT = "%t|%q|%r|%p"  # topic | QoS | retain flag | payload

_ids = itertools.count(1)


def unique_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"  # short: MQTT 3.1 allows 23 characters


def client_args(broker: Broker, version: str, client_id: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(broker.port), "-V", version, "-i", client_id]


@asynccontextmanager
async def started(args: list[str]) -> AsyncIterator[trio.Process]:
    """A running client process; killed (if still running) and reaped on exit."""
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT_S):
            await proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                await trio.aclose_forcefully(stream)


async def _read_all(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
    assert stream is not None
    while chunk := await stream.receive_some(65536):
        into += chunk


async def finish(proc: trio.Process) -> tuple[int, list[str], str]:
    """Wait for the process to exit on its own; returns (return code, stdout lines, stderr)."""
    out, err = bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_all, proc.stdout, out)
        nursery.start_soon(_read_all, proc.stderr, err)
    returncode = await proc.wait()
    return returncode, out.decode().splitlines(), err.decode()


async def run_client(args: list[str]) -> list[str]:
    """Run a client to completion; it must succeed. Returns its stdout lines."""
    async with started(args) as proc:
        returncode, lines, err = await finish(proc)
    assert returncode == 0, f"{args[0]} exited with {returncode}: {err}"
    return lines


async def mosquitto_pub(
    broker: Broker, version: str, topic: str, payload: str, qos: int = 0, *extra: str
) -> None:
    """Publish one message; with QoS 1/2 mosquitto_pub exits after the flow completed."""
    args = client_args(broker, version, unique_id("pub"))
    await run_client(["mosquitto_pub", *args, "-t", topic, "-m", payload, "-q", str(qos), *extra])


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(POLL_S)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def wait_subscribed(broker: Broker, client_id: str, topic_filter: str) -> None:
    def subscribed() -> bool:
        session = broker.sessions.get(client_id)
        return (
            session is not None
            and session.connection is not None
            and topic_filter in session.subscriptions
        )

    await wait_until(subscribed, f"{client_id} to subscribe to {topic_filter!r}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
async def test_publish_subscribe_each_qos(broker, version, sub_qos):
    with trio.fail_after(TEST_TIMEOUT_S):
        verbose_id, format_id = unique_id("subv"), unique_id("subf")
        common = ["-q", str(sub_qos), "-t", "mosq/qos/#", "-C", "3"]
        async with (
            started(["mosquitto_sub", *client_args(broker, version, verbose_id), *common, "-v"])
            as verbose,
            started(
                ["mosquitto_sub", *client_args(broker, version, format_id), *common, "-F", FORMAT]
            ) as formatted,
        ):
            await wait_subscribed(broker, verbose_id, "mosq/qos/#")
            await wait_subscribed(broker, format_id, "mosq/qos/#")
            for q in (0, 1, 2):
                await mosquitto_pub(broker, version, f"mosq/qos/{q}", f"hello {q}", q)
            results = [await finish(verbose), await finish(formatted)]

        for returncode, _, err in results:
            assert returncode == 0, err
        (_, verbose_lines, _), (_, format_lines, _) = results
        # a QoS 2 message is handed over on PUBREL, so arrival order may differ by QoS
        assert sorted(verbose_lines) == [f"mosq/qos/{q} hello {q}" for q in (0, 1, 2)]
        assert sorted(format_lines) == [
            f"mosq/qos/{q}|{min(q, sub_qos)}|0|hello {q}" for q in (0, 1, 2)
        ]


@pytest.mark.parametrize("version", VERSIONS)
async def test_retained_message_to_later_subscriber(broker, version):
    with trio.fail_after(TEST_TIMEOUT_S):
        await mosquitto_pub(broker, version, "mosq/retained/state", "on", 1, "-r")
        lines = await run_client(
            ["mosquitto_sub", *client_args(broker, version, unique_id("late")),
             "-t", "mosq/retained/+", "-q", "2", "-C", "1", "-F", FORMAT]
        )  # fmt: skip
        assert lines == ["mosq/retained/state|1|1|on"]

        # an empty retained payload clears it: a later subscriber gets only live messages
        await mosquitto_pub(broker, version, "mosq/retained/state", "", 1, "-r")
        sub_id = unique_id("later")
        async with started(
            ["mosquitto_sub", *client_args(broker, version, sub_id),
             "-t", "mosq/retained/+", "-q", "1", "-C", "1", "-F", FORMAT]
        ) as sub:  # fmt: skip
            await wait_subscribed(broker, sub_id, "mosq/retained/+")
            await mosquitto_pub(broker, version, "mosq/retained/state", "live", 1)
            returncode, lines, err = await finish(sub)
        assert returncode == 0, err
        assert lines == ["mosq/retained/state|1|0|live"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_will_published_when_client_is_killed(broker, version):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher_id, device_id = unique_id("watch"), unique_id("device")
        async with started(
            ["mosquitto_sub", *client_args(broker, version, watcher_id),
             "-t", "mosq/will/#", "-q", "1", "-C", "1", "-F", FORMAT]
        ) as watcher:  # fmt: skip
            await wait_subscribed(broker, watcher_id, "mosq/will/#")
            async with started(
                ["mosquitto_sub", *client_args(broker, version, device_id),
                 "-t", "mosq/device/cmd", "-q", "1",
                 "--will-topic", "mosq/will/device", "--will-payload", "gone",
                 "--will-qos", "1"]
            ) as device:  # fmt: skip
                await wait_subscribed(broker, device_id, "mosq/device/cmd")
                device.kill()  # SIGKILL: no DISCONNECT, the socket is closed by the kernel
                await device.wait()
            returncode, lines, err = await finish(watcher)
        assert returncode == 0, err
        assert lines == ["mosq/will/device|1|0|gone"]
        await wait_until(lambda: device_id not in broker.sessions, "the device's session to end")


@pytest.mark.parametrize("version", VERSIONS)
async def test_no_will_after_clean_disconnect(broker, version):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher_id, device_id = unique_id("watch"), unique_id("device")
        async with started(
            ["mosquitto_sub", *client_args(broker, version, watcher_id),
             "-t", "mosq/will/#", "-q", "1", "-C", "1", "-F", FORMAT]
        ) as watcher:  # fmt: skip
            await wait_subscribed(broker, watcher_id, "mosq/will/#")
            # -E: exit (with DISCONNECT) once the subscription is acknowledged
            await run_client(
                ["mosquitto_sub", *client_args(broker, version, device_id),
                 "-t", "mosq/device/cmd", "-E",
                 "--will-topic", "mosq/will/device", "--will-payload", "gone",
                 "--will-qos", "1"]
            )  # fmt: skip
            await wait_until(lambda: device_id not in broker.sessions, "the device to be gone")
            # a will would have been routed by now; the marker must be the first message
            await mosquitto_pub(broker, version, "mosq/will/marker", "marker", 1)
            returncode, lines, err = await finish(watcher)
        assert returncode == 0, err
        assert lines == ["mosq/will/marker|1|0|marker"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_persistent_session_resumes(broker, version):
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("persist")
        persistent = ["-c", "-q", "1", "-t", "mosq/persist/#", "-v"]
        sub_args = ["mosquitto_sub", *client_args(broker, version, client_id), *persistent]

        # subscribe, then leave: -E disconnects once the SUBACK is in
        assert await run_client([*sub_args, "-E"]) == []
        session = broker.sessions[client_id]
        await wait_until(lambda: session.connection is None, "the session to be detached")

        payloads = [f"while away {i}" for i in range(5)]
        for payload in payloads:  # one topic (publishers one after the other)
            await mosquitto_pub(broker, version, "mosq/persist/q", payload, 1)

        # The queued messages are sent right after the CONNACK, so mosquitto_sub gets all
        # of them and exits before it reads its SUBACK: closing a socket with unread input
        # sends an RST, which drops whatever the kernel still holds back. Without --nodelay,
        # Nagle holds PUBACKs 2..n behind the first, they never leave the client, and the
        # broker rightly keeps those messages in flight (to resend with DUP next time).
        lines = await run_client([*sub_args, "--nodelay", "-C", str(len(payloads))])
        # each publisher is a new client: MQTT orders no messages across publishers
        assert sorted(lines) == [f"mosq/persist/q {p}" for p in payloads]
        assert broker.sessions[client_id] is session  # resumed, not replaced
        await wait_until(lambda: session.connection is None, "the second disconnect")
        assert not session.inflight and not session.out.ram  # every PUBACK was handled


@pytest.mark.parametrize("version", VERSIONS)
async def test_persistent_session_survives_kill(broker, version):
    """A persistent subscriber killed (no DISCONNECT) still gets what was sent meanwhile."""
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("killed")
        sub_args = [
            "mosquitto_sub", *client_args(broker, version, client_id),
            "-c", "-q", "1", "-t", "mosq/killed/#", "-v",
        ]  # fmt: skip
        async with started(sub_args) as sub:
            await wait_subscribed(broker, client_id, "mosq/killed/#")
            session = broker.sessions[client_id]
            sub.kill()
            await sub.wait()
        await wait_until(lambda: session.connection is None, "the broker to see the kill")

        await mosquitto_pub(broker, version, "mosq/killed/a", "one", 1)
        await mosquitto_pub(broker, version, "mosq/killed/b", "two", 2)

        lines = await run_client([*sub_args, "-C", "2"])
        # two publishers: MQTT orders nothing between them
        assert sorted(lines) == ["mosq/killed/a one", "mosq/killed/b two"]
        assert broker.sessions[client_id] is session
