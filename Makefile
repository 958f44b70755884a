# The two commands a newcomer needs: `make run` and `make test`. Everything else follows from them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-tools lint bench chaos stack-up stack-down clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e ".[test]"
	touch $(STAMP)

## run: start the local Kafka and PostgreSQL (installing what is missing), migrate, create the
## topics, and run the worker in the foreground. Ctrl-C stops the worker.
run: $(STAMP)
	$(BIN)/floorguard run

## test: the whole suite against a real Kafka and a real PostgreSQL (started if not named by
## FLOORGUARD_KAFKA_BOOTSTRAP and FLOORGUARD_DATABASE_URL).
test: $(STAMP) lint test-tools
	$(BIN)/python -m pytest

# The clock-skew test runs a worker under faketime (Debian package faketime).
test-tools:
	@command -v faketime >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y faketime >/dev/null; }
	@command -v faketime >/dev/null || { echo "the clock-skew test needs the Debian package faketime"; exit 1; }

## bench: the standard benchmark suite (about 5 minutes); rewrites docs/BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python loadtest/bench.py

## chaos: faults during a real load (about 8 minutes): workers killed (SIGKILL, between commit and
## publish too), workers joining, leaving and frozen past their session, Kafka and PostgreSQL stopped
## and started; then the audit and every guarantee. Writes docs/chaos/summary.json.
chaos: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python loadtest/chaos.py --seconds 180 --out docs/chaos/summary.json

## lint: the architecture's import rules (pyproject.toml, [tool.importlinter]).
lint: $(STAMP)
	$(BIN)/lint-imports

stack-up: $(STAMP)
	$(BIN)/floorguard stack up

stack-down: $(STAMP)
	$(BIN)/floorguard stack down

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
