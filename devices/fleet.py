"""A sensor fleet: N simulated devices in one process, each its own MQTT client.

    python -m devices fleet --devices 100 --interval 1 --qos 1 --persistent --duration 60

Device ``sensor-0001`` (``--prefix``, ``--first``) connects with a will (``offline``,
retained, on ``site/sensor-0001/status``), publishes ``online`` there (retained), subscribes
to ``site/sensor-0001/command`` and publishes JSON telemetry on ``site/sensor-0001/telemetry``
every ``--interval`` seconds::

    {"device": "sensor-0001", "run": "5f0c2a9e", "seq": 17, "ts": 1732212345.123,
     "temperature_c": 21.43, "humidity_pct": 45.2, "battery_pct": 99.87, "rssi_dbm": -67}

``seq`` counts from 1 and keeps counting across reconnects and reboots; ``run`` changes with
each fleet process (so a consumer can tell a restarted fleet from duplicates). Commands
(JSON on the command topic) are answered on ``site/<id>/reply``, echoing an ``id`` if the
command has one: ``{"cmd": "ping"}``, ``{"cmd": "set_interval", "seconds": 2}``,
``{"cmd": "reboot"}`` (DISCONNECT, connect again). When the broker goes away every device
reconnects with exponential backoff; unacknowledged QoS 1/2 telemetry is sent again.

As a library::

    stats = await run_fleet("127.0.0.1", port, devices=20, count=50, interval_s=0.01)

or ``fleet = Fleet(host, port, FleetConfig(...)); await nursery.start(fleet.run)`` to watch
``fleet.stats`` and ``fleet.devices`` while it runs (``fleet.stop()`` ends it gracefully).
"""

from __future__ import annotations

import json
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from devices.client import Backoff, Client, run_with_reconnect
from mqttd import codec

STOP_GRACE_S = 5.0  # how long stopping devices may take to flush and say goodbye


@attrs.frozen
class Topics:
    """Topic templates; ``{id}`` is replaced by the device id."""

    telemetry: str = "site/{id}/telemetry"
    status: str = "site/{id}/status"
    command: str = "site/{id}/command"
    reply: str = "site/{id}/reply"


@attrs.frozen
class FleetConfig:
    devices: int = 10
    prefix: str = "sensor-"
    first: int = 1  # number of the first device (two processes can split a fleet)
    width: int = 4  # digits in the device number: sensor-0001
    interval_s: float = 1.0  # between two telemetry messages of one device
    qos: int = 1
    persistent: bool = False  # clean session 0: commands queue while a device is away
    count: int | None = None  # telemetry messages per device, then stop
    duration_s: float | None = None  # then stop
    keepalive_s: int = 60
    max_inflight: int = 10
    username: str | None = None
    password: str | None = None
    topics: Topics = Topics()
    connect_rate: float = 500.0  # new connections per second while the fleet starts
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    connect_timeout_s: float = 10.0
    report_interval_s: float = 2.0
    seed: int | None = None

    def device_id(self, n: int) -> str:
        return f"{self.prefix}{n:0{self.width}d}"


@attrs.define
class FleetStats:
    devices: int
    connected: int = 0  # devices connected now
    published: int = 0  # telemetry messages sent (each seq once)
    acked: int = 0  # telemetry messages acknowledged (QoS 1/2)
    commands: int = 0  # commands handled (each answered on the reply topic)
    reconnects: int = 0  # successful connections after a device's first
    resumed: int = 0  # connections on which the broker had kept the session
    errors: int = 0  # failed connection attempts and lost connections
    finished: int = 0  # devices done (count reached or stopped)
    elapsed_s: float = 0.0

    def line(self) -> str:
        text = (f"connected {self.connected}/{self.devices}  published {self.published:,}  "
                f"acked {self.acked:,}  commands {self.commands}  reconnects {self.reconnects}")
        return f"{text}  connection errors {self.errors}" if self.errors else text

    def summary(self) -> str:
        rate = self.published / self.elapsed_s if self.elapsed_s else 0.0
        return (f"fleet done in {self.elapsed_s:.1f}s: {self.devices} devices, published "
                f"{self.published:,} ({rate:,.1f} msgs/s), acked {self.acked:,}, commands "
                f"{self.commands}, reconnects {self.reconnects} ({self.resumed} sessions "
                f"resumed), connection errors {self.errors}")


@attrs.define(eq=False)
class SensorDevice:
    """One simulated sensor. ``run`` lasts until the count is reached or the fleet stops."""

    device_id: str
    host: str
    port: int
    config: FleetConfig
    stats: FleetStats
    run_id: str
    rng: random.Random
    client: Client = attrs.field(init=False)
    seq: int = attrs.field(init=False, default=0)
    interval_s: float = attrs.field(init=False)
    boots: int = attrs.field(init=False, default=1)
    topics: Topics = attrs.field(init=False)
    temperature_c: float = attrs.field(init=False)
    humidity_pct: float = attrs.field(init=False)
    battery_pct: float = attrs.field(init=False)
    done: bool = attrs.field(init=False, default=False)
    _base_c: float = attrs.field(init=False)
    _base_pct: float = attrs.field(init=False)
    _booted_at: float = attrs.field(init=False, default=0.0)
    _next_at: float | None = attrs.field(init=False, default=None)
    _commands: deque[bytes] = attrs.field(init=False, factory=deque)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _stopping: bool = attrs.field(init=False, default=False)
    _scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        t = cfg.topics
        i = self.device_id
        self.topics = Topics(t.telemetry.format(id=i), t.status.format(id=i),
                             t.command.format(id=i), t.reply.format(id=i))
        self.interval_s = cfg.interval_s
        self._base_c = self.rng.uniform(18.0, 24.0)
        self._base_pct = self.rng.uniform(35.0, 55.0)
        self.temperature_c = self._base_c + self.rng.gauss(0, 0.5)
        self.humidity_pct = self._base_pct
        self.battery_pct = self.rng.uniform(80.0, 100.0)
        self.client = Client(
            self.host, self.port, self.device_id, clean_session=not cfg.persistent,
            keepalive_s=cfg.keepalive_s, max_inflight=cfg.max_inflight,
            will=codec.Will(self.topics.status, b"offline", 1, True),
            username=cfg.username,
            password=cfg.password.encode() if cfg.password is not None else None,
            connect_timeout_s=cfg.connect_timeout_s,
            on_message=self._on_message, on_ack=self._on_ack,
        )

    # -- control from the fleet (or a test) ---------------------------------------------

    def stop(self) -> None:
        """Finish gracefully: flush, publish ``offline`` (retained), DISCONNECT. A device
        that is not connected just ends."""
        self._stopping = True
        if not self.client.is_connected:
            self._scope.cancel()
        self._wake.set()

    def power_off(self) -> None:
        """End at once without DISCONNECT, as if the power failed: the broker publishes the
        will (``offline``, retained)."""
        self._scope.cancel()

    # -- running ------------------------------------------------------------------------

    async def run(self, start_delay_s: float = 0.0) -> None:
        with self._scope:
            await trio.sleep(start_delay_s)
            backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s, self.rng)
            await run_with_reconnect(self.client, self._online, backoff=backoff,
                                     on_error=self._on_error)
        self.done = True
        self.stats.finished += 1

    def _on_error(self, exc: BaseException) -> None:
        if self._stopping:  # lost while saying goodbye: done, no reconnecting
            self._scope.cancel()
            return
        self.stats.errors += 1

    def _on_message(self, packet: codec.Publish) -> None:
        if packet.topic == self.topics.command:
            self._commands.append(packet.payload)
            self._wake.set()

    def _on_ack(self, packet: codec.Publish) -> None:
        if packet.topic == self.topics.telemetry:
            self.stats.acked += 1

    def _finished(self) -> bool:
        count = self.config.count
        return self._stopping or (count is not None and self.seq >= count)

    async def _online(self, client: Client, connack: codec.ConnAck) -> bool:
        """One connection; True when the device is done, False to reconnect (reboot)."""
        stats = self.stats
        stats.connected += 1
        stats.reconnects += client.connects > 1
        stats.resumed += connack.session_present
        now = trio.current_time()
        if self._next_at is None:  # spread the fleet's first messages over one interval
            self._next_at = now + self.rng.uniform(0, self.interval_s)
            self._booted_at = now
        try:
            if not connack.session_present:
                codes = await client.subscribe((self.topics.command, 1))
                if codes[0] == 0x80:
                    raise RuntimeError(f"{self.device_id}: subscription to commands refused")
            await client.publish(self.topics.status, b"online", qos=1, retain=True)
            while not self._finished():
                with trio.move_on_at(self._next_at):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = trio.Event()
                while self._commands:
                    if await self._obey(client, self._commands.popleft()):
                        return False
                now = trio.current_time()
                if now >= self._next_at and not self._finished():
                    await self._publish_telemetry(client, now)
                    self._next_at += self.interval_s
                    if self._next_at < now:  # far behind (window full): do not burst
                        self._next_at = now + self.interval_s
            with trio.move_on_after(STOP_GRACE_S):
                await client.wait_acked()
                await client.publish(self.topics.status, b"offline", qos=1, retain=True)
                await client.wait_acked()
            return True
        finally:
            stats.connected -= 1

    def telemetry(self, now: float) -> dict[str, Any]:
        """The next reading: temperature and humidity wander around the device's own base
        (mean-reverting random walks, humidity moving against temperature), the battery
        drains a little with every message."""
        rng = self.rng
        self.temperature_c += 0.05 * (self._base_c - self.temperature_c) + rng.gauss(0, 0.15)
        self.humidity_pct += (0.05 * (self._base_pct - self.humidity_pct) + rng.gauss(0, 0.4)
                              - 0.8 * (self.temperature_c - self._base_c) * 0.05)
        self.humidity_pct = min(100.0, max(0.0, self.humidity_pct))
        self.battery_pct = max(0.0, self.battery_pct - rng.uniform(0.0005, 0.003))
        return {
            "device": self.device_id, "run": self.run_id, "seq": self.seq,
            "ts": round(time.time(), 3), "uptime_s": round(now - self._booted_at, 1),
            "temperature_c": round(self.temperature_c, 2),
            "humidity_pct": round(self.humidity_pct, 1),
            "battery_pct": round(self.battery_pct, 2),
            "rssi_dbm": int(-60 - 15 * abs(math.sin(self.seq / 40)) + rng.randint(-3, 3)),
        }

    async def _publish_telemetry(self, client: Client, now: float) -> None:
        self.seq += 1
        payload = json.dumps(self.telemetry(now), separators=(",", ":")).encode()
        self.stats.published += 1
        await client.publish(self.topics.telemetry, payload, qos=self.config.qos)

    async def _obey(self, client: Client, payload: bytes) -> bool:
        """Carry out one command and answer it; True for a reboot."""
        reply: dict[str, Any] = {"device": self.device_id}
        reboot = False
        try:
            command = json.loads(payload)
            name = command["cmd"]
        except (ValueError, TypeError, KeyError):
            command, name = {}, None
        if isinstance(command, dict) and "id" in command:
            reply["id"] = command["id"]
        reply["cmd"] = name
        if name == "ping":
            reply.update(ok=True, reply="pong", seq=self.seq,
                         uptime_s=round(trio.current_time() - self._booted_at, 1))
        elif name == "set_interval":
            seconds = command.get("seconds")
            if isinstance(seconds, int | float) and 0 < seconds <= 86_400:
                self.interval_s = float(seconds)
                self._next_at = trio.current_time() + self.interval_s
                reply.update(ok=True, interval_s=self.interval_s)
            else:
                reply.update(ok=False, error="seconds must be a number in (0, 86400]")
        elif name == "reboot":
            reply.update(ok=True, boots=self.boots + 1)
            reboot = True
        elif name is None:
            reply.update(ok=False, error='not a JSON command like {"cmd": "ping"}')
        else:
            reply.update(ok=False, error=f"unknown command {name!r}")
        self.stats.commands += 1
        await client.publish(self.topics.reply, json.dumps(reply).encode(), qos=1)
        if reboot:
            with trio.move_on_after(STOP_GRACE_S):
                await client.wait_acked()
            self.boots += 1
            self._booted_at = trio.current_time()
        return reboot


@attrs.define(eq=False)
class Fleet:
    host: str
    port: int
    config: FleetConfig = FleetConfig()
    report: Callable[[str], None] | None = None  # progress lines (print for the CLI)
    stats: FleetStats = attrs.field(init=False)
    devices: list[SensorDevice] = attrs.field(init=False)
    run_id: str = attrs.field(init=False, factory=lambda: secrets.token_hex(4))
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _stopping: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        self.stats = FleetStats(cfg.devices)
        seeds = random.Random(cfg.seed)
        self.devices = [
            SensorDevice(cfg.device_id(n), self.host, self.port, cfg, self.stats, self.run_id,
                         random.Random(seeds.getrandbits(64)))
            for n in range(cfg.first, cfg.first + cfg.devices)
        ]

    def device(self, device_id: str) -> SensorDevice:
        return next(d for d in self.devices if d.device_id == device_id)

    def stop(self) -> None:
        """Stop every device gracefully; devices still busy after a grace period are
        cancelled."""
        if self._stopping:
            return
        self._stopping = True
        for device in self.devices:
            device.stop()
        if self._nursery is not None:
            self._nursery.start_soon(self._cancel_after, STOP_GRACE_S + 1)

    async def _cancel_after(self, delay_s: float) -> None:
        await trio.sleep(delay_s)
        for device in self.devices:
            device.power_off()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> FleetStats:
        """Run every device until each is done (``count``), ``duration_s`` passes or
        :meth:`stop` is called. Reports started at once (the devices connect meanwhile)."""
        cfg = self.config
        started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.report is not None:
                    nursery.start_soon(self._report_loop, started)
                if cfg.duration_s is not None:
                    nursery.start_soon(self._stop_after, cfg.duration_s)
                async with trio.open_nursery() as devices:
                    for i, device in enumerate(self.devices):
                        devices.start_soon(device.run, i / cfg.connect_rate)
                    task_status.started(self)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.stats.elapsed_s = trio.current_time() - started
        return self.stats

    async def _stop_after(self, duration_s: float) -> None:
        await trio.sleep(duration_s)
        self.stop()

    async def _report_loop(self, started: float) -> None:
        assert self.report is not None
        interval = self.config.report_interval_s
        last_published, last_at = 0, started
        while True:
            await trio.sleep_until(last_at + interval)
            now = trio.current_time()
            delta = self.stats.published - last_published
            rate = delta / (now - last_at)
            self.report(f"[{now - started:7.1f}s] {self.stats.line()}  "
                        f"(+{delta:,}, {rate:,.1f} msgs/s)")
            last_published, last_at = self.stats.published, now


async def run_fleet(
    host: str,
    port: int,
    devices: int = 10,
    *,
    report: Callable[[str], None] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> FleetStats:
    """Run a fleet of ``devices`` sensors to the end; ``options`` are :class:`FleetConfig`
    fields (``count``, ``interval_s``, ``qos``, ``persistent``, ...). With
    ``nursery.start(...)`` it reports the :class:`Fleet` as started."""
    fleet = Fleet(host, port, FleetConfig(devices=devices, **options), report)
    return await fleet.run(task_status=task_status)
