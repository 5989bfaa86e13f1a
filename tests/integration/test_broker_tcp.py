"""The broker over real sockets: connection lifecycle, errors, keepalive, takeover."""

from __future__ import annotations

import pytest
import trio

from mqttd.broker import running
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
    Will,
)
from tests.conftest import make_config
from tests.rawclient import RawClient


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    """Poll an observable condition with a bound (no fixed sleeps). The bound is generous:
    it only decides how long a failing test takes, on a loaded machine too."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


async def assert_healthy(port: int) -> None:
    """A fresh pair of clients can still exchange a message."""
    sub, _ = await RawClient.connected(port, "healthy-sub")
    await sub.subscribe("healthy/t", qos=1)
    pub, _ = await RawClient.connected(port, "healthy-pub")
    await pub.publish("healthy/t", b"still serving", qos=1)
    msg = await sub.expect(Publish)
    assert msg.payload == b"still serving"
    await sub.aclose()
    await pub.aclose()


def _publish_raw(topic: bytes, first_byte: int = 0x30) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + b"x"
    return bytes((first_byte, len(body))) + body


CONNECT = Connect("bad-client").encode()

MALFORMED = {
    "remaining length of five bytes": CONNECT + b"\x30\xff\xff\xff\xff\x01",
    "reserved packet type 0": CONNECT + b"\x00\x00",
    "PUBREL with flags 0": CONNECT + b"\x60\x02\x00\x01",
    "SUBSCRIBE with flags 0": CONNECT + b"\x80\x06\x00\x01\x00\x01a\x00",
    "PUBLISH QoS 3": CONNECT + _publish_raw(b"a", 0x36),
    "packet before CONNECT": PingReq().encode(),
    "second CONNECT": CONNECT + CONNECT,
    "bad UTF-8 in topic": CONNECT + _publish_raw(b"a\xff\xfe"),
    "wildcard in topic name": CONNECT + _publish_raw(b"a/+"),
    "NUL in topic name": CONNECT + _publish_raw(b"a\x00b"),
    "CONNACK from a client": CONNECT + ConnAck().encode(),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_bad_input_closes_only_that_connection_and_publishes_will(data):
    async with running(make_config()) as broker:
        with trio.fail_after(10):
            watcher, _ = await RawClient.connected(broker.port, "watcher")
            await watcher.subscribe("wills/#", qos=0)
            bad = await RawClient.open(broker.port)
            will = Will("wills/bad", b"gone", 0, False)
            if data.startswith(CONNECT):
                data = Connect("bad-client", will=will).encode() + data[len(CONNECT):]
            await bad.send(data)
            packets = await bad.expect_closed()
            # at most the CONNACK came back; no error reply exists in MQTT 3.1.1
            assert all(isinstance(p, ConnAck) for p in packets)
            if packets:
                will_msg = await watcher.expect(Publish)
                assert (will_msg.topic, will_msg.payload) == ("wills/bad", b"gone")
            await assert_healthy(broker.port)


async def test_oversized_packet_is_refused_from_its_header():
    async with running(make_config(max_packet_size_bytes=1024)) as broker:
        with trio.fail_after(10):
            client, _ = await RawClient.connected(broker.port, "big")
            # only the fixed header of a 2000-byte PUBLISH: the broker must not wait for the body
            await client.send(b"\x30\xce\x0f")
            assert await client.expect_closed() == []
            assert broker.limits_exceeded == {"packet_size": 1}
            small, _ = await RawClient.connected(broker.port, "small")
            await small.publish("t", b"x" * 900, qos=1)


@pytest.mark.parametrize(
    ("connect", "code"),
    [
        (Connect("", clean_session=False), 0x02),
        (Connect("", protocol_level=3), 0x02),
        (Connect("x", keepalive_s=120), 0x02),
        (b"\x10\x0d\x00\x04MQTT\x06\x02\x00\x3c\x00\x01x", 0x01),  # protocol level 6
        (b"\x10\x0d\x00\x04MQTT\x02\x02\x00\x3c\x00\x01x", 0x01),  # protocol level 2
    ],
    ids=["empty-id-persistent", "empty-id-mqtt31", "keepalive-too-long", "level-6", "level-2"],
)
async def test_refused_connect_gets_connack_code_then_close(connect, code):
    async with running(make_config(max_keepalive_s=60)) as broker:
        with trio.fail_after(10):
            client = await RawClient.open(broker.port)
            await client.send(connect)
            packets = await client.expect_closed()
            assert packets == [ConnAck(False, code)]
            assert broker.sessions == {}


async def test_empty_client_id_with_clean_session_gets_generated_id(broker):
    with trio.fail_after(10):
        _client, connack = await RawClient.connected(broker.port, "")
        assert connack == ConnAck(False, 0)
        (client_id,) = broker.sessions
        assert client_id.startswith("auto-")


async def test_connect_timeout_closes_silent_socket():
    async with running(make_config(connect_timeout_s=0.2)) as broker:
        with trio.fail_after(10):
            client = await RawClient.open(broker.port)
            assert await client.expect_closed() == []
            await wait_until(lambda: broker.limits_exceeded == {"connect_timeout": 1})


async def test_keepalive_expiry_closes_and_publishes_will(broker):
    with trio.fail_after(10):
        watcher, _ = await RawClient.connected(broker.port, "watcher")
        await watcher.subscribe("status/#", qos=1)
        start = trio.current_time()
        silent, _ = await RawClient.connected(
            broker.port, "silent", keepalive_s=1, will=Will("status/silent", b"offline", 1, True)
        )
        assert await silent.expect_closed() == []
        # closed after 1.5 x keepalive, not before
        assert trio.current_time() - start >= 1.5
        will = await watcher.expect(Publish)
        assert (will.topic, will.payload, will.qos) == ("status/silent", b"offline", 1)
        assert broker.retained.get("status/silent").payload == b"offline"


async def test_traffic_keeps_a_connection_alive(broker):
    with trio.fail_after(15):
        # keepalive 2 s: the broker closes after 3 s of silence; pings every 0.25 s leave a
        # wide margin for a loaded machine (the broker runs in this process: a stall of the
        # process longer than the margin would look like silence)
        client, _ = await RawClient.connected(broker.port, "pinger", keepalive_s=2)
        start = trio.current_time()
        while trio.current_time() - start < 4.5:  # well past 1.5 x keepalive
            await trio.sleep(0.25)  # pacing the client's traffic, not synchronising
            await client.send(PingReq())
            assert await client.expect(PingResp) == PingResp()
        assert "pinger" in broker.sessions


async def test_disconnect_discards_the_will(broker):
    with trio.fail_after(10):
        watcher, _ = await RawClient.connected(broker.port, "watcher")
        await watcher.subscribe("status/#")
        polite, _ = await RawClient.connected(
            broker.port, "polite", will=Will("status/polite", b"offline")
        )
        await polite.send(Disconnect())
        assert await polite.expect_closed() == []
        await wait_until(lambda: "polite" not in broker.sessions)
        # a message published after the disconnect arrives first: no will was queued before it
        probe, _ = await RawClient.connected(broker.port, "probe")
        await probe.publish("status/probe", b"probe", qos=1)
        msg = await watcher.expect(Publish)
        assert msg.topic == "status/probe"


async def test_takeover_closes_old_connection_and_publishes_its_will(broker):
    with trio.fail_after(10):
        watcher, _ = await RawClient.connected(broker.port, "watcher")
        await watcher.subscribe("status/#")
        first, _ = await RawClient.connected(
            broker.port, "dev-1", clean_session=False, will=Will("status/dev-1", b"first gone")
        )
        await first.subscribe("cmd/dev-1", qos=1)
        second, connack = await RawClient.connected(broker.port, "dev-1", clean_session=False)
        assert connack.session_present
        assert await first.expect_closed() == []
        will = await watcher.expect(Publish)
        assert will.payload == b"first gone"
        # the session (and its subscription) now belongs to the second connection
        await watcher.publish("cmd/dev-1", b"reboot", qos=1)
        cmd = await second.expect(Publish)
        assert cmd.payload == b"reboot"


async def test_max_connections_refuses_extra_clients():
    async with running(make_config(max_connections=2)) as broker:
        with trio.fail_after(10):
            one, _ = await RawClient.connected(broker.port, "one")
            two, _ = await RawClient.connected(broker.port, "two")
            third = await RawClient.open(broker.port)
            await third.send(Connect("three"))
            # told, then closed: 3.1.1 has no "busy" code, 0x03 Server unavailable
            assert await third.expect_closed() == [ConnAck(False, 3)]
            assert set(broker.sessions) == {"one", "two"}
            await one.aclose()
            # the session goes before the socket is counted out: wait for the count
            server = broker.server
            assert server is not None
            await wait_until(lambda: server.connections == 1 and "one" not in broker.sessions)
            four, _ = await RawClient.connected(broker.port, "four")
            await two.aclose()
            await four.aclose()


async def test_qos2_both_directions(broker):
    with trio.fail_after(10):
        sub, _ = await RawClient.connected(broker.port, "sub")
        await sub.subscribe("q2/#", qos=2)
        pub, _ = await RawClient.connected(broker.port, "pub")
        await pub.send(Publish("q2/a", b"once", 2, packet_id=7))
        assert await pub.expect(PubRec) == PubRec(7)
        # a duplicate before PUBREL is acknowledged again but not delivered again
        await pub.send(Publish("q2/a", b"once", 2, dup=True, packet_id=7))
        assert await pub.expect(PubRec) == PubRec(7)
        await pub.send(PubRel(7))
        assert await pub.expect(PubComp) == PubComp(7)
        msg = await sub.expect(Publish)
        assert (msg.payload, msg.qos) == (b"once", 2)
        await sub.send(PubRec(msg.packet_id))
        assert await sub.expect(PubRel) == PubRel(msg.packet_id)
        await sub.send(PubComp(msg.packet_id))
        # nothing else arrives: the next packet is the reply to our ping
        await sub.send(PingReq())
        assert await sub.expect(PingResp) == PingResp()
        assert broker.sessions["sub"].inflight == {}


async def test_unacknowledged_messages_resent_with_dup_on_resume(broker):
    with trio.fail_after(10):
        sub, _ = await RawClient.connected(broker.port, "resume", clean_session=False)
        await sub.subscribe("r/#", qos=1)
        pub, _ = await RawClient.connected(broker.port, "pub")
        for i in range(3):
            await pub.publish(f"r/{i}", f"m{i}".encode(), qos=1)
        first = [await sub.expect(Publish) for _ in range(3)]
        assert not any(m.dup for m in first)
        await sub.aclose()  # never acknowledged
        await wait_until(lambda: broker.sessions["resume"].connection is None)
        again, connack = await RawClient.connected(broker.port, "resume", clean_session=False)
        assert connack.session_present
        resent = [await again.expect(Publish) for _ in range(3)]
        assert [(m.packet_id, m.payload, m.dup) for m in resent] == [
            (m.packet_id, m.payload, True) for m in first
        ]
        for m in resent:
            await again.send(PubAck(m.packet_id))
        await wait_until(lambda: not broker.sessions["resume"].inflight)


async def test_pipelined_qos1_arrives_complete_and_in_order(broker):
    count = 1000
    with trio.fail_after(20):
        sub, _ = await RawClient.connected(broker.port, "sub")
        await sub.subscribe("seq/#", qos=1)
        pub, _ = await RawClient.connected(broker.port, "pub")
        await pub.send(
            b"".join(Publish("seq/x", str(i).encode(), 1, packet_id=i + 1).encode()
                     for i in range(count))
        )
        received = []
        while len(received) < count:
            packet = await sub.recv()
            if isinstance(packet, Publish):
                received.append(int(packet.payload))
                await sub.send(PubAck(packet.packet_id))
        assert received == list(range(count))
        acks = [await pub.expect(PubAck) for _ in range(count)]
        assert [a.packet_id for a in acks] == list(range(1, count + 1))


async def test_shutdown_closes_clients_and_publishes_wills():
    async with running(make_config()) as broker:
        with trio.fail_after(10):
            client, _ = await RawClient.connected(
                broker.port, "dev", will=Will("status/dev", b"offline", 0, True)
            )
            broker.shutdown()
            assert await client.expect_closed() == []
            assert broker.retained.get("status/dev").payload == b"offline"


async def test_packets_between_two_connects_in_one_segment(broker):
    """CONNECT + SUBSCRIBE + CONNECT in one write: the first two are handled, then the
    connection is closed for the second CONNECT, and the broker keeps serving."""
    from mqttd.codec.packets import SubAck, Subscribe, Subscription

    with trio.fail_after(10):
        client = await RawClient.open(broker.port)
        await client.send(
            Connect("twice").encode()
            + Subscribe(1, (Subscription("a", 1),)).encode()
            + Connect("twice").encode()
        )
        assert await client.expect_closed() == [ConnAck(False, 0), SubAck(1, (1,))]
        await assert_healthy(broker.port)


async def test_an_internal_error_costs_one_connection_not_the_broker(broker):
    from mqttd.codec.packets import PINGREQ

    def broken_handler(conn, packet):
        raise RuntimeError("simulated bug in a packet handler")

    broker._handlers[PINGREQ] = broken_handler
    with trio.fail_after(10):
        victim, _ = await RawClient.connected(broker.port, "victim")
        await victim.send(PingReq())
        assert await victim.expect_closed() == []
        await assert_healthy(broker.port)
