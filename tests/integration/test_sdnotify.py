"""systemd's notify protocol: the notifier's addresses and watchdog settings."""

from __future__ import annotations

import secrets
import socket

import pytest

from mqttd.server.sdnotify import Notifier, socket_address, watchdog_interval_s


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n") if line)


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
