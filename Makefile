# edgelb developer targets. Every target bootstraps .venv itself on a fresh clone.
#
#   make run                 start `edgelb demo` (demo backends + proxy + admin)
#   make test                lint, then the whole pytest suite
#   make test PYTEST_ARGS='tests/test_demo_backends.py -x'
#   make lint                ruff check + hadolint on the Dockerfile
#   make compiled            compile the data path in place with mypyc (run, test, bench do it)
#   make bench               bench/run.sh (side-by-side benchmarks, not tests)
#   make bench-workers       1 and 2 edgelb workers vs HAProxy nbthread 1 and 2
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
# The data path's modules compiled in place with mypyc (edgelb/compiled.py lists them): built
# again whenever they, or the modules whose types they use, change. If no C compiler works,
# setup.py leaves them pure Python and says so.
COMPILED := $(VENV)/.compiled
COMPILED_INPUTS := setup.py $(wildcard edgelb/*.py edgelb/*/*.py balancers/*.py watchers/*.py)
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint bench bench-workers clean distclean venv compiled

# Reinstalled whenever pyproject.toml changes; editable so the tree under edit is what runs
# (installed uncompiled: $(COMPILED) builds the C modules into the tree).
$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); python3 -m venv $(VENV); } || { \
	  echo "error: '$(PYTHON) -m venv $(VENV)' failed; on Debian run: apt-get install python3-venv" >&2; \
	  exit 1; }
	EDGELB_COMPILE=0 $(BIN)/pip install -e '.[test]'
	@touch $@

# mypyc needs a C compiler and the Python headers: on Debian (gcc, python3-dev) they are
# installed when missing and root (or sudo) may. With them, a failed compile fails the target
# (EDGELB_COMPILE=1: a type error must be seen); without them, the build stays pure Python.
HAVE_CC = command -v cc >/dev/null && $(BIN)/python -c 'import os, sysconfig, sys; \
  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'

$(COMPILED): $(STAMP) $(COMPILED_INPUTS)
	@if ! { $(HAVE_CC); }; \
	then \
	  if command -v apt-get >/dev/null; then \
	    if [ "$$(id -u)" -eq 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	    else sudo=false; fi; \
	    echo "make: installing gcc and python3-dev to compile the data path (mypyc)"; \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends \
	      gcc libc6-dev python3-dev >/dev/null 2>&1 \
	    || { $$sudo apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	         $$sudo apt-get install -y -q --no-install-recommends gcc libc6-dev python3-dev \
	         >/dev/null 2>&1; } \
	    || echo "make: could not install gcc/python3-dev; the data path stays pure Python" >&2; \
	  else echo "make: no C compiler or Python headers; the data path stays pure Python" >&2; \
	  fi; \
	fi
	@if $(HAVE_CC); then mode=1; else mode=; fi; \
	  echo "EDGELB_COMPILE=$$mode $(BIN)/python setup.py -q build_ext --inplace"; \
	  EDGELB_COMPILE=$$mode $(BIN)/python setup.py -q build_ext --inplace
	@# up to date now even where mypyc found nothing to rebuild (tests/conftest.py checks)
	@find edgelb -name '*.so' -exec touch {} +
	$(BIN)/python -c 'from edgelb.compiled import describe; print("edgelb:", describe())'
	@touch $@

venv: $(STAMP)

compiled: $(COMPILED)

run: $(COMPILED)
	$(BIN)/edgelb demo

test: lint $(COMPILED)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

bench: $(COMPILED)
	bash bench/run.sh

# edgelb with 1 and 2 workers beside HAProxy with nbthread 1 and 2 (bench/workers_bench.py)
bench-workers: $(COMPILED)
	BENCH_SCRIPT=workers_bench.py bash bench/run.sh

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis .mypy_cache $(COMPILED)
	find edgelb -name '*.so' -delete
	find . -path ./$(VENV) -prune -o \
	  \( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
