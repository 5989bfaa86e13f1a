"""Delayed publish ($delayed/<seconds>/<topic>) over real sockets: a message arrives no
earlier than its delay (measured with trio's clock from before the PUBLISH), also across a
restart; QoS, RETAIN and 5.0 properties carried; the limits (delay, number held) refused and
counted; the ACL judges the target topic."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from mqttd.broker import running
from mqttd.codec.packets import PROTOCOL_5, PubAck, Publish
from mqttd.codec.reason import NOT_AUTHORIZED, QUOTA_EXCEEDED
from mqttd.config import Config, Delayed
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.interop.test_paho_v5 import paho5, prop
from tests.rawclient import RawClient

TIMEOUT_S = 30.0


def delayed_config(data_dir: Any = None, **limits: Any) -> Config:
    return attrs.evolve(make_config(data_dir), delayed=Delayed(**limits))


async def publish_v5(client: RawClient, topic: str, payload: bytes, qos: int = 1) -> int:
    """A 5.0 QoS 1 PUBLISH; the PUBACK's reason code."""
    packet_id = client.packet_id()
    await client.send(Publish(topic, payload, qos, False, False, packet_id))
    ack = await client.take(PubAck, packet_id=packet_id)
    return ack.reason_code  # type: ignore[attr-defined, no-any-return]


async def test_a_delayed_message_arrives_no_earlier_than_its_delay() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running(delayed_config()) as broker:
            sub, _ = await RawClient.connected(broker.port, "late-reader")
            await sub.subscribe("later/#", qos=2)
            pub, _ = await RawClient.connected(broker.port, "scheduler")
            sent_at = trio.current_time()
            await pub.publish("$delayed/1/later/one", b"in a second", qos=1)
            await pub.publish("later/now", b"at once", qos=1)
            first = await sub.take(Publish)
            assert first.payload == b"at once"  # the delayed one has not come before
            assert broker.stats()["delayed_held"] == 1
            second = await sub.take(Publish)
            assert trio.current_time() - sent_at >= 1.0
            assert (second.topic, second.payload, second.qos) == ("later/one", b"in a second", 1)
            await sub.send(PubAck(second.packet_id))
            stats = broker.stats()
            assert (stats["delayed_held"], stats["delayed_accepted"],
                    stats["delayed_published"]) == (0, 1, 1)


async def test_qos_retain_and_properties_are_kept_and_nothing_is_retained_early() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            running(delayed_config()) as broker,
            paho5(broker.port, "sched5") as (pub, _, _),
            paho5(broker.port, "read5") as (sub, _, _),
        ):
            assert await sub.subscribe("later/#", 2) == [2]
            sent_at = trio.current_time()
            assert await pub.publish("$delayed/1/later/state", b"on", 2, retain=True,
                                     content_type="text/plain",
                                     user_property=[("k", "v")]) == 0
            assert broker.retained.get("later/state") is None  # not before its time
            assert not broker.retained.match("$delayed/#")  # nor under its $delayed name
            message = await sub.message()
            assert trio.current_time() - sent_at >= 1.0
            assert (message.topic, message.payload, message.qos) == ("later/state", b"on", 2)
            assert prop(message.properties, "content_type") == "text/plain"
            assert prop(message.properties, "user_property") == [("k", "v")]
            assert broker.retained.get("later/state") is not None  # retained from now on


async def test_a_delayed_message_survives_a_restart_and_keeps_its_time(tmp_path: Any) -> None:
    config = delayed_config(tmp_path)
    with trio.fail_after(TIMEOUT_S):
        async with running(config) as broker:
            sub, _ = await RawClient.connected(broker.port, "keeper", clean_session=False)
            await sub.subscribe("later/#", qos=1)
            await sub.aclose()
            pub, _ = await RawClient.connected(broker.port, "scheduler")
            sent_at = trio.current_time()
            await pub.publish("$delayed/2/later/restart", b"kept", qos=1)  # PUBACK: stored
        async with running(config) as broker:
            assert broker.stats()["delayed_held"] == 1
            sub, connack = await RawClient.connected(broker.port, "keeper", clean_session=False)
            assert connack.session_present
            message = await sub.take(Publish)
            assert trio.current_time() - sent_at >= 2.0
            assert (message.topic, message.payload) == ("later/restart", b"kept")
            await sub.send(PubAck(message.packet_id))
            await wait_until(lambda: broker.stats()["delayed_held"] == 0)


async def test_the_limits_refuse_and_count() -> None:
    """A delay over max_delay_s and one that is no number are dropped and counted; with
    max_messages held a 5.0 publisher gets 0x97 and a 3.1.1 one cannot be told."""
    config = delayed_config(max_delay_s=60, max_messages=2)
    with trio.fail_after(TIMEOUT_S):
        async with running(config) as broker:
            v5, _ = await RawClient.connected(broker.port, "five", protocol_level=PROTOCOL_5)
            v3, _ = await RawClient.connected(broker.port, "three")
            assert await publish_v5(v5, "$delayed/61/t", b"too late") == 0
            assert await publish_v5(v5, "$delayed/soon/t", b"no number") == 0
            assert await publish_v5(v5, "$delayed/30/t", b"one") == 0
            assert await publish_v5(v5, "$delayed/30/t", b"two") == 0
            assert await publish_v5(v5, "$delayed/30/t", b"three") == QUOTA_EXCEEDED
            await v3.publish("$delayed/30/t", b"four", qos=1)  # acknowledged, dropped
            stats = broker.stats()
            assert (stats["delayed_held"], stats["delayed_refused"]) == (2, 4)
            assert (broker.delayed.refused_too_long, broker.delayed.refused_invalid,
                    broker.delayed.refused_full) == (1, 1, 2)


class OnlyAllowed:
    """An ACL for the test: publishing only under allowed/ (and reading everything)."""

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        return topic.startswith("allowed/")

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        return True

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        return True


async def test_the_acl_judges_the_target_topic() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running(delayed_config(), authorizer=OnlyAllowed()) as broker:
            sub, _ = await RawClient.connected(broker.port, "reader")
            await sub.subscribe("#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "five", protocol_level=PROTOCOL_5)
            assert await publish_v5(pub, "$delayed/0/other/x", b"denied") == NOT_AUTHORIZED
            assert await publish_v5(pub, "$delayed/0/allowed/x", b"allowed") == 0
            message = await sub.take(Publish)
            assert (message.topic, message.payload) == ("allowed/x", b"allowed")
            assert broker.stats()["delayed_accepted"] == 1


async def test_timers_that_come_due_while_others_run_do_not_stop_the_broker() -> None:
    """Delayed messages due together: each timer callback takes longer than the gap to the
    next one (the timer loop used to compute a negative wait then, and the broker exited)."""
    import time

    with trio.fail_after(TIMEOUT_S):
        async with running(make_config()) as broker:
            ran: list[int] = []

            def slow(n: int) -> None:
                ran.append(n)
                time.sleep(0.002)  # a callback's work, longer than the gap to the next one

            start = time.time() + 0.05
            for n in range(50):
                broker.call_at(start + n * 0.001, lambda n=n: slow(n))  # type: ignore[misc]
            await wait_until(lambda: len(ran) == 50)
            assert ran == list(range(50))
