"""The plain TCP path of the listeners, lean: accepting in batches from a listening socket,
and :class:`TCPStream`, a trio ``HalfCloseableStream`` over one accepted socket.

trio's ``SocketStream`` is general (conflict detection, error translation by a context
manager per call, a schedule point after every successful call); for an MQTT connection that
costs more than the broker's own work on a CONNECT. This stream calls the socket directly
and waits with ``trio.lowlevel.wait_readable`` / ``wait_writable`` only when the socket
would block, and it can send without awaiting (:meth:`TCPStream.try_send`), which the
stream task uses to write a connection's output without a writer task
(:mod:`mqttd.server.stream_task`). Only the stream task's writer calls ``send_all``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

# accept() errors that mean "out of resources, try again shortly" (as trio's serve_listeners)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# accept() errors that only concern the connection being accepted (it was reset before
# accept returned it), as trio's SocketListener ignores them
_ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})
ACCEPT_BATCH = 64
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux's value
NOTSENT_LOWAT_BYTES = 16384  # connections accepted between two schedule points


def _broken(exc: OSError) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(f"socket error: {exc}")


class TCPStream(trio.abc.HalfCloseableStream):
    """One accepted TCP connection (non-blocking, TCP_NODELAY). ``receive_some`` and
    ``send_all`` behave as trio's ``SocketStream`` does (``BrokenResourceError`` with the
    ``OSError`` as its cause, ``ClosedResourceError`` once closed); ``try_send`` sends what
    the socket takes now, without waiting."""

    __slots__ = ("_drained", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        # trio's SocketStream defaults: no Nagle delay, and at most 16 KiB unsent in the
        # kernel (send() takes no more, and the socket is writable again below it), so that
        # what a slow reader has not taken stays counted in the broker's output buffers
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
        except OSError:
            pass
        self.socket = sock
        # the last receive took less than it asked for: the socket was empty then
        self._drained = False

    def try_send(self, data: bytes) -> int:
        """Send what the socket takes without blocking; how many bytes it took."""
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if self.socket.fileno() < 0:
                raise trio.ClosedResourceError("the stream is closed") from None
            raise _broken(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.socket
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("the stream is closed")
        await checkpoint_if_cancelled()
        waited = False
        with memoryview(data) as view:
            total = len(view)
            sent = 0
            while sent < total:
                try:
                    sent += sock.send(view[sent:] if sent else view)
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if sock.fileno() < 0:
                        raise trio.ClosedResourceError("the stream is closed") from None
                    raise _broken(exc) from exc
                await wait_writable(sock)
                waited = True
        if not waited:
            await cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the stream is closed")
        await wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self.socket
        size = max_bytes or 65536
        waited = False
        if self._drained:
            # it was empty after the last receive: wait for data before calling recv(),
            # rather than after a recv() that fails (at low rates, one per message)
            if sock.fileno() < 0:
                raise trio.ClosedResourceError("the stream is closed")
            await wait_readable(sock)
            waited = True
        while True:
            try:
                data = sock.recv(size)
                break
            except BlockingIOError:
                if sock.fileno() < 0:
                    raise trio.ClosedResourceError("the stream is closed") from None
            except OSError as exc:
                raise self._receive_error(exc) from exc
            # (not inside the except clause: an idle connection would keep the exception
            # and its traceback alive while it waits)
            await wait_readable(sock)
            waited = True
        self._drained = len(data) < size
        if not waited:
            await checkpoint()
        return data

    def _receive_error(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self.socket.fileno() < 0:
            return trio.ClosedResourceError("the stream is closed")
        return _broken(exc)

    async def send_eof(self) -> None:
        await checkpoint()
        if self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _broken(exc) from exc

    def close(self) -> None:
        """Close at once (a task waiting on the socket gets ClosedResourceError)."""
        sock = self.socket
        if sock.fileno() >= 0:
            notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await checkpoint()


def listening_socket(listener: trio.SocketListener) -> socket.socket:
    """The standard socket under a trio ``SocketListener`` (which gives it up)."""
    sock = socket.socket(fileno=listener.socket.detach())
    sock.setblocking(False)
    return sock


async def accept_batches(
    sock: socket.socket,
    accepted: Callable[[socket.socket], None],
    capacity_error: Callable[[OSError], None],
) -> None:
    """Accept connections on the listening ``sock`` for ever, calling ``accepted`` with each
    (up to ACCEPT_BATCH between schedule points, waiting for readability only when none is
    pending). Out of fds or memory: ``capacity_error`` is told, and this sleeps 100 ms."""
    try:
        while True:
            full = False
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _address = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_IGNORED_ERRNOS:
                        continue
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    capacity_error(exc)
                    full = True
                    break
                accepted(conn)
            else:
                await checkpoint()  # a full batch: let the accepted connections run
                continue
            # (outside the except clauses: the exception is not kept while waiting)
            if full:
                await trio.sleep(0.1)
            else:
                await wait_readable(sock)
    finally:
        notify_closing(sock)
        sock.close()
