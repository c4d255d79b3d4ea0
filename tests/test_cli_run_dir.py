"""`fusedrl train` never mixes two runs in one output directory: a fresh run into an existing run is refused
(nothing touched), `--resume` with nothing to resume starts the run, `--overwrite` removes only the run's files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _train(tmp_path, out, *extra):
    cmd = [
        sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(tmp_path / "p.txt"),
        "--reward-fn", "count_token", "--total-steps", "1", "--save-every", "1", "--prompts-per-step", "2",
        "--samples-per-prompt", "2", "--max-new-tokens", "2", "--threads", "1", "--no-progress",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, cwd=tmp_path, text=True, env=env, timeout=180, check=False)


@pytest.mark.slow
def test_cli_refuses_to_mix_runs_and_a_failed_resume_writes_nothing(tmp_path):
    (tmp_path / "p.txt").write_text("ab\ncd\n")
    out = tmp_path / "o"
    r = _train(tmp_path, out, "--resume")  # nothing to resume: starts from step 0
    assert r.returncode == 0 and "nothing to resume" in r.stderr and (out / "ckpt-1").is_dir(), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = _train(tmp_path, out, "--resume")  # the same command again: continues (here: nothing left to do)
    assert r.returncode == 0 and "nothing to resume" not in r.stderr, r.stderr[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = _train(tmp_path, out)
    assert r.returncode != 0 and "already holds a run" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    r = _train(tmp_path, out, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine" and (out / "ckpt-1").is_dir()
