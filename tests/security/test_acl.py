"""ACL files in mosquitto's syntax: parsing, semantics, subscription coverage, enforcement on
PUBLISH, SUBSCRIBE and delivery (routed and retained), the hook interface, caching and
reload: without I/O and over real sockets."""

from __future__ import annotations

import itertools
import logging
import pathlib

import attrs
import pytest
import trio

from mqttd.acl import AclFile, CachedAuthorizer, covers
from mqttd.auth import SecurityFileError
from mqttd.broker import Broker, running
from mqttd.codec.packets import (
    ConnAck,
    Connect,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)
from mqttd.topics import is_valid_topic_filter, matches
from tests.rawclient import RawClient
from tests.security.test_auth import Client, security_config, write_passwords

ACL = """\
# anonymous clients
topic read public/#
topic write public/anonymous

user alice
topic readwrite alice/#
topic read shared/#
topic deny shared/secret
topic deny alice/locked/#
topic write shared/alice

user bob
topic shared/#

# everyone
pattern readwrite devices/%c/#
pattern read inbox/%u/#
pattern deny devices/%c/firmware
"""


@pytest.fixture
def acl() -> AclFile:
    return AclFile.parse(ACL, "test.acl")


# -- parsing -----------------------------------------------------------------------------


def test_parse_sections(acl: AclFile) -> None:
    anonymous = [(r.access, r.filter) for r in acl.anonymous]
    assert anonymous == [(1, "public/#"), (2, "public/anonymous")]
    assert set(acl.users) == {"alice", "bob"}
    assert [r.access for r in acl.users["alice"]] == [3, 1, 0, 0, 2]
    assert [(r.access, r.filter) for r in acl.users["bob"]] == [(3, "shared/#")]  # default rw
    assert [r.filter for r in acl.patterns] == [
        "devices/%c/#", "inbox/%u/#", "devices/%c/firmware"
    ]
    assert len(acl) == 2 + 5 + 1 + 3


def test_topic_with_spaces_tabs_and_repeated_user_sections() -> None:
    acl = AclFile.parse("user  carol \ntopic\tread  a b/c \nuser dave\nuser carol\ntopic x\n")
    assert [(r.access, r.filter) for r in acl.users["carol"]] == [(1, "a b/c"), (3, "x")]
    assert acl.users["dave"] == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("topic read a\nsubscribe a\n", "2: unknown keyword 'subscribe'"),
        ("\n\nuser\n", "3: 'user' needs a user name"),
        ("topic\n", "1: 'topic' needs a topic"),
        ("pattern read\n", "1: 'pattern' needs a topic"),
        ("topic read a/#/b\n", "1: invalid topic filter"),
        ("# ok\npattern write a+/b\n", "2: invalid topic filter"),
    ],
)
def test_parse_errors_name_the_line(text: str, problem: str) -> None:
    with pytest.raises(SecurityFileError) as info:
        AclFile.parse(text, "bad.acl")
    assert str(info.value).startswith("bad.acl:")
    assert problem in str(info.value)


def test_every_bad_line_is_a_problem(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.acl"
    path.write_text("topic read a\nsubscribe a\nuser\ntopic read b\n", encoding="utf-8")
    assert [str(p) for p in AclFile.problems(path)] == [
        f"{path}:2: unknown keyword 'subscribe' (expected 'topic', 'user' or 'pattern')",
        f"{path}:3: 'user' needs a user name",
    ]
    with pytest.raises(SecurityFileError, match=":2: unknown keyword"):
        AclFile.load(path)  # the broker stops at the first
    assert [str(p) for p in AclFile.problems(tmp_path / "none")] == [
        f"{tmp_path / 'none'}: cannot read ACL file: No such file or directory"
    ]


def test_example_acl_loads() -> None:
    acl = AclFile.load(pathlib.Path(__file__).resolve().parents[2] / "config" / "acl.example")
    assert acl.can_publish("sensor-1", "sensor-1", "devices/sensor-1/telemetry/temp")
    assert not acl.can_publish("sensor-1", "sensor-1", "devices/sensor-2/telemetry/temp")
    assert acl.can_subscribe("backend-1", "backend", "devices/+/telemetry/#")
    assert not acl.can_receive("backend-1", "backend", "devices/s/telemetry/debug/x")
    assert acl.can_subscribe("tool", None, "public/#")


# -- semantics -------------------------------------------------------------------------------


def test_anonymous_clients_get_the_global_rules_and_the_patterns(acl: AclFile) -> None:
    assert acl.can_receive("anon", None, "public/news")
    assert not acl.can_publish("anon", None, "public/news")
    assert acl.can_publish("anon", None, "public/anonymous")
    assert acl.can_publish("anon", None, "devices/anon/state")  # pattern %c
    assert not acl.can_receive("anon", None, "inbox/None/x")  # %u never applies to anonymous
    assert not acl.can_receive("anon", None, "alice/x")


def test_users_get_their_section_and_the_patterns_not_the_global_rules(acl: AclFile) -> None:
    assert acl.can_publish("a1", "alice", "alice/notes")
    assert acl.can_receive("a1", "alice", "alice/notes")
    assert not acl.can_receive("a1", "alice", "public/news")  # global rules: anonymous only
    assert acl.can_receive("a1", "alice", "inbox/alice/1")
    assert not acl.can_receive("a1", "alice", "inbox/bob/1")
    assert acl.can_publish("a1", "alice", "devices/a1/state")
    assert not acl.can_publish("a1", "alice", "devices/b1/state")
    # a user without a section gets the patterns only
    assert acl.can_publish("z1", "zed", "devices/z1/x")
    assert not acl.can_receive("z1", "zed", "shared/x")


def test_read_and_write_are_separate_and_deny_wins(acl: AclFile) -> None:
    assert acl.can_receive("a1", "alice", "shared/news")
    assert not acl.can_publish("a1", "alice", "shared/news")
    assert acl.can_publish("a1", "alice", "shared/alice")
    assert not acl.can_publish("a1", "alice", "shared/alice/more")
    assert not acl.can_receive("a1", "alice", "shared/secret")  # deny beats read shared/#
    assert not acl.can_publish("a1", "alice", "alice/locked/door")  # deny beats readwrite
    assert not acl.can_publish("a1", "alice", "devices/a1/firmware")  # deny pattern
    assert acl.can_receive("b1", "bob", "shared/secret")  # alice's deny is alice's


def test_pattern_substitution_is_per_level() -> None:
    acl = AclFile.parse("pattern readwrite x/%c%u/y\npattern readwrite multi/%c/#\n")
    assert acl.can_publish("c", "u", "x/%c%u/y")  # inside a level: literal
    assert not acl.can_publish("c", "u", "x/cu/y")
    assert acl.can_publish("site/dev", None, "multi/site/dev/t")  # a '/' in the id spans levels


@pytest.mark.parametrize(("client_id", "username"), [("#", None), ("c", "+"), ("a+b", "u")])
def test_wildcards_in_client_id_or_user_name_get_nothing(
    acl: AclFile, client_id: str, username: str | None
) -> None:
    everything = AclFile.parse("pattern readwrite #\ntopic #\nuser +\ntopic #\nuser u\ntopic #\n")
    assert not everything.can_publish(client_id, username, "devices/x")
    assert not everything.can_receive(client_id, username, "devices/x")
    assert not everything.can_subscribe(client_id, username, "devices/x")
    cached = CachedAuthorizer(everything)
    assert not cached.can_publish(client_id, username, "devices/x")
    assert not cached.can_subscribe(client_id, username, "devices/x")


@pytest.mark.parametrize(
    ("rule", "subscription", "covered"),
    [
        ("a/#", "a/+/b", True),
        ("a/+", "a/#", False),
        ("a/#", "a/#", True),
        ("a/#", "a", True),  # 'a/#' matches 'a' itself
        ("a/+/#", "a/#", False),  # 'a/#' also matches 'a'
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/b", "a/+", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("#", "a/b/#", True),
        ("#", "$SYS/#", False),  # '#' does not reach $-topics
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/+", True),
        ("+/+", "+/b", True),
        ("+/#", "#", True),  # every topic has a first level
        ("a/+/#", "a/#", False),
    ],
)
def test_covers(rule: str, subscription: str, covered: bool) -> None:
    assert covers(rule, subscription) is covered


def test_covers_agrees_with_matching_on_every_topic_of_a_small_universe() -> None:
    """covers(rule, sub) == every topic ``sub`` matches, ``rule`` matches too (topics up to
    one level longer than the filters, with a level no filter names)."""
    filters = [
        "/".join(levels)
        for n in (1, 2, 3)
        for levels in itertools.product(["a", "b", "+", "#", "$s"], repeat=n)
    ]
    filters = [f for f in filters if is_valid_topic_filter(f)]
    topics = [
        "/".join(levels)
        for n in (1, 2, 3, 4)
        for levels in itertools.product(["a", "b", "c", "$s"], repeat=n)
    ]
    matched = {f: frozenset(t for t in topics if matches(f, t)) for f in filters}
    for rule, sub in itertools.product(filters, repeat=2):
        expected = matched[sub] <= matched[rule]
        assert covers(rule, sub) is expected, (rule, sub)


def test_subscribe_checks(acl: AclFile) -> None:
    assert acl.can_subscribe("a1", "alice", "alice/#")
    assert acl.can_subscribe("a1", "alice", "alice/+/x")
    assert acl.can_subscribe("a1", "alice", "shared/#")  # overlaps a deny: filtered on delivery
    assert not acl.can_subscribe("a1", "alice", "shared/secret")  # covered by the deny
    assert not acl.can_subscribe("a1", "alice", "alice/locked/+")
    assert not acl.can_subscribe("a1", "alice", "#")
    assert not acl.can_subscribe("a1", "alice", "public/#")  # global rules: anonymous only
    assert acl.can_subscribe("anon", None, "public/+")
    assert acl.can_subscribe("d1", "x", "devices/d1/#")
    assert not acl.can_subscribe("d1", "x", "devices/+/#")


# -- enforcement without I/O -----------------------------------------------------------------


@pytest.fixture
def acl_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "test.acl"
    path.write_text(ACL)
    return path


@pytest.fixture
def broker(acl_file: pathlib.Path) -> Broker:
    return Broker(security_config(acl_file=str(acl_file)))


def login(broker: Broker, client_id: str, username: str | None = None) -> Client:
    client = Client(broker, peer=f"{client_id}:1")
    assert client.connect(client_id, username, b"pw" if username else None) == 0
    return client


def publishes(client: Client) -> list[tuple[str, bytes, bool]]:
    packets = client.pending + client.received()
    client.pending = []
    return [(p.topic, p.payload, p.retain) for p in packets if isinstance(p, Publish)]


def test_publish_without_write_access_is_dropped_but_acknowledged(broker: Broker) -> None:
    reader = login(broker, "r1", "bob")
    assert reader.subscribe("shared/#", qos=2) == (2,)
    alice = login(broker, "a1", "alice")
    alice.publish("shared/news", b"denied", qos=0)
    alice.send(Publish("shared/news", b"denied", 1, packet_id=7))
    assert alice.received() == [PubAck(7)]
    alice.send(Publish("shared/news", b"denied", 2, packet_id=8))
    assert alice.received() == [PubRec(8)]
    alice.send(PubRel(8))
    assert alice.received() == [PubComp(8)]
    alice.publish("shared/alice", b"allowed", qos=0)
    assert publishes(reader) == [("shared/alice", b"allowed", False)]
    assert broker.stats()["acl_denied_publish"] == 3
    assert not alice.conn.closing


def test_denied_retained_publish_is_not_stored(broker: Broker) -> None:
    alice = login(broker, "a1", "alice")
    alice.publish("shared/news", b"x", retain=True)
    assert len(broker.retained) == 0


def test_subscribe_without_read_access_gets_0x80(broker: Broker) -> None:
    alice = login(broker, "a1", "alice")
    codes = alice.subscribe("alice/#", "shared/secret", "shared/#", "#", "inbox/alice/+", qos=1)
    assert codes == (1, 0x80, 1, 0x80, 1)
    assert set(broker.sessions["a1"].subscriptions) == {"alice/#", "shared/#", "inbox/alice/+"}
    assert broker.stats()["acl_denied_subscribe"] == 2


def test_delivery_without_read_access_is_withheld(broker: Broker) -> None:
    alice = login(broker, "a1", "alice")
    assert alice.subscribe("shared/#") == (0,)
    bob = login(broker, "b1", "bob")
    assert bob.subscribe("shared/#") == (0,)
    bob.publish("shared/secret", b"s")
    bob.publish("shared/news", b"n")
    assert publishes(alice) == [("shared/news", b"n", False)]
    assert publishes(bob) == [("shared/secret", b"s", False), ("shared/news", b"n", False)]
    assert broker.stats()["acl_denied_deliveries"] == 1


def test_retained_delivery_on_subscribe_is_checked(broker: Broker) -> None:
    bob = login(broker, "b1", "bob")
    bob.publish("shared/secret", b"s", retain=True)
    bob.publish("shared/news", b"n", retain=True)
    alice = login(broker, "a1", "alice")
    assert alice.subscribe("shared/+") == (0,)
    assert publishes(alice) == [("shared/news", b"n", True)]
    assert broker.stats()["acl_denied_deliveries"] == 1


def test_client_id_and_user_name_patterns(broker: Broker) -> None:
    device = login(broker, "dev-1", "zed")
    other = login(broker, "dev-2", "zed")
    assert device.subscribe("devices/dev-1/#", "devices/dev-2/#", "inbox/zed/#") == (0, 0x80, 0)
    other.publish("devices/dev-1/cmd", b"not yours")  # dev-2 may not write dev-1's tree
    other.publish("inbox/zed/1", b"no write on inboxes")
    device.publish("devices/dev-1/firmware", b"denied by the deny pattern")
    device.publish("devices/dev-1/state", b"mine")
    assert publishes(device) == [("devices/dev-1/state", b"mine", False)]
    assert broker.stats()["acl_denied_publish"] == 3


def test_reconnecting_as_another_user_changes_what_is_delivered(broker: Broker) -> None:
    first = Client(broker, "dev:1")
    first.send(Connect("dev", clean_session=False, username="alice", password=b"pw"))
    assert first.received() == [ConnAck(False, 0)]
    assert first.subscribe("shared/#") == (0,)
    bob = login(broker, "b1", "bob")
    bob.publish("shared/news", b"1")
    assert publishes(first) == [("shared/news", b"1", False)]
    first.lose()
    second = Client(broker, "dev:2")  # the same persistent session, another user
    second.send(Connect("dev", clean_session=False, username="zed", password=b"pw"))
    assert second.received() == [ConnAck(True, 0)]
    bob.publish("shared/news", b"2")
    assert publishes(second) == []
    assert broker.stats()["acl_denied_deliveries"] == 1


def test_anonymous_client_rules(broker: Broker) -> None:
    anon = login(broker, "anon-1")
    assert anon.subscribe("public/#", "shared/#") == (0, 0x80)
    anon.publish("public/anonymous", b"hello")
    anon.publish("public/other", b"denied")
    assert publishes(anon) == [("public/anonymous", b"hello", False)]


def test_no_acl_means_no_per_delivery_check() -> None:
    broker = Broker(security_config())
    client = login(broker, "c1", "anyone")
    assert broker.router.authorizer is None
    assert client.subscribe("#") == (0,)
    client.publish("x", b"1")
    assert publishes(client) == [("x", b"1", False)]


@attrs.define
class CountingAuthorizer:
    calls: list[tuple[str, str, str | None, str]] = attrs.Factory(list)
    readable: set[str] = attrs.Factory(lambda: {"t/1"})

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        self.calls.append(("publish", client_id, username, topic))
        return True

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        self.calls.append(("subscribe", client_id, username, topic_filter))
        return True

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        self.calls.append(("receive", client_id, username, topic))
        return topic in self.readable


def test_custom_authorizer_answers_are_cached_until_reload() -> None:
    hook = CountingAuthorizer()
    broker = Broker(security_config(), authorizer=hook)
    sub = login(broker, "s1", "sam")
    assert sub.subscribe("t/+") == (0,)
    pub = login(broker, "p1")
    for _ in range(3):
        pub.publish("t/1", b"a")
        pub.publish("t/2", b"b")
    assert publishes(sub) == [("t/1", b"a", False)] * 3
    assert sorted(hook.calls) == [
        ("publish", "p1", None, "t/1"),
        ("publish", "p1", None, "t/2"),
        ("receive", "s1", "sam", "t/1"),
        ("receive", "s1", "sam", "t/2"),
        ("subscribe", "s1", "sam", "t/+"),
    ]
    hook.readable = {"t/2"}  # the program changes its policy and asks for a reload
    assert broker.reload()
    pub.publish("t/1", b"c")
    pub.publish("t/2", b"d")
    assert publishes(sub) == [("t/2", b"d", False)]


def test_cache_is_bounded() -> None:
    cached = CachedAuthorizer(CountingAuthorizer(), max_entries=3)
    for i in range(10):
        cached.can_receive("c", None, f"t/{i}")
    assert len(cached._receive) <= 3


def test_reload_picks_up_a_changed_acl_and_keeps_the_old_one_if_broken(
    broker: Broker, acl_file: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice = login(broker, "a1", "alice")
    assert alice.subscribe("shared/#") == (0,)
    bob = login(broker, "b1", "bob")
    bob.publish("shared/secret", b"1")
    assert publishes(alice) == []
    acl_file.write_text(ACL.replace("topic deny shared/secret\n", ""))
    assert broker.reload()
    bob.publish("shared/secret", b"2")  # the existing subscription follows the new ACL
    assert publishes(alice) == [("shared/secret", b"2", False)]
    acl_file.write_text("user alice\ntopic nonsense a/#/b\n")
    caplog.set_level(logging.ERROR, logger="mqttd")
    assert not broker.reload()
    assert "test.acl:2" in caplog.text and "keeping the ACL" in caplog.text
    bob.publish("shared/secret", b"3")
    assert publishes(alice) == [("shared/secret", b"3", False)]


def test_denials_are_logged_at_most_once_per_interval(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mqttd")
    alice = login(broker, "a1", "alice")
    for _ in range(5):
        alice.publish("shared/news", b"x")
    assert alice.subscribe("#") == (0x80,)
    lines = [r.getMessage() for r in caplog.records if "denied by the ACL" in r.getMessage()]
    assert len(lines) == 1 and "'shared/news'" in lines[0]
    assert broker.stats()["acl_denied_publish"] == 5


# -- over real sockets -----------------------------------------------------------------------


async def test_acl_over_tcp(tmp_path: pathlib.Path) -> None:
    passwords = write_passwords(tmp_path / "users.pw", {"alice": "a", "bob": "b"})
    acl_path = tmp_path / "test.acl"
    acl_path.write_text(ACL)
    config = security_config(password_file=passwords, acl_file=str(acl_path))

    async with running(config) as broker:
        with trio.fail_after(10):
            bob = await _login(broker.port, "b1", "bob", b"b")
            await bob.publish("shared/secret", b"retained secret", qos=1, retain=True)
            await bob.publish("shared/news", b"retained news", qos=1, retain=True)
            alice = await _login(broker.port, "a1", "alice", b"a")
            suback = await alice.subscribe("shared/+", "shared/secret", "devices/a1/#", qos=1)
            assert suback.return_codes == (1, 0x80, 1)  # type: ignore[attr-defined]
            retained = await alice.expect(Publish)
            assert (retained.topic, retained.retain) == ("shared/news", True)  # type: ignore[attr-defined]
            await alice.publish("shared/news", b"alice may not write here", qos=1)  # PUBACKed
            await bob.publish("shared/secret", b"live secret", qos=1)
            await alice.publish("devices/a1/state", b"own device")
            message = await alice.expect(Publish)
            assert (message.topic, message.payload) == ("devices/a1/state", b"own device")  # type: ignore[attr-defined]
            stats = broker.stats()
            assert stats["acl_denied_publish"] == 1
            assert stats["acl_denied_subscribe"] == 1
            assert stats["acl_denied_deliveries"] == 2  # the retained and the live secret
            acl_path.write_text(ACL.replace("topic deny shared/secret\n", ""))
            assert broker.reload()
            await bob.publish("shared/secret", b"now readable", qos=1)
            message = await alice.expect(Publish)
            assert message.payload == b"now readable"  # type: ignore[attr-defined]


async def _login(port: int, client_id: str, username: str, password: bytes) -> RawClient:
    client = await RawClient.open(port)
    await client.send(Connect(client_id, username=username, password=password))
    connack = await client.expect(ConnAck)
    assert isinstance(connack, ConnAck) and connack.return_code == 0, connack
    return client
