"""``mqttd --check-config FILE``: every problem of a configuration file, one per line, each
with the file and the key path. Beyond the schema (:mod:`mqttd.config`: types, ranges,
unknown keys), it loads what the file points to, the way the broker will:

- TLS files of listeners and bridges: each readable, certificates and keys in PEM, the key
  that of the certificate, then the broker's own context built (``mqttd.server.tls``);
- ``security.password_file`` and ``security.acl_file``, with the broker's parsers (every
  bad line, with its number);
- host names: listeners' and the operations listener's resolve to addresses of this machine,
  bridges' resolve; two listeners on one address (port 0 excepted).

Each check runs on every section that is valid by itself, so a typo in one section does not
hide a missing certificate in another. Nothing is bound and no connection is made.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from mqttd.acl import AclFile
from mqttd.auth import PasswordFile
from mqttd.config import (
    TLS,
    Bridge,
    BridgeTLS,
    Check,
    Config,
    ConfigError,
    Http,
    Listener,
    Problem,
    Security,
    load_config,
)
from mqttd.server.tls import client_context, server_context

Address = tuple[int, Any]  # (address family, socket address) from getaddrinfo
Endpoint = tuple[int, str, int]  # (address family, address, port)
_WILDCARDS = ("0.0.0.0", "::")


def check_config(path: str | os.PathLike[str]) -> list[str]:
    """Every problem of the configuration file at ``path``, one line each (``FILE: key:
    problem``); an empty list when the broker can start with it."""
    try:
        load_config(path, _Checker().checks())
    except ConfigError as exc:
        return exc.lines()
    return []


def main(path: str) -> int:
    """Print every problem (stderr) and return 1, or print ``FILE: configuration OK``."""
    problems = check_config(path)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    print(f"{path}: configuration OK")
    return 0


@attrs.define(eq=False)
class _Checker:
    """The checks of one run; a host name is resolved once."""

    _resolved: dict[tuple[str, int, bool], list[Address] | str] = attrs.Factory(dict)

    def checks(self) -> dict[Any, Check]:
        return {
            TLS: _listener_tls,
            BridgeTLS: _bridge_tls,
            Security: _security_files,
            Listener: self._listener,
            Http: self._http,
            Bridge: self._bridge,
            tuple[Listener, ...]: self._same_addresses,
            Config: self._http_beside_listeners,
        }

    def resolve(self, host: str, port: int, listen: bool) -> list[Address] | str:
        """The addresses of ``host`` as ``trio.open_tcp_listeners`` (``listen``) or
        ``open_tcp_stream`` looks them up, or the resolver's complaint."""
        key = (host, port, listen)
        if key not in self._resolved:
            flags = socket.AI_PASSIVE if listen else 0
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
            except OSError as exc:  # socket.gaierror
                self._resolved[key] = f"cannot resolve {host!r}: {exc.strerror or exc}"
            else:
                self._resolved[key] = [(info[0], info[4]) for info in infos]
        return self._resolved[key]

    def _listen_problems(self, host: str) -> list[Problem]:
        """``host`` resolves to addresses a socket can be bound to (on port 0: this checks
        the address, not whether a port is free)."""
        addresses = self.resolve(host, 0, listen=True)
        if isinstance(addresses, str):
            return [("host", addresses)]
        problems = []
        for family, sockaddr in addresses:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(sockaddr)
                except OSError as exc:
                    problems.append(("host", f"cannot listen on {sockaddr[0]}: {exc.strerror}"))
        return problems

    def _listener(self, listener: Listener) -> list[Problem]:
        return self._listen_problems(listener.host)

    def _http(self, http: Http) -> list[Problem]:
        return self._listen_problems(http.host) if http.enabled else []

    def _bridge(self, bridge: Bridge) -> list[Problem]:
        endpoints = self.resolve(bridge.host, bridge.port, listen=False)
        return [("host", endpoints)] if isinstance(endpoints, str) else []

    def _endpoints(self, host: str, port: int) -> list[Endpoint]:
        addresses = self.resolve(host, 0, listen=True)
        if isinstance(addresses, str):
            return []  # reported by the host check
        return [(family, str(sockaddr[0]), port) for family, sockaddr in addresses]

    def _same_addresses(self, listeners: tuple[Listener, ...]) -> list[Problem]:
        problems: list[Problem] = []
        taken: list[tuple[int, list[Endpoint]]] = []
        for index, listener in enumerate(listeners):
            if listener.port == 0:
                continue
            mine = self._endpoints(listener.host, listener.port)
            other = next((i for i, theirs in taken if _overlap(mine, theirs)), None)
            if other is not None:
                where = _address(listener.host, listener.port)
                problems.append((f"[{index}]", f"same address as listeners[{other}] ({where})"))
            taken.append((index, mine))
        return problems

    def _http_beside_listeners(self, config: Config) -> list[Problem]:
        http = config.http
        if not http.enabled or http.port == 0:
            return []
        mine = self._endpoints(http.host, http.port)
        for index, listener in enumerate(config.listeners):
            if _overlap(mine, self._endpoints(listener.host, listener.port)):
                where = _address(http.host, http.port)
                return [("http", f"same address as listeners[{index}] ({where})")]
        return []


def _overlap(ours: Iterable[Endpoint], theirs: Iterable[Endpoint]) -> bool:
    """Two listening sockets would collide: same family and port, and the same address or
    a wildcard (IPv6 sockets are IPv6 only, as trio makes them)."""
    theirs = list(theirs)
    return any(
        family == other_family and port == other_port
        and (address == other or address in _WILDCARDS or other in _WILDCARDS)
        for family, address, port in ours
        for other_family, other, other_port in theirs
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- files ------------------------------------------------------------------------------


def _security_files(security: Security) -> list[Problem]:
    problems: list[Problem] = []
    if security.password_file is not None:
        found = PasswordFile.problems(security.password_file)
        problems += [("password_file", str(problem)) for problem in found]
    if security.acl_file is not None:
        problems += [("acl_file", str(problem)) for problem in AclFile.problems(security.acl_file)]
    return problems


def _listener_tls(tls: TLS) -> list[Problem]:
    return _tls_problems(
        {"certfile": tls.certfile, "keyfile": tls.keyfile, "cafile": tls.cafile},
        lambda: server_context(tls),
    )


def _bridge_tls(tls: BridgeTLS) -> list[Problem]:
    if tls.keyfile is not None and tls.certfile is None:
        return [("keyfile", "is only used with certfile (the client certificate)")]
    return _tls_problems(
        {"certfile": tls.certfile, "keyfile": tls.keyfile, "cafile": tls.cafile},
        lambda: client_context(tls),
    )


def _tls_problems(files: dict[str, str | None], build: Callable[[], object]) -> list[Problem]:
    """Each file readable, certificates that parse; then the key of the certificate (in
    ``keyfile``, or in ``certfile`` without one); then the broker's context ``build``."""
    problems: list[Problem] = []
    for key, path in files.items():
        if path is not None and (problem := _file_problem(path, key != "keyfile")):
            problems.append((key, problem))
    if problems:
        return problems
    certfile, keyfile = files["certfile"], files["keyfile"]
    if certfile is not None and (problem := _key_problem(certfile, keyfile)):
        return [("keyfile" if keyfile else "certfile", problem)]
    try:
        build()
    except (OSError, ValueError) as exc:  # mqttd.server.tls.TLSSetupError, ssl.SSLError
        return [("", str(exc))]
    return []


def _file_problem(path: str, certificates: bool) -> str | None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror}"
    if certificates and not _holds_certificates(path):
        return f"{path!r} holds no PEM certificate"
    return None


def _holds_certificates(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError):
        return False
    return True


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Encrypted


def _key_problem(certfile: str, keyfile: str | None) -> str | None:
    path = keyfile or certfile
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _Encrypted:
        return f"{path!r} is encrypted: mqttd cannot ask for its passphrase"
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"{path!r} is not the key of the certificate in {certfile!r}"
        return f"{path!r} holds no PEM private key"
    return None
