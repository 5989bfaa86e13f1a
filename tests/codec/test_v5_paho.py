"""Cross-check with an independent implementation: a real paho-mqtt 5.0 client over a
loopback socket. What paho sends, our decoder reads as the packets paho was asked to send;
what we encode, paho's client decodes into the reason codes and properties we put in.

The "server" is the test itself on a plain socket (no broker): paho's client runs without
its thread, driven by ``loop()``; every wait has a deadline and nothing sleeps.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqttd.codec import Decoder
from mqttd.codec.packets import (
    PROTOCOL_5,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

TIMEOUT_S = 5.0


class Peer:
    """The server end of one connection: reads packets with our decoder, writes ours."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.decoder = Decoder(accept_v5=True)
        self.pending: list[Packet] = []
        conn.settimeout(TIMEOUT_S)

    def expect(self) -> Packet:
        while not self.pending:
            data = self.conn.recv(65536)
            assert data, "paho closed the connection"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def send(self, packet: Any) -> None:
        self.conn.sendall(packet.encode(PROTOCOL_5))


def run_until(client: mqtt.Client, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        assert time.monotonic() < deadline, "paho did not get there in time"
        client.loop(timeout=0.5)


def paho_props(kind: int, **values: Any) -> PahoProperties:
    props = PahoProperties(kind)
    for name, value in values.items():
        setattr(props, name, value)
    return props


@pytest.fixture
def session() -> Iterator[tuple[mqtt.Client, Peer, list[tuple[str, Any]]]]:
    """A paho 5.0 client connected to a Peer; the list collects paho's callbacks."""
    events: list[tuple[str, Any]] = []
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="paho-5", protocol=mqtt.MQTTv5
    )
    client.on_connect = lambda c, u, flags, code, props: events.append(("connect", (code, props)))
    client.on_subscribe = lambda c, u, mid, codes, props: events.append(("subscribe", (codes,
                                                                                      props)))
    client.on_unsubscribe = lambda c, u, mid, codes, props: events.append(("unsubscribe", codes))
    client.on_publish = lambda c, u, mid, code, props: events.append(("publish", (code, props)))
    client.on_message = lambda c, u, message: events.append(("message", message))
    client.on_disconnect = lambda c, u, flags, code, props: events.append(("disconnect", (code,
                                                                                         props)))
    client.will_set(
        "will/t", b"gone", qos=1, retain=True,
        properties=paho_props(PacketTypes.WILLMESSAGE, WillDelayInterval=30,
                              ContentType="text/plain"),
    )
    client.username_pw_set("user", "secret")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(TIMEOUT_S)
        port = server.getsockname()[1]
        client.connect(
            "127.0.0.1", port, keepalive=30, clean_start=True,
            properties=paho_props(PacketTypes.CONNECT, SessionExpiryInterval=600,
                                  ReceiveMaximum=7, UserProperty=[("k", "v")]),
        )
        conn, _ = server.accept()
    with conn:
        try:
            yield client, Peer(conn), events
        finally:
            sock = client.socket()
            if sock is not None:
                sock.close()


def test_connect_and_connack(session: tuple[mqtt.Client, Peer, list[tuple[str, Any]]]) -> None:
    client, peer, events = session
    assert peer.expect() == Connect(
        "paho-5", True, 30, PROTOCOL_5,
        Will("will/t", b"gone", 1, True, {"will_delay_interval": 30, "content_type": "text/plain"}),
        "user", b"secret",
        {"session_expiry_interval": 600, "receive_maximum": 7, "user_property": [("k", "v")]},
    )
    peer.send(ConnAck(False, 0, {
        "assigned_client_identifier": "given", "topic_alias_maximum": 10, "maximum_qos": 1,
        "retain_available": 0, "server_keep_alive": 20, "user_property": [("a", "b")],
    }))
    run_until(client, lambda: bool(events))
    (kind, (code, props)), = events
    assert kind == "connect"
    assert code.value == 0
    assert props.AssignedClientIdentifier == "given"
    assert props.TopicAliasMaximum == 10
    assert props.MaximumQoS == 1
    assert props.RetainAvailable == 0
    assert props.ServerKeepAlive == 20
    assert props.UserProperty == [("a", "b")]


def _connected(session: tuple[mqtt.Client, Peer, list[tuple[str, Any]]]) -> None:
    client, peer, events = session
    assert isinstance(peer.expect(), Connect)
    peer.send(ConnAck())
    run_until(client, lambda: bool(events))
    events.clear()


def test_subscribe_and_suback(session: tuple[mqtt.Client, Peer, list[tuple[str, Any]]]) -> None:
    client, peer, events = session
    _connected(session)
    _, mid = client.subscribe(
        [("a/#", SubscribeOptions(qos=2, noLocal=True, retainAsPublished=True,
                                  retainHandling=2)),
         ("$share/g/b", SubscribeOptions(qos=1, retainHandling=1))],
        properties=paho_props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42),
    )
    assert peer.expect() == Subscribe(
        mid,
        (Subscription("a/#", 2, True, True, 2), Subscription("$share/g/b", 1, False, False, 1)),
        {"subscription_identifier": 42},
    )
    peer.send(SubAck(mid, (2, 0x9E), {"reason_string": "no shared"}))
    run_until(client, lambda: bool(events))
    (kind, (codes, props)), = events
    assert kind == "subscribe"
    assert [c.value for c in codes] == [2, 0x9E]
    assert props.ReasonString == "no shared"

    events.clear()
    _, mid = client.unsubscribe(["a/#", "x"], properties=paho_props(
        PacketTypes.UNSUBSCRIBE, UserProperty=[("u", "1")]))
    assert peer.expect() == Unsubscribe(mid, ("a/#", "x"), {"user_property": [("u", "1")]})
    peer.send(UnsubAck(mid, (0, 0x11), {}))
    run_until(client, lambda: bool(events))
    assert [c.value for c in events[0][1]] == [0, 0x11]


def test_publish_both_ways(session: tuple[mqtt.Client, Peer, list[tuple[str, Any]]]) -> None:
    client, peer, events = session
    _connected(session)
    info = client.publish("t/1", b"\x00payload", qos=1, retain=True, properties=paho_props(
        PacketTypes.PUBLISH, MessageExpiryInterval=60, ContentType="application/octet-stream",
        ResponseTopic="reply/1", CorrelationData=b"\x01\x02", PayloadFormatIndicator=0,
        UserProperty=[("a", "1"), ("a", "2")],
    ))
    assert peer.expect() == Publish("t/1", b"\x00payload", 1, True, False, info.mid, {
        "message_expiry_interval": 60, "content_type": "application/octet-stream",
        "response_topic": "reply/1", "correlation_data": b"\x01\x02",
        "payload_format_indicator": 0, "user_property": [("a", "1"), ("a", "2")],
    })
    peer.send(PubAck(info.mid, 0x10, {"reason_string": "nobody"}))
    run_until(client, lambda: bool(events))
    (kind, (code, props)), = events
    assert kind == "publish"
    assert code.value == 0x10
    assert props.ReasonString == "nobody"

    # the server delivers: QoS 1 with subscription identifiers; paho acknowledges
    events.clear()
    peer.send(Publish("d/1", b"hello", 1, packet_id=77, properties={
        "subscription_identifier": [5, 300], "user_property": [("x", "y")],
        "message_expiry_interval": 9,
    }))
    run_until(client, lambda: bool(events))
    message = events[0][1]
    assert (message.topic, message.payload, message.qos, message.mid) == ("d/1", b"hello", 1, 77)
    assert message.properties.SubscriptionIdentifier == [5, 300]
    assert message.properties.UserProperty == [("x", "y")]
    assert message.properties.MessageExpiryInterval == 9
    assert peer.expect() == PubAck(77, 0, {})


def test_disconnect_both_ways(session: tuple[mqtt.Client, Peer, list[tuple[str, Any]]]) -> None:
    client, peer, events = session
    _connected(session)
    peer.send(Disconnect(0x8B, {"reason_string": "bye", "server_reference": "other"}))
    run_until(client, lambda: bool(events))
    (kind, (code, props)), = events
    assert kind == "disconnect"
    assert code.value == 0x8B
    assert props.ReasonString == "bye"
    assert props.ServerReference == "other"


def test_client_disconnect_with_reason(
    session: tuple[mqtt.Client, Peer, list[tuple[str, Any]]],
) -> None:
    client, peer, _ = session
    _connected(session)
    client.disconnect(
        reasoncode=mqtt.ReasonCode(PacketTypes.DISCONNECT, identifier=4),
        properties=paho_props(PacketTypes.DISCONNECT, SessionExpiryInterval=0),
    )
    assert peer.expect() == Disconnect(4, {"session_expiry_interval": 0})
