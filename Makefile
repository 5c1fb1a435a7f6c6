# recsys: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RECSYS_HOME ?= $(CURDIR)/.recsys
export DAGSTER_HOME ?= $(RECSYS_HOME)/dagster
export GX_ANALYTICS_ENABLED ?= false

.PHONY: demo test lint format ui install lock bench clean

# The libraries come from requirements.lock (the complete set, recsys[pipeline,dev]: exact
# versions and hashes, what CI tested); the project itself is installed on top without
# touching them. `make lock` refreshes it.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

## Re-resolve the lock files (requirements*.lock) after a dependency change in
## pyproject.toml (keeps every pin that still fits; UPGRADE=1 moves all to the newest).
lock: $(STAMP)
	bash scripts/lock.sh $(if $(UPGRADE),--upgrade)

## The whole system on embedded defaults: simulate, ingest, train, serve, drift; watch it retrain and promote on its own; report.
demo: $(STAMP)
	$(BIN)/recsys demo

## The whole test suite (slow end-to-end tests included) plus lint. First installs the
## Debian packages the tests need (scripts/system-deps.sh: as root, or names them and stops).
test: $(STAMP)
	@bash scripts/system-deps.sh
	$(BIN)/ruff check recsys_assets recsys_serving tests bench
	$(BIN)/lint-imports
	$(BIN)/deptry .
	$(BIN)/python -m pytest

## ruff, the import contracts (recsys_serving never imports Dagster, great-expectations,
## implicit or recsys_assets) and deptry (every import declared, every declaration used).
lint: $(STAMP)
	$(BIN)/ruff check recsys_assets recsys_serving tests bench
	$(BIN)/ruff format --check recsys_assets recsys_serving tests bench
	$(BIN)/lint-imports
	$(BIN)/deptry .

format: $(STAMP)
	$(BIN)/ruff format recsys_assets recsys_serving tests bench
	$(BIN)/ruff check --fix recsys_assets recsys_serving tests bench

## Dagster UI + daemon on the project's instance ($(DAGSTER_HOME)).
ui: $(STAMP)
	$(BIN)/recsys ui

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache
