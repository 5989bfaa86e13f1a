"""amqtt's ``MQTTClient`` (asyncio) against the in-process trio broker.

Each client scenario is an asyncio coroutine run by ``asyncio.run`` in a worker thread
(``trio.to_thread.run_sync``), so the asyncio loop and the broker's trio loop never share
a thread. Every coroutine is bounded by ``asyncio.timeout``, so the worker thread always
ends; where the trio side must know what the broker did between two scenarios, it polls
broker state, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from amqtt.client import MQTTClient
from amqtt.session import ApplicationMessage

TEST_TIMEOUT_S = 20
SCENARIO_TIMEOUT_S = 10  # inside the asyncio thread; below TEST_TIMEOUT_S
RECEIVE_TIMEOUT_S = 5
POLL_S = 0.01

_ids = itertools.count(1)


def unique_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


async def in_asyncio(scenario: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``scenario(*args)`` to completion in a fresh asyncio loop in a worker thread."""

    async def bounded() -> Any:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            return await scenario(*args)

    return await trio.to_thread.run_sync(asyncio.run, bounded())


def trio_caller() -> Callable[..., Awaitable[Any]]:
    """For a scenario: ``await call(async_fn, *args)`` runs ``async_fn`` in the test's trio
    loop (the broker's) and returns its result, without blocking the asyncio loop."""
    token = trio.lowlevel.current_trio_token()

    async def call(async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await asyncio.to_thread(trio.from_thread.run, async_fn, *args, trio_token=token)

    return call


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 5) -> None:
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(POLL_S)
        return
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def amqtt_client(
    port: int,
    client_id: str | None = None,
    *,
    cleansession: bool = True,
    will: dict[str, Any] | None = None,
) -> AsyncIterator[MQTTClient]:
    """A connected amqtt client (inside the asyncio loop); disconnected on exit."""
    config: dict[str, Any] = {
        "auto_reconnect": False,  # a lost connection is a failure here, not retried
        "keep_alive": 30,
        "cleansession": cleansession,
        "connection": {"uri": f"mqtt://127.0.0.1:{port}"},
    }
    if will is not None:
        config["will"] = will
    client = MQTTClient(client_id=client_id, config=config)
    try:
        assert await client.connect() == 0
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), RECEIVE_TIMEOUT_S)


async def receive(client: MQTTClient, count: int) -> list[ApplicationMessage]:
    messages = []
    for _ in range(count):
        message = await client.deliver_message(timeout_duration=RECEIVE_TIMEOUT_S)
        assert message is not None
        messages.append(message)
    return messages


@pytest.mark.parametrize("sub_qos", [0, 1, 2])
async def test_publish_subscribe_each_qos(broker, sub_qos):
    async def scenario(port: int) -> list[tuple[str, bytes, int, bool]]:
        async with amqtt_client(port) as sub, amqtt_client(port) as pub:
            assert await sub.subscribe([("amqtt/qos/#", sub_qos)]) == [sub_qos]
            for pub_qos in (0, 1, 2):
                # returns once the flow is complete (PUBACK / PUBCOMP for QoS 1 / 2)
                await pub.publish(f"amqtt/qos/{pub_qos}", f"qos {pub_qos}".encode(), qos=pub_qos)
            messages = await receive(sub, 3)
            return [(m.topic, bytes(m.data), m.qos, m.retain) for m in messages]

    with trio.fail_after(TEST_TIMEOUT_S):
        got = await in_asyncio(scenario, broker.port)
    assert sorted(got) == [
        (f"amqtt/qos/{pub_qos}", f"qos {pub_qos}".encode(), min(pub_qos, sub_qos), False)
        for pub_qos in (0, 1, 2)
    ]


async def test_retained_message_to_later_subscriber(broker):
    async def publish(port: int) -> None:
        async with amqtt_client(port) as pub:
            await pub.publish("amqtt/retained/state", b"42", qos=1, retain=True)

    async def subscribe_later(port: int) -> tuple[str, bytes, int, bool]:
        async with amqtt_client(port) as sub:
            assert await sub.subscribe([("amqtt/retained/+", 2)]) == [2]
            (message,) = await receive(sub, 1)
            return message.topic, bytes(message.data), message.qos, message.retain

    with trio.fail_after(TEST_TIMEOUT_S):
        await in_asyncio(publish, broker.port)
        got = await in_asyncio(subscribe_later, broker.port)
    assert got == ("amqtt/retained/state", b"42", 1, True)


async def test_persistent_session_resumes(broker):
    client_id = unique_id("amqtt-persist")
    payloads = [f"while away {i}".encode() for i in range(5)]

    async def subscribe_and_leave(port: int) -> None:
        async with amqtt_client(port, client_id, cleansession=False) as sub:
            assert await sub.subscribe([("amqtt/persist/#", 1)]) == [1]

    async def publish_while_away(port: int) -> None:
        async with amqtt_client(port) as pub:
            for payload in payloads:  # one publisher, one topic: MQTT promises the order
                await pub.publish("amqtt/persist/q", payload, qos=1)

    async def come_back(port: int) -> list[tuple[str, bytes, int]]:
        async with amqtt_client(port, client_id, cleansession=False) as sub:
            messages = await receive(sub, len(payloads))
            # amqtt hands a QoS 1 message over before it sends the PUBACK: wait for the
            # broker to have every PUBACK, or the DISCONNECT could overtake the last ones
            await on_trio(wait_until, lambda: not session.inflight, "the PUBACKs")
            return [(m.topic, bytes(m.data), m.qos) for m in messages]

    on_trio = trio_caller()
    with trio.fail_after(TEST_TIMEOUT_S):
        await in_asyncio(subscribe_and_leave, broker.port)
        session = broker.sessions[client_id]
        assert session.persistent
        await wait_until(lambda: session.connection is None, "the session to be detached")

        await in_asyncio(publish_while_away, broker.port)
        got = await in_asyncio(come_back, broker.port)
        await wait_until(lambda: session.connection is None, "the second disconnect")

    assert got == [("amqtt/persist/q", p, 1) for p in payloads]
    # the stored session was resumed, not replaced, and kept after the clean disconnect
    assert broker.sessions[client_id] is session
    assert session.subscriptions == {"amqtt/persist/#": 1}
    assert not session.inflight and not session.out.ram


@pytest.mark.parametrize("ending", ["abort", "disconnect"])
async def test_will_only_when_connection_drops(broker, ending):
    will = {"topic": "amqtt/will/device", "message": "gone", "qos": 1, "retain": False}
    device_id = unique_id("amqtt-device")
    on_trio = trio_caller()

    async def device_gone() -> None:
        await wait_until(lambda: device_id not in broker.sessions, "the device's session to end")

    async def scenario(port: int) -> list[tuple[str, bytes, int, bool]]:
        async with amqtt_client(port) as watcher, amqtt_client(port) as pub:
            assert await watcher.subscribe([("amqtt/will/#", 1)]) == [1]
            async with amqtt_client(port, device_id, will=will) as device:
                if ending == "abort":
                    # the TCP connection ends without DISCONNECT, as a crashed device's would
                    device._handler.writer._writer.transport.abort()  # type: ignore[union-attr]
                    (message,) = await receive(watcher, 1)
                    return [(message.topic, bytes(message.data), message.qos, message.retain)]
            # after a clean DISCONNECT, once the broker has ended the connection (a will
            # would have been routed by then), a marker published must be first to arrive
            await on_trio(device_gone)
            await pub.publish("amqtt/will/marker", b"marker", qos=1)
            (message,) = await receive(watcher, 1)
            return [(message.topic, bytes(message.data), message.qos, message.retain)]

    with trio.fail_after(TEST_TIMEOUT_S):
        got = await in_asyncio(scenario, broker.port)
    if ending == "abort":
        assert got == [("amqtt/will/device", b"gone", 1, False)]
    else:
        assert got == [("amqtt/will/marker", b"marker", 1, False)]
