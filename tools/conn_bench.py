"""Idle connections against one mqttd: connect rate, broker CPU per connection and RSS per
idle connection, for comparing two trees (issue 18's connection goals)::

    python tools/conn_bench.py --tree TREE --clients 10000 [--repeats 3]

Starts ``python -m mqttd`` from ``--tree`` (default: this checkout; default configuration with
logging at warning, a free port on 127.0.0.1) with its soft RLIMIT_NOFILE raised to the
hard limit, then opens ``--clients`` idle MQTT 3.1.1 connections (keepalive 0) from
``--procs`` worker processes (``--generator python``) or threads of the C generator's
connect mode (``--generator c``, the default when a C compiler exists: ``tools/cloadgen.c``,
which the Python workers could not keep up with), each with ``--pending`` CONNECTs in
flight, spreading the source addresses over 127.0.0.1-127.0.0.N so that no address runs
out of ports. Reports, per
repeat (a fresh broker each): connects/s (go to the last CONNACK), the broker's CPU seconds
in that window and per connection, and its VmRSS before and after (KiB per connection).
Held connections need two fds each on one machine (the broker's and the client's): the
broker's hard RLIMIT_NOFILE bounds what can be held (printed).

Probes, by environment: BROKER_CALLGRIND=1 (instructions per connection, below);
BROKER_PREFIX="script.py" runs the broker as ``python script.py -m mqttd ...`` (e.g. a
tracemalloc or cProfile wrapper) and BROKER_SIGNALS=S sends it SIGUSR1 before the go signal
and SIGUSR2 once every CONNACK is in, then waits S seconds; PYSPY_NONBLOCKING=1 with
--profile.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

CONNECT_HEAD = bytes([0x10])
TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TREE not in sys.path:  # run as a script: tools/ is on the path, the checkout is not
    sys.path.insert(0, TREE)


def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
    return CONNECT_HEAD + bytes([len(body)]) + body


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# BROKER_CALLGRIND=1: the broker runs under callgrind, dumped before the go signal and once
# every CONNACK is in: instructions per connection (robust on a shared machine)
CALLGRIND = (
    ["valgrind", "--tool=callgrind", "--callgrind-out-file=/tmp/conn_bench.cg.%p"]
    if os.environ.get("BROKER_CALLGRIND") else []
)


def callgrind_dump(pid: int) -> int:
    """Dump the counters of callgrind in ``pid`` (zeroing them); the instructions since the
    previous dump."""
    before = set(os.listdir("/tmp"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True,
                   stdout=subprocess.DEVNULL)
    for _ in range(600):
        new = [n for n in set(os.listdir("/tmp")) - before if n.startswith("conn_bench.cg.")]
        if new:
            break
        time.sleep(0.1)
    time.sleep(1)
    path = os.path.join("/tmp", new[0])
    with open(path) as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
    os.unlink(path)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stat(pid: int) -> tuple[tuple[float, float], int]:
    """((utime, stime) seconds, VmRSS KiB)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) / tck, int(fields[12]) / tck)
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return cpu, rss


def worker(port: int, first: int, n: int, pending_max: int, source: str, go: Any,
           stop: Any, out: Any) -> None:
    raise_nofile()
    go.wait()
    sel = selectors.DefaultSelector()
    held = []
    nxt = first
    pending = connected = failed = 0
    last = 0
    while connected + failed < n:
        while pending < pending_max and nxt < first + n:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((source, 0))
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, 115):  # EINPROGRESS
                failed += 1
                sock.close()
            else:
                sel.register(sock, selectors.EVENT_WRITE, nxt)
                pending += 1
            nxt += 1
        for key, events in sel.select(timeout=1.0):
            sock = key.fileobj  # type: ignore[assignment]
            if events & selectors.EVENT_WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                    pending -= 1
                    sel.unregister(sock)
                    sock.close()
                    continue
                sock.send(connect_packet(f"idle-{key.data}"))
                sel.modify(sock, selectors.EVENT_READ, key.data)
                continue
            try:
                data = sock.recv(16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            sel.unregister(sock)
            pending -= 1
            if len(data) >= 4 and data[0] == 0x20 and data[3] == 0:
                connected += 1
                last = time.monotonic_ns()
                held.append(sock)
            else:
                failed += 1
                sock.close()
    out.put((connected, failed, last))
    stop.wait(600)
    for sock in held:
        sock.close()


def run_once(args: argparse.Namespace) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "mqttd.yaml")
        with open(config, "w") as f:
            f.write(f"logging: {{level: warning}}\npersistence: {{db_file: {tmp}/db.sqlite}}\n")
        broker = subprocess.Popen(
            [*CALLGRIND, sys.executable, *os.environ.get("BROKER_PREFIX", "").split(), "-m",
             "mqttd", "-c", config, "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp, preexec_fn=raise_nofile, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.path.abspath(args.tree)},
        )
        try:
            until = time.monotonic() + 600
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > until or broker.poll() is not None:
                        raise SystemExit("the broker did not start") from None
                    time.sleep(0.05)
            time.sleep(0.3)
            if args.profile:
                nonblocking = ["--nonblocking"] if os.environ.get("PYSPY_NONBLOCKING") else []
                prof = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(broker.pid), "--rate", "500", "--format",
                     args.profile_format, "-o", args.profile, *nonblocking],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            if args.generator == "c":
                return _run_c(args, broker.pid, port)
            go, stop = mp.Event(), mp.Event()
            out: mp.Queue = mp.Queue()
            procs = []
            per = args.clients // args.procs
            for k in range(args.procs):
                n = per if k < args.procs - 1 else args.clients - per * (args.procs - 1)
                p = mp.Process(target=worker, args=(port, k * per, n, args.pending,
                                                    f"127.0.0.{k % args.sources + 1}", go,
                                                    stop, out), daemon=True)
                p.start()
                procs.append(p)
            time.sleep(0.5)
            _before_go(broker.pid)
            cpu0, rss0 = proc_stat(broker.pid)
            t0 = time.monotonic_ns()
            go.set()
            reports = [out.get(timeout=args.timeout) for _ in procs]
            time.sleep(0.05)
            cpu1, rss1 = proc_stat(broker.pid)
            instructions = callgrind_dump(broker.pid) if CALLGRIND else None
            if os.environ.get("BROKER_SIGNALS"):
                os.kill(broker.pid, signal.SIGUSR2)
                time.sleep(float(os.environ["BROKER_SIGNALS"]))
            if args.profile:
                prof.send_signal(2)
                prof.wait(30)
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
            connected = sum(r[0] for r in reports)
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            cpu = user + system
            elapsed = (max(r[2] for r in reports) - t0) / 1e9
            return {
                "generator": "python",
                "connected": connected,
                "failed": sum(r[1] for r in reports),
                "connects_per_s": round(connected / elapsed),
                "broker_cpu_s": round(cpu, 3),
                "broker_user_s": round(user, 3),
                "broker_sys_s": round(system, 3),
                "broker_us_per_conn": round(cpu / connected * 1e6, 1) if connected else None,
                "connects_per_broker_cpu_s": round(connected / cpu) if cpu > 0 else None,
                "rss_before_kib": rss0,
                "rss_after_kib": rss1,
                "rss_per_conn_kib": round((rss1 - rss0) / connected, 2) if connected else None,
                "load": os.getloadavg()[0],
                **({"instructions_per_conn": instructions // connected}
                   if instructions and connected else {}),
            }
        finally:
            broker.terminate()
            try:
                broker.wait(float(os.environ.get("BROKER_STOP_S", "15")))
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()


def _before_go(pid: int) -> None:
    if os.environ.get("BROKER_SIGNALS"):  # a probe's baseline (tracemalloc etc.)
        os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
    if CALLGRIND:
        callgrind_dump(pid)  # the start-up, not counted


def _run_c(args: argparse.Namespace, pid: int, port: int) -> dict:
    """The same measurement with the C generator (``cgen.connections``): ``--procs``
    threads in one process, ``--pending`` handshakes in flight each."""
    from tools import cgen, loadgen

    binary = cgen.build()["binary"]
    marks: dict[str, Any] = {}

    class Marks(loadgen.Probe):
        def start(self) -> None:
            _before_go(pid)
            marks["cpu0"] = proc_stat(pid)[0]

        def stop(self) -> None:
            marks["cpu1"] = proc_stat(pid)[0]
            marks["instructions"] = callgrind_dump(pid) if CALLGRIND else None
            if os.environ.get("BROKER_SIGNALS"):
                os.kill(pid, signal.SIGUSR2)
                time.sleep(float(os.environ["BROKER_SIGNALS"]))

    r = cgen.connections(
        binary, port, Marks(), clients=args.clients, timeout_s=args.timeout,
        measure=lambda: proc_stat(pid)[1], threads=args.procs,
        pending=args.pending * args.procs, sources=args.sources,
    )
    connected = r["connected"]
    (u0, s0), (u1, s1) = marks["cpu0"], marks["cpu1"]
    user, system = u1 - u0, s1 - s0
    cpu = user + system
    instructions = marks.get("instructions")
    return {
        "generator": "c",
        "connected": connected,
        "failed": r["failed"] + r["unanswered"],
        "connects_per_s": round(r["connects_per_s"]),
        "broker_cpu_s": round(cpu, 3),
        "broker_user_s": round(user, 3),
        "broker_sys_s": round(system, 3),
        "broker_us_per_conn": round(cpu / connected * 1e6, 1) if connected else None,
        "connects_per_broker_cpu_s": round(connected / cpu) if cpu > 0 else None,
        "generator_cpu_s": round(r["generator_cpu_s"], 3),
        "rss_before_kib": r["rss_before_kib"],
        "rss_after_kib": r["rss_after_kib"],
        "rss_per_conn_kib": round(r["rss_per_conn_kib"], 2) if connected else None,
        "load": os.getloadavg()[0],
        **({"instructions_per_conn": instructions // connected}
           if instructions and connected else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=TREE,
                        help="the checkout whose mqttd is measured (default: this one)")
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--pending", type=int, default=64, help="CONNECTs in flight per proc")
    parser.add_argument("--sources", type=int, default=4, help="127.0.0.1..N as sources")
    parser.add_argument("--generator", choices=("c", "python"), default=None,
                        help="c (tools/cloadgen.c; the default when a C compiler exists: "
                             "--procs threads) or python (--procs worker processes)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--profile", default="", help="py-spy record the broker into this file")
    parser.add_argument("--profile-format", default="raw")
    args = parser.parse_args()
    if args.generator is None:
        from tools import cgen

        args.generator = "c" if cgen.compiler() else "python"
    print(f"RLIMIT_NOFILE hard limit: {raise_nofile()}", file=sys.stderr)
    for _ in range(args.repeats):
        print(json.dumps(run_once(args)), flush=True)


if __name__ == "__main__":
    main()
