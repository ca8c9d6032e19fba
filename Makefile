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

test: $(STAMP) ## Run the whole test suite against a real Postgres (see README)
	$(BIN)/pytest

test-fast: $(STAMP) ## Run the tests that need no daemon subprocesses
	$(BIN)/pytest --ignore=tests/test_daemons.py

demo: $(STAMP) ## Migrate, run a worker and a reaper on a sample app, print a summary
	$(BIN)/python examples/demo.py

ci: lint test ## What CI runs

clean: ## Remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
