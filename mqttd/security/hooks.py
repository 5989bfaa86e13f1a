"""The interfaces between the broker and the programs or files that decide who may connect
and what they may do: the hooks an embedding program passes (:class:`Authenticator`,
:class:`Authorizer`), the error of an unusable password or ACL file and how both files are
read. No trio: the sans-IO modules (acl, the engine) depend on these, not on the thread
hand-off in auth.py."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mqttd.config import Listener


class SecurityFileError(Exception):
    """A password or ACL file that cannot be used; the message names the file and line."""

    def __init__(self, source: str, problem: str, line: int | None = None) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


def read_security_file(source: str, kind: str) -> str:
    """The text of a password or ACL file (``kind`` names it in the error)."""
    try:
        return pathlib.Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise SecurityFileError(source, f"cannot read {kind}: {problem}") from None


def security_file_problems(
    parse_all: Callable[[str, str], tuple[object, list[SecurityFileError]]],
    path: str | os.PathLike[str], kind: str,
) -> list[SecurityFileError]:
    """Every problem of the file at ``path``: unreadable, or each bad line."""
    source = os.fspath(path)
    try:
        text = read_security_file(source, kind)
    except SecurityFileError as exc:
        return [exc]
    return parse_all(text, source)[1]


# -- hook interfaces --------------------------------------------------------------------


class Authenticator(Protocol):
    """Decides whether a client that gave a user name may connect.

    Called for every CONNECT that carries a user name (clients without one are governed by
    the listener's ``allow_anonymous``). It runs on the event loop, so it must be quick;
    an object that also has a method ``is_slow(username, password) -> bool`` returning
    True is called in a worker thread instead (then it must be thread-safe). ``peer`` is
    ``"host:port"``; ``listener`` is None for connections driven without I/O.
    """

    def authenticate(
        self,
        client_id: str,
        username: str,
        password: bytes | None,
        *,
        peer: str,
        listener: Listener | None,
    ) -> bool: ...


class Authorizer(Protocol):
    """Decides what an authenticated client may do. ``username`` is None for anonymous
    clients. The broker caches ``can_publish`` and ``can_receive`` answers per (client id,
    user name, topic) until :meth:`mqttd.broker.Broker.reload`, so they must depend on
    nothing else. Client ids or user names containing ``+`` or ``#`` are refused
    everything before these are asked (as mosquitto does: they would act as wildcards in
    ``%c``/``%u`` patterns)."""

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool: ...

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool: ...

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool: ...
