PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint clean bench bench-quick bench-cluster

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

run: $(STAMP)
	$(PY) -m mqttd $(ARGS)

# Side-by-side benchmark (mqttd, mosquitto, amqtt): Markdown to stdout, bench/results.json;
# builds the C load generator (tools/cloadgen.c) into build/ with cc when there is one.
bench: $(TEST_STAMP)
	$(PY) -m tools.bench --size full $(ARGS)

bench-quick: $(TEST_STAMP)
	$(PY) -m tools.bench --size quick $(ARGS)

# Only the cluster rows (2 mqttd + 3 nats-server vs 1 mqttd; bench/README.md), full size,
# to bench/results-cluster.json;
# ARGS="--size quick" or ARGS="--cluster-persistent"
bench-cluster: $(TEST_STAMP)
	$(PY) -m tools.bench --brokers mqttd --scenarios cluster_qos1,cluster_latency \
	    --output bench/results-cluster.json $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check mqttd persistence devices tools tests
	$(VENV)/bin/mypy mqttd persistence devices tools
	$(VENV)/bin/lint-imports
	$(PY) -m tools.import_cycles mqttd persistence

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
