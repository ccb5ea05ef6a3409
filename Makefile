# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use and (re)install the project when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: repro test

$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# dvc.yaml's commands call `cmhash`, so the venv's bin goes first on PATH.
repro: $(INSTALLED)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: $(INSTALLED)
	$(PY) -m pytest -q
