# nightscore: `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
export NIGHTSCORE_HOME ?= $(CURDIR)/.nightscore
PYTEST_ARGS ?=

.PHONY: install demo test lint format airflow stop bench lock clean

install: $(VENV)/.installed

# The lock file pins every package with hashes; the venv is rebuilt when it changes.
$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (or run make PYTHON=/path/to/python3.11)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "error: Python 3.11 is required, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python --require-hashes requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $@

demo: install
	$(BIN)/nightscore demo

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The Airflow UI on 127.0.0.1:$(AIRFLOW_PORT) (or PORT=...) with these DAGs; the login is printed once it is
# ready. Every listener binds 127.0.0.1 (nightscore airflow runs the components itself).
AIRFLOW_PORT ?= $(or $(PORT),8080)
airflow: install
	$(BIN)/nightscore airflow --port $(AIRFLOW_PORT)

# Stops what `make airflow` and `make demo` leave running: the local Airflow, the embedded
# PostgreSQL (any later command starts it again).
stop: install
	$(BIN)/nightscore stop

bench: install
	$(BIN)/python benchmarks/publish.py

# Re-resolve the lock files after changing dependencies in pyproject.toml: requirements.lock
# (what make install syncs: runtime + embedded PostgreSQL + dev tools) and, pinned to the same
# versions, requirements-runtime.lock (what the Docker image needs: no dev tools, no embedded
# server). uv keeps the versions already in an output file unless pyproject.toml moves them.
LOCK_FLAGS := --python-version 3.11 --generate-hashes --no-header --no-annotate
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra embedded $(LOCK_FLAGS) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml -c requirements.lock $(LOCK_FLAGS) -o requirements-runtime.lock

clean:
	@if [ -x $(BIN)/nightscore ]; then $(BIN)/nightscore stop; fi
	rm -rf $(VENV) .nightscore .pytest_cache .mypy_cache .ruff_cache
