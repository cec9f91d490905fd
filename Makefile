# Everything runs from a project-local virtualenv that the targets create on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

HOST ?= 127.0.0.1
PORT ?= 8190
COMFYUI_PORT ?= 8188

.PHONY: help venv browser tools redis s3 lint format test test-fast fuzz soak demo emulator clean

help:
	@echo "make demo      run the relay on http://$(HOST):$(PORT) with the built-in ComfyUI emulator"
	@echo "make emulator  run only the emulated ComfyUI on http://$(HOST):$(COMFYUI_PORT)"
	@echo "make test      lint (ruff, mypy --strict) and run the whole test suite, browser tests included"
	@echo "make test-fast run the tests without the lint step"
	@echo "make fuzz      the fuzz suite at length (thousands of inputs per surface) and every fault 8 times"
	@echo "make soak      many clients for a few minutes: does the relay give back what it took?"
	@echo "make format    apply ruff's formatter and safe fixes"
	@echo "make clean     remove the virtualenv and caches"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

# Chromium for the browser tests (tests/test_browser.py skip, saying why, without it).
browser:
	@bash scripts/install-browser.sh

# wscat, for tests/test_wscat.py and for looking at a relay by hand (build/tools/node_modules/.bin).
tools:
	@bash scripts/install-wscat.sh

# redis-server, for the tests of the Redis state backend (they start their own on a free port).
redis:
	@bash scripts/install-redis.sh

# An S3-compatible server (SeaweedFS) for the storage tests and bench/storage.py (build/tools).
s3: $(STAMP)
	@bash scripts/install-s3.sh

lint: $(STAMP)
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/mypy --strict relay

format: $(STAMP)
	$(BIN)/ruff format relay tests bench
	$(BIN)/ruff check --fix relay tests bench

test: lint browser tools redis s3
	$(BIN)/pytest

# The fuzz and fault suites at length (make test runs a few dozen inputs, each fault twice).
fuzz: $(STAMP) redis
	HYPOTHESIS_PROFILE=long $(BIN)/pytest --hypothesis-show-statistics tests/fuzz
	FAULT_ROUNDS=8 $(BIN)/pytest -s tests/faults

# A bounded soak against the emulator (bench/soak.py --help for longer runs).
soak: $(STAMP)
	$(BIN)/python bench/soak.py

test-fast: $(STAMP)
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/comfy-relay demo --host $(HOST) --port $(PORT) --comfyui-port $(COMFYUI_PORT)

emulator: $(STAMP)
	$(BIN)/comfy-relay emulator --host $(HOST) --port $(COMFYUI_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
