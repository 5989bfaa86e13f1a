"""The reader and writer around one :class:`~mqttd.connection.Connection` and the trio
``Stream`` it runs on (TCP, TLS, WebSocket): the client connections of the listeners
(:class:`ClientHandler`) and the bridges' links to their remote brokers
(``mqttd.bridge.link``) alike.

The **reader** runs in the task that serves the stream: it receives up to 64 KiB at a time
under a deadline (pushed forward by every read) and hands the bytes to the engine, which
decodes and handles every complete packet synchronously; while the engine's flow control
pauses it, it waits on :class:`~mqttd.server.pauses.ReadPauses`. The **writer** is the only
task that sends: started when the outbox goes from empty to non-empty, it joins everything
pending into one ``send_all`` per batch and ends when nothing is left (idle connections hold
no writer task). Deadlines live on the connection's cancel scope, so an idle connection
holds no per-read timer either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from mqttd.codec import MQTTError
from mqttd.codec.errors import KeepAliveTimeout

if TYPE_CHECKING:
    from mqttd.config import Listener
    from mqttd.connection import Connection
    from mqttd.engine.dispatch import Engine
    from mqttd.server.pauses import ReadPauses

log = logging.getLogger(__name__)

RECEIVE_SIZE = 65536
CLOSE_FLUSH_TIMEOUT_S = 5.0

StreamError = (trio.BrokenResourceError, trio.ClosedResourceError)


class StreamTask:
    """Serve one Connection on one stream until it ends (:meth:`serve`). What ended it is
    recorded for the caller: ``failure`` (a failed receive or send, or the MQTTError of a
    bad packet), ``peer_closed`` (end of stream); else ``conn.closing`` (the engine closed
    it) or the read deadline. ``handle_data``: what to do with received bytes (default: the
    engine's ``handle_data``; a bridge's link decodes the remote broker's packets itself).
    ``idle_timeout_s``: how long a read may wait (default: 1.5 x the client's keepalive,
    none without one). The writer runs in ``nursery``."""

    __slots__ = (
        "_nursery", "_scope", "_writing", "conn", "engine", "failure",
        "handle_data", "idle_timeout_s", "pauses", "peer_closed", "stream",
    )

    def __init__(
        self,
        engine: Engine,
        pauses: ReadPauses,
        stream: trio.abc.Stream,
        conn: Connection,
        nursery: trio.Nursery,
        *,
        handle_data: Callable[[Connection, bytes], None] | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.pauses = pauses
        self.stream = stream
        self.conn = conn
        self.handle_data = handle_data if handle_data is not None else engine.handle_data
        self.idle_timeout_s = idle_timeout_s
        self.failure: BaseException | None = None
        self.peer_closed = False
        conn.on_output = self._start_writer
        conn.on_close = self._close_requested
        self._nursery = nursery
        self._scope = trio.CancelScope()
        self._writing = False  # a writer task runs

    # -- what ended the stream (the listeners' ClientHandler logs and answers) ----------

    def receive_failed(self, exc: BaseException) -> None:
        self.failure = self.failure or exc

    def send_failed(self, exc: BaseException) -> None:
        self.failure = self.failure or exc

    def protocol_error(self, exc: MQTTError) -> None:
        self.failure = self.failure or exc

    # -- serving -----------------------------------------------------------------------

    async def serve(self, deadline: float) -> bool:
        """Read (and write, in the writer task) until the stream ends; ``deadline``: when
        the first read must have returned by. A connection still open when the reader
        ends is closed; one closed with a flush waits for the writer (bounded). Returns
        True when a read deadline passed (or a send failed) with the connection open."""
        conn = self.conn
        self._scope.deadline = deadline
        with self._scope:
            await self._reader()
            if not conn.closing:
                conn.close()
            elif conn.flush_before_close:
                await trio.sleep_forever()  # until the writer has flushed (or the deadline)
        return self._scope.cancelled_caught and not conn.closing

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

    def _read_deadline(self) -> float:
        timeout_s = self.idle_timeout_s
        if timeout_s is None:
            timeout_s = 1.5 * self.conn.keepalive_s
        return trio.current_time() + timeout_s if timeout_s else math.inf

    async def _reader(self) -> None:
        conn = self.conn
        engine = self.engine
        scope = self._scope
        handle_data = self.handle_data
        # every stream here gives bytes (trio's SSLStream is typed bytes | bytearray)
        receive_some: Callable[[int], Awaitable[bytes]] = self.stream.receive_some  # type: ignore[assignment]
        while not conn.closing:
            if engine.reading_paused(conn):
                # buffers full, store behind, or too many acks waiting for a commit: stop
                # reading (TCP backpressure) until that drains; the pause is ours, so the
                # keepalive clock starts again afterwards
                scope.deadline = math.inf
                await self.pauses.wait_readable(conn)
                if conn.closing:
                    return
                scope.deadline = self._read_deadline()
            if conn.held_packets is not None:  # released: first what it sent before
                data = b""
            else:
                try:
                    data = await receive_some(RECEIVE_SIZE)
                except StreamError as exc:
                    self.receive_failed(exc)
                    return
                if not data:
                    self.peer_closed = True
                    return
            try:
                if data:
                    handle_data(conn, data)
                else:
                    engine.resume(conn)
            except MQTTError as exc:
                self.protocol_error(exc)
                return
            except Exception:
                # a bug must cost one connection, never the broker
                log.exception("client %s: internal error while handling its packets", conn.name)
                conn.close()
                return
            if engine.publish_rate:
                delay = engine.publish_rate_delay(conn, trio.current_time())
                if delay and not conn.closing:
                    # over max_publish_rate_per_s: stop reading until the rate is under it
                    scope.deadline = math.inf
                    await trio.sleep(delay)
            if conn.session is not None and not conn.closing:
                deadline = self._read_deadline()
                if deadline != scope.deadline:  # (no keepalive: inf, and inf already)
                    scope.deadline = deadline

    async def _writer(self) -> None:
        """Send the outbox until it is empty."""
        conn = self.conn
        engine = self.engine
        send_all = self.stream.send_all
        try:
            data = conn.data_to_send()
            while data:
                conn.send_blocked_since = trio.current_time()
                await send_all(data)
                conn.send_blocked_since = None
                engine.output_sent(conn, len(data))
                data = conn.data_to_send()
        except StreamError as exc:
            self.send_failed(exc)
            self._scope.cancel()
        finally:
            self._writing = False
        if conn.closing:
            self._scope.cancel()


class ClientHandler(StreamTask):
    """One client connection of a listener: the CONNECT timeout, then 1.5 x keepalive;
    a protocol error answered as the protocol version allows; the engine told when the
    connection is over."""

    __slots__ = ()

    def __init__(
        self,
        engine: Engine,
        pauses: ReadPauses,
        stream: trio.abc.Stream,
        peer: str,
        nursery: trio.Nursery,
        listener: Listener | None = None,
        tls_identity: str | None = None,
    ) -> None:
        conn = engine.new_connection(peer, listener, tls_identity)
        super().__init__(engine, pauses, stream, conn, nursery)

    # what ended the connection goes in its disconnect line (Engine.connection_lost)

    def receive_failed(self, exc: BaseException) -> None:
        self.conn.end_reason = self.conn.end_reason or f"connection lost: {exc.__cause__ or exc}"

    def send_failed(self, exc: BaseException) -> None:
        if not self.conn.closing:
            self.conn.end_reason = f"send failed: {exc.__cause__ or exc}"

    def protocol_error(self, exc: MQTTError) -> None:
        self.engine.protocol_error(self.conn, exc)

    async def run(self, connect_deadline: float | None = None) -> None:
        """Serve the connection until it ends. ``connect_deadline``: when the CONNECT must
        have arrived by (default: the CONNECT timeout from now)."""
        conn = self.conn
        try:
            if connect_deadline is None:
                connect_deadline = (
                    trio.current_time() + self.engine.config.limits.connect_timeout_s
                )
            if not await self.serve(connect_deadline):
                if self.peer_closed and not conn.end_reason:
                    conn.end_reason = "connection closed by the client without DISCONNECT"
                return
            if conn.session is None:
                log.warning("client %s: no CONNECT within the timeout; closing", conn.name)
                self.engine.limit_exceeded("connect_timeout")
            elif not conn.end_reason:  # (else a send failed)
                conn.end_reason = f"keepalive expired (no packet for 1.5 x {conn.keepalive_s}s)"
                if not self._writing:  # 5.0: say why (DISCONNECT 0x8D), briefly
                    await self._say_why(KeepAliveTimeout("keep alive timeout"))
        finally:
            self.engine.connection_lost(conn)
            await trio.aclose_forcefully(self.stream)  # also ends a writer blocked in send

    async def _say_why(self, reason: MQTTError) -> None:
        conn = self.conn
        conn.on_output = _no_writer
        conn.close(reason)
        data = conn.data_to_send()
        with trio.move_on_after(CLOSE_FLUSH_TIMEOUT_S if data else 0):
            try:
                await self.stream.send_all(data)
            except StreamError:
                pass


def _no_writer() -> None:
    """The connection is over: output is sent by the caller, not by a writer task."""
