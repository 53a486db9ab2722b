# Two entry points: `make run PROMPT="..."` renders an image, `make test` runs the test suite.
# Each creates the virtual environment it needs in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a photograph of an astronaut riding a horse
ARGS ?=

.PHONY: run test bench clean

$(BIN)/sd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch; a bare `torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/sd
	$(BIN)/sd generate --prompt "$(PROMPT)" $(ARGS)

test: $(BIN)/sd
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(BIN)/sd
	$(BIN)/python benchmarks/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV)
