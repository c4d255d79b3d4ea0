"""Checkpoints: atomic save, the latest pointer, crash safety, RNG round trips, and a CLI run that is
SIGKILLed after a checkpoint and resumed reaching the same metrics as an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from fusedrl.engine import checkpoint as ckpt
from fusedrl.engine.metrics import MetricsLogger, read_metrics
from helpers import assert_close

REPO = Path(__file__).resolve().parents[1]


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g)
    return {"step": seed, "weights": {"w": w, "tied": w}, "opt": {"exp_avg": torch.randn(7, generator=g)},
            "config": {"lr": 1e-3, "name": "x", "clip": None}}  # fmt: skip


def test_save_load_roundtrip_and_latest(tmp_path):
    s = _state(3)
    path = ckpt.save_checkpoint(tmp_path, 3, s)
    assert path == tmp_path / "ckpt-3" and (tmp_path / "latest").read_text() == "ckpt-3"
    assert ckpt.find_latest(tmp_path) == path
    back = ckpt.load_checkpoint(path)
    assert_close(back["weights"]["w"], s["weights"]["w"], atol=0, name="weights")
    assert_close(back["opt"]["exp_avg"], s["opt"]["exp_avg"], atol=0, name="exp_avg")
    assert back["config"] == s["config"] and back["step"] == 3
    # Tied tensors come back as one storage (a tied lm_head stays tied after load).
    assert back["weights"]["w"].data_ptr() == back["weights"]["tied"].data_ptr()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, _state(2))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")  # bytes on disk, then the "crash"
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, _state(4))
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "ckpt-4").exists()
    assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt-2"
    assert ckpt.load_checkpoint(ckpt.find_latest(tmp_path))["step"] == 2
    # The next save sweeps the leftover temporary directory.
    ckpt.save_checkpoint(tmp_path, 6, _state(6))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt-6"


def test_crash_before_pointer_update_and_stale_pointer(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _state(1))
    real_replace = os.replace

    def dying_replace(src, dst):
        raise KeyboardInterrupt("killed before the pointer moved")

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 5, _state(5))
    monkeypatch.setattr(os, "replace", real_replace)
    # The pointer still names a complete checkpoint: that one is the latest.
    assert (tmp_path / "latest").read_text() == "ckpt-1"
    assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt-1"
    # A pointer to a checkpoint that is gone falls back to the newest complete one.
    (tmp_path / "latest").write_text("ckpt-99")
    assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt-5"
    # A directory that merely looks like a checkpoint (no meta.json) is never trusted.
    (tmp_path / "ckpt-7").mkdir()
    (tmp_path / "ckpt-7" / "state.pt").write_bytes(b"garbage")
    assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt-5"
    with pytest.raises(FileNotFoundError, match="ckpt-7"):
        ckpt.load_checkpoint(tmp_path / "ckpt-7")


def test_keep_last_and_resave_same_step(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    ckpt.save_checkpoint(tmp_path, 4, _state(40), keep_last=2)
    assert ckpt.load_checkpoint(tmp_path / "ckpt-4")["step"] == 40
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, 5, _state(5), keep_last=-1)
    assert ckpt.find_latest(tmp_path / "nothing-here") is None


def test_rng_state_roundtrip_through_disk(tmp_path):
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    random.random(), np.random.rand(3), torch.rand(3)  # move off the seeded start
    ckpt.save_checkpoint(tmp_path, 0, {"rng": ckpt.rng_state()})
    first = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(4))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "ckpt-0")["rng"])
    again = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(4))
    assert first[:3] == again[:3]
    assert_close(again[3], first[3], atol=0, name="torch rng")


def test_metrics_logger_drops_rows_after_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, progress=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss/policy": torch.tensor(step * 0.5), "rollout/reward_mean": np.float32(step)})
    with MetricsLogger(path, progress=False, resume_step=3) as log:
        log.log(4, {"loss/policy": 9.0})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss/policy"] == 1.5 and rows[3]["loss/policy"] == 9.0
    with pytest.raises(ValueError, match="loss/policy"):
        MetricsLogger(None, progress=False).log(1, {"loss/policy": torch.ones(2)})


# ----------------------------------------------------------------------------------------------------
# Integrity: checksums in meta.json, damaged checkpoints, non-finite weights, torn metrics lines
# ----------------------------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":  # same size, one byte in the middle changed: only the checksum can tell
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 3])
    elif how == "empty":
        path.write_bytes(b"")


def test_meta_records_the_state_checksum(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, _state(3))
    meta = json.loads((path / "meta.json").read_text())
    data = (path / "state.pt").read_bytes()
    assert meta["format"] == 2 and meta["step"] == 3
    assert meta["files"]["state.pt"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    "how, match",
    [
        ("flip", r"ckpt-3/state.pt' has SHA-256 [0-9a-f]{64}, meta.json records [0-9a-f]{64}: the file is damaged"),
        ("truncate", r"ckpt-3/state.pt' is \d+ bytes but meta.json records \d+: the file is truncated"),
        ("empty", r"ckpt-3/state.pt' is 0 bytes but meta.json records \d+"),
    ],  # fmt: skip
)
def test_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, how, match):
    ckpt.save_checkpoint(tmp_path, 2, _state(2))
    ckpt.save_checkpoint(tmp_path, 3, _state(3))
    _damage(tmp_path / "ckpt-3" / "state.pt", how)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_checkpoint(tmp_path / "ckpt-3")
    # What --resume uses: the newest intact checkpoint, with a warning naming the damaged file.
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint: .*" + match):
        latest = ckpt.find_latest(tmp_path)
    assert latest == tmp_path / "ckpt-2" and ckpt.load_checkpoint(latest)["step"] == 2
    # Every checkpoint damaged: nothing to resume from.
    _damage(tmp_path / "ckpt-2" / "state.pt", how)
    with pytest.warns(UserWarning) as caught:
        assert ckpt.find_latest(tmp_path) is None
    assert ["ckpt-3" in str(w.message) for w in caught] == [True, False]
    assert ["ckpt-2" in str(w.message) for w in caught] == [False, True]


def test_damaged_meta_json_is_named(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _state(1))
    ckpt.save_checkpoint(tmp_path, 2, _state(2))
    (tmp_path / "ckpt-2" / "meta.json").write_text('{"step": 2, "form')
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt-2/meta.json' is unreadable"):
        ckpt.load_checkpoint(tmp_path / "ckpt-2")
    with pytest.warns(UserWarning, match=r"ckpt-2/meta.json"):
        assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt-1"


def test_format_1_checkpoints_without_checksums_still_load_and_are_checked(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, _state(step))
        (tmp_path / f"ckpt-{step}" / "meta.json").write_text(json.dumps({"step": step, "format": 1}))
    back = ckpt.load_checkpoint(tmp_path / "ckpt-2")
    assert_close(back["weights"]["w"], _state(2)["weights"]["w"], atol=0, name="weights")
    for how, match in (("truncate", "ckpt-2/state.pt' is truncated or damaged"),
                       ("empty", "ckpt-2/state.pt' is empty")):  # fmt: skip
        state = tmp_path / "ckpt-2" / "state.pt"
        good = state.read_bytes()
        _damage(state, how)
        with pytest.raises(ckpt.CheckpointError, match=match):
            ckpt.load_checkpoint(tmp_path / "ckpt-2")
        with pytest.warns(UserWarning, match=match):
            assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt-1"
        state.write_bytes(good)
    # A readable zip directory whose contents are not a checkpoint: the error names the file (torch's own is vague).
    with zipfile.ZipFile(tmp_path / "ckpt-2" / "state.pt", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt-2/state.pt' cannot be loaded \(damaged, truncated"):
        ckpt.load_checkpoint(tmp_path / "ckpt-2")


def test_intact_file_with_unsafe_objects_is_not_called_damaged(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"step": 1, "odd": Fraction(1, 3)})
    with pytest.raises(ckpt.CheckpointError, match=r"state.pt' cannot be loaded \(its checksum matches"):
        ckpt.load_checkpoint(path)


def test_each_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _state(1))
    calls = []
    real = ckpt._file_sha256
    monkeypatch.setattr(ckpt, "_file_sha256", lambda p: calls.append(p) or real(p))
    ckpt.load_checkpoint(ckpt.find_latest(tmp_path))  # what a resume does
    assert calls == [tmp_path / "ckpt-1" / "state.pt"]
    # Rewritten since (same bytes, new mtime): hashed again, and a damaged rewrite is caught.
    state = tmp_path / "ckpt-1" / "state.pt"
    _damage(state, "flip")
    st = state.stat()
    os.utime(state, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(tmp_path / "ckpt-1")
    assert len(calls) == 2


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("key, bad", [("policy", math.nan), ("critic", math.inf), ("policy", -math.inf)])
def test_non_finite_weights_are_never_saved(tmp_path, key, bad):
    ckpt.save_checkpoint(tmp_path, 2, {"policy": _state(2)["weights"], "critic": {"v": torch.randn(4)}})
    before = _tree(tmp_path)
    g = torch.Generator().manual_seed(0)
    weights = {"embed": torch.randn(6, 4, generator=g), "steps": torch.tensor([3]),
               "head": torch.randn(5, 4, generator=g).to(torch.bfloat16)}  # fmt: skip
    weights["head"][2, 1] = bad
    state = {"policy": _state(4)["weights"], "critic": {"v": torch.randn(4)}, key: weights}
    with pytest.raises(ValueError, match=rf"refusing to write step 4 .*{key}\['head'\] holds {int(bad != bad)} NaN "
                                         rf"and {int(bad == bad)} Inf of its 20 values"):  # fmt: skip
        ckpt.save_checkpoint(tmp_path, 4, state)
    assert _tree(tmp_path) == before  # nothing written, swept or rotated
    with pytest.raises(ValueError, match="refusing"):
        ckpt.save_checkpoint(tmp_path / "new", 4, state)
    assert not (tmp_path / "new").exists()
    # NaN outside the model weights (a statistic that has seen no data yet) is data, not damage.
    ckpt.save_checkpoint(tmp_path, 5, {"policy": _state(5)["weights"], "reward_stats": {"mean": math.nan}})
    assert math.isnan(ckpt.load_checkpoint(tmp_path / "ckpt-5")["reward_stats"]["mean"])


def _write_rows(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"step": s, "loss/policy": s * 0.5}) + "\n" for s in range(1, n + 1)))


@pytest.mark.parametrize("tail", ['{"step": 4, "loss/pol', "\0" * 37, b"\xff\xfe\x00garbage", '{"step": 4}}\n'])
def test_torn_last_metrics_line_is_dropped_and_resume_continues(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, 3)
    with open(path, "ab") as f:
        f.write(tail if isinstance(tail, bytes) else tail.encode())
    with pytest.warns(UserWarning, match=r"metrics.jsonl': dropping its torn last line 4"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with pytest.warns(UserWarning, match="torn last line"), MetricsLogger(path, progress=False, resume_step=3) as log:
        log.log(4, {"loss/policy": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is clean
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_corrupt_metrics_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, 2)
    with open(path, "a") as f:
        f.write('{"step": 3, "loss\n[1, 2]\n' + json.dumps({"step": 4}) + "\n\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl': line 3 is not a JSON object"):
        read_metrics(path)
    _write_rows(path, 2)
    with open(path, "a") as f:
        f.write("[1, 2]\n" + json.dumps({"step": 4}) + "\n")
    with pytest.raises(ValueError, match=r"line 3 is not a JSON object \(got list\)"):
        read_metrics(path)


# ----------------------------------------------------------------------------------------------------
# End to end: kill the CLI after a checkpoint, resume, compare with an uninterrupted run
# ----------------------------------------------------------------------------------------------------
SLOW_REWARD = """
import time

def slow_count(prompts, completions):
    time.sleep(0.4)  # keeps each step long enough for the test to kill the run between checkpoints
    return [float(c.count("a")) + 0.1 * len(c) for c in completions]
"""


def _cli(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("\n".join(["ab", "cd", "hello", "xyz", "a b", "q"]) + "\n")
        (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    return [
        sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts),
        "--reward-fn", f"{tmp_path / 'slow_reward.py'}:slow_count", "--policy", "tiny-llama",
        "--advantage-estimator", "gae", "--prompts-per-step", "2", "--samples-per-prompt", "2",
        "--max-new-tokens", "6", "--total-steps", "7", "--save-every", "2", "--keep-checkpoints", "0",
        "--learning-rate", "1e-3", "--critic-learning-rate", "1e-3", "--ppo-epochs", "2",
        "--num-minibatches", "2", "--max-tokens-per-microbatch", "24", "--adaptive-kl",
        "--normalize-rewards", "--seed", "5", "--threads", "1", "--no-progress", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _compare_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = sorted(k for k in ra if not k.startswith("perf/"))
        assert keys == sorted(k for k in rb if not k.startswith("perf/"))
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-6, nan_ok=True), (ra["step"], k, ra[k], rb[k])


def _kill_when(cmd: list[str], cwd: Path, ready) -> str:
    """Start ``cmd``, SIGKILL it once ``ready()`` holds; its stderr. Fails if it ended by itself first."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended by itself before the kill: {err.decode()[-2000:]}"
    return err.decode()


def _pointer_is(out: Path, name: str):
    return lambda: (out / "latest").exists() and (out / "latest").read_text() == name


def _compare_runs(full: Path, killed: Path) -> None:
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert len(a) == 7
    _compare_rows(a, b)
    # The final weights match too.
    from safetensors.torch import load_file

    wa = load_file(str(next((full / "policy").glob("*.safetensors"))))
    wb = load_file(str(next((killed / "policy").glob("*.safetensors"))))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wb[k], wa[k], atol=1e-6, name=k)
    # The uninterrupted run actually trained: the weights moved away from the initial ones.
    first = ckpt.load_checkpoint(full / "ckpt-2")["policy"]
    assert any(not torch.equal(first[k], wa[k]) for k in wa if k in first)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run every killed one is compared with."""
    tmp = tmp_path_factory.mktemp("full")
    ref = subprocess.run(_cli(tmp, tmp / "full"), env=_env(), cwd=tmp, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    return tmp / "full"


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, full_run):
    killed = tmp_path / "killed"
    _kill_when(_cli(tmp_path, killed), tmp_path, _pointer_is(killed, "ckpt-4"))
    steps_logged = [r["step"] for r in read_metrics(killed / "metrics.jsonl")]
    assert max(steps_logged) < 7, "the killed run must not have finished"
    assert ckpt.find_latest(killed) in (killed / "ckpt-4", killed / "ckpt-6")

    resumed = subprocess.run(_cli(tmp_path, killed, "--resume"), env=_env(), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _compare_runs(full_run, killed)


@pytest.mark.slow
def test_the_same_resume_command_survives_repeated_kills(tmp_path, full_run):
    """What a scheduler does with a preempted job: the same ``--resume`` command every time. Killed before its
    first checkpoint (it starts over: the partial files replaced), killed again after one (it continues), with a
    crashed save's temporary directory left behind (removed), it ends where the uninterrupted run ends."""
    killed = tmp_path / "killed"
    cmd = _cli(tmp_path, killed, "--resume")
    err = _kill_when(cmd, tmp_path, lambda: (killed / "metrics.jsonl").is_file()
                     and len(read_metrics(killed / "metrics.jsonl")) >= 1)  # fmt: skip
    assert "nothing to resume" in err and not (killed / "latest").exists()
    err = _kill_when(cmd, tmp_path, _pointer_is(killed, "ckpt-4"))
    assert "nothing to resume" in err, "killed before its first checkpoint: the second attempt starts over"
    assert ckpt.find_latest(killed) in (killed / "ckpt-4", killed / "ckpt-6")
    (killed / ".tmp-ckpt-6-crashed").mkdir()  # a save the kill cut short
    resumed = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             check=False)  # fmt: skip
    assert resumed.returncode == 0 and "nothing to resume" not in resumed.stderr, resumed.stderr[-3000:]
    assert not list(killed.glob(".tmp-ckpt-*"))
    _compare_runs(full_run, killed)


ECHO_ENV = """
class Echo:
    def reset(self, **row):
        self.turns = 0

    def step(self, completion):
        self.turns += 1
        return " ok " if self.turns < 3 else None

    def get_reward(self):
        return 0.5 * self.turns
"""


@pytest.mark.slow
def test_sigkill_and_resume_with_an_environment(tmp_path):
    """Multi-turn episodes against an environment (fresh instances every step, nothing of theirs to save): a run
    killed after a checkpoint and resumed with the same command ends where the uninterrupted run ends."""
    (tmp_path / "echo_env.py").write_text(ECHO_ENV)
    extra = ("--environment", f"{tmp_path / 'echo_env.py'}:Echo", "--max-turns", "3")
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.run(_cli(tmp_path, full, *extra), env=_env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert all(r["episode/turns"] > 1 for r in read_metrics(full / "metrics.jsonl"))
    cmd = _cli(tmp_path, killed, *extra, "--resume")
    _kill_when(cmd, tmp_path, _pointer_is(killed, "ckpt-4"))
    assert max(r["step"] for r in read_metrics(killed / "metrics.jsonl")) < 7
    resumed = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _compare_runs(full, killed)
