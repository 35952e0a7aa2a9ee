# Each target sets itself up from nothing: a virtual environment in .venv with pinned dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements-test.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test demo bench host-overhead report lint clean gpu-check gpu-check-cpu gpu-image-check floor-check ci \
	stochastic-rounding state-bits

$(STAMP): requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: $(STAMP)  ## the whole suite on the CPU: kernels through the Triton interpreter and a g++ build of the .cu
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -W ignore::RuntimeWarning
	smoke=$$(mktemp -d) && trap 'rm -rf "$$smoke"' EXIT && \
	$(BIN)/python -m perf.bench --smoke --summary --out "$$smoke" > /dev/null && \
	$(BIN)/python -m perf.host_overhead --smoke --out "$$smoke/host_overhead" > /dev/null && \
	$(BIN)/python -m perf.training_stack --smoke --out "$$smoke/training_stack" > /dev/null && \
	$(BIN)/python -m perf.stochastic_rounding --smoke --out "$$smoke/stochastic_rounding" > /dev/null && \
	$(BIN)/python -m perf.state_bits --smoke --out "$$smoke/state_bits" > /dev/null
	$(BIN)/python -m perf.gpu_check --dry-run

demo: $(STAMP)  ## the main job on the best device: train, self-check every backend, quick benchmark + plot
	$(BIN)/python -m perf.demo

bench: $(STAMP)  ## the full benchmark suite (GPU: every workload; CPU: small sizes, labelled CPU)
	$(BIN)/python -m perf.bench

host-overhead: $(STAMP)  ## host time per step with the launch stubbed (perf/results/host_overhead_cpu.*)
	$(BIN)/python -m perf.host_overhead

# The GPU image's Triton, for the static report beside the pinned one (installed apart: build/triton-<version>)
TRITON_GPU_IMAGE ?= 3.6.0
TRITON_IMAGE_DIR := build/triton-$(TRITON_GPU_IMAGE)

$(TRITON_IMAGE_DIR)/.installed:
	$(BIN)/python -m pip install --quiet --no-deps --target $(TRITON_IMAGE_DIR) triton==$(TRITON_GPU_IMAGE)
	touch $@

stochastic-rounding: $(STAMP)  ## bf16 training with/without stochastic rounding vs fp32 (perf/results/stochastic_rounding_cpu.*)
	$(BIN)/python -m perf.stochastic_rounding

state-bits: $(STAMP)  ## 8-bit vs 32-bit state: bytes, digits MLP training, one-step error (perf/results/state_bits_cpu.*)
	$(BIN)/python -m perf.state_bits

report: $(STAMP) $(TRITON_IMAGE_DIR)/.installed  ## static kernel report (no GPU needed): pinned Triton + the GPU image's
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON_IMAGE_DIR) $(BIN)/python -m tools.kernel_report \
		--backend triton --json build/static_report_triton_$(TRITON_GPU_IMAGE).json > /dev/null || true
	env -u TRITON_INTERPRET $(BIN)/python -m tools.kernel_report \
		--merge build/static_report_triton_$(TRITON_GPU_IMAGE).json \
		--markdown perf/results/static_report.md --json perf/results/static_report.json

gpu-check:  ## on a lent GPU machine: its own python3 and packages (no venv, no downloads); results in $$OUT
	python3 -m perf.gpu_check

gpu-check-cpu: $(STAMP)  ## the same script rehearsed on the CPU (interpreter, g++ build of the .cu, tiny sizes)
	$(BIN)/python -m perf.gpu_check --dry-run

gpu-image-check:  ## the GPU machine's versions (Python 3.12, torch 2.11, triton 3.6, ...) on the CPU: rehearsal + kernel tests
	bash tools/gpu_image_check.sh

floor-check:  ## the oldest supported torch and triton (requirements-floor.txt): the optimizer, every CPU backend, the op
	bash tools/floor_check.sh

ci: test gpu-image-check floor-check  ## what CI runs (.ci/run)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info
