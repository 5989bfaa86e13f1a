"""The retained-message store: one message per topic name, found by topic filter on SUBSCRIBE.

A tree of topic levels, one node per level. Matching a filter walks only the branches the filter
can match: a literal level follows one child, ``+`` every child, ``#`` the whole subtree. The
``$``-rule applies at the root: a first-level ``+`` or ``#`` skips the children starting with ``$``.

Whether a PUBLISH sets or deletes (an empty retained payload deletes) is the broker's decision; this
store only keeps what it is told.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import itemgetter

from mqttd.topics import is_dollar_topic, split_levels

__all__ = ["RetainedStore"]

_by_topic = itemgetter(0)


class _Node:
    __slots__ = ("children", "entry")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        # (topic, message) when a message is retained on exactly this node's topic name.
        self.entry: tuple[str, object] | None = None


class RetainedStore:
    """Retained messages keyed by topic name (in memory)."""

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _find(self, topic: str) -> _Node | None:
        node: _Node | None = self._root
        for level in split_levels(topic):
            assert node is not None
            node = node.children.get(level)
            if node is None:
                return None
        return node

    def set(self, topic: str, message: object) -> None:
        """Store or replace the retained message of ``topic`` (a valid topic name)."""
        node = self._root
        for level in split_levels(topic):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.entry is None:
            self._count += 1
        node.entry = (topic, message)

    def get(self, topic: str) -> object | None:
        node = self._find(topic)
        if node is None or node.entry is None:
            return None
        return node.entry[1]

    def delete(self, topic: str) -> bool:
        """Remove the retained message of ``topic``; True if there was one."""
        path: list[tuple[_Node, str]] = []  # (parent, level) of every node below the root
        node = self._root
        for level in split_levels(topic):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.entry is None:
            return False
        node.entry = None
        self._count -= 1
        # Prune the nodes that hold nothing any more, bottom up.
        while path and node.entry is None and not node.children:
            parent, level = path.pop()
            del parent.children[level]
            node = parent
        return True

    def match(self, filter: str) -> list[tuple[str, object]]:
        """Every (topic, message) whose topic name matches the (valid) filter, sorted by topic."""
        levels = split_levels(filter)
        n = len(levels)
        found: list[tuple[str, object]] = []
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == n:
                if node.entry is not None:
                    found.append(node.entry)
                continue
            level = levels[i]
            at_root = i == 0
            if level == "#":
                # '#' matches this node's own topic (the parent level) and everything below it.
                if node.entry is not None:
                    found.append(node.entry)
                for key, child in node.children.items():
                    if not (at_root and is_dollar_topic(key)):
                        _collect(child, found)
            elif level == "+":
                for key, child in node.children.items():
                    if not (at_root and is_dollar_topic(key)):
                        stack.append((child, i + 1))
            else:
                literal = node.children.get(level)
                if literal is not None:
                    stack.append((literal, i + 1))
        found.sort(key=_by_topic)
        return found

    def items(self) -> Iterator[tuple[str, object]]:
        """Every retained (topic, message), in no particular order."""
        found: list[tuple[str, object]] = []
        _collect(self._root, found)
        return iter(found)

    def _node_count(self) -> int:
        """The number of nodes below the root (tests use it to check pruning)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count


def _collect(node: _Node, found: list[tuple[str, object]]) -> None:
    """Append every entry of the subtree rooted at ``node`` (iteratively: topics can be deep)."""
    stack = [node]
    while stack:
        node = stack.pop()
        if node.entry is not None:
            found.append(node.entry)
        stack.extend(node.children.values())
