# Two commands do all set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds its CPU shm comm op on first init (~60 s): keep the build in the venv so
# it happens once per machine, not once per test or per run.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export DS_BUILD_OPS := 0
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(abspath $(VENV))/prefect_home
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false

# The exact versions CI last passed with (a pip constraints file); `make lock` refreshes it.
LOCK := deployments/requirements.lock
TORCH_PIN := $(shell sed -n 's/^torch==//p' $(LOCK))

.PHONY: install engines lock demo demo-quick test test-fast bench lint ui clean

install: $(VENV)/.installed

# torch first and alone: this pins the local CPU wheel; installing the project afterwards with
# `torch==<pin>` on the same command line keeps pip from swapping in a multi-GB CUDA build.
# Everything else is held to the lock's versions (-c): the newest releases are what `make lock`
# tries, never what an install takes.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' 'torch==$(TORCH_PIN)' -c $(LOCK)
	touch $@

# The real engines and peers the tests drive as separate programs, each in its own venv
# (deployments/engines/NAME.txt; cached outside the clone by .ci/engine-venv).
ENGINES := $(filter-out %.nodeps,$(basename $(notdir $(wildcard deployments/engines/*.txt))))
engines:
	for e in $(ENGINES); do .ci/engine-venv $$e >/dev/null || exit 1; done

# Refresh the lock: the newest releases in a scratch venv, the whole suite run there, and the
# lock rewritten only when it passes (then commit deployments/requirements.lock).
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==$(TORCH_PIN)
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[test]' 'torch==$(TORCH_PIN)'
	.ci/ensure-chromium
	$(MAKE) engines
	TORCH_EXTENSIONS_DIR=$(abspath $(LOCK_VENV))/torch_extensions \
		PREFECT_HOME=$(abspath $(LOCK_VENV))/prefect_home $(LOCK_VENV)/bin/python -m pytest tests
	.ci/write-lock $(LOCK_VENV)/bin/python $(LOCK)
	@echo "lock: $(LOCK) now holds the versions the suite just passed with; commit it"

demo: install
	$(VENV)/bin/eagle-pipeline demo

demo-quick: install
	$(VENV)/bin/eagle-pipeline demo --quick

test: install engines
	.ci/ensure-chromium
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not slow"

bench: install
	for b in benchmarks/bench_*.py; do $(PY) -m benchmarks.$$(basename $$b .py) || exit 1; done

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

ui: install
	$(VENV)/bin/eagle-pipeline ui

clean:
	rm -rf $(VENV) $(LOCK_VENV) artifacts
