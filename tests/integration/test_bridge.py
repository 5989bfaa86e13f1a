"""Bridges between two mqttd instances (and mqttd -> mosquitto): telemetry up, commands down,
store and forward while the remote is away, across restarts of either side."""

from __future__ import annotations

import getpass
import pathlib
import shutil
import subprocess
from collections.abc import Collection, Sequence
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from mqttd.broker import Broker, running
from mqttd.codec.packets import PubAck, Publish
from mqttd.config import Bridge, BridgeTopic, Config, Listener
from tests.conftest import make_config
from tests.integration.test_broker_tcp import wait_until
from tests.rawclient import RawClient
from tests.security.test_auth import free_port

FAST_RETRY = {"reconnect_delay_min_s": 0.05, "reconnect_delay_max_s": 0.2}
EDGE_TOPICS = (
    BridgeTopic(pattern="site/#", direction="out", qos=1, remote_prefix="edge-1/"),
    BridgeTopic(pattern="command/#", direction="in", qos=1, remote_prefix="edge-1/"),
)


def edge_config(remote_port: int, data_dir: pathlib.Path | None = None, **bridge: object) -> Config:
    options = {"client_id": "edge-1", "topics": EDGE_TOPICS, **FAST_RETRY, **bridge}
    return attrs.evolve(
        make_config(data_dir=data_dir),
        bridges=(Bridge(name="cloud", port=remote_port, **options),),  # type: ignore[arg-type]
    )


def on_port(config: Config, port: int) -> Config:
    return attrs.evolve(config, listeners=(Listener(host="127.0.0.1", port=port),))


def link(broker: Broker) -> dict:
    return broker.bridge_stats()[0]


async def bridge_up(edge: Broker) -> None:
    """Connected, and the remote subscriptions of the ``in`` mappings acknowledged."""
    await wait_until(lambda: link(edge)["state"] == "connected" and link(edge)["subscribed"])


async def receive(client: RawClient, count: int) -> list[Publish]:
    """The next ``count`` PUBLISHes, in their order of arrival, PUBACKed (QoS 1). Other
    packets are skipped explicitly and stay queued in ``client.received``: MQTT does not
    order the PUBACK of a client's own QoS 1 PUBLISH against the messages routed to it."""
    got = []
    for _ in range(count):
        packet = await client.take(Publish, timeout_s=10)
        got.append(packet)
        if packet.qos == 1:
            await client.send(PubAck(packet.packet_id))
    return got  # type: ignore[return-value]


async def receive_all(
    client: RawClient,
    expected: Sequence[bytes],
    *,
    before: Collection[bytes] = (),
    ordered: bool = True,
) -> list[Publish]:
    """PUBLISHes (PUBACKed, other packets skipped as in :func:`receive`) until every payload
    of ``expected`` has arrived at least once; all arrivals, duplicates included.

    QoS 1 is at least once: after a reconnect or a restart of either side, and so through a
    bridge, a message may come again, also after newer ones. A payload seen before (in
    ``expected`` or ``before``, what arrived earlier) is such a duplicate and is allowed
    anywhere; any other payload fails the test. With ``ordered`` (one publisher, one topic,
    one subscriber: what MQTT orders), the first arrivals must come in the order of
    ``expected``; so a lost message fails at once when a later one arrives, else when no
    message comes for 10 s."""
    known = set(before)
    wanted = list(expected)
    first: list[bytes] = []
    got: list[Publish] = []
    while len(first) < len(wanted):
        try:
            (packet,) = await receive(client, 1)
        except trio.TooSlowError:
            missing = [p for p in wanted if p not in set(first)]
            raise AssertionError(
                f"{len(missing)} of {len(wanted)} messages never arrived (first {missing[:5]});"
                f" {len(got)} arrivals"
            ) from None
        got.append(packet)
        payload = packet.payload
        if payload in known:
            continue  # a duplicate (QoS 1)
        assert payload in wanted, f"unexpected message {payload!r}"
        if ordered:
            assert payload == wanted[len(first)], (
                f"{payload!r} arrived before {wanted[len(first)]!r} (after {first[-3:]})"
            )
        known.add(payload)
        first.append(payload)
    return got


def routed_to(broker: Broker, client_id: str) -> int:
    """Messages ``broker`` has handed to the session of ``client_id`` (sent or queued).
    Routing is synchronous: once a subscriber has received a message from ``broker``, every
    copy that ``broker`` made of it is counted here (so this proves the absence of a loop
    without waiting)."""
    stats = broker.client_stats(client_id)
    assert stats is not None, client_id
    return int(stats["sent"]) + int(stats["queued"])


async def receive_until(
    client: RawClient, marker: bytes, allowed: Collection[bytes] = ()
) -> None:
    """Barrier: PUBLISHes until ``marker``; what comes before it must be in ``allowed``.
    The marker is published after the messages under test have arrived somewhere, and sent
    on the path a looping copy would take (the same link connection, after that copy), so a
    copy that is not before the marker was never made."""
    while True:
        (packet,) = await receive(client, 1)
        if packet.payload == marker:
            return
        assert packet.payload in allowed, f"expected nothing before {marker!r}, got {packet!r}"


async def test_telemetry_goes_up_and_commands_come_down():
    with trio.fail_after(20):
        async with running(make_config()) as cloud:
            async with running(edge_config(cloud.port)) as edge:
                await bridge_up(edge)
                backend, _ = await RawClient.connected(cloud.port, "backend")
                await backend.subscribe("edge-1/site/#", qos=1)
                device, _ = await RawClient.connected(edge.port, "sensor-1")
                await device.subscribe("command/sensor-1", qos=1)
                for i in range(5):
                    await device.publish("site/sensor-1/telemetry", b"%d" % i, qos=1)
                got = await receive_all(backend, [b"%d" % i for i in range(5)])
                assert {(p.topic, p.qos) for p in got} == {("edge-1/site/sensor-1/telemetry", 1)}
                await backend.publish("edge-1/command/sensor-1", b"reboot", qos=1)
                command = (await receive(device, 1))[0]
                assert (command.topic, command.payload) == ("command/sensor-1", b"reboot")
                await wait_until(lambda: link(edge)["forwarded"] == 5)
                stats = link(edge)
                assert stats["received"] == 1 and stats["queued"] == 0
                assert stats["inflight"] == 0 and edge.stats()["bridges_connected"] == 1
                # topics outside the mappings stay local
                await device.publish("other/topic", b"local only", qos=1)
                await device.publish("site/sensor-1/telemetry", b"marker", qos=1)
                assert [p.payload for p in await receive(backend, 1)] == [b"marker"]


async def test_packets_behind_the_connack_are_handled():
    """A remote that resumes the link's session may send its queued messages in the same
    segment as the CONNACK: the link handles them (publishes here, PUBACKs) like any other."""
    from functools import partial

    from mqttd.codec import Decoder
    from mqttd.codec.packets import ConnAck, Connect, Subscribe

    got: list[object] = []
    done = trio.Event()

    async def remote(stream: trio.SocketStream) -> None:
        decoder = Decoder(accept_v5=True)
        while not done.is_set():
            data = await stream.receive_some(65536)
            if not data:
                return
            for packet in decoder.feed(data):
                got.append(packet)
                if isinstance(packet, Connect):
                    await stream.send_all(
                        ConnAck(True, 0).encode()
                        + Publish("edge-1/command/s1", b"on", 1, packet_id=7).encode()
                    )
                elif isinstance(packet, PubAck):
                    done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, remote, 0, host="127.0.0.1"))
            remote_port = listeners[0].socket.getsockname()[1]
            async with running(edge_config(remote_port)) as edge:
                await done.wait()
                assert link(edge)["received"] == 1
            nursery.cancel_scope.cancel()
    assert [type(p) for p in got] == [Connect, Subscribe, PubAck]
    assert got[-1].packet_id == 7  # type: ignore[attr-defined]


async def test_reserved_client_id_prefix_is_refused(broker):
    with trio.fail_after(5):
        client = await RawClient.open(broker.port)
        from mqttd.codec.packets import ConnAck, Connect

        await client.send(Connect("$bridge/cloud"))
        connack = await client.expect(ConnAck)
        assert connack.return_code == 0x02


async def test_messages_wait_on_disk_while_the_remote_is_down_and_all_arrive(tmp_path):
    """The remote broker is stopped while the device keeps publishing QoS 1 (every message
    acknowledged by the edge), then started again: every message arrives, the first time in
    order (QoS 1: what the remote resends after its restart may come twice)."""
    cloud_config = make_config(data_dir=tmp_path / "cloud")
    per_phase = 40
    with trio.fail_after(40):
        async with running(cloud_config) as cloud:
            cloud_port = cloud.port
            backend, _ = await RawClient.connected(cloud.port, "backend", clean_session=False)
            await backend.subscribe("edge-1/site/#", qos=1)
            async with running(edge_config(cloud_port, tmp_path / "edge")) as edge:
                await bridge_up(edge)
                device, _ = await RawClient.connected(edge.port, "sensor-1")
                for i in range(per_phase):
                    await device.publish("site/s1/telemetry", b"%d" % i, qos=1)
                first = await receive_all(backend, [b"%d" % i for i in range(per_phase)])
                # the edge has the remote's PUBACKs (which may come after the backend got
                # the messages): nothing is left in flight on the link
                await wait_until(lambda: link(edge)["forwarded"] == per_phase)
                await backend.aclose()
                # the remote goes away while the device keeps publishing
                cloud.shutdown()
                await wait_until(lambda: link(edge)["state"] != "connected")
                for i in range(per_phase, 3 * per_phase):
                    await device.publish("site/s1/telemetry", b"%d" % i, qos=1)
                assert link(edge)["queued"] + link(edge)["inflight"] == 2 * per_phase
                assert edge.client_stats("$bridge/cloud")["queued"] > 0
        # (the cloud broker stopped above, the edge too: now the edge comes back first)
        async with running(edge_config(cloud_port, tmp_path / "edge")) as edge:
            assert link(edge)["queued"] + link(edge)["inflight"] == 2 * per_phase
            await wait_until(lambda: link(edge)["connect_failures"] >= 1)
            async with running(on_port(cloud_config, cloud_port)) as cloud:
                await bridge_up(edge)
                backend, connack = await RawClient.connected(
                    cloud.port, "backend", clean_session=False
                )
                assert connack.session_present
                # the backend's last PUBACKs may not have been handled before the shutdown:
                # those messages may come again
                await receive_all(
                    backend, [b"%d" % i for i in range(per_phase, 3 * per_phase)],
                    before={p.payload for p in first},
                )
                await wait_until(lambda: link(edge)["queued"] + link(edge)["inflight"] == 0)
                assert link(edge)["connects"] >= 1


async def test_a_restart_of_the_edge_keeps_messages_for_the_remote(tmp_path):
    """The edge acknowledges messages while the remote has never been reachable, is
    restarted, and forwards them all once the remote appears."""
    cloud_port = free_port()
    cloud_config = make_config(data_dir=tmp_path / "cloud")
    with trio.fail_after(30):
        async with running(edge_config(cloud_port, tmp_path / "edge")) as edge:
            device, _ = await RawClient.connected(edge.port, "sensor-1")
            for i in range(25):
                await device.publish("site/s1/telemetry", b"%d" % i, qos=1)
            assert link(edge)["state"] != "connected"
        # the backend's subscription must exist before the link connects (else what it
        # forwards goes to nobody): a persistent session, made on another port beforehand
        async with running(cloud_config) as cloud:
            backend, _ = await RawClient.connected(cloud.port, "backend", clean_session=False)
            await backend.subscribe("edge-1/#", qos=1)
            await backend.aclose()
        async with running(edge_config(cloud_port, tmp_path / "edge")) as edge:
            assert link(edge)["queued"] == 25
            async with running(on_port(cloud_config, cloud_port)) as cloud:
                backend, connack = await RawClient.connected(
                    cloud.port, "backend", clean_session=False
                )
                assert connack.session_present
                await receive_all(backend, [b"%d" % i for i in range(25)])


async def test_queue_budget_bounds_the_store_and_forward_queue():
    unused_port = free_port()
    with trio.fail_after(10):
        async with running(edge_config(unused_port, max_queued_messages=10)) as edge:
            device, _ = await RawClient.connected(edge.port, "sensor-1")
            for i in range(30):
                await device.publish("site/s1/telemetry", b"%d" % i, qos=1)
            stats = link(edge)
            assert (stats["queued"], stats["dropped"]) == (10, 20)  # drop_oldest, counted


async def test_bidirectional_mapping_does_not_loop():
    topics = (BridgeTopic(pattern="sync/#", direction="both", qos=1),)
    with trio.fail_after(20):
        async with running(make_config()) as cloud:
            async with running(edge_config(cloud.port, topics=topics)) as edge:
                await bridge_up(edge)
                edge_sub, _ = await RawClient.connected(edge.port, "edge-sub")
                cloud_sub, _ = await RawClient.connected(cloud.port, "cloud-sub")
                await edge_sub.subscribe("sync/#", qos=1)
                await cloud_sub.subscribe("sync/#", qos=1)
                edge_pub, _ = await RawClient.connected(edge.port, "edge-pub")
                cloud_pub, _ = await RawClient.connected(cloud.port, "cloud-pub")
                await edge_pub.publish("sync/a", b"from edge", qos=1)
                await cloud_pub.publish("sync/b", b"from cloud", qos=1)
                await edge_pub.publish("sync/end", b"end", qos=1)
                await cloud_pub.publish("sync/end", b"end", qos=1)
                for client in (edge_sub, cloud_sub):
                    got = await receive(client, 4)  # two publishers: no order between them
                    assert sorted(p.payload for p in got) == [
                        b"end", b"end", b"from cloud", b"from edge"
                    ]
                # no copy went back: each side handed the link only the other side's two
                assert routed_to(edge, "$bridge/cloud") == 2
                assert routed_to(cloud, "edge-1") == 2
                # (forwarded counts the remote's PUBACKs, which may come after the messages)
                await wait_until(lambda: link(edge)["forwarded"] == 2)
                assert link(edge)["received"] == 2
                # and none is on its way: a marker sent over the link after the messages
                # arrives next (before it, only the other marker, which is local)
                await cloud_pub.publish("sync/marker", b"cloud marker", qos=1)
                await receive_until(edge_sub, b"cloud marker")
                await edge_pub.publish("sync/marker", b"edge marker", qos=1)
                await receive_until(cloud_sub, b"edge marker", allowed={b"cloud marker"})




@asynccontextmanager
async def mosquitto(tmp_path: pathlib.Path, port: int | None = None):
    """A mosquitto on 127.0.0.1 (``port``, or a free one), persistence in ``tmp_path``
    (written at exit, so sessions survive a stop and start)."""
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    assert binary, "mosquitto must be installed (apt-get install mosquitto)"
    port = port or free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {tmp_path}/\nuser {getpass.getuser()}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(20):
            while True:
                assert proc.poll() is None, f"mosquitto exited ({proc.returncode})"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.aclose()
                    break
                except OSError:
                    await trio.sleep(0.02)  # polling for the listener, bounded above
        yield port
    finally:
        proc.terminate()
        try:
            await trio.to_thread.run_sync(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            await trio.to_thread.run_sync(proc.wait)
            raise


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_bridge_to_mosquitto(tmp_path, protocol):
    """3.1.1 (loops prevented by try_private) and 5.0 (by No Local) links to mosquitto."""
    topics = (*EDGE_TOPICS, BridgeTopic(pattern="sync/#", direction="both", qos=1))
    async with mosquitto(tmp_path) as port:
        with trio.fail_after(20):
            async with running(edge_config(port, topics=topics, protocol=protocol)) as edge:
                await bridge_up(edge)
                backend, _ = await RawClient.connected(port, "backend")
                await backend.subscribe("edge-1/site/#", "sync/#", qos=1)
                device, _ = await RawClient.connected(edge.port, "sensor-1")
                await device.subscribe("command/#", "sync/#", qos=1)
                for i in range(3):
                    await device.publish("site/s1/telemetry", b"%d" % i, qos=1)
                await receive_all(backend, [b"0", b"1", b"2"])
                await wait_until(lambda: link(edge)["forwarded"] == 3)
                await backend.publish("edge-1/command/s1", b"blink", qos=1)
                command = (await receive(device, 1))[0]
                assert (command.topic, command.payload) == ("command/s1", b"blink")
                # both directions: mosquitto knows the link as a bridge (try_private; 5.0:
                # No Local) and does not send the edge's own message back
                other, _ = await RawClient.connected(edge.port, "sensor-2")
                await other.publish("sync/x", b"edge says", qos=1)
                assert [p.payload for p in await receive(backend, 1)] == [b"edge says"]
                assert [p.payload for p in await receive(device, 1)] == [b"edge says"]
                # a copy from mosquitto would be on the link before this marker
                await backend.publish("sync/marker", b"marker", qos=1)
                await receive_until(device, b"marker")
                assert link(edge)["received"] == 2  # the command and the marker
                # and the edge sent nothing it got from the link back up (routing is
                # synchronous: the marker was handed to the link's session or not at all)
                assert routed_to(edge, "$bridge/cloud") == 3 + 1  # telemetry and sync/x


async def test_mosquitto_upstream_stopped_and_started_while_devices_publish(tmp_path):
    """mqttd -> mosquitto: mosquitto stops while the device keeps publishing QoS 1 to the
    edge, and starts again on the same port; everything arrives upstream, the first time in
    order. (mosquitto may send messages again after its restart whose PUBACKs from the
    backend it had not handled: QoS 1 duplicates.)"""
    port = free_port()
    per_phase = 30
    with trio.fail_after(40):
        async with running(edge_config(port, tmp_path / "edge")) as edge:
            device, _ = await RawClient.connected(edge.port, "sensor-1")
            async with mosquitto(tmp_path, port):
                await bridge_up(edge)
                backend, _ = await RawClient.connected(port, "backend", clean_session=False)
                await backend.subscribe("edge-1/site/#", qos=1)
                for i in range(per_phase):
                    await device.publish("site/s1/telemetry", b"%d" % i, qos=1)
                first = await receive_all(backend, [b"%d" % i for i in range(per_phase)])
                await backend.aclose()
                await wait_until(lambda: link(edge)["forwarded"] == per_phase)
            await wait_until(lambda: link(edge)["state"] != "connected")
            for i in range(per_phase, 2 * per_phase):
                await device.publish("site/s1/telemetry", b"%d" % i, qos=1)
            assert link(edge)["queued"] + link(edge)["inflight"] == per_phase
            async with mosquitto(tmp_path, port):
                backend, connack = await RawClient.connected(
                    port, "backend", clean_session=False
                )
                assert connack.session_present
                await receive_all(
                    backend, [b"%d" % i for i in range(per_phase, 2 * per_phase)],
                    before={p.payload for p in first},
                )
                await wait_until(lambda: link(edge)["queued"] + link(edge)["inflight"] == 0)


async def test_fleet_keeps_publishing_while_the_upstream_broker_is_down(tmp_path):
    """The issue's scenario with the device simulator: a fleet publishes QoS 1 telemetry to
    the edge without pause; the upstream broker (file-backed, a persistent consumer on it)
    is stopped for a while and started again on the same port. Every message of every
    device reaches the upstream consumer (at least once: QoS 1), none is missing.

    The fleet runs until stopped (not for a count), so that it is still publishing when the
    upstream goes away however fast or slow this machine is; each phase waits for events."""
    from devices.consumer import Consumer
    from devices.fleet import Fleet, FleetConfig

    devices = 5
    cloud_config = make_config(data_dir=tmp_path / "cloud")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            cloud = Broker(cloud_config)
            await nursery.start(cloud.serve)
            port = cloud.port
            async with running(edge_config(port, tmp_path / "edge")) as edge:
                await bridge_up(edge)
                consumer = Consumer(
                    "127.0.0.1", port, client_id="backend", persistent=True,
                    filter="edge-1/site/+/telemetry", backoff_initial_s=0.05,
                )
                await nursery.start(consumer.run)
                fleet = Fleet("127.0.0.1", edge.port, FleetConfig(
                    devices=devices, interval_s=0.01, qos=1, persistent=True,
                ))
                nursery.start_soon(fleet.run)
                await wait_until(lambda: consumer.stats.received >= 10 * devices, 30)
                cloud.shutdown()  # the upstream goes away mid-stream
                await wait_until(lambda: link(edge)["state"] != "connected", 30)
                published_before = fleet.stats.acked
                # the fleet goes on: the edge acknowledges and stores for the link
                await wait_until(lambda: fleet.stats.acked >= published_before + 50, 30)
                assert link(edge)["queued"] + link(edge)["inflight"] > 0
                heard_before = consumer.stats.received
                cloud = Broker(on_port(cloud_config, port))
                await nursery.start(cloud.serve)
                await wait_until(lambda: consumer.stats.received >= heard_before + 50, 30)
                fleet.stop()  # its devices wait for their PUBACKs and say goodbye
                await wait_until(lambda: fleet.stats.finished == devices, 30)
                total = fleet.stats.published
                assert fleet.stats.acked == total
                sent = {d.device_id: d.seq for d in fleet.devices}  # seq counts from 1

                def distinct_heard() -> dict[str, int]:
                    return {
                        name: t.count - t.duplicates
                        for name, t in consumer.stats.devices.items()
                    }

                await wait_until(lambda: distinct_heard() == sent, 30)
                assert consumer.stats.missing == 0
                assert {
                    name: (t.first_seq, t.next_seq - 1)
                    for name, t in consumer.stats.devices.items()
                } == {name: (1, seq) for name, seq in sent.items()}
                assert link(edge)["link_losses"] >= 1 and link(edge)["connects"] >= 2
                consumer.stop()
            cloud.shutdown()


async def test_bridge_over_tls_to_a_tls_listener(tmp_path):
    """The link verifies the remote's certificate against the configured CA; with another
    CA it does not connect (and says why)."""
    from mqttd.config import BridgeTLS
    from tests.security.test_tls import Certs, config_with

    certs = Certs.make(tmp_path / "certs")
    other = Certs.make(tmp_path / "other")
    cloud_config = config_with(Listener(host="127.0.0.1", port=0, tls=certs.tls()))
    with trio.fail_after(20):
        async with running(cloud_config) as cloud:
            good = BridgeTLS(cafile=certs.ca_file)
            async with running(edge_config(cloud.port, tls=good)) as edge:
                await bridge_up(edge)
                backend = await tls_client(cloud.port, certs.ca_file)
                await backend.subscribe("edge-1/site/#", qos=1)
                device, _ = await RawClient.connected(edge.port, "sensor-1")
                await device.publish("site/s1/telemetry", b"over tls", qos=1)
                got = await receive(backend, 1)
                assert (got[0].topic, got[0].payload) == ("edge-1/site/s1/telemetry", b"over tls")
            wrong = BridgeTLS(cafile=other.ca_file)
            async with running(edge_config(cloud.port, tls=wrong)) as edge:
                await wait_until(lambda: link(edge)["connect_failures"] >= 1)
                assert link(edge)["state"] != "connected"
                assert "certificate" in link(edge)["last_error"].lower()


async def tls_client(port: int, ca_file: str) -> RawClient:
    from mqttd.codec.packets import ConnAck, Connect
    from tests.security.test_tls import client_context, open_tls

    stream = await open_tls(port, client_context(ca_file))
    client = RawClient(stream)  # type: ignore[arg-type]
    await client.send(Connect("backend"))
    assert (await client.expect(ConnAck)).return_code == 0
    return client


async def test_mqtt5_link_carries_properties_and_uses_no_local():
    """protocol: "5" on the link: user properties, content type and correlation data go both
    ways; a `both` mapping does not loop (No Local on the link's subscriptions)."""
    from mqttd.codec.packets import PROTOCOL_5, ConnAck, Connect

    topics = (*EDGE_TOPICS, BridgeTopic(pattern="sync/#", direction="both", qos=1))
    props = {"content_type": "application/json", "correlation_data": b"42",
             "user_property": [("site", "17"), ("site", "18")]}

    async def client5(port: int, client_id: str) -> RawClient:
        client = await RawClient.open(port)
        client.protocol_level = client.decoder.protocol_level = PROTOCOL_5
        await client.send(Connect(client_id, protocol_level=PROTOCOL_5))
        assert (await client.expect(ConnAck)).return_code == 0
        return client

    with trio.fail_after(20):
        async with running(make_config()) as cloud:
            async with running(edge_config(cloud.port, topics=topics, protocol="5")) as edge:
                await bridge_up(edge)
                assert cloud.sessions["edge-1"].connection.protocol_level == PROTOCOL_5
                backend = await client5(cloud.port, "backend")
                await backend.subscribe("edge-1/site/#", "sync/#", qos=1)
                device = await client5(edge.port, "sensor-1")
                await device.subscribe("command/#", "sync/#", qos=1)
                publisher = await client5(edge.port, "sensor-2")
                await publisher.send(Publish("site/s1/telemetry", b"{}", 1, packet_id=1,
                                             properties=props))
                up = (await receive(backend, 1))[0]
                assert (up.topic, up.properties) == ("edge-1/site/s1/telemetry", props)
                await backend.send(Publish("edge-1/command/s1", b"on", 1, packet_id=2,
                                           properties={"response_topic": "replies/s1"}))
                down = (await receive(device, 1))[0]
                assert (down.topic, down.properties) == (
                    "command/s1", {"response_topic": "replies/s1"}
                )
                await publisher.send(Publish("sync/x", b"edge", 1, packet_id=3))
                # (receive skips the backend's PUBACK for packet 2: it may come before or
                # after the messages routed to the backend)
                assert [p.payload for p in await receive(backend, 1)] == [b"edge"]
                assert [p.payload for p in await receive(device, 1)] == [b"edge"]
                await backend.take(PubAck, packet_id=2)
                for pid in (1, 3):
                    await publisher.take(PubAck, packet_id=pid)
                # No Local on the link's subscription: the cloud did not hand the edge's own
                # message back to the link, and none is on its way (the marker is after it)
                assert routed_to(cloud, "edge-1") == 1  # the command
                await backend.publish("sync/marker", b"marker", qos=1)
                await receive_until(device, b"marker")
                assert link(edge)["protocol"] == "5" and link(edge)["refused"] == 0
