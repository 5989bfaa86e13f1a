"""WebSocket listeners over real sockets: paho-mqtt's websockets transport, MQTT.js under
node, a raw MQTT-over-WebSocket client (trio-websocket + mqttd's codec), and WebSocket over
TLS. The broker runs in-process on 127.0.0.1 port 0."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from paho.mqtt.client import WebsocketConnectionError
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    open_websocket,
    wrap_client_stream,
)

from mqttd.broker import running
from mqttd.codec import Decoder
from mqttd.codec.packets import (
    ConnAck,
    Connect,
    Packet,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
)
from mqttd.config import Listener
from tests.integration.test_broker_tcp import assert_healthy, wait_until
from tests.interop.test_paho import Paho, unique_id
from tests.rawclient import RawClient
from tests.security.test_tls import (
    V311,
    Certs,
    client_context,
    config_with,
    paho_client,
    paho_roundtrip,
    port_of,
    server_of,
)

TEST_TIMEOUT_S = 20
MQTTJS_DIR = Path(__file__).resolve().parent / "mqttjs"
NPM_INSTALL_TIMEOUT_S = 300


def ws_listener(path: str = "/mqtt", **kwargs: Any) -> Listener:
    return Listener(host="127.0.0.1", port=0, protocol="websockets", path=path, **kwargs)


def plain_listener() -> Listener:
    return Listener(host="127.0.0.1", port=0)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs.make(tmp_path / "certs")


def websockets(path: str = "/mqtt", ca_file: str | None = None) -> Any:
    """A paho ``setup`` for the websockets transport (over TLS when ``ca_file`` is given)."""

    def setup(client: Any) -> None:
        client.transport = "websockets"
        client.ws_set_options(path=path)
        if ca_file is not None:
            client.tls_set(ca_certs=ca_file)

    return setup


class WSClient:
    """MQTT over a trio-websocket client connection, with byte-level control of how the
    packets are cut into WebSocket messages."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.decoder = Decoder()
        self.received: list[Packet] = []

    async def send(self, *packets: Packet) -> None:
        """All ``packets`` in one WebSocket message."""
        await self.ws.send_message(b"".join(p.encode() for p in packets))

    async def message(self) -> bytes:
        message = await self.ws.get_message()
        assert isinstance(message, bytes), "the broker sends binary frames"
        return message

    async def expect(self, kind: type) -> Any:
        while not self.received:
            self.received.extend(self.decoder.feed(await self.message()))
        packet = self.received.pop(0)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet


@asynccontextmanager
async def ws_client(
    port: int, path: str = "/mqtt", subprotocols: tuple[str, ...] = ("mqtt",), use_ssl: Any = False
) -> AsyncIterator[WSClient]:
    async with open_websocket(
        "127.0.0.1", port, path, use_ssl=use_ssl, subprotocols=subprotocols
    ) as ws:
        yield WSClient(ws)


# -- paho-mqtt ------------------------------------------------------------------------------


async def test_paho_over_websocket_qos_0_and_1():
    async with running(config_with(ws_listener())) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            async with (
                paho_client(broker.port, "ws-sub", setup=websockets()) as sub,
                paho_client(broker.port, "ws-pub", setup=websockets()) as pub,
            ):
                await paho_roundtrip(sub, pub, "paho/ws")
                conns = {c.client_id: c for c in broker.connections}
                assert conns[sub.client_id].listener.protocol == "websockets"


async def test_websocket_and_tcp_clients_exchange_messages():
    async with running(config_with(plain_listener(), ws_listener("/ws"))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            async with paho_client(port_of(broker, 1), "ws-sub", setup=websockets("/ws")) as sub:
                await sub.subscribe("mixed/#", 1)
                pub, _ = await RawClient.connected(port_of(broker, 0), "tcp-pub")
                await pub.publish("mixed/a", b"tcp to ws", qos=1)
                message = await sub.message()
                assert (message.topic, message.payload, message.qos) == ("mixed/a", b"tcp to ws", 1)
                await pub.aclose()


async def test_paho_over_websocket_with_tls(certs):
    listener = ws_listener(tls=certs.tls())
    async with running(config_with(listener)) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            setup = websockets(ca_file=certs.ca_file)
            async with (
                paho_client(broker.port, "wss-sub", setup=setup) as sub,
                paho_client(broker.port, "wss-pub", setup=setup) as pub,
            ):
                await paho_roundtrip(sub, pub, "paho/wss")


async def test_wrong_path_is_refused():
    async with running(config_with(ws_listener("/mqtt"))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            with pytest.raises(ConnectionRejected) as excinfo:
                async with ws_client(broker.port, "/other"):
                    pass
            assert excinfo.value.status_code == 404
            client = Paho(unique_id("wrong-path"), V311)
            websockets("/other")(client.client)
            try:
                with pytest.raises(WebsocketConnectionError):
                    await trio.to_thread.run_sync(client.client.connect, "127.0.0.1", broker.port)
            finally:
                await client.close()
            # a query string does not change the path
            async with ws_client(broker.port, "/mqtt?token=abc") as ws:
                await ws.send(Connect("query"))
                assert (await ws.expect(ConnAck)).return_code == 0
            # counted as each refused connection's handler ends: polled, bounded
            await wait_until(lambda: server_of(broker).listeners[0].handshake_failures == 2)


async def test_mqtt_subprotocol_is_required():
    async with running(config_with(ws_listener())) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            with pytest.raises(ConnectionRejected) as excinfo:
                async with ws_client(broker.port, subprotocols=()):
                    pass
            assert excinfo.value.status_code == 400
            with pytest.raises(ConnectionRejected):
                async with ws_client(broker.port, subprotocols=("chat",)):
                    pass
            for offered, chosen in ((("mqttv3.1",), "mqttv3.1"), (("chat", "mqtt"), "mqtt")):
                async with ws_client(broker.port, subprotocols=offered) as ws:
                    assert ws.ws.subprotocol == chosen
                    await ws.send(Connect(f"sub-{chosen}"))
                    assert (await ws.expect(ConnAck)).return_code == 0


async def test_plain_http_request_is_answered_and_closed_at_once():
    # connect_timeout_s far beyond the test's bound: the close must not wait for it
    async with running(config_with(ws_listener(), connect_timeout_s=60)) as broker:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
            await stream.send_all(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            response = b""
            while chunk := await stream.receive_some(4096):
                response += chunk
            assert response.startswith(b"HTTP/1.1 400")
            await stream.aclose()
            await wait_until(lambda: server_of(broker).connections == 0)


# -- framing ------------------------------------------------------------------------------------


async def test_packets_and_messages_need_not_line_up():
    async with running(config_with(ws_listener())) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            async with ws_client(broker.port) as ws:
                # two packets in one message; the replies (CONNACK, SUBACK) are produced by
                # one read, so the writer sends them as one message as well
                await ws.send(Connect("framing"), Subscribe(1, (Subscription("frame/#", 1),)))
                reply = await ws.message()
                assert reply == ConnAck(False, 0).encode() + SubAck(1, (1,)).encode()
                # one packet cut across three messages
                data = Publish("frame/x", b"spans messages" * 100, 1, packet_id=7).encode()
                for part in (data[:3], data[3:500], data[500:]):
                    await ws.ws.send_message(part)
                got = [await ws.expect(Packet), await ws.expect(Packet)]
                [message] = [p for p in got if isinstance(p, Publish)]
                assert message.payload == b"spans messages" * 100
                assert PubAck(7) in got


async def test_text_frame_closes_the_connection():
    async with running(config_with(ws_listener())) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            async with ws_client(broker.port) as ws:
                await ws.send(Connect("texter"))
                await ws.expect(ConnAck)
                await ws.ws.send_message("not binary")  # MQTT-6.0.0-1
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.ws.get_message()
            await wait_until(lambda: not broker.connections and not server_of(broker).connections)


async def test_stalled_websocket_subscriber_is_disconnected():
    """A WebSocket client that stops reading blocks its writer in ``send_all``; when the
    broker disconnects it (over max_buffered_bytes for stalled_output_timeout_s), closing the
    WebSocket must not wait for the close frame that cannot go out."""
    config = config_with(
        ws_listener(), plain_listener(),
        max_buffered_bytes=1024 * 1024, stalled_output_timeout_s=0.2,
    )  # fmt: skip
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port_of(broker, 0)))
            async with trio.open_nursery() as client_tasks:
                ws = await wrap_client_stream(
                    client_tasks, trio.SocketStream(sock), "127.0.0.1", "/mqtt",
                    subprotocols=["mqtt"], message_queue_size=1, max_message_size=1 << 30,
                )  # fmt: skip
                stalled = WSClient(ws)
                await stalled.send(Connect("stalled"), Subscribe(1, (Subscription("flood/#", 1),)))
                assert await stalled.message() == ConnAck(False, 0).encode() + SubAck(
                    1, (1,)
                ).encode()
                # from here on it reads nothing: its output backs up in the broker
                pub, _ = await RawClient.connected(port_of(broker, 1), "flooder")
                payload = bytes(256 * 1024)
                while not broker.stalled_disconnects:
                    await pub.publish("flood/x", payload, qos=1)
                await wait_until(lambda: "stalled" not in broker.sessions)
                await wait_until(lambda: server_of(broker).listeners[0].connections == 0)
                await assert_healthy(port_of(broker, 1))
                await pub.aclose()
                client_tasks.cancel_scope.cancel()


# -- MQTT.js under node ---------------------------------------------------------------------------


async def ensure_mqttjs() -> str:
    """The node executable, with MQTT.js installed in tests/security/mqttjs (``npm install``
    on first use). Fails (never skips) when node or npm is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the MQTT.js interoperability test cannot run")
    if not (MQTTJS_DIR / "node_modules" / "mqtt" / "package.json").is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not installed: cannot install MQTT.js for the interop test")
        with trio.fail_after(NPM_INSTALL_TIMEOUT_S):
            result = await trio.run_process(
                [npm, "install", "--prefix", str(MQTTJS_DIR), "--no-audit", "--no-fund"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            pytest.fail(f"npm install failed ({result.returncode}):\n{result.stderr.decode()}")
    return node


class NodeClient:
    """``client.js`` as a subprocess; its JSON lines read with a bound."""

    def __init__(self, proc: trio.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self._buffer = bytearray()

    async def event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                await self.proc.wait()
                raise AssertionError(
                    f"MQTT.js exited ({self.proc.returncode}): {self.stderr_path.read_text()}"
                )
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        event: dict[str, Any] = json.loads(line)
        return event


@asynccontextmanager
async def mqttjs(tmp_path: Path, *args: str) -> AsyncIterator[NodeClient]:
    node = await ensure_mqttjs()
    stderr_path = tmp_path / "mqttjs.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [node, str(MQTTJS_DIR / "client.js"), *args],
            stdout=subprocess.PIPE, stderr=stderr, cwd=str(MQTTJS_DIR),
        )  # fmt: skip
    try:
        yield NodeClient(proc, stderr_path)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


async def mqttjs_exchange(tmp_path: Path, broker: Any, url: str, tcp_port: int, *ca: str) -> None:
    """MQTT.js subscribes and publishes over ``url``; a raw TCP client publishes to it and
    receives what it published."""
    raw, _ = await RawClient.connected(tcp_port, "raw-peer")
    await raw.subscribe("mqttjs/out", qos=1)
    async with mqttjs(tmp_path, url, "mqttjs-client", "mqttjs/in/#", "2", "mqttjs/out", *ca) as js:
        assert await js.event() == {"event": "connected", "returnCode": 0}
        [conn] = [c for c in broker.connections if c.client_id == "mqttjs-client"]
        assert conn.listener.protocol == "websockets"
        assert conn.protocol_level == 4
        assert await js.event() == {"event": "subscribed", "granted": [1]}
        assert await js.event() == {"event": "published"}
        message = await raw.expect(Publish)
        assert (message.topic, message.payload, message.qos) == ("mqttjs/out", b"from mqtt.js", 1)
        await raw.send(PubAck(message.packet_id))
        await raw.publish("mqttjs/in/zero", b"qos 0 \x00\xff", qos=0)
        await raw.publish("mqttjs/in/one", b"qos 1", qos=1)
        got = [await js.event(), await js.event()]
        # two topics: MQTT does not order them against each other
        got.sort(key=lambda event: event["topic"], reverse=True)  # zero, then one
        assert got == [
            {"event": "message", "topic": "mqttjs/in/zero", "payload": b"qos 0 \x00\xff".hex(),
             "qos": 0},
            {"event": "message", "topic": "mqttjs/in/one", "payload": b"qos 1".hex(), "qos": 1},
        ]  # fmt: skip
        assert await js.proc.wait() == 0
    await raw.aclose()


async def test_mqttjs_over_websocket(tmp_path):
    async with running(config_with(plain_listener(), ws_listener())) as broker:
        with trio.fail_after(NPM_INSTALL_TIMEOUT_S + TEST_TIMEOUT_S):
            await ensure_mqttjs()  # (the first run installs it: not part of the exchange's bound)
        with trio.fail_after(TEST_TIMEOUT_S):
            url = f"ws://127.0.0.1:{port_of(broker, 1)}/mqtt"
            await mqttjs_exchange(tmp_path, broker, url, port_of(broker, 0))


async def test_mqttjs_over_websocket_with_tls(tmp_path, certs):
    config = config_with(plain_listener(), ws_listener(tls=certs.tls()))
    async with running(config) as broker:
        with trio.fail_after(NPM_INSTALL_TIMEOUT_S + TEST_TIMEOUT_S):
            await ensure_mqttjs()
        with trio.fail_after(TEST_TIMEOUT_S):
            url = f"wss://127.0.0.1:{port_of(broker, 1)}/mqtt"
            await mqttjs_exchange(tmp_path, broker, url, port_of(broker, 0), certs.ca_file)


async def test_raw_websocket_over_tls(certs):
    async with running(config_with(ws_listener(tls=certs.tls()))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            async with ws_client(broker.port, use_ssl=client_context(certs.ca_file)) as ws:
                await ws.send(Connect("wss-raw"))
                assert (await ws.expect(ConnAck)).return_code == 0
