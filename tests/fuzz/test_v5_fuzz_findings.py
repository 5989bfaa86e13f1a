"""Findings of the MQTT 5.0 broker fuzzer (``python -m tools.fuzz``, tools/fuzz5.py), each
reduced to a test (each failed before its fix).

Replay the episodes they came from with ``python -m tools.fuzz --seed S --episode E``.
"""

from __future__ import annotations

import math
from typing import Any

from mqttd.broker import Broker
from mqttd.codec import Decoder
from mqttd.codec.packets import (
    PROTOCOL_5,
    Connect,
    Disconnect,
    Packet,
    Publish,
    PubRec,
    Subscribe,
    Subscription,
)
from mqttd.config import Config, Listener, Persistence
from mqttd.connection import Connection
from tools.fuzz import check_decoder


def _broker() -> Broker:
    return Broker(Config(listeners=(Listener(host="127.0.0.1", port=0),),
                         persistence=Persistence(db_file=":memory:")))


def _connect5(broker: Broker, client_id: str, **props: Any) -> Connection:
    conn = broker.new_connection(client_id)
    broker.handle_data(conn, Connect(client_id, protocol_level=PROTOCOL_5,
                                     properties=props or None).encode())
    return conn


def _packets(data: bytes) -> list[tuple[int, Packet]]:
    """(size on the wire, packet) for each level-5 packet in ``data``."""
    out = []
    i = 0
    while i < len(data):
        j, length, shift = i + 1, 0, 0
        while data[j] & 0x80:
            length |= (data[j] & 0x7F) << shift
            shift += 7
            j += 1
        length |= data[j] << shift
        end = j + 1 + length
        [packet] = Decoder(protocol_level=PROTOCOL_5).feed(data[i:end])
        out.append((end - i, packet))
        i = end
    return out


def _send(broker: Broker, conn: Connection, data: bytes) -> None:
    """As the I/O layer: handle the data, answer a protocol error and close."""
    try:
        broker.handle_data(conn, data)
    except Exception as exc:  # MQTTError
        broker.protocol_error(conn, exc)  # type: ignore[arg-type]


def test_reason_strings_stay_within_the_clients_maximum_packet_size() -> None:
    """``python -m tools.fuzz --seed 1 --episode 0`` (DISCONNECT; episode 3: CONNACK 0x8C,
    4: PUBACK 0x10, 44: PUBREC 0x10): "a 58-byte Disconnect(reason_code=129, properties=
    {'reason_string': 'property length 31 runs past the end of the PUBLISH'}) to a client whose
    Maximum Packet Size is 20". The most frequent 5.0 finding (316 of 407 failures in
    ``--inputs 200000 --seed 12``).

    MQTT 5.0 3.1.2.11.4 [MQTT-3.1.2-24/25]: the server must not send a packet larger than the
    client's Maximum Packet Size, and a Reason String (or User Property) must be left out if it
    would make the packet larger than that (3.2.2.3.7 CONNACK, 3.4.2.2.2 PUBACK, 3.5.2.2.2 PUBREC,
    3.14.2.2.3 DISCONNECT). mqttd sends the reason string anyway: the client must treat the
    oversized packet as a protocol error.
    """
    broker = _broker()
    # PUBACK 0x10 "no matching subscribers"
    pub = _connect5(broker, "pub", maximum_packet_size=20)
    _send(broker, pub, Publish("nobody/listens", b"x", 1, packet_id=1).encode(PROTOCOL_5))
    # DISCONNECT 0x94 "topic alias 11 outside 1..10"
    _send(broker, pub, Publish("t", b"", 0, properties={"topic_alias": 11}).encode(PROTOCOL_5))
    # CONNACK 0x8C "authentication method 'x' is not supported"
    auth = broker.new_connection("auth")
    _send(broker, auth, Connect("auth", protocol_level=PROTOCOL_5, properties={
        "maximum_packet_size": 20, "authentication_method": "x"}).encode())
    got = _packets(pub.data_to_send()) + _packets(auth.data_to_send())
    assert [type(p).__name__ for _, p in got] == ["ConnAck", "PubAck", "Disconnect", "ConnAck"]
    oversized = [(size, p) for size, p in got if size > 20]
    assert not oversized


def test_no_pubrel_after_a_pubrec_with_an_error_code() -> None:
    """``python -m tools.fuzz --seed 1 --episode 48`` (also 22, 24, 34, 49): "PubRel(packet_id=2,
    ...) after the client's PubRec(packet_id=2, reason_code=131, ...) ended the exchange".

    MQTT 5.0 4.3.3: the sender of a QoS 2 message sends PUBREL only for a PUBREC with a Reason
    Code below 0x80 [MQTT-4.3.3-4]; a PUBREC of 0x80 or more ends the exchange and frees the
    packet identifier (4.3.3, 4.9: it no longer counts against the Receive Maximum). mqttd
    answers PUBREL and keeps the message in flight (as released), so the client gets a PUBREL
    for an id it has forgotten, and the id and a window slot stay taken until it PUBCOMPs.
    """
    broker = _broker()
    sub = _connect5(broker, "sub")
    broker.handle_data(sub, Subscribe(1, (Subscription("t", 2),)).encode(PROTOCOL_5))
    pub = _connect5(broker, "pub")
    broker.handle_data(pub, Publish("t", b"m", 2, packet_id=9).encode(PROTOCOL_5))
    sub.data_to_send()
    [delivered] = broker.sessions["sub"].inflight
    broker.handle_data(sub, PubRec(delivered, 0x83).encode(PROTOCOL_5))
    assert _packets(sub.data_to_send()) == []  # no PUBREL
    assert broker.sessions["sub"].inflight == {}  # the packet id is free


def test_nothing_is_sent_after_the_servers_disconnect() -> None:
    """``python -m tools.fuzz --seed 1 --episode 40``: "Publish(topic='c', ...) after the
    server's Disconnect(reason_code=148, properties={'reason_string': 'topic alias 3 outside
    1..2'})"; with a store, a PUBREC held for a commit is released after the DISCONNECT too
    (``--seed 12``: "PubRec(...) after the server's Disconnect(...)").

    MQTT 5.0 3.14.4 [MQTT-3.14.4-1]: after sending DISCONNECT the sender must not send any
    more packets on that connection. When mqttd closes a 5.0 connection with a reason code it
    queues the DISCONNECT and asks the I/O layer to flush and close; until the I/O layer has
    done so (``connection_lost``) the session is still attached, and messages routed to it
    are queued after the DISCONNECT, and flushed with it (mqttd/server/stream_task.py's writer sends
    everything in the outbox before closing).
    """
    broker = _broker()
    sub = _connect5(broker, "sub")
    broker.handle_data(sub, Subscribe(1, (Subscription("a", 0),)).encode(PROTOCOL_5))
    sub.data_to_send()
    _send(broker, sub, Publish("t", b"", 0, properties={"topic_alias": 0xFFFF}).encode(PROTOCOL_5))
    assert sub.closing
    pub = _connect5(broker, "pub")
    broker.handle_data(pub, Publish("a", b"late", 0).encode(PROTOCOL_5))
    got = [p for _, p in _packets(sub.data_to_send())]
    assert isinstance(got[0], Disconnect) and got[0].reason_code == 0x94
    assert got[1:] == []  # nothing after the DISCONNECT


def test_a_bridge_connect_at_level_3_1_survives_encode_decode() -> None:
    """``python -m tools.fuzz --seed 1`` (decoder target): "re-encoding the decoded
    Connect(client_id='c0', ..., protocol_level=131) and decoding it again raised
    UnsupportedProtocolVersion: protocol level 131 is not supported".

    The decoder accepts an MQTT 3.1 CONNECT ("MQIsdp") with the bridge bit set on the level
    (0x83, mosquitto's try_private) and keeps the level as 0x83; ``Connect.protocol_name`` is
    "MQIsdp" only for level 3 exactly, so the value encodes as "MQTT" level 0x83, which no
    decoder accepts. (Found with 3.1 inputs, not 5.0 ones: the 3.1.1 half of the decoder target
    can reach it too.)
    """
    data = bytes.fromhex("101000064d51497364708302000a00026330")
    [connect] = Decoder().feed(data)
    assert connect == Connect("c0", keepalive_s=10, protocol_level=0x83)
    assert Decoder().feed(connect.encode()) == [connect]  # UnsupportedProtocolVersion
    check_decoder(data, hang_s=math.inf)  # what the fuzzer checks (not its speed): FuzzFailure


def test_resumed_session_respects_the_new_receive_maximum() -> None:
    """``python -m tools.fuzz --seed 11 --episode 8 --tolerate reason-string-size --tolerate
    pubrel-after-error --tolerate after-disconnect`` (also ``--seed 21``, episode 659):
    "Publish(..., qos=1, dup=True, packet_id=2) makes 2 unacknowledged QoS 1/2 PUBLISHes; the
    client's Receive Maximum is 1, the broker's window 2 (MQTT-3.3.4-9)".

    A 5.0 session has two QoS 1 messages in flight (window 2); its client comes back with
    Receive Maximum 1. The session's window becomes 1, but ``Session.attach`` resends every
    message in flight: two unacknowledged PUBLISHes to a client that allows one [MQTT-3.3.4-9]
    (and ``len(session.inflight) > session.max_inflight``, which the 3.1.1 invariants forbid).
    """
    broker = _broker()
    sub = _connect5(broker, "sub", session_expiry_interval=3600, receive_maximum=2)
    broker.handle_data(sub, Subscribe(1, (Subscription("t", 1),)).encode(PROTOCOL_5))
    pub = _connect5(broker, "pub")
    for packet_id in (1, 2):
        broker.handle_data(pub, Publish("t", b"m", 1, packet_id=packet_id).encode(PROTOCOL_5))
    broker.connection_lost(sub)
    back = broker.new_connection("sub")
    broker.handle_data(back, Connect("sub", clean_session=False, protocol_level=PROTOCOL_5,
                                     properties={"session_expiry_interval": 3600,
                                                 "receive_maximum": 1}).encode())
    resent = [p for _, p in _packets(back.data_to_send()) if isinstance(p, Publish)]
    assert len(resent) <= 1
    session = broker.sessions["sub"]
    # the second stays in flight, held back until the first is acknowledged
    assert len(session.inflight) - len(session._held or ()) <= session.max_inflight


def test_a_second_connect_gets_a_disconnect_reason_code_valid_for_disconnect() -> None:
    """``python -m tools.fuzz --seed 21 --episode 612 --tolerate reason-string-size
    --tolerate pubrel-after-error --tolerate after-disconnect``: "the broker sent bytes that do
    not decode (DISCONNECT with reason code 0x84): e02784251f0022 'protocol level 14 is not
    supported'".

    A connected 5.0 client sends a second CONNECT, with an unknown protocol level. The decoder
    raises UnsupportedProtocolVersion (reason code 0x84) and ``Connection.close`` puts that code
    on a DISCONNECT, but 0x84 is a CONNACK-only code (5.0 table 2-6, 3.14.2.1): the client's
    decoder rejects the packet as malformed. A second CONNECT is a protocol error
    [MQTT-3.1.0-2]: DISCONNECT 0x82.
    """
    broker = _broker()
    conn = _connect5(broker, "c0")
    conn.data_to_send()
    second = bytearray(Connect("c0", protocol_level=PROTOCOL_5).encode())
    second[8] = 14  # the protocol level
    _send(broker, conn, bytes(second))
    data = conn.data_to_send()
    assert data[:1] == b"\xe0"
    [(_, disconnect)] = _packets(data)  # MalformedPacket: DISCONNECT with reason code 0x84
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x82
