# Two commands for a fresh machine with Python 3.11 and make: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench dev install browser clean

$(STAMP): requirements.lock requirements-bootstrap.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements-bootstrap.lock
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

## Simulate a demo clinic network and build the warehouse and reports under data/.
demo: $(STAMP)
	$(BIN)/alliance demo

## Headless Chromium for the report tests (Debian package; needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

## Run the whole test suite (installs what it needs first).
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## Benchmark against same-run baselines; EVENTS=1000000 by default.
bench: $(STAMP)
	$(BIN)/alliance bench --events $${EVENTS:-1000000}

## The Dagster UI (dg dev on the persistent instance under data/dagster).
dev: $(STAMP)
	$(BIN)/alliance dev

clean:
	rm -rf $(VENV) data
