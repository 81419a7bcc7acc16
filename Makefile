# Sluicegate. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ROWS ?= 200000
DAYS ?= 30
SEED ?= 7

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv and install the pinned dependencies (quick when done)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: Sluicegate needs Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# SPEC=examples/<name>/spec.yaml runs an example table instead: its fetch.sh prints the table's path.
demo: setup ## The whole gated pipeline on embedded defaults (SPEC=examples/default/spec.yaml: a public table)
ifeq ($(SPEC),)
	$(BIN)/sluicegate generate --rows $(ROWS) --days $(DAYS) --seed $(SEED)
	$(BIN)/sluicegate run
	$(BIN)/sluicegate status
else
	$(BIN)/sluicegate import "$$(PYTHON=$(BIN)/python bash $(dir $(SPEC))fetch.sh)" --spec $(SPEC)
	$(BIN)/sluicegate run --spec $(SPEC)
	$(BIN)/sluicegate status --spec $(SPEC)
endif

# Each integration and end-to-end file runs in its own process: they start real servers
# (Prefect, MLflow, the model server) and set process-wide state that must not leak between them.
test: setup ## Run the unit, integration and end-to-end tests
	@failed=0; \
	$(BIN)/pytest -q -o timeout=600 tests/unit || failed=1; \
	for f in tests/integration/test_*.py tests/e2e/test_*.py; do \
		echo "== $$f"; $(BIN)/pytest -q -o timeout=1200 $$f || failed=1; \
	done; \
	exit $$failed

bench: setup ## Run the benchmarks (training, variants, serving); tables print ratios against peers
	$(BIN)/python bench/train.py
	$(BIN)/python bench/variants.py
	@if [ -f bench/serve.py ]; then $(BIN)/python bench/serve.py; fi

deploy: setup ## Gate the newest challenger against the champion; exit 0 promoted/nothing newer, 3 blocked
	$(BIN)/sluicegate deploy --actor "$${USER:-make}"

rollback: setup ## Restore the previous champion (or VERSION=n) and record it
	$(BIN)/sluicegate rollback $(if $(VERSION),--to $(VERSION),)

lint: setup ## Style (ruff) and the import contracts: phases import only earlier phases (import-linter)
	$(BIN)/ruff check src flows tests bench
	$(BIN)/lint-imports

clean: ## Delete run-time state (.sluicegate/) and generated reports
	rm -rf .sluicegate expectations/uncommitted .pytest_cache .ruff_cache

.PHONY: help setup demo test bench deploy rollback lint clean

up: setup ## Start Prefect (UI :4200), MLflow (UI :5000), deployments, a worker and the model server
	@scripts/up.sh

down: ## Stop exactly what `make up` started
	@scripts/down.sh

.PHONY: up down
