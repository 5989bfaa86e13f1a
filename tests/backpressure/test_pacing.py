"""Publishers are paced by the subscribers they feed (mqttd.engine.flow), at the default
configuration: a subscriber that keeps reading loses nothing, whatever the publishers'
rate; a stalled subscriber holds a publisher back once, for ``stalled_output_timeout_s``,
and then stops pacing; a publisher feeding only fast subscribers is never held.

Real sockets throughout. Publishers pipeline pre-encoded PUBLISH packets as fast as TCP
takes them (QoS 1 ones keep a window of unacknowledged packets). Subscribers read 16 KiB at
a time and are slowed on purpose (a short sleep between reads simulates a slower consumer;
it synchronises nothing), so that their output backs up and pacing must happen: each test
checks that it did (``flow.holds``) as well as that every message arrived.
"""

from __future__ import annotations

import socket

import attrs
import trio

from mqttd.broker import Broker, running
from mqttd.codec import Decoder
from mqttd.codec.packets import (
    ConnAck,
    Connect,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
)
from mqttd.config import Config, Listener, Persistence
from tests.conftest import NO_HTTP

READ_SIZE = 16 * 1024
TIMEOUT_S = 120.0  # bounds a failing run; a passing one takes seconds


def default_config() -> Config:
    """The defaults, on a free loopback port, with the store in memory."""
    return Config(
        listeners=(Listener(host="127.0.0.1", port=0),),
        persistence=Persistence(db_file=":memory:"),
        http=NO_HTTP,  # the operations listener's default port is fixed
    )


def body(publisher: int, index: int, size: int) -> bytes:
    return publisher.to_bytes(2, "big") + index.to_bytes(4, "big") + bytes(size - 6)


async def connect(port: int, client_id: str, rcvbuf: int = 0) -> tuple[trio.SocketStream, Decoder]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # set before connecting, so that the kernel buffers little for it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(Connect(client_id, True, 0).encode())
    decoder = Decoder(protocol_level=4)
    packets: list[object] = []
    while not packets:
        data = await stream.receive_some(READ_SIZE)
        assert data, f"{client_id}: closed before CONNACK"
        packets += decoder.feed(data)
    assert packets == [ConnAck(False, 0)], packets
    return stream, decoder


@attrs.define(eq=False)
class Subscriber:
    """Reads ``READ_SIZE`` at a time, ``pause_s`` between reads, acknowledges QoS 1 at
    once, and records (publisher, index) per message in arrival order."""

    client_id: str
    topic: str
    qos: int
    pause_s: float = 0.0
    got: dict[int, list[int]] = attrs.Factory(dict)
    count: int = 0
    stream: trio.SocketStream | None = None
    decoder: Decoder = attrs.Factory(lambda: Decoder(protocol_level=4))
    changed: trio.Event = attrs.Factory(trio.Event)

    async def subscribe(self, port: int) -> None:
        stream, decoder = await connect(port, self.client_id)
        await stream.send_all(Subscribe(1, (Subscription(self.topic, self.qos),)).encode())
        packets: list[object] = []
        while not packets:
            packets += decoder.feed(await stream.receive_some(READ_SIZE))
        assert packets == [SubAck(1, (self.qos,))], packets
        self.stream, self.decoder = stream, decoder

    async def run(self) -> None:
        stream = self.stream
        assert stream is not None
        while True:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                return
            acks = []
            for packet in self.decoder.feed(data):
                assert isinstance(packet, Publish), packet
                publisher = int.from_bytes(packet.payload[:2], "big")
                self.got.setdefault(publisher, []).append(
                    int.from_bytes(packet.payload[2:6], "big")
                )
                self.count += 1
                if packet.qos:
                    acks.append(PubAck(packet.packet_id).encode())
            if acks:
                await stream.send_all(b"".join(acks))
            self.changed.set()
            self.changed = trio.Event()
            if self.pause_s:
                await trio.sleep(self.pause_s)

    async def wait_for(self, total: int) -> None:
        while self.count < total:
            await self.changed.wait()


async def publish_all(
    port: int, client_id: str, publisher: int, topic: str, count: int, size: int, qos: int,
    window: int = 16,
) -> trio.SocketStream:
    """Send ``count`` PUBLISHes as fast as the broker reads them (QoS 1: at most ``window``
    unacknowledged), then a PINGREQ, and wait for its PINGRESP: everything before it was
    handled. Returns the open stream."""
    stream, decoder = await connect(port, client_id)
    if not qos:
        batch = 500
        for start in range(0, count, batch):
            await stream.send_all(b"".join(
                Publish(topic, body(publisher, index, size), 0).encode()
                for index in range(start, min(count, start + batch))
            ))
    else:
        sent = acked = 0
        while acked < count:
            burst = []
            while sent < count and sent - acked < window:
                packet_id = sent % 65535 + 1
                burst.append(Publish(topic, body(publisher, sent, size), 1, packet_id=packet_id)
                             .encode())
                sent += 1
            if burst:
                await stream.send_all(b"".join(burst))
            data = await stream.receive_some(READ_SIZE)
            assert data, f"{client_id}: closed"
            for packet in decoder.feed(data):
                assert isinstance(packet, PubAck), packet
                acked += 1
    await stream.send_all(PingReq().encode())
    while True:
        data = await stream.receive_some(READ_SIZE)
        assert data, f"{client_id}: closed"
        if any(isinstance(p, PingResp) for p in decoder.feed(data)):
            return stream


def stall_timeout(seconds: float) -> Config:
    """The defaults, with ``stalled_output_timeout_s`` set."""
    config = default_config()
    return attrs.evolve(
        config, limits=attrs.evolve(config.limits, stalled_output_timeout_s=seconds)
    )


async def never_reading(
    broker: Broker, client_id: str, topic: str, qos: int
) -> trio.SocketStream:
    """A subscriber with a 4 KiB receive buffer that subscribes and never reads again;
    returns once its SUBSCRIBE is handled (polled: it reads no SUBACK)."""
    stream, _ = await connect(broker.port, client_id, rcvbuf=4096)
    await stream.send_all(Subscribe(1, (Subscription(topic, qos),)).encode())
    while client_id not in broker.sessions or not broker.sessions[client_id].subscriptions:
        await trio.sleep(0.01)
    return stream


def assert_all_in_order(sub: Subscriber, publishers: int, count: int) -> None:
    for publisher in range(publishers):
        assert sub.got.get(publisher) == list(range(count)), (
            f"{sub.client_id}: publisher {publisher}: {len(sub.got.get(publisher, []))} of "
            f"{count} received, or out of order"
        )


async def fan_in(broker: Broker, qos: int, publishers: int, count: int) -> Subscriber:
    sub = Subscriber("sub", "bench/#", qos, pause_s=0.001)
    await sub.subscribe(broker.port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sub.run)
        async with trio.open_nursery() as pubs:
            for publisher in range(publishers):
                pubs.start_soon(
                    publish_all, broker.port, f"pub{publisher}", publisher,
                    f"bench/{publisher}", count, 64, qos,
                )
        await sub.wait_for(publishers * count)
        nursery.cancel_scope.cancel()
    return sub


async def test_qos0_fan_in_delivers_everything_to_a_reading_subscriber() -> None:
    """10 publishers x 20,000 x 64 B QoS 0, pipelined, to one subscriber reading 16 KiB at a
    time: all 200,000 arrive, in each publisher's order, nothing dropped; pacing held the
    publishers instead (mosquitto manages this for QoS 0; mqttd used to drop 86%)."""
    with trio.fail_after(TIMEOUT_S):
        async with running(default_config()) as broker:
            sub = await fan_in(broker, 0, publishers=10, count=20_000)
            assert_all_in_order(sub, 10, 20_000)
            assert broker.stats()["dropped_qos0"] == 0
            assert broker.flow.holds > 0  # the subscriber did fall behind


async def test_qos1_fan_in_delivers_everything_to_a_reading_subscriber() -> None:
    """10 publishers x 5,000 QoS 1, each with 16 unacknowledged, to one QoS 1 subscriber
    that acknowledges everything: all arrive, none dropped by the queue budget (1,000 at
    the default configuration: mosquitto and mqttd used to drop 87%)."""
    with trio.fail_after(TIMEOUT_S):
        async with running(default_config()) as broker:
            sub = await fan_in(broker, 1, publishers=10, count=5_000)
            assert_all_in_order(sub, 10, 5_000)
            assert broker.stats()["dropped"] == 0
            assert broker.flow.holds > 0


async def test_stalled_subscriber_holds_the_publisher_once_and_a_healthy_one_gets_all() -> None:
    """One subscriber never reads, one reads and acknowledges. The publisher sends 1 KiB
    messages, QoS 0 and then QoS 1 (64 unacknowledged): the healthy subscriber gets every
    one of both; the stalled one held the publisher once, until it was found stalled, and
    never again (its QoS 0 over the buffer is dropped and counted, its QoS 1 queued within
    its budget)."""
    count = 5_000
    with trio.fail_after(TIMEOUT_S):
        async with running(stall_timeout(1.0)) as broker:
            stalled_stream = await never_reading(broker, "stalled", "t/#", 1)
            healthy = Subscriber("healthy", "t/#", 1)
            await healthy.subscribe(broker.port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(healthy.run)
                await publish_all(broker.port, "pub", 0, "t/0", count, 1024, 0)
                await publish_all(broker.port, "pub1", 1, "t/1", count, 1024, 1, window=64)
                await healthy.wait_for(2 * count)
                nursery.cancel_scope.cancel()
            assert_all_in_order(healthy, 2, count)
            stalled = next(c for c in broker.connections if c.client_id == "stalled")
            assert stalled.stalls == 1  # found stalled once; never pacing again after
            assert stalled.stalled
            stats = broker.client_stats("stalled")
            assert stats is not None and stats["dropped_qos0"] > 0  # counted, not silent
            await stalled_stream.aclose()


async def test_publisher_feeding_only_fast_subscribers_is_never_held() -> None:
    """Publisher B feeds a subscriber on ``slow/#`` that never reads, and is held by it
    (for a minute here: it must not count as stalled during the test). Meanwhile publisher
    A sends 5,000 messages to a fast subscriber on ``fast/#``: they all arrive, well before
    the slow one could stall, and B is still held when they have: A was never held by the
    slow subscriber (it may be paced by the fast one, which it feeds)."""
    count = 5_000
    with trio.fail_after(TIMEOUT_S):
        async with running(stall_timeout(60.0)) as broker:
            slow_stream = await never_reading(broker, "slow", "slow/#", 0)
            fast = Subscriber("fast", "fast/#", 0)
            await fast.subscribe(broker.port)
            slow = next(c for c in broker.connections if c.client_id == "slow")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fast.run)
                nursery.start_soon(
                    publish_all, broker.port, "pub-b", 1, "slow/x", count, 1024, 0
                )
                while not slow.waiters:
                    await trio.sleep(0.01)  # until the slow subscriber holds B
                with trio.fail_after(30):  # half the stall timeout: A is never held by slow
                    a_stream = await publish_all(
                        broker.port, "pub-a", 0, "fast/x", count, 1024, 0
                    )
                    await fast.wait_for(count)
                pub_b = next(c for c in broker.connections if c.client_id == "pub-b")
                assert pub_b.held_by == {slow} and not slow.stalls  # B: still held
                nursery.cancel_scope.cancel()
            assert_all_in_order(fast, 1, count)
            await a_stream.aclose()
            await slow_stream.aclose()
