"""The deployment files agree with each other and with the configuration schema (Docker is
not run here: the Dockerfile is read, not built)."""

from __future__ import annotations

import configparser
import json
import pathlib
import re

from mqttd.config import is_loopback, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instruction(name: str) -> str:
    """The arguments of the Dockerfile's (last) ``name`` instruction, continuations joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    found = re.findall(rf"^{name} +(.+)$", text, re.MULTILINE)
    assert found, name
    return found[-1]


def test_the_container_config_listens_everywhere_with_passwords_and_keeps_ops_local():
    config = load_config(ROOT / "deploy" / "docker.yaml")
    (listener,) = config.listeners
    assert (listener.host, listener.port) == ("0.0.0.0", 1883)
    assert not listener.anonymous_allowed
    assert config.security.password_file == "/data/passwd"
    assert config.persistence.data_dir == "/data"
    assert config.http.enabled and is_loopback(config.http.host)


def test_the_dockerfile_runs_that_config_on_the_volume_with_a_health_check():
    config = load_config(ROOT / "deploy" / "docker.yaml")
    assert DOCKERFILE.startswith("#") and "\nFROM python:3.11-slim\n" in DOCKERFILE
    assert "COPY deploy/docker.yaml /etc/mqttd/mqttd.yaml" in DOCKERFILE
    assert json.loads(_instruction("CMD")) == ["serve", "-c", "/etc/mqttd/mqttd.yaml"]
    assert json.loads(_instruction("ENTRYPOINT")) == ["mqttd"]
    assert json.loads(_instruction("VOLUME")) == [config.persistence.data_dir]
    assert _instruction("USER") == "mqttd"
    assert _instruction("EXPOSE").split() == ["1883", str(config.http.port)]
    health = _instruction("HEALTHCHECK")
    assert f"http://127.0.0.1:{config.http.port}/healthz" in health


def test_the_systemd_unit_is_a_notify_service_with_a_watchdog():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "mqttd.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"].split() == [
        "/usr/local/bin/mqttd", "-c", "/etc/mqttd/mqttd.yaml", "--data-dir", "/var/lib/mqttd",
    ]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["WatchdogSec"] == "30" and service["StateDirectory"] == "mqttd"
    assert service["ReadWritePaths"] == "/var/lib/mqttd"
    assert (service["User"], service["Group"]) == ("mqttd", "mqttd")
