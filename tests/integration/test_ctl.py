"""``mqttd ctl`` against a real broker in this process (operations listener on a free port,
SQLite in a temporary data directory, so the api-token file exists): every command as a
table and as --json, token resolution, the exit statuses; and once as ``python -m
mqttd.ctl`` in a subprocess. ``ctl.main`` runs in a worker thread while trio serves it."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import attrs
import pytest
import trio

from mqttd import cluster_view, ctl
from mqttd.broker import Broker, running
from mqttd.codec.packets import PROTOCOL_5, PROTOCOL_311, Disconnect, Publish
from mqttd.config import Config, Http
from mqttd.service import API_TOKEN_FILE
from tests.conftest import make_config
from tests.integration.test_bridge import edge_config, link
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient

TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parents[2]
WHEN = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")


@pytest.fixture(autouse=True)
def _no_ctl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MQTTD_URL", raising=False)
    monkeypatch.delenv("MQTTD_TOKEN", raising=False)


def ops_config(data_dir: Path) -> Config:
    return attrs.evolve(make_config(data_dir), http=Http(port=0))


def url(broker: Broker) -> str:
    host, port = broker.http_addresses[0]
    return f"http://{host}:{port}"


async def run_ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``mqttd ctl argv``, run in a worker thread."""
    code = await trio.to_thread.run_sync(ctl.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_ctl(broker: Broker, data_dir: Path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``mqttd ctl --url <the broker> --data-dir <its data dir> argv``."""

    async def call(*argv: str) -> tuple[int, str, str]:
        return await run_ctl(capsys, "--url", url(broker), "--data-dir", str(data_dir), *argv)

    return call


def cells(out: str) -> list[list[str]]:
    """A table's lines split into their cells (cells hold no double spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.strip()]


def fields(out: str) -> dict[str, str]:
    """``key: value`` lines (up to the first line that is not one)."""
    result = {}
    for line in out.splitlines():
        match = re.match(r"^([a-z_0-9]+):\s+(.*)$", line)
        if match is None:
            break
        result[match.group(1)] = match.group(2)
    return result


async def test_clients_as_a_table_filtered_paged_and_as_json(tmp_path: Path, capsys) -> None:
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            sensors = []
            for n, level in enumerate((PROTOCOL_311, PROTOCOL_311, PROTOCOL_5)):
                client, _ = await RawClient.connected(broker.port, f"sensor-{n}", keepalive_s=30,
                                                      protocol_level=level)
                sensors.append(client)
            worker, _ = await RawClient.connected(broker.port, "worker", clean_session=False,
                                                  keepalive_s=0)
            await worker.subscribe("jobs/#", qos=1)
            await worker.aclose()
            pub, _ = await RawClient.connected(broker.port, "pub", keepalive_s=0)
            await pub.publish("jobs/1", b"job", qos=1)  # queued for the worker, away

            code, out, err = await mqttd_ctl("clients")
            assert (code, err) == (0, "")
            table = cells(out)
            assert table[0] == ["CLIENT ID", "CONN", "PROTO", "ADDRESS", "QUEUED", "INFLIGHT",
                                "SENT", "DROPPED", "SINCE"]
            assert [row[0] for row in table[1:]] == [
                "pub", "sensor-0", "sensor-1", "sensor-2", "worker"
            ]
            sensor_2 = table[4]
            assert sensor_2[1:3] == ["yes", "5.0"] and sensor_2[3].startswith("127.0.0.1:")
            assert sensor_2[4:8] == ["0", "0", "0", "0"] and WHEN.match(sensor_2[8])
            # away: no protocol or address, its queue, since when it left
            assert table[5][:8] == ["worker", "no", "-", "-", "1", "0", "0", "0"]
            assert WHEN.match(table[5][8])
            lines = out.splitlines()  # aligned: each header starts its column
            for header in ("CONN", "PROTO", "ADDRESS", "SINCE"):
                column = lines[0].index(header)
                assert all(line[column - 2 : column] == "  " for line in lines), header

            _, out, _ = await mqttd_ctl("clients", "--id", "sensor-[01]")
            assert [row[0] for row in cells(out)[1:]] == ["sensor-0", "sensor-1"]
            _, out, _ = await mqttd_ctl("clients", "--disconnected")
            assert [row[0] for row in cells(out)[1:]] == ["worker"]
            _, out, _ = await mqttd_ctl("clients", "--connected", "--id", "*r*")
            assert [row[0] for row in cells(out)[1:]] == ["sensor-0", "sensor-1", "sensor-2"]
            _, out, _ = await mqttd_ctl("clients", "--limit", "2")
            assert [row[0] for row in cells(out)[1:-1]] == ["pub", "sensor-0"]
            assert out.splitlines()[-1].startswith("(2 of 5 clients shown: --all")
            _, out, _ = await mqttd_ctl("clients", "--all", "--limit", "2")  # pages of two
            assert len(cells(out)) == 6 and "shown" not in out

            code, out, _ = await mqttd_ctl("--json", "clients", "--disconnected")
            page = json.loads(out)
            assert code == 0 and (page["total"], page["offset"]) == (1, 0)
            [away] = page["clients"]
            assert (away["client_id"], away["connected"], away["persistent"]) == (
                "worker", False, True
            )
            assert (away["queued"], away["subscriptions"]) == (1, 1)
            _, out, _ = await mqttd_ctl("clients", "--all", "--limit", "2", "--json")
            page = json.loads(out)
            assert page["total"] == 5 and len(page["clients"]) == 5
            for client in (*sensors, pub):
                await client.aclose()


async def test_one_client_as_fields_and_json_and_an_unknown_one(tmp_path: Path, capsys) -> None:
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            worker, _ = await RawClient.connected(broker.port, "worker", keepalive_s=45)
            await worker.subscribe("jobs/#", "$share/g/tasks/+", qos=1)

            code, out, err = await mqttd_ctl("client", "worker")
            assert (code, err) == (0, "")
            shown = fields(out)
            assert shown["client_id"] == "worker" and shown["connected"] == "yes"
            assert shown["persistent"] == "no" and shown["protocol"] == "3.1.1"
            assert shown["keepalive_s"] == "45" and shown["username"] == "-"
            assert WHEN.match(shown["connected_at"]) and shown["disconnected_at"] == "-"
            assert shown["queued"] == "0" and shown["subscriptions"] == "2"
            assert cells(out.split("\nsubscriptions:")[1].split("\n", 1)[1]) == [
                ["FILTER", "QOS"], ["$share/g/tasks/+", "1"], ["jobs/#", "1"]
            ]
            _, out, _ = await mqttd_ctl("--json", "client", "worker")
            detail = json.loads(out)
            assert detail["client_id"] == "worker" and detail["subscriptions"] == [
                {"filter": "$share/g/tasks/+", "qos": 1}, {"filter": "jobs/#", "qos": 1}
            ]
            code, out, err = await mqttd_ctl("client", "nobody")
            assert (code, out, err) == (1, "", "mqttd ctl: no client 'nobody'\n")
            await worker.aclose()


async def test_kick_and_session_rm(tmp_path: Path, capsys) -> None:
    """Both need the credential: here from the api-token file of --data-dir."""
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            assert (tmp_path / API_TOKEN_FILE).exists()
            device, _ = await RawClient.connected(broker.port, "device", keepalive_s=0,
                                                  protocol_level=PROTOCOL_5)
            code, out, err = await mqttd_ctl("kick", "device")
            assert (code, out, err) == (0, "disconnected client 'device'\n", "")
            got = await device.expect_closed()  # told why, then closed
            assert got == [Disconnect(0x98, got[0].properties)]  # type: ignore[union-attr]
            code, out, err = await mqttd_ctl("kick", "device")
            assert (code, out) == (1, "") and err == "mqttd ctl: no connected client 'device'\n"

            other, _ = await RawClient.connected(broker.port, "a/b c", keepalive_s=0)
            code, out, _ = await mqttd_ctl("--json", "kick", "a/b c")  # quoted in the path
            assert (code, json.loads(out)) == (
                0, {"done": "connected client", "client_id": "a/b c"}
            )
            assert await other.expect_closed() == []

            worker, _ = await RawClient.connected(broker.port, "worker", clean_session=False,
                                                  keepalive_s=0)
            await worker.subscribe("jobs/#", qos=1)
            await worker.aclose()
            await wait_until(lambda: broker.sessions["worker"].connection is None)
            code, out, err = await mqttd_ctl("session", "rm", "worker")
            assert (code, err) == (0, "")
            assert out == "deleted the session of 'worker' (its subscriptions and queue)\n"
            assert "worker" not in broker.sessions and broker.stats()["subscriptions"] == 0
            code, _, err = await mqttd_ctl("client", "worker")
            assert (code, err) == (1, "mqttd ctl: no client 'worker'\n")
            code, _, err = await mqttd_ctl("session", "rm", "worker")
            assert (code, err) == (1, "mqttd ctl: no session 'worker'\n")
            again, _ = await RawClient.connected(broker.port, "again", clean_session=False)
            code, out, _ = await mqttd_ctl("session", "rm", "again", "--json")  # option after
            assert (code, json.loads(out)) == (0, {"done": "session", "client_id": "again"})
            assert await again.expect_closed() == []  # a connected client's session: closed


async def test_subscriptions(tmp_path: Path, capsys) -> None:
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            worker, _ = await RawClient.connected(broker.port, "worker", keepalive_s=0)
            await worker.subscribe("$share/jobs/jobs/+", "status/#", qos=1)
            sensor, _ = await RawClient.connected(broker.port, "sensor", keepalive_s=0)
            await sensor.subscribe("cmd/sensor", qos=0)

            code, out, err = await mqttd_ctl("subscriptions")
            assert (code, err) == (0, "")
            assert cells(out) == [
                ["CLIENT ID", "FILTER", "QOS", "GROUP", "CONN"],
                ["sensor", "cmd/sensor", "0", "-", "yes"],
                ["worker", "$share/jobs/jobs/+", "1", "jobs", "yes"],
                ["worker", "status/#", "1", "-", "yes"],
            ]
            _, out, _ = await mqttd_ctl("subscriptions", "--client", "w*")
            assert [row[1] for row in cells(out)[1:]] == ["$share/jobs/jobs/+", "status/#"]
            _, out, _ = await mqttd_ctl("subscriptions", "--match", "jobs/7")
            assert [row[:2] for row in cells(out)[1:]] == [["worker", "$share/jobs/jobs/+"]]
            _, out, _ = await mqttd_ctl("subscriptions", "--filter", "cmd/sensor")
            assert [row[0] for row in cells(out)[1:]] == ["sensor"]
            _, out, _ = await mqttd_ctl("subscriptions", "--limit", "1")
            assert out.splitlines()[-1].startswith("(1 of 3 subscriptions shown")
            code, out, _ = await mqttd_ctl("--json", "subscriptions", "--client", "sensor")
            assert code == 0 and json.loads(out)["subscriptions"] == [
                {"client_id": "sensor", "filter": "cmd/sensor", "qos": 0, "share_group": None,
                 "connected": True}
            ]
            for client in (worker, sensor):
                await client.aclose()


async def test_retained_ls_and_rm(tmp_path: Path, capsys) -> None:
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            sensor, _ = await RawClient.connected(broker.port, "sensor", keepalive_s=0)
            odd = "status/100% sure? ü"  # a space, %, ?, non-ASCII: quoted in the path
            await sensor.publish("status/a", b"online", qos=1, retain=True)
            await sensor.publish("status/b", b"\xff\x00\x01", qos=1, retain=True)
            await sensor.publish("status/long", b"x" * 100, qos=0, retain=True)
            await sensor.publish("status/lines", b"one\ntwo", qos=1, retain=True)
            await sensor.publish(odd, b"odd", qos=1, retain=True)
            await sensor.publish("other", b"elsewhere", qos=1, retain=True)

            code, out, err = await mqttd_ctl("retained", "ls")
            assert (code, err) == (0, "")
            assert cells(out) == [
                ["TOPIC", "QOS", "BYTES", "PAYLOAD"],
                ["other", "1", "9", "elsewhere"],
                [odd, "1", "3", "odd"],
                ["status/a", "1", "6", "online"],
                ["status/b", "1", "3", "<binary 3 bytes>"],
                ["status/lines", "1", "7", "one\\ntwo"],
                ["status/long", "0", "100", "x" * 37 + "..."],
            ]
            _, out, _ = await mqttd_ctl("retained", "ls", "status/+")
            assert [row[0] for row in cells(out)[1:]] == [
                odd, "status/a", "status/b", "status/lines", "status/long"
            ]
            code, out, _ = await mqttd_ctl("--json", "retained", "ls", "status/b")
            assert code == 0 and json.loads(out)["retained"] == [{
                "topic": "status/b", "qos": 1, "payload_bytes": 3, "truncated": False,
                "expires_at": None, "payload_base64": "/wAB",
            }]
            code, _, err = await mqttd_ctl("retained", "ls", "a/#/b")
            assert code == 1 and err.startswith("mqttd ctl: filter: ")

            code, out, err = await mqttd_ctl("retained", "rm", odd)
            assert (code, out, err) == (0, f"deleted the retained message of {odd!r}\n", "")
            code, out, _ = await mqttd_ctl("retained", "rm", "status/a", "--json")
            assert (code, json.loads(out)) == (
                0, {"done": "retained message", "topic": "status/a"}
            )
            assert {topic for topic, _ in broker.retained.items()}.isdisjoint({odd, "status/a"})
            _, out, _ = await mqttd_ctl("retained", "ls")
            assert [row[0] for row in cells(out)[1:]] == [
                "other", "status/b", "status/lines", "status/long"
            ]
            code, _, err = await mqttd_ctl("retained", "rm", "status/a")
            assert (code, err) == (1, "mqttd ctl: no retained message 'status/a'\n")
            await sensor.aclose()


async def test_bridges_empty_and_with_a_link(tmp_path: Path, capsys) -> None:
    async with running(ops_config(tmp_path / "cloud")) as cloud:
        with trio.fail_after(TIMEOUT_S):
            code, out, err = await make_ctl(cloud, tmp_path / "cloud", capsys)("bridges")
            assert (code, err) == (0, "")
            assert cells(out) == [["NAME", "STATE", "REMOTE", "FORWARDED", "RECEIVED", "QUEUED",
                                   "DROPPED", "LAST ERROR"]]
            _, out, _ = await make_ctl(cloud, tmp_path / "cloud", capsys)("bridges", "--json")
            assert json.loads(out) == {"bridges": []}

            edge_dir = tmp_path / "edge"
            config = attrs.evolve(edge_config(cloud.port, edge_dir), http=Http(port=0))
            async with running(config) as edge:
                await wait_until(lambda: link(edge)["state"] == "connected")
                pub, _ = await RawClient.connected(edge.port, "sensor", keepalive_s=0)
                await pub.publish("site/1", b"up", qos=1)
                await wait_until(lambda: link(edge)["forwarded"] == 1)
                code, out, _ = await make_ctl(edge, edge_dir, capsys)("bridges")
                assert code == 0 and cells(out)[1] == [
                    "cloud", "connected", f"127.0.0.1:{cloud.port}", "1", "0", "0", "0", "-"
                ]
                await pub.aclose()


async def test_stats_once_watched_and_as_json(tmp_path: Path, capsys) -> None:
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            sub, _ = await RawClient.connected(broker.port, "sub", keepalive_s=0)
            await sub.subscribe("t", qos=1)
            for n in range(3):
                await sub.publish("t", b"%d" % n, qos=1)
            for _ in range(3):
                await sub.take(Publish)

            code, out, err = await mqttd_ctl("stats")
            assert (code, err) == (0, "")
            shown = fields(out)
            assert shown["connections"] == "1" and shown["subscriptions"] == "1"
            assert shown["messages_received"] == "3" and shown["storage_ok"] == "1"
            assert list(shown) == [key for key in ctl.STATS_SHOWN if key in shown]

            code, out, _ = await mqttd_ctl("stats", "--watch", "0.01", "--count", "2")
            blocks = out.split("\n\n")
            assert code == 0 and len(blocks) == 2
            for block in blocks:
                assert re.match(r"^\d\d:\d\d:\d\d  http://127\.0\.0\.1:\d+\n", block)
            first, second = (fields(block.split("\n", 1)[1]) for block in blocks)
            assert first["messages_received"] == "3"  # no rate before a second sample
            assert re.fullmatch(r"3  \(0\.0/s\)", second["messages_received"])
            assert re.fullmatch(r"\d+  \([\d.]+/s\)", second["messages_sent"])
            assert "/s" not in second["queued"]

            code, out, _ = await mqttd_ctl("--json", "stats", "--watch", "0.01", "--count", "2")
            samples = [json.loads(line) for line in out.splitlines()]  # one document a line
            assert code == 0 and len(samples) == 2
            assert all(sample["messages_received"] == 3 for sample in samples)
            code, out, _ = await mqttd_ctl("stats", "--json")
            stats = json.loads(out)
            assert code == 0 and set(stats) == set(broker.stats())  # the API's document
            assert (stats["messages_received"], stats["messages_sent"]) == (3, 3)
            await sub.aclose()


def test_rates_are_per_second_from_the_deltas() -> None:
    before = {"messages_received": 100, "messages_sent": 50, "queued": 7}
    after = {"messages_received": 130, "messages_sent": 110, "queued": 9}
    assert ctl._rates(None, 2.0, after) == {}
    assert ctl._rates((10.0, before), 12.0, after) == {
        "messages_received": 15.0, "messages_sent": 30.0
    }


def test_tables_align_escape_and_cut() -> None:
    assert ctl.table(("NAME", "N", "OK"), [("a\x1b[31m", 5, True), ("bb", 123, None)],
                     right=(1,)) == (
        "NAME         N  OK\n"
        "a\\x1b[31m    5  yes\n"
        "bb         123  -"
    )
    assert ctl.payload_shown({"payload": "é" * 50, "payload_bytes": 100}) == "é" * 37 + "..."
    assert ctl.payload_shown({"payload": "cut", "payload_bytes": 9000, "truncated": True}) == (
        "cut..."
    )
    assert ctl.payload_shown({"payload_base64": "AA==", "payload_bytes": 1}) == (
        "<binary 1 bytes>"
    )


async def test_health_ready_and_not(tmp_path: Path, capsys) -> None:
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            code, out, err = await mqttd_ctl("health")
            assert (code, out, err) == (0, "healthz: ok\nreadyz:  ready\n", "")
            _, out, _ = await mqttd_ctl("health", "--json")
            assert json.loads(out) == {"healthz": {"status": "ok"},
                                       "readyz": {"status": "ready"}}
            writer = broker.writer
            assert writer is not None
            writer.accepting = False
            writer.storage_problem = "disk full (test)"
            code, out, _ = await mqttd_ctl("health")
            assert code == 1 and out == (
                "healthz: ok\nreadyz:  not ready: the store has no room: disk full (test)\n"
            )
            code, out, _ = await mqttd_ctl("--json", "health")
            assert code == 1 and json.loads(out)["readyz"]["status"] == "not ready"
            writer.accepting = True


async def test_cluster_on_a_single_node_is_an_api_error(tmp_path: Path, capsys) -> None:
    """Not in cluster mode: the API answers 404 with why, ctl exits 1 with it."""
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            mqttd_ctl = make_ctl(broker, tmp_path, capsys)
            for argv in (("cluster",), ("cluster", "--json")):
                code, out, err = await mqttd_ctl(*argv)
                assert (code, out) == (1, "")
                assert err == ("mqttd ctl: not in cluster mode (cluster.enabled is false): "
                               "this broker is a single node\n")


def test_cluster_table_lists_the_nodes_and_the_totals() -> None:
    """The table of ``mqttd ctl cluster`` (end to end: tests/cluster/test_cluster_view_e2e.py)."""
    view = cluster_view.overview("n0", [
        cluster_view.Heartbeat("n0", 0.2, {"state": "alive", "boot": 1, "connections": 2,
                                           "sessions": 2, "messages_received": 10,
                                           "messages_sent": 20, "queued": 0, "dropped": 0,
                                           "retained": 3}),
        cluster_view.Heartbeat("n1", 9.0, {"state": "alive", "boot": 1, "connections": 5}),
        cluster_view.Heartbeat("n2", 0.1, {"state": "alive", "boot": 2, "connections": 1,
                                           "sessions": 1, "messages_received": 1,
                                           "messages_sent": 0, "queued": 4, "dropped": 1,
                                           "retained": 3}),
    ], 2.0)
    out = ctl.cluster_table(view)
    assert cells(out)[:5] == [
        ["NODE", "UP", "STATE", "HEARTBEAT", "CONN", "SESSIONS", "MSGS IN", "MSGS OUT",
         "QUEUED", "DROPPED", "RETAINED"],
        ["n0 *", "up", "alive", "0.2s", "2", "2", "10", "20", "0", "0", "3"],
        ["n1", "down", "alive", "9.0s", "5", "-", "-", "-", "-", "-", "-"],
        ["n2", "up", "alive", "0.1s", "1", "1", "1", "0", "4", "1", "3"],
        ["TOTAL (2 up)", "3", "3", "11", "20", "4", "1", "3"],
    ]
    assert out.splitlines()[-1].startswith("(* the node answering: n0;")


async def test_where_the_url_and_the_token_come_from(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--token, MQTTD_TOKEN, -c (its http: section and data directory); a 401 says which
    token was sent or where none was found."""
    data_dir = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no ./data/api-token here
    async with running(ops_config(data_dir)) as broker:
        with trio.fail_after(TIMEOUT_S):
            token = (data_dir / API_TOKEN_FILE).read_text().strip()
            assert broker.ops is not None and token == broker.ops.token
            at = ("--url", url(broker))
            code, out, err = await run_ctl(capsys, *at, "kick", "nobody")  # no token
            assert (code, out) == (1, "")
            assert err.startswith("mqttd ctl: this request needs the credential")
            assert "no token was sent: none given (--token, MQTTD_TOKEN, http.token)" in err
            assert f"no {Path('./data') / API_TOKEN_FILE}: pass --token" in err
            code, _, err = await run_ctl(capsys, *at, "--token", "wrong", "kick", "nobody")
            assert code == 1 and "the token sent (from --token) is not the broker's" in err
            code, _, err = await run_ctl(capsys, *at, f"--token={token}", "kick", "nobody")
            assert (code, err) == (1, "mqttd ctl: no connected client 'nobody'\n")  # got in
            code, _, err = await run_ctl(capsys, *at, "--data-dir", str(data_dir), "kick", "x")
            assert (code, err) == (1, "mqttd ctl: no connected client 'x'\n")

            monkeypatch.setenv("MQTTD_TOKEN", "from-env")
            code, _, err = await run_ctl(capsys, *at, "kick", "nobody")
            assert code == 1 and "(from the environment (MQTTD_TOKEN))" in err
            monkeypatch.setenv("MQTTD_TOKEN", token)
            monkeypatch.setenv("MQTTD_URL", url(broker))
            code, _, err = await run_ctl(capsys, "kick", "nobody")
            assert (code, err) == (1, "mqttd ctl: no connected client 'nobody'\n")
            monkeypatch.delenv("MQTTD_TOKEN")
            monkeypatch.setenv("MQTTD_URL", "http://127.0.0.1:1")  # -c wins over it

            port = broker.http_addresses[0][1]
            config = tmp_path / "mqttd.yaml"
            config.write_text(f"http:\n  port: {port}\npersistence:\n  data_dir: {data_dir}\n")
            code, _, err = await run_ctl(capsys, "-c", str(config), "kick", "nobody")
            assert (code, err) == (1, "mqttd ctl: no connected client 'nobody'\n")
            other = tmp_path / "other.yaml"
            other.write_text(f"http:\n  port: {port}\n  token: not-the-one\n")
            code, _, err = await run_ctl(capsys, "-c", str(other), "kick", "nobody")
            assert code == 1 and f"(from http.token in {other}) is not the broker's" in err


def free_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_broker_is_exit_status_3(tmp_path: Path, capsys) -> None:
    with trio.fail_after(TIMEOUT_S):
        port = free_port()
        code, out, err = await run_ctl(capsys, "--url", f"http://127.0.0.1:{port}", "health")
        assert (code, out) == (3, "")
        assert err == (
            f"mqttd ctl: cannot reach http://127.0.0.1:{port}: connection refused — is the "
            "broker running with its operations listener on? (http: in the config, or "
            "--http-port)\n"
        )
        config = tmp_path / "off.yaml"
        config.write_text(f"http:\n  enabled: false\n  port: {port}\n")
        code, _, err = await run_ctl(capsys, "-c", str(config), "clients")
        assert code == 3 and err.rstrip().endswith("turns it off (http.enabled: false)")


@pytest.mark.parametrize("argv", [
    [], ["nothing"], ["clients", "--connected", "--disconnected"], ["stats", "--count", "2"],
    ["stats", "--watch", "0"], ["clients", "--limit", "lots"], ["session"], ["retained"],
    ["--url", "ftp://example.com", "health"], ["-c", "/nonexistent/mqttd.yaml", "health"],
])
def test_usage_errors_are_exit_status_2(argv: list[str], capsys) -> None:
    assert ctl.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip()


def test_help_is_exit_status_0(capsys) -> None:
    assert ctl.main(["--help"]) == 0
    assert "retained" in capsys.readouterr().out


async def test_python_m_mqttd_ctl_prints_the_stats_as_json(tmp_path: Path) -> None:
    async with running(ops_config(tmp_path)) as broker:
        with trio.fail_after(TIMEOUT_S):
            client, _ = await RawClient.connected(broker.port, "one", keepalive_s=0)
            result = await trio.run_process(
                [sys.executable, "-m", "mqttd.ctl", "--url", url(broker), "--json", "stats"],
                capture_stdout=True, capture_stderr=True, cwd=REPO, check=False,
            )
            assert (result.returncode, result.stderr) == (0, b"")
            stats = json.loads(result.stdout)
            assert stats["connections"] == 1 and stats["sessions"] == 1
            await client.aclose()
