"""The side-by-side benchmark's own code at its tiny size, so it cannot rot: the result
structure, the table, and that nothing was lost. No timing is asserted. The main run uses
the default generator (the C one where a compiler exists, as in CI); the Python one runs
the message scenarios once more on mqttd."""

import json

import pytest

from mqttd.codec import Publish
from mqttd.config import load_config, parse_config
from tools import bench, cgen, loadgen

BROKERS = ("mqttd",) + (("mosquitto",) if bench.mosquitto_path() else ())
SCENARIOS = ("fanin_qos0", "durable_qos1", "fanout", "latency", "connections",
             "connections_max", "constrained")
MESSAGE_SCENARIOS = ("fanin_qos0", "durable_qos1", "fanout", "latency")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "results.json"
    result = bench.run_benchmark("tiny", BROKERS, SCENARIOS, str(output), echo=None)
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def python_report():
    return bench.run_benchmark("tiny", ("mqttd",), MESSAGE_SCENARIOS, None, echo=None,
                               generator="python")


def test_default_generator_is_c_when_a_compiler_exists(report):
    expected = "c" if cgen.compiler() else "python"
    assert report["generator"]["kind"] == expected
    for scenario in MESSAGE_SCENARIOS:
        for name, result in report["scenarios"][scenario]["results"].items():
            assert result["generator"] == expected, (scenario, name)
    for scenario in ("connections", "connections_max"):
        for name, result in report["scenarios"][scenario]["results"].items():
            assert result["generator"] == expected, (scenario, name)


@pytest.mark.parametrize("scenario", MESSAGE_SCENARIOS)
def test_python_generator_still_runs(python_report, scenario):
    assert python_report["generator"] == {"kind": "python"}
    result = python_report["scenarios"][scenario]["results"]["mqttd"]
    assert result["generator"] == "python"
    assert result["status"] == "ok", result.get("error")
    assert result["delivered"] == result["expected"] > 0


def test_every_scenario_ran_on_every_broker(report):
    assert report["size"] == "tiny"
    assert set(report["scenarios"]) == set(SCENARIOS)
    for scenario, entry in report["scenarios"].items():
        assert set(entry["results"]) == set(BROKERS), scenario
        for name, result in entry["results"].items():
            assert result["status"] == "ok", (scenario, name, result.get("error"))
            assert result["broker_cpu_s"] >= 0
            assert result["peak_rss_kib"] > 0
            assert result["generator_cpu_s"] >= 0


@pytest.mark.parametrize("scenario", MESSAGE_SCENARIOS)
def test_message_scenarios_deliver_everything_exactly_once(report, scenario):
    for name, result in report["scenarios"][scenario]["results"].items():
        assert result["expected"] > 0
        assert result["broker_cpu_pct"] is None or result["broker_cpu_pct"] >= 0
        assert result["generator_cpu_pct"] is None or result["generator_cpu_pct"] >= 0
        if result["generator"] == "c":
            assert result["in_order"] is True and result["out_of_order"] == 0, name
        assert result["delivered"] == result["expected"], name
        assert result["lost"] == 0, name
        assert result["duplicated"] == 0, name
        assert result["unexpected"] == 0, name
        assert result["msgs_per_s"] > 0, name
        assert set(result["latency_ms"]) == {"p50", "p99", "max"}
        assert 0 <= result["latency_ms"]["p50"] <= result["latency_ms"]["max"]


def test_connections_scenario_counts_clients_and_memory(report):
    for name, result in report["scenarios"]["connections"]["results"].items():
        assert result["connected"] == result["expected"] == bench.SIZES["tiny"].connections
        assert result["failed"] == 0, (name, result["errors"])
        assert result["rss_after_kib"] > 0
        assert result["rss_per_conn_kib"] is not None
        assert result["broker_cpu_pct"] is None or result["broker_cpu_pct"] >= 0
        assert result["broker_fds"] >= result["connected"]


def test_connections_max_holds_the_target_within_the_fd_limit(report):
    """At the tiny size the target (100) is far below any fd limit: all are held, and the
    row says which limit the broker had (asked for: the target plus headroom)."""
    size = bench.SIZES["tiny"]
    for name, result in report["scenarios"]["connections_max"]["results"].items():
        if result["status"] == "skipped":  # without the C generator
            assert cgen.compiler() is None
            continue
        assert result["connected"] == result["expected"] == size.max_connections, name
        assert result["broker_nofile_limit"] >= size.max_connections
        assert result["broker_fds"] >= size.max_connections
        assert result["rss_per_conn_kib"] is not None
    assert report["nofile"]["soft"] >= size.max_connections + bench.NOFILE_HEADROOM
    held = next(t for t in report["targets"] if t["target"].startswith("idle connections"))
    assert held["met"] is True


def test_constrained_devices_get_every_command_in_order(report):
    """Every command reaches its device once and in order, while the telemetry is all
    delivered too; mqttd's client_overrides window of 1 held for every device."""
    size = bench.SIZES["tiny"]
    results = report["scenarios"]["constrained"]["results"]
    for name, result in results.items():
        assert result["expected"] == size.devices * size.device_commands
        assert result["delivered"] == result["expected"], (name, result["devices"])
        assert result["in_order"] is True, name
        assert result["duplicated"] == 0, name
        assert result["unexpected"] == 0 and result["failed"] == 0, (name, result["errors"])
        assert result["command_delivery_s"] > 0
        assert result["max_unacked"] >= 1
        telemetry = result["telemetry"]
        assert telemetry["delivered"] == telemetry["expected"] > 0, name
        assert telemetry["lost"] == 0 and telemetry["duplicated"] == 0, name
        assert result["telemetry_msgs_per_s"] > 0
        assert [d["client_id"] for d in result["devices"]] == [
            f"devices/constrained-{n}" for n in range(1, size.devices + 1)
        ]
    mqttd = results["mqttd"]
    assert mqttd["max_unacked"] == 1
    assert mqttd["violations"] == 0
    assert all(d["max_unacked"] == 1 for d in mqttd["devices"])
    assert mqttd["device_window"].startswith("1 (client_overrides")
    assert report["scenarios"]["constrained"]["ratios"] == {}


def test_mqttd_config_gives_only_the_devices_a_window_of_one(tmp_path):
    defaults = parse_config("{}")
    broker = bench.Broker("mqttd", str(tmp_path), durable=False, devices=True)
    command = broker.command()
    config = load_config(command[command.index("-c") + 1])
    assert config.limits_for("devices/constrained-7").max_inflight_messages == 1
    assert config.limits == defaults.limits  # every other limit at its default
    device = config.limits_for("devices/constrained-7")
    assert device.max_queued_messages == defaults.limits.max_queued_messages
    plain = bench.Broker("mqttd", str(tmp_path), durable=False).command()
    plain_config = load_config(plain[plain.index("-c") + 1])
    assert plain_config.client_overrides == ()
    assert plain_config.limits == defaults.limits


def test_mosquitto_config_changes_no_limit(tmp_path):
    for durable in (False, True):
        broker = bench.Broker("mosquitto", str(tmp_path), durable=durable)
        command = broker.command()
        with open(command[command.index("-c") + 1]) as f:
            keys = {line.split()[0] for line in f if line.strip()}
        allowed = {"listener", "allow_anonymous", "log_dest", "log_type", "user"}
        if durable:
            allowed |= {"persistence", "persistence_location"}
        assert keys == allowed


def test_a_peer_that_loses_at_its_defaults_is_reported_not_failed():
    raw = {"lost": 5, "duplicated": 0, "in_order": True}
    assert bench._status("mosquitto", raw) == "ok (lost 5)"
    assert bench._status("mqttd", raw) == "incomplete (LOST 5)"
    assert bench._status("mosquitto", {**raw, "duplicated": 1}).startswith("incomplete")
    assert bench._status("mqttd", {"lost": 0}) == "ok"


def test_ratios_and_markdown(report):
    if "mosquitto" in BROKERS:
        ratios = report["scenarios"]["fanin_qos0"]["ratios"]["mosquitto"]
        assert ratios["throughput"] > 0
    table = bench.markdown(report)
    assert "| fanin_qos0 | mqttd |" in table
    assert "| 50 | mqttd |" in table  # the connections table
    assert "| 100 | mqttd | 100 | 100 |" in table  # connections_max
    assert "Issue 18's goals" in table
    assert "| mqttd | 1 (client_overrides, devices only) | 50/50 | yes | 0 | 1 | 0 |" in table
    assert "| constrained | mqttd |" not in table  # not in the throughput table
    assert "Durable QoS 1, what each broker promises" in table


def test_subscriber_tally_handles_split_packets_and_long_lengths():
    """Packets cut at every possible point, 2-byte Remaining Lengths, QoS 1 acks, a
    duplicate and a missing message are all counted right."""
    payload_tail = bytes(200)  # > 127 bytes: two-byte Remaining Length
    stream = b""
    for seq in (0, 1, 2, 2, 4):  # 2 twice, 3 missing
        payload = loadgen.PAYLOAD.pack(1, seq, 0) + payload_tail
        stream += Publish("bench/0001/t", payload, 1, packet_id=seq + 1).encode()
    for cut in range(1, len(stream)):
        tally = loadgen._Tally(pubs=2, per_pub=5, conns=1)
        conn = loadgen._SubConn(sock=None, base=0)  # type: ignore[arg-type]
        acks: list[bytes] = []
        tally.feed(conn, stream[:cut], 0, acks)
        tally.feed(conn, stream[cut:], 0, acks)
        assert conn.rest == b""
        assert tally.unique == 4
        assert tally.duplicates() == 1
        assert tally.counts.count(0) == 6  # publisher 0's five, and seq 3
        assert [int.from_bytes(a, "big") for a in acks] == [1, 2, 3, 3, 5]


def test_unknown_broker_is_reported_not_crashed(monkeypatch):
    monkeypatch.setattr(bench, "mosquitto_path", lambda: None)
    report = bench.run_benchmark("tiny", ("mosquitto",), ("latency",), None, echo=None)
    assert report["brokers"]["mosquitto"]["skipped"].startswith("mosquitto is not installed")
    assert report["scenarios"]["latency"]["results"] == {}
