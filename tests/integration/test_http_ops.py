"""The operations listener over real HTTP: Prometheus metrics (format, types, values checked
against what the test did), health and readiness, errors; the configuration rules (loopback
unless a credential is set; --host/-p leave it off unless --http-port)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import attrs
import pytest
import trio

from mqttd.broker import Broker, running
from mqttd.codec.packets import Publish
from mqttd.config import ConfigError, Http, parse_config
from tests.conftest import make_config
from tests.rawclient import RawClient

TIMEOUT_S = 30.0
SAMPLE = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\S+)$')


def ops_config(**http: object):  # type: ignore[no-untyped-def]
    return attrs.evolve(make_config(), http=Http(port=0, **http))  # type: ignore[arg-type]


async def get(broker: Broker, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of a real HTTP request to the operations listener."""
    host, port = broker.http_addresses[0]

    def request() -> tuple[int, str, str]:
        req = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return (response.status, response.headers["content-type"],
                        response.read().decode())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["content-type"], exc.read().decode()

    return await trio.to_thread.run_sync(request)


def parse_metrics(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """(family -> type, "name{labels}" -> value); fails on any line that is not valid."""
    types: dict[str, str] = {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            match = SAMPLE.match(line)
            assert match, f"not a valid sample line: {line!r}"
            family = match.group(1)
            assert family in types, f"{family} has no TYPE line before its samples"
            values[family + (match.group(2) or "")] = float(match.group(4))
    for name, kind in types.items():
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
    return types, values


async def test_metrics_report_what_happened() -> None:
    async with running(ops_config(metrics_clients="sensor-*")) as broker:
        with trio.fail_after(TIMEOUT_S):
            sub, _ = await RawClient.connected(broker.port, "sensor-1", keepalive_s=0)
            await sub.subscribe("data/#", qos=1)
            pub, _ = await RawClient.connected(broker.port, "backend", keepalive_s=0)
            for n in range(3):
                await pub.publish("data/x", b"%d" % n, qos=1)
            for _ in range(3):
                await sub.take(Publish)
            status, content_type, text = await get(broker, "/metrics")
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            types, values = parse_metrics(text)
            assert types["mqttd_messages_received_total"] == "counter"
            assert types["mqttd_queued_messages"] == "gauge"
            assert values["mqttd_messages_received_total"] == 3
            assert values["mqttd_messages_sent_total"] == 3
            assert values["mqttd_connections"] == 2
            assert values["mqttd_subscriptions"] == 1
            assert values['mqttd_messages_dropped_total{reason="queue_full"}'] == 0
            assert values['mqttd_messages_refused_total{reason="no_storage"}'] == 0
            assert values["mqttd_bytes_received_total"] > 0
            assert values["process_resident_memory_bytes"] > 1_000_000
            assert values["process_open_fds"] > 0
            # per-client series only for the opted-in pattern
            assert values['mqttd_client_messages_sent_total{client_id="sensor-1"}'] == 3
            assert not any('client_id="backend"' in key for key in values)
            await sub.aclose()
            await pub.aclose()


async def test_health_readiness_and_errors() -> None:
    async with running(ops_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            status, content_type, body = await get(broker, "/healthz")
            assert (status, content_type, json.loads(body)) == (
                200, "application/json", {"status": "ok"}
            )
            status, _, body = await get(broker, "/readyz")
            assert (status, json.loads(body)) == (200, {"status": "ready"})
            status, _, body = await get(broker, "/nothing")
            assert status == 404 and "no such resource" in json.loads(body)["error"]
            status, _, body = await get(broker, "/metrics", method="POST")
            assert status == 401 and "credential" in json.loads(body)["error"]  # changes state
            assert broker.ops is not None
            status, body_json = await request(broker, "/metrics", "POST", broker.ops.token)
            assert status == 405 and "not allowed" in body_json["error"]


async def test_open_reads_need_a_loopback_host_name() -> None:
    """A page whose name resolves to 127.0.0.1 (DNS rebinding) sends its own Host: it gets
    nothing without the token; the dashboard's files (no data) load anyway."""
    async with running(ops_config()) as broker:
        host, port = broker.http_addresses[0]
        token = broker.ops.token  # type: ignore[union-attr]

        def status(path: str, host_header: str, token: str | None = None) -> int:
            req = urllib.request.Request(f"http://{host}:{port}{path}")
            req.add_header("Host", host_header)
            if token is not None:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        with trio.fail_after(TIMEOUT_S):
            for name, expected in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200),
                                   (f"[::1]:{port}", 200), ("localhost", 200),
                                   (f"evil.example:{port}", 401), ("127.0.0.1.nip.io", 401)):
                got = await trio.to_thread.run_sync(status, "/api/v1/stats", name)
                assert got == expected, name
            assert await trio.to_thread.run_sync(
                status, "/api/v1/stats", "evil.example", token) == 200
            # /api/v1/cluster: the same rules (404 here: a single node)
            assert await trio.to_thread.run_sync(status, "/api/v1/cluster", "evil.example") == 401
            assert await trio.to_thread.run_sync(
                status, "/api/v1/cluster", "evil.example", token) == 404
            for path in ("/", "/healthz", "/readyz"):  # no data: open to probes and pages
                assert await trio.to_thread.run_sync(status, path, "evil.example") == 200


async def test_readyz_says_why_when_the_store_has_no_room() -> None:
    async with running(ops_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            broker.writer.accepting = False  # type: ignore[union-attr]
            broker.writer.storage_problem = "disk full (test)"  # type: ignore[union-attr]
            status, _, body = await get(broker, "/readyz")
            assert status == 503
            assert json.loads(body)["problems"] == ["the store has no room: disk full (test)"]
            broker.writer.accepting = True  # type: ignore[union-attr]


def test_a_non_loopback_ops_listener_needs_a_credential() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("http:\n  host: 0.0.0.0\n")
    assert "http.host" in str(error.value) and "http.token" in str(error.value)
    assert parse_config("http:\n  host: 0.0.0.0\n  token: s3cret\n").http.host == "0.0.0.0"


async def test_command_line_http_port(tmp_path) -> None:
    """-p leaves the operations listener off; --http-port 0 turns it on, on a free port,
    and logs where it is."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mqttd", "--host", "127.0.0.1", "-p", "0", "--http-port", "0",
         "--data-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
    )
    log = bytearray()
    pattern = re.compile(rb"operations \(HTTP\) on http://127\.0\.0\.1:(\d+)/")
    try:
        with trio.fail_after(TIMEOUT_S):
            while not (match := pattern.search(log)):
                chunk = await proc.stderr.receive_some(4096)  # type: ignore[union-attr]
                assert chunk, f"broker exited early: {log.decode()}"
                log += chunk
            port = int(match.group(1))

            def healthz() -> int:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                    return int(r.status)

            assert await trio.to_thread.run_sync(healthz) == 200
    finally:
        proc.kill()
        await proc.wait()


async def test_the_read_only_admin_api() -> None:
    """/api/v1/clients (paged, filtered), /api/v1/clients/{id} with its subscriptions,
    /api/v1/stats, /api/v1/bridges; unknown ids are 404, bad parameters 400."""
    async with running(ops_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            sensors = []
            for n in range(3):
                client, _ = await RawClient.connected(broker.port, f"sensor-{n}", keepalive_s=30)
                sensors.append(client)
            worker, _ = await RawClient.connected(broker.port, "worker", clean_session=False,
                                                  keepalive_s=0)
            await worker.subscribe("jobs/#", qos=1)
            await worker.aclose()  # away: its session stays
            pub, _ = await RawClient.connected(broker.port, "pub", keepalive_s=0)
            await pub.publish("jobs/x", b"job", qos=1)  # queued for the worker

            status, _, body = await get(broker, "/api/v1/clients?id=sensor-*&limit=2")
            page = json.loads(body)
            assert status == 200 and (page["total"], page["limit"]) == (3, 2)
            assert [c["client_id"] for c in page["clients"]] == ["sensor-0", "sensor-1"]
            first = page["clients"][0]
            assert first["connected"] and first["protocol"] == "3.1.1"
            assert first["keepalive_s"] == 30 and first["address"].startswith("127.0.0.1:")
            status, _, body = await get(broker, "/api/v1/clients?id=sensor-*&offset=2")
            assert [c["client_id"] for c in json.loads(body)["clients"]] == ["sensor-2"]

            status, _, body = await get(broker, "/api/v1/clients?connected=false")
            away = json.loads(body)["clients"]
            assert [(c["client_id"], c["queued"], c["persistent"]) for c in away] == [
                ("worker", 1, True)
            ]
            status, _, body = await get(broker, "/api/v1/clients/worker")
            detail = json.loads(body)
            assert status == 200 and detail["subscriptions"] == [{"filter": "jobs/#", "qos": 1}]
            assert detail["connected_at"] is None and detail["disconnected_at"] > 0

            status, _, body = await get(broker, "/api/v1/clients/nobody")
            assert status == 404 and "nobody" in json.loads(body)["error"]
            status, _, body = await get(broker, "/api/v1/clients?limit=lots")
            assert status == 400 and "limit" in json.loads(body)["error"]
            status, _, body = await get(broker, "/api/v1/stats")
            assert status == 200 and json.loads(body)["messages_received"] == 1
            status, _, body = await get(broker, "/api/v1/bridges")
            assert (status, json.loads(body)) == (200, {"bridges": []})
            status, _, body = await get(broker, "/api/v1/cluster")  # not in cluster mode
            assert status == 404 and "not in cluster mode" in json.loads(body)["error"]
            for client in (*sensors, pub):
                await client.aclose()


async def request(broker: Broker, path: str, method: str, token: str | None) -> tuple[int, dict]:
    host, port = broker.http_addresses[0]

    def send() -> tuple[int, dict]:
        req = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await trio.to_thread.run_sync(send)


async def test_kick_and_delete_need_the_credential_and_do_what_they_say() -> None:
    from mqttd.codec.packets import PROTOCOL_5, Disconnect

    async with running(ops_config()) as broker:
        with trio.fail_after(TIMEOUT_S):
            assert broker.ops is not None
            token = broker.ops.token
            device, _ = await RawClient.connected(broker.port, "device", keepalive_s=0,
                                                  protocol_level=PROTOCOL_5)
            # no credential, or a wrong one: refused, nothing done
            assert (await request(broker, "/api/v1/clients/device", "DELETE", None))[0] == 401
            assert (await request(broker, "/api/v1/clients/device", "DELETE", "nope"))[0] == 401
            assert broker.client_stats("device")["connected"]  # type: ignore[index]
            # kick: a 5.0 client is told why, then closed; a persistent session would stay
            status, body = await request(broker, "/api/v1/clients/device", "DELETE", token)
            assert (status, body) == (200, {"done": "connected client", "client_id": "device"})
            got = await device.expect_closed()
            assert got == [Disconnect(0x98, got[0].properties)]  # type: ignore[union-attr]
            status, _ = await request(broker, "/api/v1/clients/device", "DELETE", token)
            assert status == 404  # not connected any more

            worker, _ = await RawClient.connected(broker.port, "worker", clean_session=False,
                                                  keepalive_s=0)
            await worker.subscribe("jobs/#", qos=1)
            await worker.aclose()
            status, body = await request(broker, "/api/v1/sessions/worker", "DELETE", token)
            assert (status, body) == (200, {"done": "session", "client_id": "worker"})
            assert "worker" not in broker.sessions and broker.stats()["subscriptions"] == 0
            assert (await request(broker, "/api/v1/sessions/worker", "DELETE", token))[0] == 404


def test_the_api_token_is_generated_once_into_the_data_directory(tmp_path) -> None:
    import stat

    from mqttd.config import Persistence
    from mqttd.service import api_token

    persistence = Persistence(data_dir=str(tmp_path))
    token = api_token(persistence)
    path = tmp_path / "api-token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert api_token(persistence) == token  # read back, not generated again


async def test_subscriptions_and_retained_messages(tmp_path) -> None:
    """/api/v1/subscriptions (by client pattern, exact filter, matching topic; shared groups
    shown); /api/v1/retained by filter (text and binary payloads); DELETE of one retained
    message needs the credential, tells no subscriber, and stays deleted after a restart."""
    config = attrs.evolve(make_config(tmp_path), http=Http(port=0))
    async with running(config) as broker:
        with trio.fail_after(TIMEOUT_S):
            worker, _ = await RawClient.connected(broker.port, "worker", keepalive_s=0)
            await worker.subscribe("$share/jobs/jobs/+", "status/#", qos=1)
            sensor, _ = await RawClient.connected(broker.port, "sensor", keepalive_s=0)
            await sensor.subscribe("cmd/sensor", qos=0)
            await sensor.publish("status/a", b"online", qos=1, retain=True)
            await sensor.publish("status/b", b"\xff\x00", qos=1, retain=True)
            await sensor.publish("other", b"x", qos=1, retain=True)
            routed = [await worker.take(Publish) for _ in range(2)]
            assert sorted(p.topic for p in routed) == ["status/a", "status/b"]  # type: ignore[attr-defined]

            status, _, body = await get(broker, "/api/v1/subscriptions?client_id=w*")
            page = json.loads(body)
            assert status == 200 and page["total"] == 2
            assert [(s["filter"], s["qos"], s["share_group"]) for s in page["subscriptions"]] == [
                ("$share/jobs/jobs/+", 1, "jobs"), ("status/#", 1, None)
            ]
            _, _, body = await get(broker, "/api/v1/subscriptions?match=jobs/7")
            assert [s["client_id"] for s in json.loads(body)["subscriptions"]] == ["worker"]
            _, _, body = await get(broker, "/api/v1/subscriptions?filter=cmd/sensor")
            assert [s["client_id"] for s in json.loads(body)["subscriptions"]] == ["sensor"]

            status, _, body = await get(broker, "/api/v1/retained?filter=status/%2B")
            page = json.loads(body)
            assert status == 200 and page["total"] == 2
            assert page["retained"][0] == {
                "topic": "status/a", "qos": 1, "payload_bytes": 6, "truncated": False,
                "expires_at": None, "payload": "online",
            }
            assert page["retained"][1]["payload_base64"] == "/wA="
            _, _, body = await get(broker, "/api/v1/retained")
            assert [m["topic"] for m in json.loads(body)["retained"]] == [
                "other", "status/a", "status/b"
            ]
            status, _, body = await get(broker, "/api/v1/retained?filter=a/%23/b")
            assert status == 400 and "filter" in json.loads(body)["error"]

            token = broker.ops.token  # type: ignore[union-attr]
            assert (await request(broker, "/api/v1/retained/status/a", "DELETE", None))[0] == 401
            status, reply = await request(broker, "/api/v1/retained/status%2Fa", "DELETE", token)
            assert (status, reply) == (200, {"done": "retained message", "topic": "status/a"})
            assert (await request(broker, "/api/v1/retained/status/a", "DELETE", token))[0] == 404
            # subscribers were not sent an empty retained message: the next thing the
            # worker gets is what is published after the delete
            await sensor.publish("status/c", b"later", qos=0)
            assert (await worker.take(Publish)).topic == "status/c"  # type: ignore[attr-defined]
            for client in (worker, sensor):
                await client.aclose()
    async with running(config) as broker:  # ($SYS values are retained too, once published)
        stored = sorted(t for t, _ in broker.retained.items() if not t.startswith("$SYS/"))
        assert stored == ["other", "status/b"]
