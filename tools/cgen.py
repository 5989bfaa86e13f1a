"""The C load generator (``tools/cloadgen.c``): built with the machine's C compiler into
a cache directory, run as one subprocess per scenario.

``build()`` compiles ``cloadgen.c`` once per source and compiler (the binary's name
carries a hash of both) into ``build/`` at the top of the checkout, or a temporary
directory if that is not writable. ``fan_in``, ``fan_out`` and ``latency`` take the same
arguments and return the same result keys as their :mod:`tools.loadgen` counterparts
(``sub_port``: the subscriber connects to another port than the publishers, a cluster's
other node):
the generator connects and subscribes, prints ``{"ready": ...}``, the probe starts, the
coordinator writes ``go``, and the generator prints its results as one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
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
