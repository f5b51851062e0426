# notice-relay — the commands a developer (and CI) runs.
#   make demo   set everything up, run the relay end to end on the embedded defaults
#   make test   set everything up, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test check bench bench-allocators bench-tables bench-digests bench-withdrawals bench-badinput bench-store-cache faults soak kafka-start kafka-stop pg-start pg-stop clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,api,postgres,dev]'
	touch $@

setup: $(VENV)/.installed
	bash scripts/setup-system.sh
	$(BIN)/python scripts/localkafka.py install
	$(BIN)/python scripts/localpg.py install

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/python -m pytest

check: setup
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/mypy

faults: setup
	$(BIN)/python scripts/faults.py

soak: setup
	$(BIN)/python scripts/soak.py

kafka-start: setup
	$(BIN)/python scripts/localkafka.py start

kafka-stop:
	$(BIN)/python scripts/localkafka.py stop

pg-start: setup
	$(BIN)/python scripts/localpg.py start

pg-stop:
	$(BIN)/python scripts/localpg.py stop

bench: setup
	$(BIN)/python bench/run.py

bench-allocators: setup
	$(BIN)/python bench/run.py --phases baseline,allocators,objects --out bench/results/allocators.json

bench-tables: setup
	$(BIN)/python bench/tables.py

bench-digests: setup
	$(BIN)/python bench/digests.py

bench-withdrawals: setup
	$(BIN)/python bench/withdrawals.py

bench-badinput: setup
	$(BIN)/python bench/badinput.py

bench-store-cache: setup
	$(BIN)/python bench/store_cache.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
