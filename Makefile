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

.PHONY: install demo demo-quick test test-fast bench lint ui clean

install: $(VENV)/.installed

# torch first and alone: this pins the local CPU wheel; installing the project afterwards with
# `torch==2.13.0` on the same command line keeps pip from swapping in a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' 'torch==2.13.0'
	touch $@

demo: install
	$(VENV)/bin/eagle-pipeline demo

demo-quick: install
	$(VENV)/bin/eagle-pipeline demo --quick

test: install
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
	rm -rf $(VENV) artifacts
