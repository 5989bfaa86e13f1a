"""Inflight windows, queue budgets, overflow policies and read pauses, without sockets."""

from __future__ import annotations

import attrs
import pytest

from mqttd.broker import Broker
from mqttd.codec import Decoder
from mqttd.codec.packets import Connect, PubAck, Publish, Subscribe, Subscription
from mqttd.config import ClientOverride
from mqttd.connection import Connection
from tests.conftest import make_config


def connect(broker: Broker, client_id: str, *subs: str, qos: int = 1) -> Connection:
    conn = broker.new_connection(client_id)
    broker.handle_data(conn, Connect(client_id).encode())
    if subs:
        broker.handle_data(conn, Subscribe(1, tuple(Subscription(f, qos) for f in subs)).encode())
    conn.sent(len(conn.data_to_send()))  # CONNACK, SUBACK: written out
    return conn


def publishes(conn: Connection) -> list[Publish]:
    data = conn.data_to_send()
    conn.sent(len(data))
    return [p for p in Decoder(protocol_level=4).feed(data) if isinstance(p, Publish)]


_publisher: list[tuple[Broker, Connection]] = []


def publisher(broker: Broker) -> Connection:
    """One publishing connection for the broker under test (the last one used)."""
    if not _publisher or _publisher[0][0] is not broker:
        _publisher[:] = [(broker, connect(broker, "publisher"))]
    return _publisher[0][1]


def publish_n(broker: Broker, count: int, qos: int = 1, size: int = 10, start: int = 0) -> None:
    pub = publisher(broker)
    for i in range(start, start + count):
        payload = str(i).encode().ljust(size, b".")
        broker.handle_data(pub, Publish("t/x", payload, qos, packet_id=i % 65535 + 1).encode())
    pub.sent(len(pub.data_to_send()))


def numbers(packets: list[Publish]) -> list[int]:
    return [int(p.payload.rstrip(b".")) for p in packets]


def test_window_of_n_holds_exactly_n_and_releases_one_per_ack():
    broker = Broker(make_config(max_inflight_messages=3))
    sub = connect(broker, "sub", "t/#")
    publish_n(broker, 10)
    first = publishes(sub)
    assert numbers(first) == [0, 1, 2]
    for expected, packet in zip((3, 4, 5), first, strict=True):
        broker.handle_data(sub, PubAck(packet.packet_id).encode())
        assert numbers(publishes(sub)) == [expected]  # exactly one more per ack
    assert broker.client_stats("sub")["inflight"] == 3
    assert broker.client_stats("sub")["queued"] == 4


def test_client_overrides_apply_by_pattern_first_match_wins():
    config = attrs.evolve(
        make_config(max_inflight_messages=5, max_queued_messages=50),
        client_overrides=(
            ClientOverride("devices/constrained-*", max_inflight_messages=1,
                           max_queued_messages=2, overflow_policy="drop_new"),
            ClientOverride("devices/*", max_inflight_messages=3),
        ),
    )
    broker = Broker(config)
    tiny = connect(broker, "devices/constrained-7", "t/#")
    mid = connect(broker, "devices/gateway-1", "t/#")
    normal = connect(broker, "backend", "t/#")
    publish_n(broker, 10)
    assert len(publishes(tiny)) == 1
    assert len(publishes(mid)) == 3
    assert len(publishes(normal)) == 5
    tiny_stats = broker.client_stats("devices/constrained-7")
    assert (tiny_stats["queued"], tiny_stats["dropped"]) == (2, 7)
    mid_stats = broker.client_stats("devices/gateway-1")
    assert (mid_stats["queued"], mid_stats["dropped"]) == (7, 0)  # second entry: queue default


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("drop_oldest", list(range(5, 10))), ("drop_new", list(range(0, 5)))],
)
def test_overflow_policy_keeps_the_right_messages_with_exact_counts(policy, kept):
    broker = Broker(make_config(max_inflight_messages=1, max_queued_messages=4,
                                overflow_policy=policy))
    sub = connect(broker, "sub", "t/#")
    publish_n(broker, 10)
    received = numbers(publishes(sub))
    stats = broker.client_stats("sub")
    assert (stats["inflight"], stats["queued"], stats["dropped"]) == (1, 4, 5)
    assert broker.stats()["dropped"] == 5
    # drain: ack one at a time
    while received[-1] != kept[-1]:
        broker.handle_data(sub, PubAck(len(received)).encode())
        received += numbers(publishes(sub))
    # drop_oldest keeps the newest four behind the first (sent at once); drop_new the oldest
    expected = [0, *kept[-4:]] if policy == "drop_oldest" else kept
    assert received == expected


def test_disconnect_policy_closes_the_slow_client_and_counts_the_drop():
    broker = Broker(make_config(max_inflight_messages=1, max_queued_messages=2,
                                overflow_policy="disconnect"))
    sub = connect(broker, "slow", "t/#")
    publish_n(broker, 3)
    assert not sub.closing
    publish_n(broker, 1, start=3)
    assert sub.closing
    stats = broker.client_stats("slow")
    assert (stats["inflight"], stats["queued"], stats["dropped"]) == (1, 2, 1)


def test_queue_byte_budget_counts_payload_bytes_exactly():
    broker = Broker(make_config(max_inflight_messages=1, max_queued_messages=1000,
                                max_queued_bytes=1000))
    connect(broker, "sub", "t/#")
    publish_n(broker, 1, size=100)  # goes in flight at once: not queued
    publish_n(broker, 10, size=100, start=1)  # fills 1000 bytes exactly
    stats = broker.client_stats("sub")
    assert (stats["queued"], stats["queued_bytes"], stats["dropped"]) == (10, 1000, 0)
    publish_n(broker, 1, size=250, start=11)  # drop_oldest: three 100-byte messages go
    stats = broker.client_stats("sub")
    assert (stats["queued"], stats["queued_bytes"], stats["dropped"]) == (8, 950, 3)
    publish_n(broker, 1, size=2000, start=12)  # larger than the whole budget: dropped itself
    stats = broker.client_stats("sub")
    assert stats["queued_bytes"] <= 1000
    assert stats["dropped"] == 3 + 9  # the 8 queued, then the new one


def test_qos0_is_dropped_when_the_client_output_is_backed_up_and_counted_exactly():
    """Once a subscriber counts as stalled (it stopped pacing), QoS 0 beyond its buffer is
    dropped and counted."""
    broker = Broker(make_config(qos0_buffer_bytes=1000, output_high_watermark_bytes=1000))
    sub = connect(broker, "sub", "t/#", qos=0)
    sub.stalled = True  # as mqttd.engine.flow finds a subscriber whose output stopped
    publish_n(broker, 100, qos=0, size=100)  # nothing is written out: the socket is stuck
    stats = broker.client_stats("sub")
    # each message is ~107 bytes on the wire; sending stops once 1000 are buffered
    assert stats["sent"] + stats["dropped_qos0"] == 100
    assert stats["sent"] == 10
    assert broker.stats()["dropped_qos0"] == 90
    assert sub.outbox_bytes <= 1000 + 107
    assert numbers(publishes(sub)) == list(range(10))
    publish_n(broker, 5, qos=0, size=100, start=100)  # drained: flows again
    assert numbers(publishes(sub)) == list(range(100, 105))


def test_reading_pauses_when_output_buffers_pass_the_broker_limit():
    broker = Broker(make_config(max_buffered_bytes=5000, qos0_buffer_bytes=1_000_000))
    sub = connect(broker, "sub", "t/#", qos=0)
    pub = connect(broker, "pub")
    assert not broker.reading_paused(pub)
    for _ in range(60):
        broker.handle_data(pub, Publish("t/x", b"x" * 100, 0).encode())
    assert broker.stats()["buffered_bytes"] > 5000
    assert broker.reading_paused(pub)
    sub.sent(len(sub.data_to_send()))  # the subscriber's writer sent it all
    assert not broker.reading_paused(pub)


def test_reading_pauses_at_the_receive_window_of_acks_waiting_for_a_commit():
    broker = Broker(make_config(max_receive_messages=3))
    pub = connect(broker, "pub")
    for ticket in range(2):
        pub.defer(ticket, b"ack")
    assert not broker.reading_paused(pub)
    pub.defer(3, b"ack")
    assert broker.reading_paused(pub)


def test_connection_lost_releases_its_buffered_bytes():
    broker = Broker(make_config())
    sub = connect(broker, "sub", "t/#", qos=0)
    publish_n(broker, 10, qos=0, size=100)
    assert broker.buffers.bytes > 0
    broker.connection_lost(sub)
    broker.connection_lost(publisher(broker))
    assert broker.buffers.bytes == 0


def test_stats_expose_the_counters():
    broker = Broker(make_config())
    connect(broker, "sub", "t/#")
    publish_n(broker, 3)
    stats = broker.stats()
    assert {"connections", "sessions", "inflight", "queued", "dropped", "dropped_qos0",
            "buffered_bytes", "messages_received", "deliveries"} <= set(stats)
    assert stats["messages_received"] == 3 and stats["deliveries"] == 3
    client = broker.client_stats("sub")
    assert {"inflight", "queued", "queued_bytes", "sent", "dropped", "dropped_qos0",
            "buffered_bytes", "connected"} <= set(client)
    assert broker.client_stats("nobody") is None
