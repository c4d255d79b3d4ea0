# fusedrl: `make demo` runs the main job, `make test` the test suite. Both create ./.venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test lint sanitize bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp)
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
	$(BIN)/fusedrl demo --out runs/demo

lint: $(STAMP)
	@# ruff's formatter and pyflakes-level checks, configured in pyproject.toml ([tool.ruff]).
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: $(STAMP)
	@# The pytest script, not `python -m pytest`: the latter puts the repo root on sys.path, where kernels/
	@# and engine/ would shadow-import as top-level packages (transformers probes for `kernels`).
	$(BIN)/pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS) tests

# The rollout extension built with ASan + UBSan in build/sanitize (the in-place build is left alone), and
# its tests plus a hypothesis fuzz of every function it exposes run against that build: a report fails.
sanitize: $(STAMP)
	VENV=$(VENV) bash tests/sanitizer/run.sh

bench: $(STAMP)
	$(BIN)/python bench/bench_logprobs.py
	$(BIN)/python bench/bench_ppo_loss.py
	$(BIN)/python bench/bench_packing.py

clean:
	rm -rf $(VENV) build *.egg-info runs
