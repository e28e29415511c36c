# Quick start: `make run` (the whole system, foreground) and `make test` (the suite).
# Both set up everything first: a .venv with the project, then the local stack.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup stack run test test-unit bench down purge clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

stack: setup
	$(BIN)/jobsched stack up >/dev/null

run: stack
	$(BIN)/jobsched run

test: stack
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

bench: stack
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench

down:
	$(BIN)/jobsched stack down

purge:
	$(BIN)/jobsched stack down --purge

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
