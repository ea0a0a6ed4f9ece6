# The two commands of the README: `make dev` runs the product, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install dev test lint typecheck schemas latency clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded,bench]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/orchestrator dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

schemas: $(STAMP)
	$(BIN)/orchestrator schemas

test: lint typecheck $(STAMP)
	$(BIN)/orchestrator schemas --check
	$(BIN)/pytest

latency: $(STAMP)
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
