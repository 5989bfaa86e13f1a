"""The listening side of plain TCP, lean: accepting in batches from a listening socket
(the accepted sockets go to the reactor, :mod:`mqttd.server.reactor`, or to a handler task)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable

# accept() errors that mean "out of resources, try again shortly" (as trio's serve_listeners)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# accept() errors that only concern the connection being accepted (it was reset before
# accept returned it), as trio's SocketListener ignores them
_ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})
ACCEPT_BATCH = 64  # connections accepted between two schedule points
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux's value
NOTSENT_LOWAT_BYTES = 16384


def listening_socket(listener: trio.SocketListener) -> socket.socket:
    """The standard socket under a trio ``SocketListener`` (which gives it up), with the
    options its connections inherit (Linux: so the reactor need not set them on each):
    trio's SocketStream defaults, no Nagle delay and at most 16 KiB unsent in the kernel
    (send() takes no more, and the socket is writable again below it), so that what a slow
    reader has not taken stays counted in the broker's output buffers."""
    sock = socket.socket(fileno=listener.socket.detach())
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    except OSError:
        pass
    return sock


async def accept_batches(
    sock: socket.socket,
    accepted: Callable[[int, Any], None],
    capacity_error: Callable[[OSError], None],
) -> None:
    """Accept connections on the listening ``sock`` for ever, calling ``accepted`` with each
    one's file descriptor (the callee owns it) and its peer's address (up to ACCEPT_BATCH
    between schedule points, waiting for readability only when none is pending). Out of fds
    or memory: ``capacity_error`` is told, and this sleeps 100 ms."""
    try:
        while True:
            full = False
            for _ in range(ACCEPT_BATCH):
                try:
                    # (the file descriptor: socket.accept() would build a socket object
                    # whose family and type it converts to enums, a third of the accept)
                    fd, address = sock._accept()  # type: ignore[attr-defined]
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
                accepted(fd, address)
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
