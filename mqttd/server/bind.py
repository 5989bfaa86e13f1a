"""Binding a listener's sockets, with an error that names the listener and its address."""

from __future__ import annotations

import trio


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BindError(OSError):
    """A listener that cannot be bound, as the command line reports it (``cannot start:
    listeners[1] 127.0.0.1:8883: address already in use``); the errno is the system's."""

    def __init__(self, name: str, host: str, port: int, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, reason)
        self.message = f"{name} {format_address(host, port)}: {reason[:1].lower()}{reason[1:]}"

    def __str__(self) -> str:
        return self.message


async def open_listeners(name: str, host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` for the listener called ``name`` (``listeners[1]``,
    ``http``); raises :class:`BindError`."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise BindError(name, host, port, exc) from exc
