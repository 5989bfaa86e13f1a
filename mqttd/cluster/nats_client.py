"""A trio NATS client: one connection to one of a list of servers, kept up.

    async with NatsClient.connect(["nats://127.0.0.1:4222"], name="n1") as nc:
        sub = await nc.subscribe("mqttd.t.>")
        await nc.publish("mqttd.t.a", b"hello")
        async for msg in sub: ...
        reply = await nc.request("svc", b"ping", timeout_s=1)

Tasks. ``run()`` is the service (``await nursery.start(client.run)``): it connects (INFO,
CONNECT, the subscriptions, PING, PONG), then runs three tasks per connection: the reader
(parses and dispatches every complete event of each ``receive_some``, never awaiting in
between), the writer (the only caller of ``send_all``: everything queued since its last
write goes out in one call) and the pinger (a PING every ``ping_interval_s``; after
``max_outstanding_pings`` without a PONG, and nothing received for an interval, the server
is taken for dead: a PONG behind a backlog is late, not lost). When the connection
breaks it reconnects across the server list (the next server first, then rounds with
exponential backoff and jitter) and sends SUB again for every subscription.

Subscriptions are bounded channels, or callbacks run in the reader task; a full channel drops
and counts (see :class:`~mqttd.cluster.nats_values.Subscription`).

Requests. One wildcard subscription ``_INBOX.<random>.*`` carries every reply; a request is
a token in a dict. ``request_nowait`` queues the publish and returns a
:class:`PendingReply` to await later, so many requests can be in flight (pipelined
JetStream publishes). A 503 status (no responders) raises :class:`NoRespondersError`; a
lost connection fails every pending request with :class:`ConnectionLostError` (the caller
retries; JetStream publishes carry a ``Nats-Msg-Id`` for that); the deadline raises
:class:`RequestTimeout`.

Writes. Output is one buffer, bounded by ``max_pending_bytes``: ``publish`` waits for room,
``publish_nowait`` raises ``trio.WouldBlock``. While disconnected, publishes are buffered
(within the same bound) and sent after the next handshake; what was queued when a connection
broke is discarded and counted (``ClientStats.discarded_bytes``): core NATS is at most once.
"""

from __future__ import annotations

import collections
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from mqttd.cluster import nats_protocol as proto
from mqttd.cluster.nats_protocol import (
    Err,
    HeadersIn,
    Info,
    Msg,
    NatsParser,
    Ping,
    Pong,
    ProtocolError,
)
from mqttd.cluster.nats_values import (
    ClientClosedError,
    ClientOptions,
    ClientStats,
    ConnectionLostError,
    MaxPayloadError,
    NatsError,
    NoServersError,
    PendingReply,
    RequestTimeout,
    ServerAddress,
    ServerError,
    Subscription,
)

log = logging.getLogger("mqttd.cluster.nats")

READ_SIZE = 65536
# replies may exceed the server's max_payload: direct get adds headers, STREAM.MSG.GET
# answers with the message base64-encoded in JSON
INCOMING_SLACK_BYTES = 65536
CLIENT_VERSION = "0.1"


class _Lost(Exception):
    """Internal: the current connection is unusable (the reason is the message)."""


@attrs.define(eq=False)
class NatsClient:
    """See the module docstring. Build with :meth:`connect` or run :meth:`run` yourself."""

    servers: tuple[ServerAddress, ...]
    options: ClientOptions = attrs.field(factory=ClientOptions)
    stats: ClientStats = attrs.field(factory=ClientStats)
    connected_url: str | None = None
    server_info: dict[str, Any] = attrs.field(factory=dict)
    max_payload: int = proto.DEFAULT_MAX_PAYLOAD
    _subs: dict[int, Subscription] = attrs.field(factory=dict)
    _next_sid: int = 2  # 1 is the reply inbox
    _inbox: str = attrs.field(factory=lambda: f"_INBOX.{secrets.token_urlsafe(16)}")
    _requests: dict[str, PendingReply] = attrs.field(factory=dict)
    _next_token: int = 0
    _out: bytearray = attrs.field(factory=bytearray)
    _wake_writer: trio.Event = attrs.field(factory=trio.Event)
    _space: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _pongs: collections.deque[PendingReply | None] = attrs.field(factory=collections.deque)
    _fresh: bool = False  # bytes came since the pinger last looked
    caught_up: bool = True  # the last read was short: nothing more was waiting
    # awaited before each read: the user holds reading back while it is behind (the server
    # buffers for the connection, up to its max_pending, meanwhile)
    read_gate: Callable[[], Awaitable[None]] | None = None
    _gated: bool = False
    _state_changed: trio.Event = attrs.field(factory=trio.Event)
    _run_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _server_index: int = 0
    _parser: NatsParser = attrs.field(factory=NatsParser)
    _lost_reason: str | None = None
    closed: bool = False
    last_error: str | None = None  # why the last connection attempt or connection failed

    # -- construction and lifetime ----------------------------------------------------------

    @classmethod
    def create(cls, servers: str | Sequence[str], **options: Any) -> NatsClient:
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls:
            raise ValueError("no NATS server given")
        return cls(tuple(ServerAddress.parse(u) for u in urls), ClientOptions(**options))

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, servers: str | Sequence[str], **options: Any
    ) -> AsyncIterator[NatsClient]:
        """Connect (raising NoServersError or ServerError when no server takes us), keep the
        connection up inside the block, close on the way out."""
        client = cls.create(servers, **options)
        stream = await client._connect_round(initial=True)  # its errors come out unwrapped
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run, stream)
            try:
                yield client
            except BaseException:
                await client.close(flush=False)
                raise
            with trio.CancelScope(shield=True):
                await client.close()

    @property
    def is_connected(self) -> bool:
        return self.connected_url is not None

    @property
    def pending_bytes(self) -> int:
        """Output queued and not yet handed to the socket."""
        return len(self._out)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The client's service: connect, serve, reconnect; returns once closed."""
        await self._run(None, task_status=task_status)

    async def _run(
        self,
        stream: trio.SocketStream | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self._run_scope:
                if stream is None:
                    stream = await self._first_connect()
                task_status.started()
                while True:
                    reason = await self._serve(stream)
                    self._lost(reason)
                    stream = await self._reconnect()
        finally:
            self._shutdown()

    async def close(self, *, flush: bool = True) -> None:
        """Send what is queued (bounded by ``flush_timeout_s``), then disconnect. Receivers
        of subscriptions get end-of-channel after what is already buffered."""
        if self.closed:
            return
        if flush and self.is_connected:
            with trio.move_on_after(self.options.flush_timeout_s):
                try:
                    await self.flush()
                except NatsError:
                    pass
        self._run_scope.cancel()
        self._shutdown()

    async def drain(self) -> None:
        """UNSUB every subscription, wait until the server has seen it (the messages sent
        before still reach the subscriptions), then close."""
        subs = list(self._subs.values())
        if self.is_connected:
            for sub in subs:
                self._write(proto.unsub(sub.sid))
            with trio.move_on_after(self.options.flush_timeout_s):
                try:
                    await self.flush()
                except NatsError:
                    pass
        for sub in subs:
            self._subs.pop(sub.sid, None)
            sub._close()
        await self.close()

    def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.connected_url = None
        self._fail_pending(ClientClosedError("the NATS client is closed"))
        for sub in self._subs.values():
            sub._close()
        self._space.unpark_all()
        self._notify_state()

    def _notify_state(self) -> None:
        event, self._state_changed = self._state_changed, trio.Event()
        event.set()

    async def wait_connected(self, min_connects: int = 1) -> str:
        """Wait until connected after at least ``min_connects`` connections in all; returns
        the server URL."""
        while not (self.is_connected and self.stats.connects >= min_connects):
            if self.closed:
                raise ClientClosedError("the NATS client is closed")
            await self._state_changed.wait()
        assert self.connected_url is not None
        return self.connected_url

    # -- connecting ---------------------------------------------------------------------------

    async def _first_connect(self) -> trio.SocketStream:
        """The first connection: one round through the list (its error raised), or with
        ``wait_for_servers`` as many rounds as it takes, with the reconnect backoff."""
        rounds = 0
        while True:
            try:
                return await self._connect_round(initial=True)
            except (NoServersError, ServerError) as exc:
                self.last_error = str(exc)
                if not self.options.wait_for_servers:
                    raise
                if rounds == 0 or rounds % 30 == 0:
                    log.warning("NATS: %s (trying again)", exc)
            rounds += 1
            backoff = min(
                self.options.reconnect_backoff_max_s,
                self.options.reconnect_backoff_s * 2**rounds,
            )
            await trio.sleep(backoff * random.uniform(0.5, 1.0))

    async def _reconnect(self) -> trio.SocketStream:
        rounds = 0
        while True:
            try:
                # a little jitter first, so nodes that lost the same server spread out
                await trio.sleep(random.uniform(0, self.options.reconnect_backoff_s))
                return await self._connect_round(initial=False)
            except NoServersError as exc:
                self.last_error = str(exc)
                rounds += 1
                limit = self.options.max_reconnect_attempts
                if limit is not None and rounds >= limit:
                    raise
                backoff = min(
                    self.options.reconnect_backoff_max_s,
                    self.options.reconnect_backoff_s * 2**rounds,
                )
                await trio.sleep(backoff * random.uniform(0.5, 1.0))

    async def _connect_round(self, *, initial: bool) -> trio.SocketStream:
        """Try every server once, starting with the one after the last (or the first)."""
        n = len(self.servers)
        start = 0 if initial else self._server_index + 1
        errors: list[str] = []
        for i in range(n):
            index = (start + i) % n
            server = self.servers[index]
            try:
                stream = await self._open(server)
            except (OSError, trio.TooSlowError, ProtocolError, _Lost, ServerError) as exc:
                errors.append(f"{server.url}: {exc or type(exc).__name__}")
                if initial and isinstance(exc, ServerError):
                    raise
                continue
            self._server_index = index
            return stream
        raise NoServersError("no NATS server available: " + "; ".join(errors))

    async def _open(self, server: ServerAddress) -> trio.SocketStream:
        with trio.fail_after(self.options.connect_timeout_s):
            stream = await trio.open_tcp_stream(server.host, server.port)
            try:
                await self._handshake(stream, server)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        self.connected_url = server.url
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
            log.info("NATS reconnected to %s (%d subscriptions restored)", server.url,
                     len(self._subs))
        self._notify_state()
        return stream

    async def _handshake(self, stream: trio.SocketStream, server: ServerAddress) -> None:
        """INFO in; CONNECT, SUB for the inbox and every subscription, PING out; PONG in."""
        self._parser = parser = NatsParser()
        events = await self._read_events(stream, parser)
        first = events.pop(0)
        if not isinstance(first, Info):
            raise ProtocolError(f"expected INFO first, got {first!r}")
        self._on_info(first, initial=True)
        if first.data.get("tls_required"):
            raise ServerError(f"{server.url} requires TLS, which this client does not do")
        sent = dict(self._subs)
        out = [proto.connect(self._connect_options(server)), proto.sub(f"{self._inbox}.*", 1)]
        out += [proto.sub(s.subject, s.sid, s.queue) for s in sent.values()]
        out.append(proto.PING)
        await stream.send_all(b"".join(out))
        while True:
            for i, event in enumerate(events):
                if isinstance(event, Pong):
                    self._dispatch(events[i + 1 :])
                    self._resync_subs(sent)
                    return
                if isinstance(event, Err):
                    raise ServerError(f"{server.url} refused the connection: {event.text}")
                self._dispatch([event])
            events = await self._read_events(stream, parser)

    def _resync_subs(self, sent: dict[int, Subscription]) -> None:
        """Subscriptions made or ended while the handshake was in flight."""
        for sid, sub in self._subs.items():
            if sid not in sent:
                self._write(proto.sub(sub.subject, sid, sub.queue))
        for sid in sent:
            if sid not in self._subs:
                self._write(proto.unsub(sid))

    @staticmethod
    async def _read_events(stream: trio.SocketStream, parser: NatsParser) -> list[proto.Event]:
        while True:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                raise _Lost("the server closed the connection during the handshake")
            events = parser.feed(data)
            if events:
                return events

    def _connect_options(self, server: ServerAddress) -> dict[str, Any]:
        o = self.options
        options: dict[str, Any] = {
            "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
            "protocol": 1, "echo": o.echo, "name": o.name, "lang": "python-trio",
            "version": CLIENT_VERSION,
        }
        user, password, token = (
            o.user or server.user, o.password or server.password, o.token or server.token
        )
        if user is not None:
            options["user"] = user
            options["pass"] = password or ""
        if token is not None:
            options["auth_token"] = token
        return options

    def _on_info(self, info: Info, *, initial: bool = False) -> None:
        self.server_info.update(info.data)
        max_payload = info.data.get("max_payload")
        if isinstance(max_payload, int) and max_payload > 0:
            self.max_payload = max_payload
            self._parser.max_payload = max_payload + max_payload // 2 + INCOMING_SLACK_BYTES
        if initial and not info.data.get("headers", False):
            raise ServerError("the server does not support headers (nats-server >= 2.2 needed)")

    # -- one connection -----------------------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream) -> str:
        """Reader, writer and pinger until the connection breaks; returns why."""
        self._lost_reason = None
        try:
            async with trio.open_nursery() as nursery:
                for task in (self._reader, self._writer, self._pinger):
                    nursery.start_soon(self._guard, task, stream, nursery.cancel_scope)
                if self._out:
                    self._wake_writer.set()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        return self._lost_reason or "connection ended"

    async def _guard(
        self,
        task: Callable[[trio.SocketStream], Any],
        stream: trio.SocketStream,
        scope: trio.CancelScope,
    ) -> None:
        try:
            await task(stream)
        except (_Lost, ProtocolError, OSError, trio.BrokenResourceError,
                trio.ClosedResourceError) as exc:
            if self._lost_reason is None:
                self._lost_reason = str(exc) if isinstance(exc, _Lost) else repr(exc)
            scope.cancel()

    async def _reader(self, stream: trio.SocketStream) -> None:
        parser = self._parser
        while True:
            gate = self.read_gate
            if gate is not None:  # the user is behind: what is unread waits in the server
                self._gated = True
                began = trio.current_time()
                try:
                    await gate()
                finally:
                    self._gated = False
                if trio.current_time() > began:
                    self._fresh = True  # (waiting here is not silence)
            data = await stream.receive_some(READ_SIZE)
            if not data:
                raise _Lost("the server closed the connection")
            self._fresh = True
            # a short read: what the server had queued for us is read (we are caught up)
            self.caught_up = len(data) < READ_SIZE
            try:
                events = parser.feed(data)
            except ProtocolError as exc:
                self._dispatch(exc.events_before)
                raise
            self._dispatch(events)

    async def _writer(self, stream: trio.SocketStream) -> None:
        while True:
            if not self._out:
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                continue
            data, self._out = self._out, bytearray()
            self._space.unpark_all()
            await stream.send_all(data)

    async def _pinger(self, stream: trio.SocketStream) -> None:
        outstanding_limit = self.options.max_outstanding_pings
        while True:
            await trio.sleep(self.options.ping_interval_s)
            self._expire_requests()
            outstanding = sum(1 for p in self._pongs if p is None)
            if outstanding >= outstanding_limit:
                # a PONG behind a backlog the reader is still working through is late, not
                # missing: the connection is stale only when nothing came for an interval
                if self._gated or self._fresh:
                    self._fresh = False  # data came during this interval: late, not lost
                    continue
                raise _Lost(f"stale connection: {outstanding} PINGs without a PONG")
            self._pongs.append(None)
            self._write(proto.PING)

    def _dispatch(self, events: list[proto.Event]) -> None:
        for event in events:
            if type(event) is Msg:
                self.stats.msgs_in += 1
                if event.sid == 1:
                    self._on_reply(event)
                elif (sub := self._subs.get(event.sid)) is not None:
                    sub._deliver(event)
            elif isinstance(event, Ping):
                self._write(proto.PONG)
            elif isinstance(event, Pong):
                if self._pongs:
                    waiter = self._pongs.popleft()
                    if waiter is not None:
                        waiter._resolve(None)
            elif isinstance(event, Info):
                self._on_info(event)
            elif isinstance(event, Err):
                self.stats.server_errors += 1
                log.warning("NATS server %s: -ERR %s", self.connected_url, event.text)

    def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1 :]
        waiter = self._requests.pop(token, None)
        if waiter is None:
            self.stats.late_replies += 1
        else:
            waiter._resolve(msg)
            self._room_made()

    def _lost(self, reason: str) -> None:
        log.warning("NATS connection to %s lost: %s", self.connected_url, reason)
        self.last_error = f"connection to {self.connected_url} lost: {reason}"
        self._lost_reason = None
        self.connected_url = None
        self.stats.discarded_bytes += len(self._out)
        self._out = bytearray()
        self._space.unpark_all()
        self._fail_pending(ConnectionLostError(f"NATS connection lost ({reason})"))
        self._notify_state()

    def _fail_pending(self, error: Exception) -> None:
        requests, self._requests = self._requests, {}
        for waiter in requests.values():
            waiter._resolve(None, error)
        self._room_made()
        pongs, self._pongs = self._pongs, collections.deque()
        for pong in pongs:
            if pong is not None:
                pong._resolve(None, error)

    def _expire_requests(self) -> None:
        """Forget requests past their deadline that nobody waits for (``request_nowait``)."""
        now = trio.current_time()
        expired = [t for t, w in self._requests.items() if w.deadline <= now]
        for token in expired:
            self._requests.pop(token)._resolve(
                None, RequestTimeout(f"no reply within the deadline (request {token})")
            )
        if expired:
            self._room_made()

    # -- output ---------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out += data
        self._wake_writer.set()

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosedError("the NATS client is closed")

    def publish_nowait(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str | None = None,
        headers: HeadersIn | bytes | None = None,
    ) -> None:
        """Queue a PUB/HPUB; ``trio.WouldBlock`` when ``max_pending_bytes`` are queued."""
        self._check_open()
        block = proto.encode_headers(headers) if headers is not None and not isinstance(
            headers, bytes) else headers
        size = len(payload) + (len(block) if block is not None else 0)
        if size > self.max_payload:
            raise MaxPayloadError(f"message of {size} bytes > max_payload {self.max_payload}")
        data = proto.pub(subject, payload, reply, block)
        if self._out and len(self._out) + len(data) > self.options.max_pending_bytes:
            raise trio.WouldBlock
        self.stats.msgs_out += 1
        self._write(data)

    def write_nowait(self, frame: bytes | bytearray) -> None:
        """Queue one PUB/HPUB the caller encoded and checked itself (subject, headers, size
        against ``max_payload``): the broker's hot path builds each frame in one step.
        ``trio.WouldBlock`` when ``max_pending_bytes`` are queued."""
        if self.closed:
            raise ClientClosedError("the NATS client is closed")
        out = self._out
        if out and len(out) + len(frame) > self.options.max_pending_bytes:
            raise trio.WouldBlock
        self.stats.msgs_out += 1
        out += frame
        self._wake_writer.set()

    async def write(self, frame: bytes | bytearray) -> None:
        """:meth:`write_nowait`, waiting for room in the output buffer."""
        while True:
            try:
                return self.write_nowait(frame)
            except trio.WouldBlock:
                await self._space.park()

    async def wait_for_room(self) -> None:
        """Wait until the output buffer is below ``max_pending_bytes`` and the request table
        below ``max_pending_requests``."""
        while not self.closed and (
            len(self._out) >= self.options.max_pending_bytes
            or len(self._requests) >= self.options.max_pending_requests
        ):
            await self._space.park()
        self._check_open()

    def _room_made(self) -> None:
        if self._space:
            self._space.unpark_all()

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str | None = None,
        headers: HeadersIn | bytes | None = None,
    ) -> None:
        """Queue a PUB/HPUB, waiting for room in the output buffer."""
        while True:
            try:
                return self.publish_nowait(subject, payload, reply, headers)
            except trio.WouldBlock:
                # the writer's next send or a finished request makes room
                await self._space.park()

    async def flush(self, timeout_s: float | None = None) -> None:
        """PING and wait for the PONG: the server has then processed everything sent before."""
        self._check_open()
        waiter = PendingReply(
            "flush", trio.current_time() + (timeout_s or self.options.flush_timeout_s),
            lambda token: None,
        )
        self._pongs.append(waiter)
        self._write(proto.PING)
        try:
            await waiter._wait_done()
        except RequestTimeout:
            raise RequestTimeout("no PONG within the flush timeout") from None

    # -- subscriptions ----------------------------------------------------------------------------

    def subscribe_nowait(
        self,
        subject: str,
        queue: str | None = None,
        *,
        capacity: int | None = None,
        callback: Callable[[Msg], None] | None = None,
    ) -> Subscription:
        self._check_open()
        data = proto.sub(subject, self._next_sid, queue)
        send: trio.MemorySendChannel[Msg] | None = None
        receive: trio.MemoryReceiveChannel[Msg] | None = None
        if callback is None:
            send, receive = trio.open_memory_channel[Msg](
                capacity or self.options.subscription_capacity
            )
        sub = Subscription(self._next_sid, subject, queue, send, receive, callback, self.stats,
                           self._unsubscribe)
        self._next_sid += 1
        self._subs[sub.sid] = sub
        if self.is_connected:
            self._write(data)  # else the handshake sends it
        return sub

    async def subscribe(
        self,
        subject: str,
        queue: str | None = None,
        *,
        capacity: int | None = None,
        callback: Callable[[Msg], None] | None = None,
    ) -> Subscription:
        """SUB and wait until the server has it (a flush), so a publish after this returns
        is seen by the subscription when published on the same server."""
        sub = self.subscribe_nowait(subject, queue, capacity=capacity, callback=callback)
        await self.flush()
        return sub

    def _forget_request(self, token: str) -> None:
        self._requests.pop(token, None)
        self._room_made()

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is not None:
            sub._close()
            if self.is_connected:
                self._write(proto.unsub(sub.sid))

    # -- requests ---------------------------------------------------------------------------------

    def new_inbox(self) -> str:
        """A subject nobody else uses (for deliver subjects), outside the reply inbox."""
        return f"_INBOX.{secrets.token_urlsafe(16)}"

    def request_nowait(
        self,
        subject: str,
        payload: bytes = b"",
        headers: HeadersIn | bytes | None = None,
        timeout_s: float | None = None,
    ) -> PendingReply:
        """Queue a request; ``await`` the returned handle's ``wait()`` for the reply."""
        self._check_open()
        if len(self._requests) >= self.options.max_pending_requests:
            raise trio.WouldBlock
        self._next_token += 1
        token = _base36(self._next_token)
        deadline = trio.current_time() + (timeout_s or self.options.request_timeout_s)
        waiter = PendingReply(token, deadline, self._forget_request)
        self.publish_nowait(subject, payload, f"{self._inbox}.{token}", headers)
        self._requests[token] = waiter
        return waiter

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        headers: HeadersIn | bytes | None = None,
        timeout_s: float | None = None,
    ) -> Msg:
        """Publish with a reply subject and wait for the first reply."""
        return await (await self.request_start(subject, payload, headers, timeout_s)).wait()

    async def request_start(
        self,
        subject: str,
        payload: bytes = b"",
        headers: HeadersIn | bytes | None = None,
        timeout_s: float | None = None,
    ) -> PendingReply:
        """``request_nowait``, waiting for room in the output buffer and request table."""
        while True:
            try:
                return self.request_nowait(subject, payload, headers, timeout_s)
            except trio.WouldBlock:
                # the writer's next send or a finished request makes room
                await self._space.park()


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(digits[r])
    return "".join(reversed(out)) or "0"
