"""The C load generator (``tools/cloadgen.c``): built with the machine's C compiler into
a cache directory, run as one subprocess per scenario.

``build()`` compiles ``cloadgen.c`` once per source and compiler (the binary's name
carries a hash of both) into ``build/`` at the top of the checkout, or a temporary
directory if that is not writable. ``fan_in``, ``fan_out``, ``latency`` and ``connections``
take the same arguments and return the same result keys as their :mod:`tools.loadgen`
counterparts (``sub_port``: the subscriber connects to another port than the publishers, a
cluster's other node):
the generator connects and subscribes, prints ``{"ready": ...}``, the probe starts, the
coordinator writes ``go``, and the generator prints its results as one JSON line.
``connections`` runs one generator process per ``fd limit`` connections (each process has
its own RLIMIT_NOFILE), holds the connections while the broker's RSS is read, then writes
``close``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tools import loadgen

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cloadgen.c")
BUILD_DIR = os.path.join(os.path.dirname(os.path.dirname(SOURCE)), "build")
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-pthread")
READY_TIMEOUT_S = loadgen.SETUP_TIMEOUT_S * 2
GRACE_S = loadgen.GRACE_S


class GeneratorError(RuntimeError):
    """The C generator could not be built, failed, or did not answer in time."""


def compiler() -> str | None:
    """``$CC``, else ``cc``, else ``gcc`` on PATH (None: use the Python generator)."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def build(cc: str | None = None) -> dict[str, str]:
    """The binary's path (compiled now unless cached), the compiler and its flags."""
    cc = cc or compiler()
    if cc is None:
        raise GeneratorError("no C compiler (cc, gcc or $CC) found")
    version = _compiler_version(cc)
    with open(SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source + version.encode() + " ".join(CFLAGS).encode()).hexdigest()
    info = {"compiler": version, "cflags": " ".join(CFLAGS)}
    for directory in (BUILD_DIR, os.path.join(tempfile.gettempdir(), "mqttd-bench-build")):
        binary = os.path.join(directory, f"cloadgen-{digest[:12]}")
        if os.access(binary, os.X_OK):
            return {"binary": binary, **info}
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError:
            continue
        if not os.access(directory, os.W_OK):
            continue
        partial = f"{binary}.{os.getpid()}.tmp"
        done = subprocess.run([cc, *CFLAGS, "-o", partial, SOURCE], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise GeneratorError(f"{cc} failed to build {SOURCE}:\n{done.stderr[-2000:]}")
        os.replace(partial, binary)  # atomic: a concurrent build never sees half a file
        return {"binary": binary, **info}
    raise GeneratorError("no writable directory to build the C generator in")


def _readline(proc: subprocess.Popen[str], deadline: float, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GeneratorError(f"the C generator gave no {what} in time")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            line = proc.stdout.readline()
            if line:
                return dict(json.loads(line))
            proc.wait(5)
            err = proc.stderr.read() if proc.stderr else ""
            raise GeneratorError(f"the C generator exited ({proc.returncode}) before its "
                                 f"{what}: {err.strip()[-2000:]}")


def run(binary: str, probe: loadgen.Probe, args: list[str], timeout_s: float) -> dict[str, Any]:
    """One scenario: start, wait for ready, probe + go, read the results; the generator
    is always gone when this returns. A probe with a ``pid`` (the broker's) lets the
    generator wait for a broker still working through a backlog before it calls the
    missing messages lost."""
    pid = getattr(probe, "pid", None)
    if isinstance(pid, int) and pid > 0:
        args = [*args, "--broker-pid", str(pid)]
    proc = subprocess.Popen(
        [binary, *args, "--timeout", f"{timeout_s:g}"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=loadgen.prepare_child,
    )
    try:
        _readline(proc, time.monotonic() + READY_TIMEOUT_S, "ready line")
        assert proc.stdin is not None
        probe.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = _readline(proc, time.monotonic() + timeout_s + GRACE_S, "results")
        probe.stop()
        if result.get("error"):
            raise GeneratorError(f"the C generator failed: {result['error']}")
        result.pop("error", None)
        result["generator"] = "c"
        return result
    finally:
        if proc.poll() is None:
            try:
                proc.wait(5)  # it disconnects and exits by itself after the results
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _sub_port(sub_port: int | None) -> list[str]:
    """The subscribers' port when it is not the publishers' (a cluster's other node)."""
    return ["--sub-port", str(sub_port)] if sub_port else []


def fan_in(
    binary: str, port: int, probe: loadgen.Probe, *, publishers: int, messages: int, qos: int,
    window: int = 32, persistent: bool = False, timeout_s: float = 60.0,
    sub_port: int | None = None,
) -> dict[str, Any]:
    args = ["--mode", "fanin", "--port", str(port), *_sub_port(sub_port),
            "--publishers", str(publishers), "--messages", str(messages), "--qos", str(qos),
            "--window", str(window)]
    if persistent:
        args.append("--persistent")
    return run(binary, probe, args, timeout_s)


def fan_out(
    binary: str, port: int, probe: loadgen.Probe, *, subscribers: int, messages: int,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    return run(binary, probe, ["--mode", "fanout", "--port", str(port), "--subscribers",
                               str(subscribers), "--messages", str(messages)], timeout_s)


def latency(
    binary: str, port: int, probe: loadgen.Probe, *, rate: float, duration_s: float,
    timeout_s: float = 60.0, sub_port: int | None = None,
) -> dict[str, Any]:
    count = max(1, int(rate * duration_s))
    return run(binary, probe, ["--mode", "latency", "--port", str(port), *_sub_port(sub_port),
                               "--rate", f"{rate:g}", "--messages", str(count)], timeout_s)


# connections: handshakes in flight at once over all generator processes (below the listen
# backlog of 100 that mosquitto and amqtt use: a dropped SYN is retried a second later,
# which would measure TCP's retry timer), the addresses' share of the ephemeral ports
PENDING = loadgen.MAX_PENDING_CONNECTS
# connections per source address: connect() looks for a free ephemeral port per (source,
# destination), even ports first (14,116 of the default 28,232), and each one taken costs
# the next connect a longer walk: at 20,000 from 127.0.0.1 alone the generator spent 270 us
# of CPU per connection, 16 us with 2,500 per address
PER_SOURCE = 2_500
FD_MARGIN = 64  # fds a generator process keeps for itself (stdio, epoll)
STALL_S = 3.0  # no CONNACK for this long with handshakes in flight: the broker is full


def connections(
    binary: str, port: int, probe: loadgen.Probe, *, clients: int, timeout_s: float = 60.0,
    measure: Callable[[], int] | None = None, nofile: int | None = None,
    threads: int = 2, pending: int = PENDING, stall_s: float = STALL_S,
    per_process: int | None = None, sources: int | None = None,
) -> dict[str, Any]:
    """``clients`` idle connections (keepalive 0) from the C generator: connects/s (go to
    the last CONNACK), and ``measure()`` (the broker's RSS in KiB) before the go signal and
    after holding them ``loadgen.HOLD_S``. ``nofile``: the RLIMIT_NOFILE each generator
    process asks for (as far as allowed); it runs as many processes as the limit it gets
    needs (one when the clients fit; ``per_process`` caps it lower). A broker that stops
    answering (its own fd limit) ends the run after ``stall_s`` without a CONNACK:
    ``connected`` is what it holds. ``sources``: source addresses (default: 127.0.0.1 alone
    for up to ``PER_SOURCE`` connections, else one per ``PER_SOURCE``)."""
    limit = loadgen.raise_fd_limit(nofile)  # this process, and so what the children may get
    per_proc = clients if limit < 0 else max(1, limit - FD_MARGIN)
    per_proc = min(per_proc, per_process or per_proc)
    procs = max(1, math.ceil(clients / per_proc))
    # 127.0.0.1 alone (no bind: two system calls less per connection) for a few
    sources = sources or max(1, min(254, math.ceil(clients / PER_SOURCE)))
    parts = list(loadgen._split(clients, procs))
    started: list[subprocess.Popen[str]] = []
    try:
        for first, n in parts:
            started.append(subprocess.Popen(
                [binary, "--mode", "connect", "--port", str(port), "--clients", str(n),
                 "--first-id", str(first), "--pending", str(max(1, pending // len(parts))),
                 "--sources", str(sources), "--threads", str(threads if procs == 1 else 1),
                 "--stall", f"{stall_s:g}", "--timeout", f"{timeout_s:g}",
                 *(["--nofile", str(nofile)] if nofile else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, preexec_fn=lambda: loadgen.prepare_child(nofile),
            ))
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = [_readline(proc, deadline, "ready line") for proc in started]
        rss_before = measure() if measure else 0
        probe.start()
        t_go = time.monotonic_ns()
        for proc in started:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + timeout_s + GRACE_S
        reports = [_readline(proc, deadline, "results") for proc in started]
        probe.stop()
        time.sleep(loadgen.HOLD_S)  # held: the broker's RSS with every connection idle
        rss_after = measure() if measure else 0
        for proc in started:
            assert proc.stdin is not None
            proc.stdin.write("close\n")
            proc.stdin.flush()
    finally:
        for proc in started:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # EOF: a generator still holding closes and exits
            except OSError:
                pass
        for proc in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    connected = sum(r["connected"] for r in reports)
    t_last = max(r["t_last_ns"] for r in reports)
    elapsed = (t_last - t_go) / 1e9 if t_last else 0.0
    errors: dict[str, int] = {}
    for r in reports:
        for key, value in r["errors"].items():
            errors[key] = errors.get(key, 0) + value
    return {
        "expected": clients,
        "connected": connected,
        "failed": sum(r["failed"] for r in reports),
        "unanswered": sum(r["unanswered"] for r in reports),
        "stalled": any(r["stalled"] for r in reports),
        "generator_fd_limited": any(r["generator_fd_limited"] for r in reports),
        "errors": errors,
        "timed_out": any(r["timed_out"] for r in reports),
        "elapsed_s": elapsed,
        "connects_per_s": connected / elapsed if elapsed > 0 else 0.0,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_conn_kib": (rss_after - rss_before) / connected if connected else None,
        "generator_cpu_s": sum(r["generator_cpu_s"] for r in reports),
        "generator_procs": len(reports),
        "generator_threads": sum(r["generator_threads"] for r in reports),
        "generator_nofile_limit": min(r["nofile_limit"] for r in ready),
        "source_addresses": sources,
        "pending": max(1, pending // len(parts)) * len(parts),
        "generator": "c",
    }
