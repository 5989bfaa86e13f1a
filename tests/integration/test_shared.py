"""Shared subscriptions ($share/<group>/<filter>) over real sockets: distribution, windows,
QoS, coexistence with ordinary subscriptions, redelivery when a member drops, restarts."""

from __future__ import annotations

import attrs
import trio

from mqttd.broker import running
from mqttd.codec.packets import PubAck, Publish, UnsubAck, Unsubscribe
from mqttd.config import ClientOverride
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient

GROUP = "$share/workers/site/+/telemetry"


async def receive(client: RawClient, count: int, *, ack: bool = True) -> list[Publish]:
    """The next ``count`` PUBLISHes, PUBACKed unless ``ack`` is False. Other packets are
    skipped explicitly (they stay queued: MQTT does not order acks against messages)."""
    got: list[Publish] = []
    for _ in range(count):
        packet: Publish = await client.take(Publish)  # type: ignore[assignment]
        got.append(packet)
        if ack and packet.qos == 1:
            await client.send(PubAck(packet.packet_id))
    return got


async def test_members_take_turns_and_each_message_goes_to_one(broker):
    with trio.fail_after(10):
        a, _ = await RawClient.connected(broker.port, "worker-a")
        b, _ = await RawClient.connected(broker.port, "worker-b")
        assert (await a.subscribe(GROUP, qos=1)).return_codes == (1,)
        assert (await b.subscribe(GROUP, qos=1)).return_codes == (1,)
        pub, _ = await RawClient.connected(broker.port, "sensor")
        got: dict[str, list[bytes]] = {"a": [], "b": []}
        for i in range(10):
            await pub.publish("site/1/telemetry", b"%d" % i, qos=1)
            # exactly one member gets it; the next goes to the other one
            first = "a" if i % 2 == 0 else "b"
            client = a if first == "a" else b
            got[first].extend(p.payload for p in await receive(client, 1))
        assert got == {
            "a": [b"0", b"2", b"4", b"6", b"8"], "b": [b"1", b"3", b"5", b"7", b"9"]
        }
        assert not a.received and not b.received
        stats = broker.stats()
        assert stats["shared_subscriptions"] == 1 and stats["shared_members"] == 2
        assert stats["shared_delivered"] == 10


async def test_a_member_with_a_full_window_is_skipped():
    config = attrs.evolve(
        make_config(),
        client_overrides=(ClientOverride(client_id="slow-*", max_inflight_messages=1),),
    )
    with trio.fail_after(10):
        async with running(config) as broker:
            slow, _ = await RawClient.connected(broker.port, "slow-1")
            fast, _ = await RawClient.connected(broker.port, "fast-1")
            await slow.subscribe(GROUP, qos=1)
            await fast.subscribe(GROUP, qos=1)
            pub, _ = await RawClient.connected(broker.port, "sensor")
            for i in range(10):
                await pub.publish("site/7/telemetry", b"%d" % i, qos=1)
            fast_got = await receive(fast, 9)
            held = await receive(slow, 1, ack=False)  # its window of 1 is full: skipped
            assert [p.payload for p in held] == [b"0"]
            assert [p.payload for p in fast_got] == [b"%d" % i for i in range(1, 10)]
            assert broker.client_stats("slow-1")["queued"] == 0


async def test_qos_is_the_lower_of_publish_and_granted(broker):
    with trio.fail_after(10):
        a, _ = await RawClient.connected(broker.port, "q0")
        await a.subscribe("$share/g/t", qos=0)
        pub, _ = await RawClient.connected(broker.port, "p")
        await pub.publish("t", b"x", qos=1)
        packet = await a.expect(Publish)
        assert (packet.qos, packet.payload) == (0, b"x")


async def test_groups_coexist_with_ordinary_subscriptions_and_other_groups(broker):
    with trio.fail_after(10):
        plain, _ = await RawClient.connected(broker.port, "plain")
        await plain.subscribe("site/+/telemetry", qos=1)
        g1 = [(await RawClient.connected(broker.port, f"g1-{i}"))[0] for i in range(2)]
        g2, _ = await RawClient.connected(broker.port, "g2-0")
        for client in g1:
            await client.subscribe("$share/one/site/+/telemetry", qos=1)
        await g2.subscribe("$share/two/site/#", qos=1)
        # a member of a group may also hold an ordinary subscription: it gets both copies
        await g1[0].subscribe("site/9/telemetry", qos=1)
        pub, _ = await RawClient.connected(broker.port, "p")
        for i in range(4):
            await pub.publish("site/9/telemetry", b"%d" % i, qos=1)
        assert len(await receive(plain, 4)) == 4
        assert len(await receive(g2, 4)) == 4
        first = await receive(g1[0], 2 + 4)  # its two turns plus its own subscription
        second = await receive(g1[1], 2)
        assert sorted(p.payload for p in first) == [b"0", b"0", b"1", b"2", b"2", b"3"]
        assert sorted(p.payload for p in second) == [b"1", b"3"]


async def test_unacknowledged_messages_of_a_dropped_member_go_to_another(broker):
    with trio.fail_after(10):
        dropper, _ = await RawClient.connected(broker.port, "dropper")
        await dropper.subscribe(GROUP, qos=1)
        steady, _ = await RawClient.connected(broker.port, "steady")
        await steady.subscribe(GROUP, qos=1)
        pub, _ = await RawClient.connected(broker.port, "sensor")
        for i in range(6):
            await pub.publish("site/3/telemetry", b"%d" % i, qos=1)
        held = await receive(dropper, 3, ack=False)  # received, never acknowledged
        kept = await receive(steady, 3)
        await dropper.aclose()  # drops mid-flight
        redelivered = await receive(steady, 3)
        assert sorted(p.payload for p in held) == sorted(p.payload for p in redelivered)
        assert not any(p.dup for p in redelivered)  # new to this member
        assert sorted(p.payload for p in kept + redelivered) == [b"%d" % i for i in range(6)]
        await wait_until(lambda: broker.stats()["shared_redelivered"] == 3)
        # the clean session left the group
        await wait_until(lambda: broker.stats()["shared_members"] == 1)


async def test_a_persistent_member_alone_keeps_its_messages_across_a_restart(tmp_path):
    """The only member is persistent: what it did not acknowledge stays with it (stored),
    and messages published while it is away are queued for it, also across a restart."""
    config = make_config(data_dir=tmp_path)
    with trio.fail_after(20):
        async with running(config) as broker:
            member, _ = await RawClient.connected(broker.port, "durable", clean_session=False)
            await member.subscribe(GROUP, qos=1)
            pub, _ = await RawClient.connected(broker.port, "sensor")
            await pub.publish("site/1/telemetry", b"a", qos=1)
            await receive(member, 1, ack=False)
            await member.aclose()
            await wait_until(lambda: broker.sessions["durable"].connection is None)
            await pub.publish("site/1/telemetry", b"b", qos=1)
        async with running(config) as broker:
            assert broker.stats()["shared_members"] == 1
            pub, _ = await RawClient.connected(broker.port, "sensor")
            await pub.publish("site/1/telemetry", b"c", qos=1)
            member, connack = await RawClient.connected(
                broker.port, "durable", clean_session=False
            )
            assert connack.session_present
            got = await receive(member, 3)
            assert [p.payload for p in got] == [b"a", b"b", b"c"]


async def test_malformed_share_filters_are_refused_and_retained_is_not_sent(broker):
    with trio.fail_after(10):
        pub, _ = await RawClient.connected(broker.port, "p")
        await pub.publish("t/1", b"kept", qos=1, retain=True)
        client, _ = await RawClient.connected(broker.port, "c")
        suback = await client.subscribe(
            "$share/g", "$share//t/1", "$share/g+/t/1", "$share/g/t/#/x", "$share/g/t/+", qos=1
        )
        assert suback.return_codes == (0x80, 0x80, 0x80, 0x80, 1)
        await pub.publish("t/1", b"live", qos=1)
        packet = await client.expect(Publish)
        assert (packet.payload, packet.retain) == (b"live", False)  # no retained copy first


async def test_unsubscribe_leaves_the_group(broker):
    with trio.fail_after(10):
        a, _ = await RawClient.connected(broker.port, "a")
        b, _ = await RawClient.connected(broker.port, "b")
        await a.subscribe("$share/g/t", qos=1)
        await b.subscribe("$share/g/t", qos=1)
        await a.send(Unsubscribe(9, ("$share/g/t",)))
        await a.expect(UnsubAck)
        pub, _ = await RawClient.connected(broker.port, "p")
        for i in range(3):
            await pub.publish("t", b"%d" % i, qos=1)
        assert [p.payload for p in await receive(b, 3)] == [b"0", b"1", b"2"]
        await b.send(Unsubscribe(9, ("$share/g/t",)))
        await b.expect(UnsubAck)
        assert broker.stats()["shared_subscriptions"] == 0
        assert broker.stats()["subscriptions"] == 0
        assert not a.received


async def test_mosquitto_sub_as_a_group_member(broker):
    """Interop: two mosquitto_sub processes in one group share the messages."""
    import shutil
    import subprocess

    assert shutil.which("mosquitto_sub"), "mosquitto-clients must be installed"
    procs = [
        subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
             "-i", f"msub-{i}", "-t", "$share/ms/data/#", "-C", "5"],
            stdout=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        with trio.fail_after(30):
            await wait_until(lambda: broker.stats()["shared_members"] == 2)
            pub, _ = await RawClient.connected(broker.port, "p")
            for i in range(10):
                await pub.publish("data/x", b"m%d" % i, qos=1)
            outputs = []
            for proc in procs:
                # (abandoned on a timeout; the finally below kills the process)
                out, _ = await trio.to_thread.run_sync(proc.communicate, abandon_on_cancel=True)
                outputs.append(out.split())
        assert all(len(lines) == 5 for lines in outputs)
        assert sorted(outputs[0] + outputs[1]) == sorted(f"m{i}" for i in range(10))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_consumer_group_of_two_workers_splits_the_fleet(broker):
    """The README demo in a test: a fleet publishes telemetry, two backend workers in one
    consumer group share it: each message reaches exactly one of them."""
    from devices.consumer import Consumer
    from devices.fleet import run_fleet

    devices, per_device = 4, 25
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            workers = [
                Consumer("127.0.0.1", broker.port, client_id=f"worker-{i}", group="workers")
                for i in (1, 2)
            ]
            for worker in workers:
                await nursery.start(worker.run)
            stats = await run_fleet("127.0.0.1", broker.port, devices, count=per_device,
                                    interval_s=0.005, qos=1)
            assert stats.acked == devices * per_device

            def heard() -> int:
                return sum(w.stats.received for w in workers)

            await wait_until(lambda: heard() >= devices * per_device)
            for worker in workers:
                assert worker.stats.received > 0  # both take a share
                assert worker.stats.duplicates == 0
            assert heard() == devices * per_device  # exactly once across the group
            assert broker.stats()["shared_members"] == 2
            for worker in workers:
                worker.stop()
