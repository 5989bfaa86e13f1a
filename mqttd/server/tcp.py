"""TCP listeners and the per-connection reader/writer tasks.

Each accepted socket gets one handler task in the handlers nursery. The **reader**
receives up to 64 KiB at a time under a deadline (the CONNECT timeout, then 1.5 x
keepalive, pushed forward by every read)
and hands the bytes to the broker, which decodes and handles every complete packet
synchronously. The **writer** is the only task that sends: started when the outbox goes
from empty to non-empty, it joins everything pending into one ``send_all`` per batch and
ends when nothing is left (idle connections hold no writer task).
"""

from __future__ import annotations

import errno
import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from mqttd.codec import MQTTError
from mqttd.codec.errors import ServerShuttingDown
from mqttd.config import Listener

if TYPE_CHECKING:
    from mqttd.broker import Broker

log = logging.getLogger(__name__)

RECEIVE_SIZE = 65536
CLOSE_FLUSH_TIMEOUT_S = 5.0
# accept() errors that mean "out of resources, try again shortly" (as trio's serve_listeners)
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class ClientHandler:
    """One connection. The reader runs in this task. The writer is a second task that
    exists only while there is output: started when the outbox goes from empty to
    non-empty, it sends everything pending (one ``send_all`` per batch) and ends when the
    outbox is empty, so an idle connection costs one task. It is still the only task that
    sends. Deadlines (the CONNECT timeout, then 1.5 x keepalive) live on the connection's
    cancel scope, so an idle connection holds no per-read timer either."""

    __slots__ = ("_nursery", "_scope", "_writing", "broker", "conn", "stream")

    def __init__(
        self,
        broker: Broker,
        stream: trio.SocketStream,
        peer: str,
        nursery: trio.Nursery,
        listener: Listener | None = None,
    ) -> None:
        self.broker = broker
        self.stream = stream
        self.conn = broker.new_connection(peer, listener)
        self.conn.on_output = self._start_writer
        self.conn.on_close = self._close_requested
        self._nursery = nursery
        self._scope = trio.CancelScope()
        self._writing = False

    def _start_writer(self) -> None:
        if not self._writing:
            self._writing = True
            self._nursery.start_soon(self._writer)

    def _close_requested(self) -> None:
        if self.conn.flush_before_close and (self._writing or self.conn.outbox):
            # the writer sends what is queued and then ends the connection; bound the wait
            self._start_writer()
            self._scope.deadline = trio.current_time() + CLOSE_FLUSH_TIMEOUT_S
        else:
            self._scope.cancel()

    async def run(self) -> None:
        conn = self.conn
        try:
            self._scope.deadline = (
                trio.current_time() + self.broker.config.limits.connect_timeout_s
            )
            with self._scope:
                await self._reader()
                if not conn.closing:
                    conn.close()
                elif conn.flush_before_close:
                    await trio.sleep_forever()  # until the writer has flushed (or the deadline)
            if self._scope.cancelled_caught and not conn.closing:
                if conn.session is None:
                    log.warning("client %s: no CONNECT within the timeout; closing", conn.name)
                else:
                    log.info("client %s: keepalive expired; closing", conn.name)
        finally:
            self.broker.connection_lost(conn)
            await trio.aclose_forcefully(self.stream)  # also ends a writer blocked in send

    def _keepalive_deadline(self) -> float:
        keepalive_s = self.conn.keepalive_s
        return trio.current_time() + 1.5 * keepalive_s if keepalive_s else math.inf

    async def _reader(self) -> None:
        conn = self.conn
        broker = self.broker
        scope = self._scope
        receive_some = self.stream.receive_some
        while not conn.closing:
            if broker.reading_paused(conn):
                # buffers full, store behind, or too many acks waiting for a commit: stop
                # reading (TCP backpressure) until that drains; the pause is ours, so the
                # keepalive clock starts again afterwards
                scope.deadline = math.inf
                await broker.wait_readable(conn)
                if conn.closing:
                    return
                scope.deadline = self._keepalive_deadline()
            try:
                data = await receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("client %s: connection lost: %s", conn.name, exc.__cause__ or exc)
                return
            if not data:
                return
            try:
                broker.handle_data(conn, data)
            except MQTTError as exc:
                broker.protocol_error(conn, exc)
                return
            except Exception:
                # a bug must cost one connection, never the broker
                log.exception("client %s: internal error while handling its packets", conn.name)
                conn.close()
                return
            delay = broker.publish_rate_delay(conn, trio.current_time())
            if delay and not conn.closing:
                # over max_publish_rate_per_s: stop reading until the rate is back under it
                scope.deadline = math.inf
                await trio.sleep(delay)
            if conn.session is not None and not conn.closing:
                scope.deadline = self._keepalive_deadline()

    async def _writer(self) -> None:
        conn = self.conn
        broker = self.broker
        send_all = self.stream.send_all
        try:
            while data := conn.data_to_send():
                conn.send_blocked_since = trio.current_time()
                await send_all(data)
                conn.send_blocked_since = None
                conn.sent(len(data))
                if broker.paused_readers:
                    broker.notify_progress()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not conn.closing:
                log.info("client %s: send failed: %s", conn.name, exc.__cause__ or exc)
            self._scope.cancel()
        finally:
            self._writing = False
        if conn.closing:
            self._scope.cancel()


class TCPServer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.handlers: set[ClientHandler] = set()
        self._accept_scope: trio.CancelScope | None = None
        self._handlers_nursery: trio.Nursery | None = None
        self._stopping = False
        self._all_closed = trio.Event()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[trio.SocketListener] = []
        configs: list[Listener] = []
        try:
            for cfg in self.broker.config.listeners:
                opened = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
                listeners += opened
                configs += [cfg] * len(opened)
        except OSError:
            for listener in listeners:
                await listener.aclose()
            raise
        addresses = [tuple(ls.socket.getsockname()[:2]) for ls in listeners]
        async with trio.open_nursery() as handlers:
            self._handlers_nursery = handlers
            async with trio.open_nursery() as accepting:
                self._accept_scope = accepting.cancel_scope
                for listener, cfg in zip(listeners, configs, strict=True):
                    accepting.start_soon(self._accept_loop, listener, cfg, handlers)
                task_status.started(addresses)
            # listeners are closed; handlers run until shutdown() closes them

    async def _accept_loop(
        self, listener: trio.SocketListener, cfg: Listener, handlers: trio.Nursery
    ) -> None:
        max_connections = self.broker.config.limits.max_connections
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        log.error("accept failed (%s); retrying in 100 ms", exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                if 0 <= max_connections <= len(self.handlers):
                    log.warning("connection limit (%d) reached; refusing a client", max_connections)
                    await trio.aclose_forcefully(stream)
                    continue
                handlers.start_soon(self._handle, stream, cfg)

    async def _handle(self, stream: trio.SocketStream, cfg: Listener) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        handler = ClientHandler(self.broker, stream, peer, self._handlers_nursery, cfg)  # type: ignore[arg-type]
        self.handlers.add(handler)
        try:
            await handler.run()
        finally:
            self.handlers.discard(handler)
            if self._stopping and not self.handlers:
                self._all_closed.set()

    async def shutdown(self, timeout_s: float) -> None:
        """Ordered stop: close the listeners, close every connection after flushing
        what is queued for it, and cancel what is still running after ``timeout_s``."""
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self._stopping = True
        self.broker.close_all_connections(ServerShuttingDown("server shutting down"))
        if self.handlers:
            with trio.move_on_after(timeout_s):
                await self._all_closed.wait()
        if self._handlers_nursery is not None:
            self._handlers_nursery.cancel_scope.cancel()
