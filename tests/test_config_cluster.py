"""The ``cluster:`` section and the ``--cluster`` / ``--node-name`` overrides."""

from __future__ import annotations

import pytest

from mqttd.config import Cluster, Config, ConfigError, parse_config
from mqttd.config_schema import default_node_name


def test_cluster_is_off_by_default() -> None:
    cluster = Config().cluster
    assert cluster == Cluster()
    assert not cluster.enabled
    assert cluster.nats_servers == ("nats://127.0.0.1:4222",)
    assert cluster.replicas == 3
    assert cluster.node == default_node_name()


def test_every_cluster_key_is_read() -> None:
    config = parse_config(
        "cluster:\n"
        "  enabled: true\n"
        "  node_name: n-1_a\n"
        "  nats_servers: [nats://10.0.0.1:4222, 'nats://u:p@10.0.0.2', 10.0.0.3:4223]\n"
        "  replicas: 1\n"
        "  user: mqttd\n"
        "  password: secret\n"
        "  js_timeout_s: 2\n"
        "  heartbeat_s: 0.5\n"
        "  node_dead_after_s: 3\n"
        "  max_pending_bytes: 65536\n"
        "  group_ack_wait_s: 4\n"
    )
    assert config.cluster == Cluster(
        enabled=True, node_name="n-1_a",
        nats_servers=("nats://10.0.0.1:4222", "nats://u:p@10.0.0.2", "10.0.0.3:4223"),
        replicas=1, user="mqttd", password="secret", js_timeout_s=2.0, heartbeat_s=0.5,
        node_dead_after_s=3.0, max_pending_bytes=65536, group_ack_wait_s=4.0,
    )
    assert config.cluster.node == "n-1_a"
    assert parse_config("cluster: {token: t}").cluster.token == "t"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cluster: {nats_servers: nats://a}", "cluster.nats_servers: expected a list, got "
         "'nats://a'"),
        ("cluster: {nats_servers: []}", "cluster.nats_servers: at least one NATS server URL "
         "is required"),
        ("cluster: {nats_servers: [1]}", "cluster.nats_servers: expected str, got 1"),
        ("cluster: {nats_servers: ['http://a']}", "cluster.nats_servers: expected "
         "nats://[user:password@]host[:port], got 'http://a'"),
        ("cluster: {nats_servers: ['nats://a:99999']}", "cluster.nats_servers: not a NATS "
         "server URL"),
        ("cluster: {node_name: a.b}", "cluster.node_name: must be 1 to 64 letters, digits, "
         "'_' or '-', got 'a.b'"),
        ("cluster: {node_name: ''}", "cluster.node_name: must be 1 to 64"),
        ("cluster: {replicas: 0}", "cluster.replicas: must be between 1 and 5, got 0"),
        ("cluster: {heartbeat_s: 0}", "cluster.heartbeat_s: must be greater than 0"),
        ("cluster: {heartbeat_s: 3}", "cluster.node_dead_after_s: must be at least twice "
         "heartbeat_s (3.0), got 5.0"),
        ("cluster: {password: x}", "cluster.password: needs user"),
        ("cluster: {user: u, token: t}", "cluster.token: give user and password, or token"),
        ("cluster: {max_pending_bytes: 10}", "cluster.max_pending_bytes: must be at least "
         "65536"),
        ("cluster: {enabled: 1}", "cluster.enabled: expected true or false, got 1"),
        ("cluster: {group_ack_wait_s: 0}", "cluster.group_ack_wait_s: must be greater than 0"),
        ("cluster: {group_ack_wait_s: 0.2}", "cluster.group_ack_wait_s: must be at least 0.5, "
         "got 0.2"),
        ("cluster: {node: x}", "cluster.node: unknown key (did you mean node_name?)"),
    ],
)
def test_bad_cluster_values(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text)
    assert message in str(excinfo.value)


def test_every_bad_cluster_value_is_reported() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config("cluster: {replicas: 0, node_name: 'a b', js_timeout_s: -1}")
    paths = sorted(path for path, _ in excinfo.value.problems)
    assert paths == ["cluster.js_timeout_s", "cluster.node_name", "cluster.replicas"]


def test_cluster_overrides() -> None:
    config = Config().with_overrides(cluster="nats://a:1, nats://b:2", node_name="n2")
    assert config.cluster.enabled
    assert config.cluster.nats_servers == ("nats://a:1", "nats://b:2")
    assert config.cluster.node == "n2"
    # --node-name alone names the node and leaves the mode as configured
    assert Config().with_overrides(node_name="n3").cluster == Cluster(node_name="n3")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cluster": "http://a"}, "command line: --cluster: expected nats://"),
        ({"cluster": ","}, "command line: --cluster: at least one NATS server URL"),
        ({"node_name": "a b"}, "command line: --node-name: must be 1 to 64"),
    ],
)
def test_cluster_overrides_are_validated(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Config().with_overrides(**overrides)
    assert str(excinfo.value).startswith(message)


def test_default_node_name_is_a_valid_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "db 1.example.com")
    assert default_node_name() == "db-1"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert default_node_name() == "mqttd"
    assert Cluster().node == "mqttd"
