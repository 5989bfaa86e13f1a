"""A constrained MQTT device: a window of one, slow acknowledgements, a tiny receive buffer.

    python -m devices.constrained --host 127.0.0.1 --port 1883 --client-id devices/constrained-1 \\
        --topic 'cmd/#' --ack-delay-ms 50 --rcvbuf 4096 --count 100

It sets SO_RCVBUF before connecting (so its TCP window stays small), subscribes at QoS 1 and
acknowledges each PUBLISH ``ack_delay_s`` after it came, one at a time, reading all along: a
QoS 1 PUBLISH arriving while another is unacknowledged counts in ``violations`` (and
``max_unacked`` > 1; ``strict`` raises AssertionError). As a library (tests/backpressure)::

    device = ConstrainedDevice("127.0.0.1", port, count=21)
    await nursery.start(device.run)    # returns once subscribed
    await device.wait_received(21)     # then device.payloads, .duplicates, .max_unacked
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

import attrs
import trio

from mqttd import codec

P = TypeVar("P")


@attrs.define(eq=False)
class ConstrainedDevice:
    host: str
    port: int
    client_id: str = "devices/constrained-1"
    topic: str = "cmd/#"
    ack_delay_s: float = 0.05
    rcvbuf: int = 4096
    count: int | None = None  # stop after this many messages (None: until cancelled)
    clean_session: bool = True
    strict: bool = False
    hold_acks: trio.Event | None = None  # acknowledgements wait for this event (tests)
    on_message: Callable[[ConstrainedDevice], None] | None = None
    # what it saw
    payloads: list[bytes] = attrs.field(init=False, factory=list)  # every PUBLISH, in order
    duplicates: int = attrs.field(init=False, default=0)  # DUP set, or a payload seen before
    unacked: int = attrs.field(init=False, default=0)  # QoS 1 received, not acknowledged yet
    max_unacked: int = attrs.field(init=False, default=0)
    violations: int = attrs.field(init=False, default=0)  # QoS 1 came while one was unacked
    acked: int = attrs.field(init=False, default=0)
    rcvbuf_actual: int = attrs.field(init=False, default=0)  # Linux doubles the request
    _seen: set[bytes] = attrs.field(init=False, factory=set)
    _decoder: codec.Decoder = attrs.field(
        init=False, factory=lambda: codec.Decoder(protocol_level=codec.PROTOCOL_311)
    )
    _pending: deque[codec.Packet] = attrs.field(init=False, factory=deque)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)
    _done: trio.Event = attrs.field(init=False, factory=trio.Event)
    _to_ack: deque[int] = attrs.field(init=False, factory=deque)
    _ack_ready: trio.Event = attrs.field(init=False, factory=trio.Event)

    def summary(self) -> str:
        return (f"received {len(self.payloads)}, acknowledged {self.acked}, max unacked "
                f"{self.max_unacked}, violations {self.violations}, duplicates {self.duplicates}")

    async def wait_received(self, n: int) -> None:
        """Wait until ``n`` messages were received (the caller bounds the wait)."""
        while len(self.payloads) < n:
            await self._changed.wait()

    def _check_done(self) -> None:
        if self.count is not None and len(self.payloads) >= self.count and not self.unacked:
            self._done.set()

    def _on_publish(self, packet: codec.Publish) -> None:
        if packet.dup or packet.payload in self._seen:
            self.duplicates += 1
        self._seen.add(packet.payload)
        self.payloads.append(packet.payload)
        if packet.qos:
            self.unacked += 1
            self.max_unacked = max(self.max_unacked, self.unacked)
            if self.unacked > 1:
                self.violations += 1
                if self.strict:
                    raise AssertionError(f"{self.unacked} unacknowledged PUBLISHes at once")
            self._to_ack.append(packet.packet_id)
            self._ack_ready.set()
        if self.on_message is not None:
            self.on_message(self)
        self._changed.set()
        self._changed = trio.Event()
        self._check_done()

    async def _connect(self) -> trio.SocketStream:
        infos = await trio.socket.getaddrinfo(self.host, self.port, type=trio.socket.SOCK_STREAM)
        family, type_, proto, _, address = infos[0]
        sock = trio.socket.socket(family, type_, proto)
        try:  # before connect(): the window scale and initial window are chosen from it
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, self.rcvbuf)
            self.rcvbuf_actual = sock.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF)
            await sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _next(self, stream: trio.SocketStream) -> codec.Packet:
        while not self._pending:
            data = await stream.receive_some(max(self.rcvbuf, 1024))
            if not data:
                raise ConnectionError(f"{self.client_id}: connection closed by the broker")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    async def _expect(self, stream: trio.SocketStream, kind: type[P]) -> P:
        while not isinstance(packet := await self._next(stream), kind):
            if isinstance(packet, codec.Publish):  # a persistent session's backlog may come first
                self._on_publish(packet)
        return packet

    async def _read(self, stream: trio.SocketStream) -> None:
        while True:
            if isinstance(packet := await self._next(stream), codec.Publish):
                self._on_publish(packet)

    async def _acknowledge(self, stream: trio.SocketStream) -> None:
        while True:
            while not self._to_ack:
                await self._ack_ready.wait()
                self._ack_ready = trio.Event()
            if self.hold_acks is not None:
                await self.hold_acks.wait()
            await trio.sleep(self.ack_delay_s)
            self.unacked -= 1  # before sending: the broker may answer at once
            await stream.send_all(codec.PubAck(self._to_ack.popleft()).encode())
            self.acked += 1
            self._check_done()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        """Connect and subscribe (then report started); receive and acknowledge until
        ``count`` messages are received and acknowledged; disconnect."""
        async with await self._connect() as stream:
            connect = codec.Connect(self.client_id, self.clean_session, keepalive_s=0)
            await stream.send_all(connect.encode())  # keepalive 0: it never sends PINGREQ
            if (connack := await self._expect(stream, codec.ConnAck)).return_code:
                raise ConnectionError(f"{self.client_id}: refused: {connack}")
            await stream.send_all(codec.Subscribe(1, (codec.Subscription(self.topic, 1),)).encode())
            if (suback := await self._expect(stream, codec.SubAck)).return_codes[0] not in (0, 1):
                raise ConnectionError(f"{self.client_id}: subscription refused: {suback}")
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, stream)
                nursery.start_soon(self._acknowledge, stream)
                self._check_done()
                await self._done.wait()
                nursery.cancel_scope.cancel()
            await stream.send_all(codec.Disconnect().encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devices.constrained", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--client-id", default="devices/constrained-1")
    parser.add_argument("--topic", default="cmd/#")
    parser.add_argument("--ack-delay-ms", type=float, default=50.0)
    parser.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF in bytes")
    parser.add_argument("--count", type=int, default=None, help="stop after N messages")
    parser.add_argument("--persistent", action="store_true", help="connect with clean session 0")
    args = parser.parse_args(argv)
    device = ConstrainedDevice(
        args.host, args.port, args.client_id, args.topic, ack_delay_s=args.ack_delay_ms / 1000,
        rcvbuf=args.rcvbuf, count=args.count, clean_session=not args.persistent,
        on_message=lambda d: print(d.summary(), flush=True) if len(d.payloads) % 10 == 0 else None,
    )
    errors: list[BaseException] = []

    async def run() -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(device.run)
                print(f"subscribed to {args.topic!r} as {args.client_id!r} "
                      f"(SO_RCVBUF {device.rcvbuf_actual})", flush=True)
        except* OSError as group:  # refused, reset, closed by the broker
            errors.extend(group.exceptions)

    with suppress(KeyboardInterrupt):
        trio.run(run)
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
    print(f"done: {device.summary()}", flush=True)
    return 2 if errors else 1 if device.violations or device.duplicates else 0


if __name__ == "__main__":
    sys.exit(main())
