"""Configuration loading: the shipped files, defaults, error messages and CLI overrides."""

from __future__ import annotations

import pathlib

import pytest

from mqttd.config import (
    Config,
    ConfigError,
    Limits,
    Listener,
    Logging,
    Persistence,
    config_from_dict,
    load_config,
    parse_config,
)

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "config"


def write(tmp_path: pathlib.Path, text: str, name: str = "x.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_config_dir_has_files() -> None:
    assert (CONFIG_DIR / "mqttd.yaml").is_file()


@pytest.mark.parametrize(
    "path", sorted(CONFIG_DIR.glob("**/*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR))
)
def test_every_shipped_file_loads(path: pathlib.Path) -> None:
    assert isinstance(load_config(path), Config)


def test_default_file_is_the_default_config() -> None:
    assert load_config(CONFIG_DIR / "mqttd.yaml") == Config()


def test_default_config_values() -> None:
    config = Config()
    assert config.listeners == (Listener(host="127.0.0.1", port=1883),)
    assert config.limits == Limits(
        max_packet_size_bytes=1048576,
        connect_timeout_s=10.0,
        max_connections=-1,
        max_inflight_messages=20,
        max_queued_messages=1000,
        max_keepalive_s=65535,
    )
    assert config.persistence == Persistence(data_dir="./data", db_file="mqttd.db")
    assert config.logging == Logging(
        level="info", format="text", file=None, connections=True, summary_interval_s=60.0
    )


def test_no_file_is_the_default_config() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "text", ["", "\n", "# only a comment\n", "{}", "null", "~", "---\n"], ids=repr
)
def test_empty_documents_are_the_default_config(tmp_path: pathlib.Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == Config()
    assert parse_config(text) == Config()


def test_empty_dict_and_none() -> None:
    assert config_from_dict({}) == Config()
    assert config_from_dict(None) == Config()


@pytest.mark.parametrize(
    "text", ["listeners:\n", "limits:\n", "persistence:\n", "logging:\n"], ids=repr
)
def test_empty_section_is_its_default(text: str) -> None:
    assert parse_config(text) == Config()


def test_every_key_is_read(tmp_path: pathlib.Path) -> None:
    text = """
listeners:
  - {host: "0.0.0.0", port: 1884}
  - {host: "::1", port: 0}
limits:
  max_packet_size_bytes: 268435460
  connect_timeout_s: 2.5
  max_connections: 1
  max_inflight_messages: 1
  max_queued_messages: 1
  max_keepalive_s: 0
persistence: {data_dir: /var/lib/mqttd, db_file: broker.db}
logging: {level: DEBUG, format: JSON, file: /var/log/mqttd.log, connections: false,
          summary_interval_s: 5}
"""
    assert load_config(write(tmp_path, text)) == Config(
        listeners=(Listener("0.0.0.0", 1884), Listener("::1", 0)),
        limits=Limits(
            max_packet_size_bytes=268435460,
            connect_timeout_s=2.5,
            max_connections=1,
            max_inflight_messages=1,
            max_queued_messages=1,
            max_keepalive_s=0,
        ),
        persistence=Persistence(data_dir="/var/lib/mqttd", db_file="broker.db"),
        logging=Logging(
            level="debug", format="json", file="/var/log/mqttd.log", connections=False,
            summary_interval_s=5.0,
        ),
    )


def test_partial_sections_keep_other_defaults() -> None:
    config = parse_config("limits: {max_inflight_messages: 1}\nlisteners: [{port: 0}]")
    assert config.limits == Limits(max_inflight_messages=1)
    assert config.listeners == (Listener(port=0),)
    assert config.persistence == Persistence()


def test_int_accepted_for_float() -> None:
    config = parse_config("limits: {connect_timeout_s: 5}")
    assert config.limits.connect_timeout_s == 5.0
    assert type(config.limits.connect_timeout_s) is float


def test_listeners_is_a_tuple() -> None:
    assert isinstance(parse_config("listeners: [{}, {port: 1884}]").listeners, tuple)


BAD_INPUTS = [
    ("bogus: 1", "bogus: unknown key"),
    ("limits: {bogus: 1}", "limits.bogus: unknown key"),
    ("listeners: [{port: 1, tls: true}]", "listeners[0].tls: expected a mapping, got True"),
    ("listeners: [{port: 1, bogus: 1}]", "listeners[0].bogus: unknown key"),
    (
        "limits: {max_inflight_messages: abc}",
        "limits.max_inflight_messages: expected int, got 'abc'",
    ),
    ("listeners: [{port: true}]", "listeners[0].port: expected int, got True"),
    ("limits: {max_queued_messages: no}", "limits.max_queued_messages: expected int, got False"),
    ("listeners: [{port: '1883'}]", "listeners[0].port: expected int, got '1883'"),
    ("listeners: [{port: 1883.0}]", "listeners[0].port: expected int, got 1883.0"),
    ("listeners: [{host: 1}]", "listeners[0].host: expected str, got 1"),
    ("limits: {connect_timeout_s: '5'}", "limits.connect_timeout_s: expected float, got '5'"),
    ("limits: {connect_timeout_s: true}", "limits.connect_timeout_s: expected float, got True"),
    ("listeners: [{port: 70000}]", "listeners[0].port: must be between 0 and 65535, got 70000"),
    ("listeners: [{}, {port: -1}]", "listeners[1].port: must be between 0 and 65535, got -1"),
    ("listeners: [{host: ''}]", "listeners[0].host: must not be empty"),
    (
        "limits: {max_inflight_messages: -5}",
        "limits.max_inflight_messages: must be at least 1, got -5",
    ),
    ("limits: {max_queued_messages: 0}", "limits.max_queued_messages: must be at least 1, got 0"),
    (
        "limits: {max_connections: 0}",
        "limits.max_connections: must be -1 (no limit) or at least 1, got 0",
    ),
    (
        "limits: {max_packet_size_bytes: 268435461}",
        "limits.max_packet_size_bytes: must be between 2 and 268435460, got 268435461",
    ),
    ("limits: {connect_timeout_s: 0}", "limits.connect_timeout_s: must be greater than 0, got 0.0"),
    (
        "limits: {max_keepalive_s: 65536}",
        "limits.max_keepalive_s: must be between 0 and 65535, got 65536",
    ),
    ("persistence: {db_file: 7}", "persistence.db_file: expected str, got 7"),
    (
        "logging: {level: loud}",
        "logging.level: must be one of debug, info, warning, error, got 'loud'",
    ),
    ("logging: {level: 3}", "logging.level: expected str, got 3"),
    ("logging: {format: xml}", "logging.format: must be one of text, json, got 'xml'"),
    ("logging: {format: 1}", "logging.format: expected str, got 1"),
    ("logging: {file: ''}", "logging.file: must not be empty"),
    ("logging: {file: [a.log]}", "logging.file: expected str, got ['a.log']"),
    ("logging: {connections: yes please}",
     "logging.connections: expected true or false, got 'yes please'"),
    ("logging: {connections: 1}", "logging.connections: expected true or false, got 1"),
    ("logging: {summary_interval_s: -1}",
     "logging.summary_interval_s: must be 0 or more, got -1.0"),
    ("logging: {summary_interval_s: often}",
     "logging.summary_interval_s: expected float, got 'often'"),
    ("logging: {colour: true}", "logging.colour: unknown key"),
    ("listeners: []", "listeners: at least one listener is required"),
    ("listeners: {port: 1883}", "listeners: expected a list, got {'port': 1883}"),
    ("listeners: [1883]", "listeners[0]: expected a mapping, got 1883"),
    ("limits: 3", "limits: expected a mapping, got 3"),
    ("[1, 2]", "expected a mapping, got [1, 2]"),
    ("just text", "expected a mapping, got 'just text'"),
    (
        "limits:\n  max_inflight_messages: [1\n",
        "line 3, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'",
    ),
    ("a: b: c", "line 1, column 5: invalid YAML: mapping values are not allowed here"),
    (
        "limits: {max_queued_mesages: 3}",
        "limits.max_queued_mesages: unknown key (did you mean max_queued_messages?)",
    ),
    ("limts: {}", "limts: unknown key (did you mean limits?)"),
]


@pytest.mark.parametrize(("text", "message"), BAD_INPUTS, ids=[t for t, _ in BAD_INPUTS])
def test_bad_input_message(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(excinfo.value) == f"{path}: {message}"
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text, source="config/x.yaml")
    assert str(excinfo.value) == f"config/x.yaml: {message}"


def test_bad_yaml_names_file_and_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "limits:\n  max_inflight_messages: 1\n  bad: : x\n", name="bad.yaml")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(excinfo.value).startswith(f"{path}: line 3, column ")
    assert "bad.yaml" in str(excinfo.value)


def test_every_problem_is_reported() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config("bogus: 1\nlisteners: [{port: x}, {host: 2}]\nlimits: {max_connections: y}")
    assert excinfo.value.problems == [
        ("listeners[0].port", "expected int, got 'x'"),
        ("listeners[1].host", "expected str, got 2"),
        ("limits.max_connections", "expected int, got 'y'"),
        ("bogus", "unknown key"),
    ]
    assert (
        str(excinfo.value).splitlines()[0] == "<string>: listeners[0].port: expected int, got 'x'"
    )


def test_every_bad_value_of_a_section_is_reported() -> None:
    """attrs validators stop at the first bad value of a class: every key is validated on
    its own instead, keys left out included, and cross-key checks run when the keys are
    valid."""
    text = """
limits: {max_inflight_messages: -5, max_queued_messages: 0, max_connections: x, bogus: 1}
listeners: [{port: 70000, host: ""}, {}, {port: -1, protocol: foo}]
bridges: [{name: "a b", port: 0}]
http: {host: 0.0.0.0}
"""
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text)
    assert excinfo.value.problems == [
        ("listeners[0].host", "must not be empty"),
        ("listeners[0].port", "must be between 0 and 65535, got 70000"),
        ("listeners[2].port", "must be between 0 and 65535, got -1"),
        ("listeners[2].protocol", "must be one of mqtt, websockets, got 'foo'"),
        ("limits.max_connections", "expected int, got 'x'"),
        ("limits.max_inflight_messages", "must be at least 1, got -5"),
        ("limits.max_queued_messages", "must be at least 1, got 0"),
        ("limits.bogus", "unknown key"),
        ("http.host", (
            "0.0.0.0 is not a loopback address: the operations listener would be open to the "
            "network without a credential; set http.token (or keep host 127.0.0.1)"
        )),
        ("bridges[0].name", "may hold only letters, digits, '_', '.' and '-', got 'a b'"),
        ("bridges[0].port", "must be between 1 and 65535, got 0"),
        ("bridges[0].topics", "at least one topic mapping is required"),
    ]



def test_every_bad_logging_value_is_reported() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(
            "logging: {level: loud, format: xml, file: '', summary_interval_s: -2}\n"
            "limits: {max_inflight_messages: 0, max_queued_messages: 0}"
        )
    assert excinfo.value.problems == [
        ("limits.max_inflight_messages", "must be at least 1, got 0"),
        ("limits.max_queued_messages", "must be at least 1, got 0"),
        ("logging.level", "must be one of debug, info, warning, error, got 'loud'"),
        ("logging.format", "must be one of text, json, got 'xml'"),
        ("logging.file", "must not be empty"),
        ("logging.summary_interval_s", "must be 0 or more, got -2.0"),
    ]


def test_logging_summary_interval_zero_is_off_and_int_is_float() -> None:
    assert parse_config("logging: {summary_interval_s: 0}").logging.summary_interval_s == 0.0
    interval = parse_config("logging: {summary_interval_s: 1}").logging.summary_interval_s
    assert interval == 1.0 and type(interval) is float


def test_config_from_dict_source() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: limits\.bogus: unknown key$"):
        config_from_dict({"limits": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"^<config>: expected a mapping, got \[\]$"):
        config_from_dict([])  # type: ignore[arg-type]


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read: No such file"):
        load_config(path)


def test_path_types(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "listeners: [{port: 1}]")
    assert load_config(str(path)) == load_config(path) == Config(listeners=(Listener(port=1),))


TWO_LISTENERS = Config(listeners=(Listener("0.0.0.0", 1883), Listener("::", 8883)))


def test_no_overrides_is_unchanged() -> None:
    assert TWO_LISTENERS.with_overrides() == TWO_LISTENERS


def test_port_override_leaves_one_listener() -> None:
    config = TWO_LISTENERS.with_overrides(port=1884)
    assert config.listeners == (Listener("0.0.0.0", 1884),)
    assert config.limits == TWO_LISTENERS.limits


def test_host_override_leaves_one_listener() -> None:
    assert TWO_LISTENERS.with_overrides(host="127.0.0.1").listeners == (
        Listener("127.0.0.1", 1883),
    )


def test_host_and_port_override() -> None:
    assert TWO_LISTENERS.with_overrides(host="::1", port=0).listeners == (Listener("::1", 0),)


def test_data_dir_override() -> None:
    config = TWO_LISTENERS.with_overrides(data_dir="/srv/mqttd")
    assert config.persistence == Persistence(data_dir="/srv/mqttd", db_file="mqttd.db")
    assert config.listeners == TWO_LISTENERS.listeners


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError) as excinfo:
        Config().with_overrides(port=70000)
    assert str(excinfo.value) == "command line: --port: must be between 0 and 65535, got 70000"
    with pytest.raises(ConfigError, match=r"^command line: --data-dir: must not be empty$"):
        Config().with_overrides(data_dir="")


def test_db_path_relative(tmp_path: pathlib.Path) -> None:
    assert Persistence().db_path() == pathlib.Path("data/mqttd.db")
    persistence = Persistence(data_dir=str(tmp_path), db_file="sub/broker.db")
    assert persistence.db_path() == tmp_path / "sub" / "broker.db"


def test_db_path_absolute(tmp_path: pathlib.Path) -> None:
    absolute = tmp_path / "elsewhere.db"
    assert Persistence(data_dir="./data", db_file=str(absolute)).db_path() == absolute


def test_db_path_follows_data_dir_override() -> None:
    assert Config().with_overrides(data_dir="/srv").persistence.db_path() == pathlib.Path(
        "/srv/mqttd.db"
    )


def test_config_is_frozen_and_hashable() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.limits = Limits()  # type: ignore[misc]
    assert hash(config) == hash(parse_config(""))


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="port: must be between 0 and 65535, got 70000"):
        Listener(port=70000)
    with pytest.raises(ValueError, match="port: expected int, got True"):
        Listener(port=True)
