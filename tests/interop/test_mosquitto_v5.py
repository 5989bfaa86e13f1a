"""mosquitto_pub / mosquitto_sub with MQTT 5.0 (``-V mqttv5``, properties with ``-D``) against
the in-process broker, beside 3.1.1 clients on the same listener.

The clients run as in test_mosquitto_clients.py: subprocesses killed through their own
handles when their block ends; a subscriber's readiness is observed in the broker, never
assumed after a sleep. mosquitto_sub prints the 5.0 properties of what it receives with the
``-F`` specifiers (%P user properties, %C content type, %E message expiry interval,
%D correlation data, %R response topic, %F payload format indicator, %A topic alias,
%S subscription identifier); reason codes show in ``-d`` output, in warnings on stderr and
in the exit status (a refused CONNECT exits with the CONNACK reason code).

What mosquitto_sub 2.0.11 cannot ask for: No Local and Retain Handling (it has only
``--retain-as-published``); those are covered with MQTT.js in test_mqttjs_v5.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from mqttd.auth import hash_password
from mqttd.broker import Broker, running
from mqttd.config import Config, Security
from tests.conftest import make_config
from tests.interop.test_mosquitto_clients import (
    finish,
    run_client,
    started,
    unique_id,
    wait_subscribed,
    wait_until,
)
from tests.interop.test_mosquitto_clients import (
    pytestmark as mosquitto_installed,
)

pytestmark = mosquitto_installed

TEST_TIMEOUT_S = 20
V5, V311 = "mqttv5", "mqttv311"
# topic | QoS | retain | payload, then the 5.0 properties mosquitto_sub can print
PROPS_FORMAT = "%t|%q|%r|%p|P=%P|C=%C|E=%E|D=%D|R=%R|F=%F"


def client_args(broker: Broker, version: str, client_id: str | None) -> list[str]:
    """Host, port, protocol version and, unless None (the broker assigns one), client id."""
    args = ["-h", "127.0.0.1", "-p", str(broker.port), "-V", version]
    return args if client_id is None else [*args, "-i", client_id]


def sub_cmd(broker: Broker, version: str, client_id: str | None, *args: str) -> list[str]:
    return ["mosquitto_sub", *client_args(broker, version, client_id), *args]


def pub_cmd(broker: Broker, version: str, topic: str, payload: str, *args: str) -> list[str]:
    return [
        "mosquitto_pub", *client_args(broker, version, unique_id("pub")),
        "-t", topic, "-m", payload, *args,
    ]  # fmt: skip


async def publish(broker: Broker, topic: str, payload: str, *args: str, version: str = V5) -> None:
    """One message from mosquitto_pub (QoS 1 unless ``args`` say otherwise: it exits once
    the PUBACK is in, so the message has been routed)."""
    await run_client(pub_cmd(broker, version, topic, payload, "-q", "1", *args))


async def run(cmd: list[str], stdin: bytes = b"") -> tuple[int, list[str], str]:
    """Run a client to completion, whatever its exit status: (status, stdout lines, stderr).
    Cancelled (by the test's bound), the process is killed."""
    result = await trio.run_process(
        cmd, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode().splitlines(), result.stderr.decode()


def user_properties(*pairs: tuple[str, str]) -> list[str]:
    return [arg for key, value in pairs for arg in ("-D", "publish", "user-property", key, value)]


# -- versions side by side ------------------------------------------------------------------


async def test_v5_and_311_subscribers_on_one_filter_get_what_their_version_carries(broker):
    """One listener, a 3.1.1 and a 5.0 mosquitto_sub on one filter, a 5.0 publisher with
    properties: the 3.1.1 subscriber gets the plain message, the 5.0 one the properties."""
    with trio.fail_after(TEST_TIMEOUT_S):
        old_id, new_id = unique_id("sub311"), unique_id("sub5")
        common = ["-q", "1", "-t", "mixed/#", "-C", "2", "-F", PROPS_FORMAT]
        async with (
            started(sub_cmd(broker, V311, old_id, *common)) as old,
            started(sub_cmd(broker, V5, new_id, *common)) as new,
        ):
            await wait_subscribed(broker, old_id, "mixed/#")
            await wait_subscribed(broker, new_id, "mixed/#")
            levels = {c.client_id: c.protocol_level for c in broker.connections}
            assert (levels[old_id], levels[new_id]) == (4, 5)
            await publish(
                broker, "mixed/a", "with properties",
                *user_properties(("site", "42"), ("unit", "C")),
                "-D", "publish", "content-type", "text/plain",
                "-D", "publish", "response-topic", "mixed/reply",
                "-D", "publish", "correlation-data", "req-1",
                "-D", "publish", "payload-format-indicator", "1",
            )  # fmt: skip
            await publish(broker, "mixed/b", "from 3.1.1", version=V311)
            (old_rc, old_lines, old_err), (new_rc, new_lines, new_err) = (
                await finish(old), await finish(new)
            )
        assert old_rc == 0, old_err
        assert new_rc == 0, new_err
        # two publishers (each mosquitto_pub is a client): MQTT orders nothing between them
        assert sorted(old_lines) == [
            "mixed/a|1|0|with properties|P=|C=|E=|D=|R=|F=",
            "mixed/b|1|0|from 3.1.1|P=|C=|E=|D=|R=|F=",
        ]
        assert sorted(new_lines) == [
            "mixed/a|1|0|with properties|P=site:42 unit:C|C=text/plain|E=|D=req-1"
            "|R=mixed/reply|F=1",
            "mixed/b|1|0|from 3.1.1|P=|C=|E=|D=|R=|F=",
        ]


# -- CONNECT properties ---------------------------------------------------------------------


async def test_assigned_client_identifier(broker):
    """mosquitto_sub -V 5 without -i sends an empty client id; the CONNACK's Assigned Client
    Identifier becomes the name it goes by (its -d output), and the broker knows it so."""
    with trio.fail_after(TEST_TIMEOUT_S):
        lines = await run_client(sub_cmd(broker, V5, None, "-d", "-t", "assigned/x", "-E"))
        assert lines[0] == "Client (null) sending CONNECT"
        assert lines[1].startswith("Client auto-") and lines[1].endswith(" received CONNACK (0)")
        assigned = lines[1].split()[1]
        assert f"Client {assigned} received SUBACK" in lines


async def test_session_expiry_keeps_the_session_and_its_queue(broker):
    """-c -x 60: the session outlives the connection with its subscription; messages sent
    meanwhile (with their properties) arrive on reconnection. Without -c (-x 0) the session
    ends with the connection; DISCONNECT with session-expiry-interval 0 ends it as well."""
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("expiry")
        sub = sub_cmd(broker, V5, client_id, "-c", "-x", "60", "-q", "1", "-t", "expiry/#")
        assert await run_client([*sub, "-E"]) == []
        session = broker.sessions[client_id]
        assert session.expiry_s == 60 and session.persistent
        await wait_until(lambda: session.connection is None, "the session to be detached")

        for i in range(3):
            await publish(broker, f"expiry/{i}", f"queued {i}", *user_properties(("n", str(i))))
        assert session.queued == 3
        # --nodelay: the PUBACKs must leave before mosquitto_sub exits (see
        # test_mosquitto_clients.test_persistent_session_resumes)
        lines = await run_client([*sub, "--nodelay", "-C", "3", "-F", "%t|%p|%P"])
        # three publishers: MQTT orders nothing between them
        assert sorted(lines) == [f"expiry/{i}|queued {i}|n:{i}" for i in range(3)]
        assert broker.sessions[client_id] is session  # resumed, not replaced
        await wait_until(lambda: session.connection is None, "the second disconnect")
        assert not session.inflight and not session.queued

        # DISCONNECT with Session Expiry Interval 0: the session ends now
        await run_client([*sub, "-E", "-D", "disconnect", "session-expiry-interval", "0"])
        await wait_until(lambda: client_id not in broker.sessions, "the session to end")

        # -x 0 (the default without -c): nothing is kept
        other = unique_id("noexp")
        await run_client(sub_cmd(broker, V5, other, "-q", "1", "-t", "expiry/#", "-E"))
        await wait_until(lambda: other not in broker.sessions, "the clean session to end")


async def test_receive_maximum_one_keeps_one_message_in_flight(broker):
    """-D connect receive-maximum 1: while the subscriber does not answer (stopped with
    SIGSTOP) the broker has sent it one QoS 1 message and queues the rest; once it runs
    again every message arrives (in any order: each comes from another mosquitto_pub)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("rmax")
        cmd = sub_cmd(
            broker, V5, client_id, "-q", "1", "-t", "rmax/#", "-C", "5", "-F", "%t|%p",
            "-D", "connect", "receive-maximum", "1",
        )  # fmt: skip
        async with started(cmd) as sub:
            await wait_subscribed(broker, client_id, "rmax/#")
            session = broker.sessions[client_id]
            assert session.max_inflight == 1
            os.kill(sub.pid, signal.SIGSTOP)
            try:
                for i in range(5):
                    await publish(broker, f"rmax/{i}", f"m{i}")
                assert len(session.inflight) == 1
                assert session.queued == 4
            finally:
                os.kill(sub.pid, signal.SIGCONT)
            returncode, lines, err = await finish(sub)
        assert returncode == 0, err
        assert sorted(lines) == [f"rmax/{i}|m{i}" for i in range(5)]


async def test_maximum_packet_size_drops_only_larger_messages(broker):
    """-D connect maximum-packet-size 100: a PUBLISH that would exceed it is not sent to
    that client (and counted); smaller ones are, and another client gets everything."""
    with trio.fail_after(TEST_TIMEOUT_S):
        small_id, big_id = unique_id("small"), unique_id("big")
        common = ["-q", "1", "-t", "mps/#", "-F", "%t|%l"]
        async with (
            started(sub_cmd(broker, V5, small_id, *common, "-C", "2",
                            "-D", "connect", "maximum-packet-size", "100")) as small,
            started(sub_cmd(broker, V5, big_id, *common, "-C", "3")) as big,
        ):  # fmt: skip
            await wait_subscribed(broker, small_id, "mps/#")
            await wait_subscribed(broker, big_id, "mps/#")
            session = broker.sessions[small_id]
            await publish(broker, "mps/a", "x" * 60)
            await publish(broker, "mps/b", "x" * 200)  # > 100 bytes as a PUBLISH
            await publish(broker, "mps/c", "x" * 70)
            small_result, big_result = await finish(small), await finish(big)
        assert session.too_large == 1
        # three publishers: MQTT orders nothing between them
        assert (small_result[0], sorted(small_result[1])) == (0, ["mps/a|60", "mps/c|70"]), (
            small_result[2]
        )
        assert (big_result[0], sorted(big_result[1])) == (
            0, ["mps/a|60", "mps/b|200", "mps/c|70"]
        ), big_result[2]


# -- topic aliases ----------------------------------------------------------------------------


async def test_topic_aliases_from_the_broker_keep_topics_right(broker):
    """-D connect topic-alias-maximum 2 and four topics: the broker sets up at most two
    aliases towards the client (the first PUBLISH on a topic carries topic and alias), and
    every message has its topic. The four messages come from four mosquitto_pub, so they may
    arrive in any order: the first two topics to arrive get aliases 1 and 2. (libmosquitto
    2.0.11 treats a later PUBLISH that carries only the alias as a protocol error, though it
    advertised the maximum: reusing an alias is covered with MQTT.js.)"""
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("alias")
        cmd = sub_cmd(
            broker, V5, client_id, "-q", "1", "-t", "alias/#", "-C", "4", "-F", "%t|%A|%p",
            "-D", "connect", "topic-alias-maximum", "2",
        )  # fmt: skip
        topics = [f"alias/long/topic/name/{n}" for n in range(4)]
        async with started(cmd) as sub:
            await wait_subscribed(broker, client_id, "alias/#")
            for n, topic in enumerate(topics):
                await publish(broker, topic, f"m{n}")
            returncode, lines, err = await finish(sub)
        assert returncode == 0, err
        arrived = [line.split("|") for line in lines]
        assert sorted((topic, payload) for topic, _, payload in arrived) == [
            (topic, f"m{n}") for n, topic in enumerate(topics)
        ]
        assert [alias for _, alias, _ in arrived] == ["1", "2", "", ""]


async def test_publisher_topic_alias(broker):
    """mosquitto_pub -D publish topic-alias 3 -l: the first PUBLISH sets the alias, the next
    ones carry only the alias; the subscriber gets every message under the full topic. An
    alias above the broker's Topic Alias Maximum (10) gets DISCONNECT 0x94."""
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("asub")
        async with started(
            sub_cmd(broker, V5, client_id, "-q", "1", "-t", "palias/#", "-C", "3", "-v")
        ) as sub:  # fmt: skip
            await wait_subscribed(broker, client_id, "palias/#")
            cmd = [
                "mosquitto_pub", *client_args(broker, V5, unique_id("apub")), "-d",
                "-t", "palias/by/alias", "-q", "1", "-D", "publish", "topic-alias", "3", "-l",
            ]  # fmt: skip
            code, out, err = await run(cmd, b"".join(b"line %d\n" % i for i in range(3)))
            assert code == 0, err
            sent = [line for line in out if "sending PUBLISH" in line]
            assert [line.split(", ")[4] for line in sent] == [
                "'palias/by/alias'", "'(null)'", "'(null)'"  # topic only in the first
            ]
            returncode, lines, err = await finish(sub)
        assert returncode == 0, err
        assert lines == [f"palias/by/alias line {i}" for i in range(3)]

        cmd = pub_cmd(broker, V5, "palias/x", "over", "-q", "1", "-d",
                      "-D", "publish", "topic-alias", "11")  # fmt: skip
        code, out, err = await run(cmd)
        assert code != 0
        assert "Received DISCONNECT (148)" in out  # 0x94 Topic Alias invalid


# -- message properties ---------------------------------------------------------------------


async def test_message_properties_are_forwarded(broker):
    """User properties (in order, duplicate keys kept), content type, payload format
    indicator, response topic and correlation data reach the 5.0 subscriber as published;
    the Message Expiry Interval arrives (what is left of it, at most as published)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("props")
        cmd = sub_cmd(broker, V5, client_id, "-q", "1", "-t", "props/#", "-C", "2",
                      "-F", PROPS_FORMAT)  # fmt: skip
        async with started(cmd) as sub:
            await wait_subscribed(broker, client_id, "props/#")
            await publish(
                broker, "props/request", "{\"on\": true}",
                *user_properties(("k", "v1"), ("a", "b"), ("k", "v2")),
                "-D", "publish", "content-type", "application/json",
                "-D", "publish", "payload-format-indicator", "1",
                "-D", "publish", "response-topic", "props/reply/7",
                "-D", "publish", "correlation-data", "corr-7",
                "-D", "publish", "message-expiry-interval", "120",
            )  # fmt: skip
            await publish(broker, "props/plain", "none", "-q", "0")
            returncode, lines, err = await finish(sub)
        assert returncode == 0, err
        # two publishers: MQTT orders nothing between them (props/request first, then plain)
        lines.sort(key=lambda line: line.split("|")[0], reverse=True)
        head, _, rest = lines[0].partition("|E=")
        expiry, _, tail = rest.partition("|")
        assert head == 'props/request|1|0|{"on": true}|P=k:v1 a:b k:v2|C=application/json'
        assert 1 <= int(expiry) <= 120
        assert tail == "D=corr-7|R=props/reply/7|F=1"
        assert lines[1] == "props/plain|0|0|none|P=|C=|E=|D=|R=|F="


async def test_message_expiry(broker):
    """A retained message keeps its Message Expiry Interval, counted down, for a later
    subscriber; a message queued for an offline session whose interval passes is not
    delivered, one without an interval is."""
    with trio.fail_after(TEST_TIMEOUT_S):
        await publish(broker, "mexp/retained", "kept", "-r",
                      "-D", "publish", "message-expiry-interval", "100")  # fmt: skip
        lines = await run_client(
            sub_cmd(broker, V5, unique_id("late"), "-t", "mexp/retained", "-C", "1",
                    "-F", "%t|%r|%p|%E")
        )  # fmt: skip
        topic, retain, payload, expiry = lines[0].split("|")
        assert (topic, retain, payload) == ("mexp/retained", "1", "kept")
        assert 1 <= int(expiry) <= 100

        client_id = unique_id("mexp")
        sub = sub_cmd(broker, V5, client_id, "-c", "-x", "60", "-q", "1", "-t", "mexp/q/#")
        await run_client([*sub, "-E"])
        session = broker.sessions[client_id]
        await wait_until(lambda: session.connection is None, "the session to be detached")
        await publish(broker, "mexp/q/short", "expires", "-D", "publish",
                      "message-expiry-interval", "1")  # fmt: skip
        expires_by = time.time() + 1  # the broker received it before this
        await publish(broker, "mexp/q/forever", "stays")
        assert session.queued == 2
        # the behaviour under test is the passing of time: wait (bounded) until the wall
        # clock the broker uses is past that second, however long the publishing took
        await wait_until(lambda: time.time() > expires_by + 0.05, "the interval to pass")
        lines = await run_client([*sub, "--nodelay", "-C", "1", "-F", "%t|%p"])
        assert lines == ["mexp/q/forever|stays"]
        assert session.out.expired == 1


# -- subscriptions ----------------------------------------------------------------------------


async def test_subscription_identifier(broker):
    """-D subscribe subscription-identifier 7: deliveries on that subscription carry it
    (%S); a subscription made without one carries none."""
    with trio.fail_after(TEST_TIMEOUT_S):
        with_id, without_id = unique_id("subid"), unique_id("noid")
        common = ["-q", "1", "-t", "subid/#", "-C", "1", "-F", "%t|%S|%p"]
        async with (
            started(sub_cmd(broker, V5, with_id, *common,
                            "-D", "subscribe", "subscription-identifier", "7")) as sub,
            started(sub_cmd(broker, V5, without_id, *common)) as plain,
        ):  # fmt: skip
            await wait_subscribed(broker, with_id, "subid/#")
            await wait_subscribed(broker, without_id, "subid/#")
            await publish(broker, "subid/a", "hello")
            results = await finish(sub), await finish(plain)
        assert results[0][:2] == (0, ["subid/a|7|hello"]), results[0][2]
        assert results[1][:2] == (0, ["subid/a||hello"]), results[1][2]


async def test_retain_as_published(broker):
    """--retain-as-published: a live message published with RETAIN keeps the flag for that
    subscriber; without the option it arrives with RETAIN 0. A stored retained message sent
    on subscription has RETAIN 1 for both."""
    with trio.fail_after(TEST_TIMEOUT_S):
        await publish(broker, "rap/state", "stored", "-r")
        rap_id, plain_id = unique_id("rap"), unique_id("norap")
        common = ["-q", "1", "-t", "rap/#", "-C", "2", "-F", "%t|%r|%p"]
        async with (
            started(sub_cmd(broker, V5, rap_id, *common, "--retain-as-published")) as rap,
            started(sub_cmd(broker, V5, plain_id, *common)) as plain,
        ):
            await wait_subscribed(broker, rap_id, "rap/#")
            await wait_subscribed(broker, plain_id, "rap/#")
            await publish(broker, "rap/state", "live", "-r")
            results = await finish(rap), await finish(plain)
        # the stored message and the live one come from two publishers: MQTT orders nothing
        # between them
        rap_rc, rap_lines, rap_err = results[0]
        plain_rc, plain_lines, plain_err = results[1]
        assert (rap_rc, sorted(rap_lines)) == (0, ["rap/state|1|live", "rap/state|1|stored"]), (
            rap_err
        )
        assert (plain_rc, sorted(plain_lines)) == (
            0, ["rap/state|0|live", "rap/state|1|stored"]
        ), plain_err


async def test_shared_subscription_of_two_v5_subscribers(broker):
    """Two mosquitto_sub -V 5 in $share/workers/jobs/#: each message goes to one of them
    (in turn), with its properties."""
    with trio.fail_after(TEST_TIMEOUT_S):
        ids = [unique_id("worker"), unique_id("worker")]
        shared = "$share/workers/jobs/#"
        common = ["-q", "1", "-t", shared, "-C", "3", "-F", "%t|%p|%P"]
        async with (
            started(sub_cmd(broker, V5, ids[0], *common)) as first,
            started(sub_cmd(broker, V5, ids[1], *common)) as second,
        ):
            await wait_subscribed(broker, ids[0], shared)
            await wait_subscribed(broker, ids[1], shared)
            for i in range(6):
                await publish(broker, f"jobs/{i}", f"job {i}", *user_properties(("job", str(i))))
            results = await finish(first), await finish(second)
        for returncode, _, err in results:
            assert returncode == 0, err
        got = results[0][1] + results[1][1]
        assert len(results[0][1]) == len(results[1][1]) == 3
        assert sorted(got) == [f"jobs/{i}|job {i}|job:{i}" for i in range(6)]


# -- reason codes -------------------------------------------------------------------------------


def secured_config(tmp_path: Path) -> Config:
    """A password file (alice / secret) and an ACL: alice may publish under allowed/ and
    read everything but $SYS (a filter starting with # does not cover it)."""
    passwords = tmp_path / "passwords"
    passwords.write_text(f"alice:{hash_password('secret', 101)}\n")
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic write allowed/#\ntopic read #\n")
    return attrs.evolve(
        make_config(), security=Security(password_file=str(passwords), acl_file=str(acl))
    )


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Broker]:
    async with running(secured_config(tmp_path)) as broker:
        yield broker


async def test_reason_codes_reach_the_client(secured):
    """CONNACK 0x86 for bad credentials (mosquitto_pub exits with it; 3.1.1 gets return code
    4), PUBACK and PUBREC 0x87 for a publication the ACL denies (mosquitto_pub warns), 0x10
    No matching subscribers for an allowed one, SUBACK 0x87 for a filter the ACL denies."""
    broker = secured
    alice = ["-u", "alice", "-P", "secret"]
    with trio.fail_after(TEST_TIMEOUT_S):
        code, out, err = await run(pub_cmd(broker, V5, "allowed/x", "m", "-u", "alice",
                                           "-P", "wrong", "-d"))  # fmt: skip
        assert code == 0x86
        assert "received CONNACK (134)" in out[1]
        assert "Bad User Name or Password" in err
        code, out, err = await run(pub_cmd(broker, V311, "allowed/x", "m", "-u", "alice",
                                           "-P", "wrong"))  # fmt: skip
        assert code == 4, err

        for qos, ack in (("1", "PUBACK (Mid: 1, RC:135)"), ("2", "PUBREC (Mid: 1")):
            code, out, err = await run(
                pub_cmd(broker, V5, "denied/x", "m", *alice, "-q", qos, "-d")
            )
            assert code == 0, err
            assert any(ack in line for line in out), out
            assert "Warning: Publish 1 failed: Not authorized." in err
        assert broker.acl_denied_publish == 2

        code, out, err = await run(pub_cmd(broker, V5, "allowed/x", "m", *alice, "-q", "1", "-d"))
        assert code == 0 and not err
        assert any("PUBACK (Mid: 1, RC:16)" in line for line in out), out

        code, out, err = await run(
            sub_cmd(broker, V5, unique_id("subs"), *alice, "-t", "$SYS/#", "-t", "a/#", "-E", "-d")
        )
        assert code == 0, err
        assert "Subscribed (mid: 1): 135, 0" in out


async def test_takeover_disconnect_reason_code(broker):
    """A second connection with the same client id: the first gets DISCONNECT 0x8E Session
    taken over (mosquitto_sub -d prints it and exits)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        client_id = unique_id("taken")
        async with started(sub_cmd(broker, V5, client_id, "-d", "-t", "take/#")) as first:
            await wait_subscribed(broker, client_id, "take/#")
            await run_client(sub_cmd(broker, V5, client_id, "-t", "take/#", "-E"))
            returncode, lines, err = await finish(first)
        assert returncode == 0, err
        assert lines[-1] == "Received DISCONNECT (142)"
