"""Load generator for the broker benchmark (``tools/bench.py``): MQTT 3.1.1 clients on
plain sync sockets, spread over several worker processes, that pipeline pre-encoded
packets and count every delivery.

Every message carries ``(publisher, seq, send time)`` in the first bytes of its payload
(``PAYLOAD``: big-endian u16, u32, i64 ``time.monotonic_ns()``; the monotonic clock is
system-wide on Linux, so a subscriber process can subtract a publisher process's stamp).
Subscribers count arrivals per ``(publisher, seq)`` in a byte array, which gives the
lost and duplicated messages, and keep every latency.

The packets a publisher sends are encoded once (the template with :mod:`mqttd.codec`,
then the sequence numbers and packet ids patched in) before the measured window; during
it the only per-message work is writing the send time into the packet just before its
chunk goes out. Subscribers parse PUBLISH packets with a few slices and one
``struct.unpack_from`` instead of building packet objects.

The entry points (``fan_in``, ``fan_out``, ``latency``, ``connections``,
``constrained``) run in the calling process and block until the scenario is over; they
take a ``Probe`` whose ``start``/``stop`` the coordinator calls around the measured
window (the benchmark samples the broker's CPU there). Every worker process is killed in
``finally``.

``constrained`` runs the device class of ``devices/constrained.py`` (window 1, slow acks,
a small SO_RCVBUF) in a worker process of its own, under trio, next to a QoS 0 telemetry
load; the devices record what they receive (order, duplicates, the most PUBLISHes they
had unacknowledged at once).
"""

from __future__ import annotations

import array
import ctypes
import errno
import multiprocessing as mp
import queue as queue_module
import resource
import select
import selectors
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mqttd.codec import ConnAck, Connect, Decoder, Publish, SubAck, Subscribe, Subscription

PAYLOAD = struct.Struct(">HIq")  # publisher, seq, monotonic_ns at send
STAMP = struct.Struct(">q")
PAYLOAD_SIZE = 64
RECV_SIZE = 1 << 18
STAMP_CHUNK = 64  # packets written per send call (all get the same send time)
# A throughput worker whose last pass over its sockets read less than BATCH_BYTES sleeps
# BATCH_WAIT_S before the next one, so that a broker writing one small segment per
# message (mosquitto does) does not cost the generator one wakeup per message.
# The latency scenario does not wait.
BATCH_BYTES = 16384
BATCH_WAIT_S = 0.0002
EVENT_CHECK_S = 0.05  # how often a worker looks at the coordinator's signals
SETTLE_S = 3.0  # after the publishers are done: silence this long ends a subscriber
GRACE_S = 10.0  # on top of the scenario timeout, for workers to report
SETUP_TIMEOUT_S = 60.0  # to connect and subscribe, before the measured window
DISCONNECT = b"\xe0\x00"
PUBACK_HEAD = b"\x40\x02"
# Handshakes in flight at once in the connections scenario, over all worker processes:
# below the smallest listen backlog (mosquitto and amqtt use 100), so that no SYN is
# dropped and retried a second later (which would measure TCP's retry timer).
MAX_PENDING_CONNECTS = 64
# the broker's RSS with the idle connections is read once they have been held this long
# (after the last CONNACK), not while it may still be finishing their setup
HOLD_S = 0.5


class WorkerError(RuntimeError):
    """A worker process failed (its traceback is the message) or vanished."""


class Probe:
    """Called by the coordinator right before the go signal and right after the last
    result; the benchmark subclasses it to sample the broker."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process if the process that started it dies, so
    that nothing outlives a benchmark that is itself killed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, ctypes.ArgumentError):
        pass


def prepare_child(nofile: int | None = None) -> None:
    """For a broker subprocess (``preexec_fn``) or a worker: fd limit up (to ``nofile`` if
    allowed, else to the hard limit), die with parent."""
    raise_fd_limit(nofile)
    die_with_parent()


def raise_fd_limit(want: int | None = None) -> int:
    """Soft RLIMIT_NOFILE to ``want`` (soft and hard) if this process may (raising the hard
    limit needs CAP_SYS_RESOURCE), else up to the hard limit (10k clients need more than
    1024 fds); returns the soft limit now (-1: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want and soft != resource.RLIM_INFINITY and want > soft:
        wanted_hard = hard if hard == resource.RLIM_INFINITY else max(hard, want)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, wanted_hard))
        except (ValueError, OSError):
            pass  # above the hard limit without CAP_SYS_RESOURCE: as far as allowed below
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


# -- packets -----------------------------------------------------------------------


def topic_for(pub: int) -> str:
    """Distinct topics of equal length, so every packet of a stream has the same size."""
    return f"bench/{pub:04d}/t"


def publish_stream(topic: str, pub: int, count: int, qos: int) -> tuple[bytearray, int, int]:
    """``count`` PUBLISH packets back to back, seq 0..count-1 (packet id seq % 65535 + 1);
    returns ``(stream, packet length, offset of the send time within a packet)``."""
    template = Publish(topic, bytes(PAYLOAD_SIZE), qos, packet_id=1 if qos else 0).encode()
    size = len(template)
    payload_at = size - PAYLOAD_SIZE
    stream = bytearray(template * count)
    pack = PAYLOAD.pack_into
    pid_pack = struct.Struct(">H").pack_into
    for seq in range(count):
        base = seq * size
        pack(stream, base + payload_at, pub, seq, 0)
        if qos:
            pid_pack(stream, base + payload_at - 2, seq % 65535 + 1)
    return stream, size, payload_at + 6


def connect_client(
    port: int, client_id: str, clean: bool = True, subscribe: tuple[str, int] | None = None,
    timeout_s: float = SETUP_TIMEOUT_S,
) -> socket.socket:
    """A connected (and subscribed) blocking socket; CONNECT and SUBSCRIBE go in one write."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = Connect(client_id, clean_session=clean, keepalive_s=0).encode()
    if subscribe is not None:
        out += Subscribe(1, (Subscription(subscribe[0], subscribe[1]),)).encode()
    sock.sendall(out)
    finish_handshake(sock, subscribe is not None)
    return sock


def finish_handshake(sock: socket.socket, subscribed: bool) -> None:
    decoder = Decoder(protocol_level=4)
    want_suback = subscribed
    connacked = False
    while not connacked or want_suback:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed by the broker during CONNECT/SUBSCRIBE")
        for packet in decoder.feed(data):
            if isinstance(packet, ConnAck):
                if packet.return_code:
                    raise ConnectionError(f"CONNACK return code {packet.return_code}")
                connacked = True
            elif isinstance(packet, SubAck):
                if any(code == 0x80 for code in packet.return_codes):
                    raise ConnectionError("subscription refused")
                want_suback = False
            else:
                raise ConnectionError(f"unexpected {type(packet).__name__} before the go signal")


# -- worker processes --------------------------------------------------------------


@dataclass
class Control:
    """What a worker gets from the coordinator: the result queue and the signals."""

    name: str
    queue: Any
    go: Any
    pubs_done: Any
    stop: Any
    timeout_s: float

    def ready(self, **info: Any) -> None:
        self.queue.put(("ready", self.name, info))

    def wait_go(self) -> float:
        """Block until the go signal; returns the worker's deadline (monotonic seconds)."""
        give_up = time.monotonic() + SETUP_TIMEOUT_S * 2
        while not self.go.wait(0.1):
            if self.stop.is_set():
                raise SystemExit(0)  # the coordinator gave up before starting
            if time.monotonic() > give_up:
                raise TimeoutError("no go signal")
        return time.monotonic() + self.timeout_s

    def done(self, **result: Any) -> None:
        self.queue.put(("done", self.name, result))


def _worker_main(target: Callable[..., None], control: Control, args: tuple[Any, ...]) -> None:
    try:
        prepare_child()
        target(control, *args)
    except BaseException:
        control.queue.put(("error", control.name, traceback.format_exc()))
    finally:
        control.queue.close()
        control.queue.join_thread()  # results reach the pipe before the process ends


class Coordinator:
    """Starts worker processes, collects their reports, always kills them in ``close``."""

    def __init__(self, timeout_s: float, start_method: str = "fork") -> None:
        self.ctx: Any = mp.get_context(start_method)
        self.queue = self.ctx.Queue()
        self.go = self.ctx.Event()
        self.pubs_done = self.ctx.Event()
        self.stop = self.ctx.Event()
        self.timeout_s = timeout_s
        self.procs: dict[str, Any] = {}
        self.inbox: list[tuple[str, str, Any]] = []  # reports received before they were asked for
        self.t_go_ns = 0

    def spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        control = Control(name, self.queue, self.go, self.pubs_done, self.stop, self.timeout_s)
        proc = self.ctx.Process(
            target=_worker_main, args=(target, control, args), name=f"loadgen-{name}",
            daemon=True,
        )
        proc.start()
        self.procs[name] = proc

    def collect(self, names: list[str], kind: str, deadline: float) -> dict[str, Any]:
        """Wait for a ``kind`` report from each of ``names``; a worker's error is raised."""
        pending = set(names)
        got: dict[str, Any] = {}
        for report, name, payload in list(self.inbox):
            if report == kind and name in pending:
                self.inbox.remove((report, name, payload))
                pending.discard(name)
                got[name] = payload
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} from {sorted(pending)} in time")
            try:
                report, name, payload = self.queue.get(timeout=min(left, 0.5))
            except queue_module.Empty:
                dead = [n for n in pending if not self.procs[n].is_alive()]
                if dead:
                    # a last report may still be in the pipe: read what is there first
                    try:
                        report, name, payload = self.queue.get(timeout=1.0)
                    except queue_module.Empty:
                        raise WorkerError(f"worker {dead[0]} exited without reporting") from None
                else:
                    continue
            if report == "error":
                raise WorkerError(f"worker {name} failed:\n{payload}")
            if report == kind and name in pending:
                pending.discard(name)
                got[name] = payload
            else:
                self.inbox.append((report, name, payload))
        return got

    def start(self, probe: Probe) -> None:
        probe.start()
        self.t_go_ns = time.monotonic_ns()
        self.go.set()

    def close(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + 3.0
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3.0)
        self.queue.close()
        self.queue.cancel_join_thread()


def _cpu_s() -> float:
    return time.process_time()


# -- publishers --------------------------------------------------------------------


@dataclass(eq=False)
class _PubConn:
    sock: socket.socket
    stream: bytearray
    packet_size: int
    stamp_at: int
    count: int
    qos: int
    window: int
    sent_bytes: int = 0
    stamped: int = 0
    rx_bytes: int = 0
    writing: bool = True
    finished: bool = False

    @property
    def refill(self) -> int:
        return max(1, self.window // 2)

    @property
    def acked(self) -> int:
        return self.rx_bytes >> 2  # every reply on a publisher connection is a 4-byte PUBACK

    def pump(self) -> bool:
        """Send what the window allows; True if the socket would block (wants writable)."""
        stream, size, sock = self.stream, self.packet_size, self.sock
        view = memoryview(stream)
        try:
            while True:
                limit = self.count if not self.qos else min(self.count, self.acked + self.window)
                end = self.stamped * size
                if self.sent_bytes == end:
                    if self.stamped >= limit:
                        return False  # window full or all sent
                    if self.qos and limit < self.count and limit - self.stamped < self.refill:
                        return False  # refill the window by halves: fewer, larger sends
                    upto = min(limit, self.stamped + STAMP_CHUNK)
                    now = time.monotonic_ns()
                    pack = STAMP.pack_into
                    for offset in range(self.stamped * size + self.stamp_at, upto * size, size):
                        pack(stream, offset, now)
                    self.stamped = upto
                    end = upto * size
                try:
                    self.sent_bytes += sock.send(view[self.sent_bytes:end])
                except BlockingIOError:
                    return True
        finally:
            view.release()

    @property
    def complete(self) -> bool:
        done_sending = self.sent_bytes == self.count * self.packet_size
        return done_sending and (not self.qos or self.acked >= self.count)


def publisher_worker(
    control: Control, port: int, pubs: list[int], count: int, qos: int, window: int,
    topic: str | None = None,
) -> None:
    """Publishers ``pubs`` (one connection each) send ``count`` messages each to
    ``topic`` or ``topic_for(pub)`` as fast as the broker takes them (QoS 1: at most
    ``window`` unacknowledged)."""
    conns = []
    for pub in pubs:
        sock = connect_client(port, f"bench-pub-{pub}")
        stream, size, stamp_at = publish_stream(topic or topic_for(pub), pub, count, qos)
        conns.append(_PubConn(sock, stream, size, stamp_at, count, qos, window))
    control.ready()
    deadline = control.wait_go()
    cpu0 = _cpu_s()
    sel = selectors.DefaultSelector()
    for conn in conns:
        conn.sock.setblocking(False)
        sel.register(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
    active = len(conns)
    timed_out = False
    t_end = 0
    while active:
        if time.monotonic() > deadline:
            timed_out = True
            break
        received = 0
        for key, events in sel.select(timeout=0.2):
            conn = key.data
            if events & selectors.EVENT_READ:
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    data = None
                if data == b"":
                    raise ConnectionError(f"broker closed publisher {pubs} connection")
                if data:
                    conn.rx_bytes += len(data)
                    received += len(data)
            wants_write = conn.pump()
            if conn.complete:
                sel.unregister(conn.sock)
                conn.finished = True
                active -= 1
                t_end = time.monotonic_ns()
            elif wants_write != conn.writing:
                conn.writing = wants_write
                mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if wants_write else 0)
                sel.modify(conn.sock, mask, conn)
        if received and received < BATCH_BYTES:
            time.sleep(BATCH_WAIT_S)
    cpu = _cpu_s() - cpu0
    sel.close()
    control.done(
        sent=sum(c.sent_bytes // c.packet_size for c in conns),
        acked=sum(min(c.acked, c.count) for c in conns) if qos else 0,
        timed_out=timed_out, t_end_ns=t_end, cpu_s=cpu,
    )
    # Stay connected until the subscribers are done: a broker may drop what it has read
    # but not yet routed when the publisher goes away (amqtt does).
    control.stop.wait(control.timeout_s + GRACE_S)
    for conn in conns:
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(1.0)
            if conn.finished:
                conn.sock.sendall(DISCONNECT)
        except OSError:
            pass
        conn.sock.close()


def paced_publisher_worker(
    control: Control, port: int, rate: float, duration_s: float, topic: str,
) -> None:
    """One QoS 0 publisher sending at a fixed rate (open loop: message i is due at
    go + i / rate; its payload carries the actual send time)."""
    sock = connect_client(port, "bench-pace")
    count = max(1, int(rate * duration_s))
    stream, size, stamp_at = publish_stream(topic, 0, count, 0)
    control.ready()
    deadline = control.wait_go()
    cpu0 = _cpu_s()
    t0 = time.monotonic()
    period = 1.0 / rate
    view = memoryview(stream)
    sent = 0
    timed_out = False
    for seq in range(count):
        due = t0 + seq * period
        now = time.monotonic()
        if now > deadline:
            timed_out = True
            break
        if due > now:
            time.sleep(due - now)
        base = seq * size
        STAMP.pack_into(stream, base + stamp_at, time.monotonic_ns())
        sock.sendall(view[base:base + size])
        sent += 1
    cpu = _cpu_s() - cpu0
    view.release()
    control.done(sent=sent, acked=0, timed_out=timed_out, t_end_ns=time.monotonic_ns(),
                 cpu_s=cpu)
    control.stop.wait(control.timeout_s + GRACE_S)  # as publisher_worker
    try:
        sock.sendall(DISCONNECT)
    except OSError:
        pass
    sock.close()


# -- subscribers -------------------------------------------------------------------


@dataclass(eq=False)
class _SubConn:
    sock: socket.socket
    base: int  # index of this connection's first counter
    rest: bytes = b""
    open: bool = True


@dataclass
class _Tally:
    pubs: int
    per_pub: int
    conns: int
    counts: bytearray = field(init=False)
    latencies: array.array = field(default_factory=lambda: array.array("q"))
    unique: int = 0
    bad: int = 0

    def __post_init__(self) -> None:
        self.counts = bytearray(self.pubs * self.per_pub * self.conns)

    @property
    def expected(self) -> int:
        return len(self.counts)

    def feed(self, conn: _SubConn, data: bytes, now: int, acks: list[bytes]) -> None:
        """Count the PUBLISH packets in ``conn.rest + data``; QoS 1 packet ids go to
        ``acks``; an incomplete packet at the end is kept for the next call."""
        if conn.rest:
            data = conn.rest + data
        n = len(data)
        pos = 0
        counts = self.counts
        lat_append = self.latencies.append
        unpack = PAYLOAD.unpack_from
        per_pub, pubs, base = self.per_pub, self.pubs, conn.base
        unique = 0
        while n - pos >= 2:
            length = data[pos + 1]
            i = pos + 2
            if length & 0x80:  # Remaining Length of 2-4 bytes
                length &= 0x7F
                shift = 7
                complete = False
                while i < n:
                    byte = data[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        complete = True
                        break
                if not complete:
                    break
            end = i + length
            if end > n:
                break
            first = data[pos]
            if first & 0xF0 == 0x30:
                j = i + 2 + ((data[i] << 8) | data[i + 1])
                if first & 0x06:
                    acks.append(data[j:j + 2])
                    j += 2
                pub, seq, sent = unpack(data, j)
                lat_append(now - sent)
                if pub < pubs and seq < per_pub:
                    k = base + pub * per_pub + seq
                    c = counts[k]
                    if not c:
                        unique += 1
                    if c < 255:
                        counts[k] = c + 1
                else:
                    self.bad += 1
            pos = end
        self.unique += unique
        conn.rest = data[pos:] if pos < n else b""

    def duplicates(self) -> int:
        # each counter is min(arrivals, 255); arrivals above one are duplicates
        return sum(c - 1 for c in self.counts if c > 1)


def _send_all(sock: socket.socket, data: bytes) -> None:
    """sendall for a non-blocking socket (acks are small; waiting briefly is fine)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            poller.poll(100)


@dataclass
class Received:
    """How a :func:`receive` loop ended."""

    t_last_ns: int = 0  # when the last data came (0: none came)
    timed_out: bool = False  # the deadline passed first
    closed: int = 0  # connections the broker closed


def receive(
    control: Control, sel: selectors.BaseSelector, deadline: float,
    done: Callable[[], bool], on_data: Callable[[Any, bytes, int], None],
    on_closed: Callable[[Any], None] | None = None, batch_wait_s: float = BATCH_WAIT_S,
) -> Received:
    """The receiving loop of the subscriber and work-queue workers: read the non-blocking
    sockets registered in ``sel`` and hand what each read gives to ``on_data(key.data, data,
    monotonic ns)``, until ``done()``, the ``deadline``, the publishers are done and nothing
    came for ``SETTLE_S``, the coordinator says stop, or the broker closed every socket (a
    closed one is unregistered and given to ``on_closed(key.data)``). Less than
    ``BATCH_BYTES`` read in a round: sleep ``batch_wait_s`` (see ``BATCH_WAIT_S``; 0: no
    wait)."""
    ended = Received()
    last_data = time.monotonic()
    next_check = 0.0
    while not done():
        now_s = time.monotonic()
        if now_s > deadline:
            ended.timed_out = True
            break
        if now_s > next_check:
            next_check = now_s + EVENT_CHECK_S
            if control.pubs_done.is_set() and now_s - last_data > SETTLE_S:
                break
            if control.stop.is_set() or not sel.get_map():
                break
        received = 0
        for key, _ in sel.select(timeout=0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sock)
                if on_closed is not None:
                    on_closed(key.data)
                ended.closed += 1
                continue
            ended.t_last_ns = time.monotonic_ns()
            received += len(data)
            on_data(key.data, data, ended.t_last_ns)
        if received:
            last_data = ended.t_last_ns / 1e9
            if batch_wait_s and received < BATCH_BYTES:
                time.sleep(batch_wait_s)
    return ended


def subscriber_worker(
    control: Control, port: int, first: int, n: int, topic_filter: str, qos: int, clean: bool,
    pubs: int, per_pub: int, batch_wait_s: float = BATCH_WAIT_S,
) -> None:
    """Subscribers ``first..first+n-1`` on ``topic_filter``, each expecting ``pubs x
    per_pub`` messages; counts, acks (QoS 1), and reports when all arrived, the deadline
    passed, or the publishers are done and nothing came for ``SETTLE_S``."""
    socks: list[socket.socket] = []
    for index in range(first, first + n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=SETUP_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(
            Connect(f"bench-sub-{index}", clean_session=clean, keepalive_s=0).encode()
            + Subscribe(1, (Subscription(topic_filter, qos),)).encode()
        )
        socks.append(sock)
    for sock in socks:  # pipelined: all CONNECTs were sent before the first reply is read
        finish_handshake(sock, True)
    tally = _Tally(pubs, per_pub, n)
    conns = [_SubConn(sock, i * pubs * per_pub) for i, sock in enumerate(socks)]
    sel = selectors.DefaultSelector()
    for conn in conns:
        conn.sock.setblocking(False)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    control.ready()
    deadline = control.wait_go()
    cpu0 = _cpu_s()
    expected = tally.expected
    acks: list[bytes] = []

    def on_data(conn: _SubConn, data: bytes, now_ns: int) -> None:
        tally.feed(conn, data, now_ns, acks)
        if acks:
            _send_all(conn.sock, PUBACK_HEAD + PUBACK_HEAD.join(acks))
            acks.clear()

    def on_closed(conn: _SubConn) -> None:
        conn.open = False

    ended = receive(control, sel, deadline, lambda: tally.unique >= expected, on_data,
                    on_closed, batch_wait_s)
    t_last, timed_out, closed = ended.t_last_ns, ended.timed_out, ended.closed
    cpu = _cpu_s() - cpu0
    sel.close()
    for conn in conns:
        if conn.open:
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                conn.sock.sendall(DISCONNECT)
            except OSError:
                pass
        conn.sock.close()
    counts = tally.counts
    control.done(
        expected=expected, unique=tally.unique, lost=counts.count(0),
        duplicated=tally.duplicates(), bad=tally.bad, closed_by_broker=closed,
        timed_out=timed_out, t_last_ns=t_last, cpu_s=cpu,
        latencies=tally.latencies.tobytes(),
    )


# -- idle connections --------------------------------------------------------------


def _count_error(errors: dict[str, int], err: int) -> None:
    name = errno.errorcode.get(err, str(err))
    errors[name] = errors.get(name, 0) + 1


def connection_worker(
    control: Control, port: int, first: int, n: int, max_pending: int,
) -> None:
    """Open ``n`` connections (keepalive 0: idle forever) as fast as the broker accepts
    them, at most ``max_pending`` handshakes in flight; report when every CONNACK is in;
    hold the connections until the stop signal."""
    control.ready()
    deadline = control.wait_go()
    cpu0 = _cpu_s()
    sel = selectors.DefaultSelector()
    held: list[socket.socket] = []
    next_index = first
    pending = 0
    connected = failed = 0
    t_last = 0
    timed_out = False
    errors: dict[str, int] = {}
    try:
        while connected + failed < n:
            while pending < max_pending and next_index < first + n:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex(("127.0.0.1", port))
                if err not in (0, errno.EINPROGRESS):
                    failed += 1
                    _count_error(errors, err)
                    sock.close()
                else:
                    sel.register(sock, selectors.EVENT_WRITE, next_index)
                    pending += 1
                next_index += 1
            if time.monotonic() > deadline:
                timed_out = True
                break
            for key, events in sel.select(timeout=0.2):
                sock = key.fileobj  # type: ignore[assignment]
                if events & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        _count_error(errors, err)
                        failed += 1
                        pending -= 1
                        sel.unregister(sock)
                        sock.close()
                        continue
                    try:
                        sock.send(Connect(f"bench-idle-{key.data}", keepalive_s=0).encode())
                    except OSError as exc:
                        _count_error(errors, exc.errno or 0)
                        failed += 1
                        pending -= 1
                        sel.unregister(sock)
                        sock.close()
                        continue
                    sel.modify(sock, selectors.EVENT_READ, key.data)
                    continue
                try:
                    data = sock.recv(16)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    data = b""
                sel.unregister(sock)
                pending -= 1
                if len(data) >= 4 and data[0] == 0x20 and data[3] == 0:
                    connected += 1
                    t_last = time.monotonic_ns()
                    held.append(sock)
                else:
                    errors["refused"] = errors.get("refused", 0) + 1
                    failed += 1
                    sock.close()
        cpu = _cpu_s() - cpu0
        control.done(connected=connected, failed=failed, timed_out=timed_out,
                     t_last_ns=t_last, cpu_s=cpu, errors=errors)
        control.stop.wait(SETUP_TIMEOUT_S + control.timeout_s)
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
        for sock in held:
            sock.close()


# -- constrained devices -----------------------------------------------------------


def device_id(n: int) -> str:
    """Client id of constrained device ``n`` (matched by ``devices/constrained-*``)."""
    return f"devices/constrained-{n}"


def command_topic(n: int) -> str:
    return f"cmd/{n}"


def command_publisher_worker(
    control: Control, port: int, devices: list[int], commands: int, window: int,
) -> None:
    """One QoS 1 publisher sending ``commands`` commands to each of ``devices``
    (``cmd/N``), round robin (command 0 to every device, then command 1, ...), at most
    ``window`` unacknowledged by the broker. Each payload is ``PAYLOAD`` (device, seq,
    send time), so a device can check the order and the latency."""
    sock = connect_client(port, "bench-cmd")
    order = [(n, seq) for seq in range(commands) for n in devices]
    topics = {n: command_topic(n) for n in devices}
    total = len(order)
    window = max(1, window)
    control.ready()
    deadline = control.wait_go()
    cpu0 = _cpu_s()
    sent = rx_bytes = 0
    t_first = t_end = 0
    timed_out = False
    while rx_bytes >> 2 < total:  # only 4-byte PUBACKs come on this connection
        if time.monotonic() > deadline:
            timed_out = True
            break
        room = min(total - sent, window - (sent - (rx_bytes >> 2)))
        if room > 0:
            now = time.monotonic_ns()
            t_first = t_first or now
            chunk = []
            for k in range(sent, sent + room):
                n, seq = order[k]
                chunk.append(Publish(topics[n], PAYLOAD.pack(n, seq, now), 1,
                                     packet_id=k % 65535 + 1).encode())
            sock.sendall(b"".join(chunk))
            sent += room
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("broker closed the command publisher's connection")
            rx_bytes += len(data)
    t_end = time.monotonic_ns()
    cpu = _cpu_s() - cpu0
    control.done(sent=sent, acked=min(rx_bytes >> 2, total), timed_out=timed_out,
                 t_first_ns=t_first, t_end_ns=t_end, cpu_s=cpu)
    control.stop.wait(control.timeout_s + GRACE_S)  # as publisher_worker
    try:
        sock.sendall(DISCONNECT)
    except OSError:
        pass
    sock.close()


def constrained_devices_worker(
    control: Control, port: int, devices: list[int], commands: int, ack_delay_s: float,
    rcvbuf: int,
) -> None:
    """``devices.constrained.ConstrainedDevice`` clients (one per number in ``devices``,
    subscribed at QoS 1 to ``cmd/N``) in one trio run, each until it has received and
    acknowledged ``commands`` messages; reports what each saw and when it was done."""
    import trio  # only this worker needs trio (and the device class)

    trio.run(_run_devices, control, port, devices, commands, ack_delay_s, rcvbuf)


async def _run_devices(
    control: Control, port: int, numbers: list[int], commands: int, ack_delay_s: float,
    rcvbuf: int,
) -> None:
    import types

    import trio

    from devices.constrained import ConstrainedDevice

    arrivals: dict[str, list[int]] = {device_id(n): [] for n in numbers}
    last_rx = [time.monotonic()]

    def on_message(device: ConstrainedDevice) -> None:
        arrivals[device.client_id].append(time.monotonic_ns())
        last_rx[0] = time.monotonic()

    devices = [
        ConstrainedDevice("127.0.0.1", port, device_id(n), command_topic(n),
                          ack_delay_s=ack_delay_s, rcvbuf=rcvbuf, count=commands,
                          on_message=on_message)
        for n in numbers
    ]
    done_ns: dict[int, int] = {}
    errors: dict[int, str] = {}

    async def run_device(k: int, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        subscribed = False

        def started(value: object = None) -> None:
            nonlocal subscribed
            subscribed = True
            task_status.started(value)

        try:
            await devices[k].run(task_status=types.SimpleNamespace(started=started))
            done_ns[k] = time.monotonic_ns()
        except OSError as exc:  # after the subscription: a result; before it: the worker fails
            if not subscribed:
                raise
            errors[k] = f"{type(exc).__name__}: {exc}"

    timed_out = False
    async with trio.open_nursery() as nursery:
        for k in range(len(devices)):
            await nursery.start(run_device, k)
        control.ready(rcvbuf=devices[0].rcvbuf_actual if devices else 0)
        deadline = await trio.to_thread.run_sync(control.wait_go)
        cpu0 = _cpu_s()
        last_rx[0] = time.monotonic()
        while len(done_ns) + len(errors) < len(devices):
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                break
            if control.stop.is_set():
                break
            if control.pubs_done.is_set() and now - last_rx[0] > SETTLE_S:
                break  # the commands were all sent and nothing came since: some are lost
            await trio.sleep(EVENT_CHECK_S / 5)
        nursery.cancel_scope.cancel()
    cpu = _cpu_s() - cpu0
    latencies = array.array("q")
    reports = []
    for k, (n, device) in enumerate(zip(numbers, devices, strict=True)):
        seqs = []
        bad = 0
        for payload, t_rx in zip(device.payloads, arrivals[device.client_id], strict=True):
            if len(payload) < PAYLOAD.size:
                bad += 1
                continue
            pub, seq, sent = PAYLOAD.unpack_from(payload)
            if pub != n or seq >= commands:
                bad += 1
                continue
            seqs.append(seq)
            latencies.append(t_rx - sent)
        first_seen = list(dict.fromkeys(seqs))  # first arrival of each command, in order
        reports.append({
            "client_id": device.client_id, "received": len(device.payloads),
            "unique": len(first_seen), "in_order": first_seen == sorted(first_seen),
            "duplicates": device.duplicates, "max_unacked": device.max_unacked,
            "violations": device.violations, "acked": device.acked, "unexpected": bad,
            "done_ns": done_ns.get(k, 0), "error": errors.get(k),
            "rcvbuf": device.rcvbuf_actual,
        })
    control.done(devices=reports, timed_out=timed_out, cpu_s=cpu,
                 latencies=latencies.tobytes())


# -- scenarios (run in the calling process) ----------------------------------------


def _split(total: int, parts: int) -> Iterator[tuple[int, int]]:
    """``parts`` contiguous ranges (first, n) covering 0..total-1, as even as possible."""
    parts = max(1, min(parts, total))
    first = 0
    for k in range(parts):
        n = total // parts + (1 if k < total % parts else 0)
        yield first, n
        first += n


def _merge_subscribers(
    reports: dict[str, Any], pubs_reports: dict[str, Any], t_go_ns: int,
) -> dict[str, Any]:
    latencies = array.array("q")
    for r in reports.values():
        latencies.frombytes(r["latencies"])
    delivered = sum(r["unique"] for r in reports.values())
    # over when the last message is delivered and (QoS 1) the last PUBACK is in
    t_last = max(r["t_last_ns"] for r in reports.values())
    if t_last:
        t_last = max(t_last, *(r["t_end_ns"] for r in pubs_reports.values()))
    elapsed = (t_last - t_go_ns) / 1e9 if t_last else 0.0
    timed_out = any(r["timed_out"] for r in [*reports.values(), *pubs_reports.values()])
    return {
        "expected": sum(r["expected"] for r in reports.values()),
        "delivered": delivered,
        "lost": sum(r["lost"] for r in reports.values()),
        "duplicated": sum(r["duplicated"] for r in reports.values()),
        "unexpected": sum(r["bad"] for r in reports.values()),
        "closed_by_broker": sum(r["closed_by_broker"] for r in reports.values()),
        "published": sum(r["sent"] for r in pubs_reports.values()),
        "timed_out": timed_out,
        "elapsed_s": elapsed,
        "msgs_per_s": delivered / elapsed if elapsed > 0 else 0.0,
        "latency_ms": percentiles(latencies),
        "generator_cpu_s": sum(r["cpu_s"] for r in [*reports.values(), *pubs_reports.values()]),
        "generator_procs": len(reports) + len(pubs_reports),
        "generator_cpu_by_worker": {
            name: round(r["cpu_s"], 3) for name, r in [*reports.items(), *pubs_reports.items()]
        },
    }


def percentiles(latencies: array.array) -> dict[str, float] | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1e6

    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1] / 1e6}


def _run_pub_sub(
    coord: Coordinator, probe: Probe, sub_names: list[str], pub_names: list[str],
) -> dict[str, Any]:
    subs, pubs = _pub_sub_reports(coord, probe, sub_names, pub_names)
    return _merge_subscribers(subs, pubs, coord.t_go_ns)


def _pub_sub_reports(
    coord: Coordinator, probe: Probe, sub_names: list[str], pub_names: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Once every worker is ready, give the go signal (with ``probe``); the publishers'
    reports, then (told the publishers are done) the subscribers': (subs, pubs)."""
    coord.collect(sub_names + pub_names, "ready", time.monotonic() + SETUP_TIMEOUT_S)
    coord.start(probe)
    end = time.monotonic() + coord.timeout_s + GRACE_S
    pubs = coord.collect(pub_names, "done", end)
    coord.pubs_done.set()
    subs = coord.collect(sub_names, "done", end)
    probe.stop()
    return subs, pubs


def fan_in(
    port: int, probe: Probe, *, publishers: int, messages: int, qos: int, window: int = 32,
    persistent: bool = False, timeout_s: float = 60.0, procs: int = 2,
    sub_port: int | None = None,
) -> dict[str, Any]:
    """``publishers`` x ``messages`` to ``bench/NNNN/t``, one subscriber on ``bench/#`` at
    ``qos`` (``persistent``: clean session 0; ``sub_port``: on that port, another node of a
    cluster, instead of ``port``). Publisher connections are spread over ``procs``
    processes; the subscriber has its own."""
    coord = Coordinator(timeout_s)
    try:
        coord.spawn("sub", subscriber_worker, sub_port or port, 0, 1, "bench/#", qos,
                    not persistent, publishers, messages)
        pub_names = []
        for k, (first, n) in enumerate(_split(publishers, procs)):
            pub_names.append(f"pub{k}")
            coord.spawn(pub_names[-1], publisher_worker, port, list(range(first, first + n)),
                        messages, qos, window)
        return _run_pub_sub(coord, probe, ["sub"], pub_names)
    finally:
        coord.close()


def fan_out(
    port: int, probe: Probe, *, subscribers: int, messages: int, timeout_s: float = 60.0,
    procs: int = 4,
) -> dict[str, Any]:
    """One QoS 0 publisher, ``messages`` to ``bench/fanout``, ``subscribers`` QoS 0
    subscribers over ``procs`` processes; counts deliveries."""
    coord = Coordinator(timeout_s)
    try:
        sub_names = []
        for k, (first, n) in enumerate(_split(subscribers, procs)):
            sub_names.append(f"sub{k}")
            coord.spawn(sub_names[-1], subscriber_worker, port, first, n, "bench/fanout", 0,
                        True, 1, messages)
        coord.spawn("pub", publisher_worker, port, [0], messages, 0, 0, "bench/fanout")
        return _run_pub_sub(coord, probe, sub_names, ["pub"])
    finally:
        coord.close()


def latency(
    port: int, probe: Probe, *, rate: float, duration_s: float, timeout_s: float = 60.0,
    sub_port: int | None = None,
) -> dict[str, Any]:
    """One QoS 0 publisher at ``rate`` msg/s for ``duration_s``, one subscriber (on
    ``sub_port`` if given)."""
    count = max(1, int(rate * duration_s))
    coord = Coordinator(timeout_s)
    try:
        coord.spawn("sub", subscriber_worker, sub_port or port, 0, 1, "bench/latency", 0, True,
                    1, count, 0.0)
        coord.spawn("pub", paced_publisher_worker, port, rate, duration_s, "bench/latency")
        return _run_pub_sub(coord, probe, ["sub"], ["pub"])
    finally:
        coord.close()


def connections(
    port: int, probe: Probe, *, clients: int, timeout_s: float = 60.0, procs: int = 4,
    measure: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """``clients`` idle connections over ``procs`` processes; connect rate, and
    ``measure()`` (the broker's RSS in KiB) before the go signal and once all are in."""
    coord = Coordinator(timeout_s)
    try:
        names = []
        parts = list(_split(clients, procs))
        for k, (first, n) in enumerate(parts):
            names.append(f"conn{k}")
            coord.spawn(names[-1], connection_worker, port, first, n,
                        max(1, MAX_PENDING_CONNECTS // len(parts)))
        coord.collect(names, "ready", time.monotonic() + SETUP_TIMEOUT_S)
        rss_before = measure() if measure else 0
        coord.start(probe)
        reports = coord.collect(names, "done", time.monotonic() + timeout_s + GRACE_S)
        probe.stop()
        time.sleep(HOLD_S)
        rss_after = measure() if measure else 0
        connected = sum(r["connected"] for r in reports.values())
        t_last = max(r["t_last_ns"] for r in reports.values())
        elapsed = (t_last - coord.t_go_ns) / 1e9 if t_last else 0.0
        errors: dict[str, int] = {}
        for r in reports.values():
            for key, value in r["errors"].items():
                errors[key] = errors.get(key, 0) + value
        return {
            "expected": clients,
            "connected": connected,
            "failed": sum(r["failed"] for r in reports.values()),
            "errors": errors,
            "timed_out": any(r["timed_out"] for r in reports.values()),
            "elapsed_s": elapsed,
            "connects_per_s": connected / elapsed if elapsed > 0 else 0.0,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_per_conn_kib": (rss_after - rss_before) / connected if connected else None,
            "generator_cpu_s": sum(r["cpu_s"] for r in reports.values()),
            "generator_procs": len(reports),
        }
    finally:
        coord.close()


def constrained(
    port: int, probe: Probe, *, devices: int, commands: int, ack_delay_s: float,
    rcvbuf: int, telemetry_publishers: int, telemetry_messages: int, window: int = 32,
    timeout_s: float = 60.0, procs: int = 2,
) -> dict[str, Any]:
    """Constrained devices under load: ``devices`` ``ConstrainedDevice`` clients
    (``devices/constrained-N``, N = 1..devices, QoS 1 on ``cmd/N``, acks after
    ``ack_delay_s``, SO_RCVBUF ``rcvbuf``; one worker process) each get ``commands`` QoS 1
    commands from one publisher (``window`` unacknowledged), while ``telemetry_publishers``
    x ``telemetry_messages`` QoS 0 messages fan in to one subscriber on ``bench/#`` (the
    publishers over ``procs`` processes). All start at the same go signal."""
    numbers = list(range(1, devices + 1))
    coord = Coordinator(timeout_s)
    try:
        coord.spawn("devices", constrained_devices_worker, port, numbers, commands,
                    ack_delay_s, rcvbuf)
        coord.spawn("sub", subscriber_worker, port, 0, 1, "bench/#", 0, True,
                    telemetry_publishers, telemetry_messages)
        pub_names = []
        for k, (first, n) in enumerate(_split(telemetry_publishers, procs)):
            pub_names.append(f"pub{k}")
            coord.spawn(pub_names[-1], publisher_worker, port, list(range(first, first + n)),
                        telemetry_messages, 0, window)
        coord.spawn("cmd", command_publisher_worker, port, numbers, commands, window)
        names = ["devices", "sub", "cmd", *pub_names]
        coord.collect(names, "ready", time.monotonic() + SETUP_TIMEOUT_S)
        coord.start(probe)
        end = time.monotonic() + coord.timeout_s + GRACE_S
        pubs = coord.collect([*pub_names, "cmd"], "done", end)
        coord.pubs_done.set()
        subs = coord.collect(["sub", "devices"], "done", end)
        probe.stop()
    finally:
        coord.close()
    telemetry = _merge_subscribers({"sub": subs["sub"]}, {n: pubs[n] for n in pub_names},
                                   coord.t_go_ns)
    cmd, dev = pubs["cmd"], subs["devices"]
    per_device = dev["devices"]
    expected = devices * commands
    delivered = sum(d["unique"] for d in per_device)
    finished = [d["done_ns"] for d in per_device if d["done_ns"]]
    # first command sent to last command acknowledged by its device (all of them, or None)
    delivery_s = (
        (max(finished) - cmd["t_first_ns"]) / 1e9
        if len(finished) == devices and cmd["t_first_ns"] else None
    )
    for d in per_device:  # when each device was done, in seconds after the go signal
        done = d.pop("done_ns")
        d["done_s"] = (done - coord.t_go_ns) / 1e9 if done else None
    latencies = array.array("q")
    latencies.frombytes(dev["latencies"])
    workers = {**{n: pubs[n] for n in pub_names}, "cmd": cmd, "sub": subs["sub"],
               "devices": dev}
    return {
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "duplicated": sum(d["duplicates"] for d in per_device),
        "unexpected": sum(d["unexpected"] for d in per_device),
        "in_order": all(d["in_order"] for d in per_device),
        "max_unacked": max((d["max_unacked"] for d in per_device), default=0),
        "violations": sum(d["violations"] for d in per_device),
        "failed": sum(1 for d in per_device if d["error"]),
        "errors": [f"{d['client_id']}: {d['error']}" for d in per_device if d["error"]],
        "commands_published": cmd["sent"],
        "commands_acked_by_broker": cmd["acked"],
        # go signal to the broker's PUBACK for the last command (the publisher's side)
        "commands_routed_s": (cmd["t_end_ns"] - coord.t_go_ns) / 1e9,
        "command_delivery_s": delivery_s,
        "command_latency_ms": percentiles(latencies),
        "device_rcvbuf_bytes": max((d["rcvbuf"] for d in per_device), default=0),
        "devices": per_device,
        "telemetry": telemetry,
        "telemetry_msgs_per_s": telemetry["msgs_per_s"],
        "timed_out": bool(telemetry["timed_out"] or cmd["timed_out"] or dev["timed_out"]),
        # the measured window: until the telemetry and the commands are both over
        "elapsed_s": max(telemetry["elapsed_s"],
                         (max(finished) - coord.t_go_ns) / 1e9 if finished else 0.0),
        "generator_cpu_s": sum(r["cpu_s"] for r in workers.values()),
        "generator_procs": len(workers),
        "generator_cpu_by_worker": {n: round(r["cpu_s"], 3) for n, r in workers.items()},
    }
