import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttd.topics import (
    MAX_TOPIC_BYTES,
    InvalidTopic,
    is_dollar_topic,
    is_valid_topic_filter,
    is_valid_topic_name,
    matches,
    split_levels,
    validate_topic_filter,
    validate_topic_name,
)

VALID_NAMES = [
    "a",
    "/",
    "//",
    "/a",
    "a/",
    "sport/tennis/player1",
    "$SYS/broker/uptime",
    "$share/g/x",
    "with space/and\ttab",
    "ünïcødé/☃/𝄞",
    "a" * MAX_TOPIC_BYTES,
    "é" * (MAX_TOPIC_BYTES // 2),  # 65534 bytes
]

INVALID_NAMES = [
    ("", "empty"),
    ("+", "wildcard"),
    ("#", "wildcard"),
    ("a/+", "wildcard"),
    ("a/#", "wildcard"),
    ("a+b", "wildcard"),
    ("a#", "wildcard"),
    ("a\x00b", "U+0000"),
    ("a" * (MAX_TOPIC_BYTES + 1), "longer"),
    ("é" * (MAX_TOPIC_BYTES // 2 + 1), "longer"),  # 65536 bytes
]

VALID_FILTERS = [
    "a",
    "#",
    "+",
    "+/+",
    "/+",
    "+/",
    "a/#",
    "a/+/b",
    "+/tennis/#",
    "sport/tennis/player1/#",
    "/",
    "//#",
    "$SYS/#",
    "$share/g/x",
    "$share/g/+/#",
    "a" * MAX_TOPIC_BYTES,
    "𝄞" * (MAX_TOPIC_BYTES // 4),
]

INVALID_FILTERS = [
    ("", "empty"),
    ("a\x00", "U+0000"),
    ("a#", "whole level"),
    ("#a", "whole level"),
    ("a/#/b", "last level"),
    ("#/a", "last level"),
    ("#/#", "last level"),
    ("a/b#", "whole level"),
    ("a+", "whole level"),
    ("+a", "whole level"),
    ("a/+b/c", "whole level"),
    ("++", "whole level"),
    ("+#", "whole level"),
    ("a" * (MAX_TOPIC_BYTES + 1), "longer"),
    ("𝄞" * (MAX_TOPIC_BYTES // 4 + 1), "longer"),
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_topic_names(name: str) -> None:
    validate_topic_name(name)
    assert is_valid_topic_name(name)


@pytest.mark.parametrize(("name", "why"), INVALID_NAMES)
def test_invalid_topic_names(name: str, why: str) -> None:
    with pytest.raises(InvalidTopic, match=re.escape(why)):
        validate_topic_name(name)
    assert not is_valid_topic_name(name)


def test_length_limit_counts_utf8_bytes() -> None:
    validate_topic_name("é" * (MAX_TOPIC_BYTES // 2) + "e")  # 65535 bytes
    validate_topic_filter("é" * (MAX_TOPIC_BYTES // 2) + "e")
    with pytest.raises(InvalidTopic):
        validate_topic_name("€" * (MAX_TOPIC_BYTES // 3 + 1))  # 3 bytes each: 65538 bytes


@pytest.mark.parametrize("f", VALID_FILTERS)
def test_valid_topic_filters(f: str) -> None:
    validate_topic_filter(f)
    assert is_valid_topic_filter(f)


@pytest.mark.parametrize(("f", "why"), INVALID_FILTERS)
def test_invalid_topic_filters(f: str, why: str) -> None:
    with pytest.raises(InvalidTopic, match=re.escape(why)):
        validate_topic_filter(f)
    assert not is_valid_topic_filter(f)


def test_invalid_topic_is_a_value_error() -> None:
    assert issubclass(InvalidTopic, ValueError)


def test_split_levels_and_dollar() -> None:
    assert split_levels("a//b") == ["a", "", "b"]
    assert split_levels("/") == ["", ""]
    assert is_dollar_topic("$SYS/x")
    assert not is_dollar_topic("a/$SYS")


MATCHES = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis", False),
    ("sport/#", "sport", True),
    ("sport/#", "sport/", True),
    ("sport/#", "sports", False),
    ("#", "sport", True),
    ("#", "/", True),
    ("#", "a/b/c", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/tennis/+", "sport/tennis", False),
    ("sport/tennis/+", "sport/tennis/", True),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+", "sport", True),
    ("+", "/sport", False),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis", True),
    ("+/tennis/#", "sport/tennis/x/y", True),
    ("+/tennis/#", "sport/golf", False),
    ("+/+", "a", False),
    ("+/+", "a/b/c", False),
    # literal levels, empty levels, case
    ("a/b", "a/b", True),
    ("a/b", "a/B", False),
    ("ACCOUNTS", "Accounts", False),
    ("a/b", "a/b/", False),
    ("/", "/", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a b", "a b", True),
    # 4.7.2 topics beginning with $
    ("#", "$SYS", False),
    ("#", "$SYS/x", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("+/x", "$a/x", False),
    ("+", "$a", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/+/Clients", "$SYS/monitor/Clients", True),
    ("a/#", "a/$b", True),
    ("a/+", "a/$b", True),
    ("$share/g/x", "$share/g/x", True),
    ("#", "a$", True),
]


@pytest.mark.parametrize(("f", "topic", "expected"), MATCHES)
def test_matches(f: str, topic: str, expected: bool) -> None:
    assert is_valid_topic_filter(f)
    assert is_valid_topic_name(topic)
    assert matches(f, topic) is expected


_levels = st.sampled_from(["", "a", "b", "$SYS", "$a"])


@settings(deadline=None)  # no time limit per example: a slow machine is not a failure
@given(st.lists(_levels, min_size=1, max_size=5).map("/".join))
def test_topic_matches_itself_and_hash(topic: str) -> None:
    assert matches(topic, topic)
    assert matches("#", topic) is not topic.startswith("$")
    assert matches(topic + "/#", topic)
    levels = topic.split("/")
    assert matches("/".join(levels[:1] + ["+"] * (len(levels) - 1)), topic)
