# The two commands a new user needs:
#   make demo   - set up .venv and run the main job on the embedded digits dataset
#   make test   - set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cvdd-installed
OUT ?= runs/demo

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/cvdd distill --out $(OUT)

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "not gpu"

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup
	$(BIN)/python bench/bench_squeeze.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
