"""Topic names and filters as NATS subjects (mqttd.clustering.subjects): the table of
escapes, exact round trips, and that a filter's subjects cover every topic it matches."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqttd.cluster.nats_protocol import check_subject
from mqttd.clustering.subjects import (
    LIVE_PREFIX,
    MAX_SUBJECT_BYTES,
    RETAINED_PREFIX,
    filter_subjects,
    is_node_local,
    subject,
    topic_of,
)
from mqttd.topics import matches


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("a/b/c", "mqttd.t.a.b.c"),
        ("a", "mqttd.t.a"),
        ("a.b/c", "mqttd.t.a%2Eb.c"),  # a dot in a level is not a separator
        ("/a", "mqttd.t.%.a"),  # empty levels: the token %
        ("a/", "mqttd.t.a.%"),
        ("a//b", "mqttd.t.a.%.b"),
        ("/", "mqttd.t.%.%"),
        ("a b/c\td", "mqttd.t.a%20b.c%09d"),  # whitespace
        ("a\u00a0b", "mqttd.t.a%C2%A0b"),  # non-ASCII whitespace, per UTF-8 byte
        ("100%", "mqttd.t.100%25"),  # the escape character itself
        ("*/>/a*b", "mqttd.t.%2A.%3E.a%2Ab"),  # never a NATS wildcard
        ("caf\u00e9/\u00fc", "mqttd.t.caf\u00e9.\u00fc"),  # UTF-8 kept
        ("$foo/bar", "mqttd.t.$foo.bar"),  # other $ topics travel
        ("$SYSTEM/x", "mqttd.t.$SYSTEM.x"),
        ("a\x01b\x7f", "mqttd.t.a%01b%7F"),
    ],
)
def test_topic_to_subject(topic: str, expected: str) -> None:
    assert subject(LIVE_PREFIX, topic) == expected
    assert topic_of(expected, LIVE_PREFIX) == topic
    check_subject(expected)  # the client would send it


def test_retained_prefix() -> None:
    assert subject(RETAINED_PREFIX, "a/b") == "mqttd.r.a.b"
    assert topic_of("mqttd.r.a.%", RETAINED_PREFIX) == "a/"


@pytest.mark.parametrize(
    "topic", ["$SYS", "$SYS/broker/uptime", "$SYS/", "$delayed/10/a/b", "$delayed"]
)
def test_sys_topics_stay_on_the_node(topic: str) -> None:
    assert is_node_local(topic)
    assert subject(LIVE_PREFIX, topic) is None


def test_too_long_a_subject_is_not_used() -> None:
    long_topic = "x" * (MAX_SUBJECT_BYTES - len(LIVE_PREFIX))
    assert subject(LIVE_PREFIX, long_topic) == LIVE_PREFIX + long_topic
    assert subject(LIVE_PREFIX, long_topic + "y") is None
    assert subject(LIVE_PREFIX, "\u00e9" * 2000) is None  # counted in bytes
    assert filter_subjects("x" * MAX_SUBJECT_BYTES) == ()


def test_topic_of_rejects_other_subjects() -> None:
    with pytest.raises(ValueError, match="not a subject under"):
        topic_of("mqttd.r.a", LIVE_PREFIX)
    with pytest.raises(ValueError, match="not a subject under"):
        topic_of("mqttd.t.", LIVE_PREFIX)


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("a/b", ("mqttd.t.a.b",)),
        ("+", ("mqttd.t.*",)),
        ("a/+/c", ("mqttd.t.a.*.c",)),
        ("#", ("mqttd.t.>",)),
        ("a/#", ("mqttd.t.a.>", "mqttd.t.a")),  # '#' also matches the parent level
        ("+/#", ("mqttd.t.*.>", "mqttd.t.*")),
        ("/#", ("mqttd.t.%.>", "mqttd.t.%")),
        ("a.b/+", ("mqttd.t.a%2Eb.*",)),
        ("a b//#", ("mqttd.t.a%20b.%.>", "mqttd.t.a%20b.%")),
        ("$SYS/#", ()),  # each node's own
        ("$SYS/broker/+", ()),
        ("$delayed/#", ()),  # held by the node that took it, exported when due
        ("$dead/#", ("mqttd.t.$dead.>", "mqttd.t.$dead")),
        ("$delayedX/a", ("mqttd.t.$delayedX.a",)),
        ("$share/g/a/#", ("mqttd.t.a.>", "mqttd.t.a")),  # the inner filter
        ("$share/g/+", ("mqttd.t.*",)),
        ("$foo/#", ("mqttd.t.$foo.>", "mqttd.t.$foo")),
    ],
)
def test_filter_to_subjects(topic_filter: str, expected: tuple[str, ...]) -> None:
    assert filter_subjects(topic_filter) == expected
    for s in expected:
        check_subject(s, wildcards=True)


def nats_matches(pattern: str, subject_: str) -> bool:
    """NATS subject matching: ``*`` one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject_.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


levels = st.text(
    alphabet=st.sampled_from("ab.%* >/\t\u00e9\u00a0$+#"), max_size=4
).map(lambda t: t.replace("/", "").replace("+", "").replace("#", ""))
topics = st.lists(levels, min_size=1, max_size=5).map("/".join)
filter_levels = st.one_of(levels, st.just("+"))
filters = st.tuples(st.lists(filter_levels, min_size=1, max_size=4), st.booleans()).map(
    lambda t: "/".join([*t[0], "#"]) if t[1] else "/".join(t[0])
)


@given(topics)
def test_round_trip(topic: str) -> None:
    s = subject(LIVE_PREFIX, topic)
    if is_node_local(topic):
        assert s is None
        return
    assert s is not None
    check_subject(s)
    assert topic_of(s, LIVE_PREFIX) == topic


@given(filters, topics)
def test_subjects_cover_exactly_what_the_filter_matches(topic_filter: str, topic: str) -> None:
    """A message on ``topic`` reaches a node subscribed for ``topic_filter`` whenever the
    filter matches the topic, and only then (but for the $-rule, which the receiving node
    applies itself)."""
    s = subject(LIVE_PREFIX, topic)
    subs = filter_subjects(topic_filter)
    if s is None or not subs:
        return
    by_nats = any(nats_matches(p, s) for p in subs)
    if matches(topic_filter, topic):
        assert by_nats
    elif by_nats:
        assert topic.startswith("$") and topic_filter[0] in "+#"


@given(filters)
def test_filter_subjects_are_valid(topic_filter: str) -> None:
    for s in filter_subjects(topic_filter):
        check_subject(s, wildcards=True)
