# Two entry points: `make run` renders an image, `make test` runs the test suite.
# Each creates the virtual environment it needs in .venv: `run` installs what rendering needs, `test` adds the test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a red circle on the left
ARGS ?=

.PHONY: run test bench bench-peers bench-cpu peer-envs demo-model eval-demo clean

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

# The peers the benchmark compares sd with, each in its own environment (never a dependency of sd). A peer whose
# install fails leaves no environment, only its log, and the benchmark reports it as not installed.
OPENVINO := openvino==2026.4.1
SDCPP := stable-diffusion-cpp-python==0.4.7

.venv-openvino/installed:
	rm -rf .venv-openvino && mkdir -p build/peers
	# torch and diffusers to build the same U-Net and VAE that openvino.convert_model converts
	( $(PYTHON) -m venv .venv-openvino && .venv-openvino/bin/pip install torch==2.13.0 diffusers==0.42.1 safetensors pyyaml $(OPENVINO) \
	  && touch $@ ) > build/peers/openvino-install.log 2>&1 || (rm -rf .venv-openvino; echo 'OpenVINO not installed:'; tail -n 3 build/peers/openvino-install.log)

# compiles stable-diffusion.cpp for this CPU (ggml's native build): minutes
.venv-sdcpp/installed:
	rm -rf .venv-sdcpp && mkdir -p build/peers
	( $(PYTHON) -m venv .venv-sdcpp && CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) .venv-sdcpp/bin/pip install -v $(SDCPP) \
	  && touch $@ ) > build/peers/sdcpp-install.log 2>&1 || (rm -rf .venv-sdcpp; echo 'stable-diffusion.cpp not installed:'; tail -n 3 build/peers/sdcpp-install.log)

peer-envs: .venv-openvino/installed .venv-sdcpp/installed

bench-peers: $(VENV)/test-tools peer-envs
	$(BIN)/python benchmarks/benchmark.py --only peers --dtypes bf16 $(ARGS)

# What issue 21 asks of a CPU not measured before, with nothing else running (23 minutes on a 2-core Zen 5): the peers in
# bf16 and fp32, the load's breakdown, torch.compile, each into benchmarks/results-<commit>-<part>-<CPU>.json with the
# kernel choices timed afresh for it (their seconds in each file). A part that fails is named and the next one runs.
BENCH_CPU_PARTS := "peers-bf16:--only peers --dtypes bf16" "peers-fp32:--only peers --dtypes fp32 --sdcpp-wtypes" \
	"load:--only load --dtypes bf16 fp32 --repeat 2" "compile:--only compile --dtypes bf16 --sizes 512"
bench-cpu: $(VENV)/test-tools peer-envs
	@cpu=$$($(BIN)/python -c 'import re; from sd.kernels import cpu_model; print(re.sub("[^a-z0-9]+", "-", cpu_model().lower()).strip("-"))'); \
	commit=$$(git rev-parse --short HEAD); failed=""; \
	export SD_KERNELS_CACHE=$(CURDIR)/build/bench-cpu/kernels-$$cpu.json; mkdir -p build/bench-cpu; rm -f $$SD_KERNELS_CACHE; \
	for part in $(BENCH_CPU_PARTS); do \
	  output=benchmarks/results-$$commit-$${part%%:*}-$$cpu.json; echo "== $${part%%:*} -> $$output"; \
	  $(BIN)/python benchmarks/benchmark.py $${part#*:} --output $$output || failed="$$failed $${part%%:*}"; \
	done; \
	if [ -n "$$failed" ]; then echo "bench-cpu: failed:$$failed"; exit 1; fi

# Trains the built-in demo model from scratch (39 minutes on 2 cores of an AMD EPYC Zen 4) into data/sd-demo.safetensors;
# a stopped run resumes from build/demo-training/.
demo-model: $(BIN)/sd
	$(BIN)/python -m sd.training.train $(ARGS)

# Scores the demo model's images by rules and writes images/demo-grid.png.
eval-demo: $(BIN)/sd
	$(BIN)/python -m sd.training.evaluate $(ARGS)

clean:
	rm -rf $(VENV)
