"""The reactor that serves plain TCP connections (mqttd/server/reactor.py), through real
sockets: one deadline heap for many keepalives, a publisher paused by flow control that
hangs up, output larger than the socket takes, many connections in one turn."""

from __future__ import annotations

import socket

import trio

from mqttd.broker import running
from mqttd.codec.packets import ConnAck, Connect, PingReq, PingResp, Publish, Will
from mqttd.server.tcp import NOTSENT_LOWAT_BYTES, TCP_NOTSENT_LOWAT
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient


async def test_keepalives_expire_each_on_their_own_among_many(broker):
    """Silent clients are closed after 1.5 x their keepalive; a client of the same
    keepalive that keeps talking is not (its deadline moves with every packet while the
    heap entry stays where it was)."""
    with trio.fail_after(20):
        silent = [
            (await RawClient.connected(broker.port, f"silent-{i}", keepalive_s=1))[0]
            for i in range(10)
        ]
        talker, _ = await RawClient.connected(broker.port, "talker", keepalive_s=2)
        closed: list[int] = []

        async def wait_closed(index: int, client: RawClient) -> None:
            assert await client.expect_closed(timeout_s=15) == []
            closed.append(index)

        async with trio.open_nursery() as nursery:
            for index, client in enumerate(silent):
                nursery.start_soon(wait_closed, index, client)
            # 2 x keepalive of pings every 0.25 s (pacing the client's traffic, not
            # synchronising): the broker allows 3 s of silence
            start = trio.current_time()
            while trio.current_time() - start < 4.0:
                await trio.sleep(0.25)
                await talker.send(PingReq())
                assert await talker.expect(PingResp) == PingResp()
        assert sorted(closed) == list(range(10))
        assert broker.sessions["talker"].connection is not None
        assert not any(f"silent-{i}" in broker.sessions for i in range(10))


async def test_a_paused_publisher_that_hangs_up_is_read_to_the_end():
    """A publisher held by a subscriber that stopped reading hangs up: once the subscriber
    reads again, what the publisher sent before hanging up is delivered in order, then
    its will (it sent no DISCONNECT)."""
    payload = b"x" * 1024
    config = make_config(
        output_high_watermark_bytes=65_536, stalled_output_timeout_s=60.0,
        max_queued_messages=100_000, qos0_buffer_bytes=1 << 30,
    )
    async with running(config) as broker:
        with trio.fail_after(30):
            sub, _ = await RawClient.connected(broker.port, "sub")
            await sub.subscribe("load/#", "status/#")
            pub, _ = await RawClient.connected(
                broker.port, "pub", will=Will("status/pub", b"gone")
            )
            sent = 0

            async def publish() -> None:
                nonlocal sent
                while True:
                    await pub.send(Publish("load/x", b"%08d" % sent + payload))
                    sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                # the subscriber reads nothing: its output backs up, the publisher is paused
                await wait_until(lambda: broker.stats()["read_pauses"] >= 1, timeout_s=20)
                nursery.cancel_scope.cancel()
            assert "pub" in broker.sessions
            await trio.aclose_forcefully(pub.stream)  # hangs up while paused
            numbers = []
            while True:
                packet = await sub.expect(Publish, timeout_s=20)
                if packet.topic == "status/pub":
                    assert packet.payload == b"gone"
                    break
                numbers.append(int(packet.payload[:8]))
            # everything the publisher's socket took arrived, in order, before the will (the
            # send cancelled midway may have gone whole, or in part: dropped unfinished)
            assert numbers == list(range(len(numbers)))
            assert sent <= len(numbers) <= sent + 1
            await wait_until(lambda: "pub" not in broker.sessions)


async def test_a_message_larger_than_the_socket_takes_arrives_whole(broker):
    """A 1,000,000-byte message to a subscriber: the socket takes part of it, the rest
    waits for the socket to be writable; other clients are served meanwhile."""
    big = bytes(range(250)) * 4000  # (under the default 1 MiB packet limit)
    with trio.fail_after(30):
        sub, _ = await RawClient.connected(broker.port, "big-sub")
        await sub.subscribe("big/#")
        other, _ = await RawClient.connected(broker.port, "other")
        pub, _ = await RawClient.connected(broker.port, "big-pub")
        await pub.send(Publish("big/1", big))
        # the subscriber has not read yet: another client is answered meanwhile
        await other.send(PingReq())
        assert await other.expect(PingResp) == PingResp()
        packet = await sub.expect(Publish, timeout_s=20)
        assert packet.topic == "big/1"
        assert packet.payload == big


async def test_many_connections_at_once_are_all_served(broker):
    """300 clients connect at once and each publishes one message: a subscriber gets all
    300 (the reactor serves many ready connections per turn)."""
    count = 300
    with trio.fail_after(30):
        sub, _ = await RawClient.connected(broker.port, "many-sub")
        await sub.subscribe("many/#")
        clients: list[RawClient] = []

        async def connect_and_publish(index: int) -> None:
            client, _ = await RawClient.connected(broker.port, f"many-{index}")
            await client.send(Publish(f"many/{index}", b"%d" % index))
            clients.append(client)

        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(connect_and_publish, index)
        got = sorted([int((await sub.expect(Publish)).payload) for _ in range(count)])
        assert got == list(range(count))
        for client in clients:
            await trio.aclose_forcefully(client.stream)
        await wait_until(lambda: not any(f"many-{i}" in broker.sessions for i in range(count)))


async def test_an_internal_error_costs_one_connection(broker, monkeypatch, caplog):
    """A bug met while serving one client (here: the engine raising when that client's
    output was sent) closes that connection and is logged; the others go on."""
    output_sent = type(broker).output_sent

    def failing(self, conn, size):
        if conn.client_id == "victim":
            raise RuntimeError("a bug")
        output_sent(self, conn, size)

    monkeypatch.setattr(type(broker), "output_sent", failing)
    with trio.fail_after(10):
        other = await RawClient.open(broker.port)
        await other.send(Connect("other", True, 60))
        assert (await other.expect(ConnAck)).return_code == 0
        victim = await RawClient.open(broker.port)
        await victim.send(Connect("victim", True, 60))
        # closed (the CONNACK had gone to the socket when the engine raised)
        assert [type(p) for p in await victim.expect_closed()] == [ConnAck]
        await other.send(PingReq())
        assert await other.expect(PingResp) == PingResp()
    assert "client victim" in caplog.text and "internal error" in caplog.text


async def test_connections_have_no_nagle_delay_and_a_small_unsent_limit(broker):
    """Each accepted connection has TCP_NODELAY (no Nagle delay on small replies) and
    TCP_NOTSENT_LOWAT 16 KiB (what a slow reader has not taken stays in the broker's
    counted buffers), inherited from the listening socket."""
    with trio.fail_after(10):
        client, _ = await RawClient.connected(broker.port, "opts")
        (served,) = broker.server.reactor.clients.values()
        sock = served.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT_BYTES
        await client.send(PingReq())
        assert await client.expect(PingResp) == PingResp()
