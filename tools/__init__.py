"""Developer tools, not installed with mqttd: the fuzzers (python -m tools.fuzz), the load
generator and the benchmark drivers (python -m tools.bench, make bench). Run from the
repository root."""
