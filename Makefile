# The two commands a newcomer needs: `make run` and `make test`. Everything else follows from them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-tools test-native lint bench chaos stack-up stack-down clean

NATIVE := $(VENV)/.native
# cargo from a rustup install is found in ~/.cargo/bin even when that is not on PATH.
export PATH := $(PATH):$(HOME)/.cargo/bin

$(BIN)/pip:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml clients/python/pyproject.toml $(NATIVE)
	$(BIN)/pip install --quiet -e clients/python -e ".[test]"
	touch $(STAMP)

# The compiled hot path (native/, a Rust extension built by maturin), with Debian's cargo when no
# Rust toolchain is found. `make` needs it; a worker installed without it (by pip alone) still runs,
# on the Python core, and says so at its start.
$(NATIVE): native/Cargo.toml native/Cargo.lock native/pyproject.toml $(wildcard native/src/*.rs) | $(BIN)/pip
	@command -v cargo >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y cargo >/dev/null; }
	@command -v cargo >/dev/null || { echo "native/ needs a Rust toolchain: the Debian package cargo, or rustup"; exit 1; }
	@# Crates come over the registry's sparse protocol, switched on for cargo alone (SPARSE_CRATES:
	@# Debian 12's cargo is 1.65).
	$(SPARSE_CRATES); $(BIN)/pip install --quiet ./native
	touch $(NATIVE)

# cargo before 1.68 knows the registry's sparse protocol only as an unstable option.
SPARSE_CRATES = minor=$$(cargo -V | sed -E 's/^cargo 1\.([0-9]+).*/\1/'); \
	if [ "$$minor" -lt 68 ]; then export __CARGO_TEST_CHANNEL_OVERRIDE_DO_NOT_USE_THIS=nightly CARGO_UNSTABLE_SPARSE_REGISTRY=true; fi; \
	export CARGO_REGISTRIES_CRATES_IO_PROTOCOL=sparse

# native/'s own tests, by cargo (the CRC's two ways: the processor's instruction and the table).
test-native: $(NATIVE)
	cd native && $(SPARSE_CRATES); cargo test --release --quiet

## run: start the local Kafka and PostgreSQL (installing what is missing), migrate, create the
## topics, and run the worker in the foreground. Ctrl-C stops the worker.
run: $(STAMP)
	$(BIN)/floorguard run

## test: the whole suite against a real Kafka and a real PostgreSQL (started if not named by
## FLOORGUARD_KAFKA_BOOTSTRAP and FLOORGUARD_DATABASE_URL).
test: $(STAMP) lint test-tools test-native
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
	rm -rf $(VENV) .pytest_cache .hypothesis native/target
