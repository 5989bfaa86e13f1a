"""MQTT 5.0 over real sockets, packet by packet (RawClient at protocol level 5), and 5.0
clients beside 3.1.1 and 3.1 clients on one topic tree.

Every test has a time bound (``trio.fail_after``). Absence ("nothing else arrived") is
checked with a barrier: PINGREQ is answered after everything the broker queued before it
for that connection, so a PINGRESP as the next packet proves nothing was queued before.
Where a test needs time to pass (an expiry, a will delay), it waits for that instant of
the wall clock, bounded, and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

from mqttd.broker import running
from mqttd.codec.packets import (
    PROTOCOL_5,
    PROTOCOL_31,
    PROTOCOL_311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
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
from mqttd.config import Config
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient

TEST_TIMEOUT_S = 15


# -- helpers (shared with test_v5_restart.py) ---------------------------------------------


def v5_config(data_dir: Any = None, *, persistence: dict[str, Any] | None = None,
              **limits: Any) -> Config:
    """make_config with ``persistence`` keys overridden too."""
    config = make_config(data_dir, **limits)
    if persistence:
        config = attrs.evolve(
            config, persistence=attrs.evolve(config.persistence, **persistence)
        )
    return config


async def connect(
    port: int,
    client_id: str = "",
    *,
    level: int = PROTOCOL_5,
    clean_start: bool = True,
    keepalive_s: int = 60,
    will: Will | None = None,
    code: int = 0,
    **properties: Any,
) -> tuple[RawClient, ConnAck]:
    """A RawClient connected at ``level`` with CONNECT ``properties``; asserts CONNACK
    carries ``code``."""
    client = await RawClient.open(port)
    client.protocol_level = client.decoder.protocol_level = level
    await client.send(Connect(
        client_id, clean_start, keepalive_s, level, will, properties=properties or None
    ))
    connack = await client.expect(ConnAck)
    assert connack.return_code == code, connack
    return client, connack


async def subscribe(
    client: RawClient, *subscriptions: Subscription, sub_id: int = 0
) -> tuple[int, ...]:
    """SUBSCRIBE (with a Subscription Identifier if ``sub_id``); the SUBACK's codes."""
    pid = client.packet_id()
    properties = {"subscription_identifier": sub_id} if sub_id else None
    await client.send(Subscribe(pid, subscriptions, properties))
    suback = await _expect_ack(client, SubAck, pid)
    return suback.return_codes


async def publish(
    client: RawClient, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
    **properties: Any,
) -> Packet | None:
    """PUBLISH with ``properties``; for QoS 1 the PUBACK, for QoS 2 the PUBREC (after which
    PUBREL / PUBCOMP complete the flow)."""
    pid = client.packet_id() if qos else 0
    await client.send(Publish(topic, payload, qos, retain, False, pid, properties or None))
    if qos == 0:
        return None
    if qos == 1:
        return await _expect_ack(client, PubAck, pid)
    rec = await _expect_ack(client, PubRec, pid)
    if rec.reason_code < 0x80:
        await client.send(PubRel(pid))
        comp = await _expect_ack(client, PubComp, pid)
        assert comp.reason_code == 0
    return rec


async def _expect_ack(client: RawClient, kind: type, packet_id: int) -> Any:
    """The ``kind`` acknowledgement of ``packet_id``, skipping other packets explicitly:
    they stay queued, in order, to be received next (a client may get its own message
    before or after the PUBACK, retained messages before the SUBACK: MQTT does not order
    acks against the messages routed to a client)."""
    return await client.take(kind, packet_id=packet_id)


def props(packet: Packet) -> dict[str, Any]:
    """A packet's properties ({} when it has none: the decoder gives {} or None)."""
    return getattr(packet, "properties", None) or {}


async def receive(client: RawClient, *, ack: bool = True) -> Publish:
    """The next PUBLISH, acknowledged (QoS 1/2) unless ``ack`` is False. Other packets
    before it are skipped explicitly (they stay queued, see :meth:`RawClient.take`); where
    nothing else may come, a test says so with :func:`nothing_pending`."""
    message: Publish = await client.take(Publish)  # type: ignore[assignment]
    if ack and message.qos == 1:
        await client.send(PubAck(message.packet_id))
    elif ack and message.qos == 2:
        await client.send(PubRec(message.packet_id))
        await _expect_ack(client, PubRel, message.packet_id)
        await client.send(PubComp(message.packet_id))
    return message


async def nothing_pending(client: RawClient) -> None:
    """Barrier: the broker has nothing queued for ``client`` ahead of a PINGRESP."""
    await client.send(PingReq())
    packet = await client.recv()
    assert isinstance(packet, PingResp), f"expected nothing before PINGRESP, got {packet!r}"


async def disconnected_with(client: RawClient) -> int:
    """Wait for the broker to close the connection; the reason code of its DISCONNECT."""
    packets = await client.expect_closed()
    assert packets and isinstance(packets[-1], Disconnect), packets
    return packets[-1].reason_code


async def wall_clock_past(when: float, timeout_s: float = 10.0) -> None:
    """Let wall-clock time pass until ``when`` (for expiries and delays, which are defined
    in time; not used to synchronise with the broker)."""
    await wait_until(lambda: time.time() >= when, timeout_s)


async def until_sessions(broker: Any, predicate: Callable[[dict[str, Any]], bool]) -> None:
    await wait_until(lambda: predicate(broker.sessions))


def assert_expiry_left(left: int, interval: int, sent_at: float) -> None:
    """A forwarded Message Expiry Interval: ``interval`` less the whole seconds the message
    can have waited since ``sent_at`` (measured, so that a slow machine does not fail it),
    never more than ``interval``."""
    waited = math.ceil(time.time() - sent_at)
    assert interval - waited - 1 <= left <= interval, (left, interval, waited)


# -- protocol levels, reason codes, AUTH, server DISCONNECT ---------------------------------


async def test_levels_3_4_and_5_share_one_listener_and_topic_tree(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        clients, publishers = {}, {}
        for level in (PROTOCOL_31, PROTOCOL_311, PROTOCOL_5):
            client, _ = await connect(broker.port, f"level-{level}", level=level)
            clients[level] = client
            assert await subscribe(client, Subscription("mixed/#", 1)) == (1,)
            publishers[level], _ = await connect(broker.port, f"pub-{level}", level=level)
        for publisher_level, publisher in publishers.items():
            await publish(publisher, f"mixed/{publisher_level}", b"from %d" % publisher_level, 1)
            for level, client in clients.items():
                message = await receive(client)
                assert (message.topic, message.payload, message.qos) == (
                    f"mixed/{publisher_level}", b"from %d" % publisher_level, 1
                ), level
        for client in clients.values():
            await nothing_pending(client)
            await client.aclose()


async def test_reason_codes_on_every_ack(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, connack = await connect(broker.port, "acks")
        assert (connack.return_code, connack.session_present) == (0, False)
        assert await subscribe(
            client, Subscription("acks/0", 0), Subscription("acks/1", 1),
            Subscription("acks/2", 2), Subscription("acks/#/bad", 1),
        ) == (0, 1, 2, 0x8F)
        ack = await publish(client, "acks/1", b"q1", 1)
        assert ack.reason_code == 0  # type: ignore[union-attr]
        await receive(client)
        rec = await publish(client, "acks/2", b"q2", 2)
        assert rec.reason_code == 0  # type: ignore[union-attr]
        await receive(client)
        ack = await publish(client, "acks/nobody", b"q1", 1)
        assert ack.reason_code == 0x10  # type: ignore[union-attr]  No matching subscribers
        rec = await publish(client, "acks/nobody", b"q2", 2)
        assert rec.reason_code == 0x10  # type: ignore[union-attr]
        pid = client.packet_id()
        await client.send(Unsubscribe(pid, ("acks/0", "acks/never", "acks/2")))
        unsuback = await client.expect(UnsubAck)
        assert (unsuback.packet_id, unsuback.reason_codes) == (pid, (0, 0x11, 0))
        await client.send(Disconnect(0))
        assert await client.expect_closed() == []


async def test_connect_with_an_authentication_method_is_refused_0x8c(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(
            broker.port, "enhanced", code=0x8C, authentication_method="SCRAM-SHA-1",
            authentication_data=b"client-first",
        )
        assert await client.expect_closed() == []
        assert "enhanced" not in broker.sessions


async def test_auth_after_connect_gets_disconnect_0x82(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "auth-later")
        await client.send(Auth(0x19, {"authentication_method": "SCRAM-SHA-1"}))
        assert await disconnected_with(client) == 0x82


async def test_takeover_sends_disconnect_0x8e_to_the_old_connection(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        old, _ = await connect(broker.port, "twin")
        new, _ = await connect(broker.port, "twin")
        assert await disconnected_with(old) == 0x8E
        await nothing_pending(new)


MALFORMED_AFTER_CONNECT = {
    # a property identifier that does not exist: Malformed Packet
    "unknown property": (bytes((0x30, 7, 0, 1)) + b"a" + bytes((2, 0x7F, 0)) + b"x", 0x81),
    # a client must not send a Subscription Identifier in PUBLISH: Protocol Error
    "subscription id in PUBLISH": (
        Publish("a", b"x", properties={"subscription_identifier": [1]}).encode(PROTOCOL_5),
        0x82,
    ),
    # an empty topic without a topic alias: Protocol Error
    "empty topic, no alias": (Publish("", b"x").encode(PROTOCOL_5), 0x82),
    # a second CONNECT: Protocol Error
    "second CONNECT": (Connect("again", protocol_level=PROTOCOL_5).encode(PROTOCOL_5), 0x82),
}


@pytest.mark.parametrize(
    ("data", "code"), MALFORMED_AFTER_CONNECT.values(), ids=MALFORMED_AFTER_CONNECT.keys()
)
async def test_protocol_errors_get_disconnect_with_a_reason_code(broker, data, code):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "erring")
        await client.send(data)
        assert await disconnected_with(client) == code
        await until_sessions(broker, lambda s: "erring" not in s)


async def test_shutdown_sends_disconnect_0x8b():
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config()) as broker:
            client, _ = await connect(broker.port, "until-shutdown")
            old, _ = await connect(broker.port, "old-protocol", level=PROTOCOL_311)
            broker.shutdown()
            assert await disconnected_with(client) == 0x8B
            assert await old.expect_closed() == []  # 3.1.1 has no DISCONNECT from a server


# -- CONNECT / CONNACK ----------------------------------------------------------------------


async def test_session_expiry_0_ends_the_session_with_the_connection(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, connack = await connect(
            broker.port, "short-lived", clean_start=False, session_expiry_interval=0
        )
        assert "session_expiry_interval" not in (connack.properties or {})
        await subscribe(client, Subscription("short/#", 1))
        await client.aclose()
        await until_sessions(broker, lambda s: "short-lived" not in s)
        client, connack = await connect(broker.port, "short-lived", clean_start=False)
        assert connack.session_present is False


async def test_persistent_session_resumes_with_queued_messages(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, connack = await connect(broker.port, "resumer", session_expiry_interval=60)
        assert connack.session_present is False
        assert "session_expiry_interval" not in (connack.properties or {})  # granted as asked
        await subscribe(sub, Subscription("resume/#", 1))
        await sub.send(Disconnect(0))
        await sub.expect_closed()
        await wait_until(lambda: broker.sessions["resumer"].connection is None)
        pub, _ = await connect(broker.port, "resume-pub")
        for i in range(3):
            await publish(pub, f"resume/{i}", b"m%d" % i, 1)
        assert broker.client_stats("resumer")["queued"] == 3
        sub, connack = await connect(
            broker.port, "resumer", clean_start=False, session_expiry_interval=60
        )
        assert connack.session_present is True
        got = [await receive(sub) for _ in range(3)]
        assert [(m.topic, m.payload) for m in got] == [(f"resume/{i}", b"m%d" % i)
                                                       for i in range(3)]
        # clean start 1 discards it
        sub, connack = await connect(broker.port, "resumer", session_expiry_interval=60)
        assert connack.session_present is False


async def test_session_expires_after_its_interval_on_a_timer(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "expiring", session_expiry_interval=1)
        await subscribe(client, Subscription("expiring/#", 1))
        closed_at = time.time()  # the broker's expiry clock starts later than this
        await client.aclose()
        await wait_until(lambda: "expiring" not in broker.sessions)  # expired on its timer
        assert time.time() - closed_at >= 0.99, "kept for its interval, not dropped at once"
        client, connack = await connect(broker.port, "expiring", clean_start=False)
        assert connack.session_present is False


async def test_session_expiry_can_be_set_on_disconnect(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "longer", session_expiry_interval=1)
        await client.send(Disconnect(0, {"session_expiry_interval": 600}))
        await client.expect_closed()
        await wait_until(lambda: broker.sessions["longer"].connection is None)
        assert broker.sessions["longer"].expiry_s == 600
        # 0 at CONNECT and non-zero at DISCONNECT is a protocol error
        client, _ = await connect(broker.port, "was-zero", session_expiry_interval=0)
        await client.send(Disconnect(0, {"session_expiry_interval": 600}))
        assert await disconnected_with(client) == 0x82


@pytest.mark.parametrize("requested", [100, 0xFFFFFFFF])
async def test_session_expiry_capped_by_configuration(requested):
    config = v5_config(persistence={"session_expiry_s": 5})
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(config) as broker:
            _, connack = await connect(
                broker.port, "capped", session_expiry_interval=requested
            )
            assert connack.properties["session_expiry_interval"] == 5
            assert broker.sessions["capped"].expiry_s == 5
            _, connack = await connect(broker.port, "under-cap", session_expiry_interval=3)
            assert "session_expiry_interval" not in (connack.properties or {})


async def test_client_receive_maximum_limits_unacknowledged_publishes(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "window-2", receive_maximum=2)
        await subscribe(sub, Subscription("window/#", 1))
        pub, _ = await connect(broker.port, "window-pub")
        for i in range(5):
            await publish(pub, "window/t", b"%d" % i, 1)
        first = [await receive(sub, ack=False) for _ in range(2)]
        stats = broker.client_stats("window-2")
        assert (stats["inflight"], stats["queued"], stats["sent"]) == (2, 3, 2)
        await nothing_pending(sub)
        rest = []
        for message in first:
            await sub.send(PubAck(message.packet_id))
        while len(rest) < 3:
            message = await receive(sub, ack=False)
            assert broker.client_stats("window-2")["inflight"] <= 2
            rest.append(message)
            await sub.send(PubAck(message.packet_id))
        assert [m.payload for m in first + rest] == [b"%d" % i for i in range(5)]


async def test_broker_receive_maximum_in_connack_and_exceeding_it_is_0x93():
    # QoS 2 PUBLISHes awaiting PUBREL count against the broker's Receive Maximum
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config(max_receive_messages=2)) as broker:
            client, connack = await connect(broker.port, "eager")
            assert connack.properties["receive_maximum"] == 2
            for pid in (1, 2):
                await client.send(Publish("eager/t", b"x", 2, False, False, pid))
                assert (await client.expect(PubRec)).packet_id == pid
            await client.send(Publish("eager/t", b"x", 2, False, False, 3))
            assert await disconnected_with(client) == 0x93


async def test_broker_maximum_packet_size_in_connack_and_exceeding_it_is_0x95():
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config(max_packet_size_bytes=1024)) as broker:
            client, connack = await connect(broker.port, "big-sender")
            assert connack.properties["maximum_packet_size"] == 1024
            await publish(client, "size/ok", b"x" * 900, 1)
            await client.send(Publish("size/big", b"x" * 2000, 1, False, False, 99))
            assert await disconnected_with(client) == 0x95


async def test_messages_above_the_clients_maximum_packet_size_are_dropped_and_counted(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "small-device", maximum_packet_size=128)
        await subscribe(sub, Subscription("small/#", 1))
        pub, _ = await connect(broker.port, "small-pub")
        for qos in (0, 1):
            await publish(pub, "small/big", b"B" * 200, qos)
            await publish(pub, "small/fits", b"ok %d" % qos, qos)
        for qos in (0, 1):
            message = await receive(sub)
            assert (message.topic, message.payload) == ("small/fits", b"ok %d" % qos)
        await nothing_pending(sub)
        assert broker.client_stats("small-device")["too_large"] == 2
        assert broker.client_stats("small-device")["inflight"] == 0  # never sent nor kept


@pytest.mark.parametrize("aliases", [0, 3])
async def test_topic_alias_maximum_in_connack(aliases):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config(max_topic_aliases=aliases)) as broker:
            _, connack = await connect(broker.port, "aliases")
            assert connack.properties.get("topic_alias_maximum", 0) == aliases


async def test_request_problem_information_0_gets_no_reason_strings_on_acks(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "terse", request_problem_information=0)
        pid = client.packet_id()
        await client.send(Subscribe(pid, (Subscription("terse/#/x", 1),)))
        suback = await client.expect(SubAck)
        assert (suback.return_codes, props(suback)) == ((0x8F,), {})
        ack = await publish(client, "terse/nobody", b"x", 1)
        assert (ack.reason_code, props(ack)) == (0x10, {})  # type: ignore[union-attr]
        pid = client.packet_id()
        await client.send(Unsubscribe(pid, ("terse/never",)))
        unsuback = await client.expect(UnsubAck)
        assert (unsuback.reason_codes, props(unsuback)) == ((0x11,), {})


async def test_empty_client_id_gets_an_assigned_identifier(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, connack = await connect(broker.port, "", clean_start=False,
                                        session_expiry_interval=60)
        assigned = connack.properties["assigned_client_identifier"]
        assert assigned and assigned in broker.sessions
        await subscribe(client, Subscription("assigned/#", 1))
        await client.aclose()
        await wait_until(lambda: broker.sessions[assigned].connection is None)
        # the assigned id resumes the session like any other
        client, connack = await connect(broker.port, assigned, clean_start=False)
        assert connack.session_present is True
        assert "assigned_client_identifier" not in (connack.properties or {})


@pytest.mark.parametrize(("asked", "granted"), [(120, 30), (0, 30), (10, None)])
async def test_server_keep_alive_when_the_configuration_caps_keepalive(asked, granted):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config(max_keepalive_s=30)) as broker:
            _, connack = await connect(broker.port, "keeper", keepalive_s=asked)
            assert (connack.properties or {}).get("server_keep_alive") == granted
            # 3.1.1 cannot be told: a keepalive above the maximum is refused
            await connect(broker.port, "old", level=PROTOCOL_311, keepalive_s=120, code=2)


async def test_user_properties_on_connect_are_accepted(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, connack = await connect(
            broker.port, "chatty", user_property=[("site", "42"), ("site", "43"), ("", "")],
            request_response_information=1,
        )
        assert connack.return_code == 0
        await nothing_pending(client)


# -- PUBLISH properties ---------------------------------------------------------------------


async def test_payload_format_and_content_type_forwarded(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "format-sub")
        await subscribe(sub, Subscription("format/#", 1))
        pub, _ = await connect(broker.port, "format-pub")
        await publish(pub, "format/json", b'{"t": 1}', 1, payload_format_indicator=1,
                      content_type="application/json")
        message = await receive(sub)
        assert message.payload == b'{"t": 1}'
        assert message.properties == {
            "payload_format_indicator": 1, "content_type": "application/json"
        }


async def test_message_expiry_is_honoured_and_decremented_in_the_queue(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "away", session_expiry_interval=60)
        await subscribe(sub, Subscription("expiry/#", 1))
        await sub.aclose()
        await wait_until(lambda: broker.sessions["away"].connection is None)
        pub, _ = await connect(broker.port, "expiry-pub")
        await publish(pub, "expiry/short", b"short", 1, message_expiry_interval=1)
        acked_at = time.time()  # the broker received it before this
        await publish(pub, "expiry/long", b"long", 1, message_expiry_interval=60)
        await publish(pub, "expiry/none", b"none", 1)
        await wall_clock_past(acked_at + 1.2)  # the short one's lifetime is over
        sub, connack = await connect(
            broker.port, "away", clean_start=False, session_expiry_interval=60
        )
        assert connack.session_present
        first = await receive(sub)
        assert first.payload == b"long"  # the short one, sent before it, expired
        assert 1 <= first.properties["message_expiry_interval"] <= 59
        second = await receive(sub)
        assert (second.payload, props(second)) == (b"none", {})
        await nothing_pending(sub)
        assert broker.client_stats("away")["expired"] == 1


async def test_message_expiry_forwarded_to_an_online_subscriber(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "online")
        await subscribe(sub, Subscription("expiry-live/#", 1))
        pub, _ = await connect(broker.port, "expiry-pub")
        sent_at = time.time()
        await publish(pub, "expiry-live/t", b"x", 1, message_expiry_interval=30)
        message = await receive(sub)
        assert_expiry_left(message.properties["message_expiry_interval"], 30, sent_at)


async def test_topic_alias_set_then_used_with_an_empty_topic(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "alias-sub")
        await subscribe(sub, Subscription("alias/#", 1))
        pub, connack = await connect(broker.port, "alias-pub")
        assert connack.properties["topic_alias_maximum"] == 10
        await publish(pub, "alias/in/long/topic", b"set", 1, topic_alias=1)
        await publish(pub, "", b"used", 1, topic_alias=1)
        await publish(pub, "alias/in/other", b"reset", 1, topic_alias=1)
        await publish(pub, "", b"used again", 1, topic_alias=1)
        got = [await receive(sub) for _ in range(4)]
        assert [(m.topic, m.payload) for m in got] == [
            ("alias/in/long/topic", b"set"), ("alias/in/long/topic", b"used"),
            ("alias/in/other", b"reset"), ("alias/in/other", b"used again"),
        ]
        # the alias is the publisher's: the subscriber (none announced) gets full topics
        assert all(props(m) == {} for m in got)


@pytest.mark.parametrize(
    ("topic", "alias", "code"),
    [("alias/t", 0, 0x94), ("alias/t", 11, 0x94), ("", 5, 0x82)],
    ids=["alias 0", "above the maximum", "used before set"],
)
async def test_invalid_topic_alias_disconnects(broker, topic, alias, code):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "bad-alias")
        # alias 0 cannot be encoded by the codec: write the property by hand
        block = bytes((3, 0x23, alias >> 8, alias & 0xFF))
        body = len(topic).to_bytes(2, "big") + topic.encode() + block + b"x"
        await client.send(bytes((0x30, len(body))) + body)
        assert await disconnected_with(client) == code


async def test_topic_aliases_outbound_to_a_client_that_announces_a_maximum(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "alias-taker", topic_alias_maximum=1)
        await subscribe(sub, Subscription("alias-out/#", 1))
        pub, _ = await connect(broker.port, "alias-giver")
        long_topic = "alias-out/site/42/building/7/floor/3/telemetry"
        for i in range(3):
            await publish(pub, long_topic, b"%d" % i, 1)
        await publish(pub, "alias-out/other/topic", b"other", 1)
        got = [await receive(sub) for _ in range(4)]
        assert (got[0].topic, got[0].properties) == (long_topic, {"topic_alias": 1})
        for message in got[1:3]:
            assert (message.topic, message.properties) == ("", {"topic_alias": 1})
        # only one alias allowed: the other topic goes in full, without an alias
        assert (got[3].topic, props(got[3])) == ("alias-out/other/topic", {})
        assert [m.payload for m in got] == [b"0", b"1", b"2", b"other"]


async def test_response_topic_and_correlation_data_forwarded(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        responder, _ = await connect(broker.port, "responder")
        await subscribe(responder, Subscription("rpc/request", 1))
        requester, _ = await connect(broker.port, "requester")
        await subscribe(requester, Subscription("rpc/response/requester", 1))
        await publish(requester, "rpc/request", b"ping?", 1,
                      response_topic="rpc/response/requester", correlation_data=b"\x00id-1")
        request = await receive(responder)
        assert request.properties == {
            "response_topic": "rpc/response/requester", "correlation_data": b"\x00id-1"
        }
        await publish(responder, request.properties["response_topic"], b"pong", 1,
                      correlation_data=request.properties["correlation_data"])
        response = await receive(requester)
        assert (response.payload, response.properties) == (
            b"pong", {"correlation_data": b"\x00id-1"}
        )


async def test_user_properties_forwarded_in_order(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "props-sub")
        await subscribe(sub, Subscription("props/#", 2))
        pub, _ = await connect(broker.port, "props-pub")
        pairs = [("z", "1"), ("a", "2"), ("z", "3"), ("unit", "°C"), ("empty", "")]
        for qos in (0, 1, 2):
            await publish(pub, "props/t", b"x", qos, user_property=pairs)
            message = await receive(sub)
            assert message.properties == {"user_property": pairs}, qos


async def test_subscription_identifiers_attached_to_deliveries(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        sub, _ = await connect(broker.port, "ids")
        await subscribe(sub, Subscription("ids/#", 1), sub_id=7)
        await subscribe(sub, Subscription("ids/+/x", 1), sub_id=268_435_455)
        await subscribe(sub, Subscription("ids/a/+", 0))  # no identifier
        pub, _ = await connect(broker.port, "ids-pub")
        await publish(pub, "ids/a/x", b"three match", 1)
        await publish(pub, "ids/b/x", b"two match", 1)
        await publish(pub, "ids/b", b"one matches", 1)
        await publish(pub, "ids/a/y", b"with and without", 1)
        got = [await receive(sub) for _ in range(4)]
        assert [(m.payload, m.properties["subscription_identifier"]) for m in got] == [
            (b"three match", [7, 268_435_455]),
            (b"two match", [7, 268_435_455]),
            (b"one matches", [7]),
            (b"with and without", [7]),
        ]
        await nothing_pending(sub)


async def test_subscription_identifier_on_retained_messages_sent_on_subscribe(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        pub, _ = await connect(broker.port, "ret-ids-pub")
        await publish(pub, "ret-ids/a", b"kept", 1, retain=True, content_type="text/plain")
        sub, _ = await connect(broker.port, "ret-ids")
        await subscribe(sub, Subscription("ret-ids/#", 1), sub_id=40)
        message = await receive(sub)
        assert (message.payload, message.retain, message.properties) == (
            b"kept", True, {"content_type": "text/plain", "subscription_identifier": [40]}
        )


# -- SUBSCRIBE options ----------------------------------------------------------------------


async def test_no_local(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "talker")
        await subscribe(client, Subscription("chat/#", 1, no_local=True))
        other, _ = await connect(broker.port, "other-talker")
        await publish(client, "chat/room", b"mine", 1)
        await publish(other, "chat/room", b"theirs", 1)
        message = await receive(client)
        assert message.payload == b"theirs"  # its own message, sent first, never came
        await nothing_pending(client)


async def test_retain_as_published(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        keep, _ = await connect(broker.port, "rap-keep")
        await subscribe(keep, Subscription("rap/#", 1, retain_as_published=True))
        clear, _ = await connect(broker.port, "rap-clear")
        await subscribe(clear, Subscription("rap/#", 1))
        pub, _ = await connect(broker.port, "rap-pub")
        await publish(pub, "rap/state", b"on", 1, retain=True)
        await publish(pub, "rap/event", b"e", 1)
        assert [(m.payload, m.retain) for m in [await receive(keep), await receive(keep)]] == [
            (b"on", True), (b"e", False)
        ]
        assert [(m.payload, m.retain) for m in [await receive(clear), await receive(clear)]] == [
            (b"on", False), (b"e", False)
        ]


@pytest.mark.parametrize(("handling", "first", "again"), [(0, 1, 1), (1, 1, 0), (2, 0, 0)])
async def test_retain_handling(broker, handling, first, again):
    """Retained messages are sent on every SUBSCRIBE (0), only when the subscription is new
    (1), never (2)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        pub, _ = await connect(broker.port, "rh-pub")
        await publish(pub, "rh/state", b"retained", 1, retain=True)
        sub, _ = await connect(broker.port, "rh-sub")
        for expected in (first, again):
            assert await subscribe(
                sub, Subscription("rh/#", 1, retain_handling=handling)
            ) == (1,)
            for _ in range(expected):
                message = await receive(sub)
                assert (message.payload, message.retain) == (b"retained", True)
            await nothing_pending(sub)


async def test_shared_subscription_each_message_to_one_member(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        members = []
        for name in ("worker-a", "worker-b"):
            member, _ = await connect(broker.port, name)
            assert await subscribe(member, Subscription("$share/workers/jobs/#", 1),
                                   sub_id=3) == (1,)
            members.append(member)
        plain, _ = await connect(broker.port, "observer")
        await subscribe(plain, Subscription("jobs/#", 1))
        pub, _ = await connect(broker.port, "jobs-pub")
        count = 6
        for i in range(count):
            await publish(pub, f"jobs/{i}", b"%d" % i, 1, user_property=[("job", str(i))])
        assert [(await receive(plain)).payload for _ in range(count)] == [
            b"%d" % i for i in range(count)
        ]
        await wait_until(lambda: sum(
            broker.client_stats(n)["sent"] for n in ("worker-a", "worker-b")) == count)
        got = []
        for member, name in zip(members, ("worker-a", "worker-b"), strict=True):
            for _ in range(broker.client_stats(name)["sent"]):
                message = await receive(member)
                assert message.properties["subscription_identifier"] == [3]
                assert message.properties["user_property"] == [("job", message.topic[5:])]
                got.append(message.payload)
            await nothing_pending(member)
        assert sorted(got) == sorted(b"%d" % i for i in range(count))
        assert all(broker.client_stats(n)["sent"] > 0 for n in ("worker-a", "worker-b"))


async def test_no_local_on_a_shared_subscription_is_a_protocol_error(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "shared-no-local")
        await client.send(Subscribe(1, (Subscription("$share/g/t", 1, no_local=True),)))
        assert await disconnected_with(client) == 0x82


ACL = """\
topic readwrite acl/open/#
topic write acl/drop/#
"""


@pytest.fixture
async def acl_broker(tmp_path):
    from tests.security.test_auth import security_config

    path = tmp_path / "acl"
    path.write_text(ACL)
    async with running(security_config(acl_file=str(path))) as broker:
        yield broker


async def test_suback_reason_codes_with_an_acl(acl_broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(acl_broker.port, "acl-v5")
        assert await subscribe(
            client, Subscription("acl/open/#", 2), Subscription("acl/secret/#", 1),
            Subscription("acl/open/#/bad", 0),
        ) == (2, 0x87, 0x8F)
        old, _ = await connect(acl_broker.port, "acl-v311", level=PROTOCOL_311)
        assert await subscribe(
            old, Subscription("acl/open/#", 1), Subscription("acl/secret/#", 1),
            Subscription("acl/open/#/bad", 0),
        ) == (1, 0x80, 0x80)  # 3.1.1 has one failure code


@pytest.mark.parametrize("qos", [1, 2])
async def test_puback_0x87_when_the_acl_denies_a_publish(acl_broker, qos):
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(acl_broker.port, "acl-pub")
        await subscribe(client, Subscription("acl/open/#", 1))
        ack = await publish(client, "acl/secret/x", b"denied", qos)
        assert ack.reason_code == 0x87  # type: ignore[union-attr]
        ack = await publish(client, "acl/drop/x", b"nobody may read it", qos)
        assert ack.reason_code == 0x10  # type: ignore[union-attr]
        ack = await publish(client, "acl/open/x", b"allowed", qos)
        assert ack.reason_code == 0  # type: ignore[union-attr]
        assert (await receive(client)).payload == b"allowed"
        assert acl_broker.stats()["acl_denied_publish"] == 1


# -- flow control ---------------------------------------------------------------------------


async def test_quota_exceeded_for_too_many_qos2_awaiting_pubrel():
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running(make_config(max_inbound_qos2=2)) as broker:
            client, _ = await connect(broker.port, "qos2-v5")
            for pid in (1, 2, 3):
                await client.send(Publish("q2/t", b"x", 2, False, False, pid))
            codes = [(await client.expect(PubRec)).reason_code for _ in range(3)]
            assert codes == [0x10, 0x10, 0x97]
            await nothing_pending(client)  # still connected
            await client.send(PubRel(1))
            assert (await client.expect(PubComp)).packet_id == 1
            await client.send(Publish("q2/t", b"x", 2, False, False, 3))
            assert (await client.expect(PubRec)).reason_code == 0x10  # room again
            # 3.1.1 has no way to refuse one message: the client is disconnected
            old, _ = await connect(broker.port, "qos2-v311", level=PROTOCOL_311)
            for pid in (1, 2, 3):
                await old.send(Publish("q2/t", b"x", 2, False, False, pid))
            assert [type(p) for p in await old.expect_closed()] == [PubRec, PubRec]


# -- will delay -----------------------------------------------------------------------------


async def watch_wills(port: int) -> RawClient:
    watcher, _ = await connect(port, "will-watcher")
    await subscribe(watcher, Subscription("wills/#", 1))
    return watcher


def delayed_will(delay_s: int, payload: bytes = b"gone") -> Will:
    return Will("wills/device", payload, 1, False,
                {"will_delay_interval": delay_s, "content_type": "text/plain"})


async def test_will_waits_for_its_delay(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        device, _ = await connect(broker.port, "delayed", will=delayed_will(2),
                                  session_expiry_interval=60)
        lost_at = time.time()  # the broker sees the connection lost after this
        await device.aclose()
        will = await receive(watcher)
        assert time.time() - lost_at >= 1.99, "not at once: after the delay"
        assert (will.topic, will.payload, will.properties) == (
            "wills/device", b"gone", {"content_type": "text/plain"}
        )


async def test_will_delay_is_cut_short_by_the_end_of_the_session(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        device, _ = await connect(broker.port, "short-session", will=delayed_will(600),
                                  session_expiry_interval=1)
        lost_at = time.time()  # the broker sees the connection lost after this
        await device.aclose()
        # (the 600 s delay is far beyond this test's time bound)
        will = await receive(watcher)
        assert will.payload == b"gone"
        assert time.time() - lost_at >= 0.99, "not before the session ended"
        assert "short-session" not in broker.sessions


async def test_will_with_delay_and_session_expiry_0_is_published_at_once(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        device, _ = await connect(broker.port, "no-session", will=delayed_will(600))
        await device.aclose()
        assert (await receive(watcher)).payload == b"gone"


async def test_will_cancelled_by_a_reconnect_within_the_delay(broker):
    """MQTT 5.0 3.1.3.2.2: a new connection to the session before the Will Delay Interval
    has passed means the will is never sent; not even when the session ends later, which
    publishes a will still waiting. The delay is long (no race with a slow reconnect); the
    session's end comes from its own short expiry, observed."""
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        device, _ = await connect(broker.port, "comes-back", will=delayed_will(600),
                                  session_expiry_interval=60)
        await device.aclose()
        await wait_until(lambda: broker.sessions["comes-back"].connection is None)
        device, connack = await connect(broker.port, "comes-back", clean_start=False,
                                        session_expiry_interval=1)
        assert connack.session_present
        await device.aclose()  # no will on this connection; the session ends in 1 s
        await wait_until(lambda: "comes-back" not in broker.sessions)
        await nothing_pending(watcher)


async def test_will_delay_0_is_published_at_once(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        device, _ = await connect(broker.port, "at-once", will=delayed_will(0),
                                  session_expiry_interval=60)
        await device.aclose()
        will = await receive(watcher)
        assert will.payload == b"gone"
        assert broker.sessions["at-once"].connection is None  # the session lives on


async def test_takeover_publishes_an_undelayed_will_and_cancels_a_delayed_one(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        first, _ = await connect(broker.port, "taken", will=delayed_will(0, b"now"),
                                 session_expiry_interval=60)
        second, _ = await connect(broker.port, "taken", clean_start=False,
                                  will=delayed_will(600, b"later"), session_expiry_interval=60)
        assert (await receive(watcher)).payload == b"now"
        assert await disconnected_with(first) == 0x8E
        third, _ = await connect(broker.port, "taken", clean_start=False,
                                 session_expiry_interval=1)
        assert await disconnected_with(second) == 0x8E
        # the delayed will was cancelled, not merely still waiting (600 s): the end of the
        # session, which would publish a waiting will, sends nothing
        await third.aclose()
        await until_sessions(broker, lambda s: "taken" not in s)
        await nothing_pending(watcher)


@pytest.mark.parametrize(("reason", "will_sent"), [(0x04, True), (0x00, False)])
async def test_disconnect_with_will_message_0x04(broker, reason, will_sent):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher = await watch_wills(broker.port)
        device, _ = await connect(broker.port, "leaving", will=delayed_will(0))
        await device.send(Disconnect(reason))
        assert await device.expect_closed() == []
        await until_sessions(broker, lambda s: "leaving" not in s)
        if will_sent:
            assert (await receive(watcher)).payload == b"gone"
        await nothing_pending(watcher)


# -- mixed versions -------------------------------------------------------------------------


async def test_request_response_between_a_5_0_requester_and_a_3_1_1_responder(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        requester, _ = await connect(broker.port, "req-v5")
        await subscribe(requester, Subscription("svc/reply/req-v5", 1))
        old, _ = await connect(broker.port, "responder-v311", level=PROTOCOL_311)
        await subscribe(old, Subscription("svc/request", 1))
        new, _ = await connect(broker.port, "responder-v5")
        await subscribe(new, Subscription("svc/request", 1))
        await publish(requester, "svc/request", b"what time?", 1,
                      response_topic="svc/reply/req-v5", correlation_data=b"42",
                      user_property=[("trace", "t1")])
        plain = await receive(old)  # decoded as 3.1.1: no properties had a place to go
        assert (plain.topic, plain.payload, props(plain)) == (
            "svc/request", b"what time?", {}
        )
        request = await receive(new)
        assert request.properties == {
            "response_topic": "svc/reply/req-v5", "correlation_data": b"42",
            "user_property": [("trace", "t1")],
        }
        # the 3.1.1 responder answers on a topic it knows; no correlation data
        await old.publish("svc/reply/req-v5", b"noon (v3.1.1)", qos=1)
        answer = await receive(requester)
        assert (answer.payload, props(answer)) == (b"noon (v3.1.1)", {})
        # the 5.0 responder answers on the response topic with the correlation data
        await publish(new, request.properties["response_topic"], b"noon (v5)", 1,
                      correlation_data=request.properties["correlation_data"])
        answer = await receive(requester)
        assert (answer.payload, answer.properties) == (b"noon (v5)", {"correlation_data": b"42"})


@pytest.mark.parametrize("old_level", [PROTOCOL_311, PROTOCOL_31])
async def test_old_and_new_subscribers_on_one_filter(broker, old_level):
    with trio.fail_after(TEST_TIMEOUT_S):
        old, _ = await connect(broker.port, "old-sub", level=old_level)
        await subscribe(old, Subscription("tree/+/state", 2))
        new, _ = await connect(broker.port, "new-sub")
        await subscribe(new, Subscription("tree/+/state", 2), sub_id=12)
        pub5, _ = await connect(broker.port, "new-pub")
        sent = {"content_type": "text/plain", "payload_format_indicator": 1,
                "user_property": [("a", "1"), ("b", "2")], "message_expiry_interval": 60}
        pub_old, _ = await connect(broker.port, "old-pub", level=old_level)
        for qos in (0, 1, 2):
            sent_at = time.time()
            await publish(pub5, "tree/5/state", b"v5 %d" % qos, qos, retain=True, **sent)
            message = await receive(old)
            assert (message.payload, message.qos, props(message)) == (
                b"v5 %d" % qos, qos, {}
            )
            message = await receive(new)
            assert (message.payload, message.qos) == (b"v5 %d" % qos, qos)
            got = dict(message.properties)
            assert_expiry_left(got.pop("message_expiry_interval"), 60, sent_at)
            assert got == {**{k: v for k, v in sent.items() if k != "message_expiry_interval"},
                           "subscription_identifier": [12]}
            await publish(pub_old, "tree/3/state", b"v3 %d" % qos, qos)
            assert (await receive(old)).payload == b"v3 %d" % qos
            message = await receive(new)
            assert (message.payload, message.properties) == (
                b"v3 %d" % qos, {"subscription_identifier": [12]}
            )
        # the retained 5.0 message reaches a late 3.1.1 subscriber without properties
        late, _ = await connect(broker.port, "late-old", level=old_level)
        await subscribe(late, Subscription("tree/5/state", 1))
        message = await receive(late)
        assert (message.payload, message.retain, props(message)) == (b"v5 2", True, {})


async def test_will_of_a_5_0_client_reaches_a_3_1_1_watcher_without_properties(broker):
    with trio.fail_after(TEST_TIMEOUT_S):
        watcher, _ = await connect(broker.port, "old-watcher", level=PROTOCOL_311)
        await subscribe(watcher, Subscription("wills/#", 1))
        device, _ = await connect(broker.port, "v5-device", will=delayed_will(0))
        await device.aclose()
        will = await receive(watcher)
        assert (will.topic, will.payload, props(will)) == ("wills/device", b"gone", {})


async def test_keepalive_expiry_is_told_with_disconnect_0x8d(broker):
    """A 5.0 client silent for 1.5 x its keepalive gets DISCONNECT 0x8D before the close."""
    with trio.fail_after(TEST_TIMEOUT_S):
        client, _ = await connect(broker.port, "sleepy", keepalive_s=1)
        got = await client.expect_closed(timeout_s=10)
        assert [(type(p).__name__, getattr(p, "reason_code", None)) for p in got] == [
            ("Disconnect", 0x8D)
        ]
