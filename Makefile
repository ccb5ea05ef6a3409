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

repro: $(INSTALLED)
	$(VENV)/bin/dvc repro

test: $(INSTALLED)
	$(PY) -m pytest -q
