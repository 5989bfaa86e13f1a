"""Durable QoS 1 throughput: one pipelining publisher, one acking subscriber, against a
fresh ``mqttd`` subprocess per scenario; reports messages/s, broker CPU and the group
commits the broker made (from its shutdown log line).

    python -m tools.durable_bench [--messages N] [--window W]

Scenarios: ``clean`` (subscriber with clean session 1: no disk write needed before
PUBACK), ``durable-online`` (persistent subscriber connected and acking: every message
is committed before its PUBACK) and ``durable-offline`` (persistent subscriber away:
every message is queued on disk, then drained after it reconnects).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from mqttd.codec import ConnAck, Connect, Decoder, PubAck, Publish, SubAck, Subscribe, Subscription

LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
FLUSHED = re.compile(rb"store flushed: (\d+) commits, (\d+) writes")
TIMEOUT_S = 120.0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Broker:
    def __init__(self, data_dir: str) -> None:
        config = os.path.join(data_dir, "bench.yaml")
        with open(config, "w") as f:  # a queue budget that drops nothing in the benchmark
            f.write("limits:\n  max_queued_messages: 10000000\nlogging:\n  level: info\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqttd", "-c", config, "--host", "127.0.0.1", "-p", "0",
             "--data-dir", data_dir],
            stderr=subprocess.PIPE,
        )
        self.log = bytearray()
        assert self.proc.stderr is not None
        while not (match := LISTENING.search(self.log)):
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"broker exited: {self.log.decode()}")
            self.log += line
        self.port = int(match.group(1))

    def stop(self) -> tuple[int, int]:
        """SIGTERM, wait; returns (commits, writes) from the shutdown log."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        self.log += err
        match = FLUSHED.search(self.log)
        return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class Client:
    def __init__(self, port: int, client_id: str, clean: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder(protocol_level=4)
        self.pending: list = []
        self.sock.sendall(Connect(client_id, clean_session=clean, keepalive_s=0).encode())
        assert isinstance(self.next(), ConnAck)

    def next(self):
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed by the broker")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()


def subscribe(client: Client) -> None:
    client.sock.sendall(Subscribe(1, (Subscription("bench/#", 1),)).encode())
    assert isinstance(client.next(), SubAck)


def receive(client: Client, count: int, done: threading.Event) -> None:
    got = 0
    sock = client.sock
    packets, client.pending = client.pending, []  # may have come with the CONNACK
    while True:
        acks = []
        for packet in packets:
            if isinstance(packet, Publish):
                got += 1
                acks.append(PubAck(packet.packet_id).encode())
        if acks:
            sock.sendall(b"".join(acks))
        if got >= count:
            break
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("subscriber closed")
        packets = client.decoder.feed(data)
    done.set()


def publish(port: int, count: int, window: int) -> None:
    """Send ``count`` QoS 1 messages keeping up to ``window`` unacknowledged."""
    client = Client(port, "bench-pub", True)
    payload = b"x" * 64
    packets = [
        Publish(f"bench/{i % 10}", payload, 1, packet_id=i % 65535 + 1).encode()
        for i in range(count)
    ]
    sent = acked = 0
    sock = client.sock
    while acked < count:
        if sent < count and sent - acked < window:
            upto = min(count, acked + window)
            sock.sendall(b"".join(packets[sent:upto]))
            sent = upto
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("publisher closed")
        acked += sum(isinstance(p, PubAck) for p in client.decoder.feed(data))
    client.close()


def run(scenario: str, count: int, window: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        broker = Broker(data_dir)
        try:
            persistent = scenario != "clean"
            sub = Client(broker.port, "bench-sub", clean=not persistent)
            subscribe(sub)
            if scenario == "durable-offline":
                sub.close()
            cpu0, t0 = _cpu_seconds(broker.proc.pid), time.perf_counter()
            done = threading.Event()
            if scenario != "durable-offline":
                reader = threading.Thread(target=receive, args=(sub, count, done), daemon=True)
                reader.start()
            publish(broker.port, count, window)
            if scenario == "durable-offline":
                sub = Client(broker.port, "bench-sub", clean=False)
                receive(sub, count, done)
            if not done.wait(TIMEOUT_S):
                raise TimeoutError("subscriber did not get every message")
            elapsed = time.perf_counter() - t0
            cpu = _cpu_seconds(broker.proc.pid) - cpu0
            sub.close()
        finally:
            commits, writes = broker.stop()
    return {
        "msgs_per_s": count / elapsed,
        "broker_cpu_s": cpu,
        "msgs_per_cpu_s": count / cpu if cpu else 0.0,
        "commits": commits,
        "commits_per_s": commits / elapsed,
        "writes": writes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    print(f"{args.messages} QoS 1 messages of 64 B, publisher window {args.window}")
    print(f"{'scenario':<16} {'msg/s':>9} {'msg/CPU-s':>10} {'commits':>8} {'commits/s':>10}")
    results = {}
    for scenario in ("clean", "durable-online", "durable-offline"):
        r = results[scenario] = run(scenario, args.messages, args.window)
        print(
            f"{scenario:<16} {r['msgs_per_s']:>9,.0f} {r['msgs_per_cpu_s']:>10,.0f} "
            f"{r['commits']:>8.0f} {r['commits_per_s']:>10,.0f}"
        )
    ratio = results["durable-online"]["msgs_per_s"] / results["clean"]["msgs_per_s"]
    print(f"durable-online / clean throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()
