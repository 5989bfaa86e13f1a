"""The CONNECT gate: whether a client may proceed, and as whom (the user name the ACL sees),
with the per-address limit on failed logins.
Values in, a decision out; no trio. A password check the authenticator calls slow is only
flagged here: the service runs it in a worker thread (mqttd/service.py, LoginChecks) and
comes back with :meth:`Gatekeeper.over_limit`, :meth:`Gatekeeper.authenticate` and
:meth:`Gatekeeper.failed`."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from mqttd.codec.errors import BadUserNameOrPassword, NotAuthorized, ServerUnavailable
from mqttd.security.hooks import Authenticator

if TYPE_CHECKING:
    from mqttd.codec.packets import Connect
    from mqttd.connection import Connection

log = logging.getLogger("mqttd.auth")


# -- failed login limit -----------------------------------------------------------------

PRUNE_EVERY_FAILURES = 1024


def peer_host(peer: str) -> str:
    """The address part of ``"host:port"`` (IPv6 hosts keep their colons)."""
    host, colon, port = peer.rpartition(":")
    return host if colon and port.isdigit() else peer


@attrs.define(eq=False)
class LoginRateLimiter:
    """At most ``max_failures`` failed logins per source address in any ``window_s``; then
    that address is refused without checking until its oldest failure leaves the window.
    ``clock`` is injectable for tests."""

    max_failures: int
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _recent: dict[str, deque[float]] = attrs.field(init=False, factory=dict)
    failures: int = 0  # failed logins (counter)
    refused: int = 0  # logins refused because their address was over the limit (counter)

    def blocked(self, host: str) -> bool:
        recent = self._recent.get(host)
        if recent is None or len(recent) < self.max_failures:
            return False
        if self.clock() - recent[0] >= self.window_s:
            return False
        return True

    def refuse(self) -> None:
        self.refused += 1

    def failed(self, host: str) -> None:
        self.failures += 1
        now = self.clock()
        recent = self._recent.get(host)
        if recent is None:
            recent = self._recent[host] = deque(maxlen=self.max_failures)
        recent.append(now)
        if self.failures % PRUNE_EVERY_FAILURES == 0:
            self.prune(now)

    def prune(self, now: float | None = None) -> None:
        """Forget addresses whose failures have all left the window (bounds the memory)."""
        limit = (self.clock() if now is None else now) - self.window_s
        stale = [host for host, recent in self._recent.items() if recent[-1] <= limit]
        for host in stale:
            del self._recent[host]

    def __len__(self) -> int:
        return len(self._recent)



def bad_login(username: str) -> BadUserNameOrPassword:
    return BadUserNameOrPassword(f"user {username!r}: unknown user or wrong password")


@attrs.define(eq=False)
class Gatekeeper:
    """Decides whether a CONNECT may proceed, and as whom.

    * the source address is over the failed-login limit -> NotAuthorized (CONNACK 0x05),
      without checking anything;
    * on a TLS listener with ``use_identity_as_username`` the certificate's identity is the
      user name and CONNECT's user name and password are not used (as mosquitto); no
      identity -> NotAuthorized;
    * no user name -> allowed where the listener allows anonymous clients, else
      NotAuthorized;
    * a user name with an ``authenticator`` (the password file, or the program's hook) ->
      its answer (BadUserNameOrPassword, 0x04, and one failure for the address, when no);
      without one -> the anonymous rule.

    A check the authenticator calls slow (``is_slow``) is left to the caller (``may_defer``),
    which runs it in a worker thread, one at a time per source address."""

    limiter: LoginRateLimiter
    authenticator: Authenticator | None = None

    def over_limit(self, host: str) -> NotAuthorized | None:
        """The refusal for an address over the failed-login limit (counted), else None."""
        limiter = self.limiter
        if not limiter.blocked(host):
            return None
        limiter.refuse()
        return NotAuthorized(
            f"more than {limiter.max_failures} failed logins from {host} in the last "
            f"{limiter.window_s:.0f}s; refused without checking"
        )

    def login(
        self, conn: Connection, packet: Connect, *, may_defer: bool = False
    ) -> tuple[bool, str | None]:
        """(True, user name) when the client may proceed; (False, user name) when its
        password must be checked in a worker thread (only if ``may_defer``).
        Raises NotAuthorized, BadUserNameOrPassword or ServerUnavailable."""
        host = peer_host(conn.peer)
        refusal = self.over_limit(host)
        if refusal is not None:
            raise refusal
        listener = conn.listener
        tls = listener.tls if listener is not None else None
        if tls is not None and tls.use_identity_as_username:
            if conn.tls_identity is None:
                raise NotAuthorized("no client certificate identity to use as the user name")
            return True, conn.tls_identity
        # a listener of None: a connection driven without I/O, treated as loopback
        anonymous_allowed = listener.anonymous_allowed if listener is not None else True
        username = packet.username
        if username is None:
            if not anonymous_allowed:
                raise NotAuthorized("anonymous clients are not allowed on this listener")
            return True, None
        authenticator = self.authenticator
        if authenticator is None:
            if not anonymous_allowed:
                raise NotAuthorized(
                    f"user {username!r}: no password file, and anonymous clients are not "
                    "allowed on this listener"
                )
            return True, username
        is_slow = getattr(authenticator, "is_slow", None)
        if may_defer and is_slow is not None and is_slow(username, packet.password):
            return False, username
        if not self.authenticate(conn, username, packet.password):
            self.limiter.failed(host)
            raise bad_login(username)
        return True, username

    def authenticate(self, conn: Connection, username: str, password: bytes | None) -> bool:
        """The authenticator's answer (thread-safe as the authenticator is); an exception
        in it is ServerUnavailable (CONNACK 0x03), logged."""
        authenticator = self.authenticator
        if authenticator is None:
            return False
        try:
            return bool(
                authenticator.authenticate(
                    conn.client_id, username, password, peer=conn.peer, listener=conn.listener
                )
            )
        except Exception:
            log.exception("client %s: the authenticator failed", conn.name)
            raise ServerUnavailable("the authenticator failed") from None

    def failed(self, host: str, username: str) -> BadUserNameOrPassword:
        """A refused password: one failure for ``host``; the refusal to send."""
        self.limiter.failed(host)
        return bad_login(username)
