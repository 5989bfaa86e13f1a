"""Refusals the client is told about, and limits that count what they should: the publish
rate limit counts PUBLISH packets (not reads) and can refuse a 5.0 client's messages with
0x97; connection limits are answered with CONNACK 0x89 / 0x9F (3.1.1: 0x03)."""

from __future__ import annotations

import trio

from mqttd.broker import running
from mqttd.codec.packets import PROTOCOL_5, ConnAck, Connect, PubAck, Publish
from tests.conftest import make_config
from tests.rawclient import RawClient

TIMEOUT_S = 30.0


async def test_publish_rate_counts_packets_not_reads() -> None:
    """300 PUBLISHes in one write at a limit of 100/s (a burst of one second's worth): the
    last arrives at least 2 s after the first (it used to be 0.46 s at 50/s: the limit was
    applied per 64 KiB read)."""
    async with running(make_config(max_publish_rate_per_s=100)) as broker:
        with trio.fail_after(TIMEOUT_S):
            sub, _ = await RawClient.connected(broker.port, "sub", keepalive_s=0)
            await sub.subscribe("rate/#", qos=0)
            pub, _ = await RawClient.connected(broker.port, "pub", keepalive_s=0)
            await pub.send(b"".join(Publish("rate/x", b"%d" % i).encode() for i in range(300)))
            first = await sub.expect(Publish)
            started = trio.current_time()
            rest = [await sub.expect(Publish) for _ in range(299)]
            elapsed = trio.current_time() - started
            assert [int(p.payload) for p in [first, *rest]] == list(range(300))  # type: ignore[attr-defined]
            assert elapsed >= 1.9, f"300 messages at 100/s took {elapsed:.2f} s"


async def test_over_the_rate_a_5_client_is_refused_with_quota_exceeded() -> None:
    config = make_config(max_publish_rate_per_s=10, over_publish_rate="refuse")
    async with running(config) as broker:
        with trio.fail_after(TIMEOUT_S):
            sub, _ = await RawClient.connected(broker.port, "sub", keepalive_s=0)
            await sub.subscribe("rate/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "pub", keepalive_s=0,
                                               protocol_level=PROTOCOL_5)
            await pub.send(b"".join(
                Publish("rate/x", b"%d" % i, 1, packet_id=i + 1).encode(PROTOCOL_5)
                for i in range(30)
            ))
            acks = [await pub.take(PubAck, packet_id=i + 1) for i in range(30)]
            accepted = [i for i, ack in enumerate(acks) if ack.reason_code == 0]  # type: ignore[attr-defined]
            refused = [i for i, ack in enumerate(acks) if ack.reason_code == 0x97]  # type: ignore[attr-defined]
            assert len(accepted) + len(refused) == 30
            assert 10 <= len(accepted) <= 12 and accepted == list(range(len(accepted)))
            got = [await sub.take(Publish) for _ in accepted]
            assert [int(p.payload) for p in got] == accepted  # type: ignore[attr-defined]
            assert broker.stats()["rate_refused"] == len(refused)
            stats = broker.client_stats("pub")
            assert stats is not None and stats["publishes_refused"] == len(refused)


async def connack_of(port: int, level: int) -> ConnAck:
    client = await RawClient.open(port)
    client.protocol_level = client.decoder.protocol_level = level
    await client.send(Connect(f"c{level}", True, 0, level))
    connack = await client.expect(ConnAck)
    assert await client.expect_closed() == []
    return connack  # type: ignore[return-value]


async def test_over_max_connections_clients_are_told_server_busy() -> None:
    async with running(make_config(max_connections=1)) as broker:
        with trio.fail_after(TIMEOUT_S):
            first, _ = await RawClient.connected(broker.port, "first", keepalive_s=0)
            assert (await connack_of(broker.port, PROTOCOL_5)).return_code == 0x89
            assert (await connack_of(broker.port, 4)).return_code == 0x03
            assert broker.stats()["limits_exceeded"] == 2
            await first.aclose()


async def test_over_the_connection_rate_clients_are_told_so() -> None:
    # 0.01/s: one connection, then none for 100 s (no timing in the test)
    async with running(make_config(max_connection_rate_per_s=0.01)) as broker:
        with trio.fail_after(TIMEOUT_S):
            first, _ = await RawClient.connected(broker.port, "first", keepalive_s=0)
            assert (await connack_of(broker.port, PROTOCOL_5)).return_code == 0x9F
            assert (await connack_of(broker.port, 4)).return_code == 0x03
            await first.aclose()
