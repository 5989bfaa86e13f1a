"""MQTT 5.0 sessions beyond one connection: subscription identifiers on messages that waited
in the store, a session's own expiry interval across a restart, and delayed wills when a
Clean Start reconnect ends the session. (Each found a bug when it was written.)"""

from __future__ import annotations

import time

import trio

from mqttd.broker import running
from mqttd.codec.packets import Disconnect, Subscription
from tests.integration.test_broker_tcp import wait_until
from tests.integration.test_v5_broker import (
    TEST_TIMEOUT_S,
    connect,
    delayed_will,
    disconnected_with,
    publish,
    receive,
    subscribe,
    v5_config,
    wall_clock_past,
    watch_wills,
)


async def test_subscription_identifiers_on_messages_queued_for_an_offline_session(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "offline-ids", session_expiry_interval=60)
        await subscribe(sub, Subscription("oid/#", 1), sub_id=5)
        await sub.send(Disconnect(0))
        await sub.expect_closed()
        await wait_until(lambda: broker.sessions["offline-ids"].connection is None)
        pub, _ = await connect(broker.port, "oid-pub")
        await publish(pub, "oid/t", b"queued", 1)
        sub, connack = await connect(broker.port, "offline-ids", clean_start=False,
                                     session_expiry_interval=60)
        assert connack.session_present
        message = await receive(sub)
        assert message.payload == b"queued"
        assert message.properties == {"subscription_identifier": [5]}


async def test_queued_messages_keep_their_subscription_identifiers_across_a_restart(tmp_path):
    config = v5_config(tmp_path)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(config) as broker:
            sub, _ = await connect(broker.port, "ids-restart", session_expiry_interval=3600)
            await subscribe(sub, Subscription("rid/#", 1), sub_id=21)
            await subscribe(sub, Subscription("rid/+/cmd", 2), sub_id=22)
            await sub.send(Disconnect(0))
            await sub.expect_closed()
            await wait_until(lambda: broker.sessions["ids-restart"].connection is None)
            pub, _ = await connect(broker.port, "publisher")
            await publish(pub, "rid/a/cmd", b"queued", 2)
        async with running(config) as broker:
            sub, connack = await connect(broker.port, "ids-restart", clean_start=False,
                                         session_expiry_interval=3600)
            assert connack.session_present
            message = await receive(sub)
            assert message.payload == b"queued"
            assert message.properties == {"subscription_identifier": [21, 22]}


async def test_session_expiry_interval_survives_a_restart(tmp_path):
    """The interval (4 s) leaves the restart, which must come before the session expires,
    a wide margin on a slow machine."""
    config = v5_config(tmp_path)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(config) as broker:
            sub, _ = await connect(broker.port, "brief", session_expiry_interval=4)
            await subscribe(sub, Subscription("brief/#", 1))
            closed_at = time.time()  # the broker's expiry clock starts later than this
            await sub.aclose()
            await wait_until(lambda: broker.sessions["brief"].connection is None)
        async with running(config) as broker:
            assert broker.sessions["brief"].expiry_s == 4
            # it expires on time, though expiry_check_interval_s (60 s) is far off
            await wait_until(lambda: "brief" not in broker.sessions, 15.0)
            assert time.time() - closed_at >= 3.99, "not before its interval"
            _, connack = await connect(broker.port, "brief", clean_start=False)
            assert not connack.session_present


async def test_an_expired_session_is_not_resumed_after_a_restart(tmp_path):
    config = v5_config(tmp_path)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(config) as broker:
            sub, _ = await connect(broker.port, "stale", session_expiry_interval=1)
            await subscribe(sub, Subscription("stale/#", 1))
            await sub.aclose()
            await wait_until(lambda: broker.sessions["stale"].connection is None)
            gone_at = time.time()
        await wall_clock_past(gone_at + 1.2)
        async with running(config) as broker:
            assert "stale" not in broker.sessions
            _, connack = await connect(broker.port, "stale", clean_start=False)
            assert not connack.session_present


async def test_delayed_will_published_when_a_clean_start_reconnect_ends_the_session(broker):
    """MQTT 5.0 3.1.2.5: the will is published when the delay has passed or the session
    ends, whichever comes first; a reconnect with Clean Start 1 ends the old session (it
    does not continue it), so the will goes out then."""
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        device, _ = await connect(broker.port, "restarter", will=delayed_will(600),
                                  session_expiry_interval=60)
        await device.aclose()
        await wait_until(lambda: broker.sessions["restarter"].connection is None)
        device, connack = await connect(broker.port, "restarter", clean_start=True)
        assert not connack.session_present
        assert (await receive(watcher)).payload == b"gone"


async def test_delayed_will_published_when_a_clean_start_takeover_ends_the_session(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        first, _ = await connect(broker.port, "taken-clean", will=delayed_will(600),
                                 session_expiry_interval=60)
        _second, connack = await connect(broker.port, "taken-clean", clean_start=True)
        assert not connack.session_present
        assert await disconnected_with(first) == 0x8E
        assert (await receive(watcher)).payload == b"gone"
