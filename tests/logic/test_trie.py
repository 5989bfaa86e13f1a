import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mqttd.topics import InvalidTopic, matches
from mqttd.trie import SubscriptionTrie


class Sub:
    """A stand-in for a Session: compared by identity, named for readable failures."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Sub({self.name})"


CLIENTS = ["c1", "c2", "c3"]
SUBS = {c: Sub(c) for c in CLIENTS}


def named(result: list[tuple[object, int, object]]) -> list[tuple[str, int]]:
    names = [(s.name, qos) for s, qos, _options in result]  # type: ignore[attr-defined]
    assert len({n for n, _ in names}) == len(names), f"a client appears twice: {names}"
    return sorted(names)


def naive(subscriptions: dict[tuple[str, str], int], topic: str) -> list[tuple[str, int]]:
    best: dict[str, int] = {}
    for (f, client_id), qos in subscriptions.items():
        if matches(f, topic) and qos >= best.get(client_id, -1):
            best[client_id] = qos
    return sorted(best.items())


def trie_nodes(subscriptions: dict[tuple[str, str], int]) -> int:
    """The nodes a pruned trie needs: the distinct filter prefixes, a trailing '#' excluded."""
    prefixes = set()
    for f, _ in subscriptions:
        levels = f.split("/")
        if levels[-1] == "#":
            levels.pop()
        prefixes.update(tuple(levels[:i]) for i in range(1, len(levels) + 1))
    return len(prefixes)


filter_levels = st.sampled_from(["", "$SYS", "a", "b", "+"])
topic_levels = st.sampled_from(["", "$SYS", "a", "b"])
filters = st.builds(
    lambda levels, hash_: "/".join([*levels, "#"] if hash_ else levels),
    st.lists(filter_levels, max_size=3),
    st.booleans(),
).filter(bool)
topics = st.lists(topic_levels, min_size=1, max_size=4).map("/".join)
clients = st.sampled_from(CLIENTS)
qoses = st.integers(0, 2)


class TrieMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.trie = SubscriptionTrie()
        self.model: dict[tuple[str, str], int] = {}

    @rule(f=filters, client_id=clients, qos=qoses)
    def add(self, f: str, client_id: str, qos: int) -> None:
        new = (f, client_id) not in self.model
        assert self.trie.add(f, client_id, SUBS[client_id], qos) is new
        self.model[(f, client_id)] = qos

    @rule(f=filters, client_id=clients)
    def remove(self, f: str, client_id: str) -> None:
        existed = self.model.pop((f, client_id), None) is not None
        assert self.trie.remove(f, client_id) is existed

    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        if not self.model:
            return
        f, client_id = data.draw(st.sampled_from(sorted(self.model)))
        del self.model[(f, client_id)]
        assert self.trie.remove(f, client_id)

    @rule(client_id=clients, extra=st.lists(filters, max_size=2))
    def remove_client(self, client_id: str, extra: list[str]) -> None:
        mine = [f for f, c in self.model if c == client_id]
        self.trie.remove_client(client_id, mine + extra)
        for f in mine:
            del self.model[(f, client_id)]

    @rule(topic=topics)
    def match(self, topic: str) -> None:
        expected = naive(self.model, topic)
        assert named(self.trie.match(topic)) == expected
        assert named(self.trie.match(topic)) == expected  # the cached answer

    @invariant()
    def sizes(self) -> None:
        assert len(self.trie) == len(self.model)
        assert sorted(self.trie.filters()) == sorted({f for f, _ in self.model})
        assert self.trie._node_count() == trie_nodes(self.model)


TrieMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_trie_against_naive_matcher = TrieMachine.TestCase


def make(*subscriptions: tuple[str, str, int]) -> SubscriptionTrie:
    trie = SubscriptionTrie()
    for f, client_id, qos in subscriptions:
        trie.add(f, client_id, SUBS[client_id], qos)
    return trie


OVERLAPPING = [
    # (subscriptions, topic, expected)
    ([("a/+", "c1", 0), ("a/#", "c1", 2), ("#", "c1", 1)], "a/b", [("c1", 2)]),
    ([("a/+", "c1", 1), ("a/b", "c1", 0)], "a/b", [("c1", 1)]),
    ([("a/+", "c1", 1), ("a/c", "c1", 2)], "a/b", [("c1", 1)]),  # non-matching 2 ignored
    ([("a/#", "c1", 0), ("a", "c1", 1)], "a", [("c1", 1)]),
    ([("+/+", "c1", 0), ("+/#", "c1", 0), ("#", "c1", 0)], "x/y", [("c1", 0)]),
    (
        [("a/+", "c1", 0), ("a/#", "c2", 2), ("#", "c3", 1)],
        "a/b",
        [("c1", 0), ("c2", 2), ("c3", 1)],
    ),
    ([("#", "c1", 2), ("$SYS/#", "c1", 0)], "$SYS/x", [("c1", 0)]),  # '#' does not match $SYS
    ([("+/x", "c1", 2), ("$a/+", "c2", 1)], "$a/x", [("c2", 1)]),
    ([("sport/#", "c1", 1)], "sport", [("c1", 1)]),
    ([("+/+", "c1", 1), ("/+", "c2", 2), ("+", "c3", 0)], "/finance", [("c1", 1), ("c2", 2)]),
    ([("a", "c1", 1)], "b", []),
]


@pytest.mark.parametrize(("subscriptions", "topic", "expected"), OVERLAPPING)
def test_overlapping_subscriptions_deliver_once_at_highest_qos(
    subscriptions: list[tuple[str, str, int]], topic: str, expected: list[tuple[str, int]]
) -> None:
    assert named(make(*subscriptions).match(topic)) == expected


def test_cache_is_invalidated_by_every_change() -> None:
    trie = make(("a/+", "c1", 0))
    first = trie.match("a/b")
    assert named(first) == [("c1", 0)]
    assert trie.match("a/b") is first  # cached
    trie.add("a/#", "c2", SUBS["c2"], 1)
    assert named(trie.match("a/b")) == [("c1", 0), ("c2", 1)]
    trie.add("a/b", "c1", SUBS["c1"], 2)
    assert named(trie.match("a/b")) == [("c1", 2), ("c2", 1)]
    trie.add("a/b", "c1", SUBS["c1"], 1)  # replace: the QoS goes down
    assert named(trie.match("a/b")) == [("c1", 1), ("c2", 1)]
    trie.remove("a/b", "c1")
    assert named(trie.match("a/b")) == [("c1", 0), ("c2", 1)]
    trie.remove_client("c2", ["a/#", "x"])
    assert named(trie.match("a/b")) == [("c1", 0)]
    trie.remove_client("c1", ["a/+"])
    assert trie.match("a/b") == []
    assert len(trie) == 0
    assert trie._node_count() == 0


def test_add_returns_new_and_replaces_subscriber() -> None:
    trie = SubscriptionTrie()
    old, new = Sub("old"), Sub("new")
    assert trie.add("a", "c1", old, 1) is True
    assert trie.match("a") == [(old, 1, None)]
    assert trie.add("a", "c1", old, 1) is False  # identical: no change
    assert trie.add("a", "c1", new, 1) is False
    assert trie.match("a") == [(new, 1, None)]
    assert len(trie) == 1
    assert trie.remove("a", "c1") is True
    assert trie.remove("a", "c1") is False
    assert trie.remove("a/#/b", "c1") is False  # invalid filters are simply absent
    assert trie.remove("nothing/here", "c1") is False


@pytest.mark.parametrize("bad", ["", "a#", "a/#/b", "+a", "a\x00"])
def test_add_rejects_invalid_filters(bad: str) -> None:
    trie = SubscriptionTrie()
    with pytest.raises(InvalidTopic):
        trie.add(bad, "c1", SUBS["c1"], 0)
    assert len(trie) == 0
    assert trie._node_count() == 0


def test_cache_is_bounded() -> None:
    trie = SubscriptionTrie(cache_size=4)
    trie.add("#", "c1", SUBS["c1"], 0)
    for i in range(10):
        assert named(trie.match(f"t/{i}")) == [("c1", 0)]
        assert len(trie._cache) <= 4
    trie = SubscriptionTrie(cache_cost=100)
    trie.add("#", "c1", SUBS["c1"], 0)
    for i in range(10):
        assert named(trie.match(f"{i}/" + "x" * 320)) == [("c1", 0)]  # cost 22 each
        assert len(trie._cache) <= 4


def test_deep_topics_do_not_recurse() -> None:
    depth = 5000
    topic = "/".join(["a"] * depth)
    trie = make(("/".join(["+"] * depth), "c1", 1), ("/".join(["a"] * 100 + ["#"]), "c2", 0))
    trie.add("/".join(["+"] * (depth - 1) + ["#"]), "c3", SUBS["c3"], 2)
    assert named(trie.match(topic)) == [("c1", 1), ("c2", 0), ("c3", 2)]
    assert named(trie.match(topic + "/b")) == [("c2", 0), ("c3", 2)]


def test_filters_lists_each_subscribed_filter_once() -> None:
    trie = make(
        ("a/+", "c1", 0), ("a/+", "c2", 0), ("#", "c1", 0), ("a/b/#", "c3", 1), ("/", "c1", 0)
    )
    assert sorted(trie.filters()) == ["#", "/", "a/+", "a/b/#"]
    assert len(trie) == 5


class _Watcher:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def filter_added(self, filter: str) -> None:
        self.events.append(("+", filter))

    def filter_removed(self, filter: str) -> None:
        self.events.append(("-", filter))


def test_watcher_sees_each_distinct_filter_come_and_go() -> None:
    trie = SubscriptionTrie()
    watcher = trie.watcher = _Watcher()
    trie.add("a/#", "c1", "s1", 0)
    trie.add("a/#", "c2", "s2", 1)  # a second subscriber: no new filter
    trie.add("a/#", "c1", "s1", 2)  # replaced: nothing
    trie.add("a", "c1", "s1", 0)  # the parent level is another filter
    trie.add("a/+", "c1", "s1", 0)
    assert watcher.events == [("+", "a/#"), ("+", "a"), ("+", "a/+")]
    watcher.events.clear()
    trie.remove("a/#", "c1")
    assert watcher.events == []
    trie.remove("a/#", "c2")
    trie.remove("a/#", "c2")  # not there: nothing
    trie.remove_client("c1", ["a", "a/+", "b"])
    assert watcher.events == [("-", "a/#"), ("-", "a"), ("-", "a/+")]
    assert len(trie) == 0
