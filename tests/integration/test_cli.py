"""The ``mqttd`` command as a subprocess: start, serve, stop on a signal; config checks."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from mqttd.codec.packets import Publish
from tests.rawclient import RawClient

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


async def start_broker(*args: str) -> tuple[trio.Process, int, bytearray]:
    """Start ``python -m mqttd`` on a free port; return the process, its port, its log."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mqttd", "--host", "127.0.0.1", "-p", "0", *args],
        stderr=subprocess.PIPE,
    )
    log = bytearray()
    with trio.fail_after(30):  # python start-up, generous for a loaded machine
        while not (match := LISTENING.search(log)):
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, f"broker exited early: {log.decode()}"
            log += chunk
    return proc, int(match.group(1)), log


async def drain(proc: trio.Process, log: bytearray) -> None:
    while chunk := await proc.stderr.receive_some(4096):
        log += chunk


async def test_command_serves_and_stops_in_order_on_sigterm(tmp_path):
    proc, port, log = await start_broker("--data-dir", str(tmp_path))
    try:
        with trio.fail_after(30):
            sub, _ = await RawClient.connected(port, "cli-sub")
            await sub.subscribe("cli/#", qos=1)
            pub, _ = await RawClient.connected(port, "cli-pub")
            await pub.publish("cli/x", b"via the command", qos=1)
            assert (await sub.expect(Publish)).payload == b"via the command"
            proc.send_signal(signal.SIGTERM)
            assert await sub.expect_closed() == []
            await drain(proc, log)
            assert await proc.wait() == 0
        text = log.decode()
        assert "received SIGTERM" in text
        assert text.index("shutting down") < text.index("mqttd stopped")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigint_stops_the_broker(tmp_path):
    proc, _port, log = await start_broker("--data-dir", str(tmp_path))
    try:
        with trio.fail_after(30):
            proc.send_signal(signal.SIGINT)
            await drain(proc, log)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqttd", *args], capture_output=True, text=True, timeout=30
    )


def test_check_config_accepts_the_default_file():
    result = run_cli("--check-config", str(CONFIG_DIR / "mqttd.yaml"))
    assert result.returncode == 0
    assert "configuration OK" in result.stdout


def test_check_config_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_inflight_messages: lots\n")
    result = run_cli("--check-config", str(bad))
    assert result.returncode == 1
    assert "limits.max_inflight_messages: expected int, got 'lots'" in result.stderr


def test_check_config_prints_every_problem_one_per_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    tls = f"{{certfile: {tmp_path}/no.pem, keyfile: {tmp_path}/no.key}}"
    bad.write_text(
        "limits: {max_inflight_messages: 0, max_queued_mesages: 5}\n"
        f"listeners: [{{port: 0, tls: {tls}}}]\n"
    )
    result = run_cli("--check-config", str(bad))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{bad}: listeners[0].tls.certfile: cannot read '{tmp_path}/no.pem': No such file or "
        "directory",
        f"{bad}: listeners[0].tls.keyfile: cannot read '{tmp_path}/no.key': No such file or "
        "directory",
        f"{bad}: limits.max_inflight_messages: must be at least 1, got 0",
        f"{bad}: limits.max_queued_mesages: unknown key (did you mean max_queued_messages?)",
    ]
    good = tmp_path / "good.yaml"
    good.write_text("listeners: [{port: 0}]\n")
    result = run_cli("--check-config", str(good))
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"{good}: configuration OK\n", ""
    )


def test_bad_config_file_refuses_to_start(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners:\n  - port: 99999\n")
    result = run_cli("-c", str(bad))
    assert result.returncode == 1
    assert "listeners[0].port: must be between 0 and 65535, got 99999" in result.stderr


def test_address_in_use_names_the_listener(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--host", "127.0.0.1", "-p", str(port), "--data-dir", str(tmp_path))
        assert result.returncode == 1
        assert (
            f"cannot start: listeners[0] 127.0.0.1:{port}: address already in use"
            in result.stderr
        )
        result = run_cli(
            "--host", "127.0.0.1", "-p", "0", "--http-port", str(port),
            "--data-dir", str(tmp_path),
        )
        assert result.returncode == 1
        assert f"cannot start: http 127.0.0.1:{port}: address already in use" in result.stderr


def test_second_listener_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "two.yaml"
        config.write_text(
            f"listeners: [{{port: 0}}, {{port: {port}}}]\nhttp: {{enabled: false}}\n"
            f"persistence: {{data_dir: {tmp_path}}}\n"
        )
        result = run_cli("-c", str(config))
        assert result.returncode == 1
        assert (
            f"cannot start: listeners[1] 127.0.0.1:{port}: address already in use"
            in result.stderr
        )


def test_database_from_a_newer_mqttd_is_refused_with_a_clear_message(tmp_path):
    from persistence.store import SqliteStore

    store = SqliteStore.open(tmp_path / "mqttd.db")
    store.conn.execute("UPDATE schema_version SET version = version + 1")
    store.close()
    result = run_cli("--host", "127.0.0.1", "-p", "0", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "newer mqttd" in result.stderr


def test_version_and_help_name_the_protocols():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("mqttd 0.")
    result = run_cli("--help")
    assert "MQTT 3.1.1, 3.1 and 5.0" in result.stdout


def cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``mqttd ARGS`` in this process (no interpreter start-up): exit status, out, err."""
    from mqttd.__main__ import main

    try:
        status = main(list(args))
    except SystemExit as exc:  # argparse: --help, usage errors
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def test_help_lists_the_commands(capsys):
    status, out, _ = cli_in_process(capsys, "--help")
    assert status == 0 and "MQTT 3.1.1, 3.1 and 5.0" in out
    assert re.findall(r"^ {4}(\w+) +\S", out, re.MULTILINE) == ["serve", "check", "passwd", "ctl"]
    status, out, _ = cli_in_process(capsys, "serve", "--help")
    assert status == 0 and "--data-dir" in out and "usage: mqttd serve" in out


def test_check_command_is_check_config(tmp_path, capsys):
    status, out, _ = cli_in_process(capsys, "check", str(CONFIG_DIR / "mqttd.yaml"))
    assert status == 0 and "configuration OK" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_inflight_messages: lots\n")
    for args in (("check", str(bad)), ("--check-config", str(bad))):
        status, _, err = cli_in_process(capsys, *args)
        assert status == 1
        assert "limits.max_inflight_messages: expected int, got 'lots'" in err
    status, _, err = cli_in_process(capsys, "check", str(tmp_path / "missing.yaml"))
    assert status == 1 and "cannot read" in err
    status, _, err = cli_in_process(capsys, "check")
    assert status == 2 and "FILE" in err


def test_an_unknown_command_is_refused(capsys):
    status, _, err = cli_in_process(capsys, "chek", "mqttd.yaml")
    assert status == 2 and "unknown command 'chek'" in err


def test_ctl_gets_the_rest_of_the_command_line(monkeypatch):
    import mqttd.ctl
    from mqttd.__main__ import main

    seen = []
    monkeypatch.setattr(mqttd.ctl, "main", lambda argv: seen.append(argv) or 3)
    assert main(["ctl", "clients", "-c", "x", "--help"]) == 3
    assert seen == [["clients", "-c", "x", "--help"]]


BANNER = re.compile(
    rb"mqttd \S+ serving MQTT 3.1.1, 3.1 and 5.0\n"
    rb"  config: +built-in defaults\n"
    rb"  mqtt: +127\.0\.0\.1:(\d+) tcp, anonymous clients allowed\n"
    rb"  dashboard: +http://127\.0\.0\.1:(\d+)/ .*\n"
    rb"  store: +(\S+) \(SQLite"
)


async def test_serve_logs_a_banner_with_the_bound_ports(tmp_path):
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mqttd", "serve", "-p", "0", "--http-port", "0",
         "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
    )
    log = bytearray()
    try:
        with trio.fail_after(30):  # python start-up, generous for a loaded machine
            while not (match := BANNER.search(log)):
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, f"broker exited early: {log.decode()}"
                log += chunk
            port, http_port = int(match.group(1)), int(match.group(2))
            assert match.group(3).decode() == str(tmp_path / "mqttd.db")
            assert port not in (0, 1883) and http_port not in (0, 18083)
            sub, _ = await RawClient.connected(port, "banner")  # the ports are real
            await sub.aclose()
            stream = await trio.open_tcp_stream("127.0.0.1", http_port)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
            await stream.aclose()
            proc.send_signal(signal.SIGTERM)
            await drain(proc, log)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
