"""MQTT.js (protocolVersion 5) under node against the in-process broker, over plain TCP.

Each MQTT.js client is one node process running mqttjs5/client5.js: it connects with the
options given on its command line, takes commands (subscribe, publish, release, end) as
JSON lines on stdin and reports what it sees (CONNACK with its properties, SUBACK, the
PUBLISH acknowledgements with reason codes, messages with ``packet.properties``, a server
DISCONNECT) as JSON lines on stdout, read with the test's time bound. MQTT.js itself is
the one tests/security/test_websocket.py installs in tests/security/mqttjs.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from mqttd.broker import Broker, running
from tests.conftest import make_config
from tests.interop.test_mosquitto_clients import (
    finish,
    run_client,
    started,
    wait_subscribed,
    wait_until,
)
from tests.interop.test_mosquitto_clients import (
    pytestmark as mosquitto_installed,
)
from tests.interop.test_mosquitto_v5 import secured_config
from tests.security.test_websocket import NPM_INSTALL_TIMEOUT_S, ensure_mqttjs

TEST_TIMEOUT_S = 20
SCRIPT = Path(__file__).resolve().parent / "mqttjs5" / "client5.js"

_ids = itertools.count(1)


def unique_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


class JsClient:
    """One MQTT.js client: commands to its stdin, events from its stdout."""

    def __init__(self, proc: trio.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.events: list[dict[str, Any]] = []  # read, not yet taken
        self._buffer = bytearray()
        self._publishes = itertools.count(1)

    async def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                await self.proc.wait()
                raise AssertionError(
                    f"MQTT.js exited ({self.proc.returncode}) while {self.events} were unread: "
                    f"{self.stderr_path.read_text()}"
                )
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        event: dict[str, Any] = json.loads(line)
        return event

    async def expect(self, name: str, **fields: Any) -> dict[str, Any]:
        """The first event called ``name`` (with ``fields`` equal), taken out of order: other
        events stay for later ``expect`` calls."""

        def fits(event: dict[str, Any]) -> bool:
            return event["event"] == name and all(event.get(k) == v for k, v in fields.items())

        for i, event in enumerate(self.events):
            if fits(event):
                return self.events.pop(i)
        while True:
            event = await self._read()
            if fits(event):
                return event
            self.events.append(event)

    async def messages(self, count: int) -> list[dict[str, Any]]:
        return [await self.expect("message") for _ in range(count)]

    async def subscribe(self, topics: dict[str, dict[str, Any]], **options: Any) -> list[int]:
        await self.send(op="subscribe", topics=topics, options=options)
        suback = await self.expect("suback")
        granted: list[int] = suback["granted"]
        return granted

    async def publish(self, topic: str, payload: str, **options: Any) -> dict[str, Any]:
        """Publish and wait for its acknowledgement (for QoS 0: for it to be written)."""
        publish_id = next(self._publishes)
        await self.send(op="publish", id=publish_id, topic=topic, payload=payload,
                        options=options)  # fmt: skip
        return await self.expect("puback", id=publish_id)

    async def end(self, **options: Any) -> None:
        """Disconnect (DISCONNECT with ``options``) and exit."""
        await self.send(op="end", options=options)
        await self.expect("ended")
        assert await self.proc.wait() == 0


@asynccontextmanager
async def mqttjs5(
    tmp_path: Path, broker: Broker, client_id: str = "", **options: Any
) -> AsyncIterator[JsClient]:
    """An MQTT.js 5.0 client connected to ``broker`` with ``options``; the CONNACK event is
    left for the test (``expect("connack")``). Killed, if still running, on exit."""
    node = await ensure_mqttjs()
    stderr_path = tmp_path / f"mqttjs5-{next(_ids)}.stderr"
    url = f"mqtt://127.0.0.1:{broker.port}"
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [node, str(SCRIPT), url, json.dumps({"clientId": client_id, **options})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    try:
        yield JsClient(proc, stderr_path)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await trio.aclose_forcefully(stream)


@asynccontextmanager
async def connected(
    tmp_path: Path, broker: Broker, client_id: str, **options: Any
) -> AsyncIterator[JsClient]:
    """As :func:`mqttjs5`, once the CONNACK (success) is in."""
    async with mqttjs5(tmp_path, broker, client_id, **options) as js:
        connack = await js.expect("connack")
        assert connack["reasonCode"] == 0, connack
        yield js


async def bounded(test: Callable[[], Any]) -> None:
    """MQTT.js installed (with npm's own bound the first time), then ``test`` bounded."""
    with trio.fail_after(NPM_INSTALL_TIMEOUT_S + TEST_TIMEOUT_S):
        await ensure_mqttjs()
    with trio.fail_after(TEST_TIMEOUT_S):
        await test()


# -- CONNECT / CONNACK ----------------------------------------------------------------------


async def test_connect_properties_and_connack_properties(tmp_path):
    """CONNECT properties are applied (session expiry, receive maximum, topic alias maximum,
    request problem information, user properties accepted); the CONNACK says what the broker
    allows: assigned client id, receive maximum, topic alias maximum, maximum packet size,
    and a session expiry interval when it grants less than asked."""
    config = make_config(max_receive_messages=50, max_topic_aliases=3, max_packet_size_bytes=65536)
    persistence = attrs.evolve(config.persistence, session_expiry_s=100)
    config = attrs.evolve(config, persistence=persistence)
    async with running(config) as broker:

        async def test() -> None:
            properties = {
                "sessionExpiryInterval": 300, "receiveMaximum": 5, "topicAliasMaximum": 4,
                "requestProblemInformation": False, "userProperties": {"fleet": "north"},
            }  # fmt: skip
            # clean start (MQTT.js wants a client id for clean: false), yet a session that
            # outlives the connection: its expiry interval says so
            async with mqttjs5(tmp_path, broker, "", properties=properties) as js:
                connack = await js.expect("connack")
                assert connack["reasonCode"] == 0 and connack["sessionPresent"] is False
                props = connack["properties"]
                assigned = props.pop("assignedClientIdentifier")
                assert props == {
                    "receiveMaximum": 50, "topicAliasMaximum": 3, "maximumPacketSize": 65536,
                    "sessionExpiryInterval": 100,
                }  # fmt: skip
                session = broker.sessions[assigned]
                [conn] = [c for c in broker.connections if c.client_id == assigned]
                assert conn.protocol_level == 5
                assert (session.expiry_s, session.max_inflight) == (100, 5)
                assert (conn.topic_alias_out_max, conn.problem_information) == (4, False)
                await js.end()

            # as asked, not capped: no Session Expiry Interval in the CONNACK
            async with connected(tmp_path, broker, "js-plain", clean=False,
                                 properties={"sessionExpiryInterval": 60}) as js:  # fmt: skip
                assert broker.sessions["js-plain"].expiry_s == 60
                await js.end()

        await bounded(test)


async def test_session_expiry_resumes_with_queued_messages(tmp_path, broker):
    """clean: false with sessionExpiryInterval 60: the session outlives the connection;
    reconnecting gets sessionPresent and the messages queued meanwhile, with properties."""

    async def test() -> None:
        options = {"clean": False, "properties": {"sessionExpiryInterval": 60}}
        async with connected(tmp_path, broker, "js-resume", **options) as js:
            assert await js.subscribe({"resume/#": {"qos": 1}}) == [1]
            await js.end()
        session = broker.sessions["js-resume"]
        await wait_until(lambda: session.connection is None, "the session to be detached")
        async with connected(tmp_path, broker, "js-pub") as pub:
            for i in range(3):  # one publisher, one topic: MQTT promises the order
                ack = await pub.publish("resume/q", f"queued {i}", qos=1,
                                        properties={"userProperties": {"n": str(i)}})
                assert ack["error"] is None
            await pub.end()
        assert session.queued == 3
        async with mqttjs5(tmp_path, broker, "js-resume", **options) as js:
            connack = await js.expect("connack")
            assert connack["sessionPresent"] is True
            got = await js.messages(3)
            assert [(m["topic"], m["payload"], m["properties"]) for m in got] == [
                ("resume/q", f"queued {i}", {"userProperties": {"n": str(i)}})
                for i in range(3)
            ]
            await js.end()

    await bounded(test)


async def test_server_keep_alive_and_packet_too_large(tmp_path):
    """The broker's limits as MQTT.js sees them: a keepalive above max_keepalive_s is
    answered with Server Keep Alive; a PUBLISH above the Maximum Packet Size of the CONNACK
    gets DISCONNECT 0x95 (Packet too large) with a reason string."""
    async with running(make_config(max_packet_size_bytes=1000, max_keepalive_s=30)) as broker:

        async def test() -> None:
            async with mqttjs5(tmp_path, broker, "js-big", keepalive=60) as js:
                connack = await js.expect("connack")
                assert connack["properties"]["serverKeepAlive"] == 30
                assert connack["properties"]["maximumPacketSize"] == 1000
                [conn] = [c for c in broker.connections if c.client_id == "js-big"]
                assert conn.keepalive_s == 30
                await js.send(op="publish", id=1, topic="big", payload="x" * 2000,
                              options={"qos": 1})  # fmt: skip
                disconnect = await js.expect("disconnect")
                assert disconnect["reasonCode"] == 0x95
                assert "exceeds the maximum of 1000" in disconnect["properties"]["reasonString"]
                await js.expect("close")

        await bounded(test)


# -- PUBLISH properties ---------------------------------------------------------------------


async def test_publish_properties_reach_the_subscriber(tmp_path, broker):
    """User properties (a repeated key as a list), content type, response topic, correlation
    data, payload format indicator go through unchanged; the message expiry interval is
    what is left of it; the subscription identifier is added."""

    async def test() -> None:
        async with (
            connected(tmp_path, broker, "js-sub") as sub,
            connected(tmp_path, broker, "js-pub") as pub,
        ):
            assert await sub.subscribe(
                {"prop/#": {"qos": 1}}, properties={"subscriptionIdentifier": 42}
            ) == [1]
            properties = {
                "payloadFormatIndicator": True, "messageExpiryInterval": 60,
                "contentType": "application/json", "responseTopic": "prop/reply",
                "correlationData": b"\x00\x01req".hex(),
                "userProperties": {"site": "42", "tag": ["a", "b"]},
            }  # fmt: skip
            before = time.time()
            ack = await pub.publish("prop/x", '{"t": 1}', qos=1, properties=properties)
            assert (ack["error"], ack["reasonCode"]) == (None, None)
            [message] = await sub.messages(1)
            props = message["properties"]
            # what is left of the 60 s: at most what passed since, rounded up
            elapsed = math.ceil(time.time() - before)
            assert 60 - elapsed <= props.pop("messageExpiryInterval") <= 60
            assert props == {
                "payloadFormatIndicator": True, "contentType": "application/json",
                "responseTopic": "prop/reply", "correlationData": b"\x00\x01req".hex(),
                "userProperties": {"site": "42", "tag": ["a", "b"]},
                "subscriptionIdentifier": 42,
            }  # fmt: skip
            assert (message["topic"], message["payload"], message["qos"]) == (
                "prop/x", '{"t": 1}', 1
            )
            await sub.end()
            await pub.end()

    await bounded(test)


async def test_topic_aliases_both_ways(tmp_path, broker):
    """The publisher sets topic alias 1 and then sends the topic as the alias alone; the
    subscriber (topicAliasMaximum 2) gets topic and alias first, the alias alone after, and
    MQTT.js resolves every one of them to the right topic; with more topics than aliases
    the broker never goes above the maximum. (MQTT orders one topic's messages, not those
    of different topics: the aliases are checked against the order they arrived in.)"""

    async def test() -> None:
        async with (
            connected(tmp_path, broker, "js-asub",
                      properties={"topicAliasMaximum": 2}) as sub,
            connected(tmp_path, broker, "js-apub", autoUseTopicAlias=True) as pub,
        ):  # fmt: skip
            await sub.subscribe({"al/#": {"qos": 1}})
            long_topic = "al/a/rather/long/topic/name"
            await pub.publish(long_topic, "first", qos=1, properties={"topicAlias": 1})
            await pub.publish(long_topic, "second", qos=1)  # autoUseTopicAlias: alias only
            sent = [await pub.expect("sent"), await pub.expect("sent")]
            assert sent == [
                {"event": "sent", "topic": long_topic, "properties": {"topicAlias": 1}},
                {"event": "sent", "topic": "", "properties": {"topicAlias": 1}},
            ]
            for i in range(3):
                await pub.publish(f"al/other/{i}", f"other {i}", qos=1)
            got = await sub.messages(5)
            assert sorted((m["topic"], m["payload"]) for m in got) == sorted([
                (long_topic, "first"), (long_topic, "second"),
                *((f"al/other/{i}", f"other {i}") for i in range(3)),
            ])  # fmt: skip
            # one topic's messages in order
            assert [m["payload"] for m in got if m["topic"] == long_topic] == ["first", "second"]
            # the broker's aliases (maximum 2): the first two topics to arrive get 1 and 2 with
            # the topic, later messages on them the alias alone; other topics go in full
            aliases: dict[str, int] = {}
            expected = []
            for m in got:
                if m["topic"] in aliases:
                    expected.append(("", aliases[m["topic"]]))
                elif len(aliases) < 2:
                    aliases[m["topic"]] = len(aliases) + 1
                    expected.append((m["topic"], aliases[m["topic"]]))
                else:
                    expected.append((m["topic"], None))
            wire = [(m["wireTopic"], m["properties"].get("topicAlias")) for m in got]
            assert wire == expected
            await sub.end()
            await pub.end()

    await bounded(test)


# -- SUBSCRIBE options ----------------------------------------------------------------------


async def test_no_local_retain_as_published_retain_handling(tmp_path, broker):
    """nl: a client does not get its own messages on that subscription; rap: a live message
    keeps RETAIN as published; rh 0 / 1 / 2: retained messages on every subscribe / on a
    new subscription only / never."""

    async def test() -> None:
        async with (
            connected(tmp_path, broker, "js-opts") as js,
            connected(tmp_path, broker, "js-other") as other,
        ):
            # No Local
            assert await js.subscribe({"nl/#": {"qos": 1, "nl": True}}) == [1]
            await js.publish("nl/own", "mine", qos=1)
            await other.publish("nl/theirs", "theirs", qos=1)
            [message] = await js.messages(1)
            assert message["payload"] == "theirs"

            # Retain As Published, beside a subscription without it
            await other.publish("rap/state", "stored", qos=1, retain=True)
            assert await js.subscribe({"rap/+": {"qos": 1, "rap": True}}) == [1]
            assert await other.subscribe({"rap/#": {"qos": 1}}) == [1]
            assert [m["retain"] for m in await js.messages(1)] == [True]
            assert [m["retain"] for m in await other.messages(1)] == [True]
            await other.publish("rap/state", "live", qos=1, retain=True)
            [mine], [theirs] = await js.messages(1), await other.messages(1)
            assert (mine["payload"], mine["retain"]) == ("live", True)
            assert (theirs["payload"], theirs["retain"]) == ("live", False)

            # Retain Handling: subscribe twice to one filter, a marker after each SUBACK
            for rh, expected in ((0, ["state", "marker", "state", "marker"]),
                                 (1, ["state", "marker", "marker"]),
                                 (2, ["marker", "marker"])):  # fmt: skip
                await other.publish(f"rh{rh}/state", "stored", qos=1, retain=True)
                got = []
                for _ in range(2):
                    assert await js.subscribe({f"rh{rh}/#": {"qos": 1, "rh": rh}}) == [1]
                    await other.publish(f"rh{rh}/marker", "marker", qos=1)
                    while True:  # whatever retained message came, came before the marker
                        got.append((await js.expect("message"))["topic"].split("/")[1])
                        if got[-1] == "marker":
                            break
                assert got == expected, rh
            await js.end()
            await other.end()

    await bounded(test)


async def test_subscription_identifiers_of_overlapping_subscriptions(tmp_path, broker):
    """Two subscriptions of one client with identifiers 1 and 2 that both match: one
    delivery carrying both identifiers; a message matching one carries that one."""

    async def test() -> None:
        async with connected(tmp_path, broker, "js-ids") as js:
            await js.subscribe({"ids/#": {"qos": 1}}, properties={"subscriptionIdentifier": 1})
            await js.subscribe({"ids/+/x": {"qos": 1}},
                               properties={"subscriptionIdentifier": 2})  # fmt: skip
            await js.publish("ids/a/x", "both", qos=1)
            await js.publish("ids/a/y", "one", qos=1)
            got = await js.messages(2)
            # two topics: MQTT does not order them against each other, nor the identifiers
            # of one message
            ids = {m["payload"]: m["properties"]["subscriptionIdentifier"] for m in got}
            assert (sorted(ids["both"]), ids["one"]) == ([1, 2], 1)
            await js.end()

    await bounded(test)


# -- flow control and limits ----------------------------------------------------------------


async def test_receive_maximum_holds_back_deliveries(tmp_path, broker):
    """receiveMaximum 2 and acknowledgements held back (customHandleAcks): the broker has
    two QoS 1 messages in flight to the client and queues the rest; once the client
    acknowledges, all arrive in order."""

    async def test() -> None:
        async with (
            connected(tmp_path, broker, "js-slow", holdAcks=True,
                      properties={"receiveMaximum": 2}) as slow,
            connected(tmp_path, broker, "js-fast") as pub,
        ):  # fmt: skip
            await slow.subscribe({"rm/#": {"qos": 1}})
            session = broker.sessions["js-slow"]
            assert session.max_inflight == 2
            for i in range(5):  # one publisher, one topic: MQTT promises the order
                await pub.publish("rm/q", f"m{i}", qos=1)
            assert (len(session.inflight), session.queued) == (2, 3)
            # MQTT.js reads the next packet only once this one is handled: m1 waits unread
            assert (await slow.expect("held"))["payload"] == "m0"
            await slow.send(op="release")
            got = await slow.messages(5)
            assert [m["payload"] for m in got] == [f"m{i}" for i in range(5)]
            assert not [e for e in slow.events if e["event"] == "held"]
            await wait_until(lambda: not session.inflight, "every PUBACK to be handled")
            await slow.end()
            await pub.end()

    await bounded(test)


async def test_maximum_packet_size(tmp_path, broker):
    """maximumPacketSize 128: a message that would make a larger PUBLISH is not sent to the
    client (and is counted); the ones before and after it are."""

    async def test() -> None:
        async with (
            connected(tmp_path, broker, "js-small",
                      properties={"maximumPacketSize": 128}) as small,
            connected(tmp_path, broker, "js-pub") as pub,
        ):  # fmt: skip
            await small.subscribe({"mps/#": {"qos": 1}})
            session = broker.sessions["js-small"]
            for topic, size in (("mps/a", 50), ("mps/b", 500), ("mps/c", 60)):
                await pub.publish(topic, "x" * size, qos=1)
            got = await small.messages(2)
            # three topics: MQTT does not order them against each other
            assert sorted((m["topic"], len(m["payload"])) for m in got) == [
                ("mps/a", 50), ("mps/c", 60)
            ]
            assert session.too_large == 1
            await small.end()
            await pub.end()

    await bounded(test)


# -- reason codes ---------------------------------------------------------------------------


async def test_server_disconnect_on_takeover(tmp_path, broker):
    """A second MQTT.js client with the same id: the first gets the server's DISCONNECT
    with reason code 0x8E (Session taken over) and a reason string."""

    async def test() -> None:
        async with connected(tmp_path, broker, "js-same") as first:
            async with connected(tmp_path, broker, "js-same") as second:
                disconnect = await first.expect("disconnect")
                assert disconnect["reasonCode"] == 0x8E
                assert "taken over" in disconnect["properties"]["reasonString"]
                await first.expect("close")
                [conn] = [c for c in broker.connections if c.client_id == "js-same"]
                assert conn is broker.sessions["js-same"].connection
                await second.end()

    await bounded(test)


async def test_reason_codes_with_acl_and_passwords(tmp_path):
    """CONNACK 0x86 for a wrong password (MQTT.js: error code 134); PUBACK 0x87 and PUBREC
    0x87 for a publication the ACL denies (the publish callback's error), 0x10 No matching
    subscribers for an allowed one; SUBACK 0x87 for a denied filter beside a granted one."""
    async with running(secured_config(tmp_path)) as broker:

        async def test() -> None:
            async with mqttjs5(tmp_path, broker, "js-bad", username="alice",
                               password="wrong") as bad:  # fmt: skip
                error = await bad.expect("error")
                assert error["code"] == 0x86, error
            alice = {"username": "alice", "password": "secret"}
            async with connected(tmp_path, broker, "js-alice", **alice) as js:
                for qos in (1, 2):
                    ack = await js.publish("denied/x", "no", qos=qos)
                    assert ack["reasonCode"] == 0x87 and "Not authorized" in ack["error"]
                ack = await js.publish("allowed/x", "nobody listens", qos=1)
                assert ack["error"] is None
                acks = [await js.expect("ack") for _ in range(3)]  # as received
                assert [(a["cmd"], a["reasonCode"]) for a in acks] == [
                    ("puback", 0x87), ("pubrec", 0x87), ("puback", 0x10)
                ]
                assert await js.subscribe({"$SYS/#": {"qos": 1}, "a/#": {"qos": 1}}) == [
                    0x87, 1
                ]
                await js.end()

        await bounded(test)


# -- wills and other clients ----------------------------------------------------------------


async def test_will_with_properties(tmp_path, broker):
    """A will with properties, published when the MQTT.js process is killed: the watcher
    gets content type, response topic, correlation data, user properties, expiry."""

    async def test() -> None:
        async with connected(tmp_path, broker, "js-watch") as watcher:
            await watcher.subscribe({"will/#": {"qos": 1}})
            will = {
                "topic": "will/dev", "payload": "gone", "qos": 1,
                "properties": {
                    "contentType": "text/plain", "responseTopic": "will/ack",
                    "correlationData": "0a0b", "messageExpiryInterval": 30,
                    "userProperties": {"why": "killed"},
                },
            }  # fmt: skip
            async with connected(tmp_path, broker, "js-dev", will=will) as dev:
                before = time.time()  # the will is published after this
                dev.proc.kill()  # no DISCONNECT
            [message] = await watcher.messages(1)
            props = message["properties"]
            # what is left of the 30 s: at most what passed since, rounded up
            elapsed = math.ceil(time.time() - before)
            assert 30 - elapsed <= props.pop("messageExpiryInterval") <= 30
            assert (message["topic"], message["payload"], props) == ("will/dev", "gone", {
                "contentType": "text/plain", "responseTopic": "will/ack",
                "correlationData": "0a0b", "userProperties": {"why": "killed"},
            })  # fmt: skip
            await watcher.end()

    await bounded(test)


@mosquitto_installed
async def test_mqttjs_and_mosquitto_clients_of_both_versions(tmp_path, broker):
    """MQTT.js 5.0 publishes with properties to a mosquitto_sub -V 5 (which prints them) and
    a mosquitto_sub -V 311 (plain message); mosquitto_pub -V 5 publishes with properties to
    MQTT.js."""

    async def test() -> None:
        ids = unique_id("m5"), unique_id("m311")
        fmt = ["-q", "1", "-t", "cross/js/#", "-C", "1", "-F", "%t|%p|%P|%C"]
        async with (
            started(["mosquitto_sub", "-p", str(broker.port), "-V", "mqttv5", "-i", ids[0],
                     *fmt]) as sub5,
            started(["mosquitto_sub", "-p", str(broker.port), "-V", "mqttv311", "-i", ids[1],
                     *fmt]) as sub311,
            connected(tmp_path, broker, "js-cross") as js,
        ):  # fmt: skip
            await wait_subscribed(broker, ids[0], "cross/js/#")
            await wait_subscribed(broker, ids[1], "cross/js/#")
            await js.subscribe({"cross/mosq/#": {"qos": 1}})
            await js.publish("cross/js/a", "from js", qos=1, properties={
                "userProperties": {"k": "v"}, "contentType": "text/plain"
            })  # fmt: skip
            results = await finish(sub5), await finish(sub311)
            assert results[0][:2] == (0, ["cross/js/a|from js|k:v|text/plain"]), results[0][2]
            assert results[1][:2] == (0, ["cross/js/a|from js||"]), results[1][2]
            await run_client([
                "mosquitto_pub", "-p", str(broker.port), "-V", "mqttv5", "-q", "1",
                "-t", "cross/mosq/b", "-m", "from mosquitto",
                "-D", "publish", "user-property", "k", "w",
                "-D", "publish", "response-topic", "cross/reply",
            ])  # fmt: skip
            [message] = await js.messages(1)
            assert (message["topic"], message["payload"], message["properties"]) == (
                "cross/mosq/b", "from mosquitto",
                {"userProperties": {"k": "w"}, "responseTopic": "cross/reply"},
            )  # fmt: skip
            await js.end()

    await bounded(test)
