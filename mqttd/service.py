"""The broker as a trio service: an :class:`~mqttd.engine.dispatch.Engine` run on the network.

``Broker.serve`` opens the store (restoring what it holds), loads the security files, and runs
in one nursery the store writer, the timer loop, the session expiry loop, the listeners
(``mqttd.server``) and the bridges, then reports the bound addresses::

    broker = Broker(config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(broker.serve)
        ...
        broker.shutdown()          # ordered: listeners, wills, connections, bridges, storage

or ``async with mqttd.service.running(config) as broker: broker.port``.

Everything that waits lives here or below: paused readers wait for progress (``pauses``), the
timer loop sleeps until the engine's next timer, slow password checks run in worker threads
(:class:`LoginChecks`). The engine asks for them through its hooks and never imports trio.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from mqttd.bridge import Bridges
from mqttd.codec import MQTTError
from mqttd.codec.errors import ServerUnavailable
from mqttd.codec.packets import Connect
from mqttd.config import Config, Persistence
from mqttd.connection import Connection
from mqttd.engine import connect
from mqttd.engine.dispatch import Engine
from mqttd.engine.summary import Summary
from mqttd.engine.systopics import SysTopics
from mqttd.security.gatekeeper import Gatekeeper, peer_host
from mqttd.server.http import OpsServer
from mqttd.server.listeners import TCPServer
from mqttd.server.pauses import ReadPauses
from persistence.store import MEMORY, SqliteStore
from persistence.writer import GroupCommitWriter

log = logging.getLogger("mqttd.broker")

SHUTDOWN_FLUSH_TIMEOUT_S = 5.0
API_TOKEN_FILE = "api-token"
SHUTDOWN_STORE_TIMEOUT_S = 30.0  # the last commits; longer only when the disk cannot take them
AUTH_THREADS = 2  # worker threads for slow password hashes (a bounded share of the CPU)


@attrs.define(eq=False)
class Broker(Engine):
    addresses: list[tuple[str, int]] = attrs.Factory(list)
    http_addresses: list[tuple[str, int]] = attrs.Factory(list)  # the operations listener
    ops: OpsServer | None = None
    pauses: ReadPauses = attrs.field(
        init=False, default=attrs.Factory(ReadPauses, takes_self=True)
    )
    bridges: Bridges | None = attrs.field(init=False, default=None)  # while serving
    server: TCPServer | None = attrs.field(init=False, default=None)  # while serving
    # cluster mode (mqttd.clustering, imported only when enabled): while serving
    cluster_node: Any = attrs.field(init=False, default=None)
    _shutdown_requested: trio.Event = attrs.field(init=False, factory=trio.Event)
    _timer_wakeup: trio.Event = attrs.field(init=False, factory=trio.Event)

    @property
    def port(self) -> int:
        """The port of the first listener (useful with port 0)."""
        return self.addresses[0][1]

    # -- running -----------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every configured listener and serve until :meth:`shutdown`.
        Reports the bound ``[(host, port), ...]`` through ``task_status``."""
        if self.writer is None:
            await trio.to_thread.run_sync(self.open_store)
        if not self.security_loaded:
            self.load_security()
        writer = self.writer
        assert isinstance(writer, GroupCommitWriter)
        server = self.server = TCPServer(self, self.pauses)
        bridges = self.bridges = Bridges(self, self.pauses)
        bridges.setup()  # before clients connect, so that nothing for a bridge is missed
        try:
            async with trio.open_nursery() as services:
                logins = LoginChecks(self.gate)
                self.login_checks = lambda conn, packet, username: services.start_soon(
                    self._check_login, logins, conn, packet, username,
                    trio.current_time() + self.config.limits.connect_timeout_s,
                )
                await services.start(writer.run)
                if self.config.cluster.enabled:  # before the listeners: nothing is missed
                    from mqttd.clustering.node import ClusterNode

                    self.cluster_node = ClusterNode.create(self, self.config.cluster)
                    await services.start(self.cluster_node.run)
                services.start_soon(self._expiry_loop)
                services.start_soon(self._timer_loop)
                self.addresses = await services.start(server.serve)
                if self.config.http.enabled:
                    token = self.config.http.token or api_token(self.config.persistence)
                    self.ops = OpsServer(self, self.config.http, token)
                    self.http_addresses = await services.start(self.ops.serve)
                await services.start(bridges.run)
                interval_s = self.config.monitoring.sys_interval_s
                if interval_s > 0:
                    SysTopics(self, interval_s).start()
                if self.config.logging.summary_interval_s > 0:
                    Summary(self, self.config.logging.summary_interval_s).start()
                task_status.started(self.addresses)
                await self._shutdown_requested.wait()
                log.info("shutting down: %d connections", len(self.connections))
                await server.shutdown(SHUTDOWN_FLUSH_TIMEOUT_S)
                await bridges.stop()  # after the wills, which may be bridged
                if self.cluster_node is not None:  # after the wills, which go to the others
                    await self.cluster_node.stop()
                with trio.move_on_after(SHUTDOWN_STORE_TIMEOUT_S):
                    await writer.flush()  # storage last: everything the connections left
                if writer.pending:
                    log.error(
                        "stopping with %d writes not stored (%s); none of them was "
                        "acknowledged", writer.pending, writer.storage_problem or "too slow",
                    )
                log.info(
                    "store flushed: %d commits, %d writes", writer.commits, writer.ops_written
                )
                services.cancel_scope.cancel()
        finally:
            self.login_checks = None
            self.server = None
            self.cluster_node = None
            with trio.CancelScope(shield=True):
                await writer.aclose()
        log.info("mqttd stopped")

    def open_store(self) -> None:
        """Open the database (moving a corrupt one aside) and restore sessions,
        subscriptions, inflight and queued messages and retained messages from it. Loads the
        password and ACL files too (SecurityFileError if one is unusable)."""
        if not self.security_loaded:
            self.load_security()
        cfg = self.config.persistence
        path = MEMORY if cfg.in_memory else str(cfg.db_path())
        store = SqliteStore.open(path, cfg.durability)
        snapshot = store.load(time.time(), cfg.session_expiry_s)
        writer = GroupCommitWriter(
            store, cfg.max_pending_writes, max_disk_bytes=cfg.max_disk_bytes,
            min_free_bytes=cfg.min_free_disk_bytes, retry_s=cfg.storage_check_interval_s,
        )
        writer.on_commit = self._on_commit
        writer.on_storage = self.storage_changed
        self.writer = writer
        self.restore(snapshot)
        log.info(
            "store %s: restored %d sessions (%d subscriptions, %d inflight, %d queued), "
            "%d retained messages; %d expired sessions deleted",
            path, len(snapshot.sessions),
            sum(len(s.subscriptions) for s in snapshot.sessions.values()),
            sum(len(s.inflight) for s in snapshot.sessions.values()),
            sum(s.queued for s in snapshot.sessions.values()),
            len(snapshot.retained), len(snapshot.expired),
        )

    def shutdown(self) -> None:
        """Ask :meth:`serve` to stop: listeners first, then connections (with a deadline)."""
        self._shutdown_requested.set()

    def reload(self) -> bool:
        """Re-read the password and ACL files (see Engine.reload) and the TLS listeners'
        certificate files (SIGHUP). True when everything was reloaded."""
        server = self.server
        certificates_ok = server.reload_certificates() if server is not None else True
        return self.reload_security() and certificates_ok

    # -- the engine's hooks ----------------------------------------------------------------

    def notify_progress(self) -> None:
        """Output was sent or a commit finished: paused readers look again."""
        self.pauses.notify()

    def timers_changed(self) -> None:
        self._timer_wakeup.set()

    async def _check_login(
        self, logins: LoginChecks, conn: Connection, packet: Connect, username: str,
        deadline: float,
    ) -> None:
        error = await logins.check(
            conn, packet, username, deadline,
            wanted=lambda: not conn.closing and conn in self.parked,
        )
        connect.login_done(self, conn, packet, username, error)

    async def _timer_loop(self) -> None:
        timers = self.timers
        while True:
            timers.run_due(time.time())
            self._timer_wakeup = trio.Event()
            # (a timer that came due while the others ran: at once, never a negative wait)
            with trio.move_on_after(max(0.0, timers.next_deadline() - time.time())):
                await self._timer_wakeup.wait()

    async def _expiry_loop(self) -> None:
        interval_s = self.config.persistence.expiry_check_interval_s
        while True:
            await trio.sleep(interval_s)
            self.expire_sessions()

    # -- counters ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Broker-wide counters (read by the metrics work)."""
        result = super().stats()
        links = self.bridges.links if self.bridges is not None else ()
        result["bridges_connected"] = sum(link.state == "connected" for link in links)
        if self.cluster_node is not None:
            result.update(self.cluster_node.stats())
        return result

    def cluster_nodes(self) -> dict[str, bool]:
        """Cluster mode: every node known, and whether it is up."""
        node = self.cluster_node
        return node.liveness.nodes() if node is not None else {}

    def cluster_overview(self) -> dict[str, Any] | None:
        """Cluster mode: every node known, its last heartbeat's counters, and the totals
        over the nodes up (mqttd.cluster_view); None when not in cluster mode."""
        node = self.cluster_node
        return node.liveness.overview() if node is not None else None

    def not_ready(self) -> list[str]:
        """Why the broker cannot serve now (empty when it can): for /readyz."""
        problems = []
        if not self.addresses:
            problems.append("the MQTT listeners are not bound")
        writer = self.writer
        if writer is None:
            problems.append("the store is not open")
        else:
            if not writer.accepting:
                problems.append(f"the store has no room: {writer.storage_problem}")
            if writer.congested:
                problems.append(
                    f"the store's writer is behind: {writer.pending} writes pending"
                )
        if self.cluster_node is not None:
            problems += [f"cluster: {problem}" for problem in self.cluster_node.not_ready()]
        return problems

    def bridge_stats(self) -> list[dict[str, Any]]:
        """Per bridge: state, connects, forwarded, received, queued, last error, ..."""
        return self.bridges.stats() if self.bridges is not None else []


def api_token(persistence: Persistence) -> str:
    """The operations API's credential when the configuration sets none: generated on the
    first start into ``<data_dir>/api-token`` (mode 0600) and read back afterwards; kept in
    memory only for a store in memory. Hexadecimal: safe in a shell and on a command line
    (a base64url token may start with '-' and be read as an option)."""
    if persistence.in_memory:
        return secrets.token_hex(32)
    path = Path(persistence.data_dir) / API_TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("operations API token written to %s (send it as Authorization: Bearer ...)", path)
    return token


class LoginChecks:
    """Password checks the authenticator calls slow (PBKDF2 with many iterations), in at most
    AUTH_THREADS worker threads, one at a time per source address: a burst of guesses from one
    address meets the failed-login limit after ``max_failures`` of them."""

    def __init__(self, gate: Gatekeeper) -> None:
        self.gate = gate
        self.threads = trio.CapacityLimiter(AUTH_THREADS)
        self._turns: dict[str, tuple[trio.Lock, list[int]]] = {}

    async def check(
        self, conn: Connection, packet: Connect, username: str, deadline: float,
        wanted: Callable[[], bool],
    ) -> MQTTError | None:
        """None if accepted, else the refusal. ``wanted()`` False (the client left
        meanwhile) skips the check; past ``deadline`` (trio time) the client is told to come
        back later (ServerUnavailable) without one."""
        host = peer_host(conn.peer)
        async with self._turn(host):
            if not wanted():
                return None
            if trio.current_time() > deadline:
                return ServerUnavailable("the password check waited past connect_timeout_s")
            refusal = self.gate.over_limit(host)
            if refusal is not None:
                return refusal
            try:
                ok = await trio.to_thread.run_sync(
                    self.gate.authenticate, conn, username, packet.password,
                    limiter=self.threads, abandon_on_cancel=True,
                )
            except MQTTError as exc:
                return exc
            if not ok:  # counted before the next check from this address starts
                return self.gate.failed(host, username)
        return None

    @asynccontextmanager
    async def _turn(self, host: str) -> AsyncIterator[None]:
        turn = self._turns.get(host)
        if turn is None:
            turn = self._turns[host] = (trio.Lock(), [0])
        turn[1][0] += 1
        try:
            async with turn[0]:
                yield
        finally:
            turn[1][0] -= 1
            if not turn[1][0]:
                del self._turns[host]


@asynccontextmanager
async def running(config: Config | None = None, **options: Any) -> AsyncIterator[Broker]:
    """Run a broker for the duration of the block; ``broker.port`` is the bound port.
    ``options`` go to :class:`Broker` (e.g. ``authenticator=``, ``authorizer=``)."""
    broker = Broker(config if config is not None else Config(), **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        try:
            yield broker
        finally:
            broker.shutdown()
