# Two commands for a fresh machine (see README):
#   make up    set up a virtualenv and start the whole stack (embedded NATS, built-in model, :8000)
#   make test  set up a virtualenv with the test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch: pip takes torch==2.13.0+cpu where a local wheel is configured, else PyPI's build.
EXTRAS ?= torch,test

.PHONY: up test install lint bench-overhead clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'

up: install
	$(BIN)/baton up

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench-overhead: install
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
