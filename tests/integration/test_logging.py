"""Logs an operator can use: JSON lines, a log file, connect/disconnect lines (on and off),
the periodic summary, the packet trace at debug, wills and refusals; over real sockets with
the broker in-process, and once through ``python -m mqttd``."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from mqttd.broker import running
from mqttd.codec.packets import PROTOCOL_5, Disconnect, PubAck, Publish, Will
from mqttd.config import Config, ConfigError, Logging, Monitoring
from mqttd.logs import HANDLER_NAME, JsonFormatter, configure_logging, sent_fields
from tests.conftest import make_config
from tests.integration.test_cli import drain, start_broker
from tests.rawclient import RawClient

TIMEOUT_S = 20.0
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def logging_config(**logging_keys: object) -> Config:
    return attrs.evolve(make_config(), logging=Logging(**logging_keys))  # type: ignore[arg-type]


class LogWatch(logging.Handler):
    """The records of the ``mqttd`` loggers, and a wait for one that matches (woken by each
    new record, from whichever thread logs it: no polling)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def matching(self, **fields: object) -> list[logging.LogRecord]:
        """The records with these ``extra`` fields."""
        return [
            r for r in list(self.records)
            if all(getattr(r, key, None) == value for key, value in fields.items())
        ]

    async def wait_for(
        self, predicate: Callable[[logging.LogRecord], bool] | None = None, **fields: object
    ) -> logging.LogRecord:
        with trio.fail_after(TIMEOUT_S):
            while True:
                changed = self._changed  # a record logged from now on sets it
                for record in self.matching(**fields):
                    if predicate is None or predicate(record):
                        return record
                await changed.wait()


@pytest.fixture
async def watch() -> AsyncIterator[LogWatch]:
    """Records of ``mqttd`` at INFO and above (no packet trace); ``debug(watch)`` for all."""
    logger = logging.getLogger("mqttd")
    handler = LogWatch()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def debug() -> None:
    logging.getLogger("mqttd").setLevel(logging.DEBUG)


# -- connect and disconnect lines ------------------------------------------------------------


async def test_connect_and_disconnect_lines(watch: LogWatch) -> None:
    async with running(logging_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            clean, _ = await RawClient.connected(broker.port, "log-clean", keepalive_s=30)
            address = f"127.0.0.1:{clean.stream.socket.getsockname()[1]}"
            line = watch.matching(event="connect", client_id="log-clean")[0]
            assert (line.levelname, line.name) == ("INFO", "mqttd.connections")
            assert line.address == address  # type: ignore[attr-defined]
            assert line.protocol == "3.1.1"  # type: ignore[attr-defined]
            assert line.session == "clean" and line.keepalive_s == 30  # type: ignore[attr-defined]
            assert line.getMessage() == (
                f"client log-clean connected from {address}: MQTT 3.1.1, clean session, "
                "keepalive 30s"
            )
            await clean.send(Disconnect())
            await clean.expect_closed()
            gone = await watch.wait_for(event="disconnect", client_id="log-clean")
            assert gone.reason == "client sent DISCONNECT"  # type: ignore[attr-defined]
            assert gone.address == address  # type: ignore[attr-defined]
            assert gone.getMessage().startswith(
                f"client log-clean disconnected from {address}: client sent DISCONNECT ("
            )

            five, _ = await RawClient.connected(
                broker.port, "log-five", clean_session=False, protocol_level=PROTOCOL_5
            )  # no Session Expiry Interval: the session ends with the connection
            line = watch.matching(event="connect", client_id="log-five")[0]
            assert line.protocol == "5.0" and line.session == "clean"  # type: ignore[attr-defined]
            await five.aclose()
            kept, _ = await RawClient.connected(broker.port, "log-kept", clean_session=False)
            line = watch.matching(event="connect", client_id="log-kept")[0]
            assert line.session == "persistent"  # type: ignore[attr-defined]
            await kept.aclose()  # no DISCONNECT
            gone = await watch.wait_for(event="disconnect", client_id="log-kept")
            assert gone.reason == "connection closed by the client without DISCONNECT"  # type: ignore[attr-defined]
            again, _ = await RawClient.connected(broker.port, "log-kept", clean_session=False)
            line = watch.matching(event="connect", client_id="log-kept")[-1]
            assert "persistent session (resumed)" in line.getMessage()
            # a takeover ends the first connection with its reason
            third, _ = await RawClient.connected(broker.port, "log-kept", clean_session=False)
            await watch.wait_for(
                lambda r: "taken over" in r.reason,  # type: ignore[attr-defined]
                event="disconnect", client_id="log-kept",
            )
            await again.expect_closed()
            await third.aclose()


async def test_connections_off_logs_no_connect_or_disconnect_line(watch: LogWatch) -> None:
    async with running(logging_config(connections=False)) as broker:
        with trio.fail_after(TIMEOUT_S):
            will = Will("status/quiet", b"gone", 1)
            client, _ = await RawClient.connected(broker.port, "quiet", will=will)
            await client.aclose()
            # the will's line comes after the disconnect line would have
            await watch.wait_for(event="will", client_id="quiet")
    assert watch.matching(event="connect") == watch.matching(event="disconnect") == []


# -- wills and refusals ----------------------------------------------------------------------


async def test_a_will_published_on_a_lost_connection_is_logged(watch: LogWatch) -> None:
    async with running(logging_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            sub, _ = await RawClient.connected(broker.port, "will-watcher")
            await sub.subscribe("status/#", qos=1)
            will = Will("status/dev-7", b"offline", 1)
            dev, _ = await RawClient.connected(broker.port, "dev-7", will=will)
            await dev.aclose()
            message = await sub.expect(Publish)
            assert message.topic == "status/dev-7"  # type: ignore[attr-defined]
            line = watch.matching(event="will", client_id="dev-7")[0]  # before it was routed
            assert line.topic == "status/dev-7"  # type: ignore[attr-defined]
            reason = "connection closed by the client without DISCONNECT"
            assert line.reason == reason  # type: ignore[attr-defined]
            assert line.getMessage() == f"client dev-7: will published to 'status/dev-7' ({reason})"
            await sub.aclose()


@attrs.define
class NoSecrets:
    """An authorizer: nothing under ``secret/`` for anyone."""

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        return not topic.startswith("secret/")

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        return not topic_filter.startswith(("secret/", "#"))

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        return True


async def test_refused_subscriptions_and_denied_publishes_are_logged(watch: LogWatch) -> None:
    async with running(logging_config(), authorizer=NoSecrets()) as broker:
        with trio.fail_after(TIMEOUT_S):
            old, _ = await RawClient.connected(broker.port, "nosy-311")
            suback = await old.subscribe("open/#", "secret/#", qos=1)
            assert suback.return_codes == (1, 0x80)
            new, _ = await RawClient.connected(broker.port, "nosy-5", protocol_level=PROTOCOL_5)
            suback = await new.subscribe("secret/plans")
            assert suback.return_codes == (0x87,)
            await old.publish("secret/x", b"leak", qos=1)  # acknowledged, dropped
        refused = watch.matching(event="subscribe_refused")
        assert [(r.client_id, r.filter, r.reason_code) for r in refused] == [  # type: ignore[attr-defined]
            ("nosy-311", "secret/#", 0x80), ("nosy-5", "secret/plans", 0x87),
        ]
        assert "refused with 0x87 Not authorized: denied by the ACL" in refused[1].getMessage()
        (denied,) = watch.matching(event="publish_denied")
        assert (denied.client_id, denied.topic) == ("nosy-311", "secret/x")  # type: ignore[attr-defined]
        assert denied.levelname == "WARNING"
        for client in (old, new):
            await client.aclose()


# -- the summary -----------------------------------------------------------------------------


async def test_the_summary_line_comes_every_interval(watch: LogWatch) -> None:
    async with running(logging_config(summary_interval_s=0.05)) as broker:
        with trio.fail_after(TIMEOUT_S):
            sub, _ = await RawClient.connected(broker.port, "sum-sub")
            await sub.subscribe("sum/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "sum-pub")
            for n in range(5):
                await pub.publish("sum/x", b"%d" % n, qos=1)
            for _ in range(5):
                await sub.take(Publish)
            # the first line after the publishes counts them in its interval
            line = await watch.wait_for(
                lambda r: r.messages_in_per_s > 0,  # type: ignore[attr-defined]
                event="summary", connections=2,
            )
            assert line.name == "mqttd.summary" and line.levelname == "INFO"
            values = {key: getattr(line, key) for key in (
                "connections", "messages_in_per_s", "messages_out_per_s", "queued", "dropped",
                "store_commits", "store_commits_per_s", "interval_s",
            )}
            assert values["queued"] == values["dropped"] == 0
            assert values["interval_s"] > 0 and values["messages_out_per_s"] >= 0
            assert line.getMessage().startswith("summary: 2 connections, ")
            assert "messages/s in" in line.getMessage()
            for client in (sub, pub):
                await client.aclose()


async def test_summary_interval_zero_schedules_nothing() -> None:
    config = attrs.evolve(
        logging_config(summary_interval_s=0), monitoring=Monitoring(sys_interval_s=0)
    )
    async with running(config) as broker:
        assert len(broker.timers) == 0
    async with running(attrs.evolve(config, logging=Logging(summary_interval_s=60))) as broker:
        assert len(broker.timers) == 1


# -- the packet trace ------------------------------------------------------------------------


async def test_packet_trace_shows_publishes_both_ways(watch: LogWatch) -> None:
    debug()
    async with running(logging_config(level="debug")) as broker:
        with trio.fail_after(TIMEOUT_S):
            sub, _ = await RawClient.connected(broker.port, "trace-sub")
            await sub.subscribe("trace/#", qos=1)
            sub5, _ = await RawClient.connected(
                broker.port, "trace-sub5", protocol_level=PROTOCOL_5
            )
            await sub5.subscribe("trace/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "trace-pub")
            await pub.send(Publish("trace/t1", b"12345", 1, False, False, 77))
            await pub.expect(PubAck)
            got = await sub.expect(Publish)
            got5 = await sub5.expect(Publish)
            assert all(conn.trace for conn in broker.connections)

        (sent,) = watch.matching(direction="in", client_id="trace-pub", packet="PUBLISH")
        assert (sent.name, sent.levelname) == ("mqttd.trace", "DEBUG")
        assert (sent.packet_id, sent.topic, sent.qos, sent.retain, sent.dup,  # type: ignore[attr-defined]
                sent.payload_bytes) == (77, "trace/t1", 1, False, False, 5)  # type: ignore[attr-defined]
        assert sent.getMessage().startswith("client trace-pub (127.0.0.1:")
        assert "in PUBLISH packet_id=77 topic='trace/t1' qos=1 retain=False dup=False " \
            "payload_bytes=5" in sent.getMessage()
        assert "12345" not in sent.getMessage()  # never the payload
        (ack,) = watch.matching(direction="out", client_id="trace-pub", packet="PUBACK")
        assert ack.packet_id == 77  # type: ignore[attr-defined]
        for client_id, packet in (("trace-sub", got), ("trace-sub5", got5)):
            (out,) = watch.matching(direction="out", client_id=client_id, packet="PUBLISH")
            assert (out.packet_id, out.topic, out.qos, out.payload_bytes) == (  # type: ignore[attr-defined]
                packet.packet_id, "trace/t1", 1, 5,  # type: ignore[attr-defined]
            )
        connects = watch.matching(direction="in", packet="CONNECT")
        assert {r.connect_client_id for r in connects} >= {"trace-pub", "trace-sub"}  # type: ignore[attr-defined]
        assert watch.matching(direction="out", client_id="trace-sub", packet="SUBACK")
        for client in (sub, sub5, pub):
            await client.aclose()


async def test_no_packet_trace_above_debug(watch: LogWatch) -> None:
    async with running(logging_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            client, _ = await RawClient.connected(broker.port, "untraced")
            await client.publish("x/y", b"z", qos=1)
            assert not any(conn.trace for conn in broker.connections)
            await client.aclose()
    assert watch.matching(direction="in") == []


def test_sent_fields_read_the_headers_of_whole_packets() -> None:
    data = (
        Publish("a/b", b"xyz", 2, True, True, 513).encode(PROTOCOL_5)
        + PubAck(9).encode()
        + Publish("c", b"", 0).encode()
    )
    assert list(sent_fields(data, PROTOCOL_5)) == [
        {"packet": "PUBLISH", "packet_id": 513, "topic": "a/b", "qos": 2, "retain": True,
         "dup": True, "payload_bytes": 3},
        {"packet": "PUBACK", "packet_id": 9},
        {"packet": "PUBLISH", "packet_id": None, "topic": "c", "qos": 0, "retain": False,
         "dup": False, "payload_bytes": 0},
    ]
    assert list(sent_fields(data[:4], PROTOCOL_5)) == [{"packet": "(cut short)", "bytes": 4}]


# -- the formats and the file ----------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back as it was after configure_logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def test_json_lines_have_the_fields() -> None:
    logger = logging.getLogger("mqttd.test")
    record = logger.makeRecord(
        "mqttd.test", logging.WARNING, __file__, 1, "client %s: %s", ("c-1", "boom"), None,
        extra={"client_id": "c-1", "address": "127.0.0.1:5", "reason": "why", "when": object()},
    )
    line = json.loads(JsonFormatter().format(record))
    assert ISO_UTC_MS.match(line["ts"]), line["ts"]
    assert line["level"] == "warning" and line["logger"] == "mqttd.test"
    assert line["msg"] == "client c-1: boom"
    assert (line["client_id"], line["address"], line["reason"]) == ("c-1", "127.0.0.1:5", "why")
    assert line["when"].startswith("<object object")  # what JSON cannot hold, as text
    assert "exc" not in line and "args" not in line and "levelno" not in line
    try:
        raise ValueError("bad value")
    except ValueError:
        record = logger.makeRecord(
            "mqttd.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["exc"].startswith("Traceback") and "ValueError: bad value" in line["exc"]


def test_configure_logging_json_to_a_stream(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(Logging(level="warning", format="json"), stream=stream)
    log = logging.getLogger("mqttd.test")
    log.info("not at info")
    log.warning("client %s gone", "c-2", extra={"client_id": "c-2"})
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert [(x["level"], x["msg"], x["client_id"]) for x in lines] == [
        ("warning", "client c-2 gone", "c-2")
    ]


def test_configure_logging_appends_to_the_file_and_reopens_it(
    tmp_path: Path, root_logging: None
) -> None:
    path = tmp_path / "mqttd.log"
    path.write_text("an earlier line\n")
    configure_logging(Logging(file=str(path)))
    configure_logging(Logging(file=str(path)))  # replaces its handler, keeps the others
    ours = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 1
    log = logging.getLogger("mqttd.test")
    log.info("to the file")
    lines = path.read_text().splitlines()
    assert lines[0] == "an earlier line" and len(lines) == 2
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mqttd.test: to the file$",
                    lines[1]), lines[1]
    path.rename(tmp_path / "mqttd.log.1")  # logrotate
    log.info("after the rotation")
    assert path.read_text().endswith("INFO mqttd.test: after the rotation\n")


def test_a_log_file_that_cannot_be_opened_is_a_config_error(
    tmp_path: Path, root_logging: None
) -> None:
    with pytest.raises(ConfigError, match=r"^logging\.file: cannot open .*missing/x\.log: "):
        configure_logging(Logging(file=str(tmp_path / "missing" / "x.log")))


async def test_the_command_writes_json_lines(tmp_path: Path) -> None:
    config = tmp_path / "json.yaml"
    config.write_text("logging: {format: json, summary_interval_s: 0.05}\n")
    proc, port, log = await start_broker("-c", str(config), "--data-dir", str(tmp_path))
    try:
        with trio.fail_after(30):
            client, _ = await RawClient.connected(port, "json-client")
            await client.send(Disconnect())
            await client.expect_closed()
            while b'"event": "disconnect"' not in log or b'"event": "summary"' not in log:
                chunk = await proc.stderr.receive_some(4096)  # type: ignore[union-attr]
                assert chunk, log.decode()
                log += chunk
            proc.send_signal(signal.SIGTERM)
            await drain(proc, log)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [json.loads(text) for text in log.decode().splitlines()]
    assert all(ISO_UTC_MS.match(line["ts"]) for line in lines)
    assert any("listening on" in line["msg"] for line in lines)
    events = {line.get("event"): line for line in lines}
    assert events["connect"]["client_id"] == events["disconnect"]["client_id"] == "json-client"
    assert events["disconnect"]["reason"] == "client sent DISCONNECT"
    assert events["summary"]["logger"] == "mqttd.summary"
    assert any(line["msg"] == "mqttd stopped" for line in lines)
