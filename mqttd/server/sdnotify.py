"""systemd's notify protocol (``Type=notify``), without libsystemd: datagrams such as
``READY=1`` sent to the unix socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for
an abstract socket), and ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 2`` when systemd watches
the process (``WatchdogSec=``).

Sending never blocks and never fails the broker: a datagram that cannot be sent is
dropped (logged once). Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import attrs
import trio

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address of ``$NOTIFY_SOCKET``: a path as is, ``@name`` as the
    abstract name ``\\0name``; None for anything else (systemd's ``vsock:`` addresses)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or None when this
    process is not watched (no or a bad ``$WATCHDOG_USEC``, ``$WATCHDOG_PID`` another
    process)."""
    watched_pid = environ.get("WATCHDOG_PID")
    if watched_pid and watched_pid != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` with ``RELOADING=1`` wants."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@attrs.define(eq=False)
class Notifier:
    """The sending end; ``Notifier.from_environ()`` is inert outside systemd."""

    address: str | None = None
    watchdog_s: float | None = None
    _sock: socket.socket | None = None
    _failed: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return cls()
        address = socket_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%s: not a unix socket address; not notifying", value)
            return cls()
        return cls(address, watchdog_interval_s(environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: a missing socket would fail every watchdog tick
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    async def watchdog(self) -> None:
        """Send ``WATCHDOG=1`` from the event loop until cancelled (nothing without a
        watchdog): a loop that stops running stops the pings, and systemd restarts us."""
        interval_s = self.watchdog_s
        if self.address is None or interval_s is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(interval_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
