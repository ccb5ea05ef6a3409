# Entry points: `make repro` runs the pipeline, `make test` lints, builds the docs and runs the
# tests, `make docs` builds the documentation into site/, `make gpu-check` proves the CUDA path
# on a GPU machine.
# All create .venv on first use and (re)install the project when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: repro test docs gpu-check

$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# dvc.yaml's commands call `cmhash`, so the venv's bin goes first on PATH.
repro: $(INSTALLED)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# In order, stopping at the first failure: lint, the docs (--strict: a broken link fails), the tests.
test: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mkdocs build --strict
	$(PY) -m pytest -q

docs: $(INSTALLED)
	$(VENV)/bin/mkdocs build --strict

# On a CUDA machine (a few minutes): the CUDA-only tests, the demo pipeline in fp32, bf16 and fp16,
# and GPU speed; see docs/benchmarks.md. Options go in GPU_CHECK_ARGS, e.g. a CPU smoke run of the
# script: make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"
gpu-check: $(INSTALLED)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
