"""Crash tests (issue 3): ``kill -9`` the broker while a publisher streams QoS 1 messages,
restart it on the same data directory, and check the durability contract (DESIGN.md): every
message that got a PUBACK is still delivered, to a persistent session or as a retained message.
Duplicates, and messages that arrive although their PUBACK was lost in the kill, are allowed
(and counted)."""

from __future__ import annotations

import trio

from tests.crash.harness import (
    BrokerProcess,
    Publisher,
    broker_process,
    check_queue_delivery,
    check_retained,
    collect,
    subscribe_and_leave,
    write_config,
)

ROUNDS = 5  # kills per test
ACKS_PER_ROUND = 2000  # PUBACKs received in a round before its kill
ROUND_TIMEOUT_S = 30.0
QUEUE_TOPIC = "crash/data"
SUBSCRIBER = "crash-sub"
RETAINED_TOPICS = 50


def queue_topic(number: int) -> str:
    return QUEUE_TOPIC


def retained_topic(number: int) -> str:
    return f"crash/retained/{number % RETAINED_TOPICS}"


async def publish_then_kill(broker: BrokerProcess, publisher: Publisher, label: str) -> None:
    """Run ``publisher`` until it has ``ACKS_PER_ROUND`` PUBACKs, then SIGKILL the broker while
    the publisher still has messages in flight."""
    publisher.call_after_acks(ACKS_PER_ROUND, broker.kill)
    with trio.fail_after(ROUND_TIMEOUT_S):
        await publisher.run()  # until the kill breaks its connection
    await broker.reap()
    assert broker.killed, f"publisher ended before the kill: {publisher.ended_by}"
    print(
        f"{label}: sent {publisher.sent[0]}..{publisher.sent[-1]}, "
        f"PUBACKed {len(publisher.acked)}, {publisher.in_flight_at_call} in flight at the kill; "
        f"publisher: {publisher.ended_by}"
    )


async def test_acked_messages_for_an_offline_session_survive_kill_9(tmp_path):
    config = write_config(tmp_path)
    acked: set[int] = set()
    sent: set[int] = set()
    next_number = 1
    with trio.fail_after(ROUNDS * ROUND_TIMEOUT_S + 90):
        for round_no in range(1, ROUNDS + 1):
            async with broker_process(tmp_path, config) as broker:
                if round_no == 1:
                    await subscribe_and_leave(broker.port, SUBSCRIBER, "crash/#")
                publisher = Publisher(
                    broker.port, next_number, queue_topic, client_id=f"crash-pub-{round_no}"
                )
                await publish_then_kill(broker, publisher, f"round {round_no}")
            acked |= publisher.acked
            sent.update(publisher.sent)
            next_number = publisher.next_number

        async with broker_process(tmp_path, config) as broker:
            delivery = await collect(
                broker.port,
                SUBSCRIBER,
                clean_session=False,
                done=lambda d: acked <= set(d.numbers),
                overall_s=60.0,
            )
            log_tail = broker.tail()

    problems, summary = check_queue_delivery(acked, sent, delivery, QUEUE_TOPIC)
    print(summary)
    assert not problems, "\n".join([*problems, summary, "broker log tail:", log_tail])


async def test_acked_retained_messages_survive_kill_9(tmp_path):
    config = write_config(tmp_path)
    acked: set[int] = set()
    sent: set[int] = set()
    problems: list[str] = []
    next_number = 1
    log_tail = ""
    with trio.fail_after(ROUNDS * (ROUND_TIMEOUT_S + 30) + 60):
        for round_no in range(1, ROUNDS + 1):
            async with broker_process(tmp_path, config) as broker:
                if round_no > 1:  # the restart after the previous round's kill
                    await _check_retained(broker, round_no - 1, acked, sent, problems)
                publisher = Publisher(
                    broker.port,
                    next_number,
                    retained_topic,
                    retain=True,
                    client_id=f"crash-pub-{round_no}",
                )
                await publish_then_kill(broker, publisher, f"round {round_no}")
            acked |= publisher.acked
            sent.update(publisher.sent)
            next_number = publisher.next_number
        async with broker_process(tmp_path, config) as broker:
            await _check_retained(broker, ROUNDS, acked, sent, problems)
            log_tail = broker.tail()
    assert not problems, "\n".join([*problems, "broker log tail:", log_tail])


async def _check_retained(
    broker: BrokerProcess, round_no: int, acked: set[int], sent: set[int], problems: list[str]
) -> None:
    topics = {retained_topic(n) for n in acked}
    delivery = await collect(
        broker.port,
        f"crash-retained-check-{round_no}",
        clean_session=True,
        subscribe="crash/retained/#",
        done=lambda d: topics <= d.retained.keys(),
        idle_s=20.0,
        overall_s=30.0,
    )
    found, summary = check_retained(acked, sent, delivery, retained_topic)
    print(f"after kill {round_no}: {summary}")
    problems.extend(f"after kill {round_no}: {p}" for p in found)


async def test_control_without_kill_the_harness_sees_everything(tmp_path):
    """The same publisher and subscriber on one broker that is never killed: everything
    PUBACKed arrives, in order. If this fails, the harness (or routing) is broken, not
    persistence."""
    config = write_config(tmp_path)
    with trio.fail_after(ROUND_TIMEOUT_S + 90):
        async with broker_process(tmp_path, config) as broker:
            await subscribe_and_leave(broker.port, SUBSCRIBER, "crash/#")
            publisher = Publisher(broker.port, 1, queue_topic)
            async with trio.open_nursery() as nursery:
                with trio.fail_after(ROUND_TIMEOUT_S):
                    await nursery.start(publisher.run)
                    await publisher.wait_acked(ACKS_PER_ROUND)
                    await publisher.stop()
            assert publisher.ended_by == "stopped", publisher.ended_by
            acked = publisher.acked
            assert acked == set(publisher.sent)
            delivery = await collect(
                broker.port,
                SUBSCRIBER,
                clean_session=False,
                done=lambda d: acked <= set(d.numbers),
            )
    problems, summary = check_queue_delivery(acked, acked, delivery, QUEUE_TOPIC)
    print(summary)
    assert not problems, "\n".join([*problems, summary])
