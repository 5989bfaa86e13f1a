"""Broker configuration: the schema (:mod:`mqttd.config_schema`, frozen attrs classes)
structured from YAML by cattrs.

Every key has a default, so an empty file (or no file) is a valid configuration. Unknown keys
and values of the wrong type are rejected; every error names the file and the key path, for
example ``config/x.yaml: limits.max_inflight_messages: expected int, got 'abc'``.
"""

from __future__ import annotations

import os
import pathlib
import reprlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import cattrs
import yaml
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import (
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn

from mqttd.config_schema import (  # the schema, re-exported: import it from here
    BRIDGE_DIRECTIONS,
    BRIDGE_PREFIX,
    DURABILITY_LEVELS,
    LOG_LEVELS,
    LOOPBACK_HOSTS,
    MEMORY_DB,
    MQTT_MAX_PACKET_SIZE_BYTES,
    OVERFLOW_POLICIES,
    PROTOCOLS,
    TLS,
    Bridge,
    BridgeTLS,
    BridgeTopic,
    ClientLimits,
    ClientOverride,
    Config,
    ConfigError,
    Delayed,
    GroupOverride,
    Http,
    Limits,
    Listener,
    Logging,
    Monitoring,
    Persistence,
    Security,
    WorkQueues,
    _Invalid,
    _type_problem,
    is_loopback,
)

__all__ = [
    "BRIDGE_DIRECTIONS",
    "BRIDGE_PREFIX",
    "DURABILITY_LEVELS",
    "LOG_LEVELS",
    "LOOPBACK_HOSTS",
    "MEMORY_DB",
    "MQTT_MAX_PACKET_SIZE_BYTES",
    "OVERFLOW_POLICIES",
    "PROTOCOLS",
    "TLS",
    "Bridge",
    "BridgeTLS",
    "BridgeTopic",
    "ClientLimits",
    "ClientOverride",
    "Config",
    "ConfigError",
    "Delayed",
    "GroupOverride",
    "Http",
    "Limits",
    "Listener",
    "Logging",
    "Monitoring",
    "Persistence",
    "Security",
    "WorkQueues",
    "config_from_dict",
    "is_loopback",
    "load_config",
    "parse_config",
]


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _strict(expected: type) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _type: Any) -> Any:
        problem = _type_problem(value, expected)
        if problem:
            raise _Invalid("", problem)
        return float(value) if expected is float else value

    return structure


for _scalar in (int, float, str, bool):
    _converter.register_structure_hook(_scalar, _strict(_scalar))


def _section_hook(cls: type) -> Callable[[Any, Any], Any]:
    """Structure an attrs class from a mapping; ``None`` (an empty YAML section) means defaults."""
    structure: Callable[[Any, Any], Any] = make_dict_structure_fn(cls, _converter)

    def structure_section(value: Any, _type: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _Invalid("", f"expected a mapping, got {reprlib.repr(value)}")
        return structure(value, cls)

    return structure_section


_converter.register_structure_hook_factory(attrs.has, _section_hook)


_LIST_DEFAULTS: dict[Any, tuple[Any, ...]] = {
    tuple[Listener, ...]: (Listener(),),
    tuple[ClientOverride, ...]: (),
    tuple[Bridge, ...]: (),
    tuple[BridgeTopic, ...]: (),
    tuple[GroupOverride, ...]: (),
}


def _list_hook(type_: Any) -> Callable[[Any, Any], Any]:
    """Structure a tuple of sections from a YAML list; ``None`` (an empty key) means default."""
    structure = homogenous_tuple_structure_factory(type_, _converter)
    default = _LIST_DEFAULTS[type_]

    def structure_list(value: Any, _type: Any) -> Any:
        if value is None:
            return default
        if not isinstance(value, list):
            raise _Invalid("", f"expected a list, got {reprlib.repr(value)}")
        return structure(value, type_)

    return structure_list


_converter.register_structure_hook_factory(lambda type_: type_ in _LIST_DEFAULTS, _list_hook)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _problems(exc: BaseException, path: str) -> Iterator[tuple[str, str]]:
    """Walk cattrs' nested validation errors, yielding (key path, problem) pairs."""
    if isinstance(exc, ClassValidationError):
        with_notes, others = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _problems(sub, _join(path, note.name))
        for sub in others:
            yield from _problems(sub, path)
    elif isinstance(exc, IterableValidationError):
        with_index, others = exc.group_exceptions()
        for sub, index_note in with_index:
            yield from _problems(sub, f"{path}[{index_note.index}]")
        for sub in others:
            yield from _problems(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields, key=str):
            yield _join(path, key), "unknown key"
    elif isinstance(exc, _Invalid):
        yield (_join(path, exc.name) if exc.name else path), exc.problem
    else:
        yield path, str(exc)


def config_from_dict(data: Mapping[str, Any] | None, source: str = "<config>") -> Config:
    """Build a Config from a parsed document; ``None`` (an empty document) gives the defaults."""
    try:
        return _converter.structure(data, Config)
    except (BaseValidationError, _Invalid) as exc:
        raise ConfigError(source, list(_problems(exc, ""))) from None


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse YAML text; ``source`` names it in error messages."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"invalid YAML: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {exc}")]) from None
    return config_from_dict(data, source)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a YAML file; ``None`` gives the embedded default configuration."""
    if path is None:
        return Config()
    source = os.fspath(path)
    try:
        text = pathlib.Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(source, [("", f"cannot read: {problem}")]) from None
    return parse_config(text, source)
