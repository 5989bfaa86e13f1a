"""Inbound flow control over real sockets: pausing reads must never lose or stall."""

from __future__ import annotations

import attrs
import trio

from mqttd.broker import running
from mqttd.codec.packets import PubAck, Publish
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient


async def test_receive_window_holds_a_flooding_publisher_without_losing_anything(tmp_path):
    """Every message needs a commit (offline persistent subscriber); the publisher sends
    500 QoS 1 PUBLISHes in one write without waiting; with a receive window of 5 the
    broker reads them as commits release the acks: all 500 acked, in order, all stored."""
    count = 500
    config = make_config(data_dir=tmp_path, max_receive_messages=5, max_queued_messages=10_000)
    with trio.fail_after(30):
        async with running(config) as broker:
            sub, _ = await RawClient.connected(broker.port, "offline", clean_session=False)
            await sub.subscribe("flood/#", qos=1)
            await sub.aclose()
            pub, _ = await RawClient.connected(broker.port, "flooder")
            await pub.send(b"".join(
                Publish("flood/x", b"%d" % i, 1, packet_id=i + 1).encode() for i in range(count)
            ))
            acks = [await pub.expect(PubAck) for _ in range(count)]
            assert [a.packet_id for a in acks] == list(range(1, count + 1))
            assert broker.sessions["offline"].queued == count
            assert broker.writer.commits > 1
            assert broker.stats()["read_pauses"] > 0


async def test_broker_buffer_limit_pauses_and_resumes_publishers():
    """A tiny max_buffered_bytes: the publisher is paused while output is pending (the
    subscriber reads nothing until it is) and resumed as the subscriber's output drains;
    every QoS 0 message arrives."""
    count = 2000
    config = make_config(max_buffered_bytes=20_000, qos0_buffer_bytes=10_000_000)
    with trio.fail_after(30):
        async with running(config) as broker:
            sub, _ = await RawClient.connected(broker.port, "reader")
            await sub.subscribe("buf/#", qos=0)
            pub, _ = await RawClient.connected(broker.port, "writer")

            async def send_all() -> None:
                for start in range(0, count, 100):
                    await pub.send(b"".join(
                        Publish("buf/x", b"%06d" % i + b"." * 1000, 0).encode()
                        for i in range(start, start + 100)
                    ))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                # (output that the socket takes at once is not pending: wait for a pause)
                await wait_until(lambda: broker.stats()["read_pauses"] > 0)
                received = [int((await sub.expect(Publish)).payload[:6]) for _ in range(count)]
            assert received == list(range(count))
            assert broker.stats()["dropped_qos0"] == 0
            assert broker.stats()["read_pauses"] > 0
            await wait_until(lambda: broker.buffers.bytes == 0)


async def test_queue_byte_budget_holds_across_disk_and_restart(tmp_path):
    """persistent_max_queued_bytes counts the payload bytes of a persistent session's whole
    queue,
    also the part on disk and after a restart (oldest dropped first)."""
    config = make_config(data_dir=tmp_path, persistent_max_queued_bytes=5000,
                         persistent_overflow_policy="drop_oldest")
    config = attrs.evolve(
        config, persistence=attrs.evolve(config.persistence, queue_page_messages=5)
    )
    with trio.fail_after(30):
        async with running(config) as broker:
            sub, _ = await RawClient.connected(broker.port, "budget", clean_session=False)
            await sub.subscribe("b/#", qos=1)
            await sub.aclose()
            pub, _ = await RawClient.connected(broker.port, "pub")
            for i in range(80):  # 80 x 100 bytes: the oldest 30 must go
                await pub.publish("b/x", b"%03d" % i + b"." * 97, qos=1)
            stats = broker.client_stats("budget")
            assert (stats["queued"], stats["queued_bytes"], stats["dropped"]) == (50, 5000, 30)
        async with running(config) as broker:
            stats = broker.client_stats("budget")
            assert (stats["queued"], stats["queued_bytes"]) == (50, 5000)
            pub, _ = await RawClient.connected(broker.port, "pub")
            for i in range(80, 90):
                await pub.publish("b/x", b"%03d" % i + b"." * 97, qos=1)
            stats = broker.client_stats("budget")
            assert (stats["queued"], stats["queued_bytes"], stats["dropped"]) == (50, 5000, 10)
            sub, _ = await RawClient.connected(broker.port, "budget", clean_session=False)
            got = []
            while len(got) < 50:
                packet = await sub.expect(Publish)
                got.append(int(packet.payload[:3]))
                await sub.send(PubAck(packet.packet_id))
            assert got == list(range(40, 90))
