"""Broker configuration: the schema (:mod:`mqttd.config_schema`, frozen attrs classes)
structured from YAML by cattrs.

Every key has a default, so an empty file (or no file) is a valid configuration. Unknown keys
(with the closest known one: ``did you mean ...?``), values of the wrong type and values out of
range are rejected; every problem is reported, not the first of a section, each with the file
and the key path, for example ``config/x.yaml: listeners[1].port: must be between 0 and 65535,
got 70000``. :mod:`mqttd.config_check` adds checks of the files and hosts a file names.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import reprlib
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import cattrs
import yaml

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
    Cluster,
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
    "Check",
    "ClientLimits",
    "ClientOverride",
    "Cluster",
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
    "Problem",
    "Security",
    "WorkQueues",
    "config_from_dict",
    "is_loopback",
    "load_config",
    "parse_config",
]


Problem = tuple[str, str]  # (key path, problem)
# a deeper check of one structured value (a listener's TLS files, a host name): problems with
# key paths relative to the value (mqttd.config_check passes them to config_from_dict)
Check = Callable[[Any], Iterable[Problem]]


class _Problems(Exception):
    """Every problem found in one value, with key paths relative to it, and the value if
    one could be built anyway (``attrs.NOTHING`` if not): an unknown key or a problem a
    deeper check found leaves a value that the checks of its parents can still look at."""

    def __init__(self, problems: list[Problem], value: Any = attrs.NOTHING) -> None:
        super().__init__(problems)
        self.problems = problems
        self.value = value


def _join(path: str, sub: str) -> str:
    if not sub:
        return path
    if not path or sub.startswith("["):
        return path + sub
    return f"{path}.{sub}"


def _structure(
    converter: cattrs.Converter, raw: Any, type_: Any, problems: list[Problem], path: str
) -> Any:
    """``raw`` structured as ``type_``; its problems are added to ``problems`` under
    ``path``. Returns ``attrs.NOTHING`` if no value could be built."""
    try:
        return converter.structure(raw, type_)
    except _Invalid as exc:
        problems.append((_join(path, exc.name), exc.problem))
    except _Problems as exc:
        problems += [(_join(path, sub), problem) for sub, problem in exc.problems]
        return exc.value
    return attrs.NOTHING


def _strict(expected: type) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _type: Any) -> Any:
        problem = _type_problem(value, expected)
        if problem:
            raise _Invalid("", problem)
        return float(value) if expected is float else value

    return structure


def _unknown_key(key: object, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def _field_value(
    converter: cattrs.Converter, field: attrs.Attribute[Any], raw: Any, problems: list[Problem]
) -> Any:
    """One key of a section: structured (type checked), converted and validated; a key
    left out is its default, validated too (a default may be a placeholder that must be
    set, like a TLS ``certfile``). Problems are added to ``problems``; returns
    ``attrs.NOTHING`` if the key has no valid value."""
    if raw is attrs.NOTHING:
        default: Any = field.default
        value = default.factory() if isinstance(default, attrs.Factory) else default  # type: ignore[arg-type]
    else:
        value = _structure(converter, raw, field.type, problems, field.name)
        if value is attrs.NOTHING:
            return value
        if field.converter is not None:
            value = field.converter(value)  # type: ignore[operator]
    if field.validator is not None:
        try:
            field.validator(None, field, value)
        except _Invalid as exc:
            problems.append((field.name, exc.problem))
            return attrs.NOTHING
    return value


def _section_hook(
    cls: type, converter: cattrs.Converter, checks: Mapping[Any, Check]
) -> Callable[[Any, Any], Any]:
    """Structure an attrs class from a mapping; ``None`` (an empty YAML section) means
    defaults. Every key is structured and validated on its own, so every bad value is
    reported, not the first; then unknown keys (with the closest field name), and once
    every key is valid the cross-key checks of ``__attrs_post_init__`` and ``checks[cls]``."""
    fields = attrs.fields(attrs.resolve_types(cls))
    names = [field.name for field in fields]
    check = checks.get(cls)

    def structure_section(value: Any, _type: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _Invalid("", f"expected a mapping, got {reprlib.repr(value)}")
        problems: list[Problem] = []
        values = {}
        for field in fields:
            raw = value.get(field.name, attrs.NOTHING)
            values[field.name] = _field_value(converter, field, raw, problems)
        problems += [(str(key), _unknown_key(key, names)) for key in value if key not in names]
        section: Any = attrs.NOTHING
        if attrs.NOTHING not in values.values():
            try:
                section = cls(**values)
            except _Invalid as exc:
                problems.append((exc.name, exc.problem))
            else:
                if check is not None:
                    problems += check(section)
        if problems:
            raise _Problems(problems, section)
        return section

    return structure_section


_LIST_DEFAULTS: dict[Any, tuple[Any, ...]] = {
    tuple[Listener, ...]: (Listener(),),
    tuple[ClientOverride, ...]: (),
    tuple[Bridge, ...]: (),
    tuple[BridgeTopic, ...]: (),
    tuple[GroupOverride, ...]: (),
}


def _list_hook(
    type_: Any, converter: cattrs.Converter, checks: Mapping[Any, Check]
) -> Callable[[Any, Any], Any]:
    """Structure a tuple of sections from a YAML list, every item (problems named by index:
    ``[1].port``); ``None`` (an empty key) means the default. ``checks[type_]`` runs on a
    list whose items are all valid."""
    (item_type, _) = typing.get_args(type_)
    default = _LIST_DEFAULTS[type_]
    check = checks.get(type_)

    def structure_list(value: Any, _type: Any) -> Any:
        if value is None:
            return default
        if not isinstance(value, list):
            raise _Invalid("", f"expected a list, got {reprlib.repr(value)}")
        problems: list[Problem] = []
        items = [
            _structure(converter, item, item_type, problems, f"[{index}]")
            for index, item in enumerate(value)
        ]
        result: Any = attrs.NOTHING
        if attrs.NOTHING not in items:
            result = tuple(items)
            if check is not None:
                problems += check(result)
        if problems:
            raise _Problems(problems, result)
        return result

    return structure_list


def _converter_with(checks: Mapping[Any, Check]) -> cattrs.Converter:
    converter = cattrs.Converter()
    for scalar in (int, float, str, bool):
        converter.register_structure_hook(scalar, _strict(scalar))
    converter.register_structure_hook_factory(
        attrs.has, lambda cls: _section_hook(cls, converter, checks)
    )
    converter.register_structure_hook_factory(
        lambda type_: type_ in _LIST_DEFAULTS, lambda type_: _list_hook(type_, converter, checks)
    )
    converter.register_structure_hook_func(lambda type_: type_ == tuple[str, ...], _strings)
    return converter


def _strings(value: Any, _type: Any) -> tuple[str, ...]:
    """A YAML list of strings (e.g. ``cluster.nats_servers``); the items are checked by
    the field's validator."""
    if not isinstance(value, list):
        raise _Invalid("", f"expected a list, got {reprlib.repr(value)}")
    return tuple(value)


_converter = _converter_with({})


def config_from_dict(
    data: Mapping[str, Any] | None, source: str = "<config>",
    checks: Mapping[Any, Check] | None = None,
) -> Config:
    """Build a Config from a parsed document; ``None`` (an empty document) gives the
    defaults. ``checks`` maps a section class (or a list type) to a deeper check of each
    valid value of it (:mod:`mqttd.config_check`). Raises :class:`ConfigError` with every
    problem found."""
    converter = _converter if not checks else _converter_with(checks)
    try:
        config: Config = converter.structure(data, Config)
    except _Invalid as exc:
        raise ConfigError(source, [(exc.name, exc.problem)]) from None
    except _Problems as exc:
        raise ConfigError(source, exc.problems) from None
    return config


def parse_config(
    text: str, source: str = "<string>", checks: Mapping[Any, Check] | None = None
) -> Config:
    """Parse YAML text; ``source`` names it in error messages."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"invalid YAML: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {exc}")]) from None
    return config_from_dict(data, source, checks)


def load_config(
    path: str | os.PathLike[str] | None, checks: Mapping[Any, Check] | None = None
) -> Config:
    """Load a YAML file; ``None`` gives the embedded default configuration."""
    if path is None:
        return Config()
    source = os.fspath(path)
    try:
        text = pathlib.Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(source, [("", f"cannot read: {problem}")]) from None
    return parse_config(text, source, checks)
