"""When the store has no room (its disk budget reached, or its filesystem full), the broker
keeps running: what needs storing is refused to MQTT 5 publishers (PUBACK 0x97 Quota
exceeded) and held for 3.1.1 publishers (no PUBACK until it can be stored); everything that
needs no disk goes on; when room returns it continues by itself; nothing acknowledged is
lost.

Two ways to run out of room: ``persistence.max_disk_bytes`` (in process, on the real disk),
and an 8 MiB tmpfs as the data directory of a broker subprocess (in a private mount
namespace made with ``unshare``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import trio

from mqttd.broker import running
from mqttd.codec.packets import (
    PROTOCOL_5,
    PubAck,
    Publish,
)
from mqttd.config import Config, Listener, Persistence
from tests.conftest import NO_HTTP
from tests.rawclient import RawClient

TIMEOUT_S = 60.0
QUOTA_EXCEEDED = 0x97
PAYLOAD_SIZE = 4096
LISTENING = re.compile(rb"mqttd listening on 127\.0\.0\.1:(\d+)")


def body(n: int) -> bytes:
    return str(n).encode().ljust(PAYLOAD_SIZE, b".")


def number(payload: bytes) -> int:
    return int(payload.rstrip(b"."))


async def persistent_subscriber(port: int, client_id: str, topic: str) -> None:
    """Subscribe with a persistent session (clean session 0) and go away."""
    client, _ = await RawClient.connected(port, client_id, clean_session=False, keepalive_s=0)
    await client.subscribe(topic, qos=1)
    await client.aclose()


async def publish_until_refused(client: RawClient, topic: str, limit: int) -> list[int]:
    """Publish numbered QoS 1 messages one at a time until one is answered 0x97; returns the
    numbers answered with success (those the broker took responsibility for)."""
    acked: list[int] = []
    for n in range(limit):
        pid = client.packet_id()
        await client.send(Publish(topic, body(n), 1, packet_id=pid))
        ack = await client.take(PubAck, packet_id=pid, timeout_s=TIMEOUT_S)
        if ack.reason_code == QUOTA_EXCEEDED:  # type: ignore[attr-defined]
            return acked
        assert ack.reason_code in (0, 0x10), ack  # type: ignore[attr-defined]
        acked.append(n)
    raise AssertionError(f"{limit} messages taken, none refused")


async def drain(port: int, client_id: str, until: int) -> list[int]:
    """Resume a persistent session and acknowledge messages until ``until`` has arrived;
    returns the distinct message numbers received, in arrival order."""
    client, connack = await RawClient.connected(port, client_id, clean_session=False,
                                                keepalive_s=0)
    assert connack.session_present
    seen: list[int] = []
    while until not in seen:
        packet = await client.take(Publish, timeout_s=TIMEOUT_S)
        await client.send(PubAck(packet.packet_id))  # type: ignore[attr-defined]
        n = number(packet.payload)  # type: ignore[attr-defined]
        if n not in seen:
            seen.append(n)
    await client.aclose()
    return seen


async def test_disk_budget_refuses_5_holds_311_serves_clean_sessions_and_resumes(
    tmp_path: Path,
) -> None:
    config = Config(
        listeners=(Listener(host="127.0.0.1", port=0),),
        persistence=Persistence(
            data_dir=str(tmp_path), max_disk_bytes=1024 * 1024, min_free_disk_bytes=0,
            storage_check_interval_s=0.05,
        ),
        http=NO_HTTP,
    )
    with trio.fail_after(TIMEOUT_S):
        async with running(config) as broker:
            port = broker.port
            await persistent_subscriber(port, "offline", "data/#")
            pub5, _ = await RawClient.connected(port, "pub5", keepalive_s=0,
                                                protocol_level=PROTOCOL_5)
            acked = await publish_until_refused(pub5, "data/x", 2000)
            assert acked and not broker.storage_ok
            assert broker.stats()["storage_refused"] == 1
            assert broker.client_stats("pub5")["publishes_refused"] == 1  # type: ignore[index]

            # what needs no disk goes on: clean sessions, QoS 0 and 1
            chat_sub, _ = await RawClient.connected(port, "chat-sub", keepalive_s=0)
            await chat_sub.subscribe("chat/#", qos=1)
            chat_pub, _ = await RawClient.connected(port, "chat-pub", keepalive_s=0)
            await chat_pub.publish("chat/x", b"hello", qos=1)
            await chat_pub.publish("chat/x", b"again", qos=0)
            got = [await chat_sub.take(Publish) for _ in range(2)]
            assert [p.payload for p in got] == [b"hello", b"again"]  # type: ignore[attr-defined]

            # a 3.1.1 publisher of what needs storing is held: not read, not acknowledged
            pub3, _ = await RawClient.connected(port, "pub3", keepalive_s=0)
            held_id = pub3.packet_id()
            await pub3.send(Publish("data/x", body(100_000), 1, packet_id=held_id))
            conn3 = next(c for c in broker.connections if c.client_id == "pub3")
            while conn3.held_by != {broker.store_gate}:
                await trio.sleep(0.01)  # polled: until its PUBLISH is handled
            assert broker.stats()["storage_holds"] == 1

            # the subscriber takes everything: room again, the held message goes through
            seen = await drain(port, "offline", until=100_000)
            assert set(acked) <= set(seen)  # nothing acknowledged lost
            assert [n for n in seen if n in acked] == acked  # in order
            await pub3.take(PubAck, packet_id=held_id, timeout_s=TIMEOUT_S)
            assert broker.storage_ok
            more = await publish_until_refused_or(pub5, "data/x", 3)
            assert more == [0, 1, 2]  # accepted again
            for client in (pub5, pub3, chat_pub, chat_sub):
                await client.aclose()


async def publish_until_refused_or(client: RawClient, topic: str, count: int) -> list[int]:
    """Publish ``count`` messages; the numbers answered with success."""
    acked = []
    for n in range(count):
        pid = client.packet_id()
        await client.send(Publish(topic, body(n), 1, packet_id=pid))
        ack = await client.take(PubAck, packet_id=pid, timeout_s=TIMEOUT_S)
        if ack.reason_code < 0x80:  # type: ignore[attr-defined]
            acked.append(n)
    return acked


# -- an 8 MiB filesystem ----------------------------------------------------------------------


def unshare_prefix() -> list[str]:
    """Run a command in a private mount namespace (as root; else as root of a new user
    namespace), where it may mount a tmpfs that nobody else sees."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed for the small-filesystem test"
    return [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user",
                                                             "--mount"]


async def test_an_8_mib_filesystem_fills_up_and_the_broker_keeps_serving(tmp_path: Path) -> None:
    """The issue's scenario: the data directory on an 8 MiB filesystem, a persistent
    subscriber offline, a 5.0 publisher sending QoS 1 until the disk is full. The broker
    answers 0x97 instead of exiting, clean sessions are served throughout, and when the
    subscriber comes back and takes its messages the room comes back: every acknowledged
    message arrives and new ones are accepted again."""
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "mqttd.yaml"
    config.write_text(
        f"persistence:\n  data_dir: {data}\n  min_free_disk_bytes: 1048576\n"
        "  storage_check_interval_s: 0.05\n"
    )
    script = (
        f"mount -t tmpfs -o size=8m tmpfs {data} && "
        f"exec {sys.executable} -m mqttd -c {config} --host 127.0.0.1 -p 0"
    )
    proc = await trio.lowlevel.open_process(
        [*unshare_prefix(), "sh", "-c", script], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = bytearray()
    try:
        with trio.fail_after(TIMEOUT_S * 2):
            assert proc.stdout is not None
            while not (match := LISTENING.search(log)):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"broker exited:\n{log.decode(errors='replace')}"
                log += chunk
            port = int(match.group(1))
            async with trio.open_nursery() as nursery:
                async def keep_reading() -> None:
                    while chunk := await proc.stdout.receive_some(65536):  # type: ignore[union-attr]
                        log.extend(chunk)
                nursery.start_soon(keep_reading)
                await persistent_subscriber(port, "offline", "data/#")
                pub5, _ = await RawClient.connected(port, "pub5", keepalive_s=0,
                                                    protocol_level=PROTOCOL_5)
                acked = await publish_until_refused(pub5, "data/x", 10_000)
                assert len(acked) > 500  # ~7 MiB of 4 KiB messages went in first
                chat_sub, _ = await RawClient.connected(port, "chat-sub", keepalive_s=0)
                await chat_sub.subscribe("chat/#", qos=1)
                chat_pub, _ = await RawClient.connected(port, "chat-pub", keepalive_s=0)
                await chat_pub.publish("chat/x", b"still here", qos=1)
                assert (await chat_sub.take(Publish)).payload == b"still here"  # type: ignore[attr-defined]
                seen = await drain(port, "offline", until=acked[-1])
                assert [n for n in seen if n in set(acked)] == acked
                more = await publish_until_refused_or(pub5, "data/x", 3)
                assert more == [0, 1, 2]
                for client in (pub5, chat_pub, chat_sub):
                    await client.aclose()
                nursery.cancel_scope.cancel()
        assert proc.returncode is None, "the broker exited"
        assert b"storage is short" in log
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
