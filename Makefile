PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PURE_STAMP := $(VENV)/.installed-test-pure
# The compiled build (docs/COMPILED.md): `pip install -e` compiles the hot-path modules with
# mypyc into extension modules next to their .py files, so it is redone when one of those
# sources changes (an old extension module would shadow the edited .py; the test suite
# refuses to run with one). `make test-pure` reinstalls the pure-Python build (no extension
# modules), after which `make run` or `make test` compile again.
BUILD_INPUTS := pyproject.toml setup.py mqttd/build_info.py \
	$(shell $(PYTHON) mqttd/build_info.py --sources)
SAY_BUILD = $(PY) -m mqttd.build_info

.PHONY: run test test-pure lint clean bench bench-quick bench-cluster

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(BUILD_INPUTS) | $(PY)
	rm -f $(PURE_STAMP)
	$(PY) -m pip install --quiet -e .
	@$(SAY_BUILD)
	touch $@

$(TEST_STAMP): $(BUILD_INPUTS) | $(PY)
	rm -f $(PURE_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	@$(SAY_BUILD)
	touch $@ $(STAMP)

$(PURE_STAMP): pyproject.toml setup.py | $(PY)
	rm -f $(STAMP) $(TEST_STAMP)
	MQTTD_PURE_PYTHON=1 $(PY) -m pip install --quiet -e '.[test]'
	@MQTTD_PURE_PYTHON=1 $(SAY_BUILD)
	touch $@

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

# the same suite against the pure-Python build (CI runs both; MQTTD_EXPECT_PURE makes
# tests/test_build_info.py check that no module runs compiled)
test-pure: $(PURE_STAMP)
	MQTTD_EXPECT_PURE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check mqttd persistence devices tools tests
	$(VENV)/bin/mypy mqttd persistence devices tools
	$(VENV)/bin/lint-imports
	$(PY) -m tools.import_cycles mqttd persistence

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
