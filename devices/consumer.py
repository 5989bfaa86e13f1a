"""A backend worker that consumes the fleet's telemetry, and a helper that sends a command.

    python -m devices consume --group workers --client-id worker-1 --persistent
    python -m devices command sensor-0001 '{"cmd": "ping"}'

The worker subscribes at QoS 1 to ``site/+/telemetry`` (``--filter``); ``--group NAME`` makes
that the shared subscription ``$share/NAME/site/+/telemetry``, so the workers of one group
split the messages between them. Every interval it prints the messages per second and, for
a few devices, their count and last values; at the end a summary. Without a group it also
checks each device's ``seq``: a number seen twice is a duplicate, a number skipped is
missing (counted from the first number it saw of that fleet run).

As a library::

    consumer = Consumer("127.0.0.1", port, client_id="backend-1")
    await nursery.start(consumer.run)      # returns once subscribed
    ...; consumer.stats.devices["sensor-0001"].count; consumer.stop()
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Callable
from typing import Any

import attrs
import trio

from devices.client import Backoff, Client
from devices.fleet import Topics
from devices.subscriber import Subscriber
from mqttd import codec

DEFAULT_TOPICS = Topics()


def shared_filter(topic_filter: str, group: str | None) -> str:
    """``$share/<group>/<filter>``, or the filter itself without a group."""
    return f"$share/{group}/{topic_filter}" if group else topic_filter


@attrs.define
class DeviceTally:
    """What one consumer heard from one device."""

    count: int = 0
    duplicates: int = 0
    run: str | None = None  # the fleet run the sequence numbers belong to
    first_seq: int = 0  # the first number heard of this run
    next_seq: int = 0  # every number below it (from first_seq) has been heard
    ahead: set[int] = attrs.field(factory=set)  # heard, above next_seq
    last: dict[str, Any] = attrs.field(factory=dict)

    @property
    def missing(self) -> int:
        """Numbers skipped between first_seq and the highest heard."""
        return max(self.ahead) - self.next_seq + 1 - len(self.ahead) if self.ahead else 0

    def add(self, run: str | None, seq: int) -> bool:
        """Record one sequence number; False if it was heard before."""
        self.count += 1
        if run != self.run or not self.next_seq:
            self.run, self.first_seq, self.next_seq = run, seq, seq + 1
            self.ahead.clear()
            return True
        if seq < self.next_seq or seq in self.ahead:
            self.duplicates += 1
            return False
        if seq == self.next_seq:
            self.next_seq += 1
            while self.next_seq in self.ahead:
                self.ahead.discard(self.next_seq)
                self.next_seq += 1
        else:
            self.ahead.add(seq)
        return True


@attrs.define
class ConsumerStats:
    received: int = 0
    not_json: int = 0
    devices: dict[str, DeviceTally] = attrs.field(factory=dict)
    reconnects: int = 0
    errors: int = 0  # failed connection attempts and lost connections
    last_error: str = ""
    elapsed_s: float = 0.0

    @property
    def duplicates(self) -> int:
        return sum(t.duplicates for t in self.devices.values())

    @property
    def missing(self) -> int:
        return sum(t.missing for t in self.devices.values())


@attrs.define(eq=False)
class Consumer:
    host: str
    port: int
    client_id: str = "backend-1"
    filter: str = "site/+/telemetry"
    group: str | None = None
    qos: int = 1
    persistent: bool = False
    keepalive_s: int = 60
    username: str | None = None
    password: str | None = None
    count: int | None = None  # stop after this many messages
    duration_s: float | None = None
    report: Callable[[str], None] | None = None
    report_interval_s: float = 2.0
    show: int = 3  # devices listed in each progress report
    on_message: Callable[[codec.Publish], None] | None = None
    backoff_initial_s: float = 0.5
    stats: ConsumerStats = attrs.field(init=False, factory=ConsumerStats)
    client: Client = attrs.field(init=False)
    _subscriber: Subscriber = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.client = Client(
            self.host, self.port, self.client_id, clean_session=not self.persistent,
            keepalive_s=self.keepalive_s, username=self.username,
            password=self.password.encode() if self.password is not None else None,
            on_message=self._on_message,
        )
        self._subscriber = Subscriber(self.client)

    @property
    def subscription(self) -> str:
        return shared_filter(self.filter, self.group)

    def stop(self) -> None:
        """Disconnect and end :meth:`run` (at once if not connected: no reconnecting)."""
        self._subscriber.stop()

    def _on_message(self, packet: codec.Publish) -> None:
        stats = self.stats
        stats.received += 1
        try:
            data = json.loads(packet.payload)
            device, seq = str(data["device"]), int(data["seq"])
        except (ValueError, TypeError, KeyError):
            stats.not_json += 1
            levels = packet.topic.split("/")
            device, seq, data = levels[1] if len(levels) > 1 else packet.topic, 0, {}
        tally = stats.devices.get(device)
        if tally is None:
            tally = stats.devices[device] = DeviceTally()
        if seq:
            tally.add(data.get("run"), seq)
        else:
            tally.count += 1
        tally.last = data
        if self.on_message is not None:
            self.on_message(packet)
        if self.count is not None and stats.received >= self.count:
            self.stop()

    async def _session(self, client: Client, connack: codec.ConnAck) -> bool:
        if client.connects > 1:
            self.stats.reconnects += 1
        if not connack.session_present:
            (code,) = await client.subscribe((self.subscription, self.qos))
            if code == 0x80:
                raise RuntimeError(f"subscription to {self.subscription!r} refused")
        return await self._subscriber.subscribed()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> ConsumerStats:
        """Consume until ``count`` messages, ``duration_s`` or :meth:`stop`; reconnects when
        the broker goes away. Reports started once subscribed."""
        started = trio.current_time()
        try:
            await self._subscriber.run(
                self._session, backoff=Backoff(self.backoff_initial_s), on_error=self._on_error,
                task_status=task_status, started_with=self,
                report_loop=(functools.partial(self._report_loop, started)
                             if self.report is not None else None),
                duration_s=self.duration_s,
            )
        finally:
            self.stats.elapsed_s = trio.current_time() - started
        return self.stats

    def _on_error(self, exc: BaseException) -> None:
        if self._subscriber.lost_while_stopping():
            return
        self.stats.errors += 1
        self.stats.last_error = str(exc) or repr(exc)
        if self.report is not None:
            self.report(f"connection error: {self.stats.last_error} (reconnecting)")

    def device_lines(self) -> list[str]:
        lines = []
        for device, tally in sorted(self.stats.devices.items())[: self.show]:
            parts = [f"    {device}", f"{tally.count:,} msgs"]
            for key, text in (("seq", "seq {}"), ("temperature_c", "{:.1f} C"),
                              ("humidity_pct", "{:.0f} %RH"), ("battery_pct", "battery {:.1f} %")):
                if key in tally.last:
                    try:
                        parts.append(text.format(tally.last[key]))
                    except (TypeError, ValueError):  # not a number: someone else's payload
                        parts.append(f"{key} {tally.last[key]!r}")
            lines.append("  ".join(parts))
        if len(self.stats.devices) > self.show:
            lines.append(f"    ... and {len(self.stats.devices) - self.show} more devices")
        return lines

    def line(self) -> str:
        s = self.stats
        text = f"received {s.received:,} from {len(s.devices)} devices"
        if not self.group:  # a group member sees a share of each device's numbers
            text += f"  duplicates {s.duplicates}  missing {s.missing}"
        return text

    def summary(self) -> str:
        s = self.stats
        rate = s.received / s.elapsed_s if s.elapsed_s else 0.0
        return (f"consumer {self.client_id} done in {s.elapsed_s:.1f}s: {self.line()}  "
                f"({rate:,.1f} msgs/s, reconnects {s.reconnects})")

    async def _report_loop(self, started: float) -> None:
        assert self.report is not None
        last_received, last_at = 0, started
        while True:
            await trio.sleep_until(last_at + self.report_interval_s)
            now = trio.current_time()
            delta = self.stats.received - last_received
            self.report(f"[{now - started:7.1f}s] {self.line()}  "
                        f"(+{delta:,}, {delta / (now - last_at):,.1f} msgs/s)")
            for line in self.device_lines():
                self.report(line)
            last_received, last_at = self.stats.received, now


async def send_command(
    host: str,
    port: int,
    device_id: str,
    command: dict[str, Any] | str,
    *,
    topics: Topics = DEFAULT_TOPICS,
    timeout_s: float = 10.0,
    client_id: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> dict[str, Any]:
    """Publish ``command`` (QoS 1) on the device's command topic and return its reply.
    A dict command without an ``id`` gets one, and only the reply with that id counts.
    Raises trio.TooSlowError after ``timeout_s``."""
    if isinstance(command, str):
        command = json.loads(command)
        if not isinstance(command, dict):
            raise ValueError('a command is a JSON object like {"cmd": "ping"}')
    command = {**command}
    command.setdefault("id", secrets.token_hex(4))
    replies: list[dict[str, Any]] = []
    got = trio.Event()

    def on_message(packet: codec.Publish) -> None:
        try:
            reply = json.loads(packet.payload)
        except ValueError:
            return
        if isinstance(reply, dict) and reply.get("id") == command["id"]:
            replies.append(reply)
            got.set()

    client = Client(
        host, port, client_id or f"devices-command-{secrets.token_hex(3)}",
        keepalive_s=0, on_message=on_message, connect_timeout_s=timeout_s, username=username,
        password=password.encode() if password is not None else None,
    )
    with trio.fail_after(timeout_s):
        async with client.connected():
            await client.subscribe((topics.reply.format(id=device_id), 1))
            await client.publish(topics.command.format(id=device_id),
                                 json.dumps(command).encode(), qos=1)
            await got.wait()
    return replies[0]
