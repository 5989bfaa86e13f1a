"""The MQTT 5.0 half of the broker fuzzer (tools/fuzz5.py): level-5 clients are generated and
checked, and its checks catch what they are meant to catch."""

from __future__ import annotations

import math
import random

import pytest

from mqttd.codec.packets import PROTOCOL_5, Connect, Publish, Subscribe, Subscription
from tools.fuzz import (
    BrokerFuzzer,
    FuzzFailure,
    random_action,
    random_config,
    random_durable_action,
)

NO_LIMIT = math.inf  # no time limit per step: a loaded machine is no finding


@pytest.mark.parametrize("seed", range(6))
def test_episodes_connect_level_5_clients(seed: int) -> None:
    rng = random.Random(seed)
    durable = seed % 2 == 1
    fuzzer = BrokerFuzzer(random_config(rng), durable=durable, deep_every=8, hang_s=NO_LIMIT)
    level5 = 0
    for _ in range(300):
        fuzzer.act(random_durable_action(rng) if durable else random_action(rng))
        level5 += sum(1 for peer in fuzzer.live if peer.v5 is not None and peer.connacked)
    fuzzer.finish()
    fuzzer.check_healthy()
    assert level5  # level-5 clients were connected for some of the steps


def _subscriber(fuzzer: BrokerFuzzer, **props: object) -> None:
    fuzzer.act(("connect", Connect("s", protocol_level=PROTOCOL_5, properties=props or None)
                .encode() + Subscribe(1, (Subscription("t/long/topic", 1),), {
                    "subscription_identifier": 5}).encode(PROTOCOL_5), ()))


def test_receive_maximum_and_subscription_ids_are_honoured() -> None:
    fuzzer = BrokerFuzzer(hang_s=NO_LIMIT)
    _subscriber(fuzzer, receive_maximum=2, topic_alias_maximum=1)
    fuzzer.act(("connect", Connect("p", protocol_level=PROTOCOL_5).encode(), ()))
    for packet_id in range(1, 6):
        fuzzer.act(("send5", 1, Publish("t/long/topic", b"m", 1, packet_id=packet_id)
                    .encode(PROTOCOL_5), ()))
    [sub] = [p for p in fuzzer.live if p.conn.client_id == "s"]
    assert len(sub.outstanding) == 2  # the rest is queued
    assert fuzzer.sub_ids == {"s": {5}}


def test_a_publish_over_the_clients_maximum_packet_size_is_a_finding() -> None:
    fuzzer = BrokerFuzzer(hang_s=NO_LIMIT)
    _subscriber(fuzzer, maximum_packet_size=300)
    [sub] = fuzzer.live
    assert sub.v5 is not None
    sub.v5.max_packet_size = 20  # as if the client had asked for less than the broker honours
    fuzzer.act(("connect", Connect("p", protocol_level=PROTOCOL_5).encode(), ()))
    with pytest.raises(FuzzFailure, match="Maximum Packet Size is 20"):
        fuzzer.act(("send5", 1, Publish("t/long/topic", b"x" * 40, 0).encode(PROTOCOL_5), ()))


def test_an_unknown_topic_alias_from_the_broker_is_a_finding() -> None:
    fuzzer = BrokerFuzzer(hang_s=NO_LIMIT)
    _subscriber(fuzzer, topic_alias_maximum=3)
    [sub] = fuzzer.live
    assert sub.v5 is not None
    fuzzer.act(("connect", Connect("p", protocol_level=PROTOCOL_5).encode(), ()))
    fuzzer.act(("send5", 1, Publish("t/long/topic", b"1", 0).encode(PROTOCOL_5), ()))
    assert sub.v5.aliases == {1: "t/long/topic"}
    sub.v5.aliases.clear()  # as if the broker had never set it up
    with pytest.raises(FuzzFailure, match="never set up"):
        fuzzer.act(("send5", 1, Publish("t/long/topic", b"2", 0).encode(PROTOCOL_5), ()))
