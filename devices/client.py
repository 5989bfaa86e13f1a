"""A small asynchronous MQTT 3.1.1 client on trio, built on :mod:`mqttd.codec` (and MQTT 5.0
as far as a worker needs it: ``protocol_level=5``, and ``on_message`` may return a reason code
for its PUBACK / PUBREC, 0x80 and up rejecting the message).

One :class:`Client` per simulated device; a connection runs exactly one reader task (and,
with a keepalive, one task that sends PINGREQ when the client has been quiet), so one
process can hold a thousand devices. ::

    client = Client("127.0.0.1", 1883, "sensor-0001", clean_session=False,
                    will=Will("site/sensor-0001/status", b"offline", 1, True),
                    on_message=lambda publish: print(publish.topic, publish.payload))
    async with client.connected() as connack:       # CONNECT, wait for CONNACK (bounded)
        await client.subscribe(("site/sensor-0001/command", 1))
        await client.publish("site/sensor-0001/telemetry", b"{}", qos=1)  # window-bounded
        await client.wait_acked()                      # every QoS 1/2 publish acknowledged

Leaving the block normally sends DISCONNECT; leaving it by an error or a cancellation just
closes the socket (the broker then publishes the will). A lost connection cancels the
block and raises :class:`ConnectionLost`. Unacknowledged QoS 1/2 publishes stay in the
client and are sent again (DUP=1) on the next connection; :func:`run_with_reconnect`
reconnects with exponential backoff.

Incoming PUBLISH packets go to ``on_message`` (a plain function, called in the reader task)
and are then acknowledged: PUBACK for QoS 1, PUBREC/PUBREL/PUBCOMP for QoS 2 (delivered once:
the packet id is remembered until PUBREL).

The CONNECT / CONNACK exchange, PINGREQ and the choice of packet ids are the client role
this broker's bridges use too (:mod:`mqttd.client_role`); the rest (in-memory inflight
window, inbound QoS 2 ids, ping when quiet) is this simulator's.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from mqttd import client_role, codec
from mqttd.client_role import CONNACK_ERRORS  # noqa: F401 (where it was defined before)
from mqttd.codec import MQTTError


class ConnectionLost(ConnectionError):
    """The connection ended (closed by the broker, reset, keepalive timeout, bad packet)."""


class ConnectRefused(ConnectionError):
    """The broker answered CONNECT with a non-zero return code."""

    def __init__(self, return_code: int) -> None:
        self.return_code = return_code
        super().__init__(f"connection refused: {client_role.refusal(return_code)}")


# What a reconnect loop survives: refused/reset sockets, lost connections, CONNECT timeouts.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
)


@attrs.define(eq=False)
class _Outgoing:
    packet: codec.Publish
    released: bool = False  # QoS 2: PUBREC came, PUBREL sent, waiting for PUBCOMP


@attrs.define(eq=False)
class _Waiter:
    event: trio.Event = attrs.field(factory=trio.Event)
    result: codec.SubAck | codec.UnsubAck | None = None


@attrs.define(eq=False)
class Client:
    """An MQTT 3.1.1 (or, with ``protocol_level=5``, 5.0) client. Counters (``published``,
    ``acked``, ``received``, ...) add up over every connection of the client."""

    host: str
    port: int
    client_id: str
    clean_session: bool = True
    keepalive_s: int = 60
    will: codec.Will | None = None
    username: str | None = None
    password: bytes | None = None
    max_inflight: int = 20  # unacknowledged QoS 1/2 publishes at once
    connect_timeout_s: float = 10.0
    # its return value, if an int, is the reason code of the PUBACK / PUBREC (5.0 only)
    on_message: Callable[[codec.Publish], int | None] | None = None
    on_ack: Callable[[codec.Publish], None] | None = None  # a QoS 1/2 publish was settled
    protocol_level: int = codec.PROTOCOL_311  # or codec.PROTOCOL_5
    session_expiry_s: int = 0  # 5.0: how long the broker keeps a clean_session=False session
    # counters
    connects: int = attrs.field(init=False, default=0)
    published: int = attrs.field(init=False, default=0)  # PUBLISH packets sent (not resends)
    acked: int = attrs.field(init=False, default=0)  # QoS 1/2 publishes acknowledged
    resent: int = attrs.field(init=False, default=0)  # sent again after a reconnect
    received: int = attrs.field(init=False, default=0)  # PUBLISH delivered to on_message
    duplicates: int = attrs.field(init=False, default=0)  # QoS 2 PUBLISH seen again
    session_present: bool = attrs.field(init=False, default=False)
    # state
    _stream: trio.SocketStream | None = attrs.field(init=False, default=None)
    _send_lock: trio.StrictFIFOLock = attrs.field(init=False, factory=trio.StrictFIFOLock)
    _window: trio.Semaphore = attrs.field(init=False)
    _inflight: dict[int, _Outgoing] = attrs.field(init=False, factory=dict)
    _idle: trio.Event = attrs.field(init=False, factory=trio.Event)
    _qos2_received: set[int] = attrs.field(init=False, factory=set)
    _waiters: dict[int, _Waiter] = attrs.field(init=False, factory=dict)
    _next_id: int = attrs.field(init=False, default=0)
    _last_send: float = attrs.field(init=False, default=0.0)
    _ping_sent: float | None = attrs.field(init=False, default=None)
    _lost: ConnectionLost | None = attrs.field(init=False, default=None)
    _closing: bool = attrs.field(init=False, default=False)  # DISCONNECT is on its way
    _cancel: trio.CancelScope | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._window = trio.Semaphore(self.max_inflight)
        self._idle.set()

    @property
    def is_connected(self) -> bool:
        return self._stream is not None and self._lost is None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- connection ---------------------------------------------------------------------

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[codec.ConnAck]:
        """Connect (bounded by ``connect_timeout_s``), run the reader, yield the CONNACK.
        Resends the unacknowledged publishes of the previous connection first."""
        self._lost = None
        self._closing = False
        with trio.fail_after(self.connect_timeout_s):
            stream = await trio.open_tcp_stream(self.host, self.port)
        try:
            connack, decoder, leftovers = await self._handshake(stream)
            self._stream = stream
            self.connects += 1
            self.session_present = connack.session_present
            if not connack.session_present:
                self._qos2_received.clear()
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._reader, stream, decoder, leftovers)
                if self.keepalive_s:
                    nursery.start_soon(self._keepalive)
                await self._resend()
                yield connack
                if self._lost is None:  # the block finished: a clean goodbye (the broker
                    self._closing = True  # closes the socket then; that is no loss)
                    with trio.move_on_after(self.connect_timeout_s):
                        await self._send(codec.Disconnect().encode(self.protocol_level))
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # the nursery wraps the block's own exception; hand it on as it was raised
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._stream = None
            self._cancel = None
            self._ping_sent = None
            with trio.CancelScope(shield=True):
                await stream.aclose()
        if self._lost is not None:
            raise self._lost

    async def _handshake(
        self, stream: trio.SocketStream
    ) -> tuple[codec.ConnAck, codec.Decoder, list[codec.Packet]]:
        """CONNECT, then CONNACK; also returns the decoder for what follows and the packets
        that came with the CONNACK (a resumed session's queued messages may follow it in the
        same segment)."""
        exchange = client_role.Handshake(codec.Connect(
            self.client_id, self.clean_session, self.keepalive_s, self.protocol_level,
            will=self.will, username=self.username, password=self.password,
            properties={"session_expiry_interval": self.session_expiry_s}
            if self.protocol_level == codec.PROTOCOL_5 and self.session_expiry_s else None,
        ))
        with trio.fail_after(self.connect_timeout_s):
            self._last_send = trio.current_time()
            try:
                connack = await client_role.handshake(stream, exchange)
            except client_role.UnexpectedPacket as exc:
                raise ConnectionLost(
                    f"{self.client_id}: expected CONNACK, got {exc.packet!r}"
                ) from None
        if connack is None:
            raise ConnectionLost(f"{self.client_id}: closed by the broker before CONNACK")
        if connack.return_code:
            raise ConnectRefused(connack.return_code)
        return connack, exchange.decoder, exchange.leftovers

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a device losing power or network
        would: the broker publishes the will. The ``connected()`` block raises
        :class:`ConnectionLost`."""
        self._connection_lost("aborted by the client")

    def _connection_lost(self, why: str) -> None:
        if self._lost is None and not self._closing:
            self._lost = ConnectionLost(f"{self.client_id}: {why}")
        if self._cancel is not None:
            self._cancel.cancel()

    async def _send(self, data: bytes | bytearray) -> None:
        stream = self._stream
        if stream is None or self._lost is not None:
            raise ConnectionLost(f"{self.client_id}: not connected")
        async with self._send_lock:
            try:
                await stream.send_all(data)
            except trio.Cancelled:  # part of the packet may be out: the stream is unusable
                self._connection_lost("send cancelled")
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._connection_lost(f"send failed: {exc!r}")
                raise ConnectionLost(f"{self.client_id}: send failed: {exc!r}") from exc
        self._last_send = trio.current_time()

    async def _resend(self) -> None:
        out = bytearray()
        level = self.protocol_level
        for packet_id, entry in self._inflight.items():
            if entry.released:
                out += codec.PubRel(packet_id).encode(level)
            else:
                out += attrs.evolve(entry.packet, dup=True).encode(level)
            self.resent += 1
        if out:
            await self._send(out)

    async def _keepalive(self) -> None:
        interval = float(self.keepalive_s)
        while True:
            now = trio.current_time()
            if self._ping_sent is not None and now - self._ping_sent > interval:
                self._connection_lost("no PINGRESP within the keepalive")
                return
            if now - self._last_send >= interval:
                self._ping_sent = now
                await self._send(client_role.PINGREQ)
            await trio.sleep_until(min(self._last_send + interval, now + interval))

    async def _reader(
        self, stream: trio.SocketStream, decoder: codec.Decoder, leftovers: list[codec.Packet]
    ) -> None:
        try:
            out = bytearray()
            for packet in leftovers:
                self._handle(packet, out)
            if out:
                await self._send(out)
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    self._connection_lost("closed by the broker")
                    return
                out = bytearray()
                for packet in decoder.feed(data):
                    self._handle(packet, out)
                if out:
                    await self._send(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._connection_lost(f"receive failed: {exc!r}")
        except MQTTError as exc:
            self._connection_lost(f"bad packet from the broker: {exc}")

    def _handle(self, packet: codec.Packet, out: bytearray) -> None:
        """One packet from the broker; acknowledgements are appended to ``out``."""
        level = self.protocol_level
        if isinstance(packet, codec.Publish):
            if packet.qos == 2:
                code = 0
                if packet.packet_id in self._qos2_received:
                    self.duplicates += 1
                else:
                    code = self._deliver(packet)
                    if code < 0x80:  # a refusal ends the exchange: no PUBREL comes
                        self._qos2_received.add(packet.packet_id)
                out += codec.PubRec(packet.packet_id, code).encode(level)
            else:
                code = self._deliver(packet)
                if packet.qos == 1:
                    out += codec.PubAck(packet.packet_id, code).encode(level)
        elif isinstance(packet, codec.PubAck | codec.PubComp):
            entry = self._inflight.pop(packet.packet_id, None)
            if entry is not None:
                self._settled(entry.packet)
        elif isinstance(packet, codec.PubRec):
            entry = self._inflight.get(packet.packet_id)
            if entry is not None:
                entry.released = True
            out += codec.PubRel(packet.packet_id).encode(level)
        elif isinstance(packet, codec.PubRel):
            self._qos2_received.discard(packet.packet_id)
            out += codec.PubComp(packet.packet_id).encode(level)
        elif isinstance(packet, codec.SubAck | codec.UnsubAck):
            waiter = self._waiters.pop(packet.packet_id, None)
            if waiter is not None:
                waiter.result = packet
                waiter.event.set()
        elif isinstance(packet, codec.PingResp):
            self._ping_sent = None
        else:
            self._connection_lost(f"unexpected packet from the broker: {packet!r}")

    def _deliver(self, packet: codec.Publish) -> int:
        """The message to ``on_message``; the reason code of its acknowledgement (5.0)."""
        self.received += 1
        if self.on_message is not None:
            code = self.on_message(packet)
            if code and self.protocol_level == codec.PROTOCOL_5:
                return code
        return 0

    def _settled(self, packet: codec.Publish) -> None:
        self.acked += 1
        if self.on_ack is not None:
            self.on_ack(packet)
        self._window.release()
        if not self._inflight:
            self._idle.set()

    def _packet_id(self) -> int:
        self._next_id = client_role.free_packet_id(
            client_role.ids_after(self._next_id), self._inflight, self._waiters
        )
        return self._next_id

    # -- operations ---------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> None:
        """Send a PUBLISH. QoS 1/2 first waits for room in the inflight window; the
        acknowledgement is counted in ``acked`` (see :meth:`wait_acked`)."""
        if not qos:
            await self._send(codec.Publish(topic, payload, 0, retain).encode(self.protocol_level))
            self.published += 1
            return
        await self._window.acquire()
        packet = codec.Publish(topic, payload, qos, retain, False, self._packet_id())
        self._inflight[packet.packet_id] = _Outgoing(packet)
        if self._idle.is_set():
            self._idle = trio.Event()
        self.published += 1
        # stays in flight even if this send fails: it goes again on the next connection
        await self._send(packet.encode(self.protocol_level))

    async def wait_acked(self) -> None:
        """Wait until every QoS 1/2 publish is acknowledged (the caller bounds the wait)."""
        await self._idle.wait()

    async def _request(self, packet_id: int, data: bytes) -> codec.SubAck | codec.UnsubAck:
        waiter = self._waiters[packet_id] = _Waiter()
        try:
            await self._send(data)
            await waiter.event.wait()
        finally:
            self._waiters.pop(packet_id, None)
        assert waiter.result is not None
        return waiter.result

    async def subscribe(self, *filters: tuple[str, int] | str) -> tuple[int, ...]:
        """Subscribe (a bare filter means QoS 0); returns the SUBACK return codes."""
        subs = tuple(
            codec.Subscription(f, 0) if isinstance(f, str) else codec.Subscription(*f)
            for f in filters
        )
        packet_id = self._packet_id()
        suback = await self._request(
            packet_id, codec.Subscribe(packet_id, subs).encode(self.protocol_level)
        )
        assert isinstance(suback, codec.SubAck)
        return suback.return_codes

    async def unsubscribe(self, *filters: str) -> None:
        packet_id = self._packet_id()
        await self._request(
            packet_id, codec.Unsubscribe(packet_id, filters).encode(self.protocol_level)
        )


@attrs.define(eq=False)
class Backoff:
    """Exponential backoff with full jitter: a delay in [initial_s, min(max_s, initial_s *
    2**attempt)]; :meth:`reset` after a connection that worked."""

    initial_s: float = 0.5
    max_s: float = 10.0
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = attrs.field(init=False, default=0)

    def next_s(self) -> float:
        ceiling = min(self.max_s, self.initial_s * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(self.initial_s, max(ceiling, self.initial_s))

    def reset(self) -> None:
        self.attempt = 0


async def run_with_reconnect(
    client: Client,
    session: Callable[[Client, codec.ConnAck], Awaitable[bool]],
    *,
    backoff: Backoff | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> None:
    """Connect and run ``session(client, connack)`` until it returns True; when the
    connection fails or is lost, call ``on_error`` and connect again after a backoff.
    ``session`` returning False reconnects at once (a device reboot)."""
    backoff = backoff if backoff is not None else Backoff()
    while True:
        try:
            async with client.connected() as connack:
                backoff.reset()
                finished = await session(client, connack)
            if finished:
                return
        except CONNECTION_ERRORS as exc:
            if on_error is not None:
                on_error(exc)
            await trio.sleep(backoff.next_s())

