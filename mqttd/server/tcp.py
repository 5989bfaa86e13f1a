"""TCP listeners and the per-connection reader/writer tasks.

Each accepted socket gets one handler in the handlers nursery; the handler runs a
nursery with exactly two tasks. The **reader** receives up to 64 KiB at a time under
a deadline (the CONNECT timeout, then 1.5 x keepalive, pushed forward by every read)
and hands the bytes to the broker, which decodes and handles every complete packet
synchronously. The **writer** is the only task that sends: woken when the outbox goes
from empty to non-empty, it joins everything pending into one ``send_all``.
"""

from __future__ import annotations

import errno
import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from mqttd.codec import MQTTError
from mqttd.codec.errors import ServerShuttingDown

if TYPE_CHECKING:
    from mqttd.broker import Broker

log = logging.getLogger(__name__)

RECEIVE_SIZE = 65536
CLOSE_FLUSH_TIMEOUT_S = 5.0
# accept() errors that mean "out of resources, try again shortly" (as trio's serve_listeners)
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class ClientHandler:
    def __init__(self, broker: Broker, stream: trio.SocketStream, peer: str) -> None:
        self.broker = broker
        self.stream = stream
        self.conn = broker.new_connection(peer)
        self.conn.on_output = self._wake_writer
        self.conn.on_close = self._close_requested
        self._output = trio.Event()
        self._scope = trio.CancelScope()
        self.done = trio.Event()

    def _wake_writer(self) -> None:
        self._output.set()

    def _close_requested(self) -> None:
        if self.conn.flush_before_close:
            # the writer sends what is queued and then ends the connection; bound the wait
            self._output.set()
            self._scope.deadline = min(
                self._scope.deadline, trio.current_time() + CLOSE_FLUSH_TIMEOUT_S
            )
        else:
            self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader()
                    if not self.conn.closing:
                        self.conn.close()
        finally:
            self.broker.connection_lost(self.conn)
            await trio.aclose_forcefully(self.stream)
            self.done.set()

    async def _reader(self) -> None:
        conn = self.conn
        broker = self.broker
        receive_some = self.stream.receive_some
        connect_deadline = trio.current_time() + broker.config.limits.connect_timeout_s
        deadline = connect_deadline
        while not conn.closing:
            if broker.reading_paused(conn):
                # buffers full, store behind, or too many acks waiting for a commit: stop
                # reading (TCP backpressure) until that drains; the pause is ours, so the
                # keepalive clock starts again afterwards
                await broker.wait_readable(conn)
                if conn.session is not None and conn.keepalive_s:
                    deadline = trio.current_time() + 1.5 * conn.keepalive_s
            with trio.move_on_at(deadline) as timeout:
                try:
                    data = await receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.info("client %s: connection lost: %s", conn.name, exc.__cause__ or exc)
                    return
            if timeout.cancelled_caught:
                if conn.session is None:
                    log.warning("client %s: no CONNECT within the timeout; closing", conn.name)
                else:
                    log.info("client %s: keepalive expired; closing", conn.name)
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
            if conn.session is None:
                deadline = connect_deadline
            elif conn.keepalive_s:
                deadline = trio.current_time() + 1.5 * conn.keepalive_s
            else:
                deadline = math.inf

    async def _writer(self) -> None:
        conn = self.conn
        send_all = self.stream.send_all
        try:
            while True:
                await self._output.wait()
                self._output = trio.Event()
                data = conn.data_to_send()
                if data:
                    conn.send_blocked_since = trio.current_time()
                    await send_all(data)
                    conn.send_blocked_since = None
                    conn.sent(len(data))
                    if self.broker.paused_readers:
                        self.broker.notify_progress()
                if conn.closing and not conn.outbox:
                    self._scope.cancel()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("client %s: send failed: %s", conn.name, exc.__cause__ or exc)
            self._scope.cancel()


class TCPServer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.handlers: set[ClientHandler] = set()
        self._accept_scope: trio.CancelScope | None = None
        self._handlers_nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[trio.SocketListener] = []
        try:
            for cfg in self.broker.config.listeners:
                listeners += await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        except OSError:
            for listener in listeners:
                await listener.aclose()
            raise
        addresses = [tuple(ls.socket.getsockname()[:2]) for ls in listeners]
        async with trio.open_nursery() as handlers:
            self._handlers_nursery = handlers
            async with trio.open_nursery() as accepting:
                self._accept_scope = accepting.cancel_scope
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener, handlers)
                task_status.started(addresses)
            # listeners are closed; handlers run until shutdown() closes them

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
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
                handlers.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        handler = ClientHandler(self.broker, stream, peer)
        self.handlers.add(handler)
        try:
            await handler.run()
        finally:
            self.handlers.discard(handler)

    async def shutdown(self, timeout_s: float) -> None:
        """Ordered stop: close the listeners, close every connection after flushing
        what is queued for it, and cancel what is still running after ``timeout_s``."""
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self.broker.close_all_connections(ServerShuttingDown("server shutting down"))
        with trio.move_on_after(timeout_s):
            for handler in list(self.handlers):
                await handler.done.wait()
        if self._handlers_nursery is not None:
            self._handlers_nursery.cancel_scope.cancel()
