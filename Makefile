# Quick start: `make run` (the service on the default models) and `make test` (the test suite).
# Both create the virtual environment on first use.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install run generate test test-fast

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# Exactly this spec: it resolves to the local CPU wheel; looser specs pull the CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED)

run: generate

generate: install
	$(VENV)/bin/speccascade generate

test: install
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not real_model"
