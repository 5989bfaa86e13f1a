"""The trio NATS client against real nats-server processes (1 server, or a cluster of 3)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from mqttd.cluster import nats_protocol as proto
from mqttd.cluster.nats_client import NatsClient
from mqttd.cluster.nats_protocol import Msg
from mqttd.cluster.nats_values import (
    ClientClosedError,
    ConnectionLostError,
    MaxPayloadError,
    NoRespondersError,
    NoServersError,
    RequestTimeout,
    ServerAddress,
    ServerError,
)
from tests.cluster.natsharness import NatsCluster, free_ports, nats_servers

TIMEOUT_S = 10


def echo(nc: NatsClient) -> Callable[[Msg], None]:
    """A callback responder: replies ``re:<payload>`` with the request's headers."""

    def on_msg(msg: Msg) -> None:
        if msg.reply:
            nc.publish_nowait(msg.reply, b"re:" + msg.payload, headers=msg.headers)

    return on_msg


async def request_until_answered(nc: NatsClient, subject: str, payload: bytes) -> Msg:
    """Request until someone answers: after a subscription moves between servers, its
    interest reaches the other servers over the routes a little later (no responders
    until then). Bounded by the caller's deadline."""
    while True:
        try:
            return await nc.request(subject, payload, timeout_s=1)
        except NoRespondersError:
            await trio.sleep(0.01)


async def test_publish_subscribe_headers_and_queue_groups(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(nats1.urls, name="t") as nc:
            assert nc.server_info["version"] == "2.9.10" or nc.server_info["version"]
            sub = await nc.subscribe("t.>")
            g1 = await nc.subscribe("q.a", "workers")
            g2 = await nc.subscribe("q.a", "workers")
            await nc.publish("t.a", b"plain")
            await nc.publish("t.b", b"with headers", reply="r.1",
                             headers={"Mqttd-Topic": "a/b", "Multi": ["1", "2"]})
            await nc.publish("t.c", b"", headers={})
            for i in range(10):
                await nc.publish("q.a", b"%d" % i)
            await nc.flush()
            assert await sub.next_msg() == Msg("t.a", sub.sid, None, b"plain")
            second = await sub.next_msg()
            assert (second.subject, second.reply, second.payload) == ("t.b", "r.1",
                                                                       b"with headers")
            assert second.headers == {"Mqttd-Topic": ["a/b"], "Multi": ["1", "2"]}
            assert second.header("Multi") == "1"
            third = await sub.next_msg()
            assert (third.payload, third.headers) == (b"", {})
            got = [g.next_msg_nowait().payload for g in (g1, g2) for _ in range(g.pending)]
            assert sorted(got, key=int) == [b"%d" % i for i in range(10)]  # each exactly once


async def test_request_reply_pipelined_and_errors(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(nats1.urls) as server, NatsClient.connect(
            nats1.urls
        ) as nc:
            await server.subscribe("svc.echo", callback=echo(server))
            await server.subscribe("svc.silent")
            reply = await nc.request("svc.echo", b"hi", headers={"K": "v"})
            assert (reply.payload, reply.headers) == (b"re:hi", {"K": ["v"]})
            pending = [nc.request_nowait("svc.echo", b"%d" % i) for i in range(200)]
            replies = [await p.wait() for p in pending]
            assert [r.payload for r in replies] == [b"re:%d" % i for i in range(200)]
            with pytest.raises(NoRespondersError):
                await nc.request("nobody.here", b"")
            with pytest.raises(RequestTimeout):
                await nc.request("svc.silent", b"", timeout_s=0.2)
            assert nc._requests == {}  # nothing left behind


async def test_slow_subscription_drops_are_counted_and_logged(
    nats1: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(nats1.urls) as nc:
            slow = await nc.subscribe("slow", capacity=4)
            marker = await nc.subscribe("marker")
            with caplog.at_level(logging.WARNING, logger="mqttd.cluster.nats"):
                for i in range(20):
                    await nc.publish("slow", b"%d" % i)
                await nc.publish("marker", b"")
                await marker.next_msg()  # delivered after the 20, in order
            assert (slow.delivered, slow.dropped, nc.stats.dropped_msgs) == (4, 16, 16)
            assert [(await slow.next_msg()).payload for _ in range(4)] == [b"0", b"1", b"2",
                                                                            b"3"]
            drops = [r for r in caplog.records if "slow NATS subscription" in r.message]
            assert len(drops) == 1  # rate-limited: one line, not sixteen
            # it reads again: nothing is lost any more
            await nc.publish("slow", b"again")
            assert (await slow.next_msg()).payload == b"again"


async def test_max_payload_is_checked_before_sending(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(nats1.urls) as nc:
            assert nc.max_payload == 1024 * 1024
            sub = await nc.subscribe("big")
            await nc.publish("big", b"x" * nc.max_payload)
            assert len((await sub.next_msg()).payload) == nc.max_payload
            with pytest.raises(MaxPayloadError):
                await nc.publish("big", b"x" * (nc.max_payload - 10), headers={"K": "v"})
            await nc.flush()  # still connected


async def test_unsubscribe_close_and_drain(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(nats1.urls) as nc:
            sub = await nc.subscribe("a")
            await nc.publish("a", b"1")
            await nc.flush()
            await sub.unsubscribe()
            await nc.publish("a", b"2")
            await nc.flush()
            assert [m.payload async for m in sub] == [b"1"]  # buffered, then the end
            kept = await nc.subscribe("b")
            await nc.publish("b", b"x")
            await nc.drain()
            assert [m.payload async for m in kept] == [b"x"]
            with pytest.raises(ClientClosedError):
                await nc.publish("b", b"y")
            assert nc.closed and not nc.is_connected


async def test_authorization(tmp_path: Path) -> None:
    extra = 'authorization { user: "mqttd", password: "s3cret" }'
    with trio.fail_after(TIMEOUT_S):
        async with nats_servers(tmp_path, 1, extra_config=extra) as nats:
            url = nats.urls[0]
            async with NatsClient.connect(url, user="mqttd", password="s3cret") as nc:
                await nc.flush()
            async with NatsClient.connect(url.replace("://", "://mqttd:s3cret@")) as nc:
                await nc.flush()
            with pytest.raises(ServerError, match="Authorization Violation"):
                async with NatsClient.connect(url, user="mqttd", password="wrong"):
                    pass


async def test_no_server_listening() -> None:
    (port,) = free_ports(1)
    with trio.fail_after(TIMEOUT_S), pytest.raises(NoServersError, match=str(port)):
        async with NatsClient.connect(f"nats://127.0.0.1:{port}"):
            pass


async def test_wait_for_servers_keeps_trying_the_first_connection() -> None:
    """With ``wait_for_servers``, ``run`` does not raise while no server answers: it
    records why and tries again until one listens; subscriptions made meanwhile go out
    with the handshake. (The server here is a minimal fake on a port that was free.)"""
    (port,) = free_ports(1)
    received = bytearray()
    connected = trio.Event()

    async def fake_server(stream: trio.SocketStream) -> None:
        await stream.send_all(proto.encode_info({"headers": True, "max_payload": 1 << 20}))
        while b"PING\r\n" not in received:
            received.extend(await stream.receive_some(65536))
        await stream.send_all(proto.PONG)
        connected.set()
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nc = NatsClient.create(f"nats://127.0.0.1:{port}", wait_for_servers=True,
                                   reconnect_backoff_s=0.01, reconnect_backoff_max_s=0.05)
            nursery.start_soon(nc.run)
            nc.subscribe_nowait("early")
            while nc.last_error is None:
                await trio.sleep(0.01)
            assert not nc.is_connected and str(port) in nc.last_error
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, fake_server, listeners)
            await nc.wait_connected()
            await connected.wait()
            assert b"SUB early 2\r\n" in received and nc.pending_bytes == 0
            nursery.cancel_scope.cancel()


async def test_reconnect_after_kill_moves_to_another_server(nats3: NatsCluster) -> None:
    """kill -9 of the server the client is on: it moves to the next one, sends its SUBs
    again (channel and callback subscriptions work), and a request pending at the kill
    fails with ConnectionLostError."""
    n1, _, n3 = nats3.urls
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(nats3.urls, name="mover") as mover, NatsClient.connect(
            n3, name="other"
        ) as other:
            assert await mover.wait_connected() == n1
            events = await mover.subscribe("events")
            await mover.subscribe("svc", callback=echo(mover))
            await other.subscribe("silent")
            assert (await request_until_answered(other, "svc", b"1")).payload == b"re:1"
            await other.flush()
            pending = mover.request_nowait("silent", b"", timeout_s=TIMEOUT_S)
            await mover.flush()

            nats3.by_url(n1).kill()
            with pytest.raises(ConnectionLostError):
                await pending.wait()
            url = await mover.wait_connected(min_connects=2)
            assert url != n1 and mover.stats.reconnects == 1

            # interest for "events" went out before "svc" on the same connection and route
            assert (await request_until_answered(other, "svc", b"2")).payload == b"re:2"
            await other.publish("events", b"after")
            assert (await events.next_msg()).payload == b"after"


async def test_keepalive_detects_a_stopped_server(nats3: NatsCluster) -> None:
    """SIGSTOP: the socket stays open and nothing answers. Unanswered PINGs make the client
    give the server up and move on."""
    n1 = nats3.urls[0]
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(
            nats3.urls, ping_interval_s=0.1, max_outstanding_pings=2, connect_timeout_s=0.5
        ) as nc:
            sub = await nc.subscribe("k")
            assert nc.connected_url == n1
            nats3.by_url(n1).pause()
            assert await nc.wait_connected(min_connects=2) != n1
            await nc.publish("k", b"x")
            assert (await sub.next_msg()).payload == b"x"


async def test_a_pong_late_behind_a_backlog_is_not_a_dead_server() -> None:
    """A fake server that keeps sending messages but answers no PING (its PONG waits
    behind what the client has still to read): the connection stays up for many ping
    intervals; once it goes silent as well, the client gives it up."""
    (port,) = free_ports(1)
    silent = trio.Event()
    got_sub = trio.Event()
    interval_s = 0.2

    async def fake_server(stream: trio.SocketStream) -> None:
        await stream.send_all(proto.encode_info({"headers": True, "max_payload": 1 << 20}))
        received = bytearray()
        while b"SUB flood" not in received or b"PING\r\n" not in received:
            received.extend(await stream.receive_some(65536))
        await stream.send_all(proto.PONG)  # the handshake's; no other PING is answered
        got_sub.set()
        while not silent.is_set():
            await stream.send_all(b"MSG flood 2 1\r\nx\r\n")
            await trio.sleep(0.005)
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, fake_server, listeners)
            nc = NatsClient.create(f"nats://127.0.0.1:{port}", ping_interval_s=interval_s,
                                   max_outstanding_pings=2, wait_for_servers=True,
                                   reconnect_backoff_s=0.01, reconnect_backoff_max_s=0.05)
            nursery.start_soon(nc.run)
            sub = nc.subscribe_nowait("flood", capacity=1 << 20)
            await got_sub.wait()
            start = trio.current_time()
            while trio.current_time() - start < 8 * interval_s:  # PINGs go unanswered
                await sub.next_msg()
            assert len(nc._pongs) == 2  # the limit of outstanding PINGs was reached ...
            assert nc.stats.reconnects == 0 and nc.is_connected  # ... and it is still up
            silent.set()
            while nc.last_error is None or "stale" not in nc.last_error:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_run_as_a_service_in_a_nursery(nats1: NatsCluster) -> None:
    """``run`` is the service form (``nursery.start``); ``close`` ends it."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nc = NatsClient.create(nats1.urls, name="svc")
            await nursery.start(nc.run)
            sub = await nc.subscribe("s")
            await nc.publish("s", b"x")
            assert (await sub.next_msg()).payload == b"x"
            await nc.close()
        assert nc.closed
        with pytest.raises(trio.EndOfChannel):
            await sub.next_msg()


async def test_bounded_output_and_request_table(nats1: NatsCluster) -> None:
    """A full output buffer refuses ``publish_nowait`` (WouldBlock) and makes ``publish``
    wait for the writer; a full request table makes ``request`` wait for a reply."""
    with trio.fail_after(TIMEOUT_S):
        async with NatsClient.connect(nats1.urls) as server, NatsClient.connect(
            nats1.urls, max_pending_bytes=1024, max_pending_requests=4
        ) as nc:
            await server.subscribe("svc", callback=echo(server))
            sub = await nc.subscribe("out")
            nc.publish_nowait("out", b"a" * 600)
            with pytest.raises(trio.WouldBlock):
                nc.publish_nowait("out", b"b" * 600)
            await nc.publish("out", b"b" * 600)  # waits for the writer's send
            assert [(await sub.next_msg()).payload[:1] for _ in range(2)] == [b"a", b"b"]
            replies: list[bytes] = []

            async def ask(i: int) -> None:
                replies.append((await nc.request("svc", b"%d" % i)).payload)

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(ask, i)
            assert sorted(replies) == sorted(b"re:%d" % i for i in range(40))
            assert len(nc._requests) == 0


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("nats://127.0.0.1:4222", ServerAddress("127.0.0.1", 4222)),
        ("nats://h", ServerAddress("h", 4222)),
        ("h:5000", ServerAddress("h", 5000)),
        ("nats://u:p%40ss@h:1", ServerAddress("h", 1, "u", "p@ss")),
        ("nats://s3cr3t@h:1", ServerAddress("h", 1, token="s3cr3t")),
    ],
)
def test_server_addresses(url: str, address: ServerAddress) -> None:
    assert ServerAddress.parse(url) == address
    assert address.url == f"nats://{address.host}:{address.port}"


@pytest.mark.parametrize("url", ["tls://h:1", "http://h", "nats://:4222"])
def test_bad_server_addresses(url: str) -> None:
    with pytest.raises(ValueError):
        ServerAddress.parse(url)
