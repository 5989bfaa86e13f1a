"""``$SYS`` topics with mosquitto 2.0's names, values checked against what the test did;
``mosquitto_sub -t '$SYS/#'`` gets them; ``#`` does not match them (MQTT-4.7.2-1)."""

from __future__ import annotations

import shutil

import attrs
import trio

from mqttd.broker import running
from mqttd.codec.packets import Publish
from mqttd.config import Config, Monitoring
from tests.conftest import make_config
from tests.rawclient import RawClient

TIMEOUT_S = 30.0


def sys_config(interval_s: float = 0.1) -> Config:
    return attrs.evolve(make_config(), monitoring=Monitoring(sys_interval_s=interval_s))


async def value_of(client: RawClient, topic: str, wanted: bytes | None = None) -> bytes:
    """The next value published on ``topic`` (equal to ``wanted``, if given); the other
    $SYS messages are skipped."""
    while True:
        packet = await client.take(Publish, timeout_s=TIMEOUT_S)
        if packet.topic == topic and (wanted is None or packet.payload == wanted):  # type: ignore[attr-defined]
            return packet.payload  # type: ignore[attr-defined]


class SysView:
    """The latest value of every $SYS topic a client has received."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.values: dict[str, bytes] = {}

    async def until(self, **wanted: bytes) -> None:
        """Read $SYS messages until every ``topic=value`` holds (topic without the
        ``$SYS/broker/`` prefix, ``__`` for ``/``); values are published when they change."""
        goal = {"$SYS/broker/" + key.replace("__", "/"): value for key, value in wanted.items()}
        while any(self.values.get(topic) != value for topic, value in goal.items()):
            packet = await self.client.take(Publish, timeout_s=TIMEOUT_S)
            self.values[packet.topic] = packet.payload  # type: ignore[attr-defined]


async def test_sys_topics_report_what_happened() -> None:
    async with running(sys_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            watcher, _ = await RawClient.connected(broker.port, "watcher", keepalive_s=0)
            await watcher.subscribe("$SYS/#")
            view = SysView(watcher)
            await view.until(clients__connected=b"1")
            version = view.values["$SYS/broker/version"]
            assert version.startswith(b"mqttd version ")
            assert view.values["$SYS/broker/uptime"].endswith(b" seconds")
            sub, _ = await RawClient.connected(broker.port, "sub", keepalive_s=0)
            await sub.subscribe("data/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "pub", keepalive_s=0)
            for n in range(7):
                await pub.publish("data/x", b"%d" % n, qos=1)
            for _ in range(7):
                await sub.take(Publish)
            await view.until(
                messages__received=b"7", publish__messages__received=b"7",
                clients__connected=b"3", clients__total=b"3", subscriptions__count=b"2",
                mqttd__queued=b"0", mqttd__dropped__queue_full=b"0",
            )
            await pub.aclose()
            await view.until(clients__connected=b"2", clients__maximum=b"3")
            # retained: a client subscribing later gets the current values at once
            late, _ = await RawClient.connected(broker.port, "late", keepalive_s=0)
            await late.subscribe("$SYS/broker/version")
            packet = await late.take(Publish)
            assert packet.retain and packet.payload == version  # type: ignore[attr-defined]
            for client in (watcher, sub, late):
                await client.aclose()


async def test_a_hash_subscription_does_not_get_sys_topics() -> None:
    async with running(sys_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            everything, _ = await RawClient.connected(broker.port, "everything", keepalive_s=0)
            await everything.subscribe("#")
            watcher, _ = await RawClient.connected(broker.port, "watcher", keepalive_s=0)
            await watcher.subscribe("$SYS/broker/uptime")
            await value_of(watcher, "$SYS/broker/uptime")  # $SYS is being published
            await watcher.publish("after/sys", b"marker")
            packet = await everything.take(Publish)
            assert packet.topic == "after/sys"  # type: ignore[attr-defined]  # not a $SYS one
            await everything.aclose()
            await watcher.aclose()


async def test_sys_interval_zero_publishes_nothing() -> None:
    async with running(sys_config(0)) as broker:
        assert not any(topic.startswith("$SYS") for topic, _ in broker.retained.items())


async def test_mosquitto_sub_reads_the_sys_tree() -> None:
    mosquitto_sub = shutil.which("mosquitto_sub")
    assert mosquitto_sub, "mosquitto_sub (Debian package mosquitto-clients) is needed"
    async with running(sys_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            result = await trio.run_process(
                [mosquitto_sub, "-h", "127.0.0.1", "-p", str(broker.port),
                 "-t", "$SYS/broker/version", "-C", "1", "-W", "20"],
                capture_stdout=True,
            )
            assert result.stdout.startswith(b"mqttd version ")
