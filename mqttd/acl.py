"""Access control lists in mosquitto's file syntax: the default :class:`Authorizer`.

::

    # comment (a line whose first non-blank character is '#')
    topic read $SYS/#              # before any 'user' line: clients without a user name
    user alice                     # the lines below apply to the user name 'alice'
    topic readwrite home/alice/#
    topic deny home/alice/secret
    pattern write devices/%c/up    # every client; %c = client id, %u = user name
    pattern read devices/%u/down/#

``topic`` and ``pattern`` take ``read``, ``write``, ``readwrite`` (the default when the
word is left out) or ``deny``, then a topic filter (the rest of the line, so it may hold
spaces when the access word is given). Semantics, as mosquitto's:

* a client with a user name gets the ``topic`` lines of its ``user`` section (none if it
  has no section) and every ``pattern`` line; a client without a user name gets the
  ``topic`` lines that come before the first ``user`` line and every ``pattern`` line;
* ``%c`` and ``%u`` are substituted where they form a whole level; a pattern with ``%u``
  does not apply to a client without a user name;
* access is denied if a ``deny`` rule matches, else granted if any rule grants it;
* a subscription filter is readable if a read rule's filter covers it (matches every topic
  the subscription could match: rule ``a/#`` allows ``a/+/b``, rule ``a/+`` does not allow
  ``a/#``), and refused if a ``deny`` rule covers it. A subscription that only overlaps a
  ``deny`` rule is allowed; the denied topics are then not delivered (``can_receive``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import attrs

from mqttd.security.hooks import (
    Authorizer,
    SecurityFileError,
    read_security_file,
    security_file_problems,
)
from mqttd.topics import InvalidTopic, matches, split_levels, validate_topic_filter

log = logging.getLogger(__name__)

DENY = 0
READ = 1
WRITE = 2
READWRITE = READ | WRITE
ACCESS_WORDS = {"read": READ, "write": WRITE, "readwrite": READWRITE, "deny": DENY}
CLIENT_ID = "%c"
USERNAME = "%u"
MAX_RESOLVED = 10_000  # (client id, user name) rule sets kept resolved
MAX_CACHED = 100_000  # cached answers per kind in CachedAuthorizer


def has_wildcard(name: str | None) -> bool:
    """A client id or user name holding ``+`` or ``#`` would widen a ``%c``/``%u``
    pattern into a wildcard (CVE-2017-7650): such clients are refused everything."""
    return name is not None and ("+" in name or "#" in name)


def covers(rule: str, subscription: str) -> bool:
    """Whether the filter ``rule`` matches every topic that the filter ``subscription``
    can match (both valid filters)."""
    rule_levels = split_levels(rule)
    sub_levels = split_levels(subscription)
    if rule_levels[0] in ("+", "#") and sub_levels[0].startswith("$"):
        return False  # the subscription reaches $-topics that a leading wildcard does not
    for i, level in enumerate(rule_levels):
        if level == "#":
            return True  # covers this level and everything below it, including nothing
        if i >= len(sub_levels):
            return False  # 'a/b' does not cover 'a'
        sub_level = sub_levels[i]
        if sub_level == "#":
            # only '#' covers '#', except that every topic has a first level: '+/#' is '#'
            return i == 0 and level == "+" and rule_levels[1:] == ["#"]
        if level != "+" and (sub_level == "+" or level != sub_level):
            return False
    return len(rule_levels) == len(sub_levels)


@attrs.frozen
class Rule:
    access: int  # DENY, READ, WRITE or READWRITE
    filter: str
    line: int = 0

    @property
    def substituted(self) -> bool:
        return any(level in (CLIENT_ID, USERNAME) for level in split_levels(self.filter))

    def resolve(self, client_id: str, username: str | None) -> Rule | None:
        """This pattern for one client; None if it needs a user name the client lacks."""
        levels = split_levels(self.filter)
        if USERNAME in levels and username is None:
            return None
        resolved = [
            client_id if level == CLIENT_ID else username if level == USERNAME else level
            for level in levels
        ]
        return Rule(self.access, "/".join(resolved), self.line)  # type: ignore[arg-type]


@attrs.frozen
class RuleSet:
    """The rules that apply to one client, split for checking."""

    deny: tuple[str, ...]
    read: tuple[str, ...]
    write: tuple[str, ...]

    @classmethod
    def of(cls, rules: Iterable[Rule]) -> RuleSet:
        rules = list(rules)
        return cls(
            tuple(r.filter for r in rules if r.access == DENY),
            tuple(r.filter for r in rules if r.access & READ),
            tuple(r.filter for r in rules if r.access & WRITE),
        )



@attrs.define(eq=False)
class AclFile:
    """A parsed ACL file: the default :class:`~mqttd.security.hooks.Authorizer`."""

    source: str
    anonymous: tuple[Rule, ...] = ()
    users: dict[str, tuple[Rule, ...]] = attrs.Factory(dict)
    patterns: tuple[Rule, ...] = ()
    _resolved: dict[tuple[str, str | None], RuleSet] = attrs.field(init=False, factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AclFile:
        """Raises :class:`SecurityFileError` (the first bad line) if the file is unusable."""
        source = os.fspath(path)
        return cls.parse(read_security_file(source, "ACL file"), source)

    @classmethod
    def parse(cls, text: str, source: str = "<acl file>") -> AclFile:
        acl, problems = cls.parse_all(text, source)
        if problems:
            raise problems[0]
        return acl

    @classmethod
    def parse_all(
        cls, text: str, source: str = "<acl file>"
    ) -> tuple[AclFile, list[SecurityFileError]]:
        """The rules that parse, and the problem of every line that does not."""
        anonymous: list[Rule] = []
        users: dict[str, list[Rule]] = {}
        patterns: list[Rule] = []
        current: list[Rule] = anonymous
        problems = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, *tail = line.split(None, 1)
            rest = tail[0] if tail else ""
            try:
                if keyword == "user":
                    if not rest:
                        raise SecurityFileError(source, "'user' needs a user name", number)
                    current = users.setdefault(rest, [])
                elif keyword in ("topic", "pattern"):
                    rule = _parse_rule(keyword, rest, source, number)
                    (patterns if keyword == "pattern" else current).append(rule)
                else:
                    raise SecurityFileError(
                        source,
                        f"unknown keyword {keyword!r} (expected 'topic', 'user' or 'pattern')",
                        number,
                    )
            except SecurityFileError as exc:
                problems.append(exc)
        acl = cls(
            source,
            tuple(anonymous),
            {name: tuple(rules) for name, rules in users.items()},
            tuple(patterns),
        )
        return acl, problems

    @classmethod
    def problems(cls, path: str | os.PathLike[str]) -> list[SecurityFileError]:
        """Every problem of the file at ``path``: unreadable, or each bad line."""
        return security_file_problems(cls.parse_all, path, "ACL file")

    def __len__(self) -> int:
        return len(self.anonymous) + sum(map(len, self.users.values())) + len(self.patterns)

    def rules_for(self, client_id: str, username: str | None) -> RuleSet:
        key = (client_id, username)
        found = self._resolved.get(key)
        if found is None:
            own = self.anonymous if username is None else self.users.get(username, ())
            resolved = [p.resolve(client_id, username) for p in self.patterns]
            found = RuleSet.of([*own, *(r for r in resolved if r is not None)])
            if len(self._resolved) >= MAX_RESOLVED:
                self._resolved.clear()
            self._resolved[key] = found
        return found

    def _topic_allowed(self, rules: RuleSet, grants: tuple[str, ...], topic: str) -> bool:
        if any(matches(f, topic) for f in rules.deny):
            return False
        return any(matches(f, topic) for f in grants)

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        if has_wildcard(client_id) or has_wildcard(username):
            return False
        rules = self.rules_for(client_id, username)
        return self._topic_allowed(rules, rules.write, topic)

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        if has_wildcard(client_id) or has_wildcard(username):
            return False
        rules = self.rules_for(client_id, username)
        return self._topic_allowed(rules, rules.read, topic)

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        if has_wildcard(client_id) or has_wildcard(username):
            return False
        rules = self.rules_for(client_id, username)
        if any(covers(f, topic_filter) for f in rules.deny):
            return False
        return any(covers(f, topic_filter) for f in rules.read)


def _parse_rule(keyword: str, rest: str, source: str, number: int) -> Rule:
    if not rest:
        raise SecurityFileError(source, f"'{keyword}' needs a topic", number)
    word, *after = rest.split(None, 1)
    if word in ACCESS_WORDS:
        access, topic = ACCESS_WORDS[word], after[0] if after else ""
    else:
        access, topic = READWRITE, rest
    if not topic:
        raise SecurityFileError(source, f"'{keyword}' needs a topic", number)
    try:
        validate_topic_filter(topic)
    except InvalidTopic as exc:
        raise SecurityFileError(source, f"invalid topic filter: {exc}", number) from None
    rule = Rule(access, topic, number)
    if keyword == "topic" and rule.substituted:
        log.warning(
            "%s:%d: %%c/%%u are only substituted in 'pattern' lines; this 'topic' line "
            "matches them literally", source, number,
        )
    return rule


class CachedAuthorizer:
    """Wraps an :class:`Authorizer`: refuses clients whose id or user name holds a
    wildcard, and remembers ``can_publish`` and ``can_receive`` answers per (client id,
    user name, topic) so that repeated topics cost one dict lookup. Each cache holds at
    most ``max_entries`` answers (cleared when full); :meth:`clear` forgets all."""

    def __init__(self, inner: Authorizer, max_entries: int = MAX_CACHED) -> None:
        self.inner = inner
        self.max_entries = max_entries
        self._publish: dict[tuple[str, str | None, str], bool] = {}
        self._receive: dict[tuple[str, str | None, str], bool] = {}

    def clear(self) -> None:
        self._publish.clear()
        self._receive.clear()

    def _cached(
        self,
        cache: dict[tuple[str, str | None, str], bool],
        check: object,
        client_id: str,
        username: str | None,
        topic: str,
    ) -> bool:
        key = (client_id, username, topic)
        answer = cache.get(key)
        if answer is None:
            if has_wildcard(client_id) or has_wildcard(username):
                answer = False
            else:
                answer = bool(check(client_id, username, topic))  # type: ignore[operator]
            if len(cache) >= self.max_entries:
                cache.clear()
            cache[key] = answer
        return answer

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        return self._cached(self._publish, self.inner.can_publish, client_id, username, topic)

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        return self._cached(self._receive, self.inner.can_receive, client_id, username, topic)

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        if has_wildcard(client_id) or has_wildcard(username):
            return False
        return bool(self.inner.can_subscribe(client_id, username, topic_filter))
