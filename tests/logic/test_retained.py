from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mqttd.retained import RetainedStore
from mqttd.topics import matches


def store_with(*topics: str) -> RetainedStore:
    store = RetainedStore()
    for t in topics:
        store.set(t, f"m:{t}")
    return store


def test_set_replace_get_delete() -> None:
    store = RetainedStore()
    assert len(store) == 0
    assert store.get("a/b") is None
    store.set("a/b", "one")
    assert store.get("a/b") == "one"
    assert store.get("a") is None  # an inner node holds no message
    assert store.get("a/b/c") is None
    store.set("a/b", "two")
    assert store.get("a/b") == "two"
    assert len(store) == 1
    store.set("a", "parent")
    assert len(store) == 2
    assert store.delete("a/b") is True
    assert store.delete("a/b") is False
    assert store.delete("x/y") is False
    assert store.get("a/b") is None
    assert store.get("a") == "parent"
    assert list(store.items()) == [("a", "parent")]
    assert len(store) == 1


def test_delete_prunes_empty_nodes() -> None:
    store = store_with("a/b/c/d", "a/b", "a/x", "/", "$SYS/uptime")
    assert store._node_count() == 9  # a b c d x, '' '', $SYS uptime
    assert store.delete("a/b/c/d")
    assert store._node_count() == 7  # c and d pruned; b keeps its message
    assert store.delete("a/b")
    assert store.delete("a/x")
    assert store._node_count() == 4
    assert store.delete("/")
    assert store.delete("$SYS/uptime")
    assert store._node_count() == 0
    assert store._root.children == {}
    assert len(store) == 0


def test_delete_of_inner_node_without_message_keeps_children() -> None:
    store = store_with("a/b")
    assert store.delete("a") is False
    assert store.get("a/b") == "m:a/b"
    assert store._node_count() == 2


def test_match_spec_examples_and_dollar_rule() -> None:
    store = store_with(
        "sport", "sport/tennis/player1", "sport/tennis/player1/ranking", "sport/tennis/player2",
        "/finance", "$SYS/uptime", "$SYS", "$a/x", "a/$b",
    )

    def topics(f: str) -> list[str]:
        return [t for t, _ in store.match(f)]
    assert topics("sport/tennis/player1/#") == [
        "sport/tennis/player1", "sport/tennis/player1/ranking",
    ]
    assert topics("sport/#") == [
        "sport", "sport/tennis/player1", "sport/tennis/player1/ranking", "sport/tennis/player2",
    ]
    assert topics("sport/tennis/+") == ["sport/tennis/player1", "sport/tennis/player2"]
    assert topics("sport/+") == []
    assert topics("+") == ["sport"]
    assert topics("+/+") == ["/finance", "a/$b"]
    assert topics("/+") == ["/finance"]
    assert topics("#") == [
        "/finance", "a/$b", "sport", "sport/tennis/player1", "sport/tennis/player1/ranking",
        "sport/tennis/player2",
    ]
    assert topics("$SYS/#") == ["$SYS", "$SYS/uptime"]
    assert topics("$SYS/+") == ["$SYS/uptime"]
    assert topics("+/x") == []
    assert topics("$a/+") == ["$a/x"]
    assert topics("a/+") == ["a/$b"]
    assert topics("nothing/#") == []
    assert store.match("sport") == [("sport", "m:sport")]


def test_deep_topics_do_not_recurse() -> None:
    deep = "/".join(["a"] * 5000)
    store = store_with(deep, deep + "/b")
    assert [t for t, _ in store.match("#")] == [deep, deep + "/b"]
    assert [t for t, _ in store.match("/".join(["+"] * 5000))] == [deep]
    assert store.delete(deep + "/b") and store.delete(deep)
    assert store._node_count() == 0


levels = st.sampled_from(["", "$SYS", "a", "b", "$a"])
topic_names = st.lists(levels, min_size=1, max_size=4).map("/".join)
filters = st.builds(
    lambda ls, hash_: "/".join([*ls, "#"] if hash_ else ls),
    st.lists(st.sampled_from(["", "$SYS", "a", "b", "+"]), max_size=4),
    st.booleans(),
).filter(bool)


@settings(max_examples=300, deadline=None)  # no time limit per example: a slow machine
@given(st.lists(topic_names, max_size=12), st.lists(filters, min_size=1, max_size=6))
def test_match_equals_naive(topic_list: list[str], filter_list: list[str]) -> None:
    store = store_with(*topic_list)
    for f in filter_list:
        expected = sorted((t, f"m:{t}") for t in set(topic_list) if matches(f, t))
        assert store.match(f) == expected


class RetainedMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.store = RetainedStore()
        self.model: dict[str, object] = {}

    @rule(topic=topic_names, payload=st.integers(0, 3))
    def set(self, topic: str, payload: int) -> None:
        message = (topic, payload)
        self.store.set(topic, message)
        self.model[topic] = message

    @rule(topic=topic_names)
    def delete(self, topic: str) -> None:
        assert self.store.delete(topic) is (self.model.pop(topic, None) is not None)

    @rule(topic=topic_names)
    def get(self, topic: str) -> None:
        assert self.store.get(topic) == self.model.get(topic)

    @rule(f=filters)
    def match(self, f: str) -> None:
        expected = sorted((t, m) for t, m in self.model.items() if matches(f, t))
        assert self.store.match(f) == expected

    @invariant()
    def consistent(self) -> None:
        assert len(self.store) == len(self.model)
        assert dict(self.store.items()) == self.model
        prefixes = {tuple(t.split("/")[:i]) for t in self.model for i in range(1, t.count("/") + 2)}
        assert self.store._node_count() == len(prefixes)


RetainedMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_retained_against_model = RetainedMachine.TestCase
