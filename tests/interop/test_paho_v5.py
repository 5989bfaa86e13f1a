"""paho-mqtt speaking MQTT 5.0 (protocol MQTTv5) against the in-process broker, beside paho
clients speaking 3.1.1 and 3.1.

As in test_paho.py: paho's network loop runs in its own thread (``loop_start``), blocking
calls go through ``trio.to_thread.run_sync``, callbacks feed ``queue.Queue``s read with a
bounded ``get``, and where a test must know the broker has done something it polls broker
state, bounded. Nothing sleeps to synchronise; a test that needs time to pass (a will delay)
waits for that instant of the wall clock, bounded.

What paho cannot express is tested with raw packets in tests/integration/test_v5_broker.py:
topic aliases (paho resolves none), AUTH, invalid filters (paho refuses them before sending:
SUBACK 0x8F), reason codes on PUBREC (paho reports the PUBCOMP's: 0x10 / 0x97 for QoS 2),
more QoS 2 messages awaiting PUBREL than allowed (paho completes one flow at a time), and
a client exceeding the broker's Receive Maximum or Maximum Packet Size (0x93 / 0x95).
"""

from __future__ import annotations

import contextlib
import math
import queue
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from paho.mqtt.client import MQTT_ERR_SUCCESS, CallbackAPIVersion, Client, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqttd.broker import running
from tests.conftest import make_config
from tests.integration.test_v5_broker import v5_config
from tests.interop.test_paho import bounded_get, paho, unique_id, wait_until

MQTTv5 = MQTTProtocolVersion.MQTTv5
MQTTv311 = MQTTProtocolVersion.MQTTv311
MQTTv31 = MQTTProtocolVersion.MQTTv31
TEST_TIMEOUT_S = 20


def camel(name: str) -> str:
    """mqttd's property name as paho's: ``session_expiry_interval`` -> ``SessionExpiryInterval``."""
    return "".join(word.capitalize() for word in name.split("_"))


def properties(packet_type: int, **values: Any) -> Properties | None:
    """paho Properties for ``packet_type`` from snake_case names (None when there are none)."""
    if not values:
        return None
    props = Properties(packet_type)
    for name, value in values.items():
        setattr(props, camel(name), value)
    return props


def prop(props: Properties | None, name: str) -> Any:
    """One property of what paho received, by snake_case name (None when absent)."""
    return getattr(props, camel(name), None) if props is not None else None


def prop_names(props: Properties | None) -> set[str]:
    """The properties present, as paho names them."""
    return set(props.json()) if props is not None else set()


class Paho5:
    """One paho client speaking MQTT 5.0, its callbacks feeding thread-safe queues."""

    def __init__(self, client_id: str, *, manual_ack: bool = False,
                 will: tuple[str, bytes, int, bool, dict[str, Any]] | None = None) -> None:
        self.client_id = client_id
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTv5,
            reconnect_on_failure=False,  # nothing behind the test's back
            manual_ack=manual_ack,
        )
        if will is not None:
            topic, payload, qos, retain, will_props = will
            self.client.will_set(topic, payload, qos, retain,
                                 properties(PacketTypes.WILLMESSAGE, **will_props))
        self.connacks: queue.Queue[tuple[Any, ReasonCode, Properties]] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        self.unsubacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        self.pubacks: queue.Queue[tuple[int, ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        client = self.client
        client.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags, rc, props))
        client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put((mid, codes))
        client.on_unsubscribe = lambda c, u, mid, codes, props: self.unsubacks.put((mid, codes))
        client.on_publish = lambda c, u, mid, rc, props: self.pubacks.put((mid, rc))
        client.on_message = lambda c, u, message: self.messages.put(message)
        client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.loop_started = False

    async def connect(
        self, port: int, *, clean_start: bool = True, keepalive_s: int = 30, **connect_props: Any
    ) -> tuple[Any, Properties]:
        """Connect, start the network thread, wait for CONNACK; (flags, CONNACK properties)."""
        await trio.to_thread.run_sync(lambda: self.client.connect(
            "127.0.0.1", port, keepalive_s, clean_start=clean_start,
            properties=properties(PacketTypes.CONNECT, **connect_props),
        ))
        self.client.loop_start()
        self.loop_started = True
        flags, rc, props = await bounded_get(self.connacks)
        assert rc.value == 0, rc
        return flags, props

    async def subscribe(
        self, topic_filter: str, qos: int, *, no_local: bool = False,
        retain_as_published: bool = False, retain_handling: int = 0, sub_id: int = 0,
    ) -> list[int]:
        """SUBSCRIBE one filter; the SUBACK's reason codes."""
        result, mid = self.client.subscribe(
            topic_filter,
            options=SubscribeOptions(qos, no_local, retain_as_published, retain_handling),
            properties=properties(PacketTypes.SUBSCRIBE,
                                  **({"subscription_identifier": sub_id} if sub_id else {})),
        )
        assert result == MQTT_ERR_SUCCESS
        got_mid, codes = await bounded_get(self.subacks)
        assert got_mid == mid
        return [code.value for code in codes]

    async def unsubscribe(self, *filters: str) -> list[int]:
        result, mid = self.client.unsubscribe(list(filters))
        assert result == MQTT_ERR_SUCCESS
        got_mid, codes = await bounded_get(self.unsubacks)
        assert got_mid == mid
        return [code.value for code in codes]

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False, **publish_props: Any
    ) -> int:
        """Publish and wait until the flow is complete; the PUBACK/PUBREC reason code (0 for
        QoS 0)."""
        info = self.client.publish(topic, payload, qos, retain,
                                   properties(PacketTypes.PUBLISH, **publish_props))
        assert info.rc == MQTT_ERR_SUCCESS
        mid, rc = await bounded_get(self.pubacks)
        assert mid == info.mid
        return rc.value

    async def message(self) -> MQTTMessage:
        return await bounded_get(self.messages)

    async def disconnect(self, reason: int = 0, **disconnect_props: Any) -> None:
        """DISCONNECT with a reason code, then stop the network thread."""
        self.client.disconnect(
            ReasonCode(PacketTypes.DISCONNECT, identifier=reason),
            properties(PacketTypes.DISCONNECT, **disconnect_props),
        )
        await bounded_get(self.disconnects)
        await self.stop_loop()

    async def disconnected_by_server(self) -> int:
        """Wait for the broker to end the connection; the reason code paho reports."""
        rc = await bounded_get(self.disconnects)
        await self.stop_loop()
        return rc.value

    async def kill_socket(self) -> None:
        """End the TCP connection without DISCONNECT (see test_paho.Paho.kill_socket)."""
        sock = self.client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        await bounded_get(self.disconnects)
        await self.stop_loop()

    async def stop_loop(self) -> None:
        if self.loop_started:
            self.loop_started = False
            await trio.to_thread.run_sync(self.client.loop_stop)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            await self.stop_loop()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


@asynccontextmanager
async def paho5(
    port: int, prefix: str, *, client_id: str | None = None, clean_start: bool = True,
    manual_ack: bool = False, will: tuple[str, bytes, int, bool, dict[str, Any]] | None = None,
    **connect_props: Any,
) -> AsyncIterator[tuple[Paho5, Any, Properties]]:
    client = Paho5(unique_id(prefix) if client_id is None else client_id,
                   manual_ack=manual_ack, will=will)
    try:
        flags, props = await client.connect(port, clean_start=clean_start, **connect_props)
        yield client, flags, props
    finally:
        with trio.CancelScope(shield=True):
            await client.close()


async def marker(sub: Paho5, pub: Paho5, topic: str) -> None:
    """Barrier: ``pub`` publishes a QoS 2 marker to ``topic`` (which ``sub`` subscribes
    to); it must be the next message ``sub`` gets (nothing was routed to it before)."""
    await pub.publish(topic, b"marker", 2)
    message = await sub.message()
    assert (message.topic, message.payload) == (topic, b"marker")


# -- protocol levels and reason codes ------------------------------------------------------


async def test_paho_5_beside_3_1_1_and_3_1_on_one_listener(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "v5") as (new, flags, _),
            paho(broker.port, "v311", MQTTv311) as (old, _),
            paho(broker.port, "v31", MQTTv31) as (oldest, _),
        ):
            assert flags.session_present is False
            assert await new.subscribe("levels/#", 2) == [2]
            await old.subscribe("levels/#", 2)
            await oldest.subscribe("levels/#", 2)
            await new.publish("levels/5", b"from 5", 1, content_type="text/plain")
            await old.publish("levels/4", b"from 4", 1)
            await oldest.publish("levels/3", b"from 3", 2)
            for client in (new, old, oldest):
                got = {m.topic: m for m in [await client.message() for _ in range(3)]}
                # three publishers: MQTT orders nothing between them
                assert {(t, m.payload) for t, m in got.items()} == {
                    ("levels/5", b"from 5"), ("levels/4", b"from 4"), ("levels/3", b"from 3")
                }
                expected = "text/plain" if client is new else None  # 3.x has no properties
                assert prop(got["levels/5"].properties, "content_type") == expected


async def test_paho_sees_reason_codes_on_every_ack(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with paho5(broker.port, "acks") as (client, _, _):
            assert await client.subscribe("acks/q1", 1) == [1]
            assert await client.subscribe("acks/q2", 2) == [2]
            assert await client.publish("acks/q1", b"x", 1) == 0
            assert await client.publish("acks/q2", b"x", 2) == 0
            assert await client.publish("acks/nobody", b"x", 1) == 0x10  # No matching subs
            assert await client.unsubscribe("acks/q1", "acks/never") == [0, 0x11]
            # two topics: MQTT does not order them against each other
            assert sorted([(await client.message()).topic for _ in range(2)]) == [
                "acks/q1", "acks/q2"
            ]
            await client.disconnect()
        await wait_until(lambda: client.client_id not in broker.sessions, "the disconnect")


async def test_paho_told_why_it_was_disconnected_takeover_and_shutdown():
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            client_id = unique_id("twin")
            async with paho5(broker.port, "twin", client_id=client_id) as (first, _, _):
                async with paho5(broker.port, "twin", client_id=client_id) as (second, _, _):
                    assert await first.disconnected_by_server() == 0x8E  # Session taken over
                    broker.shutdown()
                    assert await second.disconnected_by_server() == 0x8B  # Server shutting down


# -- CONNECT / CONNACK ----------------------------------------------------------------------


async def test_paho_connack_properties(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with paho5(broker.port, "terms", user_property=[("site", "42")],
                         request_problem_information=1) as (_, flags, props):
            assert flags.session_present is False
            assert prop(props, "receive_maximum") == 1000  # limits.max_receive_messages
            assert prop(props, "maximum_packet_size") == 1_048_576
            assert prop(props, "topic_alias_maximum") == 10
            assert prop(props, "assigned_client_identifier") is None
            assert prop(props, "server_keep_alive") is None


async def test_paho_limits_from_the_configuration_in_connack():
    config = make_config(max_receive_messages=5, max_packet_size_bytes=4096,
                         max_topic_aliases=0, max_keepalive_s=20)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            running(config) as broker,
            paho5(broker.port, "limited") as (client, _, props),
        ):
            assert prop(props, "receive_maximum") == 5
            assert prop(props, "maximum_packet_size") == 4096
            assert prop(props, "topic_alias_maximum") is None  # 0: none
            assert prop(props, "server_keep_alive") == 20  # paho asked for 30
            assert client.client._keepalive == 20  # paho follows Server Keep Alive


async def test_paho_with_an_empty_client_id_gets_one_assigned(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with paho5(broker.port, "", client_id="") as (client, _, props):
            assigned = prop(props, "assigned_client_identifier")
            assert assigned in broker.sessions
            assert await client.subscribe("assigned/#", 1) == [1]
            assert broker.sessions[assigned].subscriptions == {"assigned/#": 1}


async def test_paho_persistent_session_by_session_expiry_interval(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("persist")
        async with paho5(broker.port, "persist", client_id=client_id,
                         session_expiry_interval=60) as (sub, flags, _):
            assert flags.session_present is False
            await sub.subscribe("persist/#", 1)
            await sub.disconnect()
        session = broker.sessions[client_id]
        await wait_until(lambda: session.connection is None, "the session to be detached")
        async with paho5(broker.port, "pub") as (pub, _, _):
            for i in range(3):  # one publisher, one topic: MQTT promises the order
                await pub.publish("persist/q", b"away %d" % i, 1, user_property=[("i", str(i))])
        async with paho5(broker.port, "persist", client_id=client_id, clean_start=False,
                         session_expiry_interval=60) as (sub, flags, _):
            assert flags.session_present is True
            got = [await sub.message() for _ in range(3)]
            assert [(m.topic, m.payload) for m in got] == [
                ("persist/q", b"away %d" % i) for i in range(3)
            ]
            assert [prop(m.properties, "user_property") for m in got] == [
                [("i", str(i))] for i in range(3)
            ]
            await sub.disconnect(session_expiry_interval=0)  # end it now
        await wait_until(lambda: client_id not in broker.sessions, "the session to end")


async def test_paho_session_expiry_0_and_expiry_on_a_timer(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with paho5(broker.port, "ends", session_expiry_interval=0) as (ends, _, _):
            await ends.subscribe("ends/#", 1)
            await ends.kill_socket()
        await wait_until(lambda: ends.client_id not in broker.sessions, "the session to end")
        async with paho5(broker.port, "expires", session_expiry_interval=1) as (expires, _, _):
            await expires.subscribe("expires/#", 1)
            session = broker.sessions[expires.client_id]
            await expires.kill_socket()
        # (the session may already be gone here on a slow machine: watch the object)
        await wait_until(lambda: session.disconnected_at is not None, "drop")
        await wait_until(lambda: expires.client_id not in broker.sessions, "expiry", 15.0)
        # kept for its interval after the connection ended, not ended with it
        assert time.time() >= session.disconnected_at + 1


async def test_paho_session_expiry_capped_by_configuration():
    config = v5_config(persistence={"session_expiry_s": 10})
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            running(config) as broker,
            paho5(broker.port, "capped", session_expiry_interval=3600) as (_, _, props),
        ):
            assert prop(props, "session_expiry_interval") == 10


async def test_paho_receive_maximum_limits_what_the_broker_sends(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "slow", manual_ack=True, receive_maximum=2) as (sub, _, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            await sub.subscribe("slow/#", 1)
            for i in range(5):
                await pub.publish("slow/t", b"%d" % i, 1)
            first = [await sub.message() for _ in range(2)]
            stats = broker.client_stats(sub.client_id)
            assert (stats["inflight"], stats["queued"], stats["sent"]) == (2, 3, 2)
            for message in first:
                sub.client.ack(message.mid, 1)
            rest = []
            while len(rest) < 3:
                message = await sub.message()
                rest.append(message)
                sub.client.ack(message.mid, 1)
            assert [m.payload for m in first + rest] == [b"%d" % i for i in range(5)]
            await wait_until(lambda: broker.client_stats(sub.client_id)["inflight"] == 0, "acks")


async def test_paho_maximum_packet_size_is_respected(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "small", maximum_packet_size=256) as (sub, _, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            await sub.subscribe("small/#", 1)
            await pub.publish("small/big", b"B" * 1000, 1)
            await pub.publish("small/fits", b"fits", 1)
            message = await sub.message()
            assert (message.topic, message.payload) == ("small/fits", b"fits")
            assert broker.client_stats(sub.client_id)["too_large"] == 1


# -- PUBLISH properties ---------------------------------------------------------------------


async def test_paho_message_properties_forwarded(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "sub") as (sub, _, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            await sub.subscribe("props/#", 2, sub_id=77)
            pairs = [("z", "1"), ("a", "2"), ("z", "3")]
            for qos in (0, 1, 2):
                before = time.time()
                await pub.publish(
                    f"props/{qos}", b'{"q": %d}' % qos, qos, payload_format_indicator=1,
                    content_type="application/json", response_topic="props/reply",
                    correlation_data=b"\x00corr", user_property=pairs,
                    message_expiry_interval=120,
                )
                message = await sub.message()
                assert (message.topic, message.qos) == (f"props/{qos}", qos)
                got = message.properties
                assert prop(got, "payload_format_indicator") == 1
                assert prop(got, "content_type") == "application/json"
                assert prop(got, "response_topic") == "props/reply"
                assert prop(got, "correlation_data") == b"\x00corr"
                assert prop(got, "user_property") == pairs
                assert prop(got, "subscription_identifier") == [77]
                # what is left of the 120 s: at most what passed since, rounded up
                elapsed = math.ceil(time.time() - before)
                assert 120 - elapsed <= prop(got, "message_expiry_interval") <= 120


async def test_paho_subscription_identifiers_of_every_matching_subscription(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "sub") as (sub, _, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            await sub.subscribe("sid/#", 1, sub_id=1)
            await sub.subscribe("sid/+/temp", 1, sub_id=2)
            await sub.subscribe("sid/kitchen/+", 1)
            await pub.publish("sid/kitchen/temp", b"21", 1)
            await pub.publish("sid/hall/temp", b"19", 1)
            await pub.publish("sid/kitchen/door", b"open", 1)
            got = [await sub.message() for _ in range(3)]
            # three topics: MQTT does not order them against each other, nor the identifiers
            # of one message
            assert {
                (m.payload, tuple(sorted(prop(m.properties, "subscription_identifier"))))
                for m in got
            } == {(b"21", (1, 2)), (b"19", (1, 2)), (b"open", (1,))}


async def test_paho_message_expiry_in_the_queue_of_an_offline_session(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("away")
        async with paho5(broker.port, "away", client_id=client_id,
                         session_expiry_interval=60) as (sub, _, _):
            await sub.subscribe("away/#", 1)
            await sub.disconnect()
        await wait_until(lambda: broker.sessions[client_id].connection is None, "detached")
        async with paho5(broker.port, "pub") as (pub, _, _):
            await pub.publish("away/short", b"short", 1, message_expiry_interval=1)
            await pub.publish("away/long", b"long", 1, message_expiry_interval=60)
            published_by = time.time()  # the broker received both before this
        # the behaviour under test is the passing of time: the short one's second (and over
        # a second of the long one's interval) has passed, however long publishing took
        await wait_until(lambda: time.time() >= published_by + 1.2, "the short one to expire")
        async with paho5(broker.port, "away", client_id=client_id, clean_start=False,
                         session_expiry_interval=60) as (sub, flags, _):
            assert flags.session_present
            message = await sub.message()
            assert message.payload == b"long"
            assert 1 <= prop(message.properties, "message_expiry_interval") <= 59


# -- SUBSCRIBE options ----------------------------------------------------------------------


async def test_paho_no_local(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "talker") as (talker, _, _),
            paho5(broker.port, "other") as (other, _, _),
        ):
            await talker.subscribe("chat/#", 2, no_local=True)
            await talker.publish("chat/room", b"mine", 2)
            await marker(talker, other, "chat/room")


async def test_paho_retain_as_published_and_retain_handling(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "pub") as (pub, _, _),
            paho5(broker.port, "sub") as (sub, _, _),
        ):
            await pub.publish("rh/state", b"on", 1, retain=True)
            # 2: never sent on subscribe
            await sub.subscribe("rh/#", 1, retain_handling=2, retain_as_published=True)
            await pub.publish("rh/state", b"on again", 1, retain=True)
            message = await sub.message()  # live, with RETAIN as published
            assert (message.payload, message.retain) == (b"on again", True)
            # 1: sent only for a new subscription
            await sub.subscribe("rh/+", 1, retain_handling=1)
            message = await sub.message()
            assert (message.payload, message.retain) == (b"on again", True)
            await sub.subscribe("rh/+", 1, retain_handling=1)
            # 0: sent on every subscribe
            await sub.subscribe("rh/state", 1, retain_handling=0)
            await sub.subscribe("rh/state", 1, retain_handling=0)
            for _ in range(2):
                message = await sub.message()
                assert (message.payload, message.retain) == (b"on again", True)
            await sub.subscribe("rh/marker", 2)
            await marker(sub, pub, "rh/marker")  # nothing else came


async def test_paho_shared_subscription(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "worker") as (a, _, _),
            paho5(broker.port, "worker") as (b, _, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            assert await a.subscribe("$share/workers/jobs/+", 1) == [1]
            assert await b.subscribe("$share/workers/jobs/+", 1) == [1]
            count = 6
            for i in range(count):
                await pub.publish(f"jobs/{i}", b"%d" % i, 1)
            await wait_until(lambda: sum(
                broker.client_stats(c.client_id)["sent"] for c in (a, b)) == count, "routing")
            got = []
            for member in (a, b):
                sent = broker.client_stats(member.client_id)["sent"]
                assert sent > 0  # both take turns
                got += [(await member.message()).payload for _ in range(sent)]
                assert member.messages.empty()
            assert sorted(got) == sorted(b"%d" % i for i in range(count))


# -- will delay -----------------------------------------------------------------------------


async def test_paho_will_delay(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with paho5(broker.port, "watcher") as (watcher, _, _):
            await watcher.subscribe("wills/#", 1)
            will = ("wills/device", b"gone", 1, False,
                    {"will_delay_interval": 1, "content_type": "text/plain"})
            async with paho5(broker.port, "device", will=will,
                             session_expiry_interval=60) as (device, _, _):
                lost_at = time.time()  # the broker sees the connection end after this
                await device.kill_socket()
            message = await watcher.message()
            assert time.time() - lost_at >= 0.9  # not before the delay (less clock rounding)
            assert (message.topic, message.payload) == ("wills/device", b"gone")
            assert prop(message.properties, "content_type") == "text/plain"


async def test_paho_will_cancelled_by_a_reconnect_within_the_delay(broker):
    """A delayed will is not published when the client is back within the delay. The delay
    is long (30 s), so the reconnection is within it however slow the machine; then the
    broker's timers run as if it had passed (as ``tools.fuzz`` does), and no will comes.
    The engine's state shows the wills waiting for their delay (``delayed_wills``) and its
    timers (``timers``)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "watcher") as (watcher, _, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            await watcher.subscribe("wills/#", 2)
            client_id = unique_id("device")
            will = ("wills/device", b"gone", 1, False, {"will_delay_interval": 30})
            async with paho5(broker.port, "device", client_id=client_id, will=will,
                             session_expiry_interval=60) as (device, _, _):
                await device.kill_socket()
            await wait_until(lambda: client_id in broker.delayed_wills, "the will to wait")
            async with paho5(broker.port, "device", client_id=client_id, clean_start=False,
                             session_expiry_interval=60) as (device, flags, _):
                assert flags.session_present
                assert client_id not in broker.delayed_wills  # cancelled by the reconnect
                broker.timers.run_due(math.inf)  # as if the 30 s had passed
                await marker(watcher, pub, "wills/marker")  # no will before it
                await device.disconnect()


@pytest.mark.parametrize(("reason", "will_sent"), [(0x04, True), (0x00, False)])
async def test_paho_disconnect_with_will_message(broker, reason, will_sent):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "watcher") as (watcher, _, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            await watcher.subscribe("wills/#", 2)
            will = ("wills/device", b"gone", 1, False, {})
            async with paho5(broker.port, "device", will=will) as (device, _, _):
                await device.disconnect(reason)
            await wait_until(lambda: device.client_id not in broker.sessions, "disconnect")
            if will_sent:
                assert (await watcher.message()).payload == b"gone"
            await marker(watcher, pub, "wills/marker")


# -- mixed versions -------------------------------------------------------------------------


async def test_paho_request_response_between_5_0_and_3_1_1(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "requester") as (requester, _, _),
            paho5(broker.port, "responder5") as (responder5, _, _),
            paho(broker.port, "responder3", MQTTv311) as (responder3, _),
        ):
            reply_topic = f"svc/reply/{requester.client_id}"
            await requester.subscribe(reply_topic, 1)
            await responder5.subscribe("svc/request", 1)
            await responder3.subscribe("svc/request", 1)
            await requester.publish("svc/request", b"what time?", 1, response_topic=reply_topic,
                                    correlation_data=b"req-1", user_property=[("from", "v5")])
            plain = await responder3.message()
            assert (plain.topic, plain.payload) == ("svc/request", b"what time?")
            request = await responder5.message()
            assert request.payload == b"what time?"
            assert prop(request.properties, "user_property") == [("from", "v5")]
            response_topic = prop(request.properties, "response_topic")
            correlation = prop(request.properties, "correlation_data")
            assert (response_topic, correlation) == (reply_topic, b"req-1")
            # the 3.1.1 responder answers on a topic it knows: no properties arrive
            await responder3.publish(reply_topic, b"noon (3.1.1)", 1)
            answer = await requester.message()
            assert answer.payload == b"noon (3.1.1)"
            assert prop_names(answer.properties) == set()
            # the 5.0 responder answers with the correlation data
            await responder5.publish(response_topic, b"noon (5.0)", 1,
                                     correlation_data=correlation)
            answer = await requester.message()
            assert answer.payload == b"noon (5.0)"
            assert prop(answer.properties, "correlation_data") == b"req-1"


@pytest.mark.parametrize("old_protocol", [MQTTv311, MQTTv31])
async def test_paho_old_and_new_subscribers_on_one_filter(broker, old_protocol):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            paho5(broker.port, "new") as (new, _, _),
            paho(broker.port, "old", old_protocol) as (old, _),
            paho5(broker.port, "pub") as (pub, _, _),
        ):
            await new.subscribe("tree/+/state", 2, sub_id=9)
            await old.subscribe("tree/+/state", 2)
            for qos in (0, 1, 2):
                await pub.publish("tree/a/state", b"state %d" % qos, qos,
                                  user_property=[("q", str(qos))], content_type="text/plain")
                message = await old.message()
                assert (message.payload, message.qos) == (b"state %d" % qos, qos)
                message = await new.message()
                assert (message.payload, message.qos) == (b"state %d" % qos, qos)
                assert prop(message.properties, "user_property") == [("q", str(qos))]
                assert prop(message.properties, "content_type") == "text/plain"
                assert prop(message.properties, "subscription_identifier") == [9]
            await old.publish("tree/b/state", b"from old", 1)
            assert (await old.message()).payload == b"from old"
            message = await new.message()
            assert message.payload == b"from old"
            assert prop_names(message.properties) == {"SubscriptionIdentifier"}
