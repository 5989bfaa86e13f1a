"""The device simulators (``devices/fleet.py``, ``devices/consumer.py``, ``devices/client.py``)
against the real broker on 127.0.0.1 port 0: counts, wills, commands, reconnection across a
broker restart on the same port, and the ``python -m devices`` command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio

from devices.client import Client
from devices.consumer import Consumer, DeviceTally, send_command, shared_filter
from devices.fleet import Fleet, FleetConfig, run_fleet
from mqttd.broker import Broker, running
from mqttd.codec import Publish
from mqttd.config import Listener
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until

ROOT = Path(__file__).resolve().parents[2]
FAST = {"interval_s": 0.005, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}


async def retained_status(port: int, count: int) -> dict[str, bytes]:
    """The retained ``site/<id>/status`` payloads, as a new subscriber sees them."""
    got: dict[str, bytes] = {}
    client = Client("127.0.0.1", port, "status-reader", keepalive_s=0,
                    on_message=lambda p: got.__setitem__(p.topic.split("/")[1], p.payload))
    async with client.connected():
        await client.subscribe("site/+/status")
        await wait_until(lambda: len(got) >= count)
    return got


def assert_complete(tally: DeviceTally, count: int, duplicates_allowed: bool = False) -> None:
    assert (tally.first_seq, tally.next_seq, tally.missing) == (1, count + 1, 0), tally
    if not duplicates_allowed:
        assert tally.duplicates == 0 and tally.count == count, tally


@pytest.mark.parametrize("qos", [1, 2])
async def test_fleet_messages_reach_a_consumer_exactly_once(broker, qos):
    devices, count = 20, 25
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            consumer = Consumer("127.0.0.1", broker.port, client_id="backend-1", qos=qos)
            await nursery.start(consumer.run)
            stats = await run_fleet("127.0.0.1", broker.port, devices, count=count, qos=qos,
                                    **FAST)
            await wait_until(lambda: consumer.stats.received >= devices * count)
            consumer.stop()
        assert (stats.published, stats.acked, stats.finished) == (500, 500, devices)
        assert stats.errors == stats.reconnects == stats.connected == 0
        assert sorted(consumer.stats.devices) == [f"sensor-{n:04d}" for n in range(1, 21)]
        for tally in consumer.stats.devices.values():
            assert_complete(tally, count)
        assert consumer.stats.received == 500 and consumer.stats.not_json == 0
        last = consumer.stats.devices["sensor-0007"].last
        assert last["device"] == "sensor-0007" and last["seq"] == count
        assert 10 < last["temperature_c"] < 32 and 0 <= last["humidity_pct"] <= 100
        assert 0 < last["battery_pct"] <= 100 and last["ts"] > 1.6e9
        # a graceful stop says so: the retained status is "offline" for every device
        assert set((await retained_status(broker.port, devices)).values()) == {b"offline"}


async def test_a_device_losing_power_leaves_offline_retained_a_dropped_one_comes_back(broker):
    with trio.fail_after(30):
        seen: list[tuple[str, bytes]] = []
        watcher = Client("127.0.0.1", broker.port, "watcher", keepalive_s=0,
                         on_message=lambda p: seen.append((p.topic, p.payload)))
        async with watcher.connected(), trio.open_nursery() as nursery:
            await watcher.subscribe(("site/+/status", 1))
            fleet = await nursery.start(
                Fleet("127.0.0.1", broker.port, FleetConfig(devices=3, **FAST)).run
            )
            await wait_until(lambda: len(seen) == 3)
            assert sorted(seen) == [(f"site/sensor-000{n}/status", b"online") for n in (1, 2, 3)]

            fleet.device("sensor-0002").power_off()  # no DISCONNECT: the will goes out
            await wait_until(lambda: len(seen) == 4)
            assert seen[3] == ("site/sensor-0002/status", b"offline")

            device = fleet.device("sensor-0003")
            seq = device.seq
            device.client.abort()  # the network drops: will, then reconnect and online
            offline, online = ("site/sensor-0003/status", b"offline"), (
                "site/sensor-0003/status", b"online")
            await wait_until(lambda: offline in seen[4:] and online in seen[4:])
            # the will (sent by the broker) and "online" (sent by the device's new connection)
            # have two publishers: MQTT does not order them for the watcher. The broker does
            # publish the will before it accepts the new connection: the retained status
            # below ends "online". "online" may come twice: when the connection dropped
            # before its PUBACK, the device sends it again (QoS 1, DUP) besides the new one.
            assert seen[4:].count(offline) == 1 and set(seen[4:]) == {offline, online}, seen
            await wait_until(lambda: device.seq > seq + 5)  # and it keeps counting
            assert fleet.stats.reconnects == 1 and fleet.stats.errors == 1

            status = await retained_status(broker.port, 3)
            assert status == {"sensor-0001": b"online", "sensor-0002": b"offline",
                              "sensor-0003": b"online"}
            fleet.stop()
        assert fleet.stats.finished == 3 and fleet.device("sensor-0002").done


async def test_commands_reach_the_right_device_and_replies_come_back(broker):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            config = FleetConfig(devices=5, interval_s=0.05)
            fleet = await nursery.start(Fleet("127.0.0.1", broker.port, config).run)
            await wait_until(lambda: fleet.stats.connected == 5)
            port = broker.port

            reply = await send_command("127.0.0.1", port, "sensor-0003", '{"cmd": "ping"}')
            assert (reply["device"], reply["cmd"], reply["ok"], reply["reply"]) == (
                "sensor-0003", "ping", True, "pong")

            reply = await send_command("127.0.0.1", port, "sensor-0002",
                                       {"cmd": "set_interval", "seconds": 0.01, "id": "x1"})
            assert (reply["device"], reply["id"], reply["ok"], reply["interval_s"]) == (
                "sensor-0002", "x1", True, 0.01)
            assert [d.interval_s for d in fleet.devices] == [0.05, 0.01, 0.05, 0.05, 0.05]

            reboot = fleet.device("sensor-0004")
            reply = await send_command("127.0.0.1", port, "sensor-0004", {"cmd": "reboot"})
            assert (reply["device"], reply["ok"], reply["boots"]) == ("sensor-0004", True, 2)
            await wait_until(lambda: reboot.client.connects == 2 and reboot.client.is_connected)
            reply = await send_command("127.0.0.1", port, "sensor-0004", {"cmd": "ping"})
            assert reply["ok"] and reply["device"] == "sensor-0004"
            assert reboot.boots == 2 and fleet.stats.errors == 0  # a clean reconnect

            reply = await send_command("127.0.0.1", port, "sensor-0001", {"cmd": "dance"})
            assert reply == {"device": "sensor-0001", "id": reply["id"], "cmd": "dance",
                             "ok": False, "error": "unknown command 'dance'"}
            reply = await send_command("127.0.0.1", port, "sensor-0005",
                                       {"cmd": "set_interval", "seconds": -1})
            assert not reply["ok"] and fleet.device("sensor-0005").interval_s == 0.05
            assert fleet.stats.commands == 6
            fleet.stop()


async def test_fleet_and_consumer_survive_a_broker_restart_on_the_same_port(tmp_path):
    """Persistent sessions on a database file: the broker stops mid-run and a new one starts
    on the same port; every device reconnects, finds its session and keeps counting, and the
    consumer gets every message the broker acknowledged (duplicates allowed: at least once)."""
    devices, count = 10, 60
    config = FleetConfig(devices=devices, count=count, persistent=True,
                         **{**FAST, "interval_s": 0.01})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            first = Broker(make_config(data_dir=tmp_path))
            async with trio.open_nursery() as broker_nursery:
                await broker_nursery.start(first.serve)
                port = first.port
                consumer = Consumer("127.0.0.1", port, client_id="backend-1", persistent=True,
                                    backoff_initial_s=0.02)
                await nursery.start(consumer.run)
                fleet = await nursery.start(Fleet("127.0.0.1", port, config).run)
                await wait_until(lambda: fleet.stats.published >= devices * count // 4)
                first.shutdown()
            assert fleet.stats.published < devices * count  # stopped mid-run

            again = attrs.evolve(make_config(data_dir=tmp_path),
                                 listeners=(Listener(host="127.0.0.1", port=port),))
            async with running(again) as second:
                assert second.port == port
                await wait_until(lambda: fleet.stats.finished == devices, timeout_s=30)
                await wait_until(lambda: all(
                    t.next_seq == count + 1 for t in consumer.stats.devices.values()
                ) and len(consumer.stats.devices) == devices, timeout_s=30)
                consumer.stop()
        stats = fleet.stats
        assert (stats.published, stats.acked) == (devices * count, devices * count)
        assert stats.reconnects >= devices and stats.resumed >= devices
        assert all(d.client.session_present for d in fleet.devices)
        assert consumer.stats.reconnects >= 1 and consumer.client.session_present
        for tally in consumer.stats.devices.values():
            assert_complete(tally, count, duplicates_allowed=True)


def test_device_tally_counts_duplicates_and_gaps():
    tally = DeviceTally()
    for seq in (1, 2, 4, 4, 2, 7):
        tally.add("run-a", seq)
    assert (tally.count, tally.duplicates, tally.next_seq, tally.missing) == (6, 2, 3, 3)
    tally.add("run-a", 3)
    assert (tally.next_seq, tally.missing) == (5, 2)  # 5 and 6 still missing
    tally.add("run-b", 1)  # a new fleet run starts over
    assert (tally.first_seq, tally.next_seq, tally.missing) == (1, 2, 0)
    assert shared_filter("site/+/telemetry", "workers") == "$share/workers/site/+/telemetry"
    assert shared_filter("site/+/telemetry", None) == "site/+/telemetry"


async def test_client_resends_unacknowledged_qos2_after_a_reconnect(broker):
    """QoS 2 in both directions through the small client: exactly once, and a publish
    left unacknowledged by a dropped connection goes again with DUP on the next one."""
    got: list[Publish] = []
    with trio.fail_after(10):
        sub = Client("127.0.0.1", broker.port, "sub", keepalive_s=0, on_message=got.append)
        # a persistent session: the broker keeps the QoS 2 packet ids it has seen, so a
        # resent PUBLISH (DUP) is acknowledged without being delivered twice
        # keepalive 2: the client pings after 2 s of quiet, the broker allows 3 s (a margin
        # of 1 s for a slow machine)
        pub = Client("127.0.0.1", broker.port, "pub", clean_session=False, keepalive_s=2,
                     max_inflight=4)
        async with sub.connected():
            await sub.subscribe(("q/#", 2))
            with pytest.raises(ConnectionError):
                async with pub.connected():
                    for i in range(4):
                        await pub.publish("q/a", b"%d" % i, qos=2)
                    pub.abort()  # before the acknowledgements are read
                    await trio.sleep_forever()
            async with pub.connected():
                await pub.wait_acked()
                # the behaviour under test is time passing: idle past the keepalive, where
                # only the PINGREQ keeps the connection open
                await trio.sleep(2.5)
                assert pub.is_connected
            await wait_until(lambda: len(got) >= 4)
        assert sorted(p.payload for p in got) == [b"0", b"1", b"2", b"3"]
        assert pub.acked == 4 and pub.published == 4 and pub.inflight == 0
        assert pub.connects == 2


async def test_a_clean_exit_never_raises_when_the_broker_closes_first(broker):
    """After DISCONNECT the broker closes the socket; the reader seeing that EOF before it is
    cancelled must not turn a clean exit into ConnectionLost (it once did, now and then)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            fleet = await nursery.start(
                Fleet("127.0.0.1", broker.port, FleetConfig(devices=2, interval_s=0.002)).run
            )
            for i in range(100):
                client = Client("127.0.0.1", broker.port, f"cycle-{i}", keepalive_s=0)
                async with client.connected():
                    await client.subscribe(("site/+/telemetry", 1))
                    await client.publish("cycle/t", b"x", qos=1)
                    await client.wait_acked()
            fleet.stop()


# -- the command line ----------------------------------------------------------------


async def run_cli(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout_s):
        return await trio.run_process(
            [sys.executable, "-m", "devices", *args], cwd=ROOT, capture_stdout=True,
            capture_stderr=True, check=False,
        )


async def test_cli_fleet_prints_progress_and_a_summary(broker):
    result = await run_cli("fleet", "--port", str(broker.port), "--devices", "3", "--count",
                           "5", "--interval", "0.1", "--report-interval", "0.2", "--seed", "1")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert re.match(r"fleet [0-9a-f]{8}: 3 devices sensor-0001\.\.sensor-0003 -> "
                    rf"127\.0\.0\.1:{broker.port}, one message every 0\.1s each, QoS 1", lines[0])
    progress = [line for line in lines[1:-1] if re.match(r"\[\s*\d+\.\ds\] connected \d/3 ", line)]
    assert progress and len(progress) == len(lines) - 2, lines
    assert re.match(r"fleet done in \d+\.\ds: 3 devices, published 15 \(.* msgs/s\), acked 15, "
                    r"commands 0, reconnects 0 .*connection errors 0$", lines[-1]), lines[-1]


async def test_cli_consume_and_command_against_a_running_fleet(broker):
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            fleet = await nursery.start(
                Fleet("127.0.0.1", broker.port, FleetConfig(devices=3, interval_s=0.02)).run
            )
            port = str(broker.port)
            consume = await run_cli("consume", "--port", port, "--count", "30",
                                    "--client-id", "cli-worker", "--no-group")
            command = await run_cli("command", "--port", port, "sensor-0002",
                                    '{"cmd": "ping", "id": "t-1"}')
            fleet.stop()
    assert consume.returncode == 0, consume.stderr.decode()
    out = consume.stdout.decode().splitlines()
    assert out[0] == "cli-worker: subscribed to site/+/telemetry (QoS 1, clean session)"
    summary = re.match(r"consumer cli-worker done in .*: received (\d+) from 3 devices  "
                       r"duplicates 0  missing 0", out[-1])
    assert summary and int(summary[1]) >= 30, out  # the rest of the last read counts too
    assert command.returncode == 0, command.stderr.decode()
    reply = json.loads(command.stdout)
    assert (reply["device"], reply["id"], reply["reply"]) == ("sensor-0002", "t-1", "pong")


async def test_cli_help_and_errors():
    result = await run_cli("--help")
    assert result.returncode == 0
    for command in ("fleet", "consume", "command", "constrained"):
        assert command in result.stdout.decode()
        sub = await run_cli(command, "--help")
        assert sub.returncode == 0 and b"--port" in sub.stdout, command
    consume_help = (await run_cli("consume", "--help")).stdout.decode()
    assert "$share/GROUP/FILTER" in consume_help
    # nothing listens on port 1 of loopback: the command fails cleanly
    refused = await run_cli("command", "--port", "1", "--timeout", "2", "sensor-0001")
    assert refused.returncode == 2 and b"error:" in refused.stderr
