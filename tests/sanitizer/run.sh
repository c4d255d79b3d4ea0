#!/usr/bin/env bash
# The C++-facing tests and the property-based fuzz of fusedrl.engine._rollout, and the tests of
# fusedrl.kernels._cpu_rows, against ASan + UBSan builds of the extensions (tests/sanitizer/build.py; the normal
# in-place builds are left alone).
#   bash tests/sanitizer/run.sh [pytest args]     # VENV (default .venv) names the virtual environment
# Any sanitizer report aborts the test process, and pytest (or the crashed xdist worker) fails the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${VENV:-.venv}/bin"
OUT="${SANITIZE_DIR:-build/sanitize}"
"$BIN/python" -c "import pybind11" 2>/dev/null || "$BIN/python" -m pip install -q "pybind11>=2.12"
"$BIN/python" tests/sanitizer/build.py "$OUT" >/dev/null
export FUSEDRL_SANITIZED_EXT="$PWD/$(ls "$OUT"/_rollout*.so | head -n 1)"
# The interpreter is not instrumented, so the ASan runtime must be loaded first, and libstdc++ with it:
# otherwise ASan's __cxa_throw interceptor finds no real __cxa_throw (python does not link libstdc++) and
# the first C++ exception aborts. CPython leaks by design (interned objects, module state): leak checking
# would only report those.
export LD_PRELOAD="$(${CXX:-g++} -print-file-name=libasan.so) $(${CXX:-g++} -print-file-name=libstdc++.so)"
# Reports go to files as well as stderr: pytest-xdist does not show a crashed worker's stderr, so they are
# printed below.
rm -f "$OUT"/report.*
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:log_path=$PWD/$OUT/report"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$PWD/$OUT/report"
export PYTHONPATH="$PWD/tests/sanitizer${PYTHONPATH:+:$PYTHONPATH}"
export FUSEDRL_FUZZ_EXAMPLES="${FUSEDRL_FUZZ_EXAMPLES:-300}"
status=0
"$BIN/pytest" -p plugin -q -n "${SANITIZE_JOBS:-2}" -p no:cacheprovider tests/test_packing.py tests/test_rollout_fuzz.py tests/test_cpu_rows.py "$@" || status=$?
if compgen -G "$OUT/report.*" >/dev/null; then
    echo "sanitizer reports:" >&2
    cat "$OUT"/report.* >&2
    status=1
fi
exit "$status"
