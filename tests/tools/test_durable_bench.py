"""The durable benchmark's own code, at a tiny size, so it cannot rot (no timing asserted)."""

import pytest

from tools.durable_bench import run


@pytest.mark.parametrize("scenario", ["clean", "durable-online", "durable-offline"])
def test_durable_bench_scenario_runs_and_counts_commits(scenario):
    result = run(scenario, count=300, window=16)
    assert result["msgs_per_s"] > 0
    if scenario == "clean":
        assert result["commits"] == 0  # clean sessions never touch the disk
    else:
        assert result["commits"] >= 1
        assert result["writes"] >= 300  # at least one write per message
