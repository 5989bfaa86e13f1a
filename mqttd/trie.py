"""The subscription trie: which sessions want a message published on a given topic name.

One node per filter level. A node keeps its literal children in a dict, its ``+`` child in a slot
of its own, and the subscribers of ``<path>/#`` directly in ``hash_subscribers`` (``#`` is always
the last level, so it needs no node). Subscribers are a dict ``client_id -> (subscriber, qos)``; the
tuple stored there is the one ``match`` returns, so a match creates no object per subscriber.

``match(topic)`` is on the hot path of every PUBLISH, and IoT topic names repeat, so its results
are cached per topic name; any change to the subscriptions clears the cache.

A ``watcher`` (cluster mode) is told when a filter gets its first subscriber and when it loses its
last one, so that it can hold one interest per distinct filter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from mqttd.subscriptions import SubOptions
from mqttd.topics import is_dollar_topic, split_levels, validate_topic_filter

__all__ = ["FilterWatcher", "Match", "SubscriptionTrie"]

#: One match entry: the subscriber object given to ``add``, the QoS to deliver at, and the
#: MQTT 5.0 options that change a delivery (None for most subscriptions).
Match = tuple[object, int, "SubOptions | None"]

#: Default bounds of the match cache; the cache is cleared when either is reached. The size is
#: counted in topics; the cost adds the entries of every cached result and the length of every
#: cached topic name / 16, so that many wide results or long topic names cannot grow it unbounded.
DEFAULT_CACHE_SIZE = 16384
DEFAULT_CACHE_COST = 1 << 20


class FilterWatcher(Protocol):
    def filter_added(self, filter: str) -> None: ...

    def filter_removed(self, filter: str) -> None: ...


class _Node:
    __slots__ = ("children", "hash_subscribers", "plus", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.hash_subscribers: dict[str, Match] = {}
        self.subscribers: dict[str, Match] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.plus or self.hash_subscribers or self.subscribers)


def _merge(out: dict[str, Match], subscribers: dict[str, Match]) -> None:
    """Add ``subscribers`` to ``out``, keeping the highest QoS per client id (and, for 5.0
    subscriptions, the merged options: every subscription identifier)."""
    if not out:
        out.update(subscribers)
        return
    for client_id, entry in subscribers.items():
        previous = out.get(client_id)
        if previous is None:
            out[client_id] = entry
        elif entry[2] is None and previous[2] is None:
            if entry[1] > previous[1]:
                out[client_id] = entry
        else:
            options = entry[2].merged(previous[2]) if entry[2] is not None else (
                previous[2].merged(None)  # type: ignore[union-attr]
            )
            out[client_id] = (entry[0], max(entry[1], previous[1]), options)


class SubscriptionTrie:
    """Subscriptions keyed by (topic filter, client id), matched against topic names."""

    __slots__ = (
        "_cache", "_cache_cost", "_cache_size", "_count", "_max_cache_cost", "_root", "watcher",
    )

    def __init__(
        self, cache_size: int = DEFAULT_CACHE_SIZE, cache_cost: int = DEFAULT_CACHE_COST
    ) -> None:
        self._root = _Node()
        self._count = 0
        self._cache: dict[str, list[Match]] = {}
        self._cache_size = cache_size
        self._cache_cost = 0
        self._max_cache_cost = cache_cost
        self.watcher: FilterWatcher | None = None

    def __len__(self) -> int:
        """The number of (filter, client id) subscriptions."""
        return self._count

    def add(
        self,
        filter: str,
        client_id: str,
        subscriber: object,
        qos: int,
        options: SubOptions | None = None,
    ) -> bool:
        """Add or replace ``client_id``'s subscription on exactly ``filter``.

        Returns True if the subscription is new, False if it replaced one. Raises InvalidTopic for
        an invalid filter (callers validate first; this keeps the trie's shape sound regardless).
        """
        validate_topic_filter(filter)
        levels = split_levels(filter)
        node = self._root
        hash_last = levels[-1] == "#"
        if hash_last:
            levels.pop()
        for level in levels:
            if level == "+":
                child = node.plus
                if child is None:
                    child = node.plus = _Node()
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
            node = child
        subscribers = node.hash_subscribers if hash_last else node.subscribers
        previous = subscribers.get(client_id)
        if (
            previous is not None and previous[0] is subscriber and previous[1] == qos
            and previous[2] == options
        ):
            return False  # nothing changes, the cache stays valid
        first = not subscribers
        subscribers[client_id] = (subscriber, qos, options)
        self._invalidate()
        if previous is None:
            self._count += 1
            if first and self.watcher is not None:
                self.watcher.filter_added(filter)
            return True
        return False

    def remove(self, filter: str, client_id: str) -> bool:
        """Remove ``client_id``'s subscription on exactly ``filter``; True if it existed."""
        levels = split_levels(filter)
        hash_last = levels[-1] == "#"
        if hash_last:
            levels.pop()
        path: list[tuple[_Node, str]] = []  # (parent, level) for every node below the root
        node = self._root
        for level in levels:
            child = node.plus if level == "+" else node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        subscribers = node.hash_subscribers if hash_last else node.subscribers
        if subscribers.pop(client_id, None) is None:
            return False
        self._count -= 1
        self._invalidate()
        if not subscribers and self.watcher is not None:
            self.watcher.filter_removed(filter)
        # Prune the nodes that hold nothing any more, bottom up.
        while path and node.is_empty():
            parent, level = path.pop()
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]
            node = parent
        return True

    def remove_client(self, client_id: str, filters: Iterable[str]) -> None:
        """Remove ``client_id``'s subscriptions on the given filters (missing ones are ignored)."""
        for f in filters:
            self.remove(f, client_id)

    def match(self, topic: str) -> list[Match]:
        """Every subscriber whose filter matches the topic name, once per client id.

        A client with overlapping matching subscriptions appears once, at the highest QoS among
        them. The order is unspecified. The returned list is shared with the cache: callers must
        not mutate it. ``topic`` must be a valid topic name (no wildcards).
        """
        cache = self._cache
        cached = cache.get(topic)
        if cached is not None:
            return cached

        levels = split_levels(topic)
        n = len(levels)
        out: dict[str, Match] = {}
        node: _Node | None = self._root
        i = 0
        if is_dollar_topic(topic):
            # The $-rule: first-level wildcards ('+', '#') of the root do not match.
            node = self._root.children.get(levels[0])
            i = 1
        pending: list[tuple[_Node, int]] = []  # '+' branches still to walk
        while True:
            # Follow literal levels iteratively; only '+' branches are deferred.
            while node is not None:
                if node.hash_subscribers:
                    _merge(out, node.hash_subscribers)  # '#' also matches the parent level
                if i == n:
                    if node.subscribers:
                        _merge(out, node.subscribers)
                    break
                if node.plus is not None:
                    pending.append((node.plus, i + 1))
                node = node.children.get(levels[i])
                i += 1
            if not pending:
                break
            node, i = pending.pop()

        result = list(out.values())
        cost = self._cache_cost + len(result) + (len(topic) >> 4) + 1
        if len(cache) >= self._cache_size or cost > self._max_cache_cost:
            cache.clear()
            cost = len(result) + (len(topic) >> 4) + 1
        cache[topic] = result
        self._cache_cost = cost
        return result

    def _invalidate(self) -> None:
        self._cache.clear()
        self._cache_cost = 0

    def filters(self) -> Iterator[str]:
        """Every filter with at least one subscription (for debugging; order unspecified)."""
        stack: list[tuple[_Node, list[str]]] = [(self._root, [])]
        while stack:
            node, prefix = stack.pop()
            if node.subscribers:
                yield "/".join(prefix)
            if node.hash_subscribers:
                yield "/".join([*prefix, "#"])
            if node.plus is not None:
                stack.append((node.plus, [*prefix, "+"]))
            for level, child in node.children.items():
                stack.append((child, [*prefix, level]))

    def _node_count(self) -> int:
        """The number of nodes below the root (tests use it to check pruning)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            children = list(node.children.values())
            if node.plus is not None:
                children.append(node.plus)
            count += len(children)
            stack.extend(children)
        return count
