"""What :class:`~mqttd.cluster.nats_client.NatsClient` hands out and takes: its errors,
options, server addresses and counters, and the two handles of its dispatch: a
:class:`Subscription` (a bounded channel, or a callback run in the reader task) and a
:class:`PendingReply` (one request in flight)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from urllib.parse import unquote, urlsplit

import attrs
import trio

from mqttd.cluster import nats_protocol as proto
from mqttd.cluster.nats_protocol import Msg

log = logging.getLogger("mqttd.cluster.nats")

DROP_LOG_INTERVAL_S = 10.0


class NatsError(Exception):
    """Base of this client's errors."""


class NoServersError(NatsError):
    """No server of the list could be connected to."""


class ServerError(NatsError):
    """The server refused the connection (-ERR during the handshake, e.g. authorization)."""


class ConnectionLostError(NatsError):
    """The connection broke while a request or flush was pending; retry it."""


class ClientClosedError(NatsError):
    """The client is closed."""


class RequestTimeout(NatsError, TimeoutError):
    """No reply before the deadline."""


class NoRespondersError(NatsError):
    """Nobody subscribes to the request's subject (status 503)."""


class MaxPayloadError(NatsError, ValueError):
    """A message larger than the server's max_payload."""


@attrs.frozen
class ServerAddress:
    """``nats://[user:password@|token@]host[:port]``."""

    host: str
    port: int = 4222
    user: str | None = None
    password: str | None = None
    token: str | None = None

    @classmethod
    def parse(cls, url: str) -> ServerAddress:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if parts.scheme not in ("nats", "") or not parts.hostname:
            raise ValueError(f"not a nats:// URL: {url!r}")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if user is not None and password is None:
            return cls(parts.hostname, parts.port or 4222, token=user)
        return cls(parts.hostname, parts.port or 4222, user, password)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


@attrs.frozen
class ClientOptions:
    name: str = "mqttd"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    echo: bool = True
    connect_timeout_s: float = 2.0
    ping_interval_s: float = 2.0
    max_outstanding_pings: int = 2
    reconnect_backoff_s: float = 0.05
    reconnect_backoff_max_s: float = 2.0
    max_reconnect_attempts: int | None = None  # rounds through the list; None: forever
    # run(): keep trying the first connection (with the reconnect backoff) instead of
    # raising NoServersError or ServerError; the last failure is in ``last_error``
    wait_for_servers: bool = False
    max_pending_bytes: int = 8 * 1024 * 1024
    max_pending_requests: int = 65536
    subscription_capacity: int = 1024
    request_timeout_s: float = 5.0
    flush_timeout_s: float = 5.0


@attrs.define
class ClientStats:
    connects: int = 0
    reconnects: int = 0
    msgs_in: int = 0
    msgs_out: int = 0
    dropped_msgs: int = 0  # slow subscriptions
    discarded_bytes: int = 0  # queued output lost with a broken connection
    late_replies: int = 0  # replies to requests that had timed out or failed
    server_errors: int = 0  # -ERR received


@attrs.define(eq=False)
class PendingReply:
    """A request in flight. ``await wait()`` for the reply message."""

    token: str
    deadline: float
    _forget: Callable[[str], object]
    _event: trio.Event = attrs.field(factory=trio.Event)
    _msg: Msg | None = None
    _error: Exception | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def _resolve(self, msg: Msg | None, error: Exception | None = None) -> None:
        if not self._event.is_set():
            self._msg, self._error = msg, error
            self._event.set()

    async def wait(self) -> Msg:
        """The reply; raises RequestTimeout, NoRespondersError or ConnectionLostError."""
        msg = await self._wait_done()
        assert msg is not None
        if msg.status == proto.STATUS_NO_RESPONDERS:
            raise NoRespondersError("no responders")
        return msg

    async def _wait_done(self) -> Msg | None:
        try:
            with trio.move_on_at(self.deadline):
                await self._event.wait()
        finally:
            if not self._event.is_set():
                self._forget(self.token)
        if not self._event.is_set():
            raise RequestTimeout(f"no reply within the deadline (request {self.token})")
        if self._error is not None:
            raise self._error
        return self._msg


@attrs.define(eq=False)
class Subscription:
    """One SUB. Iterate it (or ``await next_msg()``) unless it was made with a callback.

    A bounded trio memory channel (``capacity`` messages), or, with ``callback=``, a plain
    function called in the client's reader task. The reader never waits for a subscriber:
    a full channel drops the message, counts it (``dropped``, ``ClientStats.dropped_msgs``)
    and logs at most every 10 s, so a stalled consumer costs its capacity and never the
    other subscriptions, PING/PONG or the replies. Callbacks are for the broker's
    synchronous hot path (routing never awaits); they must not block.
    """

    sid: int
    subject: str
    queue: str | None
    _send: trio.MemorySendChannel[Msg] | None
    _receive: trio.MemoryReceiveChannel[Msg] | None
    _callback: Callable[[Msg], None] | None
    _stats: ClientStats
    _on_unsubscribe: Callable[[Subscription], None]
    delivered: int = 0
    dropped: int = 0
    _drops_logged: int = 0
    _drop_logged_at: float = -DROP_LOG_INTERVAL_S

    def _deliver(self, msg: Msg) -> None:
        if self._callback is not None:
            self.delivered += 1
            self._callback(msg)
            return
        assert self._send is not None
        try:
            self._send.send_nowait(msg)
            self.delivered += 1
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += 1
            self._stats.dropped_msgs += 1
            now = trio.current_time()
            if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
                log.warning(
                    "slow NATS subscription %s (sid %d): %d messages dropped (%d since last log)",
                    self.subject, self.sid, self.dropped, self.dropped - self._drops_logged,
                )
                self._drop_logged_at, self._drops_logged = now, self.dropped

    def _close(self) -> None:
        if self._send is not None:
            self._send.close()

    @property
    def pending(self) -> int:
        """Messages received and not read yet."""
        return 0 if self._receive is None else self._receive.statistics().current_buffer_used

    def next_msg_nowait(self) -> Msg:
        """The next message if one is buffered, else ``trio.WouldBlock``."""
        if self._receive is None:
            raise TypeError("a callback subscription has no messages to receive")
        return self._receive.receive_nowait()

    async def next_msg(self) -> Msg:
        """The next message; ``trio.EndOfChannel`` once the subscription is closed."""
        if self._receive is None:
            raise TypeError("a callback subscription has no messages to receive")
        return await self._receive.receive()

    def __aiter__(self) -> AsyncIterator[Msg]:
        if self._receive is None:
            raise TypeError("a callback subscription has no messages to receive")
        return self._receive.__aiter__()

    async def unsubscribe(self) -> None:
        self._on_unsubscribe(self)
