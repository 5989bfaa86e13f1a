"""Broker packet handling at the byte level, without sockets (MQTT 3.1.1).

Each test drives ``Broker.handle_data`` with encoded packets and decodes what the broker
queued for the connection, as a client would see it on the wire.
"""

from __future__ import annotations

from typing import Any

import pytest

from mqttd.broker import Broker
from mqttd.codec import ClientIdRejected, Decoder, MalformedPacket, MQTTError, ProtocolError
from mqttd.codec.errors import SessionTakenOver
from mqttd.codec.packets import (
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from tests.conftest import make_config


class Client:
    """One connection to the broker, driven synchronously."""

    def __init__(self, broker: Broker, peer: str = "peer") -> None:
        self.broker = broker
        self.conn = broker.new_connection(peer)
        self.decoder = Decoder(protocol_level=4)
        self._next_id = 1

    def send_bytes(self, data: bytes) -> None:
        self.broker.handle_data(self.conn, data)

    def send(self, *packets: Any) -> None:
        self.send_bytes(b"".join(p.encode() for p in packets))

    def received(self) -> list[Any]:
        return self.decoder.feed(self.conn.data_to_send())

    def connect(self, client_id: str, clean: bool = True, will: Will | None = None) -> ConnAck:
        self.send(Connect(client_id, clean_session=clean, will=will))
        packets = self.received()
        assert isinstance(packets[0], ConnAck), packets
        assert packets[0].return_code == 0
        self.pending = packets[1:]
        return packets[0]

    def subscribe(self, *subs: tuple[str, int]) -> SubAck:
        packet_id = self._id()
        self.send(Subscribe(packet_id, tuple(Subscription(f, q) for f, q in subs)))
        packets = self.received()
        assert isinstance(packets[0], SubAck), packets
        assert packets[0].packet_id == packet_id
        self.pending = packets[1:]
        return packets[0]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        packet_id = self._id() if qos else 0
        self.send(Publish(topic, payload, qos, retain, packet_id=packet_id))
        if qos == 1:
            assert self.received() == [PubAck(packet_id)]
        elif qos == 2:
            assert self.received() == [PubRec(packet_id)]
            self.send(PubRel(packet_id))
            assert self.received() == [PubComp(packet_id)]

    def lose(self) -> None:
        self.broker.connection_lost(self.conn)

    def _id(self) -> int:
        packet_id = self._next_id
        self._next_id += 1
        return packet_id


@pytest.fixture
def broker() -> Broker:  # overrides the I/O fixture of tests/conftest.py: no sockets here
    return Broker(make_config())


def connected(broker: Broker, client_id: str, clean: bool = True, **kw: Any) -> Client:
    client = Client(broker, client_id)
    client.connect(client_id, clean, **kw)
    return client


def publishes(packets: list[Any]) -> list[tuple[str, bytes, int, bool]]:
    return [(p.topic, p.payload, p.qos, p.retain) for p in packets if isinstance(p, Publish)]


# -- CONNECT -------------------------------------------------------------------------------


def test_connack_for_new_clean_session(broker: Broker) -> None:
    client = Client(broker)
    client.send(Connect("c1", clean_session=True))
    assert client.received() == [ConnAck(False, 0)]
    assert client.conn.client_id == "c1"
    assert "c1" in broker.sessions
    assert not client.conn.closing


def test_connack_for_new_persistent_session_has_session_present_0(broker: Broker) -> None:
    client = Client(broker)
    client.send(Connect("c1", clean_session=False))
    assert client.received() == [ConnAck(False, 0)]


def test_empty_client_id_with_clean_session_gets_a_generated_id(broker: Broker) -> None:
    a = Client(broker, "a")
    a.send(Connect("", clean_session=True))
    assert a.received() == [ConnAck(False, 0)]
    b = Client(broker, "b")
    b.send(Connect("", clean_session=True))
    assert b.received() == [ConnAck(False, 0)]
    assert a.conn.client_id and b.conn.client_id
    assert a.conn.client_id != b.conn.client_id  # not taken over by each other
    assert not a.conn.closing and not b.conn.closing
    assert a.conn.client_id in broker.sessions and b.conn.client_id in broker.sessions


def test_empty_client_id_with_clean_session_0_is_rejected_with_connack_2(broker: Broker) -> None:
    client = Client(broker)
    with pytest.raises(MQTTError) as info:
        client.send(Connect("", clean_session=False))
    assert isinstance(info.value, ClientIdRejected)
    assert info.value.connack_code == 2
    assert client.received() == []
    broker.protocol_error(client.conn, info.value)
    assert client.received() == [ConnAck(False, 2)]
    assert client.conn.closing
    assert client.conn.close_reason is info.value
    assert client.conn.flush_before_close
    assert broker.sessions == {}


def test_mqtt31_empty_client_id_is_rejected_with_connack_2(broker: Broker) -> None:
    client = Client(broker)
    data = Connect("", clean_session=True, protocol_level=3).encode()
    assert data[4:10] == b"MQIsdp"
    with pytest.raises(MQTTError) as info:
        client.send_bytes(data)
    assert info.value.connack_code == 2
    broker.protocol_error(client.conn, info.value)
    assert Decoder(protocol_level=3).feed(client.conn.data_to_send()) == [ConnAck(False, 2)]
    assert client.conn.closing


def test_mqtt31_with_client_id_is_accepted(broker: Broker) -> None:
    client = Client(broker)
    client.send_bytes(Connect("old", clean_session=True, protocol_level=3).encode())
    assert client.received() == [ConnAck(False, 0)]


def test_packet_before_connect_is_a_protocol_error(broker: Broker) -> None:
    client = Client(broker)
    with pytest.raises(ProtocolError):
        client.send(PingReq())
    assert client.received() == []
    assert broker.sessions == {}


def test_second_connect_is_a_protocol_error(broker: Broker) -> None:
    client = connected(broker, "c1")
    with pytest.raises(ProtocolError):
        client.send(Connect("c1"))
    assert client.received() == []
    broker.protocol_error(client.conn, ProtocolError("second CONNECT"))
    assert client.conn.closing
    assert client.received() == []  # no CONNACK once connected


def test_second_connect_in_the_same_data_as_the_first(broker: Broker) -> None:
    """The first CONNECT precedes the bad one in the same read: it is handled first."""
    client = Client(broker)
    with pytest.raises(ProtocolError):
        client.send(Connect("c1"), Connect("c1"))
    assert client.received() == [ConnAck(False, 0)]


def test_packets_between_two_connects_in_one_read_are_handled(broker: Broker) -> None:
    """CONNECT, SUBSCRIBE, CONNECT in one read: CONNACK and SUBACK, then ProtocolError
    (never another exception type, which the I/O layer would not answer as a protocol error)."""
    client = Client(broker)
    with pytest.raises(ProtocolError):
        client.send(Connect("c1"), Subscribe(1, (Subscription("a", 1),)), Connect("c1"))
    assert client.received() == [ConnAck(False, 0), SubAck(1, (1,))]


def test_good_packets_before_garbage_are_handled_first(broker: Broker) -> None:
    client = connected(broker, "c1")
    data = Subscribe(1, (Subscription("a/b", 1),)).encode() + b"\x00\x00"  # type 0 is reserved
    with pytest.raises(MalformedPacket):
        client.send_bytes(data)
    assert client.received() == [SubAck(1, (1,))]
    assert broker.sessions["c1"].subscriptions == {"a/b": 1}


def test_connect_and_garbage_in_one_read_answers_connack_first(broker: Broker) -> None:
    client = Client(broker)
    with pytest.raises(MalformedPacket):
        client.send_bytes(Connect("c1").encode() + b"\xf0\x00")
    assert client.received() == [ConnAck(False, 0)]


def test_pingreq_gets_pingresp(broker: Broker) -> None:
    client = connected(broker, "c1")
    client.send(PingReq())
    assert client.received() == [PingResp()]
    client.send(PingReq(), PingReq())
    assert client.received() == [PingResp(), PingResp()]


def test_packets_after_disconnect_are_ignored(broker: Broker) -> None:
    client = connected(broker, "c1")
    client.send(Disconnect(), PingReq())
    assert client.received() == []
    assert client.conn.closing
    assert client.conn.close_reason is None


# -- sessions ------------------------------------------------------------------------------


def test_persistent_session_queues_while_offline_and_delivers_on_reconnect(broker: Broker) -> None:
    sub = connected(broker, "sub", clean=False)
    assert sub.subscribe(("t/#", 1)).return_codes == (1,)
    sub.lose()
    assert "sub" in broker.sessions

    pub = connected(broker, "pub")
    pub.publish("t/1", b"while-away", qos=1)
    pub.publish("t/0", b"qos0-dropped", qos=0)  # QoS 0 is not queued for offline sessions

    again = Client(broker, "sub-2")
    again.send(Connect("sub", clean_session=False))
    packets = again.received()
    assert packets[0] == ConnAck(True, 0)
    assert publishes(packets[1:]) == [("t/1", b"while-away", 1, False)]
    # the subscription is still there
    pub.publish("t/2", b"now", qos=1)
    assert publishes(again.received()) == [("t/2", b"now", 1, False)]


def test_persistent_session_resends_unacknowledged_with_dup(broker: Broker) -> None:
    sub = connected(broker, "sub", clean=False)
    sub.subscribe(("t", 1))
    pub = connected(broker, "pub")
    pub.publish("t", b"m", qos=1)
    (first,) = sub.received()
    sub.lose()
    again = Client(broker, "sub-2")
    again.send(Connect("sub", clean_session=False))
    packets = again.received()
    assert packets[0] == ConnAck(True, 0)
    (resent,) = packets[1:]
    assert (resent.packet_id, resent.dup, resent.payload) == (first.packet_id, True, b"m")


def test_clean_session_reconnect_discards_subscriptions(broker: Broker) -> None:
    sub = connected(broker, "sub", clean=False)
    sub.subscribe(("t", 1))
    sub.lose()
    pub = connected(broker, "pub")
    pub.publish("t", b"queued", qos=1)

    again = Client(broker, "sub-2")
    again.send(Connect("sub", clean_session=True))
    assert again.received() == [ConnAck(False, 0)]  # nothing of the old session is sent
    assert broker.sessions["sub"].subscriptions == {}
    unmatched = broker.router.messages_unmatched
    pub.publish("t", b"after", qos=1)
    assert again.received() == []
    assert broker.router.messages_unmatched == unmatched + 1


def test_clean_session_is_discarded_when_the_connection_ends(broker: Broker) -> None:
    sub = connected(broker, "sub", clean=True)
    sub.subscribe(("t", 1))
    sub.lose()
    assert "sub" not in broker.sessions
    pub = connected(broker, "pub")
    pub.publish("t", b"x", qos=1)
    again = Client(broker, "sub-2")
    again.send(Connect("sub", clean_session=False))
    assert again.received() == [ConnAck(False, 0)]


def test_takeover_closes_the_first_connection_and_publishes_its_will(broker: Broker) -> None:
    watcher = connected(broker, "watcher")
    watcher.subscribe(("will/#", 1))
    first = connected(broker, "dev", will=Will("will/dev", b"gone", 1, False))

    second = Client(broker, "second")
    second.send(Connect("dev", clean_session=True))
    assert second.received() == [ConnAck(False, 0)]
    assert first.conn.closing
    assert isinstance(first.conn.close_reason, SessionTakenOver)
    assert publishes(watcher.received()) == [("will/dev", b"gone", 1, False)]

    # the old connection ending later publishes nothing more and leaves the new one alone
    first.lose()
    assert watcher.received() == []
    assert broker.sessions["dev"].connection is second.conn
    second.subscribe(("x", 0))
    watcher.publish("x", b"still-here")
    assert publishes(second.received()) == [("x", b"still-here", 0, False)]


def test_takeover_of_persistent_session_keeps_it(broker: Broker) -> None:
    first = connected(broker, "dev", clean=False)
    first.subscribe(("t", 1))
    second = Client(broker, "second")
    second.send(Connect("dev", clean_session=False))
    assert second.received() == [ConnAck(True, 0)]
    assert isinstance(first.conn.close_reason, SessionTakenOver)
    first.lose()
    pub = connected(broker, "pub")
    pub.publish("t", b"x", qos=1)
    assert publishes(second.received()) == [("t", b"x", 1, False)]


# -- wills ---------------------------------------------------------------------------------


def test_will_published_when_connection_lost_without_disconnect(broker: Broker) -> None:
    watcher = connected(broker, "watcher")
    watcher.subscribe(("w", 0))
    dev = connected(broker, "dev", will=Will("w", b"bye"))
    dev.lose()
    assert publishes(watcher.received()) == [("w", b"bye", 0, False)]


def test_will_not_published_after_disconnect(broker: Broker) -> None:
    watcher = connected(broker, "watcher")
    watcher.subscribe(("w", 0))
    dev = connected(broker, "dev", will=Will("w", b"bye"))
    dev.send(Disconnect())
    assert dev.conn.closing
    dev.lose()
    assert watcher.received() == []


def test_will_published_once_only(broker: Broker) -> None:
    watcher = connected(broker, "watcher")
    watcher.subscribe(("w", 0))
    dev = connected(broker, "dev", will=Will("w", b"bye"))
    dev.lose()
    dev.lose()
    assert len(watcher.received()) == 1


def test_will_published_after_protocol_error(broker: Broker) -> None:
    watcher = connected(broker, "watcher")
    watcher.subscribe(("w", 0))
    dev = connected(broker, "dev", will=Will("w", b"bye"))
    with pytest.raises(MQTTError) as info:
        dev.send_bytes(b"\x00\x00")
    broker.protocol_error(dev.conn, info.value)
    dev.lose()
    assert publishes(watcher.received()) == [("w", b"bye", 0, False)]


@pytest.mark.parametrize("will_qos", [0, 1, 2])
def test_will_qos_honoured(broker: Broker, will_qos: int) -> None:
    watcher = connected(broker, "watcher")
    watcher.subscribe(("w", 2))
    dev = connected(broker, "dev", will=Will("w", b"bye", will_qos))
    dev.lose()
    assert publishes(watcher.received()) == [("w", b"bye", will_qos, False)]


def test_retained_will_is_stored_and_sent_to_later_subscribers(broker: Broker) -> None:
    watcher = connected(broker, "watcher")
    watcher.subscribe(("w", 2))
    dev = connected(broker, "dev", will=Will("w", b"bye", 1, True))
    dev.lose()
    assert publishes(watcher.received()) == [("w", b"bye", 1, False)]  # to existing: RETAIN 0
    stored = broker.retained.get("w")
    assert stored is not None
    assert (stored.payload, stored.qos) == (b"bye", 1)  # type: ignore[attr-defined]
    late = connected(broker, "late")
    late.subscribe(("w", 1))
    assert publishes(late.pending) == [("w", b"bye", 1, True)]


# -- retained messages ---------------------------------------------------------------------


def test_retained_stored_replaced_and_sent_on_subscribe(broker: Broker) -> None:
    pub = connected(broker, "pub")
    pub.publish("r/a", b"1", qos=1, retain=True)
    pub.publish("r/a", b"2", qos=0, retain=True)
    assert broker.retained.get("r/a").payload == b"2"  # type: ignore[union-attr]
    sub = connected(broker, "sub")
    sub.subscribe(("r/a", 1))
    assert publishes(sub.pending) == [("r/a", b"2", 0, True)]


def test_retained_sent_at_min_of_its_qos_and_granted_qos(broker: Broker) -> None:
    pub = connected(broker, "pub")
    pub.publish("r/q2", b"x", qos=2, retain=True)
    s1 = connected(broker, "s1")
    s1.subscribe(("r/q2", 1))
    assert publishes(s1.pending) == [("r/q2", b"x", 1, True)]
    s2 = connected(broker, "s2")
    s2.subscribe(("r/q2", 2))
    assert publishes(s2.pending) == [("r/q2", b"x", 2, True)]


def test_retained_deleted_by_empty_payload(broker: Broker) -> None:
    pub = connected(broker, "pub")
    pub.publish("r/a", b"1", retain=True)
    pub.publish("r/a", b"", retain=True)
    assert broker.retained.get("r/a") is None
    sub = connected(broker, "sub")
    sub.subscribe(("r/#", 1))
    assert sub.pending == []


def test_empty_retained_publish_is_still_routed_to_subscribers(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("r/a", 0))
    pub = connected(broker, "pub")
    pub.publish("r/a", b"", retain=True)
    assert publishes(sub.received()) == [("r/a", b"", 0, False)]


def test_retained_matched_by_wildcard_filters(broker: Broker) -> None:
    pub = connected(broker, "pub")
    for topic in ("r/a", "r/b", "r/a/deep", "other/a", "$SYS/r"):
        pub.publish(topic, topic.encode(), retain=True)
    sub = connected(broker, "sub")
    sub.subscribe(("r/+", 0))
    assert sorted(p[0] for p in publishes(sub.pending)) == ["r/a", "r/b"]
    sub.subscribe(("r/#", 0))
    assert sorted(p[0] for p in publishes(sub.pending)) == ["r/a", "r/a/deep", "r/b"]
    all_ = connected(broker, "all")
    all_.subscribe(("#", 0))
    assert sorted(p[0] for p in publishes(all_.pending)) == ["other/a", "r/a", "r/a/deep", "r/b"]
    assert all(p[3] for p in publishes(all_.pending))


def test_routed_retained_message_to_existing_subscriber_has_retain_0(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("r/#", 1))
    pub = connected(broker, "pub")
    pub.publish("r/a", b"x", qos=1, retain=True)
    assert publishes(sub.received()) == [("r/a", b"x", 1, False)]
    assert broker.retained.get("r/a") is not None


# -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------


def test_invalid_filter_gets_0x80_while_valid_ones_are_granted(broker: Broker) -> None:
    sub = connected(broker, "sub")
    suback = sub.subscribe(("a/#/b", 1), ("ok/+", 1), ("a+", 0), ("x/#", 2), ("", 0))
    assert suback.return_codes == (0x80, 1, 0x80, 2, 0x80)
    assert broker.sessions["sub"].subscriptions == {"ok/+": 1, "x/#": 2}
    pub = connected(broker, "pub")
    pub.publish("ok/1", b"a", qos=1)
    pub.publish("x/y/z", b"b", qos=2)
    assert publishes(sub.received()) == [("ok/1", b"a", 1, False), ("x/y/z", b"b", 2, False)]


def test_resubscribe_replaces_granted_qos(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("t", 2))
    sub.subscribe(("t", 0))
    pub = connected(broker, "pub")
    pub.publish("t", b"x", qos=2)
    assert publishes(sub.received()) == [("t", b"x", 0, False)]


def test_unsubscribe_stops_delivery_and_is_unsubacked(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("t/+", 1), ("u", 0))
    pub = connected(broker, "pub")
    pub.publish("t/1", b"before", qos=1)
    assert publishes(sub.received()) == [("t/1", b"before", 1, False)]
    sub.send(Unsubscribe(42, ("t/+", "never-subscribed")))
    assert sub.received() == [UnsubAck(42)]
    pub.publish("t/1", b"after", qos=1)
    pub.publish("u", b"still", qos=0)
    assert publishes(sub.received()) == [("u", b"still", 0, False)]
    assert broker.sessions["sub"].subscriptions == {"u": 0}


def test_unsubscribe_of_qos0_subscription(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("t", 0))
    sub.send(Unsubscribe(2, ("t",)))
    assert sub.received() == [UnsubAck(2)]
    pub = connected(broker, "pub")
    pub.publish("t", b"x")
    assert sub.received() == []


def test_dollar_sys_not_matched_by_leading_wildcards(broker: Broker) -> None:
    hash_ = connected(broker, "hash")
    hash_.subscribe(("#", 0))
    plus = connected(broker, "plus")
    plus.subscribe(("+/x", 0))
    sys_ = connected(broker, "sys")
    sys_.subscribe(("$SYS/#", 0))
    pub = connected(broker, "pub")
    pub.publish("$SYS/x", b"s")
    assert hash_.received() == []
    assert plus.received() == []
    assert publishes(sys_.received()) == [("$SYS/x", b"s", 0, False)]
    pub.publish("a/x", b"n")
    assert publishes(hash_.received()) == [("a/x", b"n", 0, False)]
    assert publishes(plus.received()) == [("a/x", b"n", 0, False)]
    assert sys_.received() == []


# -- QoS 2 inbound -------------------------------------------------------------------------


def test_qos2_inbound_exactly_once(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("t", 2))
    pub = connected(broker, "pub")
    routed = broker.router.messages_routed

    pub.send(Publish("t", b"first", 2, packet_id=7))
    assert pub.received() == [PubRec(7)]
    pub.send(Publish("t", b"first", 2, dup=True, packet_id=7))
    assert pub.received() == [PubRec(7)]
    assert broker.router.messages_routed == routed + 1
    assert publishes(sub.received()) == [("t", b"first", 2, False)]

    pub.send(PubRel(7))
    assert pub.received() == [PubComp(7)]
    pub.send(Publish("t", b"second", 2, packet_id=7))  # the id is free again: a new message
    assert pub.received() == [PubRec(7)]
    assert broker.router.messages_routed == routed + 2
    assert publishes(sub.received()) == [("t", b"second", 2, False)]


def test_qos2_inbound_duplicate_in_the_same_read(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("t", 0))
    pub = connected(broker, "pub")
    pub.send(Publish("t", b"x", 2, packet_id=3), Publish("t", b"x", 2, dup=True, packet_id=3))
    assert pub.received() == [PubRec(3), PubRec(3)]
    assert publishes(sub.received()) == [("t", b"x", 0, False)]


def test_pubrel_for_unknown_id_gets_pubcomp(broker: Broker) -> None:
    client = connected(broker, "c1")
    client.send(PubRel(99))
    assert client.received() == [PubComp(99)]


def test_qos1_inbound_is_acked_and_routed_each_time(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("t", 0))
    pub = connected(broker, "pub")
    pub.send(Publish("t", b"a", 1, packet_id=5), Publish("t", b"a", 1, dup=True, packet_id=5))
    assert pub.received() == [PubAck(5), PubAck(5)]
    assert len(publishes(sub.received())) == 2  # QoS 1 is at least once


# -- QoS 2 outbound through the broker -----------------------------------------------------


def test_qos2_outbound_handshake(broker: Broker) -> None:
    sub = connected(broker, "sub")
    sub.subscribe(("t", 2))
    pub = connected(broker, "pub")
    pub.publish("t", b"x", qos=2)
    (p,) = sub.received()
    assert p.qos == 2
    sub.send(PubRec(p.packet_id))
    assert sub.received() == [PubRel(p.packet_id)]
    sub.send(PubComp(p.packet_id))
    assert sub.received() == []
    assert broker.sessions["sub"].inflight == {}


# -- ordering and the inflight window ------------------------------------------------------


def test_order_preserved_across_qos1_with_window_of_2() -> None:
    broker = Broker(make_config(max_inflight_messages=2))
    sub = connected(broker, "sub")
    sub.subscribe(("t", 1))
    pub = connected(broker, "pub")
    for n in range(10):
        pub.publish("t", str(n).encode(), qos=1)

    got: list[Publish] = []
    outstanding = sub.received()
    assert len(outstanding) == 2
    while outstanding:
        assert len(outstanding) <= 2
        head = outstanding.pop(0)
        got.append(head)
        sub.send(PubAck(head.packet_id))
        more = sub.received()
        assert len(more) <= 1  # one PUBACK releases at most one message
        outstanding += more
    assert [p.payload for p in got] == [str(n).encode() for n in range(10)]
    assert all(p.qos == 1 and not p.dup for p in got)
    session = broker.sessions["sub"]
    assert session.inflight == {} and not session.out.ram


def test_order_preserved_when_acks_arrive_out_of_order() -> None:
    broker = Broker(make_config(max_inflight_messages=2))
    sub = connected(broker, "sub")
    sub.subscribe(("t", 1))
    pub = connected(broker, "pub")
    for n in range(6):
        pub.publish("t", str(n).encode(), qos=1)
    got: list[Publish] = sub.received()
    while len(got) < 6:
        # ack the newest first
        outstanding = [p for p in got if p.packet_id in broker.sessions["sub"].inflight]
        sub.send(PubAck(outstanding[-1].packet_id))
        got += sub.received()
    assert [p.payload for p in got] == [str(n).encode() for n in range(6)]


# -- more session state across connections -------------------------------------------------


def test_qos2_inbound_state_survives_reconnect_of_persistent_session(broker: Broker) -> None:
    """The ids of QoS 2 messages received but not released are session state (4.1): a
    resent PUBLISH after reconnecting is acknowledged but not routed again."""
    sub = connected(broker, "sub")
    sub.subscribe(("t", 2))
    pub = connected(broker, "pub", clean=False)
    pub.send(Publish("t", b"once", 2, packet_id=11))
    assert pub.received() == [PubRec(11)]
    pub.lose()
    again = Client(broker, "pub-2")
    again.send(Connect("pub", clean_session=False))
    assert again.received() == [ConnAck(True, 0)]
    again.send(Publish("t", b"once", 2, dup=True, packet_id=11))
    assert again.received() == [PubRec(11)]
    again.send(PubRel(11))
    assert again.received() == [PubComp(11)]
    assert publishes(sub.received()) == [("t", b"once", 2, False)]


def test_takeover_of_persistent_session_resends_inflight_with_dup(broker: Broker) -> None:
    sub = connected(broker, "sub", clean=False)
    sub.subscribe(("t", 1))
    pub = connected(broker, "pub")
    pub.publish("t", b"m", qos=1)
    (first,) = sub.received()
    second = Client(broker, "second")
    second.send(Connect("sub", clean_session=False))
    packets = second.received()
    assert packets[0] == ConnAck(True, 0)
    assert [(p.packet_id, p.dup, p.payload) for p in packets[1:]] == [(first.packet_id, True, b"m")]
    assert sub.received() == []  # nothing more goes to the old connection


def test_persistent_reconnect_after_clean_takeover_has_no_session(broker: Broker) -> None:
    first = connected(broker, "dev", clean=True)
    first.subscribe(("t", 1))
    second = Client(broker, "second")
    second.send(Connect("dev", clean_session=False))
    assert second.received() == [ConnAck(False, 0)]
    assert broker.sessions["dev"].subscriptions == {}


def test_offline_queue_bound_drops_oldest() -> None:
    broker = Broker(make_config(persistent_max_queued_messages=3,
                                persistent_overflow_policy="drop_oldest"))
    sub = connected(broker, "sub", clean=False)
    sub.subscribe(("t", 1))
    sub.lose()
    pub = connected(broker, "pub")
    for n in range(5):
        pub.publish("t", str(n).encode(), qos=1)
    assert broker.sessions["sub"].out.dropped == 2
    again = Client(broker, "sub-2")
    again.send(Connect("sub", clean_session=False))
    packets = again.received()
    assert [p.payload for p in packets[1:]] == [b"2", b"3", b"4"]


def test_mqtt31_connack_never_sets_session_present(broker: Broker) -> None:
    first = Client(broker, "a")
    first.send_bytes(Connect("old", clean_session=False, protocol_level=3).encode())
    first.lose()
    second = Client(broker, "b")
    second.send_bytes(Connect("old", clean_session=False, protocol_level=3).encode())
    assert second.conn.data_to_send() == b"\x20\x02\x00\x00"
