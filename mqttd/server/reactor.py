"""The plain TCP client connections of the listeners, served by one task: a reactor over
an epoll set of its own (Linux), instead of one trio task per connection.

Why: a trio task per connection costs, for an idle client, its coroutine frames, a cancel
scope for the keepalive deadline and trio's registration of its socket at every wait
(about 4 KB and an ``epoll_ctl`` per read); spawning it was the largest part of accepting a
connection. Here a connection is its socket, one small :class:`Client` record and the
engine's :class:`~mqttd.connection.Connection`. The reactor's task waits for its epoll
descriptor to be readable (through trio, so everything else keeps running), then takes up
to :data:`MAX_EVENTS` ready connections in one turn:

- **reading** (level-triggered ``EPOLLIN``): one ``recv`` of up to 64 KiB per connection
  per turn (so one busy client cannot starve the others), handed to the engine, which
  decodes and handles every complete packet synchronously, as the stream task does;
- **writing**: output queued while a turn runs is sent once per connection at the end of
  the turn (coalesced, as a writer task would); output queued by other tasks (the store
  writer's commits, timers, the cluster) is sent by the reactor's flusher task at its next
  step. What the socket does not take waits for ``EPOLLOUT``; meanwhile
  ``send_blocked_since`` tells the engine the client is not reading;
- **flow control**: a connection the engine pauses (``Engine.reading_paused``) leaves the
  epoll set until progress is reported (``ReadPauses.notify``) or, held by a stalled
  subscriber, until its stall deadline; a publish-rate wait likewise until its timer;
- **deadlines** (CONNECT timeout, 1.5 x keepalive, the bounded flush before a close): one
  heap for all connections, served by the reactor's timer task; a read only moves the
  connection's deadline (the heap entry is checked, and moved, when it comes due).

TLS and WebSocket connections, and the bridges' links, keep their stream task
(:mod:`mqttd.server.stream_task`); the engine cannot tell the two apart.
"""

from __future__ import annotations

import _socket
import heapq
import logging
import math
import select
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import ParkingLot, wait_readable

from mqttd.codec import MQTTError
from mqttd.codec.errors import KeepAliveTimeout
from mqttd.server.stream_task import CLOSE_FLUSH_TIMEOUT_S, RECEIVE_SIZE

if TYPE_CHECKING:
    from mqttd.config import Listener
    from mqttd.connection import Connection
    from mqttd.engine.dispatch import Engine
    from mqttd.server.pauses import ReadPauses

log = logging.getLogger(__name__)

HAVE_EPOLL = hasattr(select, "epoll")
MAX_EVENTS = 256  # ready connections served per turn (then other tasks run)
EPOLLIN = getattr(select, "EPOLLIN", 1)
EPOLLOUT = getattr(select, "EPOLLOUT", 4)
EPOLL_ERRORS = getattr(select, "EPOLLHUP", 16) | getattr(select, "EPOLLERR", 8)
EPOLLIN_OR_ERROR = EPOLLIN | EPOLL_ERRORS
EPOLLOUT_OR_ERROR = EPOLLOUT | EPOLL_ERRORS

# what a connection is doing
READING = 0  # in the epoll set for reading; its timer is its read deadline
PAUSED = 1  # the engine's flow control stopped reading; timer: its stall check
WAITING = 2  # over max_publish_rate_per_s (timer: when reading resumes), or being resumed
CLOSING = 3  # flushing its output before it ends; timer: the end of that wait
ENDED = 4


class Client:
    """One plain TCP connection in the reactor."""

    __slots__ = (
        "conn", "connect_by", "fd", "queued", "reactor", "registered", "sock", "state", "tag",
        "timer_at", "timer_entry_at", "timer_gen", "unsent", "unsent_from",
    )

    def __init__(
        self, reactor: Reactor, sock: _socket.socket, conn: Connection, tag: object,
        connect_by: float,
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self.connect_by = connect_by  # when its CONNECT must have come by
        self.fd = sock.fileno()
        self.conn = conn
        self.tag = tag  # given to the reactor's ``ended`` callback (the listener)
        self.state = READING
        self.registered = 0  # the epoll events it is registered for (0: not in the set)
        self.queued = False  # in the reactor's list of connections with output to send
        # output taken from the connection that the socket has not all taken yet
        self.unsent: bytes | None = None
        self.unsent_from = 0
        # its timer: when it is due (inf: none); the heap holds one live entry per client,
        # at timer_entry_at, tagged timer_gen (older entries are skipped)
        self.timer_at = math.inf
        self.timer_entry_at = math.inf
        self.timer_gen = 0

    # (the connection's callbacks: bound methods of the client, not closures, for fewer
    # objects per connection for the garbage collector to track)

    def output_ready(self) -> None:
        """(Connection.on_output) the outbox went from empty to non-empty."""
        self.reactor._output(self)

    def close_requested(self) -> None:
        """(Connection.on_close) the engine ends the connection."""
        self.reactor._close_requested(self)


class Reactor:
    """Every plain TCP client connection of the listeners (see the module's docstring).
    :meth:`run` serves them until cancelled, then ends the ones left."""

    def __init__(
        self, engine: Engine, pauses: ReadPauses, ended: Callable[[object], None]
    ) -> None:
        self.engine = engine
        self.pauses = pauses
        self._ended = ended  # told each ended connection's tag
        self.clients: dict[int, Client] = {}  # by fd
        self._epoll = select.epoll()
        self._pending: list[Client] = []  # output to send at the end of the turn
        self._closing: list[Client] = []  # conn.close() was called: end or flush first
        self._paused: set[Client] = set()
        self._recheck = False  # progress was reported: look at the paused connections
        self._active = False  # a turn runs: what it queues is handled at its end
        self._flusher = ParkingLot()
        self._flusher_due = False
        self._heap: list[tuple[float, int, int, Client]] = []
        self._heap_seq = 0
        self._timer_scope: trio.CancelScope | None = None
        # that scope's deadline, read here (CancelScope.deadline is a Python property)
        self._timer_deadline = math.inf
        pauses.add_listener(self._progress)

    # -- the listeners' side --------------------------------------------------------------

    def add(
        self, sock: _socket.socket, peer: str, listener: Listener | None, tag: object,
        connect_deadline: float,
    ) -> None:
        """Serve the accepted ``sock`` (its CONNECT due by ``connect_deadline``); ``tag``
        is given to ``ended`` when it ends."""
        # (TCP_NODELAY and TCP_NOTSENT_LOWAT come from the listening socket: tcp.py)
        sock.setblocking(False)
        conn = self.engine.new_connection(peer, listener)
        client = Client(self, sock, conn, tag, connect_deadline)
        conn.on_output = client.output_ready
        conn.on_close = client.close_requested
        self.clients[client.fd] = client
        self._register(client, EPOLLIN)
        self._set_timer(client, connect_deadline)

    # -- the tasks --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled (with the flusher and the timers, in ``nursery`` tasks the
        caller starts: :meth:`flusher`, :meth:`timers`); the connections left are ended."""
        epoll = self._epoll
        try:
            while True:
                await wait_readable(epoll)
                self._turn(epoll.poll(0, MAX_EVENTS))
        finally:
            self._end_all()

    async def flusher(self) -> None:
        """Send output queued by other tasks, and look at paused connections after
        progress, in a step of its own."""
        while True:
            await self._flusher.park()
            self._flusher_due = False
            self._active = True
            self._after_turn()

    async def timers(self) -> None:
        """Serve the connections' timers as they come due."""
        heap = self._heap
        while True:
            deadline = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=deadline) as scope:
                self._timer_scope = scope
                self._timer_deadline = deadline
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            self._active = True
            try:
                while heap and heap[0][0] <= now:
                    _at, _seq, gen, client = heapq.heappop(heap)
                    if gen != client.timer_gen or client.state == ENDED:
                        continue  # superseded
                    client.timer_entry_at = math.inf
                    if client.timer_at > now:  # moved later (by reads): wait again
                        self._push_timer(client, client.timer_at)
                        continue
                    client.timer_at = math.inf
                    try:
                        self._timer_due(client, now)
                    except Exception:
                        self._failed(client)
            finally:
                self._after_turn()

    # -- a turn -----------------------------------------------------------------------------

    def _turn(self, events: list[tuple[int, int]]) -> None:
        clients = self.clients
        self._active = True
        try:
            for fd, flags in events:
                client = clients.get(fd)
                if client is None:
                    continue
                try:
                    if flags & EPOLLOUT_OR_ERROR and client.unsent is not None:
                        self._send_rest(client)
                    if flags & EPOLLIN_OR_ERROR and client.state == READING:
                        self._read(client)
                except Exception:
                    self._failed(client)
        finally:
            self._after_turn()

    def _after_turn(self) -> None:
        """Send what the turn queued, end or flush what it closed, resume what progress
        released; until nothing more is queued. Ends the turn."""
        pending = self._pending
        closing = self._closing
        try:
            while pending or closing or self._recheck:
                index = 0
                while index < len(pending):
                    client = pending[index]
                    index += 1
                    client.queued = False
                    try:
                        self._send(client)
                    except Exception:
                        self._failed(client)
                pending.clear()
                if closing:
                    batch = closing[:]
                    closing.clear()
                    for client in batch:
                        try:
                            self._close(client)
                        except Exception:
                            self._failed(client)
                if self._recheck:
                    self._recheck = False
                    self._resume_released()
        finally:
            self._active = False
            if pending or closing or self._recheck:  # only after an unexpected error
                self._wake()

    def _wake(self) -> None:
        if not self._active and not self._flusher_due:
            self._flusher_due = True
            self._flusher.unpark()

    # -- reading ----------------------------------------------------------------------------

    def _read(self, client: Client) -> None:
        conn = client.conn
        try:
            data = client.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            conn.end_reason = conn.end_reason or f"connection lost: {exc}"
            self._end(client)
            return
        if not data:
            if not conn.end_reason:
                conn.end_reason = "connection closed by the client without DISCONNECT"
            self._end(client)
            return
        self._handle(client, data)

    def _handle(self, client: Client, data: bytes) -> None:
        """Hand ``data`` (b"": the packets held back while it waited) to the engine, and
        the packets it holds back while it may go on; then decide whether to read on."""
        conn = client.conn
        engine = self.engine
        while True:
            try:
                if data:
                    engine.handle_data(conn, data)
                else:
                    engine.resume(conn)
            except MQTTError as exc:
                engine.protocol_error(conn, exc)
                if not conn.closing:
                    conn.close()
                return
            except Exception:
                # a bug must cost one connection, never the broker
                log.exception("client %s: internal error while handling its packets", conn.name)
                conn.close()
                return
            if conn.closing:
                return
            if engine.publish_rate:
                now = trio.current_time()
                delay = engine.publish_rate_delay(conn, now)
                if delay:
                    # over max_publish_rate_per_s: stop reading until the rate is under it
                    client.state = WAITING
                    self._update(client)
                    self._set_timer(client, now + delay)
                    return
            if conn.held_packets is None or engine.reading_paused(conn):
                break
            data = b""  # held back by the publish rate, which allows more now
        self._go_on(client)

    def _go_on(self, client: Client) -> None:
        """Read on (its deadline moved), or pause for the engine's flow control."""
        conn = client.conn
        if self.engine.reading_paused(conn):
            self._pause(client)
            return
        if client.state != READING:  # (resumed)
            client.state = READING
            self._update(client)
            if conn.session is None:  # not connected yet: the CONNECT deadline holds
                self._set_timer(client, client.connect_by)
                return
        elif conn.session is None:
            return
        keepalive_s = conn.keepalive_s
        if keepalive_s:
            at = trio.current_time() + 1.5 * keepalive_s
            client.timer_at = at
            if at < client.timer_entry_at:
                self._push_timer(client, at)
        else:
            client.timer_at = math.inf

    # -- flow control -----------------------------------------------------------------------

    def _pause(self, client: Client) -> None:
        engine = self.engine
        if client.state != PAUSED:
            client.state = PAUSED
            engine.read_pauses += 1
            engine.paused_readers += 1
            self._paused.add(client)
            self._update(client)
        self._set_timer(client, trio.current_time() + self.pauses.stall_wait_s(client.conn))

    def _unpause(self, client: Client) -> None:
        if client.state == PAUSED:
            self._paused.discard(client)
            self.engine.paused_readers -= 1

    def _progress(self) -> None:
        """(ReadPauses) output was sent or a commit finished."""
        if self._paused:
            self._recheck = True
            self._wake()

    def _resume_released(self) -> None:
        engine = self.engine
        for client in list(self._paused):
            conn = client.conn
            if client.state != PAUSED or conn.closing or engine.reading_paused(conn):
                continue
            self._unpause(client)
            client.state = WAITING  # (neither reading nor paused, for _go_on)
            try:
                if conn.held_packets is not None:  # released: first what it sent before
                    self._handle(client, b"")
                else:
                    self._go_on(client)
            except Exception:
                self._failed(client)

    # -- timers -----------------------------------------------------------------------------

    def _set_timer(self, client: Client, at: float) -> None:
        client.timer_at = at
        if at < client.timer_entry_at:
            self._push_timer(client, at)

    def _push_timer(self, client: Client, at: float) -> None:
        if at == math.inf:
            return
        client.timer_gen += 1
        client.timer_entry_at = at
        self._heap_seq += 1
        heapq.heappush(self._heap, (at, self._heap_seq, client.timer_gen, client))
        scope = self._timer_scope
        if scope is not None and at < self._timer_deadline:
            scope.deadline = self._timer_deadline = at

    def _timer_due(self, client: Client, now: float) -> None:
        state = client.state
        conn = client.conn
        if state == READING:
            if conn.closing:
                return
            engine = self.engine
            if conn.session is None:
                log.warning("client %s: no CONNECT within the timeout; closing", conn.name)
                engine.limit_exceeded("connect_timeout")
                self._end(client)
                return
            conn.end_reason = f"keepalive expired (no packet for 1.5 x {conn.keepalive_s}s)"
            if client.unsent is not None:
                self._end(client)  # it is not reading what we send either
                return
            # 5.0: say why (DISCONNECT 0x8D), flushed within CLOSE_FLUSH_TIMEOUT_S
            conn.close(KeepAliveTimeout("keep alive timeout"))
        elif state == PAUSED:
            self.pauses.stall_check(conn)
            if client.state == PAUSED and not conn.closing:
                if self.engine.reading_paused(conn):
                    self._set_timer(client, now + self.pauses.stall_wait_s(conn))
                else:
                    self._recheck = True
        elif state == WAITING:
            if conn.held_packets is not None:
                self._handle(client, b"")
            else:
                self._go_on(client)
        elif state == CLOSING:
            self._end(client)

    # -- writing ----------------------------------------------------------------------------

    def _output(self, client: Client) -> None:
        """(Connection.on_output) the outbox went from empty to non-empty."""
        if not client.queued and client.state != ENDED:
            client.queued = True
            self._pending.append(client)
            if not self._active:
                self._wake()

    def _send(self, client: Client) -> None:
        """Send the connection's output (what the socket does not take waits for EPOLLOUT)."""
        if client.unsent is not None or client.state == ENDED:
            return  # (the rest follows what is unsent, from _send_rest)
        conn = client.conn
        data = conn.data_to_send()
        if data:
            try:
                sent = client.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._send_failed(client, exc)
                return
            if sent < len(data):
                client.unsent = data
                client.unsent_from = sent
                conn.send_blocked_since = trio.current_time()
                self._update(client)
                return
            self.engine.output_sent(conn, sent)
        if client.state == CLOSING and not conn.outbox:
            self._end(client)

    def _send_rest(self, client: Client) -> None:
        data = client.unsent
        assert data is not None
        try:
            sent = client.sock.send(memoryview(data)[client.unsent_from :])
        except BlockingIOError:
            return
        except OSError as exc:
            self._send_failed(client, exc)
            return
        client.unsent_from += sent
        if client.unsent_from < len(data):
            return
        client.unsent = None
        conn = client.conn
        conn.send_blocked_since = None
        self.engine.output_sent(conn, len(data))
        self._send(client)
        if client.unsent is None and client.state != ENDED:
            self._update(client)

    def _send_failed(self, client: Client, exc: OSError) -> None:
        conn = client.conn
        if not conn.closing:
            conn.end_reason = f"send failed: {exc}"
        self._end(client)

    # -- closing ----------------------------------------------------------------------------

    def _close_requested(self, client: Client) -> None:
        """(Connection.on_close) the engine ends the connection: after the turn."""
        if client.state != ENDED:
            self._closing.append(client)
            if not self._active:
                self._wake()

    def _close(self, client: Client) -> None:
        if client.state in (ENDED, CLOSING):
            return
        conn = client.conn
        if conn.flush_before_close and (client.unsent is not None or conn.outbox):
            # send what is queued, then end; bounded
            self._unpause(client)
            client.state = CLOSING
            self._update(client)
            self._set_timer(client, trio.current_time() + CLOSE_FLUSH_TIMEOUT_S)
            if client.unsent is None:
                self._send(client)
        else:
            self._end(client)

    def _end(self, client: Client) -> None:
        if client.state == ENDED:
            return
        self._unpause(client)
        client.state = ENDED
        if client.registered:
            try:
                self._epoll.unregister(client.fd)
            except OSError:
                pass
            client.registered = 0
        del self.clients[client.fd]
        conn = client.conn
        conn.send_blocked_since = None
        try:
            self.engine.connection_lost(conn)
        finally:
            client.sock.close()
            self._ended(client.tag)

    def _failed(self, client: Client) -> None:
        """An unexpected error while serving ``client``: a bug must cost one connection,
        never the broker."""
        log.exception("client %s: internal error; closing", client.conn.name)
        self._abandon(client)

    def _abandon(self, client: Client) -> None:
        try:
            self._end(client)
        except Exception:
            log.exception("client %s: error while ending it", client.conn.name)

    def _end_all(self) -> None:
        for client in list(self.clients.values()):
            self._abandon(client)
        self._epoll.close()

    # -- the epoll set ----------------------------------------------------------------------

    def _update(self, client: Client) -> None:
        wanted = (EPOLLIN if client.state == READING else 0) | (
            EPOLLOUT if client.unsent is not None else 0
        )
        if wanted != client.registered:
            self._register(client, wanted)

    def _register(self, client: Client, events: int) -> None:
        """Put the client in the epoll set for ``events`` (0: take it out, so that a
        hang-up it is not reading cannot wake the reactor over and over)."""
        epoll = self._epoll
        if not events:
            epoll.unregister(client.fd)
        elif client.registered:
            epoll.modify(client.fd, events)
        else:
            epoll.register(client.fd, events)
        client.registered = events
