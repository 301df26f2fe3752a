# One entry point for people and CI. `make demo` and `make test` work on a fresh Debian
# machine: they install the system packages, create .venv and install moesaic into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install system-deps demo test lint proto bench clean

system-deps:
	@if ! command -v mosquitto >/dev/null || ! dpkg -s libusb-1.0-0 >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients libusb-1.0-0 systemd >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -c constraints.txt -e '.[all,cpu,dev]'
	touch $(STAMP)

install: system-deps $(STAMP)

demo: install
	$(VENV)/bin/moesaic demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check moesaic tests bench tools
	$(VENV)/bin/ruff format --check moesaic tests bench tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

proto: install
	$(PY) tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
