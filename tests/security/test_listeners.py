"""Several listeners on one broker: per-listener max_connections (beside the global limit),
refusals counted, each connection knowing its listener, and the listening lines logged
with their scheme."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from mqttd.broker import running
from mqttd.codec.packets import ConnAck, Connect, Publish
from mqttd.config import Listener
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient
from tests.security.test_tls import (
    Certs,
    client_context,
    config_with,
    open_tls,
    port_of,
    server_of,
    tls_connected,
)
from tests.security.test_websocket import ws_client, ws_listener

TEST_TIMEOUT_S = 20
UPGRADE_REQUEST = (
    b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
)


def plain(**kwargs: object) -> Listener:
    return Listener(host="127.0.0.1", port=0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs.make(tmp_path / "certs")


async def assert_refused(port: int, told: bool = True) -> None:
    """The connection is refused: a plain MQTT listener answers the CONNECT with CONNACK
    0x03 Server unavailable (3.1.1 has no "busy") and closes; ``told=False``: a TLS
    listener closes at once (a CONNECT gets no CONNACK)."""
    client = await RawClient.open(port)
    try:
        await client.send(Connect("refused"))
    except trio.BrokenResourceError:
        assert not told
        return
    assert await client.expect_closed() == ([ConnAck(False, 3)] if told else [])


async def test_per_listener_max_connections():
    config = config_with(plain(max_connections=1), plain())
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            server = server_of(broker)
            limited, unlimited = port_of(broker, 0), port_of(broker, 1)
            first, _ = await RawClient.connected(limited, "first")
            await assert_refused(limited)
            # the other listener is not affected
            others = [(await RawClient.connected(unlimited, f"other-{i}"))[0] for i in range(3)]
            assert server.listeners[0].refused == 1
            assert server.listeners[1].refused == 0
            assert broker.limits_exceeded.get("listener_connections") == 1
            assert {c.client_id for c in broker.connections} == {
                "first", "other-0", "other-1", "other-2"
            }
            # a place frees up when the first client leaves
            await first.aclose()
            await wait_until(lambda: server.listeners[0].connections == 0)
            again, connack = await RawClient.connected(limited, "again")
            assert connack.return_code == 0
            await again.publish("limits/x", b"served", qos=1)
            for client in (again, *others):
                await client.aclose()


async def test_global_limit_spans_listeners_and_is_counted():
    config = config_with(plain(), plain(), max_connections=2)
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            server = server_of(broker)
            a, _ = await RawClient.connected(port_of(broker, 0), "a")
            b, _ = await RawClient.connected(port_of(broker, 1), "b")
            await assert_refused(port_of(broker, 0))
            await assert_refused(port_of(broker, 1))
            assert server.refused == 2
            assert broker.limits_exceeded.get("connections") == 2
            assert [ls.refused for ls in server.listeners] == [0, 0]
            await a.aclose()
            await b.aclose()


async def test_tls_handshake_in_progress_counts_against_the_listener(certs):
    config = config_with(plain(tls=certs.tls(), max_connections=1))
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            server = server_of(broker)
            silent = await trio.open_tcp_stream("127.0.0.1", broker.port)  # no ClientHello
            await wait_until(lambda: server.listeners[0].connections == 1)
            await assert_refused(broker.port, told=False)
            assert server.listeners[0].refused == 1
            await silent.aclose()
            await wait_until(lambda: server.listeners[0].connections == 0)
            client, connack = await tls_connected(
                broker.port, client_context(certs.ca_file), "after-silent"
            )
            assert connack.return_code == 0
            await client.aclose()


async def test_websocket_listener_max_connections():
    config = config_with(ws_listener(max_connections=1))
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            server = server_of(broker)
            async with ws_client(broker.port) as first:
                await first.send(Connect("ws-first"))
                await first.message()
                # refused before the upgrade, like a TCP client: closed without an answer
                stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
                answer = b""
                try:
                    await stream.send_all(UPGRADE_REQUEST)
                    while chunk := await stream.receive_some(4096):
                        answer += chunk
                except trio.BrokenResourceError:
                    pass
                assert answer == b""
                await stream.aclose()
                assert server.listeners[0].refused == 1
            await wait_until(lambda: server.listeners[0].connections == 0)
            async with ws_client(broker.port) as second:
                await second.send(Connect("ws-second"))
                await second.message()


async def test_each_connection_knows_its_listener_and_all_listeners_serve(certs):
    listeners = (
        plain(),
        plain(tls=certs.tls()),
        ws_listener("/mqtt"),
        ws_listener("/secure", tls=certs.tls()),
    )
    async with running(config_with(*listeners)) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            context = client_context(certs.ca_file)
            sub, _ = await RawClient.connected(port_of(broker, 0), "tcp")
            await sub.subscribe("every/#", qos=1)
            tls, _ = await tls_connected(port_of(broker, 1), context, "tls")
            await tls.publish("every/tls", b"mqtts", qos=1)
            async with (
                ws_client(port_of(broker, 2)) as ws,
                ws_client(port_of(broker, 3), "/secure", use_ssl=context) as wss,
            ):
                for client, client_id in ((ws, "ws"), (wss, "wss")):
                    await client.send(Connect(client_id))
                    await client.message()  # CONNACK
                    await client.send(Publish(f"every/{client_id}", client_id.encode()))
                got = {(await sub.expect(Publish)).payload for _ in range(3)}
                assert got == {b"mqtts", b"ws", b"wss"}
                by_id = {c.client_id: c.listener for c in broker.connections}
                assert by_id == dict(zip(("tcp", "tls", "ws", "wss"), listeners, strict=True))
            await sub.aclose()
            await tls.aclose()
            assert [ls.scheme for ls in server_of(broker).listeners] == [
                "mqtt", "mqtts", "ws", "wss"
            ]


async def test_every_listener_is_logged_with_its_scheme(certs, caplog):
    caplog.set_level(logging.INFO, logger="mqttd")
    listeners = (
        plain(),
        plain(tls=certs.tls(cafile=certs.ca_file, require_certificate=True)),
        ws_listener("/mqtt"),
        ws_listener("/mqtt", tls=certs.tls()),
    )
    async with running(config_with(*listeners)) as broker:
        ports = [port_of(broker, i) for i in range(4)]
    lines = {r.getMessage() for r in caplog.records}
    assert f"mqttd listening on 127.0.0.1:{ports[0]}" in lines
    assert (
        f"mqttd listening on 127.0.0.1:{ports[1]} (mqtts, client certificate required)" in lines
    )
    assert f"mqttd listening on 127.0.0.1:{ports[2]} (ws, path /mqtt)" in lines
    assert f"mqttd listening on 127.0.0.1:{ports[3]} (wss, path /mqtt)" in lines


async def test_refused_connections_do_not_flood_the_log(caplog):
    caplog.set_level(logging.WARNING, logger="mqttd")
    async with running(config_with(plain(max_connections=1))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            first, _ = await RawClient.connected(broker.port, "first")
            for _ in range(5):
                await assert_refused(broker.port)
            assert server_of(broker).listeners[0].refused == 5
            refusals = [r for r in caplog.records if "connection limit" in r.getMessage()]
            assert len(refusals) == 1
            assert "connection limit (1) reached" in refusals[0].getMessage()
            await first.aclose()


async def test_tls_stream_under_a_limit_still_closes_cleanly(certs):
    """A TLS client refused by the limit sees its connection closed, not a hang."""
    config = config_with(plain(tls=certs.tls(), max_connections=1))
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            context = client_context(certs.ca_file)
            client, _ = await tls_connected(broker.port, context, "holder")
            with pytest.raises(trio.BrokenResourceError):
                await open_tls(broker.port, context)
            await client.aclose()
