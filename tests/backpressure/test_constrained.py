"""Per-client limits for constrained devices: a window of one, a small queue, drop_new.

The device is ``devices.constrained`` (window 1, slow acks, a 4 KiB SO_RCVBUF); a client id
that matches no ``client_overrides`` entry keeps the default limits in the same broker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import trio

from devices.constrained import ConstrainedDevice
from mqttd.broker import running
from mqttd.codec import PubAck, Publish
from mqttd.config import ClientOverride, Config
from tests.conftest import make_config
from tests.rawclient import RawClient

ROOT = Path(__file__).resolve().parents[2]
DEVICE_ID = "devices/constrained-1"
WINDOW, QUEUE, SENT = 1, 20, 100
DEFAULT_WINDOW = 20  # limits.max_inflight_messages by default


def constrained_config() -> Config:
    override = ClientOverride(
        client_id="devices/constrained-*",
        max_inflight_messages=WINDOW,
        max_queued_messages=QUEUE,
        overflow_policy="drop_new",
    )
    # the device withholds its acks until the whole burst is routed, so it holds the
    # publisher (flow control) until it counts as stalled: keep that wait short
    return attrs.evolve(make_config(stalled_output_timeout_s=0.5), client_overrides=(override,))


async def publish_burst(client: RawClient, topic: str, payloads: list[bytes]) -> None:
    """Send every QoS 1 PUBLISH at once (one write), then wait for every PUBACK: when this
    returns, the broker has routed all of them."""
    ids = [client.packet_id() for _ in payloads]
    packets = [Publish(topic, p, 1, packet_id=i) for p, i in zip(payloads, ids, strict=True)]
    await client.send(b"".join(p.encode() for p in packets))
    acks = [(await client.expect(PubAck)).packet_id for _ in payloads]
    assert acks == ids


async def test_constrained_device_gets_window_1_and_20_queued_drop_new_keeps_the_oldest():
    payloads = [f"cmd {i:03d}".encode() for i in range(SENT)]
    marker = b"after the drain"
    async with running(constrained_config()) as broker:
        with trio.fail_after(30):
            hold = trio.Event()  # the device acknowledges nothing until the burst is routed
            device = ConstrainedDevice(
                "127.0.0.1", broker.port, DEVICE_ID, "cmd/#",
                ack_delay_s=0.02, rcvbuf=4096, count=QUEUE + WINDOW + 1, hold_acks=hold,
            )
            normal, _ = await RawClient.connected(broker.port, "normal-1", keepalive_s=0)
            await normal.subscribe("cmd/#", qos=1)
            publisher, _ = await RawClient.connected(broker.port, "publisher", keepalive_s=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(device.run)
                await publish_burst(publisher, "cmd/x", payloads)

                # constrained: 1 sent and unacknowledged + 20 queued; the 79 newer dropped
                stats = broker.client_stats(DEVICE_ID)
                assert stats is not None
                assert (stats["inflight"], stats["queued"], stats["dropped"]) == (1, 20, 79)
                assert stats["sent"] == 1 and stats["dropped_qos0"] == 0
                assert broker.stats()["dropped"] == 79

                # a client matching no override: the default window, nothing dropped
                unacked = [await normal.expect(Publish) for _ in range(DEFAULT_WINDOW)]
                assert [p.payload for p in unacked] == payloads[:DEFAULT_WINDOW]
                normal_stats = broker.client_stats("normal-1")
                assert normal_stats is not None
                assert normal_stats["inflight"] == DEFAULT_WINDOW  # 20 unacked at once
                assert normal_stats["queued"] == SENT - DEFAULT_WINDOW
                assert normal_stats["dropped"] == 0
                got = []
                for packet in unacked:
                    await normal.send(PubAck(packet.packet_id))
                    got.append(packet.payload)
                while len(got) < SENT:
                    packet = await normal.expect(Publish)
                    await normal.send(PubAck(packet.packet_id))
                    got.append(packet.payload)
                assert got == payloads

                # the device drains 1 + 20 at its own pace, then gets what comes next
                hold.set()
                await device.wait_received(WINDOW + QUEUE)
                await publisher.publish("cmd/x", marker, qos=1)
            # device.run returned: it received and acknowledged count messages
            assert device.payloads == [*payloads[: WINDOW + QUEUE], marker]
            assert device.max_unacked == 1 and device.violations == 0
            assert device.duplicates == 0 and device.acked == WINDOW + QUEUE + 1
            assert broker.stats()["dropped"] == 79  # nothing more dropped, for anyone
            await normal.aclose()
            await publisher.aclose()


async def test_constrained_device_command_line():
    """``python -m devices.constrained`` against the broker: window 1, all received, exit 0."""
    async with running(constrained_config()) as broker:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "devices.constrained", "--host", "127.0.0.1",
             "--port", str(broker.port), "--client-id", DEVICE_ID, "--topic", "cmd/#",
             "--ack-delay-ms", "5", "--rcvbuf", "4096", "--count", "10"],
            cwd=ROOT, stdout=subprocess.PIPE,
        )
        out = bytearray()
        try:
            with trio.fail_after(20):
                while b"subscribed" not in out:
                    chunk = await proc.stdout.receive_some(4096)
                    assert chunk, f"device exited early: {out.decode()}"
                    out += chunk
                publisher, _ = await RawClient.connected(broker.port, "publisher", keepalive_s=0)
                for i in range(10):  # one at a time: each fits the queue, nothing is dropped
                    await publisher.publish("cmd/y", b"%d" % i, qos=1)
                while chunk := await proc.stdout.receive_some(4096):
                    out += chunk
                assert await proc.wait() == 0, out.decode()
            text = out.decode()
            assert "done: received 10, acknowledged 10, max unacked 1, violations 0, " \
                "duplicates 0" in text, text
            assert broker.stats()["dropped"] == 0
            await publisher.aclose()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
