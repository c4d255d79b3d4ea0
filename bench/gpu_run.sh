#!/usr/bin/env bash
# The one prepared GPU run: build in place, the kernel tests compiled on CUDA, the static table with the box's Triton,
# the GPU suite, the launch sweep and an engine step (no network needed). Every figure and log lands in one folder.
#
#   bench/gpu_run.sh                 # -> $OUT when set, else bench/results/gpu-run-<date>/
#   bench/gpu_run.sh --dry-run       # CPU: prints every step, runs CPU-safe versions of them at tiny sizes (CI does)
#
# Order = value: the core first, within 5 minutes including the build (the CUDA kernel tests: graph capture, no
# recompile, every op on CUDA tensors; then log-probs, the PPO loss and the fused linear loss at the headline shapes
# against eager), then the sweep and the end-to-end step, then the torch.compile baselines (compile time is long and
# worth least) and the whole kernel test files. Each step has its own time limit and none may run past the global
# budget (GPU_RUN_BUDGET_S, default 540 s); a step that fails or times out is logged in steps.tsv and the run goes on.
# Nothing waits for the end to be written: the suite rewrites its JSON after every case, and pytest prints each
# test's outcome as it finishes (-v, unbuffered) and, stopped by SIGINT at its limit, still writes its junit XML.
set -u
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-bench/results/gpu-run-$(date +%F)}
mkdir -p "$OUT"
BUDGET=${GPU_RUN_BUDGET_S:-540}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
# -o addopts: the project's addopts name pytest-benchmark's flag, which a bare GPU box may lack.
PYTEST="$PY -m pytest -v -p no:cacheprovider -o addopts=-ra"
KERNEL_TESTS="tests/test_logprobs.py tests/test_ppo_loss.py tests/test_linear_ppo_loss.py tests/test_value_loss.py tests/test_gae.py tests/test_kernel_inputs.py"
# The tests that only a GPU can run: every op on CUDA tensors (the device fixture's cuda id), CUDA-graph capture, no
# recompile for new runtime scalars.
CUDA_SELECT="cuda or graph or recompile"
HEADLINE="logprobs,ppo_loss,linear_ppo_loss"
printf 'step\trc\tseconds\tcommand\n' > "$OUT/steps.tsv"

step() {  # step NAME LIMIT_S CMD...: run with a timeout (capped by what is left of the budget), log, go on
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" = 1 ]; then echo "[dry-run] $name (limit ${limit}s): $*"; fi
  if [ "$limit" -le 5 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$*" >> "$OUT/steps.tsv"
    echo "== $name: skipped, budget spent"
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local s=$(date +%s)
  # SIGINT first: pytest and the suite stop as after Ctrl-C and keep what they wrote; KILL 15 s later.
  timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - s))" "$*" >> "$OUT/steps.tsv"
  echo "   rc=$rc in $(($(date +%s) - s)) s; tail of $OUT/$name.log:"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

say() {  # a step only the GPU run executes: printed (and listed in steps.tsv) in the dry run
  if [ "$DRY" = 1 ]; then echo "[dry-run] would run: $*"; printf '%s\tdry-run\t0\t%s\n' "$1" "${*:2}" >> "$OUT/steps.tsv"; return 1; fi
  return 0
}

# ---------------------------------------------------------------- core: within 300 s, build included
step env 20 bash -c "nvidia-smi || true; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available()); print(\"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'; git rev-parse --short HEAD"

if say build "$PY -m pip install --no-build-isolation --no-deps -e ."; then
  step build 100 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# CPU-only (AOT compiles with the box's Triton): in the background, while the GPU runs the tests.
if say static "$PY bench/gpu_static.py --out $OUT"; then
  ( timeout 240 "$PY" bench/gpu_static.py --out "$OUT" > "$OUT/static.log" 2>&1; echo "static rc=$?" >> "$OUT/static.log" ) &
  STATIC_PID=$!
fi

if [ "$DRY" = 1 ]; then
  step tests-cuda 120 $PYTEST --collect-only -q -k "$CUDA_SELECT" $KERNEL_TESTS
  n=$(grep -cE "graph|recompile" "$OUT/tests-cuda.log")
  echo "   graph / no-recompile tests selected: $n"
  [ "$n" -ge 2 ] || { echo "the graph / no-recompile selection matches $n tests, expected >= 2"; exit 1; }
else
  step tests-cuda 75 $PYTEST -k "$CUDA_SELECT" --junitxml="$OUT/tests-cuda.xml" $KERNEL_TESTS
fi

if [ "$DRY" = 1 ]; then
  step suite-core 150 "$PY" bench/gpu_suite.py --quick --device cpu --cases "$HEADLINE" --compile skip --out "$OUT"
else
  step suite-core 100 "$PY" bench/gpu_suite.py --cases "$HEADLINE" --compile skip --out "$OUT"
fi

# ---------------------------------------------------------------- then by value, while the budget lasts
if [ "$DRY" = 1 ]; then
  step sweep 120 "$PY" bench/gpu_sweep.py --quick --device cpu --out "$OUT"
  step suite-gae-step 120 "$PY" bench/gpu_suite.py --quick --device cpu --cases gae --out "$OUT"
else
  step sweep 90 "$PY" bench/gpu_sweep.py --budget-s 70 --out "$OUT"
  step suite-gae-step 100 "$PY" bench/gpu_suite.py --cases gae,ppo_step --out "$OUT"  # merged into the same file
fi
if say suite-compile "$PY bench/gpu_suite.py --cases $HEADLINE --compile only --out $OUT"; then
  step suite-compile 120 "$PY" bench/gpu_suite.py --cases "$HEADLINE" --compile only --out "$OUT"
fi
# The vllm backend's sleep mode (CUDA only; skipped, saying so, where this Python has no vllm).
if say vllm-sleep "$PYTEST -s --junitxml=$OUT/vllm-sleep.xml tests/test_vllm.py -k sleep_mode_cuda"; then
  step vllm-sleep 120 $PYTEST -s --junitxml="$OUT/vllm-sleep.xml" tests/test_vllm.py -k sleep_mode_cuda
fi
if say tests-kernels "$PYTEST --junitxml=$OUT/tests-kernels.xml $KERNEL_TESTS"; then
  step tests-kernels 150 $PYTEST --junitxml="$OUT/tests-kernels.xml" $KERNEL_TESTS
fi

if [ -n "${STATIC_PID:-}" ]; then wait "$STATIC_PID"; tail -n 1 "$OUT/static.log"; fi
echo "done in $(($(date +%s) - T0)) s; steps:"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
ls "$OUT"
