"""The C generator's connect mode (``cloadgen --mode connect`` through
``cgen.connections``) against a real mqttd, and the benchmark's medians of several runs."""

import socket

import pytest

from tools import bench, cgen, loadgen

needs_cc = pytest.mark.skipif(cgen.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def binary():
    return cgen.build()["binary"]


@pytest.fixture
def mqttd(tmp_path):
    """A fresh mqttd of this tree (``python -m mqttd``, default configuration) on a free
    port of 127.0.0.1."""
    with bench.Broker("mqttd", str(tmp_path), durable=False) as broker:
        yield broker


class Counting(loadgen.Probe):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")


@needs_cc
def test_connect_mode_holds_every_connection_until_closed(binary, mqttd):
    seen: list[int | None] = []

    def measure() -> int:
        seen.append(bench.open_fds(mqttd.pid))
        return bench.status_kib(mqttd.pid, "VmRSS")

    probe = Counting()
    result = cgen.connections(binary, mqttd.port, probe, clients=200, timeout_s=30,
                              measure=measure)
    assert probe.calls == ["start", "stop"]
    assert result["generator"] == "c"
    assert result["connected"] == result["expected"] == 200
    assert result["failed"] == result["unanswered"] == 0, result["errors"]
    assert not result["stalled"] and not result["timed_out"]
    assert result["connects_per_s"] > 0 and result["elapsed_s"] > 0
    assert result["generator_procs"] == 1 and result["source_addresses"] == 1
    assert result["rss_after_kib"] > result["rss_before_kib"] > 0
    assert result["generator_cpu_s"] >= 0
    before, held = seen
    assert held - before >= 200  # the broker held them all while its RSS was read


@needs_cc
def test_connect_mode_spreads_over_processes_and_source_addresses(binary, mqttd):
    """3 processes of 100 from 127.0.0.1-3: distinct client ids (a duplicate would make
    the broker drop the older connection, and it would hold fewer)."""
    seen: list[int | None] = []

    def measure() -> int:
        seen.append(bench.open_fds(mqttd.pid))
        return bench.status_kib(mqttd.pid, "VmRSS")

    result = cgen.connections(binary, mqttd.port, loadgen.Probe(), clients=300, timeout_s=30,
                              measure=measure, per_process=100, sources=3)
    assert result["generator_procs"] == 3 and result["source_addresses"] == 3
    assert result["connected"] == 300 and result["failed"] == 0, result["errors"]
    assert seen[1] - seen[0] >= 300


@needs_cc
def test_connect_mode_gives_up_on_a_broker_that_stops_answering(binary):
    """A listener that never accepts (a broker at its fd limit leaves connections in its
    backlog): the generator stops after ``stall_s`` without a CONNACK."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(100)
        result = cgen.connections(binary, listener.getsockname()[1], loadgen.Probe(),
                                  clients=20, timeout_s=30, stall_s=0.5)
    assert result["connected"] == 0
    assert result["stalled"] is True
    assert result["unanswered"] + result["failed"] == 20
    assert result["connects_per_s"] == 0.0


def _run(status="ok", **values):
    return {"status": status, "lost": 0, "scale": 1, **values}


def test_median_row_picks_the_median_run_of_the_scenarios_key():
    runs = [_run(msgs_per_cpu_s=100.0, msgs_per_s=1.0), _run(msgs_per_cpu_s=300.0),
            _run(msgs_per_cpu_s=200.0, msgs_per_s=2.0)]
    row = bench.median_row("fanin_qos0", runs)
    assert row["msgs_per_cpu_s"] == 200.0 and row["msgs_per_s"] == 2.0  # one run's values
    assert row["median_run"] == 2 and row["repeats"] == 3
    assert row["median_of"] == "msgs_per_cpu_s"
    assert row["run_values"] == {"msgs_per_cpu_s": [100.0, 300.0, 200.0]}
    assert row["status"] == "ok"
    assert bench.median_row("fanin_qos0", runs[:1]) is runs[0]  # one run: as it is


def test_median_row_latency_by_p99_and_even_counts_take_the_worse_middle():
    runs = [_run(latency_ms={"p99": p99}) for p99 in (0.3, 0.1, 0.2)]
    assert bench.median_row("latency", runs)["latency_ms"]["p99"] == 0.2
    two = [_run(latency_ms={"p99": 0.1}), _run(latency_ms={"p99": 0.4})]
    assert bench.median_row("latency", two)["latency_ms"]["p99"] == 0.4
    two = [_run(msgs_per_cpu_s=10.0), _run(msgs_per_cpu_s=20.0)]
    assert bench.median_row("fanout", two)["msgs_per_cpu_s"] == 10.0


def test_median_row_connections_rss_is_its_own_median():
    runs = [_run(connects_per_s=rate, rss_per_conn_kib=rss)
            for rate, rss in ((5000.0, 9.0), (7000.0, 7.0), (6000.0, 8.5))]
    row = bench.median_row("connections", runs)
    assert row["connects_per_s"] == 6000.0
    assert row["rss_per_conn_kib"] == 8.5
    assert row["run_values"]["rss_per_conn_kib"] == [9.0, 7.0, 8.5]


def test_median_row_never_hides_a_failed_or_lossy_run():
    runs = [_run(msgs_per_cpu_s=100.0), _run("error", error="boom"),
            _run("incomplete (LOST 5)", msgs_per_cpu_s=300.0, lost=5),
            _run(msgs_per_cpu_s=200.0)]
    row = bench.median_row("fanin_qos1", runs)
    assert row["msgs_per_cpu_s"] in (100.0, 200.0)  # the error does not count
    assert "run 2: error" in row["status"]
    assert "run 3: incomplete (LOST 5)" in row["status"]
    assert row["lost_any_run"] == 5
    # and the lost target counts every run of mqttd
    report = {"parameters": {"latency_rate": 1000.0}, "scenarios": {
        "fanin_qos1": {"results": {"mqttd": row}, "runs": {"mqttd": runs}}}}
    lost = next(t for t in bench.targets(report) if t["target"].startswith("messages lost"))
    assert lost["value"] == 5 and lost["met"] is False


def test_median_row_of_a_peer_losing_at_its_defaults_names_no_other_run():
    runs = [_run(f"ok (lost {n})", msgs_per_cpu_s=float(n), lost=n) for n in (5, 7, 6)]
    row = bench.median_row("fanin_qos1", runs)
    assert row["status"] == "ok (lost 6)"
    assert row["lost_any_run"] == 7


def test_targets_are_issue_18s_goals_from_the_median_rows():
    def rows(mine, theirs):
        return {"description": "", "ratios": {}, "results": {"mqttd": mine, "mosquitto": theirs}}

    report = {
        "parameters": {"latency_rate": 1000.0, "max_connections": 100_000},
        "nofile": {"why": "no CAP_SYS_RESOURCE"},
        "scenarios": {
            "fanin_qos0": rows(_run(msgs_per_cpu_s=210.0), _run(msgs_per_cpu_s=200.0)),
            "fanin_qos1": rows(_run(msgs_per_cpu_s=30.0), _run(msgs_per_cpu_s=40.0)),
            "durable_qos1": rows(_run(msgs_per_cpu_s=21.0), _run(msgs_per_cpu_s=15.0)),
            "fanout": rows(_run(msgs_per_cpu_s=800.0), _run(msgs_per_cpu_s=100.0)),
            "latency": rows(_run(latency_ms={"p99": 0.08}), _run(latency_ms={"p99": 0.2})),
            "connections": rows(_run(connected=10_000, connects_per_s=16_000.0,
                                     rss_per_conn_kib=4.5), _run()),
            "connections_max": rows(_run(connected=19_990, expected=100_000,
                                         broker_nofile_limit=20_000, rss_after_kib=150_000,
                                         rss_per_conn_kib=7.0), _run()),
        },
    }
    got = {t["target"]: (t["value"], t["goal"], t["met"]) for t in bench.targets(report)}
    assert got["fan-in QoS 0, msgs per broker CPU-s vs mosquitto"] == (1.05, ">= 1.0x", True)
    assert bench._target_value({"unit": "x", "value": 1.05}) == "1.050x"
    assert got["fan-in QoS 1, msgs per broker CPU-s vs mosquitto"] == (0.75, ">= 0.8x", False)
    durable = next(v for k, v in got.items() if k.startswith("durable QoS 1"))
    assert durable[1:] == (">= 0.5x", True)  # 21 / mosquitto's non-durable 40
    assert durable[0] == pytest.approx(21 / 40)
    assert got["fan-out, deliveries per broker CPU-s vs mosquitto"] == (8.0, ">= 4x", True)
    assert got["connect rate at 10,000 connections"] == (16_000.0, ">= 15,000/s", True)
    assert got["RSS per idle connection at 10,000 connections"] == (4.5, "<= 4 KB", False)
    assert got["latency p99 at 1,000 msg/s"] == (pytest.approx(80.0), "<= 100 us", True)
    assert got["idle connections held (of 100,000 tried)"] == (19_990, ">= 100,000", False)
    assert got["messages lost by mqttd (every row, every run)"] == (0, "= 0", True)
    held = next(t for t in bench.targets(report) if t["target"].startswith("idle connections"))
    assert "not reachable" in held["detail"] and "CAP_SYS_RESOURCE" in held["detail"]
    table = bench.markdown({**report, "size": "tiny", "date": "d", "brokers": {},
                            "machine": {"cpus": 2, "cpu_model": "", "kernel": "",
                                        "python": ""}, "targets": bench.targets(report)})
    assert "| latency p99 at 1,000 msg/s | 80 us | <= 100 us | yes |" in table


def test_repeats_interleave_the_brokers_and_keep_every_run():
    brokers = ("mqttd",) + (("mosquitto",) if bench.mosquitto_path() else ())
    lines: list[str] = []
    report = bench.run_benchmark("tiny", brokers, ("connections",), None, echo=None,
                                 progress=lines.append, repeats=2)
    entry = report["scenarios"]["connections"]
    assert report["repeats"] == 2
    for name in brokers:
        assert len(entry["runs"][name]) == 2
        row = entry["results"][name]
        assert row["repeats"] == 2 and row["median_of"] == "connects_per_s"
        assert row["connected"] == bench.SIZES["tiny"].connections
    started = [line for line in lines if line.startswith("> connections on")]
    assert started == [f"> connections on {name} (run {k}/2) ..."
                       for k in (1, 2) for name in brokers]


def test_a_ratio_of_equal_cpu_ticks_meets_a_1x_goal():
    """10,000 messages in 6 CPU ticks each (one measured as 0.07 - 0.01 s): 1.0x, not
    0.9999999999999998x and "NO"."""
    report = {"parameters": {"latency_rate": 1000.0}, "scenarios": {"fanin_qos0": {"results": {
        "mqttd": _run(msgs_per_cpu_s=10_000 / (0.07 - 0.01)),
        "mosquitto": _run(msgs_per_cpu_s=10_000 / 0.06)}}}}
    goal = bench.targets(report)[0]
    assert goal["value"] == 1.0 and goal["met"] is True


def test_connections_max_status_says_when_the_fd_limit_stopped_it():
    status = bench._connections_max_status
    assert status({"connected": 100, "expected": 100, "broker_nofile_limit": 20_000}) == "ok"
    assert status({"connected": 19_988, "expected": 100_000, "broker_nofile_limit": 20_000}) == (
        "limited: held 19,988 of 100,000 (broker fd limit 20,000)")
    # far below its limit: something else stopped it
    assert status({"connected": 5_000, "expected": 100_000,
                   "broker_nofile_limit": 20_000}).startswith("incomplete")
    assert status({"connected": 5_000, "expected": 100_000, "broker_nofile_limit": 20_000,
                   "timed_out": True}) == "incomplete (timed out)"
