"""TLS listeners over real sockets: trustme certificates written to tmp_path, the in-process
broker on 127.0.0.1 port 0, a raw client over ``trio.SSLStream`` and paho-mqtt.

The helpers at the top (certificates, configs, TLS clients) are shared by the other
tests of this directory.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from paho.mqtt.enums import MQTTProtocolVersion

from mqttd.broker import Broker, running
from mqttd.codec.packets import ConnAck, Connect, Publish
from mqttd.config import TLS, Config, Listener
from mqttd.server.listeners import TCPServer
from mqttd.server.tls import TLSSetupError, server_context
from tests.conftest import make_config
from tests.integration.test_broker_tcp import assert_healthy, wait_until
from tests.interop.test_paho import Paho, unique_id
from tests.rawclient import RawClient

TEST_TIMEOUT_S = 20
V311 = MQTTProtocolVersion.MQTTv311

# -- shared helpers -----------------------------------------------------------------------


@attrs.define
class Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (CN
    ``device-42``), as PEM files in ``directory``."""

    directory: Path
    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert

    @property
    def ca_file(self) -> str:
        return str(self.directory / "ca.pem")

    @property
    def server_cert_file(self) -> str:
        return str(self.directory / "server.pem")

    @property
    def server_key_file(self) -> str:
        return str(self.directory / "server.key")

    @property
    def client_file(self) -> str:  # key and certificate chain in one file
        return str(self.directory / "client.pem")

    @classmethod
    def make(cls, directory: Path, client_cn: str = "device-42") -> Certs:
        ca = trustme.CA()
        certs = cls(
            directory,
            ca,
            ca.issue_cert("127.0.0.1", "localhost"),
            ca.issue_cert(f"{client_cn}.example", common_name=client_cn),
        )
        certs.write()
        return certs

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(self.ca_file)
        Path(self.server_cert_file).write_bytes(
            b"".join(blob.bytes() for blob in self.server.cert_chain_pems)
        )
        self.server.private_key_pem.write_to_path(self.server_key_file)
        self.client.private_key_and_cert_chain_pem.write_to_path(self.client_file)

    def server_der(self) -> bytes:
        """The server certificate in DER form (what a client sees in the handshake)."""
        pem = self.server.cert_chain_pems[0].bytes().decode()
        return ssl.PEM_cert_to_DER_cert(pem)

    def tls(self, **kwargs: Any) -> TLS:
        return TLS(certfile=self.server_cert_file, keyfile=self.server_key_file, **kwargs)


def config_with(*listeners: Listener, **limits: Any) -> Config:
    return attrs.evolve(make_config(**limits), listeners=listeners)


def server_of(broker: Broker) -> TCPServer:
    server = broker.server
    assert server is not None
    return server


def client_context(
    ca_file: str, client_file: str | None = None, *, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if client_file is not None:
        context.load_cert_chain(client_file)
    if maximum is not None:
        context.maximum_version = maximum
    return context


async def open_tls(
    port: int, context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    """A TCP connection to 127.0.0.1:port with the TLS handshake done."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def tls_connected(
    port: int, context: ssl.SSLContext, client_id: str
) -> tuple[RawClient, ConnAck]:
    client = RawClient(await open_tls(port, context))  # type: ignore[arg-type]
    await client.send(Connect(client_id))
    connack = await client.expect(ConnAck)
    return client, connack


async def assert_refused(port: int, context: ssl.SSLContext, client_id: str) -> None:
    """The handshake fails, at once or (TLS 1.3 with a missing client certificate) when the
    client first reads: a CONNECT never gets a CONNACK."""
    try:
        client = RawClient(await open_tls(port, context))  # type: ignore[arg-type]
        await client.send(Connect(client_id))
        assert await client.recv() is None
    except trio.BrokenResourceError:
        pass


@asynccontextmanager
async def paho_client(
    port: int, prefix: str, *, setup: Any = None, **kwargs: Any
) -> AsyncIterator[Paho]:
    """A connected paho client (tests/interop/test_paho.py) after ``setup(client)`` has
    configured its paho ``Client`` (TLS, WebSocket transport)."""
    client = Paho(unique_id(prefix), V311, **kwargs)
    if setup is not None:
        setup(client.client)
    try:
        await client.connect(port)
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await client.close()


async def paho_roundtrip(sub: Paho, pub: Paho, topic: str) -> None:
    """Subscribe at QoS 1 and publish at QoS 0 and 1: both arrive with their QoS."""
    await sub.subscribe(f"{topic}/#", 1)
    for qos in (0, 1):
        await pub.publish(f"{topic}/{qos}", f"qos {qos}".encode(), qos)
        message = await sub.message()
        assert (message.topic, message.payload, message.qos) == (
            f"{topic}/{qos}", f"qos {qos}".encode(), qos
        )


def port_of(broker: Broker, index: int) -> int:
    """The port of listener ``index`` (each test listener binds one socket)."""
    return server_of(broker).listeners[index].addresses[0][1]


# -- tests ----------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs.make(tmp_path / "certs")


def tls_listener(certs: Certs, **tls: Any) -> Listener:
    return Listener(host="127.0.0.1", port=0, tls=certs.tls(**tls))


async def test_raw_client_over_tls(certs):
    config = config_with(tls_listener(certs))
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            context = client_context(certs.ca_file)
            sub, connack = await tls_connected(broker.port, context, "tls-sub")
            assert connack.return_code == 0
            await sub.subscribe("tls/#", qos=1)
            pub, _ = await tls_connected(broker.port, context, "tls-pub")
            await pub.publish("tls/a", b"encrypted", qos=1)
            message = await sub.expect(Publish)
            assert (message.topic, message.payload, message.qos) == ("tls/a", b"encrypted", 1)
            [conn] = [c for c in broker.connections if c.client_id == "tls-sub"]
            assert conn.listener == config.listeners[0]
            assert conn.tls_identity is None
            version = sub.stream.version()  # type: ignore[attr-defined]
            assert version in ("TLSv1.2", "TLSv1.3")
            await sub.aclose()
            await pub.aclose()


async def test_paho_over_tls(certs):
    async with running(config_with(tls_listener(certs))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):

            def setup(client: Any) -> None:
                client.tls_set(ca_certs=certs.ca_file)

            async with (
                paho_client(broker.port, "tls-sub", setup=setup) as sub,
                paho_client(broker.port, "tls-pub", setup=setup) as pub,
            ):
                await paho_roundtrip(sub, pub, "paho/tls")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_1_1_is_refused(certs, caplog):
    caplog.set_level(logging.WARNING, logger="mqttd")
    async with running(config_with(tls_listener(certs))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            old = client_context(certs.ca_file, maximum=ssl.TLSVersion.TLSv1_1)
            # let this OpenSSL offer TLS 1.1 at all, so that it is the server that refuses
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            with pytest.raises(trio.BrokenResourceError) as excinfo:
                await open_tls(broker.port, old)
            # (the client sees the socket closed: trio does not flush the server's alert)
            assert isinstance(excinfo.value.__cause__, ssl.SSLError)
            await wait_until(lambda: server_of(broker).connections == 0)
            # the server refused the version: one line per failed handshake
            failures = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
            assert len(failures) == 1
            assert "UNSUPPORTED_PROTOCOL" in failures[0].getMessage()
            assert not broker.connections
            # TLS 1.2 is accepted
            tls12 = client_context(certs.ca_file, maximum=ssl.TLSVersion.TLSv1_2)
            client, connack = await tls_connected(broker.port, tls12, "tls12")
            assert connack.return_code == 0
            assert client.stream.version() == "TLSv1.2"  # type: ignore[attr-defined]
            await client.aclose()


async def test_client_certificate_required(certs, tmp_path):
    listener = tls_listener(certs, cafile=certs.ca_file, require_certificate=True)
    async with running(config_with(listener)) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            # without a certificate: the handshake fails (with TLS 1.3 the client learns it
            # on its first read), and no MQTT connection ever starts
            await assert_refused(broker.port, client_context(certs.ca_file), "no-cert")
            # a certificate from another CA is refused too
            stranger = Certs.make(tmp_path / "stranger")
            await assert_refused(
                broker.port, client_context(certs.ca_file, stranger.client_file), "stranger"
            )
            await wait_until(lambda: server_of(broker).connections == 0)
            assert server_of(broker).listeners[0].handshake_failures == 2
            assert not broker.connections
            # with the CA's client certificate: CONNACK 0
            with_cert = client_context(certs.ca_file, certs.client_file)
            client, connack = await tls_connected(broker.port, with_cert, "with-cert")
            assert connack.return_code == 0
            [conn] = broker.connections
            assert conn.tls_identity is None  # use_identity_as_username is off
            await client.aclose()


async def test_identity_as_username_puts_the_cn_on_the_connection(certs, caplog):
    listener = tls_listener(certs, cafile=certs.ca_file, use_identity_as_username=True)
    async with running(config_with(listener)) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            context = client_context(certs.ca_file, certs.client_file)
            client, connack = await tls_connected(broker.port, context, "cn-client")
            assert connack.return_code == 0
            [conn] = broker.connections
            assert conn.client_id == "cn-client"
            assert conn.tls_identity == "device-42"
            # a client certificate is required in this mode
            await assert_refused(broker.port, client_context(certs.ca_file), "anonymous")
            # and it must name someone: a certificate without a subject CN is refused
            no_cn = certs.ca.issue_cert("no-cn.example")
            no_cn_file = str(certs.directory / "no-cn.pem")
            no_cn.private_key_and_cert_chain_pem.write_to_path(no_cn_file)
            await assert_refused(broker.port, client_context(certs.ca_file, no_cn_file), "no-cn")
            assert len(broker.connections) == 1
            assert server_of(broker).listeners[0].handshake_failures == 2
            assert any("no subject CN" in r.getMessage() for r in caplog.records)
            await client.aclose()


async def test_paho_with_client_certificate(certs):
    listener = tls_listener(certs, cafile=certs.ca_file, require_certificate=True)
    async with running(config_with(listener)) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):

            def setup(client: Any) -> None:
                client.tls_set(ca_certs=certs.ca_file, certfile=certs.client_file)

            async with (
                paho_client(broker.port, "cert-sub", setup=setup) as sub,
                paho_client(broker.port, "cert-pub", setup=setup) as pub,
            ):
                await paho_roundtrip(sub, pub, "paho/cert")


async def test_plaintext_client_on_a_tls_port(certs, caplog):
    caplog.set_level(logging.WARNING, logger="mqttd")
    async with running(config_with(tls_listener(certs))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            plain = await RawClient.open(broker.port)
            await plain.send(Connect("plaintext"))
            assert await plain.expect_closed() == []
            await wait_until(lambda: server_of(broker).connections == 0)
            assert not broker.connections
            assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)
            context = client_context(certs.ca_file)
            client, connack = await tls_connected(broker.port, context, "after-plain")
            assert connack.return_code == 0
            await client.aclose()


async def test_silent_client_is_closed_at_the_connect_timeout(certs):
    config = config_with(tls_listener(certs), connect_timeout_s=1.0)
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            silent = await RawClient.open(broker.port)  # no ClientHello
            assert await silent.expect_closed() == []
            # handshake done but no CONNECT: the same deadline, counted from the accept (on
            # a machine so slow that the handshake itself outlasts it, the broker closes the
            # connection during the handshake: closed at the deadline all the same)
            context = client_context(certs.ca_file)
            try:
                stream = await open_tls(broker.port, context)
            except trio.BrokenResourceError:
                pass
            else:
                client = RawClient(stream)  # type: ignore[arg-type]
                assert await client.expect_closed() == []
            await wait_until(lambda: server_of(broker).connections == 0)


async def test_plain_and_tls_listeners_side_by_side(certs):
    config = config_with(Listener(host="127.0.0.1", port=0), tls_listener(certs))
    async with running(config) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            sub, _ = await tls_connected(
                port_of(broker, 1), client_context(certs.ca_file), "tls-side"
            )
            await sub.subscribe("side/#", qos=1)
            pub, _ = await RawClient.connected(port_of(broker, 0), "plain-side")
            await pub.publish("side/x", b"from plain to tls", qos=1)
            assert (await sub.expect(Publish)).payload == b"from plain to tls"
            await assert_healthy(port_of(broker, 0))
            await sub.aclose()
            await pub.aclose()


async def test_reload_certificates(certs, caplog):
    caplog.set_level(logging.INFO, logger="mqttd")
    async with running(config_with(tls_listener(certs))) as broker:
        with trio.fail_after(TEST_TIMEOUT_S):
            server = server_of(broker)
            old_der = certs.server_der()
            before, _ = await tls_connected(
                broker.port, client_context(certs.ca_file), "before-reload"
            )
            assert before.stream.getpeercert(binary_form=True) == old_der  # type: ignore[attr-defined]

            # rewrite the files with a certificate signed by a new CA: nothing changes
            # until the reload
            old_ca_file = str(certs.directory / "old-ca.pem")
            certs.ca.cert_pem.write_to_path(old_ca_file)
            new_ca = trustme.CA()
            certs.ca = new_ca
            certs.server = new_ca.issue_cert("127.0.0.1", "localhost")
            certs.write()
            new_der = certs.server_der()
            assert new_der != old_der
            stream = await open_tls(broker.port, client_context(old_ca_file))
            assert stream.getpeercert(binary_form=True) == old_der
            await stream.aclose()

            assert server.reload_certificates() is True
            after, connack = await tls_connected(
                broker.port, client_context(certs.ca_file), "after-reload"
            )
            assert connack.return_code == 0
            assert after.stream.getpeercert(binary_form=True) == new_der  # type: ignore[attr-defined]
            # the connection made before the reload still works
            await after.subscribe("reload/#", qos=1)
            await before.publish("reload/x", b"old connection", qos=1)
            assert (await after.expect(Publish)).payload == b"old connection"
            assert any("TLS certificates reloaded" in r.getMessage() for r in caplog.records)

            # a broken file: the error is logged and the current certificate stays
            Path(certs.server_key_file).write_text("not a key\n")
            assert server.reload_certificates() is False
            assert any(
                "not reloaded" in r.getMessage() and r.levelno == logging.ERROR
                for r in caplog.records
            )
            again, connack = await tls_connected(
                broker.port, client_context(certs.ca_file), "after-bad-reload"
            )
            assert connack.return_code == 0
            assert again.stream.getpeercert(binary_form=True) == new_der  # type: ignore[attr-defined]
            for client in (before, after, again):
                await client.aclose()


async def test_missing_certificate_stops_the_start(tmp_path):
    tls = TLS(certfile=str(tmp_path / "missing.pem"), keyfile=str(tmp_path / "missing.key"))
    config = config_with(Listener(host="127.0.0.1", port=0, tls=tls))
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(BaseExceptionGroup) as excinfo:
        async with running(config):
            pass
    matched, _ = excinfo.value.split(TLSSetupError)
    assert matched is not None
    [error] = _leaves(matched)
    assert isinstance(error, OSError)  # reported by the command line as a startup error
    assert "missing.pem" in str(error)


def test_client_certificate_options_need_a_cafile(certs):
    for option in ("require_certificate", "use_identity_as_username"):
        with pytest.raises(TLSSetupError, match=f"{option} needs a cafile"):
            server_context(certs.tls(**{option: True}))
    context = server_context(certs.tls(cafile=certs.ca_file))
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in _leaves(inner)]
    return [group]
