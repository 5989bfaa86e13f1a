"""Topic names and topic filters (MQTT 3.1.1 and 5.0, section 4.7). Pure functions, no I/O.

A *topic name* is what a PUBLISH carries; a *topic filter* is what a SUBSCRIBE carries and may hold
the wildcards ``+`` (exactly one level) and ``#`` (any number of levels, including none, as the last
level). Levels are separated by ``/``; empty levels are allowed (``/a`` has the levels ``''`` and
``'a'``).

The ``$``-rule (4.7.2): a filter whose first level is a wildcard never matches a topic name that
starts with ``$`` (``#`` does not match ``$SYS/uptime``, ``$SYS/#`` does).

Shared subscriptions (``$share/{group}/{filter}``) are not interpreted here: ``$share/g/x`` is an
ordinary filter to these functions.
"""

from __future__ import annotations

__all__ = [
    "LEVEL_SEPARATOR",
    "MAX_TOPIC_BYTES",
    "MULTI_LEVEL_WILDCARD",
    "SHARE_PREFIX",
    "SINGLE_LEVEL_WILDCARD",
    "InvalidTopic",
    "is_dollar_topic",
    "is_shared",
    "is_valid_topic_filter",
    "is_valid_topic_name",
    "matches",
    "parse_shared",
    "split_levels",
    "validate_topic_filter",
    "validate_topic_name",
]

LEVEL_SEPARATOR = "/"
SINGLE_LEVEL_WILDCARD = "+"
MULTI_LEVEL_WILDCARD = "#"
#: A UTF-8 string on the wire has a two-byte length prefix.
MAX_TOPIC_BYTES = 65535


class InvalidTopic(ValueError):
    """A topic name or topic filter breaks the rules of section 4.7; the message says which."""


def split_levels(topic: str) -> list[str]:
    """The levels of a topic name or filter: ``'a//b'`` -> ``['a', '', 'b']``."""
    return topic.split(LEVEL_SEPARATOR)


def is_dollar_topic(topic: str) -> bool:
    """True for topic names (``$SYS/...``) that first-level wildcards must not match."""
    return topic.startswith("$")


def _too_long(text: str) -> bool:
    """Whether ``text`` is longer than MAX_TOPIC_BYTES in UTF-8 (encodes only when in doubt)."""
    n = len(text)
    if n <= MAX_TOPIC_BYTES // 4:  # at most 4 bytes per code point
        return False
    if n > MAX_TOPIC_BYTES:  # at least 1 byte per code point
        return True
    # Lone surrogates are the codec's business; count them as 3 bytes rather than fail here.
    return len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES


def validate_topic_name(topic: str) -> None:
    """Raise InvalidTopic unless ``topic`` may be the topic name of a PUBLISH."""
    if not topic:
        raise InvalidTopic("topic name is empty")
    if "+" in topic or "#" in topic:
        raise InvalidTopic(f"topic name contains a wildcard character: {topic!r}")
    if "\x00" in topic:
        raise InvalidTopic("topic name contains U+0000")
    if _too_long(topic):
        raise InvalidTopic(f"topic name is longer than {MAX_TOPIC_BYTES} bytes of UTF-8")


def validate_topic_filter(filter: str) -> None:
    """Raise InvalidTopic unless ``filter`` may be the topic filter of a SUBSCRIBE."""
    if not filter:
        raise InvalidTopic("topic filter is empty")
    if "\x00" in filter:
        raise InvalidTopic("topic filter contains U+0000")
    if _too_long(filter):
        raise InvalidTopic(f"topic filter is longer than {MAX_TOPIC_BYTES} bytes of UTF-8")
    if "+" not in filter and "#" not in filter:
        return
    levels = split_levels(filter)
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                raise InvalidTopic(f"'#' must occupy a whole level: {filter!r}")
            if i != last:
                raise InvalidTopic(f"'#' must be the last level: {filter!r}")
        elif "+" in level and level != "+":
            raise InvalidTopic(f"'+' must occupy a whole level: {filter!r}")


def is_valid_topic_name(topic: str) -> bool:
    try:
        validate_topic_name(topic)
    except InvalidTopic:
        return False
    return True


def is_valid_topic_filter(f: str) -> bool:
    try:
        validate_topic_filter(f)
    except InvalidTopic:
        return False
    return True


def matches(filter: str, topic: str) -> bool:
    """Whether the (valid) topic filter matches the (valid) topic name.

    The reference matcher: a direct reading of section 4.7, kept simple on purpose. The trie and the
    retained store are tested against it.
    """
    filter_levels = split_levels(filter)
    if is_dollar_topic(topic) and filter_levels[0] in ("+", "#"):
        return False
    topic_levels = split_levels(topic)
    for i, level in enumerate(filter_levels):
        if level == "#":
            # Matches the remaining levels, including none: 'sport/#' matches 'sport'.
            return True
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


# -- shared subscriptions: $share/<group>/<filter> (MQTT 5.0 4.8.2; also taken from 3.1.1
# clients, as mosquitto does) ---------------------------------------------------------------

SHARE_PREFIX = "$share/"


def is_shared(topic_filter: str) -> bool:
    return topic_filter.startswith(SHARE_PREFIX)


def parse_shared(topic_filter: str) -> tuple[str, str]:
    """Split ``$share/<group>/<filter>`` into (group, filter); InvalidTopic when malformed
    (empty group, a wildcard in the group name, no filter, an invalid filter)."""
    rest = topic_filter[len(SHARE_PREFIX):]
    group, sep, inner = rest.partition("/")
    if not group:
        raise InvalidTopic("shared subscription with an empty share name")
    if "+" in group or "#" in group:
        raise InvalidTopic("a share name must not contain wildcards")
    if not sep or not inner:
        raise InvalidTopic("shared subscription without a topic filter")
    validate_topic_filter(inner)
    return group, inner
