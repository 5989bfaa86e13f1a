"""MQTT 5.0 sessions across a restart of an in-process broker on a real database file:
subscription options and identifiers, the session expiry interval, queued messages with
their properties and expiry."""

from __future__ import annotations

import time

import trio

from mqttd.broker import running
from mqttd.codec.packets import Disconnect, Subscription
from tests.integration.test_broker_tcp import wait_until
from tests.integration.test_v5_broker import (
    connect,
    nothing_pending,
    props,
    publish,
    receive,
    subscribe,
    v5_config,
    wall_clock_past,
)

TEST_TIMEOUT_S = 30


async def test_queued_messages_keep_their_properties_and_expiry_across_a_restart(tmp_path):
    config = v5_config(tmp_path)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(config) as broker:
            sub, _ = await connect(broker.port, "durable", session_expiry_interval=3600)
            await subscribe(sub, Subscription("dev/+/cmd", 2))
            await sub.send(Disconnect(0))
            await sub.expect_closed()
            await wait_until(lambda: broker.sessions["durable"].connection is None)
            pub, _ = await connect(broker.port, "publisher")
            await publish(pub, "dev/a/cmd", b"short", 2, message_expiry_interval=1)
            acked_at = time.time()  # the broker received it before this
            await publish(pub, "dev/a/cmd", b"reboot", 2, message_expiry_interval=600,
                          content_type="text/plain", response_topic="dev/a/reply",
                          correlation_data=b"\x01\x02", payload_format_indicator=1,
                          user_property=[("k", "2"), ("k", "1")])
            await publish(pub, "dev/b/cmd", b"plain", 1)
        await wall_clock_past(acked_at + 1.2)  # the short one's lifetime is over
        async with running(config) as broker:
            assert broker.sessions["durable"].queued == 2  # the expired one is gone
            sub, connack = await connect(broker.port, "durable", clean_start=False,
                                         session_expiry_interval=3600)
            assert connack.session_present
            first = await receive(sub)
            assert (first.topic, first.payload, first.qos) == ("dev/a/cmd", b"reboot", 2)
            got = dict(first.properties)
            assert 1 <= got.pop("message_expiry_interval") <= 599
            assert got == {
                "content_type": "text/plain", "response_topic": "dev/a/reply",
                "correlation_data": b"\x01\x02", "payload_format_indicator": 1,
                "user_property": [("k", "2"), ("k", "1")],
            }
            second = await receive(sub)
            assert (second.topic, second.payload, second.qos, props(second)) == (
                "dev/b/cmd", b"plain", 1, {}
            )
            await nothing_pending(sub)  # the expired message was not delivered


async def test_subscription_options_and_identifiers_survive_a_restart(tmp_path):
    config = v5_config(tmp_path)
    options = Subscription("dev/#", 1, no_local=True, retain_as_published=True,
                           retain_handling=1)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(config) as broker:
            pub, _ = await connect(broker.port, "publisher")
            await publish(pub, "dev/state", b"retained", 1, retain=True)
            sub, _ = await connect(broker.port, "durable", session_expiry_interval=3600)
            await subscribe(sub, options, sub_id=21)
            assert (await receive(sub)).payload == b"retained"
            await subscribe(sub, Subscription("dev/+/cmd", 2), sub_id=22)
            await sub.send(Disconnect(0))
            await sub.expect_closed()
            await wait_until(lambda: broker.sessions["durable"].connection is None)
        async with running(config) as broker:
            assert broker.sessions["durable"].subscriptions == {"dev/#": 1, "dev/+/cmd": 2}
            sub, connack = await connect(broker.port, "durable", clean_start=False,
                                         session_expiry_interval=3600)
            assert connack.session_present
            # no local: its own publish does not come back (only dev/# matches), another
            # client's does, with the identifiers of both subscriptions it matches
            await publish(sub, "dev/own", b"own", 1)
            pub, _ = await connect(broker.port, "publisher")
            await publish(pub, "dev/a/cmd", b"other's", 2)
            message = await receive(sub)
            assert (message.payload, message.qos) == (b"other's", 2)
            assert message.properties == {"subscription_identifier": [21, 22]}
            # retain as published
            await publish(pub, "dev/b/state", b"live retained", 1, retain=True)
            message = await receive(sub)
            assert (message.payload, message.retain, message.properties) == (
                b"live retained", True, {"subscription_identifier": [21]}
            )
            # retain handling 1: subscribing again sends no retained message
            await subscribe(sub, options, sub_id=21)
            await nothing_pending(sub)


async def test_retained_message_expiry_survives_a_restart(tmp_path):
    config = v5_config(tmp_path)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(config) as broker:
            pub, _ = await connect(broker.port, "publisher")
            await publish(pub, "ret/short", b"short", 1, retain=True, message_expiry_interval=1)
            acked_at = time.time()  # the broker received it before this
            await publish(pub, "ret/long", b"long", 1, retain=True, message_expiry_interval=600,
                          user_property=[("v", "1")])
        await wall_clock_past(acked_at + 1.2)
        async with running(config) as broker:
            sub, _ = await connect(broker.port, "late")
            await subscribe(sub, Subscription("ret/#", 1))
            message = await receive(sub)
            assert (message.topic, message.retain) == ("ret/long", True)
            assert message.properties["user_property"] == [("v", "1")]
            assert 1 <= message.properties["message_expiry_interval"] <= 599
            await nothing_pending(sub)
