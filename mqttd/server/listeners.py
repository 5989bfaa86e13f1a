"""Listeners (TCP, TLS, WebSocket, WebSocket over TLS): bind, accept, connection limits,
TLS handshakes and WebSocket upgrades, certificate reloads, the ordered stop.

A plain MQTT connection is served by the :class:`~mqttd.server.reactor.Reactor`, which
serves every plain TCP connection in one task (on Linux; elsewhere as the others). Every
other accepted socket gets one handler task in the handlers nursery: a TLS listener does the
handshake there, and a WebSocket listener the HTTP upgrade, before the MQTT connection starts
(both within the CONNECT timeout, counted from the accept); then a
:class:`~mqttd.server.stream_task.ClientHandler` serves the resulting trio ``Stream`` with its
reader and writer (:mod:`mqttd.server.stream_task`).
"""

from __future__ import annotations

import _socket
import functools
import logging
import math
import socket
import ssl
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd.codec import Decoder, MQTTError
from mqttd.codec.errors import ServerShuttingDown
from mqttd.codec.kinds import BRIDGE_LEVEL_FLAG
from mqttd.codec.packets import PROTOCOL_5, ConnAck, Connect
from mqttd.codec.reason import (
    CONNACK_SERVER_UNAVAILABLE,
    CONNECTION_RATE_EXCEEDED,
    SERVER_BUSY,
)
from mqttd.config import Listener
from mqttd.server.bind import format_address, open_listeners
from mqttd.server.reactor import HAVE_EPOLL, Reactor
from mqttd.server.stream_task import RECEIVE_SIZE, ClientHandler
from mqttd.server.tcp import accept_batches, listening_socket
from mqttd.server.tls import TLSSetupError, certificate_cn, handshake, server_context
from mqttd.server.websocket import accept_websocket

if TYPE_CHECKING:
    from mqttd.engine.dispatch import Engine as Broker
    from mqttd.server.pauses import ReadPauses

log = logging.getLogger(__name__)

# refused connections are logged at most this often per limit (a flood must not flood the log)
REFUSAL_LOG_INTERVAL_S = 10.0

SCHEMES = {
    ("mqtt", False): "mqtt",
    ("mqtt", True): "mqtts",
    ("websockets", False): "ws",
    ("websockets", True): "wss",
}


def _capacity_error(exc: OSError) -> None:
    log.error("accept failed (%s); retrying in 100 ms", exc)


MAX_REFUSALS = 64  # connections over a limit answered at once; more are closed unanswered
REFUSAL_READ_TIMEOUT_S = 2.0  # how long a refused client has to send its CONNECT


async def answer_connack(stream: trio.abc.Stream, code: int) -> None:
    """Read a CONNECT and answer it with a refusing CONNACK: ``code`` at 5.0, 0x03 Server
    unavailable at 3.1.1 and 3.1 (which have no code for busy or rate limits)."""
    decoder = Decoder(MAX_REFUSAL_CONNECT_BYTES, accept_v5=True)
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return
        try:
            packets = decoder.feed(data)
        except MQTTError:
            return
        if packets:
            break
    connect = packets[0]
    if not isinstance(connect, Connect):
        return
    level = connect.protocol_level & ~BRIDGE_LEVEL_FLAG
    refusal = ConnAck(False, code if level == PROTOCOL_5 else CONNACK_SERVER_UNAVAILABLE)
    await stream.send_all(refusal.encode(level))


MAX_REFUSAL_CONNECT_BYTES = 65_536


@attrs.define(eq=False)
class ConnectionRate:
    """Token bucket for ``limits.max_connection_rate_per_s`` (a burst of one second's
    worth); ``rate`` < 0: no limit."""

    rate: float
    tokens: float = 0.0
    at: float = -math.inf

    def over(self, now: float) -> bool:
        if self.rate < 0:
            return False
        burst = max(self.rate, 1.0)
        self.tokens = min(burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return True
        self.tokens -= 1.0
        return False


@attrs.define(eq=False)
class _RefusalLog:
    """Refusals of one limit, logged at most once per REFUSAL_LOG_INTERVAL_S."""

    message: str
    unlogged: int = 0
    logged_at: float = -math.inf

    def refused(self) -> None:
        self.unlogged += 1
        now = trio.current_time()
        if now - self.logged_at >= REFUSAL_LOG_INTERVAL_S:
            more = f" ({self.unlogged} refused since the last report)" if self.unlogged > 1 else ""
            log.warning("%s; refusing a client%s", self.message, more)
            self.logged_at = now
            self.unlogged = 0


@attrs.define(eq=False)
class BoundListener:
    """One configured listener while it serves: its sockets, its TLS context (replaced by
    :meth:`TCPServer.reload_certificates`) and its counters."""

    config: Listener
    index: int
    ssl_context: ssl.SSLContext | None = None
    sockets: list[socket.socket] = attrs.Factory(list)  # listening, non-blocking
    addresses: list[tuple[str, int]] = attrs.Factory(list)
    connections: int = 0  # open now, from the accept (TLS/WebSocket handshakes included)
    accepted: int = 0
    refused: int = 0  # over this listener's max_connections
    handshake_failures: int = 0  # TLS handshake or WebSocket upgrade failed or refused
    _refusals: _RefusalLog | None = None
    # plain MQTT over TCP (served by the reactor): the accept path's test, as an attribute
    plain_mqtt: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.plain_mqtt = self.scheme == "mqtt"

    @property
    def scheme(self) -> str:
        return SCHEMES[self.config.protocol, self.config.tls is not None]

    def describe(self, host: str, port: int) -> str:
        """``127.0.0.1:8883 (mqtts)``, ``127.0.0.1:8080 (ws, path /mqtt)``; plain MQTT over
        TCP has no suffix."""
        details = []
        if self.config.protocol == "websockets":
            details.append(f"path {self.config.path}")
        tls = self.config.tls
        if tls is not None and (tls.require_certificate or tls.use_identity_as_username):
            details.append("client certificate required")
        address = format_address(host, port)
        if self.scheme == "mqtt" and not details:
            return address
        return f"{address} ({', '.join([self.scheme, *details])})"

    @property
    def name(self) -> str:
        if self.addresses:
            return self.describe(*self.addresses[0])
        address = format_address(self.config.host, self.config.port)
        return f"listeners[{self.index}] ({self.scheme} on {address})"

    def refuse(self) -> None:
        self.refused += 1
        if self._refusals is None:
            self._refusals = _RefusalLog(
                f"listener {self.name}: connection limit ({self.config.max_connections}) reached"
            )
        self._refusals.refused()

    def stats(self) -> dict[str, Any]:
        return {
            "listener": self.name,
            "connections": self.connections,
            "accepted": self.accepted,
            "refused": self.refused,
            "handshake_failures": self.handshake_failures,
        }


class TCPServer:
    """Every listener of ``broker.config``: plain MQTT, TLS, WebSocket, WebSocket over TLS."""

    def __init__(self, broker: Broker, pauses: ReadPauses) -> None:
        self.broker = broker
        self.pauses = pauses
        self.handlers: set[ClientHandler] = set()
        self.listeners = [
            BoundListener(cfg, index) for index, cfg in enumerate(broker.config.listeners)
        ]
        self.connections = 0  # open sockets, from the accept (handshakes included)
        self.refused = 0  # over limits.max_connections
        self._refusals = _RefusalLog(
            f"connection limit ({broker.config.limits.max_connections}) reached"
        )
        limits = broker.config.limits
        self._rate = ConnectionRate(limits.max_connection_rate_per_s)
        self._rate_refusals = _RefusalLog(
            f"connection rate limit ({limits.max_connection_rate_per_s}/s) reached"
        )
        self.refusing = 0  # refusals being answered (CONNACK with a reason) now
        self._accept_scope: trio.CancelScope | None = None
        self._handlers_nursery: trio.Nursery | None = None
        self._stopping = False
        self._all_closed = trio.Event()
        # plain TCP connections (None: no epoll here; they get handler tasks too)
        self.reactor = Reactor(broker, pauses, self._client_done) if HAVE_EPOLL else None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every listener and serve. Reports ``[(host, port), ...]`` (in listener order)
        once listening. A certificate or key that cannot be loaded raises
        :class:`~mqttd.server.tls.TLSSetupError` (an ``OSError``) before anything is bound;
        an address that cannot be bound :class:`~mqttd.server.bind.BindError` (one too)."""
        for bound in self.listeners:
            if bound.config.tls is not None:
                try:
                    bound.ssl_context = server_context(bound.config.tls)
                except TLSSetupError as exc:
                    raise TLSSetupError(f"{bound.name}: {exc}") from exc
        try:
            for bound in self.listeners:
                cfg = bound.config
                name = f"listeners[{bound.index}]"
                bound.sockets = [
                    listening_socket(ls) for ls in await open_listeners(name, cfg.host, cfg.port)
                ]
                bound.addresses = [tuple(ls.getsockname()[:2]) for ls in bound.sockets]
        except OSError:
            for bound in self.listeners:
                for listening in bound.sockets:
                    listening.close()
            raise
        addresses = []
        for bound in self.listeners:
            for host, port in bound.addresses:
                log.info("mqttd listening on %s", bound.describe(host, port))
                addresses.append((host, port))
        async with trio.open_nursery() as handlers:
            self._handlers_nursery = handlers
            reactor = self.reactor
            if reactor is not None:
                handlers.start_soon(reactor.run)
                handlers.start_soon(reactor.flusher)
                handlers.start_soon(reactor.timers)
            async with trio.open_nursery() as accepting:
                self._accept_scope = accepting.cancel_scope
                for bound in self.listeners:
                    for listening in bound.sockets:
                        accepting.start_soon(
                            accept_batches, listening,
                            functools.partial(self._accepted, bound, int(listening.family)),
                            _capacity_error,
                        )
                task_status.started(addresses)
            # listeners are closed; handlers run until shutdown() closes them

    def _accepted(self, bound: BoundListener, family: int, fd: int, address: Any) -> None:
        """A connection (file descriptor ``fd``) was accepted on ``bound``: refused over a
        limit, else served (plain MQTT by the reactor, the others by a handler task)."""
        max_connections = self.broker.config.limits.max_connections
        if 0 <= max_connections <= self.connections:
            self.refused += 1
            self._count_limit("connections")
            self._refusals.refused()
            self._refuse(socket.socket(family, socket.SOCK_STREAM, 0, fd), bound, SERVER_BUSY)
            return
        listener_max = bound.config.max_connections
        if 0 <= listener_max <= bound.connections:
            bound.refuse()
            self._count_limit("listener_connections")
            self._refuse(socket.socket(family, socket.SOCK_STREAM, 0, fd), bound, SERVER_BUSY)
            return
        now = trio.current_time()
        if self._rate.rate >= 0 and self._rate.over(now):
            self._count_limit("connection_rate")
            self._rate_refusals.refused()
            self._refuse(
                socket.socket(family, socket.SOCK_STREAM, 0, fd), bound, CONNECTION_RATE_EXCEEDED
            )
            return
        self.connections += 1
        bound.connections += 1
        bound.accepted += 1
        reactor = self.reactor
        if reactor is not None and bound.plain_mqtt:
            try:
                peer = format_address(*address[:2])
            except (TypeError, ValueError):
                peer = "?"
            reactor.add(
                # (the C socket type: all the reactor uses, and cheaper than socket.socket)
                _socket.socket(family, socket.SOCK_STREAM, 0, fd),
                peer, bound.config, bound, now + self.broker.config.limits.connect_timeout_s,
            )
            return
        sock = trio.socket.from_stdlib_socket(socket.socket(family, socket.SOCK_STREAM, 0, fd))
        self._handlers_nursery.start_soon(  # type: ignore[union-attr]
            self._handle, trio.SocketStream(sock), bound
        )

    def _client_done(self, bound: Any) -> None:
        """A connection served by the reactor ended (``bound``: its listener)."""
        self.connections -= 1
        bound.connections -= 1
        if self._stopping and not self.handlers and not self._reactor_clients():
            self._all_closed.set()

    def _refuse(self, sock: socket.socket, bound: BoundListener, code: int) -> None:
        """Over a connection limit: on a plain MQTT listener, read the CONNECT briefly and
        answer CONNACK with ``code`` (5.0; 3.1.1 gets 0x03 Server unavailable), at most
        MAX_REFUSALS at a time; otherwise close at once."""
        if bound.scheme != "mqtt" or self.refusing >= MAX_REFUSALS or self._stopping:
            sock.close()
            return
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.refusing += 1
        self._handlers_nursery.start_soon(self._answer_refusal, stream, code)  # type: ignore[union-attr]

    async def _answer_refusal(self, stream: trio.abc.Stream, code: int) -> None:
        try:
            with trio.move_on_after(REFUSAL_READ_TIMEOUT_S):
                await answer_connack(stream, code)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.refusing -= 1
            await trio.aclose_forcefully(stream)

    def _count_limit(self, name: str) -> None:
        exceeded = self.broker.limits_exceeded
        exceeded[name] = exceeded.get(name, 0) + 1

    async def _handle(self, stream: Any, bound: BoundListener) -> None:
        deadline = trio.current_time() + self.broker.config.limits.connect_timeout_s
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = format_address(host, port)
        except OSError:
            peer = "?"
        try:
            transport: trio.abc.Stream = stream
            identity = None
            context = bound.ssl_context
            if context is not None:
                ssl_stream = await handshake(stream, context, peer, deadline)
                if ssl_stream is None:
                    bound.handshake_failures += 1
                    return
                transport = ssl_stream
                tls = bound.config.tls
                if tls is not None and tls.use_identity_as_username:
                    identity = certificate_cn(ssl_stream.getpeercert())
                    if identity is None:
                        bound.handshake_failures += 1
                        log.warning(
                            "client %s: its certificate has no subject CN to use as the "
                            "username; closing", peer,
                        )
                        return
            if bound.config.protocol == "websockets":
                await self._serve_websocket(transport, peer, bound, identity, deadline)
            elif (handler := self._client_handler(transport, peer, bound, identity)) is not None:
                # served here, not in another coroutine: an idle connection's task holds
                # one frame less
                try:
                    await handler.run(deadline)
                finally:
                    self._handler_done(handler)
        finally:
            self.connections -= 1
            bound.connections -= 1
            await trio.aclose_forcefully(stream)  # (already closed unless a step failed)

    async def _serve_websocket(
        self,
        transport: trio.abc.Stream,
        peer: str,
        bound: BoundListener,
        identity: str | None,
        deadline: float,
    ) -> None:
        max_message_size = self.broker.config.limits.max_packet_size_bytes + RECEIVE_SIZE
        async with trio.open_nursery() as ws_tasks:  # the WebSocket's own reader task
            ws = await accept_websocket(
                transport, bound.config, peer, ws_tasks, deadline, max_message_size
            )
            if ws is None:
                bound.handshake_failures += 1
            else:
                await self._serve_client(ws, peer, bound, identity, deadline)
            ws_tasks.cancel_scope.cancel()
            await trio.aclose_forcefully(transport)

    async def _serve_client(
        self,
        stream: trio.abc.Stream,
        peer: str,
        bound: BoundListener,
        identity: str | None,
        deadline: float,
    ) -> None:
        handler = self._client_handler(stream, peer, bound, identity)
        if handler is None:
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler.run(deadline)
        finally:
            self._handler_done(handler)

    def _client_handler(
        self, stream: trio.abc.Stream, peer: str, bound: BoundListener, identity: str | None
    ) -> ClientHandler | None:
        """The handler of a new client connection (None: shutdown has begun, the caller
        closes the stream)."""
        if self._stopping:  # a handshake that finished after shutdown began
            return None
        handler = ClientHandler(
            self.broker, self.pauses, stream, peer, self._handlers_nursery,  # type: ignore[arg-type]
            bound.config, identity,
        )
        self.handlers.add(handler)
        return handler

    def _handler_done(self, handler: ClientHandler) -> None:
        self.handlers.discard(handler)
        if self._stopping and not self.handlers and not self._reactor_clients():
            self._all_closed.set()

    def _reactor_clients(self) -> int:
        return len(self.reactor.clients) if self.reactor is not None else 0

    def reload_certificates(self) -> bool:
        """Reload every TLS listener's certificate, key and CA files (SIGHUP). Connections
        accepted from now on use the new ones; open connections keep theirs. A listener
        whose files cannot be loaded keeps its current context (the error is logged).
        Returns True when every TLS listener was reloaded (also when there is none)."""
        ok = True
        for bound in self.listeners:
            tls = bound.config.tls
            if tls is None:
                continue
            try:
                context = server_context(tls)
            except TLSSetupError as exc:
                log.error(
                    "listener %s: TLS certificates not reloaded, keeping the current ones: %s",
                    bound.name, exc,
                )
                ok = False
                continue
            bound.ssl_context = context
            log.info("listener %s: TLS certificates reloaded", bound.name)
        return ok

    def listener_stats(self) -> list[dict[str, Any]]:
        """Per-listener counters, in configuration order."""
        return [bound.stats() for bound in self.listeners]

    async def shutdown(self, timeout_s: float) -> None:
        """Ordered stop: close the listeners, close every connection after flushing
        what is queued for it, and cancel what is still running after ``timeout_s``."""
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self._stopping = True
        self.broker.close_all_connections(ServerShuttingDown("server shutting down"))
        if self.handlers or self._reactor_clients():
            with trio.move_on_after(timeout_s):
                await self._all_closed.wait()
        if self._handlers_nursery is not None:
            self._handlers_nursery.cancel_scope.cancel()
