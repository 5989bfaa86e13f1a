"""What one wake-up costs a Python process at a low message rate, by event loop: the floor
under mqttd's latency and CPU per message at 1,000 msg/s (issue 18).

    python tools/wake_floor.py [--messages 3000] [--interval-ms 1]

A child process sends 64 B to the parent over a socket pair every ``--interval-ms`` and
waits for a 64 B answer (as a publisher and a subscriber would, through a broker); the
parent answers each message, four ways: a blocking ``recv``; ``epoll`` then ``recv``;
trio's ``wait_readable`` then ``recv``; trio's ``wait_readable`` on an epoll descriptor of
its own, then ``epoll.poll`` and ``recv`` (what mqttd's reactor does). Reported: the
parent's CPU time per message (``/proc/thread-self/schedstat``: time on the CPU, not tick
sampling) and the round trip's median and 99th percentile, as the child sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import time

import trio

MODES = ("blocking", "epoll", "trio", "trio+epoll")


def cpu_ns() -> int:
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[0])


def child(sock: socket.socket, count: int, interval_s: float, results: socket.socket) -> None:
    rtts = []
    for _ in range(count):
        start = time.perf_counter_ns()
        sock.send(b"x" * 64)
        sock.recv(100)
        rtts.append(time.perf_counter_ns() - start)
        time.sleep(interval_s)
    rtts.sort()
    results.send(json.dumps({
        "p50_us": statistics.median(rtts) / 1000, "p99_us": rtts[int(len(rtts) * 0.99)] / 1000,
    }).encode())


def serve(mode: str, sock: socket.socket, count: int) -> int:
    """Answer ``count`` messages the ``mode`` way; the CPU ns it took."""
    if mode == "blocking":
        sock.setblocking(True)
        start = cpu_ns()
        for _ in range(count):
            sock.recv(100)
            sock.send(b"y" * 64)
        return cpu_ns() - start
    sock.setblocking(False)
    if mode == "epoll":
        poller = select.epoll()
        poller.register(sock.fileno(), select.EPOLLIN)
        start = cpu_ns()
        for _ in range(count):
            poller.poll()
            sock.recv(100)
            sock.send(b"y" * 64)
        return cpu_ns() - start

    async def main() -> int:
        start = cpu_ns()
        if mode == "trio":
            for _ in range(count):
                await trio.lowlevel.wait_readable(sock)
                sock.recv(100)
                sock.send(b"y" * 64)
        else:
            poller = select.epoll()
            poller.register(sock.fileno(), select.EPOLLIN)
            for _ in range(count):
                await trio.lowlevel.wait_readable(poller)
                poller.poll(0, 256)
                sock.recv(100)
                sock.send(b"y" * 64)
        return cpu_ns() - start

    return trio.run(main)


def measure(mode: str, count: int, interval_s: float) -> dict[str, float | str]:
    parent, peer = socket.socketpair()
    results_in, results_out = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: sends and times
        parent.close()
        results_in.close()
        try:
            child(peer, count, interval_s, results_out)
        finally:
            os._exit(0)
    peer.close()
    results_out.close()
    try:
        used_ns = serve(mode, parent, count)
        report = json.loads(results_in.recv(4096))
    finally:
        os.waitpid(pid, 0)
        parent.close()
        results_in.close()
    return {"mode": mode, "cpu_us_per_message": round(used_ns / count / 1000, 1), **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    args = parser.parse_args()
    for mode in MODES:
        print(json.dumps(measure(mode, args.messages, args.interval_ms / 1000)))


if __name__ == "__main__":
    main()
