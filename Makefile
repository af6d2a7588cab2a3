# The two commands a new user needs:
#   make demo   - set up .venv and run the main job on the embedded digits dataset
#   make test   - set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cvdd-installed
OUT ?= runs/demo

.PHONY: setup demo test test-all lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/cvdd distill --out $(OUT)

# In CI (CI=true, as root with apt) install Debian's Chromium for the report's browser test; elsewhere the
# test is skipped when no Chromium is found.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$CI" != "true" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || apt-get install -y -qq chromium >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "chromium could not be installed: the report's browser test will be skipped"

test: setup browser
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q --durations=12

test-all: setup
	$(BIN)/python -m pytest -q -m "not gpu"

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup
	$(BIN)/python bench/bench_squeeze.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
