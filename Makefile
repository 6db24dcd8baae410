# gpumesh developer entry points. `make up` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FLEET ?= examples/fleet.yaml
PYTEST_ARGS ?=

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# A strict editable install: build/ holds a tree of links to the package's files, mapped as
# pyproject.toml says (operator/ -> gpumesh/operator). It names files, so it is rebuilt when
# a file is added or removed in one of the three trees (their folders' times change).
PACKAGE_DIRS := $(shell find src/gpumesh operator node_agent -type d -not -name __pycache__)

$(STAMP): pyproject.toml $(PACKAGE_DIRS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,mesh]' --config-settings editable_mode=strict
	touch $@

install: $(STAMP) ## Create .venv with gpumesh and its tools

system-packages: ## Install the system tools up and test need (wireguard-go, wg, nft, ...), or say how
	@.ci/system-packages

lint: $(STAMP) ## ruff (lint and format check) and the import contracts (lint-imports)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# mypy reads gpumesh through the editable install's link tree; sed names the real files.
typecheck: $(STAMP) ## mypy --strict over the package, the test bed, tests, e2e and benchmarks
	$(VENV)/bin/mypy -p gpumesh | sed -E \
	  -e 's#^build/__editable__[^/]*/gpumesh/(operator|node_agent)/#\1/#' \
	  -e 's#^build/__editable__[^/]*/gpumesh/#src/gpumesh/#'
	$(VENV)/bin/mypy testbed bench
	$(VENV)/bin/mypy tests
	$(VENV)/bin/mypy e2e

toolchain: $(STAMP) system-packages ## Build the pinned Kubernetes components from Go modules (cached)
	$(PY) -m testbed.toolchain

crds: $(STAMP) ## Regenerate crds/ and the agent admission policy from the API models
	$(VENV)/bin/gpumesh crds --out crds
	$(VENV)/bin/gpumesh crds --out charts/gpumesh-operator/crds
	$(VENV)/bin/gpumesh policy --out charts/gpumesh-operator/templates/agent-policy.yaml

unit: $(STAMP) ## Unit tests only (no cluster)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test: system-packages lint typecheck toolchain ## Everything CI runs: lint, types, unit and e2e tests
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: $(STAMP) ## The agent on a real NVIDIA GPU (real NVML, proof of GPU); needs one
	$(PY) -m pip install --quiet -e '.[gpu]'
	$(PY) -m pytest -m gpu tests/test_gpu_real.py -v -W default $(PYTEST_ARGS)

up: $(STAMP) system-packages ## Start the local mesh: control plane, simulated suppliers, sample GPUCluster
	$(PY) -m testbed up --fleet $(FLEET)

down: $(STAMP) ## Stop the local mesh
	$(PY) -m testbed down

bench: $(STAMP) ## Run the benchmarks in bench/ and write docs/BENCHMARKS.md
	$(PY) -m bench

.PHONY: help install system-packages lint typecheck toolchain crds unit test test-gpu up down bench
