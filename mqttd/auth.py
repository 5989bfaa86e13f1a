"""Authentication: mosquitto-compatible password files, the hook interfaces an embedding
program can implement (:class:`Authenticator`, :class:`Authorizer`), the per-address limit on
failed logins, and the :class:`Gatekeeper` that decides each CONNECT with them.

Password file format (mosquitto's): one ``user:hash`` per line; blank lines and lines whose
first character is ``#`` are ignored. Two hash formats are read:

* ``$7$<iterations>$<base64 salt>$<base64 hash>``: PBKDF2-HMAC-SHA512 (mosquitto 2.x; it
  writes 101 iterations, a 12-byte salt and a 64-byte hash);
* ``$6$<base64 salt>$<base64 hash>``: one SHA-512 over password + salt (mosquitto 1.x).

Anything else (including mosquitto's unhashed ``user:password`` lines) is refused when the
file is loaded, with an error naming the line. New entries are written as ``$7$`` with
:data:`HASH_ITERATIONS` iterations, which mosquitto reads too (it takes the count from the
line), so a file stays usable by both brokers.

``mqttd passwd`` (:func:`passwd_main`) adds, replaces and deletes entries.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import functools
import getpass
import hashlib
import hmac
import logging
import os
import pathlib
import secrets
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mqttd.codec.errors import (
    BadUserNameOrPassword,
    MQTTError,
    NotAuthorized,
    ServerUnavailable,
)
from mqttd.security.hooks import Authenticator, SecurityFileError

if TYPE_CHECKING:
    from mqttd.codec.packets import Connect
    from mqttd.config import Listener
    from mqttd.protocol import Connection

log = logging.getLogger(__name__)

# PBKDF2-HMAC-SHA512 iterations for entries we write. 210,000 is OWASP's recommendation for
# PBKDF2-HMAC-SHA512 (Password Storage Cheat Sheet, 2023): the file may hold passwords chosen
# by people, and a copy of it must not be cheap to attack offline (mosquitto's 101 iterations
# are about 2,000 times cheaper per guess). The price is ~0.1-0.2 s of CPU per check, so the
# broker verifies such entries in a worker thread, never on the event loop, and remembers
# successful checks (see PasswordFile). Fleets whose devices hold long random secrets gain
# nothing from a high count and can write entries with ``mqttd passwd --iterations N``.
HASH_ITERATIONS = 210_000
# mosquitto 2.0 reads only 12-byte salts in $7$ entries (a 16-byte one never matches);
# 96 random bits keep salts unique, which is all a salt is for
SALT_BYTES = 12
HASH_BYTES = 64  # SHA-512 output, as mosquitto
# entries at least this expensive are checked in a worker thread when the broker is serving
SLOW_ITERATIONS = 5_000
MAX_ITERATIONS = 100_000_000  # a typo, not a policy: refuse at load rather than hang a thread


# the hook interfaces and the file error live in mqttd.security.hooks (no trio there)


# -- hashes -----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(
    password: str | bytes, iterations: int = HASH_ITERATIONS, salt: bytes | None = None
) -> str:
    """A ``$7$`` (PBKDF2-HMAC-SHA512) entry for ``password`` with a random salt."""
    secret = password.encode("utf-8") if isinstance(password, str) else password
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, HASH_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


@attrs.frozen
class PasswordHash:
    """One parsed entry: ``iterations`` 0 means mosquitto 1.x's single SHA-512."""

    iterations: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse ``$7$...`` or ``$6$...``; ValueError says what is wrong (never quoting
        ``text``, which could be a plain password)."""
        parts = text.split("$")
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            try:
                iterations = int(parts[2])
            except ValueError:
                raise ValueError("$7$ entry: the iteration count is not a number") from None
            if not 1 <= iterations <= MAX_ITERATIONS:
                raise ValueError(f"$7$ entry: iteration count {iterations} out of range")
            salt_text, digest_text = parts[3], parts[4]
        elif len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            iterations = 0
            salt_text, digest_text = parts[2], parts[3]
        else:
            raise ValueError(
                "unknown password hash format (expected $7$ PBKDF2-SHA512 or $6$ SHA-512, "
                "as written by mosquitto_passwd or mqttd passwd)"
            )
        try:
            salt = base64.b64decode(salt_text, validate=True)
            digest = base64.b64decode(digest_text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("salt or hash is not valid base64") from None
        if not salt or not digest:
            raise ValueError("empty salt or hash")
        return cls(iterations, salt, digest)

    @property
    def slow(self) -> bool:
        return self.iterations >= SLOW_ITERATIONS

    def verify(self, password: bytes) -> bool:
        if self.iterations:
            computed = hashlib.pbkdf2_hmac(
                "sha512", password, self.salt, self.iterations, len(self.digest)
            )
        else:
            computed = hashlib.sha512(password + self.salt).digest()
        return hmac.compare_digest(computed, self.digest)


# -- password file ----------------------------------------------------------------------


def _entry_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for the lines that hold entries (not blank, not comments)."""
    result = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            result.append((number, line))
    return result


@attrs.define(eq=False)
class PasswordFile:
    """The users of a password file: the default :class:`Authenticator`.

    Successful checks are remembered as an HMAC of the password under a key that exists only
    in this process (never the password itself), so a device that reconnects costs one
    SHA-256 rather than a PBKDF2 run. Failed checks are never remembered."""

    source: str
    entries: dict[str, PasswordHash]
    _key: bytes = attrs.field(init=False, factory=lambda: secrets.token_bytes(32))
    _verified: dict[str, bytes] = attrs.field(init=False, factory=dict)
    _dummy: PasswordHash = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # unknown users cost the same as known ones, so timing does not tell them apart
        sample = next(iter(self.entries.values()), None)
        iterations = sample.iterations if sample is not None else HASH_ITERATIONS
        self._dummy = PasswordHash(iterations, secrets.token_bytes(SALT_BYTES), bytes(64))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PasswordFile:
        source = os.fspath(path)
        try:
            text = pathlib.Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise SecurityFileError(source, f"cannot read password file: {problem}") from None
        return cls.parse(text, source)

    @classmethod
    def parse(cls, text: str, source: str = "<password file>") -> PasswordFile:
        entries: dict[str, PasswordHash] = {}
        for number, line in _entry_lines(text):
            username, colon, hashed = line.partition(":")
            if not colon or not username:
                raise SecurityFileError(source, "expected user:hash", number)
            try:
                entries[username] = PasswordHash.parse(hashed)
            except ValueError as exc:
                raise SecurityFileError(source, f"user {username!r}: {exc}", number) from None
        return cls(source, entries)

    def __len__(self) -> int:
        return len(self.entries)

    def _mac(self, username: str, password: bytes) -> bytes:
        return hmac.new(self._key, username.encode() + b"\0" + password, "sha256").digest()

    def _remembered(self, username: str, password: bytes) -> bool:
        known = self._verified.get(username)
        return known is not None and hmac.compare_digest(known, self._mac(username, password))

    def is_slow(self, username: str, password: bytes | None) -> bool:
        """Whether checking this login costs a slow hash (the broker then uses a thread)."""
        entry = self.entries.get(username, self._dummy)
        if not entry.slow or password is None:
            return False
        return not self._remembered(username, password)

    def authenticate(
        self,
        client_id: str,
        username: str,
        password: bytes | None,
        *,
        peer: str = "?",
        listener: Listener | None = None,
    ) -> bool:
        entry = self.entries.get(username)
        if password is None:
            return False
        if entry is None:
            self._dummy.verify(password)
            return False
        if entry.slow and self._remembered(username, password):
            return True
        if not entry.verify(password):
            return False
        if entry.slow:
            self._verified[username] = self._mac(username, password)  # one dict store: atomic
        return True


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


# -- the CONNECT gate --------------------------------------------------------------------

AUTH_THREADS = 2  # worker threads for slow password hashes (a bounded share of the CPU)


def _bad_login(username: str) -> BadUserNameOrPassword:
    return BadUserNameOrPassword(f"user {username!r}: unknown user or wrong password")


@attrs.define(eq=False)
class Gatekeeper:
    """Decides whether a CONNECT may proceed, and as whom (the user name the ACL sees).

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

    A check the authenticator calls slow (``is_slow``) runs in a worker thread
    (:meth:`check_in_thread`), one at a time per source address."""

    limiter: LoginRateLimiter
    authenticator: Authenticator | None = None
    threads: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(AUTH_THREADS))
    _turns: dict[str, list[Any]] = attrs.field(init=False, factory=dict)

    def _over_limit(self, host: str) -> NotAuthorized | None:
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
        password must be checked with :meth:`check_in_thread` (only if ``may_defer``).
        Raises NotAuthorized, BadUserNameOrPassword or ServerUnavailable."""
        host = peer_host(conn.peer)
        refusal = self._over_limit(host)
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
        if not self._authenticate(authenticator, conn, username, packet.password):
            self.limiter.failed(host)
            raise _bad_login(username)
        return True, username

    async def check_in_thread(
        self,
        conn: Connection,
        packet: Connect,
        username: str,
        deadline: float,
        wanted: Callable[[], bool],
    ) -> MQTTError | None:
        """Check a deferred login in a worker thread: None if accepted, else the refusal.
        Checks from one address run one after the other, so that a burst of guesses meets
        the failed-login limit after ``max_failures`` of them. ``wanted()`` False (the
        client left meanwhile) skips the check; past ``deadline`` (trio time) the client is
        told to come back later (ServerUnavailable) without one."""
        host = peer_host(conn.peer)
        async with self._turn(host):
            if not wanted():
                return None
            if trio.current_time() > deadline:
                return ServerUnavailable("the password check waited past connect_timeout_s")
            refusal = self._over_limit(host)
            if refusal is not None:
                return refusal
            check = functools.partial(
                self._authenticate,
                self.authenticator,  # type: ignore[arg-type]
                conn, username, packet.password,
            )
            try:
                ok = await trio.to_thread.run_sync(
                    check, limiter=self.threads, abandon_on_cancel=True
                )
            except MQTTError as exc:
                return exc
            if not ok:
                self.limiter.failed(host)  # before the next check from this address starts
                return _bad_login(username)
        return None

    @staticmethod
    def _authenticate(
        authenticator: Authenticator, conn: Connection, username: str, password: bytes | None
    ) -> bool:
        try:
            return bool(
                authenticator.authenticate(
                    conn.client_id, username, password, peer=conn.peer, listener=conn.listener
                )
            )
        except Exception:
            log.exception("client %s: the authenticator failed", conn.name)
            raise ServerUnavailable("the authenticator failed") from None

    @asynccontextmanager
    async def _turn(self, host: str) -> AsyncIterator[None]:
        turn = self._turns.get(host)
        if turn is None:
            turn = self._turns[host] = [trio.Lock(), 0]
        turn[1] += 1
        try:
            async with turn[0]:
                yield
        finally:
            turn[1] -= 1
            if not turn[1]:
                del self._turns[host]


# -- mqttd passwd -----------------------------------------------------------------------


def _passwd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqttd passwd",
        description="Manage a password file (mosquitto's format). Adds a user or replaces "
        "its password; -D deletes it.",
        usage="mqttd passwd [-c] [-b] [--iterations N] FILE USER [PASSWORD]\n"
        "       mqttd passwd -D FILE USER",
    )
    parser.add_argument("-c", dest="create", action="store_true",
                        help="create a new file (replaces an existing one)")
    parser.add_argument("-b", dest="batch", action="store_true",
                        help="take the password from the command line instead of prompting")
    parser.add_argument("-D", dest="delete", action="store_true", help="delete USER")
    parser.add_argument("--iterations", type=int, default=HASH_ITERATIONS,
                        help=f"PBKDF2 iterations for the new hash (default {HASH_ITERATIONS})")
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("user", metavar="USER")
    parser.add_argument("password", metavar="PASSWORD", nargs="?")
    return parser


def _valid_username(username: str) -> str | None:
    if not username:
        return "the user name is empty"
    if ":" in username:
        return "a user name cannot contain ':'"
    if username.startswith("#"):
        return "a user name cannot start with '#' (the line would be a comment)"
    if username != username.strip() or any(ord(c) < 32 or ord(c) == 127 for c in username):
        return "a user name cannot contain control characters or leading/trailing spaces"
    return None


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file in the same directory, then a rename,
    so a crash leaves the old file or the new one. New files are readable by the owner only;
    an existing file keeps its permissions."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def passwd_main(argv: Sequence[str] | None = None) -> int:
    """``mqttd passwd [-c] [-b] [--iterations N] FILE USER [PASSWORD]`` and
    ``mqttd passwd -D FILE USER``. Returns the exit status."""
    parser = _passwd_parser()
    args = parser.parse_args(argv)
    if args.delete and (args.create or args.batch or args.password is not None):
        parser.error("-D takes only FILE and USER")
    if args.batch and args.password is None:
        parser.error("-b needs PASSWORD")
    if not args.batch and args.password is not None:
        parser.error("PASSWORD on the command line needs -b")
    if not 1 <= args.iterations <= MAX_ITERATIONS:
        parser.error(f"--iterations must be between 1 and {MAX_ITERATIONS}")
    problem = _valid_username(args.user)
    if problem is not None:
        print(f"mqttd passwd: {problem}", file=sys.stderr)
        return 1
    path = pathlib.Path(args.file)

    lines: list[str] = []
    if not args.create:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            hint = " (use -c to create it)" if isinstance(exc, FileNotFoundError) else ""
            print(f"mqttd passwd: cannot read {path}: {reason}{hint}", file=sys.stderr)
            return 1
    index = next(
        (
            i for i, line in enumerate(lines)
            if not line.lstrip().startswith("#") and line.strip().partition(":")[0] == args.user
        ),
        None,
    )

    if args.delete:
        if index is None:
            print(f"mqttd passwd: user {args.user!r} not found in {path}", file=sys.stderr)
            return 1
        del lines[index]
    else:
        password = args.password
        if password is None:
            try:
                password = getpass.getpass("Password: ")
                again = getpass.getpass("Reenter password: ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 1
            if password != again:
                print("mqttd passwd: the passwords do not match", file=sys.stderr)
                return 1
        if not password:
            print("mqttd passwd: the password is empty", file=sys.stderr)
            return 1
        entry = f"{args.user}:{hash_password(password, args.iterations)}"
        if index is None:
            lines.append(entry)
        else:
            lines[index] = entry
    try:
        _write_atomically(path, "".join(line + "\n" for line in lines))
    except OSError as exc:
        print(f"mqttd passwd: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
