"""Every way a user, a benchmark or CI starts fusedrl works from the repository root, where the current directory
(or a script's own path insertion) puts the root on sys.path. transformers imports Hugging Face's `kernels` package
while it builds a model config; the repository's kernels/ folder must never win that import (it is no package:
fusedrl/__init__.py says why). Each launch mode runs in a subprocess started in the root and is checked on what it
produced, not only on its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HF_KERNELS = subprocess.run(
    [sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"],
    cwd=tempfile.gettempdir(),
    capture_output=True,
    text=True,
).stdout.strip()
needs_hf_kernels = pytest.mark.skipif(
    not HF_KERNELS, reason="Hugging Face's `kernels` package is not installed (transformers >= 5.25 brings it)"
)
# The smallest real training run: one GRPO step of the random tiny-llama on the shipped prompts.
TRAIN = ["train", "--prompts", "examples/letters.jsonl", "--reward-fn", "count_token", "--reward-kwargs",
         '{"token": "a"}', "--advantage-estimator", "grpo", "--prompts-per-step", "2", "--samples-per-prompt", "2",
         "--max-new-tokens", "4", "--total-steps", "1", "--no-progress"]  # fmt: skip


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    return env


def _run(cmd: list[str], *, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} (in {ROOT}) failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _check_train_output(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and "rollout/reward_mean" in rows[0]
    assert (out / "policy" / "config.json").is_file()


@needs_hf_kernels
def test_import_kernels_from_the_root_is_hugging_faces():
    code = (
        "import json, kernels, importlib.util as u\n"
        "e = u.find_spec('engine')\n"
        "print(json.dumps([kernels.__file__, hasattr(kernels, 'get_kernel'), e.origin if e else None]))"
    )
    kernels_file, has_get_kernel, engine_origin = json.loads(_run([sys.executable, "-c", code]).stdout)
    assert kernels_file == HF_KERNELS and not kernels_file.startswith(str(ROOT / "kernels")), kernels_file
    assert has_get_kernel
    # engine/ is at most an empty namespace portion from the root: no __init__ of ours runs as `engine`.
    assert engine_origin is None


@needs_hf_kernels
@pytest.mark.slow
@pytest.mark.parametrize("how", ["entry-point", "python-m"])
def test_train_from_the_root(tmp_path, how):
    launcher = [str(BIN / "fusedrl")] if how == "entry-point" else [sys.executable, "-m", "fusedrl.engine.cli"]
    _run([*launcher, *TRAIN, "--output-dir", str(tmp_path / "run")])
    _check_train_output(tmp_path / "run")


@needs_hf_kernels
@pytest.mark.slow
def test_torchrun_from_the_root(tmp_path):
    torchrun = BIN / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node=2", "-m", "fusedrl.engine.cli", *TRAIN,
           "--output-dir", str(tmp_path / "run")]  # fmt: skip
    _run(cmd)
    _check_train_output(tmp_path / "run")


BENCH_SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in ("__init__.py", "common.py"))
# A bench script started as `python bench/x.py` has bench/ on sys.path and may insert the root itself. Full runs are
# minutes and write bench/results/; this runs each script's start-up (its imports and path insertions, then argparse
# on --help), then, in the same interpreter and sys.path, what transformers does when it builds a model: import
# `kernels` and build one. tests/test_gpu_suite.py, test_bench_policy_variants.py and others run some scripts whole.
BENCH_PROBE = r"""
import runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), f"{script} --help exited with {e.code}"
import kernels
from fusedrl.engine.models import build_causal_lm
build_causal_lm("tiny-llama", vocab_size=64)
print("KERNELS", kernels.__file__)
"""


@needs_hf_kernels
@pytest.mark.slow
def test_every_bench_script_starts_from_the_root():
    assert "bench_e2e_grpo.py" in BENCH_SCRIPTS and "readme_numbers.py" in BENCH_SCRIPTS
    for name in BENCH_SCRIPTS:
        r = _run([sys.executable, "-c", BENCH_PROBE, f"bench/{name}"])
        assert f"KERNELS {HF_KERNELS}" in r.stdout, (name, r.stdout[-500:])


def _make(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`make` in the root with this interpreter's environment as the venv (its set-up stamp never remade here)."""
    venv = Path(sys.prefix)
    return _run(["make", "--no-print-directory", "-o", str(venv / ".installed"), f"VENV={venv}", *args],
                timeout=timeout)  # fmt: skip


@needs_hf_kernels
@pytest.mark.slow
def test_make_demo_and_make_test_from_the_root(tmp_path):
    if not (Path(sys.prefix) / "bin" / "fusedrl").exists():
        pytest.skip("the interpreter running the tests is not a venv with fusedrl installed (make's layout)")
    out = tmp_path / "demo"
    small = "--quick --sft-steps 10 --rm-pairs 64 --rm-eval-pairs 32 --rm-epochs 1 --ppo-steps 2 --eval-prompts 16"
    _make("demo", f"DEMO_ARGS={small} --out {out} --no-progress")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppo_steps"] == 2 and 0.0 <= summary["rm_accuracy"] <= 1.0
    r = _make("test", "TESTS=tests/test_packaging.py", "PYTEST_ARGS=-p no:cacheprovider")
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-1000:]
