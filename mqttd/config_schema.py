"""The configuration's schema: frozen attrs classes with a default for every key and a
validator for every value (each validator returns the problem, or None). :mod:`mqttd.config`
structures them from YAML and reports every problem with its key path."""

from __future__ import annotations

import fnmatch
import ipaddress
import pathlib
import reprlib
from collections.abc import Callable
from typing import Any

import attrs

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# client ids of the local sessions of bridges (reserved: a client may not use them)
BRIDGE_PREFIX = "$bridge/"
OVERFLOW_POLICIES = ("drop_oldest", "drop_new", "refuse", "disconnect")
MQTT_MAX_PACKET_SIZE_BYTES = 268_435_455 + 5  # largest remaining length + fixed header


class ConfigError(Exception):
    """An invalid configuration: ``problems`` holds (key path, problem) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        super().__init__(source, problems)
        self.source = source
        self.problems = problems

    def lines(self) -> list[str]:
        """One line per problem: ``source: key.path: problem``."""
        return [
            f"{self.source}: {path}: {problem}" if path else f"{self.source}: {problem}"
            for path, problem in self.problems
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


class _Invalid(ValueError):
    """A bad value of attribute ``name`` (validators), or of the value at hand (``name=""``)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}" if name else problem)
        self.name = name
        self.problem = problem


def _type_problem(value: Any, expected: type) -> str | None:
    if expected is bool:
        ok = isinstance(value, bool)
        return None if ok else f"expected true or false, got {reprlib.repr(value)}"
    ok = isinstance(value, (int | float) if expected is float else expected)
    if not ok or isinstance(value, bool):
        return f"expected {expected.__name__}, got {reprlib.repr(value)}"
    return None


def _checked(expected: type, check: Callable[[Any], str | None] = lambda v: None) -> Any:
    """An attrs validator: the value has type ``expected`` and ``check`` finds no problem."""

    def validate(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        problem = _type_problem(value, expected) or check(value)
        if problem:
            raise _Invalid(attribute.name, problem)

    return validate


def _between(low: int, high: int) -> Any:
    def check(v: int) -> str | None:
        return None if low <= v <= high else f"must be between {low} and {high}, got {v}"

    return _checked(int, check)


def _at_least(low: int) -> Any:
    return _checked(int, lambda v: None if v >= low else f"must be at least {low}, got {v}")


def _non_empty(v: str) -> str | None:
    return None if v else "must not be empty"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def _not_negative_f(v: float) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v}"


def _no_limit_or_positive(v: int) -> str | None:
    return None if v == -1 or v >= 1 else f"must be -1 (no limit) or at least 1, got {v}"


def _overflow_policy(v: str) -> str | None:
    if v in OVERFLOW_POLICIES:
        return None
    return f"must be one of {', '.join(OVERFLOW_POLICIES)}, got {reprlib.repr(v)}"


def _rate_policy(v: str) -> str | None:
    if v in ("pause", "refuse"):
        return None
    return f"must be pause or refuse, got {reprlib.repr(v)}"


def _optional(validator: Any) -> Any:
    def validate(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            validator(instance, attribute, value)

    return validate


def _no_limit_or_positive_f(v: float) -> str | None:
    return None if v == -1 or v > 0 else f"must be -1 (no limit) or greater than 0, got {v}"


def _log_level(v: str) -> str | None:
    if v in LOG_LEVELS:
        return None
    return f"must be one of {', '.join(LOG_LEVELS)}, got {reprlib.repr(v)}"


def _log_format(v: str) -> str | None:
    if v in LOG_FORMATS:
        return None
    return f"must be one of {', '.join(LOG_FORMATS)}, got {reprlib.repr(v)}"


def _to_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


PROTOCOLS = ("mqtt", "websockets")
LOOPBACK_HOSTS = ("localhost", "::1")


def _protocol(v: str) -> str | None:
    return None if v in PROTOCOLS else (
        f"must be one of {', '.join(PROTOCOLS)}, got {reprlib.repr(v)}"
    )


def _ws_path(v: str) -> str | None:
    return None if v.startswith("/") else f"must start with '/', got {reprlib.repr(v)}"


@attrs.frozen
class TLS:
    """TLS on a listener (TLS 1.2 and later only)."""

    certfile: str = attrs.field(default="", validator=_checked(str, _non_empty))
    keyfile: str = attrs.field(default="", validator=_checked(str, _non_empty))
    cafile: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    require_certificate: bool = attrs.field(default=False, validator=_checked(bool))
    use_identity_as_username: bool = attrs.field(default=False, validator=_checked(bool))


@attrs.frozen
class Listener:
    host: str = attrs.field(default="127.0.0.1", validator=_checked(str, _non_empty))
    port: int = attrs.field(default=1883, validator=_between(0, 65535))  # 0 = any free port
    protocol: str = attrs.field(
        default="mqtt", converter=_lower, validator=_checked(str, _protocol)
    )
    path: str = attrs.field(default="/mqtt", validator=_checked(str, _ws_path))  # websockets
    tls: TLS | None = None
    # None: anonymous clients are allowed on a loopback listener only
    allow_anonymous: bool | None = attrs.field(default=None, validator=_optional(_checked(bool)))
    max_connections: int = attrs.field(default=-1, validator=_checked(int, _no_limit_or_positive))

    @property
    def anonymous_allowed(self) -> bool:
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return self.host.startswith("127.") or self.host in LOOPBACK_HOSTS


@attrs.frozen
class Limits:
    max_packet_size_bytes: int = attrs.field(
        default=1_048_576, validator=_between(2, MQTT_MAX_PACKET_SIZE_BYTES)
    )
    connect_timeout_s: float = attrs.field(
        default=10.0, converter=_to_float, validator=_checked(float, _positive)
    )
    max_connections: int = attrs.field(default=-1, validator=_checked(int, _no_limit_or_positive))
    # new connections accepted per second, broker-wide (-1: no limit); over it a client is
    # answered CONNACK 0x9F Connection rate exceeded (3.1.1: 0x03) and closed
    max_connection_rate_per_s: float = attrs.field(
        default=-1.0, converter=_to_float, validator=_checked(float, _no_limit_or_positive_f)
    )
    max_inflight_messages: int = attrs.field(default=20, validator=_at_least(1))
    max_queued_messages: int = attrs.field(default=1000, validator=_at_least(1))
    max_keepalive_s: int = attrs.field(default=65535, validator=_between(0, 65535))
    max_queued_bytes: int = attrs.field(
        default=16_777_216, validator=_checked(int, _no_limit_or_positive)
    )
    overflow_policy: str = attrs.field(
        default="drop_oldest", converter=_lower, validator=_checked(str, _overflow_policy)
    )
    # persistent sessions' queues live on disk (a page in RAM): budgets of a message queue
    persistent_max_queued_messages: int = attrs.field(
        default=-1, validator=_checked(int, _no_limit_or_positive)
    )
    persistent_max_queued_bytes: int = attrs.field(
        default=1_073_741_824, validator=_checked(int, _no_limit_or_positive)
    )
    persistent_overflow_policy: str = attrs.field(
        default="refuse", converter=_lower, validator=_checked(str, _overflow_policy)
    )
    qos0_buffer_bytes: int = attrs.field(default=262_144, validator=_at_least(0))
    max_buffered_bytes: int = attrs.field(
        default=268_435_456, validator=_checked(int, _no_limit_or_positive)
    )
    max_receive_messages: int = attrs.field(default=1000, validator=_at_least(1))
    max_inbound_qos2: int = attrs.field(default=1000, validator=_at_least(1))
    max_topic_length_bytes: int = attrs.field(default=65535, validator=_between(1, 65535))
    max_topic_levels: int = attrs.field(default=-1, validator=_checked(int, _no_limit_or_positive))
    max_publish_rate_per_s: float = attrs.field(
        default=-1.0, converter=_to_float, validator=_checked(float, _no_limit_or_positive_f)
    )
    # over max_publish_rate_per_s: "pause" stops reading from the client (TCP backpressure),
    # "refuse" answers a 5.0 client's QoS 1/2 PUBLISH 0x97 Quota exceeded (QoS 0 dropped and
    # counted) and pauses 3.1.1 clients, which cannot be told
    over_publish_rate: str = attrs.field(
        default="pause", converter=_lower, validator=_checked(str, _rate_policy)
    )
    stalled_output_timeout_s: float = attrs.field(
        default=5.0, converter=_to_float, validator=_checked(float, _positive)
    )
    # flow control: a subscriber with this much unsent output, or this many messages
    # queued for its inflight window, holds the publishers feeding it until it drains to
    # half (mqttd.engine.flow)
    output_high_watermark_bytes: int = attrs.field(default=262_144, validator=_at_least(1))
    queue_high_watermark_messages: int = attrs.field(default=256, validator=_at_least(1))
    # MQTT 5.0: topic aliases a client may use towards the broker (0: none)
    max_topic_aliases: int = attrs.field(default=10, validator=_between(0, 65535))


@attrs.frozen
class ClientLimits:
    """The limits that apply to one client: ``limits`` with its override applied."""

    max_inflight_messages: int
    max_queued_messages: int
    max_queued_bytes: int
    overflow_policy: str


@attrs.frozen
class ClientOverride:
    """Limits for the clients whose id matches ``client_id`` (a pattern: ``*`` any run of
    characters, ``?`` one character, ``[...]`` a set); unset keys keep ``limits``."""

    client_id: str = attrs.field(default="", validator=_checked(str, _non_empty))
    max_inflight_messages: int | None = attrs.field(default=None, validator=_optional(_at_least(1)))
    max_queued_messages: int | None = attrs.field(default=None, validator=_optional(_at_least(1)))
    max_queued_bytes: int | None = attrs.field(
        default=None, validator=_optional(_checked(int, _no_limit_or_positive))
    )
    overflow_policy: str | None = attrs.field(
        default=None, converter=_lower, validator=_optional(_checked(str, _overflow_policy))
    )

    def matches(self, client_id: str) -> bool:
        return fnmatch.fnmatchcase(client_id, self.client_id)


BRIDGE_DIRECTIONS = ("out", "in", "both")
_BRIDGE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _direction(v: str) -> str | None:
    if v in BRIDGE_DIRECTIONS:
        return None
    return f"must be one of {', '.join(BRIDGE_DIRECTIONS)}, got {reprlib.repr(v)}"


def _bridge_protocol(v: str) -> str | None:
    if v in ("3.1.1", "5"):
        return None
    return f"must be \"3.1.1\" or \"5\", got {reprlib.repr(v)}"


def _bridge_name(v: str) -> str | None:
    if not v:
        return "must not be empty"
    if not set(v) <= _BRIDGE_NAME_CHARS:
        return f"may hold only letters, digits, '_', '.' and '-', got {reprlib.repr(v)}"
    return None


def _topic_filter(v: str) -> str | None:
    from mqttd.topics import InvalidTopic, validate_topic_filter

    try:
        validate_topic_filter(v)
    except InvalidTopic as exc:
        return f"not a valid topic filter: {exc}"
    return None


def _prefix(v: str) -> str | None:
    if "+" in v or "#" in v:
        return f"must not contain wildcards, got {reprlib.repr(v)}"
    return None


@attrs.frozen
class BridgeTopic:
    """One topic mapping of a bridge (mosquitto's ``topic pattern direction qos local-prefix
    remote-prefix``): local topic = ``local_prefix`` + pattern match, remote topic =
    ``remote_prefix`` + the same."""

    pattern: str = attrs.field(default="", validator=_checked(str, _topic_filter))
    direction: str = attrs.field(
        default="out", converter=_lower, validator=_checked(str, _direction)
    )
    qos: int = attrs.field(default=1, validator=_between(0, 2))
    local_prefix: str = attrs.field(default="", validator=_checked(str, _prefix))
    remote_prefix: str = attrs.field(default="", validator=_checked(str, _prefix))

    @property
    def local_filter(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote_filter(self) -> str:
        return self.remote_prefix + self.pattern


@attrs.frozen
class BridgeTLS:
    """TLS to a bridge's remote broker (TLS 1.2 and later)."""

    # CA certificates to verify the remote with (PEM); null: the system's CA store
    cafile: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    # our client certificate and key, if the remote asks for one (PEM; the key may be in certfile)
    certfile: str | None = attrs.field(
        default=None, validator=_optional(_checked(str, _non_empty))
    )
    keyfile: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    # check that the remote's certificate names ``host`` (turn off only for tests)
    verify_hostname: bool = attrs.field(default=True, validator=_checked(bool))


def _at_least_one_topic(v: tuple[Any, ...]) -> str | None:
    return None if v else "at least one topic mapping is required"


def _unique_names(v: tuple[Any, ...]) -> str | None:
    names = [bridge.name for bridge in v]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    return f"bridge names must be unique, repeated: {', '.join(duplicates)}" if duplicates else None


@attrs.frozen
class Bridge:
    """A link to a remote broker: this broker connects to it as a client."""

    name: str = attrs.field(default="", validator=_checked(str, _bridge_name))
    host: str = attrs.field(default="127.0.0.1", validator=_checked(str, _non_empty))
    port: int = attrs.field(default=1883, validator=_between(1, 65535))
    client_id: str | None = attrs.field(
        default=None, validator=_optional(_checked(str, _non_empty))
    )
    username: str | None = attrs.field(default=None, validator=_optional(_checked(str)))
    password: str | None = attrs.field(default=None, validator=_optional(_checked(str)))
    keepalive_s: int = attrs.field(default=60, validator=_between(1, 65535))
    clean_session: bool = attrs.field(default=False, validator=_checked(bool))
    # the MQTT version spoken on the link: "3.1.1" or "5" (5: properties carried across, No
    # Local subscriptions instead of try_private, the remote's limits honoured)
    protocol: str = attrs.field(default="3.1.1", validator=_checked(str, _bridge_protocol))
    # announce ourselves as a bridge (protocol level | 0x80, as mosquitto's try_private):
    # a mosquitto or mqttd remote then does not send our own messages back to us
    try_private: bool = attrs.field(default=True, validator=_checked(bool))
    connect_timeout_s: float = attrs.field(
        default=10.0, converter=_to_float, validator=_checked(float, _positive)
    )
    tls: BridgeTLS | None = None  # null: plain TCP
    reconnect_delay_min_s: float = attrs.field(
        default=1.0, converter=_to_float, validator=_checked(float, _positive)
    )
    reconnect_delay_max_s: float = attrs.field(
        default=60.0, converter=_to_float, validator=_checked(float, _positive)
    )
    # the store-and-forward queue of messages for the remote side (unset: ``limits``)
    max_inflight_messages: int | None = attrs.field(
        default=None, validator=_optional(_at_least(1))
    )
    max_queued_messages: int | None = attrs.field(default=None, validator=_optional(_at_least(1)))
    max_queued_bytes: int | None = attrs.field(
        default=None, validator=_optional(_checked(int, _no_limit_or_positive))
    )
    topics: tuple[BridgeTopic, ...] = attrs.field(
        default=(), validator=_checked(tuple, _at_least_one_topic)
    )

    @property
    def local_client_id(self) -> str:
        """The id of the local session that holds the messages for the remote side."""
        return f"{BRIDGE_PREFIX}{self.name}"

    def remote_client_id(self) -> str:
        if self.client_id is not None:
            return self.client_id
        import socket

        return f"{socket.gethostname()}.{self.name}"


DURABILITY_LEVELS = ("process_crash", "power_loss")
MEMORY_DB = ":memory:"


def _durability(v: str) -> str | None:
    if v in DURABILITY_LEVELS:
        return None
    return f"must be one of {', '.join(DURABILITY_LEVELS)}, got {reprlib.repr(v)}"


def _never_or_positive(v: int) -> str | None:
    return None if v == -1 or v >= 1 else f"must be -1 (never) or at least 1, got {v}"


@attrs.frozen
class Persistence:
    data_dir: str = attrs.field(default="./data", validator=_checked(str, _non_empty))
    db_file: str = attrs.field(default="mqttd.db", validator=_checked(str, _non_empty))
    durability: str = attrs.field(
        default="process_crash", converter=_lower, validator=_checked(str, _durability)
    )
    session_expiry_s: int = attrs.field(
        default=604_800, validator=_checked(int, _never_or_positive)
    )
    expiry_check_interval_s: float = attrs.field(
        default=60.0, converter=_to_float, validator=_checked(float, _positive)
    )
    queue_page_messages: int = attrs.field(default=4096, validator=_at_least(1))
    max_pending_writes: int = attrs.field(default=50_000, validator=_at_least(1))
    # room on disk: over the budget (-1: none) or under the free-space reserve, messages
    # that need storing are refused (MQTT 5: Quota exceeded) or their publishers held
    # (3.1.1) until there is room again; looked at again every storage_check_interval_s
    max_disk_bytes: int = attrs.field(default=-1, validator=_checked(int, _no_limit_or_positive))
    min_free_disk_bytes: int = attrs.field(default=67_108_864, validator=_at_least(0))
    storage_check_interval_s: float = attrs.field(
        default=1.0, converter=_to_float, validator=_checked(float, _positive)
    )

    @property
    def in_memory(self) -> bool:
        return self.db_file == MEMORY_DB

    def db_path(self) -> pathlib.Path:
        """The database file: ``db_file`` if absolute, else ``db_file`` inside ``data_dir``."""
        return pathlib.Path(self.data_dir) / self.db_file  # an absolute db_file wins the join


@attrs.frozen
class Security:
    password_file: str | None = attrs.field(
        default=None, validator=_optional(_checked(str, _non_empty))
    )
    acl_file: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    # failed logins allowed per source address per minute before further CONNECTs from that
    # address are refused without checking (CONNACK 0x05)
    max_login_failures_per_minute: int = attrs.field(default=10, validator=_at_least(1))


@attrs.frozen
class Logging:
    """What the broker logs and where (mqttd.logs)."""

    level: str = attrs.field(default="info", converter=_lower, validator=_checked(str, _log_level))
    # text (one line: time, level, logger, message) or json (one object per line)
    format: str = attrs.field(
        default="text", converter=_lower, validator=_checked(str, _log_format)
    )
    # append to this file (reopened when moved or deleted, as by logrotate); None: stderr
    file: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    # one INFO line per client connect and per disconnect (with the reason)
    connections: bool = attrs.field(default=True, validator=_checked(bool))
    # seconds between two INFO summary lines (connections, message rates, queued, dropped,
    # store commits); 0: none
    summary_interval_s: float = attrs.field(
        default=60.0, converter=_to_float, validator=_checked(float, _not_negative_f)
    )


@attrs.frozen
class Monitoring:
    # seconds between two updates of the $SYS topics (0: no $SYS topics)
    sys_interval_s: float = attrs.field(
        default=10.0, converter=_to_float, validator=_checked(float, _not_negative_f)
    )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@attrs.frozen
class Http:
    """The operations listener (metrics, health; mqttd.server.http)."""

    enabled: bool = attrs.field(default=True, validator=_checked(bool))
    host: str = attrs.field(default="127.0.0.1", validator=_checked(str, _non_empty))
    port: int = attrs.field(default=18083, validator=_between(0, 65535))
    # a credential for requests from other hosts; without it the listener must be loopback
    token: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    # per-client metric series for the clients whose id matches (None: none; labels stay few)
    metrics_clients: str | None = attrs.field(
        default=None, validator=_optional(_checked(str, _non_empty))
    )

    def __attrs_post_init__(self) -> None:
        if self.enabled and not is_loopback(self.host) and self.token is None:
            raise _Invalid("host", (
                f"{self.host} is not a loopback address: the operations listener would be "
                "open to the network without a credential; set http.token (or keep host "
                "127.0.0.1)"
            ))


NODE_NAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
)
MAX_NODE_NAME = 64


def _node_name(v: str) -> str | None:
    if not v or len(v) > MAX_NODE_NAME or not set(v) <= NODE_NAME_CHARS:
        return (f"must be 1 to {MAX_NODE_NAME} letters, digits, '_' or '-', "
                f"got {reprlib.repr(v)}")
    return None


def default_node_name() -> str:
    """This machine's host name as a node name: its first label, with every character
    a node name cannot hold replaced by '-' (``db-1.example.com`` -> ``db-1``)."""
    import socket

    name = socket.gethostname().split(".")[0][:MAX_NODE_NAME]
    name = "".join(c if c in NODE_NAME_CHARS else "-" for c in name)
    return name or "mqttd"


def _nats_url(v: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(v if "://" in v else f"nats://{v}")
        port = parts.port
    except ValueError as exc:
        return f"not a NATS server URL ({exc}): {reprlib.repr(v)}"
    if parts.scheme != "nats" or not parts.hostname or (parts.path not in ("", "/")):
        return f"expected nats://[user:password@]host[:port], got {reprlib.repr(v)}"
    if port == 0:
        return f"port must be between 1 and 65535, got {reprlib.repr(v)}"
    return None


def _nats_urls(v: tuple[str, ...]) -> str | None:
    if not v:
        return "at least one NATS server URL is required"
    for url in v:
        problem = _type_problem(url, str) or _nats_url(url)
        if problem:
            return problem
    return None


def _fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else f"must be between 0 and 1, got {v}"


def _at_least_one_f(v: float) -> str | None:
    return None if v >= 1 else f"must be at least 1, got {v}"


def _none_or_positive_f(v: float) -> str | None:
    return None if v == -1 or v > 0 else f"must be -1 (none) or greater than 0, got {v}"


def _dead_letter_template(v: str) -> str | None:
    """``{group}`` and ``{topic}`` only, and a valid topic name once they are filled in."""
    import string

    from mqttd.topics import InvalidTopic, validate_topic_name

    try:
        fields = list(string.Formatter().parse(v))
    except ValueError as exc:
        return f"not a valid template ({exc}): {reprlib.repr(v)}"
    for _text, name, spec, conversion in fields:
        if name is not None and (name not in ("group", "topic") or spec or conversion):
            return f"may hold {{group}} and {{topic}} only, got {{{name}}} in {reprlib.repr(v)}"
    try:
        validate_topic_name(v.format(group="g", topic="t"))
    except InvalidTopic as exc:
        return f"not a valid topic name template: {exc}"
    return None


@attrs.frozen
class Cluster:
    """Cluster mode (mqttd.clustering): several nodes on NATS JetStream as one broker."""

    enabled: bool = attrs.field(default=False, validator=_checked(bool))
    # this node's name, unique in the cluster; None: the host name (default_node_name)
    node_name: str | None = attrs.field(
        default=None, validator=_optional(_checked(str, _node_name))
    )
    nats_servers: tuple[str, ...] = attrs.field(
        default=("nats://127.0.0.1:4222",), validator=_checked(tuple, _nats_urls)
    )
    # replicas of the JetStream streams and buckets (1 for a single NATS server)
    replicas: int = attrs.field(default=3, validator=_between(1, 5))
    user: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    password: str | None = attrs.field(
        default=None, validator=_optional(_checked(str, _non_empty))
    )
    token: str | None = attrs.field(default=None, validator=_optional(_checked(str, _non_empty)))
    js_timeout_s: float = attrs.field(
        default=5.0, converter=_to_float, validator=_checked(float, _positive)
    )
    heartbeat_s: float = attrs.field(
        default=1.0, converter=_to_float, validator=_checked(float, _positive)
    )
    node_dead_after_s: float = attrs.field(
        default=5.0, converter=_to_float, validator=_checked(float, _positive)
    )
    # output to NATS waiting to be sent; above it, clients' publishes are not read
    max_pending_bytes: int = attrs.field(default=8_388_608, validator=_at_least(65536))
    # shared subscriptions: a job a member's node holds unacknowledged this long (its node
    # died) goes to another member (JetStream's ack wait); live nodes renew it meanwhile
    group_ack_wait_s: float = attrs.field(
        default=10.0, converter=_to_float, validator=_checked(float, _positive)
    )

    def __attrs_post_init__(self) -> None:
        if self.group_ack_wait_s < 0.5:
            raise _Invalid("group_ack_wait_s", f"must be at least 0.5, got {self.group_ack_wait_s}")
        if self.node_dead_after_s < 2 * self.heartbeat_s:
            raise _Invalid("node_dead_after_s", (
                f"must be at least twice heartbeat_s ({self.heartbeat_s}), got "
                f"{self.node_dead_after_s}"
            ))
        if self.password is not None and self.user is None:
            raise _Invalid("password", "needs user")
        if self.token is not None and self.user is not None:
            raise _Invalid("token", "give user and password, or token, not both")

    @property
    def node(self) -> str:
        """The node name in use: ``node_name``, or the host name."""
        return self.node_name if self.node_name is not None else default_node_name()


@attrs.frozen
class GroupOverride:
    """Work-queue settings for the consumer groups whose name (the ``<group>`` of
    ``$share/<group>/<filter>``) matches ``group`` (``*``, ``?``, ``[...]``); unset keys keep
    ``work_queues``."""

    group: str = attrs.field(default="", validator=_checked(str, _non_empty))
    retry_delay_initial_s: float | None = attrs.field(
        default=None, converter=_to_float, validator=_optional(_checked(float, _positive)))
    retry_delay_max_s: float | None = attrs.field(
        default=None, converter=_to_float, validator=_optional(_checked(float, _positive)))
    retry_delay_multiplier: float | None = attrs.field(
        default=None, converter=_to_float, validator=_optional(_checked(float, _at_least_one_f)))
    retry_delay_jitter: float | None = attrs.field(
        default=None, converter=_to_float, validator=_optional(_checked(float, _fraction)))
    ack_timeout_s: float | None = attrs.field(
        default=None, converter=_to_float,
        validator=_optional(_checked(float, _none_or_positive_f)),
    )
    max_deliveries: int | None = attrs.field(default=None, validator=_optional(_at_least(1)))
    dead_letter_topic: str | None = attrs.field(
        default=None, validator=_optional(_checked(str, _dead_letter_template)))


@attrs.frozen
class WorkQueues:
    """Consumer groups as work queues (mqttd.workqueues): a negative acknowledgement is
    retried after a backoff, an ack deadline (optional) redelivers a held job, and after
    ``max_deliveries`` a job goes to the dead-letter topic. These apply to every group;
    ``group_overrides`` to some (the first match)."""

    retry_delay_initial_s: float = attrs.field(
        default=1.0, converter=_to_float, validator=_checked(float, _positive))
    retry_delay_max_s: float = attrs.field(
        default=60.0, converter=_to_float, validator=_checked(float, _positive))
    retry_delay_multiplier: float = attrs.field(
        default=2.0, converter=_to_float, validator=_checked(float, _at_least_one_f))
    retry_delay_jitter: float = attrs.field(
        default=0.5, converter=_to_float, validator=_checked(float, _fraction))
    ack_timeout_s: float = attrs.field(
        default=-1.0, converter=_to_float, validator=_checked(float, _none_or_positive_f))
    max_deliveries: int = attrs.field(default=5, validator=_at_least(1))
    dead_letter_topic: str = attrs.field(
        default="$dead/{group}/{topic}", validator=_checked(str, _dead_letter_template))
    group_overrides: tuple[GroupOverride, ...] = attrs.field(default=(), validator=_checked(tuple))

    def settings_for(self, group: str) -> WorkQueues:
        """The settings of the group named ``group``: these, with the first matching
        override applied (``group_overrides`` of the result is empty)."""
        changes: dict[str, Any] = {"group_overrides": ()}
        for override in self.group_overrides:
            if fnmatch.fnmatchcase(group, override.group):
                changes.update({
                    field.name: value for field in attrs.fields(GroupOverride)
                    if field.name != "group" and (value := getattr(override, field.name))
                    is not None
                })
                break
        return attrs.evolve(self, **changes)


@attrs.frozen
class Delayed:
    """Delayed publish: ``$delayed/<seconds>/<topic>`` is published to ``<topic>`` after the
    delay (EMQX's syntax), stored like any acknowledged message (mqttd.delayed)."""

    enabled: bool = attrs.field(default=True, validator=_checked(bool))
    max_delay_s: int = attrs.field(default=4_294_967, validator=_at_least(1))
    max_messages: int = attrs.field(
        default=100_000, validator=_checked(int, _no_limit_or_positive))


def _at_least_one(v: tuple[Any, ...]) -> str | None:
    return None if v else "at least one listener is required"


@attrs.frozen
class Config:
    listeners: tuple[Listener, ...] = attrs.field(
        default=(Listener(),), validator=_checked(tuple, _at_least_one)
    )
    limits: Limits = attrs.field(factory=Limits)
    client_overrides: tuple[ClientOverride, ...] = attrs.field(
        default=(), validator=_checked(tuple)
    )
    persistence: Persistence = attrs.field(factory=Persistence)
    security: Security = attrs.field(factory=Security)
    logging: Logging = attrs.field(factory=Logging)
    monitoring: Monitoring = attrs.field(factory=Monitoring)
    http: Http = attrs.field(factory=Http)
    bridges: tuple[Bridge, ...] = attrs.field(default=(), validator=_checked(tuple, _unique_names))
    work_queues: WorkQueues = attrs.field(factory=WorkQueues)
    delayed: Delayed = attrs.field(factory=Delayed)
    cluster: Cluster = attrs.field(factory=Cluster)

    def limits_for(self, client_id: str, persistent: bool = False) -> ClientLimits:
        """``limits`` for a clean or a ``persistent`` session of ``client_id``, with the
        first matching entry of ``client_overrides`` applied (its queue keys apply to both
        kinds of session)."""
        limits = self.limits
        values: dict[str, Any] = {
            "max_inflight_messages": limits.max_inflight_messages,
            "max_queued_messages": limits.max_queued_messages,
            "max_queued_bytes": limits.max_queued_bytes,
            "overflow_policy": limits.overflow_policy,
        }
        if persistent:
            values["max_queued_messages"] = limits.persistent_max_queued_messages
            values["max_queued_bytes"] = limits.persistent_max_queued_bytes
            values["overflow_policy"] = limits.persistent_overflow_policy
        for override in self.client_overrides:
            if override.matches(client_id):
                for key in values:
                    value = getattr(override, key)
                    if value is not None:
                        values[key] = value
                break
        return ClientLimits(**values)

    def with_overrides(
        self, host: str | None = None, port: int | None = None, data_dir: str | None = None,
        http_port: int | None = None, cluster: str | None = None,
        node_name: str | None = None,
    ) -> Config:
        """Apply command-line overrides: ``--host``/``--port`` replace the listeners with one
        listener (the first, overridden), like mosquitto's ``-p``, and leave the operations
        listener off unless ``--http-port`` is given too (brokers started from the command
        line, e.g. several on one machine, never collide on its port); ``--http-port`` turns
        it on, on that port (0: a free one); ``--data-dir`` replaces
        ``persistence.data_dir``; ``--cluster URL[,URL...]`` turns cluster mode on with these
        NATS servers; ``--node-name`` names this node."""
        try:
            config = self
            if host is not None or port is not None:
                listener = self.listeners[0]
                listener = listener if host is None else attrs.evolve(listener, host=host)
                listener = listener if port is None else attrs.evolve(listener, port=port)
                config = attrs.evolve(config, listeners=(listener,))
                config = attrs.evolve(config, http=attrs.evolve(config.http, enabled=False))
            if http_port is not None:
                config = attrs.evolve(
                    config, http=attrs.evolve(config.http, enabled=True, port=http_port)
                )
            if data_dir is not None:
                persistence = attrs.evolve(self.persistence, data_dir=data_dir)
                config = attrs.evolve(config, persistence=persistence)
            if cluster is not None:
                urls = tuple(url.strip() for url in cluster.split(",") if url.strip())
                try:
                    section = attrs.evolve(config.cluster, enabled=True, nats_servers=urls)
                except _Invalid as exc:
                    raise _Invalid("cluster", exc.problem) from None
                config = attrs.evolve(config, cluster=section)
            if node_name is not None:
                config = attrs.evolve(
                    config, cluster=attrs.evolve(config.cluster, node_name=node_name)
                )
        except _Invalid as exc:  # name the flag: --host, --port, --data-dir, --node-name
            flag = "--" + exc.name.replace("_", "-")
            raise ConfigError("command line", [(flag, exc.problem)]) from None
        return config


