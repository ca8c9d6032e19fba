# pgqueue developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install fmt lint test test-fast demo ci clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install pgqueue with its dev dependencies

fmt: $(STAMP) ## Format the code (ruff)
	$(BIN)/ruff format pgqueue tests examples
	$(BIN)/ruff check --fix pgqueue tests examples

lint: $(STAMP) ## ruff check, ruff format --check, mypy --strict
	$(BIN)/ruff check pgqueue tests examples
	$(BIN)/ruff format --check pgqueue tests examples
	$(BIN)/mypy

# Test processes (pytest-xdist): each test has its own database, so they run side by
# side; most of a test's time is spent waiting for daemons. TEST_JOBS=0 runs them in one.
TEST_JOBS ?= 2
PYTEST := $(BIN)/pytest -n $(TEST_JOBS) --dist worksteal

test: $(STAMP) ## Run the whole test suite against a real Postgres (see README)
	$(PYTEST)

test-fast: $(STAMP) ## Run the tests that need no daemon subprocesses
	$(PYTEST) --ignore=tests/test_daemons.py --ignore=tests/faults

demo: $(STAMP) ## Migrate, run a worker and a reaper on a sample app, print a summary
	$(BIN)/python examples/demo.py

# The long fault-injection run (tests/faults/driver.py); `make test` runs a short one.
# Override, e.g.: make chaos CHAOS_ARGS="--jobs 10000 --duration 120 --repeat 2 --seed 7"
CHAOS_ARGS ?= --jobs 100000 --duration 540 --repeat 8 --poison 24 --seed 1
.PHONY: chaos
chaos: $(STAMP) ## Long fault-injection run: 100,000 jobs, every fault repeated (~10 min)
	$(BIN)/python -m tests.faults.driver $(CHAOS_ARGS)

ci: lint test ## What CI runs

.PHONY: bench
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) ## Benchmark vs PgQueuer, procrastinate, Oban, Celery (BENCH_ARGS=--quick)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean: ## Remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
