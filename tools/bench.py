"""Side-by-side benchmark: mqttd, mosquitto and amqtt on 127.0.0.1, same scenarios, one run.

    python -m tools.bench [--size full|quick|tiny] [--brokers mqttd,mosquitto,amqtt]
                            [--scenarios fanin_qos0,...] [--generator c|python]
                            [--repeats N] [--output bench/results.json]

Each (scenario, broker) pair gets a fresh broker process at its default configuration
(its own temporary directory, config file and free port), a load generator (the C one of
``tools/cloadgen.c``, built by ``tools/cgen.py``, for the message scenarios when a C
compiler exists, for the message and connection scenarios; else, and for the device
scenarios, ``tools/loadgen.py`` in several worker processes), and a SIGTERM (then SIGKILL)
at the end; brokers run one at a time so they never compete for the cores. The scenarios
of issue 18's goals run ``--repeats`` times (3 at the full size), the brokers interleaved,
and each row is the median run. Prints Markdown tables and writes the results as JSON
(every run kept). See ``bench/README.md`` for the columns and what each broker promises.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import getpass
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from tools import cgen, loadgen, wqgen

SCENARIOS = (
    "fanin_qos0", "fanin_qos1", "durable_qos1", "fanout", "latency", "connections",
    "connections_max", "constrained", "shared_qos1", "workqueue", "cluster_qos1",
    "cluster_latency",
)
# the scenarios of issue 18's goals: run ``repeats`` times per broker (interleaved: mqttd,
# mosquitto, amqtt, then again), each row the median run by MEDIAN_KEYS; the others once
REPEATED_SCENARIOS = (
    "fanin_qos0", "fanin_qos1", "durable_qos1", "fanout", "latency", "connections",
    "connections_max",
)
THROUGHPUT_SCENARIOS = ("fanin_qos0", "fanin_qos1", "durable_qos1", "fanout")
CONNECTION_SCENARIOS = ("connections", "connections_max")
# (key, higher is better) the median run is chosen by; connections: RSS per connection is
# the median over the runs as well (``MEDIAN_ALSO``)
MEDIAN_KEYS = {
    **dict.fromkeys(THROUGHPUT_SCENARIOS, ("msgs_per_cpu_s", True)),
    "latency": ("p99_ms", False),
    "connections": ("connects_per_s", True),
    "connections_max": ("connected", True),
}
MEDIAN_ALSO = {"connections": ("rss_per_conn_kib",), "connections_max": ("rss_per_conn_kib",)}
# connections_max: the broker's RLIMIT_NOFILE asked for is the target plus this (its own
# files, listeners, database)
NOFILE_HEADROOM = 1024
# 2 mqttd nodes + 3 nats-server against 1 mqttd, the same load (tools/benchcluster.py):
# mqttd only, two rows each ("mqttd": one node, "mqttd-cluster"), a table of their own
CLUSTER_SCENARIOS = ("cluster_qos1", "cluster_latency")
CLUSTER_ROW = "mqttd-cluster"
# consumer groups as work queues (tools/wqgen.py): mqttd only, the one compared with itself
WORK_QUEUE_SCENARIOS = ("shared_qos1", "workqueue")
WORK_QUEUE_WORKERS = 4
WORK_QUEUE_REJECT_EVERY = 10  # every 10th job rejected once (10%)
WORK_QUEUE_RETRY_S = 0.05  # mqttd's work_queues.retry_delay_initial_s in these two rows
BROKERS = ("mqttd", "mosquitto", "amqtt")
DEFAULT_OUTPUT = os.path.join("bench", "results.json")
TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # whose mqttd is measured
GENERATORS = ("c", "python")
# Every broker runs at its default configuration: nothing here changes a limit.
MOSQUITTO_DEFAULT_INFLIGHT = 20  # mosquitto 2.0's max_inflight_messages (global)
MOSQUITTO_DEFAULT_QUEUED = 1000  # and max_queued_messages: it drops beyond that
CPU_BOUND_PCT = 95.0  # a peer at this % of a core or more is the limit, not the generator
# a window shorter than this cannot say whether the broker was CPU-bound: its CPU time comes
# in 10 ms ticks, sampled every 10 ms (about +-7% of a core at 0.3 s; 10,000 connections
# to mosquitto take 0.3-0.6 s)
CPU_BOUND_MIN_S = 0.3
START_TIMEOUT_S = 30.0
# constrained scenario: the devices of devices/constrained.py; mqttd gives them a window of
# DEVICE_WINDOW through client_overrides, the other brokers have no per-client window
DEVICE_PATTERN = "devices/constrained-*"
DEVICE_WINDOW = 1
DEVICE_ACK_DELAY_S = 0.002
DEVICE_RCVBUF = 4096
STOP_TIMEOUT_S = 15.0


@dataclasses.dataclass(frozen=True)
class Size:
    publishers: int
    messages: int  # per publisher, in the fan-in scenarios
    window: int  # unacknowledged QoS 1 messages per publisher
    fanout_subscribers: int
    fanout_messages: int
    latency_rate: float  # msg/s
    latency_s: float
    connections: int
    timeout_s: float  # per scenario, measured window
    amqtt_divisor: int  # amqtt gets messages / divisor in the message scenarios
    publisher_procs: int = 2
    subscriber_procs: int = 4  # fan-out
    connection_procs: int = 4
    # constrained: devices x commands (QoS 1), during telemetry publishers x messages (QoS 0)
    devices: int = 20
    device_commands: int = 50
    telemetry_publishers: int = 2
    # enough that the telemetry outlasts the commands (at 20k, mqttd's window-1 commands
    # were still going when the telemetry was over)
    telemetry_messages: int = 100_000
    # cluster_qos1: publishers x cluster_messages (fanin_qos1's load at the full size)
    cluster_messages: int = 50_000
    # connections_max: idle connections tried (issue 18: 100,000 held), as many held as
    # the broker's fd limit allows
    max_connections: int = 100_000
    repeats: int = 1  # runs of each REPEATED_SCENARIOS row per broker (the median is shown)


SIZES = {
    "full": Size(10, 50_000, 32, 1000, 1000, 1000.0, 10.0, 10_000, 120.0, 5, repeats=3),
    "quick": Size(2, 5000, 32, 100, 100, 1000.0, 2.0, 500, 10.0, 1, 2, 2, 2,
                  telemetry_messages=20_000, cluster_messages=2000),
    "tiny": Size(2, 200, 16, 10, 20, 1000.0, 0.3, 50, 10.0, 1, 1, 1, 1,
                 devices=5, device_commands=10, telemetry_messages=200, cluster_messages=100,
                 max_connections=100),
}

DESCRIPTIONS = {
    "fanin_qos0": "fan-in QoS 0: {publishers} publishers x {messages} msgs x 64 B to distinct "
                  "topics, 1 subscriber on bench/#",
    "fanin_qos1": "fan-in QoS 1: {publishers} publishers x {messages} msgs, window {window} "
                  "unacked each, 1 QoS 1 subscriber acking",
    "durable_qos1": "durable QoS 1: as fan-in QoS 1 with a persistent-session subscriber "
                    "(clean session 0)",
    "fanout": "fan-out: 1 QoS 0 publisher x {fanout_messages} msgs, {fanout_subscribers} "
              "subscribers on one topic (deliveries/s)",
    "latency": "latency: 1 QoS 0 publisher at {latency_rate:.0f} msg/s for {latency_s:g} s, "
               "1 subscriber, end to end",
    "connections": "connections: {connections} idle clients (keepalive 0), connect rate and "
                   "broker RSS per connection",
    "connections_max": "most idle connections: {max_connections} idle clients (keepalive 0) "
                       "tried, as many held as the broker's fd limit (RLIMIT_NOFILE, raised as "
                       "far as allowed) lets it; broker RSS per held connection",
    "constrained": "constrained devices: {devices} devices (`devices/constrained-N`, acks one "
                   f"at a time {DEVICE_ACK_DELAY_S * 1000:g} ms after each PUBLISH, SO_RCVBUF "
                   f"{DEVICE_RCVBUF}, window {DEVICE_WINDOW} where the broker can set one per "
                   "client) x {device_commands} QoS 1 commands on `cmd/N` "
                   "from 1 publisher, while {telemetry_publishers} publishers x "
                   "{telemetry_messages} msgs x 64 B of QoS 0 telemetry fan in to 1 subscriber "
                   "on bench/#",
    "shared_qos1": "shared subscription: {publishers} publishers x {messages} QoS 1 jobs, "
                   f"window {{window}}, to a group of {WORK_QUEUE_WORKERS} MQTT 5.0 workers "
                   "(`$share/bench/bench/#`) acknowledging every job",
    "workqueue": "work queue: as shared_qos1, but every "
                 f"{WORK_QUEUE_REJECT_EVERY}th job is rejected once (PUBACK 0x80) and retried by "
                 f"the broker (work_queues.retry_delay_initial_s {WORK_QUEUE_RETRY_S:g} in both "
                 "rows; the jobs count once acknowledged)",
    "cluster_qos1": "cluster QoS 1: {publishers} publishers x {cluster_messages} msgs x 64 B, "
                    "window {window} unacked each, on node 1; 1 QoS 1 subscriber on bench/# "
                    "acking, on node 2 (every message crosses nodes through NATS); against 1 "
                    "mqttd with the same load",
    "cluster_latency": "cluster latency: 1 QoS 0 publisher at {latency_rate:.0f} msg/s for "
                       "{latency_s:g} s on node 1, 1 subscriber on node 2, end to end; "
                       "against 1 mqttd with the same load",
}

# what bounds the devices' window on each broker in the constrained scenario
DEVICE_WINDOWS = {
    "mqttd": f"{DEVICE_WINDOW} (client_overrides, devices only)",
    "mosquitto": f"{MOSQUITTO_DEFAULT_INFLIGHT} (global max_inflight_messages, its default)",
    "amqtt": "none (no setting)",
}

PROMISES = {
    "mqttd": "commits every QoS 1 message routed to a persistent session to SQLite (WAL, "
             "synchronous=NORMAL, group commits) before its PUBACK: nothing acknowledged is "
             "lost if the broker process is killed",
    "mosquitto": "`persistence true`: messages are kept in RAM and written as a snapshot "
                 "(mosquitto.db) every autosave_interval (default 1800 s) and at a clean "
                 "shutdown; PUBACK does not wait for any write, so a crash loses what came "
                 "since the last snapshot",
    "amqtt": "no persistence: persistent sessions and their queues live in memory only (its "
             "optional SessionDBPlugin needs SQLAlchemy and saves sessions and retained "
             "messages, not each message before PUBACK); a restart loses them",
}


# -- /proc -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def nofile_limit(pid: int) -> int | None:
    """A process's soft RLIMIT_NOFILE (``Max open files`` in /proc/PID/limits; -1:
    unlimited)."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return -1 if soft == "unlimited" else int(soft)
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def listening_port(pid: int) -> int | None:
    """The TCP port a process listens on, from its socket fds and /proc/net/tcp."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    return int(fields[1].rsplit(":", 1)[1], 16)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- brokers -----------------------------------------------------------------------


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def amqtt_path() -> str | None:
    return shutil.which("amqtt", path=os.path.dirname(sys.executable)) or shutil.which("amqtt")


def broker_available(name: str) -> str | None:
    """None if the broker can run here, else why not."""
    if name == "mosquitto" and mosquitto_path() is None:
        return "mosquitto is not installed (apt-get install mosquitto): skipped"
    if name == "amqtt" and amqtt_path() is None:
        return "amqtt is not installed (pip install amqtt): skipped"
    return None


def broker_version(name: str) -> str:
    try:
        if name == "mosquitto":
            path = mosquitto_path()
            if path is None:
                return "not installed"
            out = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=10)
            found = re.search(r"version (\S+)", out.stdout + out.stderr)
            return found.group(1) if found else "unknown"
        return importlib.metadata.version(name)
    except (OSError, subprocess.SubprocessError, importlib.metadata.PackageNotFoundError):
        return "unknown"


class StartedInWith:
    """``with`` calls ``start`` and, at the end, ``stop``; a ``start`` that fails half-way
    is stopped too (``stop`` stops what did start), so that no process outlives the run."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Broker(StartedInWith):
    """One broker process in its own directory; ``with`` starts and always stops it."""

    def __init__(self, name: str, workdir: str, durable: bool, devices: bool = False,
                 work_queue: bool = False, nofile: int | None = None) -> None:
        self.name = name
        self.nofile = nofile  # RLIMIT_NOFILE to ask for (else: up to the hard limit)
        self.workdir = workdir
        self.durable = durable
        self.devices = devices  # mqttd: a client_overrides window for the constrained devices
        self.work_queue = work_queue  # mqttd: a short retry delay (WORK_QUEUE_RETRY_S)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = os.path.join(workdir, f"{name}.log")

    def command(self) -> list[str]:
        if self.name == "mqttd":
            config = os.path.join(self.workdir, "mqttd.yaml")
            with open(config, "w") as f:
                f.write("logging:\n  level: warning\n")  # the default limits, no overrides
                if self.devices:  # the devices' window only; everything else as default
                    f.write(
                        "client_overrides:\n"
                        f'  - client_id: "{DEVICE_PATTERN}"\n'
                        f"    max_inflight_messages: {DEVICE_WINDOW}\n"
                    )
                if self.work_queue:
                    f.write(f"work_queues:\n  retry_delay_initial_s: {WORK_QUEUE_RETRY_S}\n")
            return [sys.executable, "-m", "mqttd", "-c", config, "--host", "127.0.0.1",
                    "-p", "0", "--data-dir", os.path.join(self.workdir, "data")]
        self.port = free_port()
        if self.name == "mosquitto":
            config = os.path.join(self.workdir, "mosquitto.conf")
            # only what it needs to run as a test peer: every limit stays at its default
            lines = [
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                f"user {getpass.getuser()}",  # as root it would switch to user mosquitto
            ]
            if self.durable:  # the mode durable_qos1 compares
                lines += ["persistence true", f"persistence_location {self.workdir}/"]
            with open(config, "w") as f:
                f.write("\n".join(lines) + "\n")
            return [mosquitto_path() or "mosquitto", "-c", config]
        if self.name == "amqtt":
            config = os.path.join(self.workdir, "amqtt.yaml")
            with open(config, "w") as f:
                f.write(
                    "listeners:\n"
                    "  default:\n"
                    "    type: tcp\n"
                    f"    bind: 127.0.0.1:{self.port}\n"
                    "plugins:\n"
                    "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                    "    allow_anonymous: true\n"
                )
            return [amqtt_path() or "amqtt", "-c", config]
        raise ValueError(f"unknown broker {self.name!r}")

    def start(self) -> None:
        command = self.command()
        env = None
        if self.name == "mqttd":  # the tree this benchmark runs from, not an installed one
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (TREE, os.environ.get("PYTHONPATH")) if p
            )}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, preexec_fn=functools.partial(loadgen.prepare_child, self.nofile),
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start: {self.log_tail()}")
            if self.name == "mqttd" and not self.port:
                self.port = self._port_from_log() or listening_port(self.proc.pid) or 0
            if self.port and self._answers():
                return
            time.sleep(0.05)

    def _port_from_log(self) -> int | None:
        with open(self.log_path, "rb") as f:
            found = re.search(rb"listening on 127\.0\.0\.1:(\d+)", f.read())
        return int(found.group(1)) if found else None

    def _answers(self) -> bool:
        """True once an MQTT CONNECT gets its CONNACK."""
        try:
            sock = loadgen.connect_client(self.port, "bench-probe", timeout_s=2.0)
        except OSError:
            return False
        try:
            sock.sendall(loadgen.DISCONNECT)
        except OSError:
            pass
        sock.close()
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


class SampledProbe(loadgen.Probe):
    """A probe that takes a sample (``_sample``, which appends it to ``samples``) at the go
    signal, every ``SAMPLE_S`` after it in a thread, and at ``stop``, so that what it
    measures can be read over the measured window (go to the last delivery) rather than
    until the generator reported (which may include its wait for stragglers)."""

    SAMPLE_S = 0.01
    THREAD_NAME = "probe"

    def __init__(self) -> None:
        self.samples: list[Any] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._done.wait(self.SAMPLE_S):
            self._sample()

    def start(self) -> None:
        self.samples = []
        self._sample()
        self._done.clear()
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


class BrokerProbe(SampledProbe):
    """Broker CPU seconds and the whole machine's, sampled from the go signal until
    ``stop``."""

    THREAD_NAME = "broker-probe"

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.samples: list[tuple[int, float, float]] = []  # (monotonic ns, broker, machine)

    def _sample(self) -> None:
        try:
            cpu = cpu_seconds(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            cpu = self.samples[-1][1] if self.samples else 0.0
        self.samples.append((time.monotonic_ns(), cpu, machine_busy_s()))

    @property
    def t0_ns(self) -> int:
        return self.samples[0][0] if self.samples else 0

    def _at(self, t_ns: int | None) -> tuple[int, float, float]:
        """The first sample at or after ``t_ns`` (the last one if None or none is)."""
        if t_ns is not None:
            for sample in self.samples:
                if sample[0] >= t_ns:
                    return sample
        return self.samples[-1]

    def window(self, elapsed_s: float | None = None) -> tuple[float, float, float]:
        """(seconds, broker CPU s, machine busy CPU s) from the go signal to ``elapsed_s``
        after it (to ``stop`` if None or 0)."""
        if not self.samples:
            return 0.0, 0.0, 0.0
        end = self._at(self.t0_ns + int(elapsed_s * 1e9) if elapsed_s else None)
        first = self.samples[0]
        return (end[0] - first[0]) / 1e9, end[1] - first[1], end[2] - first[2]

    @property
    def cpu_s(self) -> float:
        return self.window()[1]

    @property
    def machine_s(self) -> float:
        return self.window()[2]


# -- scenarios ---------------------------------------------------------------------


def _scaled(size: Size, broker: str) -> int:
    return size.amqtt_divisor if broker == "amqtt" else 1


def run_scenario(
    scenario: str, broker: Broker, probe: loadgen.Probe, size: Size, divisor: int,
    binary: str | None = None,
) -> dict[str, Any]:
    """``binary``: the C generator, for the scenarios it runs (fan-in, fan-out, latency);
    None, or the other scenarios: the Python generator."""
    port = broker.port
    if binary and scenario in ("fanin_qos0", "fanin_qos1", "durable_qos1"):
        return cgen.fan_in(
            binary, port, probe, publishers=size.publishers,
            messages=max(1, size.messages // divisor), qos=0 if scenario == "fanin_qos0" else 1,
            window=size.window, persistent=scenario == "durable_qos1", timeout_s=size.timeout_s,
        )
    if binary and scenario == "fanout":
        return cgen.fan_out(
            binary, port, probe, subscribers=size.fanout_subscribers,
            messages=max(1, size.fanout_messages // divisor), timeout_s=size.timeout_s,
        )
    if binary and scenario == "latency":
        return cgen.latency(
            binary, port, probe, rate=size.latency_rate, duration_s=size.latency_s,
            timeout_s=max(size.timeout_s, size.latency_s + 10.0),
        )
    if scenario in ("fanin_qos0", "fanin_qos1", "durable_qos1"):
        return loadgen.fan_in(
            port, probe, publishers=size.publishers,
            messages=max(1, size.messages // divisor), qos=0 if scenario == "fanin_qos0" else 1,
            window=size.window, persistent=scenario == "durable_qos1",
            timeout_s=size.timeout_s, procs=size.publisher_procs,
        )
    if scenario == "fanout":
        return loadgen.fan_out(
            port, probe, subscribers=size.fanout_subscribers,
            messages=max(1, size.fanout_messages // divisor), timeout_s=size.timeout_s,
            procs=size.subscriber_procs,
        )
    if scenario == "latency":
        return loadgen.latency(
            port, probe, rate=size.latency_rate, duration_s=size.latency_s,
            timeout_s=max(size.timeout_s, size.latency_s + 10.0),
        )
    if scenario in CONNECTION_SCENARIOS:
        held: dict[str, int | None] = {}

        def measure() -> int:  # the broker's RSS, and its open fds while they are held
            held["broker_fds"] = open_fds(broker.pid)
            return status_kib(broker.pid, "VmRSS")

        clients = size.connections if scenario == "connections" else size.max_connections
        if binary:
            result = cgen.connections(
                binary, port, probe, clients=clients, timeout_s=size.timeout_s,
                measure=measure, nofile=broker.nofile,
            )
        elif scenario == "connections":
            result = loadgen.connections(
                port, probe, clients=clients, timeout_s=size.timeout_s,
                procs=size.connection_procs, measure=measure,
            )
        else:
            raise ValueError("connections_max needs the C generator")
        return {**result, **held}
    if scenario in WORK_QUEUE_SCENARIOS:
        return wqgen.work_queue(
            port, probe, publishers=size.publishers, messages=max(1, size.messages // divisor),
            workers=WORK_QUEUE_WORKERS, window=size.window, timeout_s=size.timeout_s,
            reject_every=WORK_QUEUE_REJECT_EVERY if scenario == "workqueue" else 0,
            procs=size.publisher_procs,
        )
    if scenario == "constrained":
        result = loadgen.constrained(
            port, probe, devices=size.devices, commands=size.device_commands,
            ack_delay_s=DEVICE_ACK_DELAY_S, rcvbuf=DEVICE_RCVBUF,
            telemetry_publishers=size.telemetry_publishers,
            telemetry_messages=max(1, size.telemetry_messages // divisor), window=size.window,
            timeout_s=size.timeout_s, procs=size.publisher_procs,
        )
        result["device_window"] = DEVICE_WINDOWS[broker.name]
        return result
    raise ValueError(f"unknown scenario {scenario!r}")


def run_one(scenario: str, name: str, size: Size, binary: str | None = None) -> dict[str, Any]:
    """One scenario against one fresh broker; never raises (errors become the result)."""
    divisor = 1 if scenario in ("latency", *CONNECTION_SCENARIOS) else _scaled(size, name)
    result: dict[str, Any] = {"status": "ok", "scale": 1 / divisor}
    if scenario in WORK_QUEUE_SCENARIOS and name != "mqttd":
        return {**result, "status": "skipped", "wall_s": 0.0,
                "error": f"{scenario}: mqttd only (it compares mqttd's work queues with its "
                         "plain shared subscriptions)"}
    if scenario == "connections_max" and name == "amqtt":
        return {**result, "status": "skipped", "wall_s": 0.0, "expected": size.max_connections,
                "skip_reason": "too slow here (~600 connects/s, ~50 KiB each)",
                "error": "connections_max: amqtt skipped, too slow and too big for it here "
                         "(about 600 connects/s and 50 KiB per idle connection in the "
                         "connections row: ~20,000 would take ~35 s and ~1 GiB)"}
    if scenario == "connections_max" and not binary:
        return {**result, "status": "skipped", "wall_s": 0.0, "expected": size.max_connections,
                "skip_reason": "needs the C generator",
                "error": "connections_max: needs the C generator (several processes, source "
                         "addresses, a broker at its fd limit)"}
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"bench-{name}-")
    nofile = size.max_connections + NOFILE_HEADROOM if scenario == "connections_max" else None
    try:
        with Broker(name, workdir, durable=scenario == "durable_qos1",
                    devices=scenario == "constrained",
                    work_queue=scenario in WORK_QUEUE_SCENARIOS, nofile=nofile) as broker:
            probe = BrokerProbe(broker.pid)
            result["broker_nofile_limit"] = nofile_limit(broker.pid)
            raw = run_scenario(scenario, broker, probe, size, divisor, binary)
            result.update(raw)
            result.setdefault("generator", "python")
            result["peak_rss_kib"] = status_kib(broker.pid, "VmHWM")
            # the broker's CPU over the measured window: go to the last delivery
            elapsed = raw.get("elapsed_s") or 0.0
            window_s, broker_cpu, machine_cpu = probe.window(elapsed)
            gen_cpu = raw.get("generator_cpu_s", 0.0)
            result["window_s"] = window_s
            result["broker_cpu_s"] = broker_cpu
            result["broker_cpu_pct"] = 100 * broker_cpu / window_s if window_s > 0 else None
            # the broker, not the generator, was the limit (None: too short a window to say)
            result["broker_cpu_bound"] = (None if window_s < CPU_BOUND_MIN_S
                                          or not result["broker_cpu_pct"]
                                          else result["broker_cpu_pct"] >= CPU_BOUND_PCT)
            result["generator_cpu_pct"] = 100 * gen_cpu / elapsed if elapsed > 0 else None
            # busy CPU on the machine that was neither the broker nor the generator (other
            # programs, kernel threads): high values mean a disturbed measurement
            result["other_cpu_s"] = max(0.0, machine_cpu - broker_cpu - gen_cpu)
            count = raw.get("delivered", raw.get("connected", 0))
            count += raw.get("telemetry", {}).get("delivered", 0)  # constrained: both loads
            result["msgs_per_cpu_s"] = count / broker_cpu if broker_cpu > 0 else None
            if scenario in WORK_QUEUE_SCENARIOS and count:
                result["broker_cpu_us_per_job"] = 1e6 * broker_cpu / count
            result["status"] = (_connections_max_status(result) if scenario == "connections_max"
                                else _status(name, raw))
    except Exception as exc:  # a broker that breaks is a result, not the end of the run
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = time.monotonic() - t0
    return result


def _status(name: str, raw: dict[str, Any]) -> str:
    """``ok``; a peer that lost messages at its defaults: ``ok (lost N)``; mqttd losing
    anything, duplicates, failures or reordering: ``incomplete``; ``timed out``."""
    telemetry = raw.get("telemetry", {})
    lost = (raw.get("lost") or 0) + (telemetry.get("lost") or 0)
    if raw.get("timed_out"):
        return "timed out"
    if (raw.get("duplicated") or raw.get("failed") or raw.get("unexpected")
            or raw.get("in_order") is False or telemetry.get("duplicated")
            or telemetry.get("in_order") is False):
        return "incomplete" + (f" (LOST {lost:,})" if lost else "")
    if lost:
        return f"incomplete (LOST {lost:,})" if name == "mqttd" else f"ok (lost {lost:,})"
    return "ok"


def _connections_max_status(result: dict[str, Any]) -> str:
    """``ok`` if every connection was held; ``limited`` if the broker's fd limit is what
    stopped it (the row says how many it held); else as ``_status``."""
    connected, expected = result.get("connected") or 0, result.get("expected") or 0
    limit = result.get("broker_nofile_limit")
    if connected >= expected:
        return "ok"
    if limit is not None and 0 <= limit < expected + 2 and connected >= 0.95 * (limit - 64):
        return f"limited: held {connected:,} of {expected:,} (broker fd limit {limit:,})"
    return "incomplete" + (" (timed out)" if result.get("timed_out") else "")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """mqttd's ratio to each peer: >1 means mqttd is ahead, except for latency and RSS
    (mqttd / peer: <1 means mqttd is lower, i.e. better)."""
    mine = results.get("mqttd")
    out: dict[str, dict[str, float | None]] = {}
    if not mine or mine["status"] == "error":
        return out
    for peer, theirs in results.items():
        if peer == "mqttd" or theirs["status"] in ("error", "skipped"):
            continue
        speed = "connects_per_s" if "connects_per_s" in mine else "msgs_per_s"
        entry = {
            "throughput": _ratio(mine.get(speed), theirs.get(speed)),
            "per_cpu_s": _ratio(mine.get("msgs_per_cpu_s"), theirs.get("msgs_per_cpu_s")),
        }
        if mine.get("latency_ms") and theirs.get("latency_ms"):
            entry["p99_latency"] = _ratio(mine["latency_ms"]["p99"], theirs["latency_ms"]["p99"])
        if "rss_per_conn_kib" in mine:
            entry["rss_per_conn"] = _ratio(mine.get("rss_per_conn_kib"),
                                           theirs.get("rss_per_conn_kib"))
        out[peer] = entry
    return out


def metric(result: dict[str, Any], key: str) -> float | None:
    """A row's value for ``key``; ``p99_ms``: its latency p99."""
    if key == "p99_ms":
        return (result.get("latency_ms") or {}).get("p99")
    value = result.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _median_index(values: list[float], higher_is_better: bool) -> int:
    """The index of the median of ``values``: an actual run, of an even count the worse
    of the two middle ones (the same rule for every broker)."""
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=not higher_is_better)
    return order[(len(order) - 1) // 2]


def median_row(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One broker's row from its runs of ``scenario``: the run with the median of
    ``MEDIAN_KEYS[scenario]`` (a run that failed or measured nothing does not count), with
    ``repeats``, ``median_of``, ``median_run`` (0-based) and ``run_values`` (that key and
    the ``MEDIAN_ALSO`` ones in every run); a ``MEDIAN_ALSO`` key (RSS per connection) is
    replaced by its median over the runs. The status says if another run was not ok (an
    mqttd run that lost messages is never hidden by the median)."""
    if len(runs) == 1:
        return runs[0]
    key, higher = MEDIAN_KEYS.get(scenario, ("msgs_per_s", True))
    if key == "msgs_per_cpu_s" and any(metric(r, key) is None for r in runs):
        key = "msgs_per_s"  # a window too short for the CPU ticks: by throughput
    counted = [i for i, r in enumerate(runs)
               if r["status"] not in ("error", "skipped") and metric(r, key) is not None]
    if not counted:
        chosen = 0
    else:
        chosen = counted[_median_index([metric(runs[i], key) or 0.0 for i in counted], higher)]
    row = dict(runs[chosen])
    row.update(repeats=len(runs), median_of=key, median_run=chosen)
    row["run_values"] = {k: [metric(r, k) for r in runs]
                         for k in (key, *MEDIAN_ALSO.get(scenario, ()))}
    for also in MEDIAN_ALSO.get(scenario, ()):
        values = [v for v in (metric(runs[i], also) for i in counted) if v is not None]
        if values:
            row[also] = sorted(values)[(len(values) - 1) // 2]
    def same_kind(a: str, b: str) -> bool:  # a peer's losses at its defaults vary by run
        return a == b or (a.startswith("ok (lost ") and b.startswith("ok (lost "))

    others = [f"run {i + 1}: {r['status']}" for i, r in enumerate(runs)
              if i != chosen and r["status"] != "ok" and not same_kind(r["status"],
                                                                        row["status"])]
    if others:
        row["status"] = f"{row['status']}; " + "; ".join(others)
    row["lost_any_run"] = max((r.get("lost") or 0) + ((r.get("telemetry") or {}).get("lost")
                                                      or 0) for r in runs)
    return row


def nofile_info(wanted: int, got: int) -> dict[str, Any]:
    """What RLIMIT_NOFILE this benchmark could get for connections_max, and why not more."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    info: dict[str, Any] = {
        "wanted": wanted, "soft": got,
        "hard": -1 if hard == resource.RLIM_INFINITY else int(hard), "why": None,
    }
    if 0 <= got < wanted:
        cap = _has_cap_sys_resource()
        info["why"] = (
            f"RLIMIT_NOFILE could not be raised above its hard limit ({info['hard']:,}): "
            "that needs "
            "CAP_SYS_RESOURCE" + (", which this process does not have (a container without "
                                  "it: run with --ulimit nofile=... or as a host root)"
                                  if cap is False else "")
        )
    return info


def _has_cap_sys_resource() -> bool | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE = 24
    except (OSError, ValueError):
        return None
    return None


def _value(report: dict[str, Any], scenario: str, broker: str, key: str) -> float | None:
    result = report["scenarios"].get(scenario, {}).get("results", {}).get(broker)
    if not result or result["status"] == "error":
        return None
    value = result.get(key)
    if key == "p99":
        value = (result.get("latency_ms") or {}).get("p99")
    return value


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 18's goals, each with mqttd's value (from the median rows: the ratios are of
    medians), the goal, whether it is met (None: not measured in this run) and a detail."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, met: bool | None, unit: str,
            detail: str = "") -> None:
        out.append({"target": name, "value": value, "goal": goal, "unit": unit,
                    "met": None if value is None else met, "detail": detail})

    def per_cpu(name: str, mine: str, theirs: str, goal: float, goal_text: str) -> None:
        a = _value(report, mine, "mqttd", "msgs_per_cpu_s")
        b = _value(report, theirs, "mosquitto", "msgs_per_cpu_s")
        # rounded: equal CPU tick counts are 1.0x, not 0.9999999x
        value = round(a / b, 4) if a is not None and b else None
        detail = ""
        if value is not None:
            detail = (f"mqttd {a:,.0f} ({mine}), mosquitto {b:,.0f} ({theirs}) msgs per "
                      "broker CPU-s")
            speed = _ratio(_value(report, mine, "mqttd", "msgs_per_s"),
                           _value(report, theirs, "mosquitto", "msgs_per_s"))
            if speed is not None:
                detail += f"; msgs/s {speed:.2f}x"
        add(name, value, goal_text, value is not None and value >= goal, "x", detail)

    per_cpu("fan-in QoS 0, msgs per broker CPU-s vs mosquitto", "fanin_qos0", "fanin_qos0", 1.0,
            ">= 1.0x")
    per_cpu("fan-in QoS 1, msgs per broker CPU-s vs mosquitto", "fanin_qos1", "fanin_qos1", 0.8,
            ">= 0.8x")
    per_cpu("durable QoS 1 (persistent subscriber, commit before PUBACK), msgs per broker "
            "CPU-s vs mosquitto's non-durable QoS 1", "durable_qos1", "fanin_qos1", 0.5,
            ">= 0.5x")
    per_cpu("fan-out, deliveries per broker CPU-s vs mosquitto", "fanout", "fanout", 4.0,
            ">= 4x")
    conns = _row(report, "connections", "mqttd")
    count = f"{conns['connected']:,}" if conns and conns.get("connected") else "10,000"
    rate = _value(report, "connections", "mqttd", "connects_per_s")
    add(f"connect rate at {count} connections", rate, ">= 15,000/s",
        rate is not None and rate >= 15_000, "/s")
    rss = _value(report, "connections", "mqttd", "rss_per_conn_kib")
    add(f"RSS per idle connection at {count} connections", rss, "<= 4 KB",
        rss is not None and rss <= 4.0, "KiB", "VmRSS after - before, / connections")
    p99 = _value(report, "latency", "mqttd", "p99")
    rate_text = f"{report['parameters']['latency_rate']:,.0f}"
    add(f"latency p99 at {rate_text} msg/s", None if p99 is None else p99 * 1000,
        "<= 100 us", p99 is not None and p99 * 1000 <= 100, "us")
    most = _row(report, "connections_max", "mqttd")
    if most and most.get("status") != "skipped":
        held, target = most.get("connected"), most.get("expected") or 0
        why = (report.get("nofile") or {}).get("why")
        detail = (f"held {held or 0:,} of {target:,} tried; broker RSS "
                  f"{_num(_mib(most.get('rss_after_kib')), 1)} MiB, "
                  f"{_num(most.get('rss_per_conn_kib'), 2)} KiB per connection; broker fd "
                  f"limit {_num(most.get('broker_nofile_limit'))}")
        if held is not None and held < target:
            detail += (f": {target:,} not reachable on this machine"
                       + (f" ({why})" if why else ""))
        add(f"idle connections held (of {target:,} tried)", held, f">= {target:,}",
            held is not None and held >= target, "", detail)
    lost = 0
    measured = False
    for entry in report["scenarios"].values():
        rows = (entry.get("runs") or {}).get("mqttd") or (
            [entry["results"]["mqttd"]] if "mqttd" in entry["results"] else [])
        for r in rows:
            if r.get("status") in ("error", "skipped") or "lost" not in r:
                continue
            measured = True
            lost += (r.get("lost") or 0) + ((r.get("telemetry") or {}).get("lost") or 0)
    add("messages lost by mqttd (every row, every run)", lost if measured else None, "= 0",
        lost == 0, "")
    return out


def _row(report: dict[str, Any], scenario: str, broker: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = (
        report["scenarios"].get(scenario, {}).get("results", {}).get(broker))
    return result


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "python": platform.python_version(),
    }


def choose_generator(
    generator: str | None, say: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Which load generator runs the message scenarios, built if it is the C one."""
    if generator not in (None, *GENERATORS):
        raise ValueError(f"unknown generator {generator!r}")
    if generator == "python" or (generator is None and cgen.compiler() is None):
        if generator is None:
            say("> no C compiler found: the Python load generator runs every scenario")
        return {"kind": "python"}
    try:
        built = cgen.build()
    except (cgen.GeneratorError, OSError, subprocess.SubprocessError) as exc:
        if generator == "c":
            raise
        say(f"> the C load generator could not be built ({exc}): using the Python one")
        return {"kind": "python", "c_build_error": str(exc)[:2000]}
    say(f"> C load generator: {built['binary']}")
    return {"kind": "c", **built}


def _run_cluster_scenario(
    scenario: str, size: Size, binary: str | None, nats: dict[str, Any], persistent: bool,
    say: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """One node, then the cluster, the same load (none if there is no nats-server)."""
    from tools import benchcluster

    results: dict[str, dict[str, Any]] = {}
    if nats.get("skipped"):
        results[CLUSTER_ROW] = benchcluster.run_cluster(scenario, size, binary, nats, persistent)
        return results
    for name, run in (
        ("mqttd", lambda: benchcluster.run_single(scenario, size, binary, persistent)),
        (CLUSTER_ROW, lambda: benchcluster.run_cluster(scenario, size, binary, nats,
                                                       persistent)),
    ):
        say(f"> {scenario} on {name} ...")
        results[name] = result = run()
        say(f">   {result['status']} in {result['wall_s']:.1f} s"
            + (f": {result['error'].splitlines()[-1]}" if "error" in result else ""))
    return results


def run_benchmark(
    size_name: str = "quick", brokers: tuple[str, ...] = BROKERS,
    scenarios: tuple[str, ...] = SCENARIOS, output: str | None = DEFAULT_OUTPUT,
    echo: Callable[[str], None] | None = print,
    progress: Callable[[str], None] | None = None, amqtt_divisor: int | None = None,
    generator: str | None = None, cluster_persistent: bool = False, repeats: int | None = None,
) -> dict[str, Any]:
    """Run ``scenarios`` x ``brokers``; returns the results (and writes them to ``output``
    as JSON, the tables through ``echo`` and progress lines through ``progress``, unless
    None). ``generator``: ``c`` (built now with the machine's compiler), ``python``, or
    None: ``c`` if a C compiler is found, else ``python``. ``cluster_persistent``: the
    subscriber of cluster_qos1 (both rows) has a persistent session (clean session 0).
    ``repeats``: runs per broker of each REPEATED_SCENARIOS row (default: the size's)."""
    size = SIZES[size_name]
    if amqtt_divisor:
        size = dataclasses.replace(size, amqtt_divisor=max(1, amqtt_divisor))
    if repeats:
        size = dataclasses.replace(size, repeats=max(1, repeats))
    # as far as allowed: what the generator processes (children) and connections_max's
    # broker can then get
    nofile = loadgen.raise_fd_limit(size.max_connections + NOFILE_HEADROOM)
    say = progress or (lambda _line: None)
    show = echo or (lambda _line: None)
    started = time.monotonic()
    report: dict[str, Any] = {
        "size": size_name, "parameters": dataclasses.asdict(size),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "brokers": {}, "scenarios": {},
        "loadavg_start": list(os.getloadavg()),  # other programs on the machine, if any
        "repeats": size.repeats, "repeated_scenarios": list(REPEATED_SCENARIOS),
        "nofile": nofile_info(size.max_connections + NOFILE_HEADROOM, nofile),
    }
    report["generator"] = gen_info = choose_generator(generator, say)
    binary = gen_info.get("binary")
    runnable = []
    for name in brokers:
        why = broker_available(name)
        report["brokers"][name] = {
            "version": broker_version(name), "durable_promise": PROMISES[name],
            "skipped": why,
        }
        if why:
            say(f"> {why}")
        else:
            runnable.append(name)
    cluster_nats: dict[str, Any] = {}
    if any(s in CLUSTER_SCENARIOS for s in scenarios):
        from tools import benchcluster  # imports this module: only when needed

        cluster_nats = benchcluster.nats_server()
        report["cluster"] = {
            "mqttd_nodes": benchcluster.MQTTD_NODES, "nats_servers": benchcluster.NATS_SERVERS,
            "nats_server": cluster_nats["path"], "nats_version": cluster_nats["version"],
            "nats_source": cluster_nats["source"], "skipped": cluster_nats["skipped"],
            "persistent": cluster_persistent,
        }
        if cluster_nats["skipped"]:
            say(f"> {cluster_nats['skipped']}")
        else:
            say(f"> cluster scenarios: nats-server {cluster_nats['version']} "
                f"({cluster_nats['source']}, {cluster_nats['path']})")
    for scenario in scenarios:
        entry: dict[str, Any] = {
            "description": DESCRIPTIONS[scenario].format(**dataclasses.asdict(size)),
            "results": {},
        }
        if scenario in CLUSTER_SCENARIOS:
            if scenario == "cluster_qos1" and cluster_persistent:
                entry["description"] += " (the subscriber: clean session 0, in both rows)"
            report["scenarios"][scenario] = entry
            entry["ratios"] = {}
            if "mqttd" not in runnable:
                say(f"> {scenario}: mqttd only, not in --brokers: skipped")
                continue
            entry["results"] = _run_cluster_scenario(
                scenario, size, binary, cluster_nats, cluster_persistent and
                scenario == "cluster_qos1", say,
            )
            from tools import benchcluster

            entry["cluster_vs_single"] = benchcluster.compare(
                entry["results"].get("mqttd"), entry["results"].get(CLUSTER_ROW),
            )
            continue
        repeats = size.repeats if scenario in REPEATED_SCENARIOS else 1
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in runnable}
        for run in range(repeats):  # interleaved: the brokers share the machine's noise
            for name in runnable:
                of = f" (run {run + 1}/{repeats})" if repeats > 1 else ""
                say(f"> {scenario} on {name}{of} ...")
                runs[name].append(result := run_one(scenario, name, size, binary))
                say(f">   {result['status']} in {result['wall_s']:.1f} s"
                    + (f": {result['error'].splitlines()[-1]}" if "error" in result else ""))
        for name in runnable:
            entry["results"][name] = median_row(scenario, runs[name])
        if repeats > 1:
            entry["runs"] = runs
        # constrained: its rows are about the devices, not a throughput to compare
        entry["ratios"] = {} if scenario == "constrained" else ratios(entry["results"])
        report["scenarios"][scenario] = entry
    report["targets"] = targets(report)
    report["duration_s"] = time.monotonic() - started
    report["loadavg_end"] = list(os.getloadavg())
    if output:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    say(f"> done in {report['duration_s']:.0f} s")
    show(markdown(report))
    if output:
        show(f"\nResults written to {output}.")
    return report


# -- report ------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _scale_text(scale: float) -> str:
    return "1" if scale >= 1 else f"1/{round(1 / scale)}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"## Broker benchmark ({report['size']}, {report['date']})",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
        f"Python {m['python']}. " + ", ".join(
            f"{name} {info['version']}" for name, info in report["brokers"].items()
        ) + ".",
        f"All on 127.0.0.1; the broker and the load generator share the {m['cpus']} cores, "
        "so each row is broker + generator on this machine. Brokers run one at a time, "
        "each at its default configuration (see bench/README.md).",
        "Load generator: " + _generator_text(report.get("generator") or {"kind": "python"}),
    ]
    if report.get("loadavg_start") and report.get("loadavg_end"):
        lines.append("Load average (1, 5, 15 min) at the start: "
                     + ", ".join(f"{v:.2f}" for v in report["loadavg_start"]) + "; at the end: "
                     + ", ".join(f"{v:.2f}" for v in report["loadavg_end"]) + ".")
    if report.get("repeats", 1) > 1:
        lines.append(
            f"Medians of {report['repeats']}: each of "
            + ", ".join(f"`{s}`" for s in report.get("repeated_scenarios", ()))
            + f" ran {report['repeats']} times per broker, the brokers interleaved; a row is "
            "the run with the median msgs/broker-CPU-s (latency: p99; connections: "
            "connects/s, with RSS/conn the median over the runs), and **runs** lists that "
            "value in every run. The ratios and targets are of the medians; the JSON keeps "
            "every run. The other scenarios ran once.")
    main_rows = []
    conn_rows = []
    max_rows = []
    device_rows = []
    for scenario, entry in report["scenarios"].items():
        for name, r in entry["results"].items():
            if scenario == "connections":
                conn_rows.append((name, r))
                continue
            if scenario == "connections_max":
                max_rows.append((name, r))
                continue
            if scenario == "constrained":
                device_rows.append((name, r))
                continue
            if scenario in WORK_QUEUE_SCENARIOS or scenario in CLUSTER_SCENARIOS:
                continue  # their own tables (_work_queue_lines, _cluster_lines)
            lat = r.get("latency_ms") or {}
            main_rows.append(
                f"| {scenario} | {name} | {_scale_text(r['scale'])} "
                f"| {_num(r.get('delivered'))}/{_num(r.get('expected'))} "
                f"| {_num(r.get('lost'))} "
                f"| {_num(r.get('msgs_per_s'))} | {_num(r.get('msgs_per_cpu_s'))} "
                f"| {_num(r.get('broker_cpu_s'), 2)} | {_num(r.get('broker_cpu_pct'))} "
                f"| {_num(r.get('generator_cpu_s'), 2)} | {_num(r.get('generator_cpu_pct'))} "
                f"| {_num(lat.get('p50'), 2)} | {_num(lat.get('p99'), 2)} "
                f"| {_num(lat.get('max'), 2) if scenario == 'latency' else '-'} "
                f"| {_num(_mib(r.get('peak_rss_kib')), 1)} "
                f"| {_num(r.get('duplicated'))} | {_runs_text(r)} "
                f"| {_num(r.get('wall_s'), 1)} | {r['status']} |"
            )
    if main_rows:
        lines += [
            "",
            "| scenario | broker | scale | delivered | lost | msgs/s | msgs/broker-CPU-s "
            "| broker CPU s | broker CPU % | gen CPU s | gen CPU % | p50 ms | p99 ms | max ms "
            "| peak RSS MiB | dup | runs | wall s | status |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|",
            *main_rows,
        ]
    if conn_rows:
        lines += [
            "",
            "| connections | broker | connected | connects/s | connects/broker-CPU-s "
            "| broker CPU s | broker CPU % | gen CPU s | gen CPU % | gen procs "
            "| RSS before MiB | RSS held MiB | RSS/conn KiB | failed | runs | wall s | status |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|",
        ]
        for name, r in conn_rows:
            lines.append(
                f"| {_num(r.get('expected'))} | {name} | {_num(r.get('connected'))} "
                f"| {_num(r.get('connects_per_s'))} | {_num(r.get('msgs_per_cpu_s'))} "
                f"| {_num(r.get('broker_cpu_s'), 2)} | {_num(r.get('broker_cpu_pct'))} "
                f"| {_num(r.get('generator_cpu_s'), 2)} | {_num(r.get('generator_cpu_pct'))} "
                f"| {_gen_procs(r)} "
                f"| {_num(_mib(r.get('rss_before_kib')), 1)} "
                f"| {_num(_mib(r.get('rss_after_kib')), 1)} "
                f"| {_num(r.get('rss_per_conn_kib'), 2)} | {_num(r.get('failed'))} "
                f"| {_runs_text(r)} | {_num(r.get('wall_s'), 1)} | {r['status']} |"
            )
    if max_rows:
        lines += [
            "",
            "| connections_max | broker | tried | held | broker fd limit | broker fds "
            "| connects/s | broker CPU s | gen CPU s | gen procs | RSS before MiB "
            "| RSS held MiB | RSS/conn KiB | refused/failed | unanswered | runs | wall s "
            "| status |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|",
        ]
        for name, r in max_rows:
            lines.append(
                f"| {_num(r.get('expected'))} | {name} | {_num(r.get('expected'))} "
                f"| {_num(r.get('connected'))} | {_num(r.get('broker_nofile_limit'))} "
                f"| {_num(r.get('broker_fds'))} | {_num(r.get('connects_per_s'))} "
                f"| {_num(r.get('broker_cpu_s'), 2)} | {_num(r.get('generator_cpu_s'), 2)} "
                f"| {_gen_procs(r)} | {_num(_mib(r.get('rss_before_kib')), 1)} "
                f"| {_num(_mib(r.get('rss_after_kib')), 1)} "
                f"| {_num(r.get('rss_per_conn_kib'), 2)} | {_num(r.get('failed'))} "
                f"| {_num(r.get('unanswered'))} | {_runs_text(r)} "
                f"| {_num(r.get('wall_s'), 1)} | {r['status']}"
                + (f": {r['skip_reason']}" if r.get("skip_reason") else "") + " |"
            )
    if device_rows:
        lines += [
            "",
            "| constrained | device window | commands | in order | dup | max unacked "
            "| violations | cmds routed s | cmd delivery s | cmd p99 ms | telemetry "
            "| telemetry msgs/s | telemetry s | peak RSS MiB | broker CPU s | wall s | status |",
            "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for name, r in device_rows:
            tel = r.get("telemetry") or {}
            in_order = r.get("in_order")
            lines.append(
                f"| {name} | {r.get('device_window', '-')} "
                f"| {_num(r.get('delivered'))}/{_num(r.get('expected'))} "
                f"| {'-' if in_order is None else 'yes' if in_order else 'NO'} "
                f"| {_num(r.get('duplicated'))} | {_num(r.get('max_unacked'))} "
                f"| {_num(r.get('violations'))} | {_num(r.get('commands_routed_s'), 3)} "
                f"| {_num(r.get('command_delivery_s'), 3)} "
                f"| {_num((r.get('command_latency_ms') or {}).get('p99'), 1)} "
                f"| {_num(tel.get('delivered'))}/{_num(tel.get('expected'))} "
                f"| {_num(tel.get('msgs_per_s'))} | {_num(tel.get('elapsed_s'), 3)} "
                f"| {_num(_mib(r.get('peak_rss_kib')), 1)} | {_num(r.get('broker_cpu_s'), 2)} "
                f"| {_num(r.get('wall_s'), 1)} | {r['status']} |"
            )
    lines += _work_queue_lines(report)
    lines += _cluster_lines(report)
    ratio_rows = [
        (scenario, peer, values)
        for scenario, entry in report["scenarios"].items()
        for peer, values in entry["ratios"].items()
    ]
    if ratio_rows:
        lines += [
            "",
            "mqttd / peer (throughput and per-CPU: higher is better for mqttd; p99 latency and "
            "RSS per connection: lower is better for mqttd):",
            "",
            "| scenario | peer | throughput | per broker-CPU-s | p99 latency | RSS/conn |",
            "|---|---|--:|--:|--:|--:|",
        ]
        for scenario, peer, v in ratio_rows:
            lines.append(
                f"| {scenario} | {peer} | {_ratio_text(v.get('throughput'))} "
                f"| {_ratio_text(v.get('per_cpu_s'))} | {_ratio_text(v.get('p99_latency'))} "
                f"| {_ratio_text(v.get('rss_per_conn'))} |"
            )
    goals = [t for t in report.get("targets", []) if t["met"] is not None]
    if goals:
        medians = " (medians)" if report.get("repeats", 1) > 1 else ""
        lines += ["", f"Issue 18's goals, mqttd, every broker at its default configuration"
                      f"{medians}:", "", "| goal | mqttd | target | met | detail |",
                  "|---|--:|---|---|---|"]
        for t in goals:
            lines.append(f"| {t['target']} | {_target_value(t)} | {t['goal']} "
                         f"| {'yes' if t['met'] else 'NO'} | {t.get('detail', '')} |")
    lines += ["", "Scenarios:"]
    for scenario, entry in report["scenarios"].items():
        lines.append(f"- `{scenario}`: {entry['description']}")
    lines += _notes(report)
    return "\n".join(lines)


def _target_value(t: dict[str, Any]) -> str:
    unit, value = t.get("unit", ""), t["value"]
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "KiB":
        return f"{value:.2f} KiB"
    if unit == "us":
        return f"{value:,.0f} us"
    return _num(value)


def _runs_text(r: dict[str, Any]) -> str:
    """The median key's value in every run ("-" for a single run)."""
    values = next(iter((r.get("run_values") or {}).values()), None)
    if not values or len(values) < 2 or all(v is None for v in values):
        return "-"
    digits = 2 if r.get("median_of") == "p99_ms" else 0
    return " / ".join(_num(v, digits) for v in values)


def _gen_procs(r: dict[str, Any]) -> str:
    if "generator_procs" not in r:
        return "-"
    return f"{r['generator_procs']} ({'C' if r.get('generator') == 'c' else 'py'})"


def _work_queue_lines(report: dict[str, Any]) -> list[str]:
    """The consumer-group rows: jobs/s and broker CPU per job, work queue vs plain shared."""
    rows = [(scenario, report["scenarios"][scenario]["results"].get("mqttd"))
            for scenario in WORK_QUEUE_SCENARIOS if scenario in report["scenarios"]]
    rows = [(scenario, r) for scenario, r in rows if r and r["status"] not in ("skipped",)]
    if not rows:
        return []
    lines = [
        "",
        "| consumer group (mqttd) | jobs | rejected | lost | dup | jobs/s | broker CPU s "
        "| broker CPU us/job | p50 ms | p99 ms | gen CPU s | wall s | status |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for scenario, r in rows:
        lat = r.get("latency_ms") or {}
        lines.append(
            f"| {scenario} | {_num(r.get('delivered'))}/{_num(r.get('expected'))} "
            f"| {_num(r.get('rejected'))} | {_num(r.get('lost'))} "
            f"| {_num(r.get('duplicated'))} | {_num(r.get('msgs_per_s'))} "
            f"| {_num(r.get('broker_cpu_s'), 2)} | {_num(r.get('broker_cpu_us_per_job'), 1)} "
            f"| {_num(lat.get('p50'), 2)} | {_num(lat.get('p99'), 2)} "
            f"| {_num(r.get('generator_cpu_s'), 2)} | {_num(r.get('wall_s'), 1)} "
            f"| {r['status']} |"
        )
    results = dict(rows)
    plain, wq = results.get("shared_qos1"), results.get("workqueue")
    if plain and wq and plain.get("msgs_per_s"):
        speed = wq["msgs_per_s"] / plain["msgs_per_s"]
        # (CPU time comes in 10 ms clock ticks: a small run may take less than one)
        plain_cpu = plain.get("broker_cpu_us_per_job")
        cpu = (f"{wq.get('broker_cpu_us_per_job', 0) / plain_cpu:.2f}x" if plain_cpu
               else "- (under one clock tick)")
        lines += ["", (
            f"Work queue / plain shared: jobs/s {speed:.2f}x, broker CPU per job {cpu} "
            "(the Python generator of tools/wqgen.py in both: the C one cannot reject)."
        )]
    return lines


def _cluster_lines(report: dict[str, Any]) -> list[str]:
    """The cluster rows: 2 mqttd nodes + 3 nats-server against 1 mqttd, the same load."""
    info = report.get("cluster")
    rows = [(scenario, name, r)
            for scenario in CLUSTER_SCENARIOS if scenario in report["scenarios"]
            for name, r in report["scenarios"][scenario]["results"].items()]
    if not info or not rows:
        return []
    cpus = report["machine"]["cpus"]
    if info.get("skipped"):
        return ["", f"Cluster scenarios: {info['skipped']}."]
    lines = [
        "",
        f"Cluster (issue 16): {info['mqttd_nodes']} mqttd nodes + {info['nats_servers']} "
        f"nats-server {info['nats_version']} ({info['nats_source']}: {info['nats_server']}; "
        "JetStream, a 3-server cluster on 127.0.0.1) against 1 mqttd, the same load: "
        "publishers on node 1, the subscriber on node 2, so every message crosses nodes "
        "through NATS. Broker CPU is every server process's (mqttd + nats-server), per "
        f"message delivered. **All {info['mqttd_nodes'] + info['nats_servers']} server "
        f"processes and the generator share these {cpus} cores**: the nats-servers compete "
        "with the mqttd nodes for CPU, so this measures what crossing nodes costs, not how "
        "a cluster scales."
        + (" The cluster_qos1 subscriber has a persistent session (clean session 0) in both "
           "rows." if info.get("persistent") else ""),
        "",
        "| scenario | setup | delivered | lost | msgs/s | broker CPU s | mqttd CPU s "
        "| nats CPU s | broker CPU us/msg | mqttd us/msg | nats us/msg | broker CPU % "
        "| gen CPU s | p50 ms | p99 ms | max ms | peak RSS MiB | dup | wall s | status |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for scenario, name, r in rows:
        lat = r.get("latency_ms") or {}
        lines.append(
            f"| {scenario} | {r.get('setup', name)} "
            f"| {_num(r.get('delivered'))}/{_num(r.get('expected'))} | {_num(r.get('lost'))} "
            f"| {_num(r.get('msgs_per_s'))} | {_num(r.get('broker_cpu_s'), 2)} "
            f"| {_num(r.get('mqttd_cpu_s'), 2)} | {_num(r.get('nats_cpu_s'), 2)} "
            f"| {_num(r.get('broker_cpu_us_per_msg'), 1)} "
            f"| {_num(r.get('mqttd_cpu_us_per_msg'), 1)} "
            f"| {_num(r.get('nats_cpu_us_per_msg'), 1)} | {_num(r.get('broker_cpu_pct'))} "
            f"| {_num(r.get('generator_cpu_s'), 2)} | {_num(lat.get('p50'), 2)} "
            f"| {_num(lat.get('p99'), 2)} | {_num(lat.get('max'), 2)} "
            f"| {_num(_mib(r.get('peak_rss_kib')), 1)} | {_num(r.get('duplicated'))} "
            f"| {_num(r.get('wall_s'), 1)} | {r['status']} |"
        )
    ratios = [(scenario, report["scenarios"][scenario].get("cluster_vs_single") or {})
              for scenario in CLUSTER_SCENARIOS if scenario in report["scenarios"]]
    ratios = [(scenario, v) for scenario, v in ratios if v]
    if ratios:
        lines += ["", "Cluster / 1 node (msgs/s: below 1 the cluster is slower; CPU per message "
                      "and p99: above 1 the cluster costs more):", ""]
        for scenario, v in ratios:
            lines.append(
                f"- {scenario}: msgs/s {_ratio_text(v.get('throughput'))}, broker CPU per "
                f"message {_ratio_text(v.get('cpu_per_msg'))}, p99 latency "
                f"{_ratio_text(v.get('p99_latency'))}"
            )
    return lines


def _cluster_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    for scenario in CLUSTER_SCENARIOS:
        entry = report["scenarios"].get(scenario)
        r = entry["results"].get(CLUSTER_ROW) if entry else None
        if not r:
            continue
        if r.get("lost"):
            notes.append(f"- **mqttd cluster LOST {r['lost']:,} of {r['expected']:,} messages "
                         f"in {scenario}**{_cluster_loss_text(r)}; msgs/s and CPU per "
                         "message count what was delivered.")
    if any(s in report["scenarios"] for s in CLUSTER_SCENARIOS) and report.get("cluster"):
        notes.append(
            "- Cluster rows: broker CPU s = utime + stime of both mqttd nodes and the three "
            "nats-servers (`/proc/PID/stat`, the parts in their own columns); us/msg = that "
            "/ messages delivered. On this machine the five server processes share "
            f"{report['machine']['cpus']} cores with the generator: a nats-server's CPU is "
            "CPU an mqttd node did not get, so the cluster's msgs/s is not what separate "
            "hosts would give. The single-node row runs the same generator and load against "
            "one fresh mqttd (publishers and subscriber on it)."
        )
    return notes


def _cluster_loss_text(r: dict[str, Any]) -> str:
    """Where a cluster row's messages were lost, from the nodes' counters."""
    counters = r.get("node_counters") or {}
    n1, n2 = counters.get("n1") or {}, counters.get("n2") or {}
    parts = []
    exported, imported = n1.get("exported"), n2.get("imported")
    probes = r.get("cross_probes_sent") or 1  # at least one of them reached node 2
    if exported is not None and imported is not None and exported - imported > probes - 1:
        why = ""
        if n2.get("nats_reconnects"):
            logs = (r.get("node_logs") or {}).get("n2", "")
            found = re.search(r"NATS connection to \S+ lost: ([^\n]+)", logs)
            why = (f" (node 2's NATS connection was lost and made again "
                   f"{n2['nats_reconnects']} time(s)"
                   + (f": \"{found.group(1).strip()}\"" if found else "")
                   + "; core NATS does not resend what was on its way)")
        parts.append(f"node 1 exported {exported:,} messages to NATS ({probes} cross-node "
                     f"probe(s) included), node 2 imported {imported:,}{why}")
    if r.get("acked_msgs_per_s"):
        parts.append(f"the publishers had {r['acked']:,} PUBACKs from node 1 within "
                     f"{r['publish_s']:.1f} s ({r['acked_msgs_per_s']:,.0f} msgs/s; broker CPU "
                     f"per acknowledged message {r.get('broker_cpu_us_per_acked') or 0:,.1f} "
                     "us)")
    if r.get("subscriber_drops"):
        parts.append(
            f"node 2 dropped {r['subscriber_drops']:,} for the subscriber's clean session at "
            "its queue budget (limits.max_queued_messages, 1,000 by default, drop_oldest): "
            "node 1 acknowledges a QoS 1 PUBLISH without waiting for node 2, and what it "
            "exported before node 2 asked it to pause (README, Cluster mode, flow control "
            "across nodes) overran the subscriber's queue"
        )
    if r.get("timed_out") or r.get("status", "").startswith("timed out"):
        parts.append("the row ran into its time bound: \"lost\" counts what had not been "
                     "delivered by then, including messages the publishers had not sent yet")
    return (": " + "; ".join(parts)) if parts else ""


def _generator_text(info: dict[str, Any]) -> str:
    if info.get("kind") == "c":
        return (f"C (`tools/cloadgen.c`, {info.get('compiler', 'cc')} "
                f"{info.get('cflags', '')}): one process with a publisher and a subscriber "
                "thread for the fan-in, fan-out and latency scenarios, with 2 connecting "
                "threads for connections (and as many processes as the fd limit needs for "
                "connections_max); the Python one (`tools/loadgen.py`) for constrained. gen "
                "CPU is its own (getrusage).")
    why = " (the C one could not be built)" if info.get("c_build_error") else ""
    return f"Python (`tools/loadgen.py`, worker processes){why}."


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def _notes(report: dict[str, Any]) -> list[str]:
    notes = ["", "Notes:"]
    for scenario, entry in report["scenarios"].items():
        runs = (entry.get("runs") or {}).get("mqttd") or (
            [entry["results"]["mqttd"]] if "mqttd" in entry["results"] else [])
        for k, mine in enumerate(runs):
            if mine.get("lost"):
                of = f" (run {k + 1} of {len(runs)})" if len(runs) > 1 else ""
                notes.append(f"- **mqttd LOST {mine['lost']:,} messages in {scenario}{of}**: "
                             "at its default configuration it must lose none.")
    for scenario, entry in report["scenarios"].items():
        for name, r in entry["results"].items():
            if name != "mqttd" and r.get("lost") and r["status"].startswith("ok"):
                why = (f" (its max_queued_messages, {MOSQUITTO_DEFAULT_QUEUED} by default, "
                       "drops what a subscriber's queue holds beyond that)"
                       if name == "mosquitto" and "qos1" in scenario else "")
                notes.append(f"- {scenario} on {name}: lost {r['lost']:,} of "
                             f"{r['expected']:,} at its defaults{why}; msgs/s and "
                             "msgs/broker-CPU-s count what was delivered.")
    scaled = sorted({
        f"{name} ran {_scale_text(r['scale'])} of the messages in {scenario}"
        for scenario, entry in report["scenarios"].items()
        for name, r in entry["results"].items() if r.get("scale", 1) < 1
    })
    notes += [f"- {text} (msgs/s are comparable, totals are not)." for text in scaled]
    for info in report["brokers"].values():
        if info["skipped"]:
            notes.append(f"- {info['skipped']}")
    for scenario, entry in report["scenarios"].items():
        for name, r in entry["results"].items():
            if r["status"] == "timed out":
                notes.append(
                    f"- {scenario} on {name} timed out after "
                    f"{report['parameters']['timeout_s']:g} s: the row shows what it "
                    "delivered in that time."
                )
            elif r["status"] == "error":
                notes.append(f"- {scenario} on {name} failed: {r['error'].splitlines()[-1]}")
    # headroom: a throughput row measures the broker only if the broker, not the
    # generator, was the limit: the peer at >= CPU_BOUND_PCT of a core says so
    for scenario in (*THROUGHPUT_SCENARIOS, "connections"):
        entry = report["scenarios"].get(scenario)
        theirs = entry["results"].get("mosquitto") if entry else None
        if not theirs or ("msgs_per_s" not in theirs and "connects_per_s" not in theirs):
            continue
        gen, broker = theirs.get("generator_cpu_s", 0.0), theirs.get("broker_cpu_s", 0.0)
        elapsed = theirs.get("elapsed_s") or 0.0
        pct = theirs.get("broker_cpu_pct") or 0.0
        usage = (f"mosquitto {broker:.2f} CPU-s = {pct:.0f}% of a core, generator "
                 f"{gen:.2f} CPU-s, in {elapsed:.2f} s")
        if elapsed < CPU_BOUND_MIN_S:
            notes.append(f"- {scenario}: the window is too short to tell whether mosquitto "
                         f"was CPU-bound ({usage}).")
        elif pct >= CPU_BOUND_PCT:
            notes.append(f"- {scenario}: mosquitto was CPU-bound ({usage}): the generator "
                         "was not the limit.")
        elif scenario == "connections":
            count = theirs.get("connected") or 0
            per_conn = (f"; per connection: mosquitto {1e6 * broker / count:.1f} us, the "
                        f"generator {1e6 * gen / count:.1f} us of CPU" if count else "")
            notes.append(
                f"- {scenario}: mosquitto was NOT CPU-bound ({usage}, "
                f"{theirs.get('generator_procs', '?')} generator process(es), "
                f"{theirs.get('pending', loadgen.MAX_PENDING_CONNECTS)} handshakes in "
                f"flight{per_conn}): the generator, or the handshakes' round trips on the "
                "shared cores, were the limit, not mosquitto (on loopback the connecting "
                "side's system calls run most of both ends' TCP handshake)."
            )
        elif "qos1" in scenario:
            notes.append(
                f"- {scenario}: mosquitto was not CPU-bound ({usage}): at QoS 1 the "
                "windows (each publisher's, and mosquitto's default outbound window of "
                f"{MOSQUITTO_DEFAULT_INFLIGHT}) pace it by round trips."
            )
        else:
            notes.append(
                f"- {scenario}: mosquitto was NOT CPU-bound ({usage}): this row may "
                "measure the generator or the shared cores, not mosquitto."
            )
    for scenario, entry in report["scenarios"].items():
        for name, r in entry["results"].items():
            elapsed = r.get("elapsed_s") or 0.0
            available = (report["machine"]["cpus"] or 1) * elapsed
            if available > 0.5 and r.get("other_cpu_s", 0.0) > 0.1 * available:
                notes.append(
                    f"- {scenario} on {name}: other programs used {r['other_cpu_s']:.1f} of "
                    f"the {available:.1f} CPU-s available: this row is disturbed."
                )
    notes += _connections_max_notes(report)
    notes += _constrained_notes(report)
    notes += _cluster_notes(report)
    notes.append(
        "- Latency is publish-to-delivery (send time stamped in the payload, "
        "CLOCK_MONOTONIC); in the throughput scenarios it includes queueing, as the "
        "publishers send as fast as the broker takes messages."
    )
    notes.append("- Durable QoS 1, what each broker promises:")
    for name, info in report["brokers"].items():
        notes.append(f"  - {name}: {info['durable_promise']}.")
    return notes


def _connections_max_notes(report: dict[str, Any]) -> list[str]:
    entry = report["scenarios"].get("connections_max")
    if not entry or not entry["results"]:
        return []
    info = report.get("nofile") or {}
    notes = [
        f"- connections_max: {report['parameters']['max_connections']:,} idle connections "
        "tried; each held connection takes one fd in the broker (and one in the generator, "
        "whose processes each have their own limit: it runs as many as it needs). The "
        f"benchmark asked for RLIMIT_NOFILE {info.get('wanted', 0):,} for every broker and "
        f"generator process and got {info.get('soft', 0):,} (hard limit "
        f"{info.get('hard', 0):,}). A broker stops at its limit: mosquitto closes what it "
        "cannot keep, mqttd leaves it in the listen backlog; the generator gives up after "
        f"{cgen.STALL_S:g} s without a CONNACK (**unanswered**). RSS held: VmRSS with every "
        f"connection held for {loadgen.HOLD_S:g} s."
    ]
    for name, r in entry["results"].items():
        if r["status"] == "skipped":
            notes.append(f"- connections_max on {name}: {r.get('error', 'skipped')}.")
        elif (r.get("connected") or 0) < (r.get("expected") or 0):
            why = info.get("why") or "see its status"
            notes.append(
                f"- connections_max on {name}: **{r['expected']:,} were not reachable here**: "
                f"it held {r.get('connected') or 0:,} with an fd limit of "
                f"{_num(r.get('broker_nofile_limit'))}; {why}."
            )
    return notes


def _constrained_notes(report: dict[str, Any]) -> list[str]:
    entry = report["scenarios"].get("constrained")
    if not entry or not entry["results"]:
        return []
    results = entry["results"]
    notes = [
        "- constrained: **device window** is what bounds the PUBLISHes a device may have "
        "unacknowledged; **max unacked** is the most a device actually had at once (1 means "
        "the broker honoured a window of 1) and **violations** counts each PUBLISH that came "
        "while another was unacknowledged. **cmds routed s**: go signal to the broker's "
        "PUBACK for the last command (the publisher keeps at most "
        f"{report['parameters']['window']} unacknowledged); **cmd delivery s**: first "
        "command sent to the last command acknowledged by its device; **cmd p99 ms**: "
        "command publish to arrival at the device (with a window of 1 a command waits for "
        "the device to acknowledge the ones before it); **telemetry s**: go signal to the "
        "last telemetry message."
    ]
    if "mqttd" in results:
        notes.append(
            f"- constrained on mqttd: `client_overrides` gives `{DEVICE_PATTERN}` "
            f"`max_inflight_messages: {DEVICE_WINDOW}`; every other client keeps the "
            "defaults."
        )
    if "mosquitto" in results:
        notes.append(
            "- constrained on mosquitto: no per-client window; its `max_inflight_messages` "
            f"({MOSQUITTO_DEFAULT_INFLIGHT}, its default) is global, so the devices get "
            "the same window as every other client."
        )
    if "amqtt" in results:
        notes.append(
            "- constrained on amqtt: no inflight window at all, for any client (each QoS 1 "
            "delivery is a task of its own, waiting up to 5 s for its PUBACK)."
        )
    for name, r in results.items():
        if name != "mqttd" and r.get("max_unacked") and r["max_unacked"] <= DEVICE_WINDOW:
            notes.append(
                f"- constrained on {name}: max unacked {r['max_unacked']} is not a window: "
                "the broker routed the commands no faster than the devices acknowledged "
                "them (see cmds routed s)."
            )
        tel = r.get("telemetry") or {}
        delivery = r.get("command_delivery_s")
        if delivery and tel.get("elapsed_s") and tel["elapsed_s"] < delivery:
            notes.append(
                f"- constrained on {name}: the telemetry was over after {tel['elapsed_s']:.3f} s,"
                f" before the last command was acknowledged ({delivery:.3f} s): the end of "
                "the command delivery ran without load."
            )
        for error in (r.get("errors") or [])[:3]:
            notes.append(f"- constrained on {name}: {error}")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--brokers", default=",".join(BROKERS),
                        help="comma-separated, from: " + ", ".join(BROKERS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, from: " + ", ".join(SCENARIOS))
    parser.add_argument("--amqtt-divisor", type=int, metavar="N",
                        help="give amqtt 1/N of the messages (default: the size's)")
    parser.add_argument("--generator", choices=GENERATORS,
                        help="load generator for the fan-in, fan-out and latency scenarios "
                             "(default: c if a C compiler is found, else python)")
    parser.add_argument("--cluster-persistent", action="store_true",
                        help="cluster_qos1: the subscriber has a persistent session (clean "
                             "session 0), in the single-node and the cluster row")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="runs per broker of each scenario of issue 18's goals, the "
                             "median shown (default: 3 for --size full, else 1)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="JSON results file ('' for none); default %(default)s")
    args = parser.parse_args(argv)
    brokers = tuple(b.strip() for b in args.brokers.split(",") if b.strip())
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    for value, known, what in ((brokers, BROKERS, "broker"), (scenarios, SCENARIOS, "scenario")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    run_benchmark(
        args.size, brokers, scenarios, args.output or None, amqtt_divisor=args.amqtt_divisor,
        generator=args.generator, cluster_persistent=args.cluster_persistent,
        repeats=args.repeats, echo=lambda line: print(line, flush=True),
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
