#!/usr/bin/env bash
# The one prepared GPU run (issue 18): build in place, the kernel tests compiled on CUDA (CUDA-graph capture and
# no-recompile included), the static table with the box's Triton, the GPU suite and the launch sweep, within
# about 8 minutes of wall time on an H100/H200 (no network needed). Every figure and log lands in one folder.
#
#   bench/gpu_run.sh                 # -> $OUT when set, else bench/results/gpu-run-<date>/
#   bench/gpu_run.sh --dry-run       # CPU: prints every step, runs the CPU-safe ones at tiny sizes
#
# Each step has its own time limit, and no step may run past the global budget (GPU_RUN_BUDGET_S, default 480 s):
# a step that fails or times out is logged in steps.tsv and the run goes on, so a short lease always comes back
# with whatever was measured. Order = value per second: the cheap correctness checks first, then the numbers.
set -u
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-bench/results/gpu-run-$(date +%F)}
mkdir -p "$OUT"
BUDGET=${GPU_RUN_BUDGET_S:-480}
T0=$(date +%s)
# -o addopts: the project's addopts name pytest-benchmark's flag, which a bare GPU box may lack.
PYTEST_BIN=$(dirname "$PY")/pytest
[ -x "$PYTEST_BIN" ] || PYTEST_BIN=pytest
PYTEST="$PYTEST_BIN -q -p no:cacheprovider -o addopts=-ra"
KERNEL_TESTS="tests/test_logprobs.py tests/test_ppo_loss.py tests/test_value_loss.py tests/test_gae.py tests/test_linear_ppo_loss.py"
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
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - s))" "$*" >> "$OUT/steps.tsv"
  echo "   rc=$rc in $(($(date +%s) - s)) s; tail of $OUT/$name.log:"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

say() {  # a step only the GPU run executes: printed in the dry run
  if [ "$DRY" = 1 ]; then echo "[dry-run] would run: $*"; printf '%s\tdry-run\t0\t%s\n' "$1" "${*:2}" >> "$OUT/steps.tsv"; return 1; fi
  return 0
}

step env 30 bash -c "nvidia-smi || true; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available()); print(\"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'; git rev-parse --short HEAD"

if say build "$PY -m pip install --no-build-isolation --no-deps -e ."; then
  step build 150 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# CPU-only (AOT compiles with the box's Triton): in the background, while the GPU runs the tests.
if say static "$PY bench/gpu_static.py --out $OUT"; then
  ( timeout 180 "$PY" bench/gpu_static.py --out "$OUT" > "$OUT/static.log" 2>&1; echo "static rc=$?" >> "$OUT/static.log" ) &
  STATIC_PID=$!
fi

# The graph-capture and no-recompile tests first (seconds), then every kernel test file on CUDA.
if [ "$DRY" = 1 ]; then
  step tests-collect 120 $PYTEST --collect-only $KERNEL_TESTS
  n=$(grep -cE "graph|recompile" "$OUT/tests-collect.log")
  echo "   graph / no-recompile tests selected: $n"
  [ "$n" -ge 2 ] || { echo "the graph / no-recompile selection matches $n tests, expected >= 2"; exit 1; }
else
  step tests-graph 90 $PYTEST -k "graph or recompile" --junitxml="$OUT/tests-graph.xml" $KERNEL_TESTS
  step tests-kernels 150 $PYTEST --junitxml="$OUT/tests-kernels.xml" $KERNEL_TESTS
fi

if [ "$DRY" = 1 ]; then
  step suite 120 "$PY" bench/gpu_suite.py --quick --device cpu --cases gae --out "$OUT"
  step sweep 120 "$PY" bench/gpu_sweep.py --quick --device cpu --out "$OUT"
else
  step suite 200 "$PY" bench/gpu_suite.py --cases logprobs,ppo_loss,linear_ppo_loss,gae --out "$OUT"
  step sweep 100 "$PY" bench/gpu_sweep.py --budget-s 75 --out "$OUT"
  step suite-engine 120 "$PY" bench/gpu_suite.py --cases ppo_step --out "$OUT"  # merged into the same day's file
fi

if [ -n "${STATIC_PID:-}" ]; then wait "$STATIC_PID"; tail -n 1 "$OUT/static.log"; fi
echo "done in $(($(date +%s) - T0)) s; steps:"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
ls "$OUT"
