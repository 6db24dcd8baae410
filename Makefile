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

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,mesh]'
	touch $@

install: $(STAMP) ## Create .venv with gpumesh and its tools

system-packages: ## Install the system tools up and test need (wireguard-go, wg, nft, ...), or say how
	@.ci/system-packages

lint: $(STAMP) ## ruff (lint and format check)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP) ## mypy --strict over the package, tests, e2e and benchmarks
	$(VENV)/bin/mypy gpumesh bench
	$(VENV)/bin/mypy tests
	$(VENV)/bin/mypy e2e

toolchain: $(STAMP) system-packages ## Build the pinned Kubernetes components from Go modules (cached)
	$(PY) -m gpumesh.devcluster.toolchain

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
	$(VENV)/bin/gpumesh dev up --fleet $(FLEET)

down: $(STAMP) ## Stop the local mesh
	$(VENV)/bin/gpumesh dev down

bench: $(STAMP) ## Run the benchmarks in bench/ and write docs/BENCHMARKS.md
	$(PY) -m bench

.PHONY: help install system-packages lint typecheck toolchain crds unit test test-gpu up down bench
