"""Work-queue load for the broker benchmark (``tools/bench.py``, scenarios ``shared_qos1`` and
``workqueue``): publishers as in ``tools/loadgen.py`` (QoS 1, pipelined, window-bounded) to
``bench/NNNN/t``, and ``workers`` MQTT 5.0 clients of one consumer group
(``$share/bench/bench/#``, QoS 1) in one worker process, that reject (PUBACK reason code
0x80) every ``reject_every``-th job the first time any of them sees it (0: none) and
acknowledge everything else. A job counts as delivered once acknowledged.

Python, not the C generator (``tools/cloadgen.c`` speaks 3.1.1 only and cannot reject): the
numbers to compare are the two scenarios' jobs/s and broker CPU per job, both measured with
this same generator.
"""

from __future__ import annotations

import array
import selectors
import socket
import time
from typing import Any

from mqttd.codec import PROTOCOL_5, ConnAck, Connect, Decoder, SubAck, Subscribe, Subscription
from tools.loadgen import (
    DISCONNECT,
    PAYLOAD,
    SETUP_TIMEOUT_S,
    Control,
    Coordinator,
    Probe,
    _cpu_s,
    _merge_subscribers,
    _pub_sub_reports,
    _send_all,
    _split,
    publisher_worker,
    receive,
)

GROUP_FILTER = "$share/bench/bench/#"
REJECT = 0x80


def _connect5(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SETUP_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        Connect(client_id, True, 0, PROTOCOL_5, properties={"receive_maximum": 65535}).encode()
        + Subscribe(1, (Subscription(GROUP_FILTER, 1),)).encode(PROTOCOL_5)
    )
    decoder = Decoder(protocol_level=PROTOCOL_5)
    connacked = subscribed = False
    while not (connacked and subscribed):
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed by the broker during CONNECT/SUBSCRIBE")
        for packet in decoder.feed(data):
            if isinstance(packet, ConnAck):
                if packet.return_code:
                    raise ConnectionError(f"CONNACK reason code {packet.return_code:#x}")
                connacked = True
            elif isinstance(packet, SubAck):
                if packet.return_codes[0] >= 0x80:
                    raise ConnectionError("subscription refused")
                subscribed = True
    return sock


class _Jobs:
    """What the workers did, per (publisher, seq): acknowledged (counted), rejected once."""

    def __init__(self, pubs: int, per_pub: int, reject_every: int) -> None:
        self.per_pub = per_pub
        self.pubs = pubs
        self.reject_every = reject_every
        self.acked = bytearray(pubs * per_pub)
        self.rejected = bytearray(pubs * per_pub)
        self.unique = 0
        self.rejections = 0
        self.bad = 0
        self.latencies = array.array("q")  # publish to first acknowledgement, ns

    def feed(self, rest: bytes, data: bytes, out: bytearray) -> bytes:
        """Handle the 5.0 PUBLISH packets in ``rest + data`` (acks appended to ``out``);
        returns the incomplete tail."""
        if rest:
            data = rest + data
        n, pos = len(data), 0
        unpack = PAYLOAD.unpack_from
        while n - pos >= 2:
            length, i, shift = 0, pos + 1, 0
            while i < n:
                byte = data[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            else:
                break
            end = i + length
            if end > n:
                break
            if data[pos] & 0xF0 == 0x30:
                j = i + 2 + ((data[i] << 8) | data[i + 1])
                packet_id = data[j:j + 2]
                props = data[j + 2]  # property length (these messages carry none: < 128)
                pub, seq, sent = unpack(data, j + 3 + props)
                out += self._settle(pub, seq, packet_id, sent)
            pos = end
        return data[pos:]

    def _settle(self, pub: int, seq: int, packet_id: bytes, sent_ns: int) -> bytes:
        if pub >= self.pubs or seq >= self.per_pub:
            self.bad += 1
            return b"\x40\x02" + packet_id
        k = pub * self.per_pub + seq
        if self.reject_every and seq % self.reject_every == 0 and not self.rejected[k]:
            self.rejected[k] = 1
            self.rejections += 1
            return b"\x40\x03" + packet_id + bytes((REJECT,))
        if not self.acked[k]:
            self.unique += 1
            self.latencies.append(time.monotonic_ns() - sent_ns)
        if self.acked[k] < 255:
            self.acked[k] += 1
        return b"\x40\x02" + packet_id


def workers_worker(
    control: Control, port: int, workers: int, pubs: int, per_pub: int, reject_every: int,
) -> None:
    """The group's ``workers`` connections; reports when every job was acknowledged, the
    deadline passed, or the publishers are done and nothing came for ``SETTLE_S``."""
    socks = [_connect5(port, f"bench-worker-{n}") for n in range(workers)]
    jobs = _Jobs(pubs, per_pub, reject_every)
    rests: dict[socket.socket, bytes] = dict.fromkeys(socks, b"")
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, sock)
    control.ready()
    deadline = control.wait_go()
    cpu0 = _cpu_s()
    expected = pubs * per_pub

    def on_data(sock: socket.socket, data: bytes, now_ns: int) -> None:
        out = bytearray()
        rests[sock] = jobs.feed(rests[sock], data, out)
        if out:
            _send_all(sock, bytes(out))

    ended = receive(control, sel, deadline, lambda: jobs.unique >= expected, on_data)
    cpu = _cpu_s() - cpu0
    sel.close()
    _disconnect(socks)
    control.done(
        expected=expected, unique=jobs.unique, lost=jobs.acked.count(0),
        duplicated=sum(c - 1 for c in jobs.acked if c > 1), bad=jobs.bad,
        closed_by_broker=ended.closed, timed_out=ended.timed_out, t_last_ns=ended.t_last_ns,
        cpu_s=cpu,
        latencies=jobs.latencies.tobytes(), rejected=jobs.rejections,
    )


def _disconnect(socks: list[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.setblocking(True)
            sock.settimeout(1.0)
            sock.sendall(DISCONNECT)
        except OSError:
            pass
        sock.close()


def work_queue(
    port: int, probe: Probe, *, publishers: int, messages: int, workers: int = 4,
    reject_every: int = 10, window: int = 32, timeout_s: float = 60.0, procs: int = 2,
) -> dict[str, Any]:
    """``publishers`` x ``messages`` QoS 1 jobs to a group of ``workers``; every
    ``reject_every``-th job (0: none) rejected once. Jobs/s are ``msgs_per_s``."""
    coord = Coordinator(timeout_s)
    try:
        coord.spawn("workers", workers_worker, port, workers, publishers, messages,
                    reject_every)
        pub_names = []
        for k, (first, n) in enumerate(_split(publishers, procs)):
            pub_names.append(f"pub{k}")
            coord.spawn(pub_names[-1], publisher_worker, port, list(range(first, first + n)),
                        messages, 1, window)
        subs, pubs = _pub_sub_reports(coord, probe, ["workers"], pub_names)
        result = _merge_subscribers(subs, pubs, coord.t_go_ns)
        result["rejected"] = subs["workers"]["rejected"]
        return result
    finally:
        coord.close()
