"""Authentication: mosquitto-compatible password files. The hook interfaces a program can
implement (:class:`Authenticator`, :class:`Authorizer`) are in :mod:`mqttd.security.hooks`;
the decision for each CONNECT, with the per-address limit on failed logins, in
:mod:`mqttd.security.gatekeeper`.

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
import getpass
import hashlib
import hmac
import logging
import os
import pathlib
import secrets
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from mqttd.security.hooks import (
    SecurityFileError,
    read_security_file,
    security_file_problems,
)

if TYPE_CHECKING:
    from mqttd.config import Listener

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
        """Raises :class:`SecurityFileError` (the first bad line) if the file is unusable."""
        source = os.fspath(path)
        return cls.parse(read_security_file(source, "password file"), source)

    @classmethod
    def parse(cls, text: str, source: str = "<password file>") -> PasswordFile:
        passwords, problems = cls.parse_all(text, source)
        if problems:
            raise problems[0]
        return passwords

    @classmethod
    def parse_all(
        cls, text: str, source: str = "<password file>"
    ) -> tuple[PasswordFile, list[SecurityFileError]]:
        """The entries that parse, and the problem of every line that does not."""
        entries: dict[str, PasswordHash] = {}
        problems = []
        for number, line in _entry_lines(text):
            username, colon, hashed = line.partition(":")
            if not colon or not username:
                problems.append(SecurityFileError(source, "expected user:hash", number))
                continue
            try:
                entries[username] = PasswordHash.parse(hashed)
            except ValueError as exc:
                problems.append(SecurityFileError(source, f"user {username!r}: {exc}", number))
        return cls(source, entries), problems

    @classmethod
    def problems(cls, path: str | os.PathLike[str]) -> list[SecurityFileError]:
        """Every problem of the file at ``path``: unreadable, or each bad line."""
        return security_file_problems(cls.parse_all, path, "password file")

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
    args = _passwd_args(argv)
    path = pathlib.Path(args.file)
    try:
        problem = _valid_username(args.user)
        if problem is not None:
            raise _PasswdFailed(problem)
        lines = [] if args.create else _read_lines(path)
        index = _find_user(lines, args.user)
        if args.delete:
            if index is None:
                raise _PasswdFailed(f"user {args.user!r} not found in {path}")
            del lines[index]
        else:
            password = _new_password(args.password)
            entry = f"{args.user}:{hash_password(password, args.iterations)}"
            if index is None:
                lines.append(entry)
            else:
                lines[index] = entry
        try:
            _write_atomically(path, "".join(line + "\n" for line in lines))
        except OSError as exc:
            raise _PasswdFailed(f"cannot write {path}: {exc.strerror}") from None
    except _PasswdFailed as exc:
        if exc.args:
            print(f"mqttd passwd: {exc.args[0]}", file=sys.stderr)
        return 1
    return 0


class _PasswdFailed(Exception):
    """Ends ``mqttd passwd`` with exit status 1, printing the message (if there is one)."""


def _passwd_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, its option combinations checked (argparse exits on an error)."""
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
    return args


def _read_lines(path: pathlib.Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        hint = " (use -c to create it)" if isinstance(exc, FileNotFoundError) else ""
        raise _PasswdFailed(f"cannot read {path}: {reason}{hint}") from None


def _find_user(lines: list[str], username: str) -> int | None:
    """The index of ``username``'s line (comments skipped), or None."""
    return next(
        (
            i for i, line in enumerate(lines)
            if not line.lstrip().startswith("#") and line.strip().partition(":")[0] == username
        ),
        None,
    )


def _new_password(given: str | None) -> str:
    """The password from the command line (-b), or else asked for twice at the terminal."""
    password = given
    if password is None:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Reenter password: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)  # end the prompt's line
            raise _PasswdFailed from None
        if password != again:
            raise _PasswdFailed("the passwords do not match")
    if not password:
        raise _PasswdFailed("the password is empty")
    return password
