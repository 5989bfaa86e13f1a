"""Fuzzing the connection state machine and the broker, without I/O, with hypothesis.

Random programs of actions run against one ``Broker`` shared by several connections: CONNECTs
with client ids from a small pool (duplicates, takeovers, clean or not, wills), SUBSCRIBE and
UNSUBSCRIBE with random filters, PUBLISH at QoS 0/1/2 with random topics, flags and colliding
packet ids, PUBACK/PUBREC/PUBREL/PUBCOMP for held or random ids, PINGREQ, DISCONNECT, bytes
mutated like the decoder fuzz, connections lost at random points, slow readers, session expiry,
and (with a store) commits at random points and restarts.

``tools.fuzz.BrokerFuzzer`` runs each action and then checks: only ``MQTTError`` escapes
``handle_data``; ``broker.connections`` is exactly the connections not lost; a lost or
taken-over connection has no session; every session has at most ``max_inflight`` in flight,
``queued >= 0``, ``queued_bytes >= 0`` and both within their budgets (and equal to what the queue
holds); the trie holds entries only for existing sessions, exactly their subscriptions, with no
empty node and no stale cached match; ``broker.buffers.bytes`` is the sum of the connections'
``outbox_bytes``; and, as each client sees it: one CONNACK first, every request answered once
and in order, no packet id reused while unacknowledged, the client's unacknowledged ids equal to
the session's inflight. At the end every connection ends, and a fresh client can still connect,
subscribe and receive a publish.
"""

from __future__ import annotations

import math
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqttd.codec.packets import (
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)
from mqttd.config import OVERFLOW_POLICIES, ClientOverride, Config, Limits
from tools.fuzz import (
    BAD_TOPICS,
    CLIENT_IDS,
    FILTER_LEVELS,
    LEVELS,
    MUTATION_OPS,
    BrokerFuzzer,
    apply_mutations,
    make_fuzz_config,
)

EXAMPLES = int(os.environ.get("MQTTD_FUZZ_EXAMPLES", "300"))

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies -----------------------------------------------------------------------------------

topics = st.one_of(
    st.lists(st.sampled_from(LEVELS), min_size=1, max_size=3).map("/".join),
    st.sampled_from(BAD_TOPICS),
)
filters = st.one_of(
    st.lists(st.sampled_from(FILTER_LEVELS), min_size=1, max_size=3).map("/".join),
    st.sampled_from(BAD_TOPICS),
)
packet_ids = st.one_of(st.integers(1, 4), st.sampled_from((65535, 0)), st.integers(1, 65535))
payloads = st.one_of(st.binary(max_size=12), st.sampled_from((b"", b"x" * 70, b"y" * 300)))
qos = st.integers(0, 2)

connect_packets = st.builds(
    Connect,
    client_id=st.sampled_from(CLIENT_IDS),
    clean_session=st.booleans(),
    keepalive_s=st.sampled_from((0, 60, 65535)),
    protocol_level=st.sampled_from((4, 4, 4, 3)),
    will=st.none() | st.builds(Will, topics, payloads, qos, st.booleans()),
    username=st.none() | st.just("u"),
)
publishes = st.builds(
    lambda topic, payload, q, retain, dup, packet_id: Publish(
        topic, payload, q, retain, dup and q > 0, packet_id if q else 0
    ),
    topics, payloads, qos, st.booleans(), st.booleans(), packet_ids,
)
subscribes = st.builds(
    Subscribe, packet_ids,
    st.lists(st.builds(Subscription, filters, qos), min_size=1, max_size=3).map(tuple),
)
unsubscribes = st.builds(
    Unsubscribe, packet_ids, st.lists(filters, min_size=1, max_size=2).map(tuple)
)
client_packets = st.one_of(
    publishes, publishes, publishes, subscribes, subscribes, unsubscribes,
    st.builds(lambda cls, i: cls(i), st.sampled_from((PubAck, PubRec, PubRel, PubComp)),
              packet_ids),
    st.sampled_from((PingReq(), Disconnect())),
    connect_packets,  # a second CONNECT
    st.builds(ConnAck),  # a server-only packet
)
mutations = st.lists(
    st.tuples(st.integers(0, MUTATION_OPS - 1), st.integers(0, 65535), st.integers(0, 65535)),
    min_size=1, max_size=3,
)


@st.composite
def blobs(draw: Any, first: st.SearchStrategy[Any] | None = None) -> tuple[bytes, tuple[int, ...]]:
    """Encoded packets (perhaps one mutated) and where to split them into reads."""
    packets = [draw(first)] if first is not None else []
    packets += draw(st.lists(client_packets, min_size=0 if first is not None else 1, max_size=3))
    parts = [p.encode() for p in packets]
    if draw(st.integers(0, 9)) == 0:
        k = draw(st.integers(0, len(parts) - 1))
        parts[k] = apply_mutations(parts[k], draw(mutations), parts[-1])
    data = b"".join(parts)
    cuts: tuple[int, ...] = ()
    if len(data) > 1 and draw(st.integers(0, 4)) == 0:
        cuts = tuple(draw(st.lists(st.integers(1, len(data) - 1), min_size=1, max_size=3)))
    return data, cuts


peers = st.integers(0, 7)
connect_actions = blobs(connect_packets).map(lambda b: ("connect", *b))
send_actions = st.tuples(peers, blobs()).map(lambda t: ("send", t[0], *t[1]))
ack_actions = st.tuples(
    st.just("ack"), peers, st.sampled_from((PUBACK, PUBACK, PUBREC, PUBREL, PUBCOMP)),
    st.integers(0, 65535),
)
other_actions = st.one_of(
    st.tuples(st.just("lost"), peers),
    st.just(("reap",)),
    st.tuples(st.sampled_from(("flush", "slow")), peers),
    st.just(("expire",)),
)
actions = st.one_of(
    connect_actions, connect_actions, send_actions, send_actions, send_actions, send_actions,
    ack_actions, ack_actions, other_actions,
)
durable_actions = st.one_of(actions, st.just(("commit",)), st.just(("restart",)))

configs = st.builds(
    lambda limits, overrides, page: make_fuzz_config(limits, overrides, page),
    st.builds(
        Limits,
        max_packet_size_bytes=st.sampled_from((1_048_576, 64)),
        max_inflight_messages=st.sampled_from((1, 2, 20)),
        max_queued_messages=st.sampled_from((1, 3, 1000)),
        max_queued_bytes=st.sampled_from((-1, 8, 100)),
        overflow_policy=st.sampled_from(OVERFLOW_POLICIES),
        persistent_max_queued_messages=st.sampled_from((-1, 1, 3, 1000)),
        persistent_max_queued_bytes=st.sampled_from((-1, 8, 100)),
        persistent_overflow_policy=st.sampled_from(OVERFLOW_POLICIES),
        output_high_watermark_bytes=st.sampled_from((1, 64, 262_144)),
        queue_high_watermark_messages=st.sampled_from((1, 2, 256)),
        qos0_buffer_bytes=st.sampled_from((0, 64, 262_144)),
        max_inbound_qos2=st.sampled_from((1, 2, 1000)),
        max_keepalive_s=st.sampled_from((65535, 100)),
        max_topic_length_bytes=st.sampled_from((65535, 4)),
        max_topic_levels=st.sampled_from((-1, 2)),
        max_publish_rate_per_s=st.sampled_from((-1.0, 5.0)),
    ),
    st.sampled_from(((), (ClientOverride(client_id="c1", max_inflight_messages=1),))),
    st.sampled_from((4096, 1, 2, 3)),  # queue_page_messages: small pages spill to disk
)


def run(config: Config, program: list[Any], shutdown: bool, durable: bool = False) -> None:
    # no time limit per step: how fast a step runs on a loaded machine is no finding here
    fuzzer = BrokerFuzzer(config, durable=durable, hang_s=math.inf)
    for action in program:
        fuzzer.act(action)
    fuzzer.finish(shutdown)
    fuzzer.check_healthy()


# -- properties -----------------------------------------------------------------------------------


@fuzz
@given(configs, st.lists(actions, min_size=1, max_size=50), st.booleans())
def test_random_programs(config: Config, program: list[Any], shutdown: bool) -> None:
    run(config, program, shutdown)


@fuzz
@given(configs, st.lists(durable_actions, min_size=1, max_size=50), st.booleans())
def test_random_programs_with_a_store(config: Config, program: list[Any], shutdown: bool) -> None:
    """The same with persistent sessions written to a store in memory, committed at random
    points (acknowledgements wait for their commit) and restarts from it."""
    run(config, program, shutdown, durable=True)


two_clients = st.sampled_from(("c0", "c1"))
takeover_connects = st.builds(
    lambda cid, clean, will: ("connect", Connect(cid, clean, will=will).encode(), ()),
    two_clients, st.booleans(),
    st.none() | st.builds(Will, st.just("a"), st.just(b"will"), qos, st.booleans()),
)
qos2_flow = st.one_of(
    st.builds(lambda peer, pid: ("send", peer, Publish("a", b"m", 2, packet_id=pid).encode(), ()),
              peers, st.integers(1, 3)),
    st.builds(lambda peer, pid: ("send", peer, PubRel(pid).encode(), ()), peers, st.integers(1, 3)),
    st.builds(lambda peer: ("send", peer, Subscribe(1, (Subscription("#", 2),)).encode(), ()),
              peers),
    st.tuples(st.just("ack"), peers, st.sampled_from((PUBREC, PUBREL, PUBCOMP)),
              st.integers(0, 8)),
)


@fuzz
@given(
    configs,
    st.lists(st.one_of(takeover_connects, qos2_flow, qos2_flow, other_actions), max_size=60),
    st.booleans(), st.booleans(),
)
def test_takeovers_and_qos2_flows(
    config: Config, program: list[Any], shutdown: bool, durable: bool
) -> None:
    """Two client ids taking each other's sessions over while QoS 2 exchanges are half done."""
    run(config, program, shutdown, durable)
