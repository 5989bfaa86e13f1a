"""paho-mqtt (MQTT 3.1.1 and 3.1) against the in-process broker.

paho runs its network loop in a thread of its own (``loop_start``) while the broker runs
in the test's trio loop. Blocking paho calls go through ``trio.to_thread.run_sync``;
paho's callbacks put what they see on ``queue.Queue``s, which the test reads with a
bounded ``get`` in a worker thread. Nothing sleeps to synchronise: where the test must
know the broker has done something (a client has gone), it polls broker state, bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from paho.mqtt.client import MQTT_ERR_SUCCESS, CallbackAPIVersion, Client, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion

TEST_TIMEOUT_S = 20
WAIT_S = 5.0
POLL_S = 0.01

PROTOCOLS = [
    pytest.param(MQTTProtocolVersion.MQTTv311, id="mqttv311"),
    pytest.param(MQTTProtocolVersion.MQTTv31, id="mqttv31"),
]

_ids = itertools.count(1)


def unique_id(prefix: str) -> str:
    # MQTT 3.1 limits client ids to 23 characters
    return f"{prefix[:12]}-{next(_ids)}"


async def bounded_get(q: queue.Queue[Any], timeout_s: float = WAIT_S) -> Any:
    """The next item of ``q``; raises ``queue.Empty`` after ``timeout_s``."""
    return await trio.to_thread.run_sync(q.get, True, timeout_s)


async def wait_until(predicate: Any, what: str, timeout_s: float = WAIT_S) -> None:
    """Poll an observable condition of the broker, bounded in time."""
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(POLL_S)
        return
    raise AssertionError(f"timed out waiting for {what}")


class Paho:
    """One paho client with its callbacks feeding thread-safe queues."""

    def __init__(
        self,
        client_id: str,
        protocol: MQTTProtocolVersion,
        *,
        clean_session: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
        manual_ack: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=clean_session,
            # a lost connection must not be re-established behind the test's back
            reconnect_on_failure=False,
            manual_ack=manual_ack,  # True: QoS 1/2 messages received are never acknowledged
        )
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        self.connacks: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[Any]]] = queue.Queue()
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.loop_started = False

    def _on_connect(self, client: Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connacks.put((flags, rc))

    def _on_subscribe(
        self, client: Client, userdata: Any, mid: int, codes: list[Any], props: Any
    ) -> None:
        self.subacks.put((mid, codes))

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        self.messages.put(message)

    def _on_disconnect(
        self, client: Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        self.disconnects.put(rc)

    async def connect(self, port: int) -> Any:
        """Connect, start the network thread, wait for CONNACK; returns the flags."""
        await trio.to_thread.run_sync(self.client.connect, "127.0.0.1", port, 30)
        self.client.loop_start()
        self.loop_started = True
        flags, rc = await bounded_get(self.connacks)
        assert not rc.is_failure, rc
        return flags

    async def subscribe(self, topic_filter: str, qos: int) -> None:
        result, mid = self.client.subscribe(topic_filter, qos)
        assert result == MQTT_ERR_SUCCESS
        got_mid, codes = await bounded_get(self.subacks)
        assert got_mid == mid
        assert [code.value for code in codes] == [qos]

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Publish and wait until the flow is complete (PUBACK / PUBCOMP for QoS 1/2)."""
        info = self.client.publish(topic, payload, qos, retain)
        await trio.to_thread.run_sync(info.wait_for_publish, WAIT_S)
        assert info.is_published(), f"{topic!r} QoS {qos} not acknowledged"

    async def message(self) -> MQTTMessage:
        return await bounded_get(self.messages)

    async def disconnect(self) -> None:
        """A clean DISCONNECT, then stop the network thread."""
        self.client.disconnect()
        await self.stop_loop()

    async def stop_loop(self) -> None:
        if self.loop_started:
            self.loop_started = False
            await trio.to_thread.run_sync(self.client.loop_stop)

    async def kill_socket(self) -> None:
        """End the TCP connection without DISCONNECT, as a crashed device would.

        ``shutdown`` (unlike ``close``) is safe while paho's thread uses the socket: it
        sends the FIN and wakes that thread, which sees the connection lost and ends."""
        sock = self.client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        await bounded_get(self.disconnects)
        await self.stop_loop()

    async def close(self) -> None:
        """For ``finally``: stop the thread and drop the connection, whatever the state."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            await self.stop_loop()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


@asynccontextmanager
async def paho(
    port: int,
    prefix: str,
    protocol: MQTTProtocolVersion,
    *,
    client_id: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[Paho, Any]]:
    client = Paho(client_id or unique_id(prefix), protocol, **kwargs)
    try:
        flags = await client.connect(port)
        yield client, flags
    finally:
        with trio.CancelScope(shield=True):
            await client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
async def test_publish_subscribe_each_qos(broker, protocol, sub_qos):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho(broker.port, "sub", protocol) as (sub, _),
            paho(broker.port, "pub", protocol) as (pub, _),
        ):
            await sub.subscribe("paho/qos/#", sub_qos)
            sent = {}
            for pub_qos in (0, 1, 2):
                payload = f"pub qos {pub_qos} \x00\xff".encode("latin-1")
                sent[payload] = pub_qos
                await pub.publish(f"paho/qos/{pub_qos}", payload, pub_qos)
            got = {}
            for _ in sent:
                message = await sub.message()
                got[message.payload] = message
            assert set(got) == set(sent)
            for payload, pub_qos in sent.items():
                message = got[payload]
                assert message.topic == f"paho/qos/{pub_qos}"
                assert message.qos == min(pub_qos, sub_qos)
                assert not message.retain
                assert not message.dup
            assert sub.messages.empty()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_retained_message_to_later_subscriber(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho(broker.port, "early", protocol) as (early, _),
            paho(broker.port, "pub", protocol) as (pub, _),
        ):
            await early.subscribe("paho/retained/+", 1)
            await pub.publish("paho/retained/state", b"on", 1, retain=True)
            live = await early.message()
            # a message delivered to an existing subscription has RETAIN 0 (MQTT-3.3.1-9)
            assert (live.topic, live.payload, live.retain) == ("paho/retained/state", b"on", False)

            async with paho(broker.port, "late", protocol) as (late, _):
                await late.subscribe("paho/retained/#", 2)
                message = await late.message()
                assert message.topic == "paho/retained/state"
                assert message.payload == b"on"
                assert message.retain is True
                assert message.qos == 1  # min(stored QoS 1, granted 2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_will_published_when_connection_drops(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with paho(broker.port, "watcher", protocol) as (watcher, _):
            await watcher.subscribe("paho/will/#", 1)
            async with paho(
                broker.port, "device", protocol, will=("paho/will/device", b"gone", 1, False)
            ) as (device, _):
                assert device.client_id in broker.sessions
                await device.kill_socket()
                will = await watcher.message()
            assert (will.topic, will.payload, will.qos) == ("paho/will/device", b"gone", 1)
            assert not will.retain
            await wait_until(lambda: device.client_id not in broker.sessions, "session cleanup")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_no_will_after_disconnect(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho(broker.port, "watcher", protocol) as (watcher, _),
            paho(broker.port, "pub", protocol) as (pub, _),
        ):
            await watcher.subscribe("paho/will/#", 1)
            async with paho(
                broker.port, "device", protocol, will=("paho/will/device", b"gone", 1, False)
            ) as (device, _):
                await device.disconnect()
            # the broker has handled the end of the connection (a will would be routed by then)
            await wait_until(lambda: device.client_id not in broker.sessions, "disconnect")
            # a marker behind any will on the watcher's connection: it must come first
            await pub.publish("paho/will/marker", b"marker", 1)
            message = await watcher.message()
            assert (message.topic, message.payload) == ("paho/will/marker", b"marker")
            assert watcher.messages.empty()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_persistent_session_resumes(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("persist")
        async with paho(
            broker.port, "persist", protocol, client_id=client_id, clean_session=False
        ) as (sub, flags):
            assert flags.session_present is False
            await sub.subscribe("paho/persist/#", 1)
            session = broker.sessions[client_id]
            await sub.disconnect()
        await wait_until(lambda: session.connection is None, "the session to be detached")
        assert broker.sessions[client_id] is session

        async with paho(broker.port, "pub", protocol) as (pub, _):
            payloads = [f"while away {i}".encode() for i in range(5)]
            # one publisher, one topic: MQTT promises this order (not one across topics)
            for payload in payloads:
                await pub.publish("paho/persist/q", payload, qos=1)

        async with paho(
            broker.port, "persist", protocol, client_id=client_id, clean_session=False
        ) as (sub, flags):
            # MQTT 3.1 has no session present flag: that CONNACK byte is reserved (0)
            assert flags.session_present is (protocol == MQTTProtocolVersion.MQTTv311)
            assert broker.sessions[client_id] is session
            got = [await sub.message() for _ in payloads]
            assert [m.payload for m in got] == payloads  # in order
            assert all(m.topic == "paho/persist/q" for m in got)
            assert all(m.qos == 1 for m in got)
            # the subscription survived: a new message arrives without subscribing again
            async with paho(broker.port, "pub", protocol) as (pub, _):
                await pub.publish("paho/persist/live", b"live", qos=1)
            message = await sub.message()
            assert (message.topic, message.payload) == ("paho/persist/live", b"live")
            await sub.disconnect()

        # clean session 1 with the same id discards the stored session
        async with paho(broker.port, "persist", protocol, client_id=client_id) as (_, flags):
            assert flags.session_present is False


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "filters",
    [
        ("paho/overlap/#", "paho/overlap/a"),
        ("paho/overlap/a", "paho/overlap/#"),
        ("paho/overlap/a", "paho/overlap/+"),
        ("paho/overlap/+", "paho/overlap/a"),
    ],
    ids=["low#-high", "low-high#", "low-high+", "low+-high"],
)
async def test_overlapping_subscriptions_deliver_at_highest_qos(broker, protocol, filters):
    """MQTT-3.3.5-1: the message goes to the client at the maximum QoS of all its matching
    subscriptions (mqttd delivers it once per client)."""
    low, high = filters
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho(broker.port, "sub", protocol) as (sub, _),
            paho(broker.port, "pub", protocol) as (pub, _),
        ):
            await sub.subscribe(low, 0)
            await sub.subscribe(high, 2)
            await pub.publish("paho/overlap/a", b"both match", 2)
            # the marker on the same topic from the same publisher: MQTT keeps it behind the
            # message (paho hands a QoS 2 message over on PUBREL, so both go at QoS 2)
            await pub.publish("paho/overlap/a", b"marker", 2)
            got = []
            while True:
                message = await sub.message()
                if message.payload == b"marker":
                    break
                got.append((message.topic, message.payload, message.qos))
            assert got == [("paho/overlap/a", b"both match", 2)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_retained_will(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with paho(
            broker.port, "device", protocol, will=("paho/status/device", b"offline", 2, True)
        ) as (device, _):
            await device.kill_socket()
        await wait_until(lambda: device.client_id not in broker.sessions, "the device to be gone")
        async with paho(broker.port, "late", protocol) as (late, _):
            await late.subscribe("paho/status/+", 2)
            message = await late.message()
            assert (message.topic, message.payload) == ("paho/status/device", b"offline")
            assert (message.qos, message.retain) == (2, True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unacknowledged_messages_resent_with_dup_on_resume(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("noack")
        async with paho(
            broker.port, "noack", protocol, client_id=client_id, clean_session=False,
            manual_ack=True,
        ) as (sub, _):  # fmt: skip
            await sub.subscribe("paho/noack/#", 1)
            async with paho(broker.port, "pub", protocol) as (pub, _):
                for i in range(3):  # one topic: MQTT promises the order
                    await pub.publish("paho/noack/q", f"m{i}".encode(), 1)
            first = [await sub.message() for _ in range(3)]
            assert [(m.payload, m.dup) for m in first] == [
                (b"m0", False), (b"m1", False), (b"m2", False)
            ]  # fmt: skip
            session = broker.sessions[client_id]
            assert len(session.inflight) == 3
            await sub.kill_socket()
        await wait_until(lambda: session.connection is None, "the broker to see the drop")

        async with paho(
            broker.port, "noack", protocol, client_id=client_id, clean_session=False
        ) as (sub, _):
            again = [await sub.message() for _ in range(3)]
            # same order, DUP set, same packet ids (MQTT-4.4.0-1)
            assert [(m.payload, m.dup, m.qos) for m in again] == [
                (b"m0", True, 1), (b"m1", True, 1), (b"m2", True, 1)
            ]  # fmt: skip
            assert [m.mid for m in again] == [m.mid for m in first]
            # paho queues the PUBACK after handing the message over: wait for the broker to
            # have them all, or the DISCONNECT could overtake the last one
            await wait_until(lambda: not session.inflight, "the PUBACKs")
            await sub.disconnect()
        await wait_until(lambda: session.connection is None, "the disconnect")
        assert not session.inflight


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unsubscribe_stops_delivery(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho(broker.port, "sub", protocol) as (sub, _),
            paho(broker.port, "pub", protocol) as (pub, _),
        ):
            await sub.subscribe("paho/unsub/+", 1)
            await sub.subscribe("paho/marker", 1)
            await pub.publish("paho/unsub/a", b"before", 1)
            assert (await sub.message()).payload == b"before"
            result, _mid = sub.client.unsubscribe("paho/unsub/+")
            assert result == MQTT_ERR_SUCCESS
            await wait_until(
                lambda: "paho/unsub/+" not in broker.sessions[sub.client_id].subscriptions,
                "the unsubscribe",
            )
            await pub.publish("paho/unsub/a", b"after", 1)
            await pub.publish("paho/marker", b"marker", 1)
            message = await sub.message()
            assert (message.topic, message.payload) == ("paho/marker", b"marker")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_second_connection_with_same_id_takes_over(broker, protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("twin")
        async with paho(broker.port, "twin", protocol, client_id=client_id) as (first, _):
            async with paho(broker.port, "twin", protocol, client_id=client_id) as (second, _):
                # the broker closes the first connection
                reason = await bounded_get(first.disconnects)
                assert reason.is_failure
                await second.subscribe("paho/twin", 1)
                await second.publish("paho/twin", b"still works", 1)
                message = await second.message()
                assert message.payload == b"still works"
                assert first.messages.empty()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_large_payload(broker, protocol):
    payload = bytes(range(256)) * 2048  # 512 KiB, several reads on each side
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho(broker.port, "sub", protocol) as (sub, _),
            paho(broker.port, "pub", protocol) as (pub, _),
        ):
            await sub.subscribe("paho/large", 2)
            for qos in (0, 1, 2):
                await pub.publish("paho/large", payload, qos)
                message = await sub.message()
                assert (message.qos, len(message.payload)) == (qos, len(payload))
                assert message.payload == payload
