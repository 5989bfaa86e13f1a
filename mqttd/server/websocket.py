"""MQTT over WebSocket (``protocol: websockets``), with trio-websocket.

:func:`accept_websocket` takes an accepted (TCP or TLS) stream through the HTTP upgrade:
only the listener's ``path`` is served (other paths get 404) and the client must offer the
``mqtt`` subprotocol (MQTT 3.1.1 section 6; ``mqttv3.1`` is accepted too). The result,
:class:`WebSocketStream`, is a trio ``Stream`` over binary messages, so the TCP listener's
:class:`~mqttd.server.stream_task.ClientHandler` serves it unchanged: ``receive_some`` returns the
bytes of the next message (MQTT packets may span messages, and one message may hold several
packets), and one ``send_all`` sends one message, so the writer's coalesced batch still
goes out as one frame.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from mqttd.config import Listener

log = logging.getLogger(__name__)

SUBPROTOCOLS = ("mqtt", "mqttv3.1")
# messages trio-websocket buffers ahead of the reader: beyond that it stops reading the
# socket, so a fast publisher meets TCP backpressure as on a plain listener
MESSAGE_QUEUE_SIZE = 4
RECEIVE_BUFFER_BYTES = 65536
CLOSE_TIMEOUT_S = 1.0


class WebSocketStream(trio.abc.Stream):
    """A WebSocket connection as a byte stream of binary messages."""

    def __init__(self, ws: WebSocketConnection, transport: trio.abc.Stream) -> None:
        self.ws = ws
        self.transport = transport  # the TCP or TLS stream under the WebSocket
        self._pending = b""  # the rest of a message longer than a receive_some asked for
        self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = self._pending
        if not data:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return b""  # the peer closed (or the socket broke): end of stream
            if isinstance(message, str):
                # MQTT-6.0.0-1: a non-binary data frame closes the network connection
                raise trio.BrokenResourceError("text frame received (MQTT needs binary frames)")
            data = message
        if max_bytes is not None and len(data) > max_bytes:
            self._pending = data[max_bytes:]
            return data[:max_bytes]
        self._pending = b""
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._sending = True
        try:
            await self.ws.send_message(data if type(data) is bytes else bytes(data))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError(f"WebSocket closed: {exc.reason}") from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Send a close frame and wait (briefly) for the peer's, even when the caller is
        being cancelled (``trio.aclose_forcefully``); then close the socket. A send still
        in progress (a peer that stopped reading) means no close frame can go out: the
        socket is closed at once, which also ends that send."""
        if not self._sending:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await self.ws.aclose()
        # trio-websocket leaves the socket open when the peer went away without a close frame
        await trio.aclose_forcefully(self.transport)


class _ReaderTasks:
    """Stands in for the nursery that ``wrap_server_stream`` starts the WebSocket reader
    task in, so that a reader which ends before a request arrived (a plain HTTP request it
    answered with 400, a peer gone) ends the wait for the request at once."""

    def __init__(self, nursery: trio.Nursery, waiting: trio.CancelScope) -> None:
        self._nursery = nursery
        self._waiting = waiting

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        async def run() -> None:
            try:
                await fn(*args)
            finally:
                self._waiting.cancel()

        self._nursery.start_soon(run)


async def accept_websocket(
    stream: trio.abc.Stream,
    listener: Listener,
    peer: str,
    nursery: trio.Nursery,
    deadline: float,
    max_message_size: int,
) -> WebSocketStream | None:
    """Do the HTTP upgrade on ``stream`` by ``deadline``; the connection's reader task runs in
    ``nursery``. Returns None (having answered and logged one line) when the request is
    refused, malformed or late; the caller then closes the stream."""
    waiting = trio.CancelScope(deadline=deadline)
    request = None
    with waiting:
        request = await wrap_server_stream(
            _ReaderTasks(nursery, waiting),  # type: ignore[arg-type]
            stream,
            message_queue_size=MESSAGE_QUEUE_SIZE,
            max_message_size=max_message_size,
            receive_buffer_size=RECEIVE_BUFFER_BYTES,
        )
    if request is None:
        late = trio.current_time() >= deadline
        log.warning(
            "client %s: %s", peer,
            "no WebSocket upgrade within the CONNECT timeout" if late
            else "not a WebSocket upgrade request; closing",
        )
        return None
    path = request.path.partition("?")[0]
    if path != listener.path:
        log.warning("client %s: WebSocket request for %r, not %r: 404", peer, path, listener.path)
        await _reject(request, 404, b"Not Found\n", deadline)
        return None
    offered = request.proposed_subprotocols
    subprotocol = next((p for p in offered if p.lower() in SUBPROTOCOLS), None)
    if subprotocol is None:
        log.warning(
            "client %s: WebSocket request without the mqtt subprotocol (offered %s): 400",
            peer, ", ".join(offered) or "none",
        )
        await _reject(request, 400, b"The mqtt subprotocol is required\n", deadline)
        return None
    with trio.move_on_at(deadline):
        try:
            ws = await request.accept(subprotocol=subprotocol)
        except ConnectionClosed:
            log.info("client %s: connection lost during the WebSocket upgrade", peer)
            return None
        return WebSocketStream(ws, stream)
    log.warning("client %s: WebSocket upgrade not sent within the CONNECT timeout", peer)
    return None


async def _reject(request: Any, status: int, body: bytes, deadline: float) -> None:
    with trio.move_on_at(deadline):
        try:
            await request.reject(
                status, extra_headers=[(b"Content-Type", b"text/plain")], body=body
            )
        except ConnectionClosed:
            pass
