"""MQTT topics as NATS subjects, both ways. Pure functions, no trio.

A topic name ``a/b/c`` travels on the subject ``mqttd.t.a.b.c`` (live messages, core NATS)
and is kept retained on ``mqttd.r.a.b.c`` (the stream MQTTD_RET): one MQTT level is one NATS
token. A NATS token cannot be empty and cannot hold ``.``, whitespace, or be ``*`` or ``>``
(wildcards), so a level is escaped:

* an empty level (``a//b``, ``/a``, ``a/``) is the token ``%``;
* ``%``, ``.``, ``*``, ``>``, ASCII control characters, space, DEL and any other whitespace
  are ``%XX``, one per UTF-8 byte, upper-case hex (``a.b`` -> ``a%2Eb``, ``a b`` ->
  ``a%20b``); every other character is kept as it is, UTF-8 included.

So the mapping is one to one and ``topic_of`` reverses it exactly (``%`` never appears
unescaped in a token).

Filters map the same way, with ``+`` -> ``*`` and a final ``#`` -> ``>``. ``#`` also matches
its parent level (``a/#`` matches ``a``), which ``>`` does not (it needs one token or more),
so a filter ending in ``/#`` needs two subjects: ``a/#`` -> ``mqttd.t.a.>`` and
``mqttd.t.a``. A lone ``#`` is ``mqttd.t.>`` (every topic has at least one level).

What stays on the node:

* ``$SYS`` topics are each node's own: never published to NATS, and a ``$SYS/...`` filter
  subscribes to nothing there. So are delayed publishes (``$delayed/<seconds>/<topic>``):
  the node that took one holds it and exports it when it publishes it to ``<topic>``.
  Other ``$`` topics (``$dead/...`` dead letters included) travel like any topic.
* ``$share/<group>/<filter>``: the group subscribes to its ``<filter>``'s subjects, but
  its messages come through the stream MQTTD_GQ (``mqttd.g.<name_key>``,
  :mod:`mqttd.clustering.groups`), one copy per group cluster-wide.

NATS wildcards are not MQTT's ``$``-rule: ``mqttd.t.>`` also matches ``mqttd.t.$foo``. The
subjects only have to cover what a node's filters match; the receiving node matches every
message against its own subscriptions again, as it does for a local publish, so an extra
message costs a lookup and is not delivered.

A subject longer than ``MAX_SUBJECT_BYTES`` (nats-server's control line is 4096 bytes) is
not used: such a topic stays on its node (the caller counts it).
"""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import unquote

LIVE_PREFIX = "mqttd.t."
QUEUE_PREFIX = "mqttd.q."  # + client_key: a persistent session's queue (stream MQTTD_Q)
RETAINED_PREFIX = "mqttd.r."
MAX_SUBJECT_BYTES = 3800  # leaves room in a 4096-byte control line for sid, reply, sizes
# each node's own: its $SYS tree; delayed publishes (mqttd.delayed), held by the node that
# took them and exported when they are published to their target topic
NODE_LOCAL_PREFIXES = ("$SYS", "$delayed")

_NEEDS_ESCAPE = re.compile(r"[%.*>\x00-\x20\x7f]|\s")
_EDGE_OR_EMPTY = re.compile(r"^/|//|/$")


def _escape_match(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode())


def escape_level(level: str) -> str:
    """One MQTT level as one NATS token."""
    if not level:
        return "%"
    return _NEEDS_ESCAPE.sub(_escape_match, level)


def unescape_token(token: str) -> str:
    """One NATS token back to its MQTT level."""
    if token == "%":
        return ""
    return unquote(token, errors="strict") if "%" in token else token


def is_node_local(topic: str) -> bool:
    """``$SYS`` and ``$delayed`` topics and filters: each node's own, never on NATS."""
    if not topic.startswith("$"):
        return False
    for prefix in NODE_LOCAL_PREFIXES:
        if topic.startswith(prefix) and (len(topic) == len(prefix) or topic[len(prefix)] == "/"):
            return True
    return False


def tokens(topic: str) -> str:
    """A topic name's levels as dot-separated tokens (no prefix, no length check)."""
    if topic and not _NEEDS_ESCAPE.search(topic) and not _EDGE_OR_EMPTY.search(topic):
        return topic.replace("/", ".")  # the common case: nothing to escape
    return ".".join(escape_level(level) for level in topic.split("/"))


def subject(prefix: str, topic: str) -> str | None:
    """The subject of a topic name under ``prefix`` (LIVE_PREFIX, RETAINED_PREFIX); None
    for a node-local topic or one whose subject would be too long."""
    if is_node_local(topic):
        return None
    result = prefix + tokens(topic)
    if len(result) > MAX_SUBJECT_BYTES // 4 and len(result.encode()) > MAX_SUBJECT_BYTES:
        return None
    return result


def topic_of(subject_: str, prefix: str) -> str:
    """The topic name of a subject under ``prefix`` (ValueError if it is not one)."""
    if not subject_.startswith(prefix) or len(subject_) == len(prefix):
        raise ValueError(f"not a subject under {prefix!r}: {subject_!r}")
    rest = subject_[len(prefix):]
    if "%" not in rest:
        return rest.replace(".", "/")
    return "/".join(unescape_token(token) for token in rest.split("."))


def filter_subjects(topic_filter: str, prefix: str = LIVE_PREFIX) -> tuple[str, ...]:
    """The subjects to subscribe to for a (valid) topic filter: none for a ``$SYS``
    filter or one too long, two for a filter ending in ``/#``, else one. A shared
    subscription's filter is its inner filter's."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3:
            return ()
        topic_filter = parts[2]
    if is_node_local(topic_filter):
        return ()
    levels = topic_filter.split("/")
    hash_last = levels[-1] == "#"
    if hash_last:
        levels.pop()
    mapped = ["*" if level == "+" else escape_level(level) for level in levels]
    if hash_last:
        if not mapped:
            return (prefix + ">",)
        parent = prefix + ".".join(mapped)
        subjects: tuple[str, ...] = (parent + ".>", parent)
    else:
        subjects = (prefix + ".".join(mapped),)
    if any(len(s.encode()) > MAX_SUBJECT_BYTES for s in subjects):
        return ()
    return subjects


def client_key(client_id: str) -> str:
    """A client id as one short NATS token and KV key: 26 characters of base32 (lower case)
    of its SHA-256. Client ids may hold any character, keys and tokens may not."""
    digest = hashlib.sha256(client_id.encode()).digest()
    return base64.b32encode(digest).decode()[:26].lower()


def name_key(name: str) -> str:
    """Any name (a consumer group, a group and filter) as a key: as :func:`client_key`."""
    return client_key(name)
