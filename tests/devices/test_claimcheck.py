"""The claim-check example (``devices/claimcheck.py``): a file too large for the broker's
packet limit travels as a reference (URL, SHA-256, size) through a real broker, and the
consumer fetches and verifies it; a file changed in the store is rejected, not kept."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import trio

from devices import claimcheck
from devices.client import Client, ConnectionLost
from mqttd.broker import running
from tests.conftest import make_config

TIMEOUT_S = 30.0
LIMIT = 64 * 1024


async def test_a_large_file_travels_as_a_verified_claim_check(tmp_path, caplog) -> None:
    blob = tmp_path / "firmware-2.1.bin"
    blob.write_bytes(os.urandom(1024 * 1024))
    out = tmp_path / "received"
    lines: list[str] = []
    async with running(make_config(max_packet_size_bytes=LIMIT)) as broker:
        with trio.fail_after(TIMEOUT_S):
            # the file itself is too large: the broker closes the connection and its log
            # line points to this pattern
            direct = Client("127.0.0.1", broker.port, "direct", keepalive_s=0)
            with caplog.at_level(logging.WARNING, "mqttd"), pytest.raises(ConnectionLost):
                async with direct.connected():
                    await direct.publish("site/direct/files", blob.read_bytes(), qos=1)
                    await direct.wait_acked()
            assert any("claim check" in r.getMessage() for r in caplog.records)

            async with trio.open_nursery() as nursery:
                async def consume(task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
                    result = await claimcheck.fetch(
                        "127.0.0.1", broker.port, out, count=2, report=lines.append,
                        task_status=task_status,
                    )
                    assert result == (1, 1)

                await nursery.start(consume)
                # the command line sends it (python -m devices claim-check send)
                sent = await trio.run_process(
                    [sys.executable, "-m", "devices", "claim-check", "send", str(blob),
                     "-p", str(broker.port), "--store", str(tmp_path / "store")],
                    capture_stdout=True, capture_stderr=True,
                )
                assert "claim check published on site/sensor-0001/files" in sent.stdout.decode()
                # a second claim check whose stored bytes were changed afterwards
                other = tmp_path / "other.bin"
                other.write_bytes(b"original")
                tampered = claimcheck.store_file(other, tmp_path / "store")
                (tmp_path / "store" / tampered.sha256).write_bytes(b"changed!")
                sender = Client("127.0.0.1", broker.port, "sensor-0002", keepalive_s=0)
                async with sender.connected():
                    await sender.publish("site/sensor-0002/files", tampered.encode(), qos=1)
                    await sender.wait_acked()
    assert (out / "firmware-2.1.bin").read_bytes() == blob.read_bytes()
    assert not (out / "other.bin").exists()
    assert sorted(os.listdir(out)) == ["firmware-2.1.bin"]  # no partial file left behind
    assert any("sha256 verified" in line for line in lines)
    assert any("rejected" in line and "other.bin" in line for line in lines)


def test_a_claim_check_names_no_path_outside_the_output(tmp_path) -> None:
    source = tmp_path / "a.txt"
    source.write_bytes(b"hello")
    check = claimcheck.store_file(source, tmp_path / "store")
    sneaky = claimcheck.ClaimCheck(check.url, check.sha256, check.size, "../../etc/evil")
    target = claimcheck.fetch_verified(sneaky, tmp_path / "out")
    assert target == tmp_path / "out" / "evil" and target.read_bytes() == b"hello"
    with pytest.raises(ValueError, match="not a file or http"):
        claimcheck.fetch_verified(
            claimcheck.ClaimCheck("ftp://x/y", check.sha256, 5, "y"), tmp_path / "out"
        )
    with pytest.raises(ValueError, match="not a claim check"):
        claimcheck.ClaimCheck.decode(b'{"url": "file:///x"}')
    assert claimcheck.ClaimCheck.decode(check.encode()) == check
