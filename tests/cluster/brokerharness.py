"""mqttd nodes as subprocesses for cluster tests: ``python -m mqttd`` with ``--cluster`` and
``--node-name``, on free ports (``-p 0``, ``--http-port 0``, read back from the banner),
each with its own data directory and a small config file (short heartbeats).

    async with mqttd_nodes(tmp_path, nats.urls, 3) as nodes:
        await wait_ready(nodes)
        nodes[0].port, nodes[0].http_port, await nodes[0].get("/readyz")

The processes run this tree's code (cwd and PYTHONPATH are the tree's root). Every process
is ended by its PID on the way out: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0  # python start-up on a loaded machine
STOP_TIMEOUT_S = 10.0
READY_POLL_S = 0.05
LOG_KEEP_BYTES = 512 * 1024
MQTT_PORT = re.compile(rb"  mqtt: +127\.0\.0\.1:(\d+) tcp")
HTTP_PORT = re.compile(rb"  dashboard: +http://127\.0\.0\.1:(\d+)/")

# fast heartbeats; the rest are the defaults
CONFIG = """\
logging: {{summary_interval_s: 0}}
monitoring: {{sys_interval_s: 0.5}}
cluster:
  replicas: {replicas}
  heartbeat_s: 0.25
  node_dead_after_s: 2
  js_timeout_s: 2
{cluster_options}{extra}"""


@attrs.define(eq=False)
class MqttdNode:
    name: str
    proc: trio.Process
    log: bytearray = attrs.Factory(bytearray)
    port: int = 0
    http_port: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)
    exited: bool = False
    command: list[str] = attrs.Factory(list)
    nursery: trio.Nursery | None = None
    kills: int = 0  # times killed with SIGKILL (kill9)
    killed: bool = False  # by the test (kill -9): its exit status is not checked

    async def kill9(self) -> None:
        """SIGKILL, as a crash: nothing is flushed, no farewell."""
        self.kills += 1
        self.killed = True
        self.proc.kill()
        await self.proc.wait()
        while not self.exited:  # its stderr drained to the end
            await self._changed.wait()

    async def restart(self) -> None:
        """Start the node again (same name, data directory and config) after it ended;
        returns once its banner is out."""
        assert self.proc.returncode is not None and self.nursery is not None
        self.log.clear()
        self.exited = False
        self.killed = False
        self.port = self.http_port = 0
        self.proc = await _spawn(self.command)
        self.nursery.start_soon(self._drain)
        with trio.fail_after(START_TIMEOUT_S):
            await self.wait_banner()

    def kill(self) -> None:
        """kill -9, by PID."""
        self.killed = True
        self.proc.kill()

    async def _drain(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        try:
            while chunk := await stderr.receive_some(65536):
                self.log += chunk
                if len(self.log) > LOG_KEEP_BYTES:
                    del self.log[: len(self.log) - LOG_KEEP_BYTES]
                self._wake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.exited = True
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_banner(self) -> None:
        while not (MQTT_PORT.search(self.log) and HTTP_PORT.search(self.log)):
            if self.exited:
                raise RuntimeError(f"mqttd {self.name} exited:\n{self.log.decode()}")
            await self._changed.wait()
        self.port = int(MQTT_PORT.search(self.log).group(1))  # type: ignore[union-attr]
        self.http_port = int(HTTP_PORT.search(self.log).group(1))  # type: ignore[union-attr]

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET on the operations listener: (status, body)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.http_port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body

    async def wait_ready(self) -> None:
        """Poll /readyz until it answers 200 (NATS, streams, retained loaded)."""
        while (await self.get("/readyz"))[0] != 200:
            await trio.sleep(READY_POLL_S)

    async def stop(self) -> None:
        proc = self.proc
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_S):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        await proc.wait()


async def start_node(
    nursery: trio.Nursery, name: str, urls: Sequence[str], data_dir: Path, config: str
) -> MqttdNode:
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir / "mqttd.yaml"
    config_file.write_text(config)
    command = [
        sys.executable, "-m", "mqttd", "-c", str(config_file), "--host", "127.0.0.1",
        "-p", "0", "--http-port", "0", "--data-dir", str(data_dir),
        "--cluster", ",".join(urls), "--node-name", name,
    ]
    node = MqttdNode(name, await _spawn(command), command=command, nursery=nursery)
    nursery.start_soon(node._drain)
    return node


async def _spawn(command: list[str]) -> trio.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await trio.lowlevel.open_process(command, stderr=subprocess.PIPE, cwd=ROOT, env=env)


@asynccontextmanager
async def mqttd_nodes(
    tmp_path: Path, nats_urls: Sequence[str], count: int, *, replicas: int | None = None,
    cluster_options: str = "", extra: str = "",
) -> AsyncIterator[list[MqttdNode]]:
    """``count`` nodes n0, n1, ...; node i lists NATS server i first. Yields once every
    banner is out (the ports are known), not necessarily ready (``wait_ready``).
    ``cluster_options``: more lines of the ``cluster:`` section (indented two spaces);
    ``extra``: more top-level sections of the configuration."""
    replicas = replicas if replicas is not None else min(3, len(nats_urls))
    config = CONFIG.format(replicas=replicas, cluster_options=cluster_options, extra=extra)
    nodes: list[MqttdNode] = []
    async with trio.open_nursery() as nursery:
        try:
            for i in range(count):
                urls = [*nats_urls[i % len(nats_urls):], *nats_urls[: i % len(nats_urls)]]
                nodes.append(await start_node(nursery, f"n{i}", urls, tmp_path / f"n{i}",
                                              config))
            with trio.fail_after(START_TIMEOUT_S):
                for node in nodes:
                    await node.wait_banner()
            try:
                yield nodes
            except BaseException:
                for node in nodes:  # pytest shows this output with the failure
                    print(f"--- mqttd {node.name}, end of its log:")
                    print(node.log[-6000:].decode(errors="replace"))
                raise
            for node in nodes:  # an ordered stop exits 0, NATS reachable or not
                await node.stop()
                assert node.killed or node.proc.returncode == 0, (
                    node.log.decode(errors="replace")[-4000:])
        finally:
            with trio.CancelScope(shield=True):
                for node in nodes:
                    if node.proc.returncode is None:
                        node.proc.send_signal(signal.SIGTERM)
                for node in nodes:
                    await node.stop()


async def wait_ready(nodes: Sequence[MqttdNode]) -> None:
    for node in nodes:
        await node.wait_ready()
