# lightning_lth: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/demo_fmnist.yaml
STAMP  := $(VENV)/.installed
# pytest-xdist workers for test and test-all (TEST_JOBS=0: in this one process)
TEST_JOBS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install test test-quick test-slurm test-all demo bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q 'torch==2.14.1' 'torchvision==0.29.1'
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

test: $(STAMP) ## the fast test suite on TEST_JOBS workers (CI runs this)
	$(PY) -m pytest -q -n $(TEST_JOBS)

test-quick: $(STAMP) ## a few of the fastest tests of each package (under 2 minutes on 2 cores)
	$(PY) -m pytest -q -m quick

test-slurm: $(STAMP) ## grid on a real SLURM cluster started by the tests (root, Debian's packages)
	$(PY) -m pytest -q -m "" tests/test_slurm.py

test-all: $(STAMP) ## every test, slow ones included, on TEST_JOBS workers
	$(PY) -m pytest -q -n $(TEST_JOBS) -m ""

demo: $(STAMP) ## the whole experiment on the CPU demo config, then its report
	$(PY) -m lightning_lth experiment --config $(CONFIG)
	$(PY) -m lightning_lth report --config $(CONFIG)

bench: $(STAMP) ## benchmarks: each prints its ratio, measured side by side
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

lint: $(STAMP) ## ruff
	$(PY) -m ruff check lightning_lth tests bench

clean: ## remove caches and local outputs (not the store, not .venv)
	rm -rf .pytest_cache .ruff_cache outputs lightning_logs wandb
	find . -name __pycache__ -prune -exec rm -rf {} +
