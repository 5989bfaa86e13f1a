"""The JetStream subset against real nats-server 2.9.10 processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from mqttd.cluster.consumer import parse_ack_subject, watch
from mqttd.cluster.jetstream import (
    JetStream,
    JetStreamError,
    MaxMsgsPerSubjectError,
    PubAck,
    StoredMsg,
    StreamConfig,
    StreamNotFoundError,
    WrongLastSequenceError,
    check_applied,
)
from mqttd.cluster.nats_client import NatsClient
from mqttd.cluster.nats_values import NatsError, NoRespondersError
from tests.cluster.natsharness import NatsCluster

TIMEOUT_S = 10


@asynccontextmanager
async def jetstream(urls: list[str], timeout_s: float = 2.0) -> AsyncIterator[JetStream]:
    async with NatsClient.connect(urls) as nc:
        yield JetStream(nc, timeout_s=timeout_s)


def stream(name: str = "T", *subjects: str, **settings: object) -> StreamConfig:
    return StreamConfig(name, subjects or ("t.>",), storage="memory", **settings)  # type: ignore[arg-type]


async def test_stream_create_info_update_delete(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            config = StreamConfig(
                "Q", ("q.>",), storage="file", max_msgs_per_subject=10, discard="new",
                discard_new_per_subject=True, allow_direct=True, max_age_s=3600,
            )
            info = await js.add_stream(config)
            assert info.config == attrs.evolve(config, duplicate_window_s=120.0)
            assert info.state.messages == 0 and info.cluster is None  # not clustered
            assert (await js.add_stream(config)).config == info.config  # idempotent
            changed = attrs.evolve(config, max_age_s=60.0, duplicate_window_s=60.0)
            assert (await js.ensure_stream(changed)).config == changed
            assert (await js.stream_info("Q")).config.max_age_s == 60.0
            with pytest.raises(JetStreamError) as error:
                await js.update_stream(attrs.evolve(changed, storage="memory"))
            assert (error.value.code, error.value.err_code) == (500, 10052)
            assert "storage type" in error.value.description
            work = await js.add_stream(StreamConfig("W", ("w.>",), retention="workqueue",
                                                    storage="memory"))
            assert work.config.retention == "workqueue"
            await js.delete_stream("Q")
            with pytest.raises(StreamNotFoundError) as missing:
                await js.stream_info("Q")
            assert (missing.value.code, missing.value.err_code) == (404, 10059)


async def test_publish_pub_ack_dedup_and_expected_last_subject_sequence(
    nats1: NatsCluster,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            await js.add_stream(stream())
            assert await js.publish("t.a", b"1") == PubAck("T", 1)
            assert await js.publish("t.a", b"2", msg_id="m2") == PubAck("T", 2)
            assert await js.publish("t.a", b"2", msg_id="m2") == PubAck("T", 2, duplicate=True)
            with pytest.raises(WrongLastSequenceError) as error:
                await js.publish("t.a", b"3", expected_last_subject_seq=1)
            assert (error.value.code, error.value.err_code) == (400, 10071)
            assert error.value.description == "wrong last sequence: 2"
            assert await js.publish("t.a", b"3", expected_last_subject_seq=2) == PubAck("T", 3)
            assert await js.publish("t.new", b"", expected_last_subject_seq=0) == PubAck("T", 4)
            with pytest.raises(WrongLastSequenceError):
                await js.publish("t.new", b"", expected_last_subject_seq=0)
            with pytest.raises(NoRespondersError):  # no stream has this subject
                await js.publish("elsewhere", b"")
            assert (await js.stream_info("T")).state.messages == 4


async def test_discard_new_per_subject(nats1: NatsCluster) -> None:
    """2.9.10 has ``discard_new_per_subject``: a full subject refuses, others still take."""
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            info = await js.add_stream(stream(max_msgs_per_subject=2, discard="new",
                                              discard_new_per_subject=True))
            assert info.config.discard_new_per_subject
            await js.publish("t.a", b"1")
            await js.publish("t.a", b"2")
            with pytest.raises(MaxMsgsPerSubjectError) as error:
                await js.publish("t.a", b"3")
            assert (error.value.code, error.value.err_code) == (503, 10077)
            assert (await js.publish("t.b", b"1")).seq == 3


async def test_pipelined_publishes_are_matched_to_their_acks(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            await js.add_stream(stream())
            pending = [js.publish_nowait(f"t.{i % 7}", b"%d" % i, msg_id=f"id{i}")
                       for i in range(1000)]
            acks = [await p.result() for p in pending]
            assert [a.seq for a in acks] == list(range(1, 1001))
            again = [await js.publish_nowait("t.0", b"", msg_id=f"id{i}").result()
                     for i in (0, 999)]
            assert again == [PubAck("T", 1, True), PubAck("T", 1000, True)]
            for i in (0, 500, 999):
                msg = await js.get_msg("T", seq=i + 1)
                assert msg is not None and (msg.subject, msg.payload) == (f"t.{i % 7}",
                                                                          b"%d" % i)


async def test_direct_get_and_msg_get(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            await js.add_stream(stream(allow_direct=True))
            await js.publish("t.a", b"a1")
            await js.publish("t.b", b"b1", {"Mqttd-Qos": "1", "Multi": ["x", "y"]})
            await js.publish("t.a", b"a2", msg_id="m")
            for get in (js.direct_get, js.get_msg):
                first = await get("T", seq=1)
                assert first is not None and first.time
                assert (first.subject, first.seq, first.payload, first.headers) == (
                    "t.a", 1, b"a1", {})
                b1 = await get("T", last_by_subj="t.b")
                assert b1 is not None
                assert b1 == StoredMsg("t.b", 2, b"b1", {"Mqttd-Qos": ["1"],
                                                         "Multi": ["x", "y"]}, b1.time)
                last = await get("T", last_by_subj="t.a")
                assert last is not None and (last.seq, last.header("Nats-Msg-Id")) == (3, "m")
                nxt = await get("T", seq=2, next_by_subj="t.a")
                assert nxt is not None and (nxt.seq, nxt.payload) == (3, b"a2")
                assert await get("T", seq=4) is None
                assert await get("T", seq=4, next_by_subj="t.a") is None
                assert await get("T", last_by_subj="t.none") is None
            with pytest.raises(ValueError):
                await js.direct_get("T", seq=1, last_by_subj="t.a")
            with pytest.raises(ValueError):
                await js.direct_get("T")


async def test_purge_by_subject_below_a_sequence_and_keep(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            await js.add_stream(stream("Q", "q.>", allow_direct=True))
            for i in range(5):
                await js.publish("q.a", b"%d" % i)  # seqs 1..5
            await js.publish("q.b", b"b")  # 6
            await js.publish("q.b", b"b")  # 7
            assert await js.purge("Q", "q.a", seq=4) == 3  # 1, 2, 3
            first = await js.direct_get("Q", seq=1, next_by_subj="q.a")
            assert first is not None and first.seq == 4
            assert await js.purge("Q", "q.a", keep=1) == 1  # 4
            assert (await js.stream_info("Q")).state.messages == 3
            assert await js.purge("Q", "q.b") == 2
            assert await js.purge("Q") == 1
            with pytest.raises(ValueError):
                await js.purge("Q", seq=1, keep=1)


async def test_ordered_consumer_from_the_start_then_live(nats1: NatsCluster) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            await js.add_stream(stream())
            for i in range(3):
                await js.publish(f"t.{i}", b"%d" % i)
            async with watch(js, "T", "t.>", heartbeat_s=0.2) as consumer:
                got = [await anext(consumer) for _ in range(4)]
                assert [m and (m.subject, m.seq, m.payload) for m in got] == [
                    ("t.0", 1, b"0"), ("t.1", 2, b"1"), ("t.2", 3, b"2"), None]
                await js.publish("t.9", b"live")
                live = await anext(consumer)
                assert live is not None and (live.seq, live.payload) == (4, b"live")
                # the consumer goes away: missed heartbeats make the watch recreate it from
                # the next stream sequence, so nothing is lost or repeated
                await js.api(f"CONSUMER.DELETE.T.{consumer.name}")
                await js.publish("t.9", b"after")
                after = await anext(consumer)
                assert after is not None and (after.seq, after.payload) == (5, b"after")
                assert consumer.resets == 1


async def test_ordered_consumer_on_an_empty_stream_is_caught_up_at_once(
    nats1: NatsCluster,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            await js.add_stream(stream())
            async with watch(js, "T", "t.a", deliver_policy="last_per_subject") as consumer:
                assert await anext(consumer) is None
                await js.publish("t.b", b"filtered out")
                await js.publish("t.a", b"x")
                msg = await anext(consumer)
                assert msg is not None and (msg.subject, msg.seq) == ("t.a", 2)


def test_a_setting_the_server_did_not_apply_is_an_error() -> None:
    asked = StreamConfig("S", ("s.>",), discard_new_per_subject=True, discard="new",
                         max_msgs_per_subject=5)
    check_applied(asked, attrs.evolve(asked, duplicate_window_s=120.0))  # server defaults
    with pytest.raises(JetStreamError, match="did not apply discard_new_per_subject"):
        check_applied(asked, attrs.evolve(asked, discard_new_per_subject=False))


def test_ack_subjects() -> None:
    v1 = parse_ack_subject("$JS.ACK.KV_b.lp5yV2f4.1.5.2.1796177925459719426.1")
    assert v1 is not None and (v1.stream_seq, v1.consumer_seq, v1.pending) == (5, 2, 1)
    v2 = parse_ack_subject("$JS.ACK.dom.ACC.S.c.1.7.3.1796177925459719426.0.tok")
    assert v2 is not None and (v2.stream_seq, v2.consumer_seq, v2.pending) == (7, 3, 0)
    assert parse_ack_subject("_INBOX.x") is None
    assert parse_ack_subject("$JS.ACK.S.c.1.x.2.3.4") is None


async def test_r3_stream_keeps_every_acked_message_after_kill9_of_its_leader(
    nats3: NatsCluster,
) -> None:
    """Publish to an R3 stream, kill -9 the stream leader, keep publishing (retrying with
    the same Nats-Msg-Id until acked), then read every acked message back through the new
    leader: nothing acknowledged is lost, nothing is stored twice."""
    with trio.fail_after(30):
        async with jetstream(nats3.urls) as js:
            info = await js.add_stream(StreamConfig("R3", ("r3.>",), num_replicas=3))
            assert info.config.num_replicas == 3
            acked: dict[int, bytes] = {}

            async def publish(i: int) -> None:
                while True:
                    try:
                        ack = await js.publish(f"r3.{i % 5}", b"m%d" % i, msg_id=f"m{i}",
                                               timeout_s=0.5)
                    except (NatsError, trio.WouldBlock):
                        await trio.sleep(0.05)  # election or reconnect in progress: retry
                        continue
                    acked[ack.seq] = b"m%d" % i
                    return

            pending = [js.publish_nowait(f"r3.{i % 5}", b"m%d" % i, msg_id=f"m{i}")
                       for i in range(200)]
            for i, p in enumerate(pending):
                acked[(await p.result()).seq] = b"m%d" % i
            leader = (await js.stream_info("R3")).cluster
            assert leader is not None and leader.leader is not None
            victim = next(s for s in nats3.servers if s.name == leader.leader)
            victim.kill()
            for i in range(200, 300):
                await publish(i)
            assert len(acked) == 300 and sorted(acked) == list(range(1, 301))
            while True:  # the new leader answers once elected
                try:
                    info = await js.stream_info("R3")
                    break
                except NatsError:
                    await trio.sleep(0.05)
            assert info.state.messages == 300
            assert info.cluster is not None and info.cluster.leader != victim.name
            for seq, payload in acked.items():
                msg = await js.get_msg("R3", seq=seq)
                assert msg is not None and msg.payload == payload


async def test_ordered_consumer_new_only_survives_a_reset_before_its_first_message(
    nats1: NatsCluster,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with jetstream(nats1.urls) as js:
            await js.add_stream(stream())
            await js.publish("t.old", b"before")
            async with watch(js, "T", "t.>", deliver_policy="new", heartbeat_s=0.2) as consumer:
                assert await anext(consumer) is None  # nothing new yet
                await js.api(f"CONSUMER.DELETE.T.{consumer.name}")
                await js.publish("t.new", b"after")  # no consumer exists right now
                msg = await anext(consumer)
                assert msg is not None and (msg.seq, msg.payload) == (2, b"after")
                assert consumer.resets == 1
