"""systemd's notify protocol: the broker as a subprocess under a fake systemd (a unix
datagram socket in tmp_path), and the notifier's addresses and watchdog settings."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import time

import pytest
import trio

from mqttd.server.sdnotify import Notifier, socket_address, watchdog_interval_s


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n") if line)


async def expect(sock: trio.socket.SocketType, key: str) -> dict[str, str]:
    """The next notification carrying ``key``; WATCHDOG=1 pings before it are skipped,
    anything else fails."""
    while True:
        fields = _fields(await sock.recv(4096))
        if key in fields:
            return fields
        assert fields == {"WATCHDOG": "1"}, f"expected {key}, got {fields}"


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def test_ready_watchdog_reload_and_stop_are_notified(tmp_path):
    path = tmp_path / "notify.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(path))
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    log_path = tmp_path / "broker.log"
    with sock, open(log_path, "wb") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "mqttd", "--host", "127.0.0.1", "-p", "0",
             "--data-dir", str(tmp_path / "data")],
            env=env, stderr=log,
        )
        try:
            with trio.fail_after(30):  # python start-up, generous for a loaded machine
                ready = await expect(sock, "READY")
                assert ready["READY"] == "1"
                assert ready["STATUS"].startswith("serving MQTT on 127.0.0.1:")
                assert _fields(await sock.recv(4096)) == {"WATCHDOG": "1"}  # the next one
                before = monotonic_usec()
                proc.send_signal(signal.SIGHUP)
                reloading = await expect(sock, "RELOADING")
                assert reloading["RELOADING"] == "1"
                assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
                assert (await expect(sock, "READY"))["READY"] == "1"
                proc.send_signal(signal.SIGTERM)
                assert (await expect(sock, "STOPPING"))["STOPPING"] == "1"
                assert await proc.wait() == 0, log_path.read_text()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_abstract_socket_address():
    assert socket_address("@mqttd/notify") == "\0mqttd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("vsock:2:1234") is None
    assert socket_address("@") is None
    name = f"mqttd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(10)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        try:
            notifier.ready("serving")
            assert _fields(receiver.recv(4096)) == {"READY": "1", "STATUS": "serving"}
        finally:
            notifier.close()


def test_no_notify_socket_does_nothing():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and not notifier.send("READY=1")


def test_a_missing_socket_is_not_an_error(tmp_path, caplog):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    try:
        assert not notifier.send("READY=1") and not notifier.send("WATCHDOG=1")
    finally:
        notifier.close()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("environ", "interval_s"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(environ, interval_s):
    assert watchdog_interval_s(environ, 4242) == interval_s
