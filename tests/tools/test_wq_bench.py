"""The benchmark's consumer-group rows (tools/wqgen.py) at the tiny size, so they cannot rot:
every job acknowledged once, 10% rejected once in the work-queue row, the table printed, and
the other brokers skipped. No timing is asserted."""

from tools import bench

BROKERS = ("mqttd",) + (("mosquitto",) if bench.mosquitto_path() else ())


def test_work_queue_rows_deliver_every_job_once_and_reject_a_tenth():
    report = bench.run_benchmark("tiny", BROKERS, bench.WORK_QUEUE_SCENARIOS, None, echo=None)
    for scenario in bench.WORK_QUEUE_SCENARIOS:
        results = report["scenarios"][scenario]["results"]
        mine = results["mqttd"]
        assert mine["status"] == "ok", mine.get("error")
        assert mine["delivered"] == mine["expected"] == 400
        assert mine["lost"] == mine["duplicated"] == mine["unexpected"] == 0
        # (CPU time comes in 10 ms clock ticks: 400 jobs may take less than one)
        assert mine["broker_cpu_us_per_job"] >= 0 and mine["msgs_per_s"] > 0
        expected_rejections = 40 if scenario == "workqueue" else 0
        assert mine["rejected"] == expected_rejections
        for name in BROKERS[1:]:
            assert results[name]["status"] == "skipped"
    text = bench.markdown(report)
    assert "| consumer group (mqttd) |" in text and "| workqueue | 400/400 | 40 |" in text
    assert "Work queue / plain shared: jobs/s" in text
