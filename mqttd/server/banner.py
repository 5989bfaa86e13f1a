"""The start-up banner of ``mqttd serve``: what is serving where, in one block logged once
every listener is bound (so port 0 shows the real port), and the warnings an operator
must not miss (anonymous clients accepted from the network, a listener nobody can log in
on)::

    mqttd 0.1.0 serving MQTT 3.1.1, 3.1 and 5.0
      config:    built-in defaults
      mqtt:      127.0.0.1:1883 tcp, anonymous clients allowed
      dashboard: http://127.0.0.1:18083/ (metrics /metrics, health /healthz)
      store:     /home/me/data/mqttd.db (SQLite, durability process_crash)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mqttd.config import Config, Listener, is_loopback

if TYPE_CHECKING:
    from mqttd.server.listeners import BoundListener

KINDS = {"mqtt": "tcp", "mqtts": "tls", "ws": "ws", "wss": "wss"}


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _login(listener: Listener, password_file: str | None) -> str:
    tls = listener.tls
    if tls is not None and tls.use_identity_as_username:
        return "client certificate identity as user name"
    if listener.anonymous_allowed:
        return "anonymous clients allowed"
    if password_file is not None:
        return "user name and password required"
    return "anonymous clients refused, no password file: nobody can log in"


def _without_credentials(url: str) -> str:
    """A NATS server URL as it may be logged: ``nats://host:port``."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or ""
    return f"nats://{_address(host, parts.port or 4222)}"


def banner(
    config: Config, source: str | None, listeners: Sequence[BoundListener],
    http_addresses: Sequence[tuple[str, int]], version: str,
) -> str:
    """The block: version, configuration source, each bound MQTT listener (address, kind,
    who may log in), the operations listener's URL, the store."""
    lines = [f"mqttd {version} serving MQTT 3.1.1, 3.1 and 5.0"]
    lines.append(f"  config:    {source if source is not None else 'built-in defaults'}")
    password_file = config.security.password_file
    for bound in listeners:
        path = f" path {bound.config.path}" if bound.config.protocol == "websockets" else ""
        login = _login(bound.config, password_file)
        for host, port in bound.addresses:
            kind = KINDS[bound.scheme]
            lines.append(f"  mqtt:      {_address(host, port)} {kind}{path}, {login}")
    if http_addresses:
        for host, port in http_addresses:
            lines.append(
                f"  dashboard: http://{_address(host, port)}/ "
                "(metrics /metrics, health /healthz)"
            )
    else:
        lines.append("  dashboard: off (--http-port PORT, or http.enabled in the config)")
    persistence = config.persistence
    if persistence.in_memory:
        lines.append("  store:     in memory (nothing survives a restart)")
    else:
        lines.append(
            f"  store:     {os.path.abspath(persistence.db_path())} "
            f"(SQLite, durability {persistence.durability})"
        )
    cluster = config.cluster
    if cluster.enabled:
        lines.append(
            f"  cluster:   node {cluster.node} (preview), NATS "
            f"{', '.join(_without_credentials(url) for url in cluster.nats_servers)}, "
            f"replicas {cluster.replicas}"
        )
    if password_file is not None:
        lines.append(f"  passwords: {password_file}")
    if config.security.acl_file is not None:
        lines.append(f"  acl:       {config.security.acl_file}")
    return "\n".join(lines)


def warnings(config: Config, listeners: Sequence[BoundListener]) -> list[str]:
    """What the operator must hear about: a listener off loopback that accepts anonymous
    clients, a listener on which nobody can log in."""
    found = []
    password_file = config.security.password_file
    for bound in listeners:
        cfg = bound.config
        where = bound.name
        identity = cfg.tls is not None and cfg.tls.use_identity_as_username
        if identity:
            continue
        if cfg.anonymous_allowed and not is_loopback(cfg.host):
            found.append(
                f"listener {where} accepts anonymous clients from the network: anyone who "
                "can reach it may connect, publish and subscribe"
                + (" (within the ACL)" if config.security.acl_file else "")
                + "; set allow_anonymous: false and security.password_file (mqttd passwd), "
                "or listen on 127.0.0.1"
            )
        elif not cfg.anonymous_allowed and password_file is None:
            found.append(
                f"listener {where} refuses anonymous clients and there is no password "
                "file: no client can log in on it; set security.password_file "
                "(mqttd passwd) or allow_anonymous: true"
            )
    return found
