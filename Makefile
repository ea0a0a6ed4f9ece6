# The two commands of the README: `make dev` runs the product, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install dev test lint typecheck schemas latency clean browser monitoring ingress

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

# The browser tests (tests/e2e/test_browser.py) drive Debian's Chromium through Playwright.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -n "$$CHROMIUM" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "make test: the browser tests need Chromium: install Debian's 'chromium'" \
	      "or set CHROMIUM=/path/to/chrome" >&2; \
	    exit 1; \
	  fi; }

# The monitoring tests (tests/monitoring) run the chart's alerts and dashboard queries in a real
# Prometheus: Debian's package (its binaries only; nothing here starts its service).
monitoring:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus; \
	  else \
	    echo "make test: the monitoring tests need Prometheus: install Debian's 'prometheus'" \
	      "(prometheus and promtool on PATH)" >&2; \
	    exit 1; \
	  fi; }

# The ingress tests (tests/ingress) put a real nginx in front of the apis, configured as the
# chart's ingress-nginx annotations ask: Debian's nginx-light, its binary only. Its package
# would start a server on port 80: a policy-rc.d that refuses (unless one exists) keeps it off.
ingress:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    own=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' \
	      > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own=1; }; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends nginx-light; status=$$?; \
	    [ -z "$$own" ] || rm -f /usr/sbin/policy-rc.d; exit $$status; \
	  else \
	    echo "make test: the ingress tests need nginx: install Debian's 'nginx-light'" >&2; \
	    exit 1; \
	  fi; }

# Two pytest processes, each given whole files (their module fixtures start servers once):
# the suite mostly waits for the servers it starts. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

test: lint typecheck browser monitoring ingress $(STAMP)
	$(BIN)/orchestrator schemas --check
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

latency: $(STAMP)
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
