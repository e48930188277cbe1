# Two commands for a new user: `make run` (the embedded system) and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: run test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing spendledger[dev] (first run takes about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $(STAMP)

# make run PORT=8001 KAFKA_PORT=19093 (DATA_DIR=…): another system beside the first.
PORT ?= 8000
KAFKA_PORT ?= 19092
DATA_DIR ?= .spendledger
run: $(STAMP)
	$(BIN)/spendledger up --port $(PORT) --kafka-port $(KAFKA_PORT) --data-dir $(DATA_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# The benchmark suite: about 15 minutes; writes bench/results/latest.json.
bench: $(STAMP)
	cd bench && ../$(BIN)/python run.py

unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/component

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
