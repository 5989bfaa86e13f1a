"""Router without I/O: delivery QoS, one delivery per client, shared encodings, counters
(MQTT 3.1.1 sections 3.3.5, 3.8.4)."""

from __future__ import annotations

import pytest

from mqttd.codec import Decoder
from mqttd.codec.packets import Publish
from mqttd.connection import Connection
from mqttd.router import Router
from mqttd.session import Session


def subscriber(
    router: Router, client_id: str, *subs: tuple[str, int]
) -> tuple[Session, Connection]:
    session = Session(client_id, persistent=False, max_inflight=100)
    conn = Connection(peer=client_id)
    session.attach(conn)
    for topic_filter, qos in subs:
        session.subscriptions[topic_filter] = qos
        router.trie.add(topic_filter, client_id, session, qos)
    return session, conn


def received(conn: Connection) -> list[Publish]:
    return Decoder(protocol_level=4).feed(conn.data_to_send())  # type: ignore[return-value]


@pytest.mark.parametrize("publish_qos", [0, 1, 2])
@pytest.mark.parametrize("granted_qos", [0, 1, 2])
def test_delivered_at_min_of_publish_and_granted_qos(publish_qos: int, granted_qos: int) -> None:
    router = Router()
    _, conn = subscriber(router, "s", ("a/b", granted_qos))
    assert router.route(Publish("a/b", b"x", publish_qos, packet_id=7 if publish_qos else 0)) == 1
    (p,) = received(conn)
    assert p.qos == min(publish_qos, granted_qos)
    assert p.payload == b"x" and p.topic == "a/b"
    assert not p.retain and not p.dup
    if p.qos:
        assert p.packet_id == 1  # the subscriber's own id, not the publisher's 7


def test_overlapping_subscriptions_deliver_once_at_highest_granted_qos() -> None:
    router = Router()
    _, conn = subscriber(router, "s", ("a/#", 2), ("a/b", 0), ("a/+", 1), ("+/b", 0), ("#", 1))
    assert router.route(Publish("a/b", b"x", 2, packet_id=1)) == 1
    packets = received(conn)
    assert len(packets) == 1
    assert packets[0].qos == 2


@pytest.mark.parametrize(
    "subs",
    [
        [("a/b", 2), ("a/+", 0)],
        [("a/+", 0), ("a/b", 2)],
        [("#", 0), ("a/#", 0), ("a/b", 1)],
        [("a/b", 1), ("#", 0), ("+/+", 0)],
        [("+/b", 2), ("a/b", 0), ("a/#", 0)],
    ],
)
def test_highest_granted_qos_wins_whatever_the_filter_kind(subs: list[tuple[str, int]]) -> None:
    router = Router()
    _, conn = subscriber(router, "s", *subs)
    router.route(Publish("a/b", b"x", 2, packet_id=1))
    packets = received(conn)
    assert [p.qos for p in packets] == [max(q for _, q in subs)]


def test_overlapping_subscriptions_of_two_clients_each_deliver_once() -> None:
    router = Router()
    _, c1 = subscriber(router, "s1", ("a/#", 1), ("a/b", 0))
    _, c2 = subscriber(router, "s2", ("a/+", 0), ("#", 2))
    assert router.route(Publish("a/b", b"x", 1, packet_id=1)) == 2
    assert [p.qos for p in received(c1)] == [1]
    assert [p.qos for p in received(c2)] == [1]
    assert router.deliveries == 2


def test_publish_qos_is_never_upgraded() -> None:
    router = Router()
    _, conn = subscriber(router, "s", ("a/#", 2), ("a/b", 2))
    router.route(Publish("a/b", b"x", 0))
    assert [p.qos for p in received(conn)] == [0]


def test_encoded_bytes_are_shared_between_subscribers_per_qos() -> None:
    router = Router()
    _, c1 = subscriber(router, "s1", ("a/b", 1))
    _, c2 = subscriber(router, "s2", ("a/+", 1))
    _, c0 = subscriber(router, "s0", ("a/#", 0))
    message = Publish("a/b", b"payload", 2, packet_id=5)
    router.route(message)
    head1, _id1, tail1 = c1.outbox
    head2, _id2, tail2 = c2.outbox
    assert head1 is head2
    assert tail1 is tail2
    # the QoS 0 encoding is different (no packet id, other flags) and made once as well
    assert c0.outbox[0] is not head1
    assert [p.qos for p in received(c1)] == [1]
    assert [p.qos for p in received(c2)] == [1]
    assert [p.qos for p in received(c0)] == [0]


def test_unmatched_messages_are_counted() -> None:
    router = Router()
    _, conn = subscriber(router, "s", ("a/b", 1))
    assert router.route(Publish("x/y", b"1")) == 0
    assert router.route(Publish("a/b/c", b"2")) == 0
    assert router.route(Publish("a/b", b"3")) == 1
    assert router.messages_routed == 3
    assert router.messages_unmatched == 2
    assert router.deliveries == 1
    assert [p.payload for p in received(conn)] == [b"3"]


def test_routed_messages_carry_retain_0() -> None:
    router = Router()
    _, conn = subscriber(router, "s", ("a", 1))
    router.route(Publish("a", b"x", 1, retain=True, packet_id=3))
    (p,) = received(conn)
    assert p.retain is False


def test_dollar_topics_not_matched_by_leading_wildcards() -> None:
    router = Router()
    _, hash_conn = subscriber(router, "hash", ("#", 0))
    _, plus_conn = subscriber(router, "plus", ("+/x", 0))
    _, sys_conn = subscriber(router, "sys", ("$SYS/#", 0))
    assert router.route(Publish("$SYS/x", b"1")) == 1
    assert received(hash_conn) == []
    assert received(plus_conn) == []
    assert [p.topic for p in received(sys_conn)] == ["$SYS/x"]


def test_route_after_subscription_change_sees_the_change() -> None:
    router = Router()
    _, conn = subscriber(router, "s", ("a/b", 1))
    assert router.route(Publish("a/b", b"1", 1, packet_id=1)) == 1  # caches the match
    router.trie.add("a/+", "s", router.trie.match("a/b")[0][0], 2)
    router.route(Publish("a/b", b"2", 2, packet_id=1))
    assert [(p.payload, p.qos) for p in received(conn)] == [(b"1", 1), (b"2", 2)]
    router.trie.remove("a/b", "s")
    router.trie.remove("a/+", "s")
    assert router.route(Publish("a/b", b"3")) == 0


class Recorder:
    """Any object with ``deliver`` can subscribe (the seam for bridges / cluster links)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Publish, int, bool]] = []

    def deliver(self, message: Publish, qos: int, retain: bool, parts: object) -> None:
        self.calls.append((message, qos, retain))


def test_router_delivers_the_same_message_object_through_the_seam() -> None:
    router = Router()
    rec = Recorder()
    router.trie.add("a/#", "bridge", rec, 1)
    message = Publish("a/b", b"x", 2, packet_id=9)
    router.route(message)
    assert rec.calls == [(message, 1, False)]
    assert rec.calls[0][0] is message
