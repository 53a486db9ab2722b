# Two entry points: `make run` renders an image, `make test` runs the test suite.
# Each creates the virtual environment it needs in .venv: `run` installs what rendering needs, `test` adds the test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a red circle on the left
ARGS ?=

.PHONY: run test bench demo-model eval-demo clean

$(BIN)/sd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch; a bare `torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/test-tools: $(BIN)/sd
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/sd
	$(BIN)/sd generate --prompt "$(PROMPT)" $(ARGS)

test: $(VENV)/test-tools
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(VENV)/test-tools
	$(BIN)/python benchmarks/benchmark.py $(ARGS)

# Trains the built-in demo model from scratch (about 42 minutes on 2 CPU cores of an Intel Xeon, Ice Lake class) into data/sd-demo.safetensors;
# a stopped run resumes from build/demo-training/.
demo-model: $(BIN)/sd
	$(BIN)/python -m sd.training.train $(ARGS)

# Scores the demo model's images by rules and writes images/demo-grid.png.
eval-demo: $(BIN)/sd
	$(BIN)/python -m sd.training.evaluate $(ARGS)

clean:
	rm -rf $(VENV)
