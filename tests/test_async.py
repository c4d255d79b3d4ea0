"""Asynchronous RL and dynamic sampling: the produce / learn split, DAPO's group filter (``dynamic_sampling.py``), the
streaming backend's chunks and versions, and the producer process (``async_rl.py``): exactness at max_staleness=0,
the staleness bound, a producer crash, no process left behind, resume."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from fusedrl.engine.checkpoint import load_checkpoint
from fusedrl.engine.async_rl import ProducerFailed, StreamingBackend, fresh_groups
from fusedrl.engine.dynamic_sampling import fill_batch
from fusedrl.engine.episodes import Rollout
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.producer import ScoredBatch
from fusedrl.engine.rollout_backends import RolloutBackend, RolloutOutput, SamplingSpec
from fusedrl.engine.trainer import PPOConfig, PPOTrainer
from helpers import distinct_chars

PROMPTS = ["ab", "hello", "x", "1+1=", "abc d", "zz"]
SMALL = {
    "prompts_per_step": 2,
    "samples_per_prompt": 3,
    "max_new_tokens": 6,
    "learning_rate": 1e-3,
    "progress": False,
    "rollout_backend": "hf",
    "advantage_estimator": "grpo",
    "seed": 3,
}


def flat_for_z(prompts, completions):
    """Every sample of a prompt starting with z gets the same reward (a zero-advantage group)."""
    return [1.0 if p.startswith("z") else float(len(set(c))) for p, c in zip(prompts, completions)]


def constant(prompts, completions):
    return [1.0] * len(completions)


def fails_on_second_call(prompts, completions):
    """Raises at its second call in the producer process (the learner's own synchronous steps call it too)."""
    if multiprocessing.parent_process() is None:
        return distinct_chars(prompts, completions)
    fails_on_second_call.calls = getattr(fails_on_second_call, "calls", 0) + 1
    if fails_on_second_call.calls == 2:
        raise ValueError("boom from the reward function")
    return distinct_chars(prompts, completions)


def make(tok, reward=distinct_chars, **overrides):
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    return PPOTrainer(policy, tok, reward, PPOConfig(**{**SMALL, **overrides}))


def children() -> set[int]:
    """This process's child processes, less Python's shared resource tracker (one per interpreter, started by the
    first multiprocessing lock and kept for the interpreter's life, not a producer)."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())}  # fmt: skip


def learned(rows):
    """The metrics that depend on what was sampled and learned (not on timing or the async bookkeeping)."""
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "async/"))} for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# Dynamic sampling
# ---------------------------------------------------------------------------------------------------------------
def fake_batch(scores, tag):
    n = len(scores)
    out = RolloutOutput([[tag, i] for i in range(n)], None)
    ro = Rollout([[1]] * n, out, [f"p{tag}"] * n, [f"c{tag}-{i}" for i in range(n)])
    return ScoredBatch(ro, torch.tensor(scores, dtype=torch.float32), None, version=0)


def test_fill_batch_keeps_informative_groups_in_order_and_bounds_the_rounds():
    rounds = [
        fake_batch([1, 1, 0, 1, 2, 2], 0),  # groups of 2: (1,1) flat, (0,1) kept, (2,2) flat
        fake_batch([3, 3, 5, 6, 7, 8], 1),  # (3,3) flat, two kept
    ]
    calls = []
    out = fill_batch(lambda r: calls.append(r) or rounds[r], group_size=2, num_groups=2, max_rounds=4)
    assert calls == [0, 1]  # stops as soon as the batch is full
    assert out.rollout.output.responses == [[0, 2], [0, 3], [1, 2], [1, 3]]
    assert out.scores.tolist() == [0, 1, 5, 6]
    assert out.stats["rollout/dynamic_rounds"] == 2
    assert out.stats["rollout/dynamic_dropped_groups"] == 3
    assert out.stats["rollout/dynamic_surplus_groups"] == 1
    assert out.stats["rollout/dynamic_filled_groups"] == 0

    flat = [fake_batch([1, 1, 2, 2], r) for r in range(3)]
    out = fill_batch(lambda r: flat[r], group_size=2, num_groups=2, max_rounds=3)
    # Never more than max_rounds rollouts; the short batch is filled with the newest dropped groups.
    assert out.stats["rollout/dynamic_rounds"] == 3
    assert out.stats["rollout/dynamic_filled_groups"] == 2
    assert out.stats["rollout/dynamic_dropped_groups"] == 4
    assert [r[0] for r in out.rollout.output.responses] == [2, 2, 2, 2]


def test_dynamic_sampling_trains_only_on_informative_groups(tok):
    tr = make(tok, flat_for_z, dynamic_sampling=True, total_steps=3, prompts_per_step=2)
    rows = tr.train(["zz", "za", "zq", "hello", "abc d"])
    scores = tr.buffer.scores().reshape(-1, 3)
    assert len(scores) == 2 and (scores.max(1) > scores.min(1)).all()
    assert all(1 <= r["rollout/dynamic_rounds"] <= 4 for r in rows)
    assert sum(r["rollout/dynamic_dropped_groups"] for r in rows) > 0  # 3 of the 5 prompts give flat groups


# ---------------------------------------------------------------------------------------------------------------
# Streaming generation
# ---------------------------------------------------------------------------------------------------------------
class CountingBackend(RolloutBackend):
    """Samples tokens 10, 11, ... (stop id 99 after 5 tokens in all), with log-prob -token/100."""

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        out = []
        for p in [p for p in prompt_ids for _ in range(n)]:
            done = len(p) - 1  # every prompt here is one token long
            r = [10 + done + j for j in range(spec.max_new_tokens)]
            if done + len(r) >= 5:
                r = r[: 5 - done - 1] + [99]
            out.append(r)
        return RolloutOutput(out, [[-t / 100 for t in r] for r in out])


def test_streaming_backend_tags_each_chunk_with_the_version_that_sampled_it():
    versions = iter(range(100))
    sb = StreamingBackend(CountingBackend(), chunk=2, refresh=lambda: next(versions), score=None)
    out = sb.generate(None, [[1], [2]], n=2, spec=SamplingSpec(max_new_tokens=8), stop_ids=[99], pad_token_id=0)
    assert out.responses == [[10, 11, 12, 13, 99]] * 4
    assert sb.last_versions == [[0, 0, 1, 1, 2]] * 4
    assert out.logprobs[0] == [-0.1, -0.11, -0.12, -0.13, -0.99]


def test_fresh_groups_drops_whole_groups_with_a_stale_token():
    b = fake_batch([0, 1, 2, 3], 0)
    b.versions = [[5, 5], [3, 5], [5, 5], [4, 4]]
    assert fresh_groups(b, 6, 2, 2).tolist() == [False, False, True, True]


# ---------------------------------------------------------------------------------------------------------------
# The producer process
# ---------------------------------------------------------------------------------------------------------------
def test_streaming_at_staleness_zero_reproduces_the_synchronous_run(tok):
    before = children()
    sync = make(tok, total_steps=3).train(PROMPTS)
    tr = make(tok, total_steps=3, async_mode="streaming", max_staleness=0)
    rows = tr.train(PROMPTS)
    assert learned(rows) == learned(sync)
    assert all(r["async/staleness_max"] == 0 and r["async/dropped_trajectories"] == 0 for r in rows)
    assert all(r["perf/weight_sync_s"] > 0 for r in rows)
    assert children() == before


def test_streaming_stays_within_the_staleness_bound_and_corrects_the_loss(tok, tmp_path):
    tr = make(tok, total_steps=4, async_mode="streaming", max_staleness=2, stream_chunk_tokens=2,
              output_dir=str(tmp_path), save_every=2, sync_warmup=False)  # fmt: skip
    rows = tr.train(PROMPTS)
    assert len(rows) == 4
    assert all(0 <= r["async/staleness_max"] <= 2 for r in rows)
    assert all("rollout/corrected_frac" in r for r in rows)  # tis against the producer's behaviour log-probs
    buf = tr.buffer
    v = np.asarray(buf.field("version"))[np.asarray(buf.response_mask()).astype(bool)]
    assert v.min() >= 3 - 2 and v.max() <= 3  # step 4 trains at version 3
    assert load_checkpoint(tmp_path / "ckpt-4", map_location="cpu")["producer"]["next_batch"] == 4
    # Resume: a new producer continues from the checkpoint's step.
    tr2 = make(tok, total_steps=5, async_mode="streaming", max_staleness=2, stream_chunk_tokens=2,
               output_dir=str(tmp_path), save_every=2, sync_warmup=False)  # fmt: skip
    rows2 = tr2.train(PROMPTS, resume=True)
    assert len(rows2) == 1 and tr2.global_step == 5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines][-1] == 5


def test_dynamic_sampling_runs_in_the_producer_process(tok):
    # An explicit correction with the hf engine (no log-probs of its own): the producer's behaviour log-probs serve.
    tr = make(tok, flat_for_z, dynamic_sampling=True, total_steps=3, async_mode="one-step-off", max_staleness=1,
              rollout_correction="mis", sync_warmup=False)  # fmt: skip
    rows = tr.train(["zz", "za", "zq", "hello", "abc d"])
    assert all("rollout/corrected_frac" in r for r in rows)
    scores = tr.buffer.scores().reshape(-1, 3)
    assert len(scores) == 2 and (scores.max(1) > scores.min(1)).all()
    assert sum(r["rollout/dynamic_dropped_groups"] for r in rows) > 0
    assert all(r["async/staleness_max"] <= 1 for r in rows)


def test_a_producer_crash_stops_the_run_with_its_traceback(tok):
    before = children()
    # Synchronous steps until the producer has started (sync_warmup), then its second batch raises.
    tr = make(tok, fails_on_second_call, total_steps=100000, async_mode="one-step-off", max_staleness=1)
    with pytest.raises(ProducerFailed, match="(?s)producer process raised.*boom from the reward function"):
        tr.train(PROMPTS)
    assert children() == before


def test_the_learner_steps_synchronously_while_the_producer_starts(tok):
    rows = make(tok, total_steps=2, async_mode="one-step-off", max_staleness=1).train(PROMPTS)
    assert rows[0]["async/synchronous_step"] == 1.0  # the producer needs seconds to start: step 1 is the learner's


def test_an_unpicklable_reward_is_refused_before_the_producer_starts(tok):
    tr = make(tok, lambda p, c: [0.0] * len(c), total_steps=1, async_mode="one-step-off")
    with pytest.raises(ValueError, match="reward must be picklable"):
        tr.train(PROMPTS)


def _producers(pid: int) -> list[psutil.Process]:
    """The producer processes under process ``pid`` (spawned children, not the resource tracker)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return [c for c in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    return []


def _wait_for(what, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return found


@pytest.mark.slow
def test_cli_async_run_killed_resumes_and_ctrl_c_stops_both_processes(tmp_path):
    """SIGKILL of the learner takes its producer down with it and --resume finishes the run; Ctrl-C stops both
    processes with a one-line message."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts), "--policy", "tiny-llama",
        "--reward-fn", "count_token", "--reward-kwargs", '{"token": "a"}', "--advantage-estimator", "grpo",
        "--prompts-per-step", "2", "--samples-per-prompt", "3", "--max-new-tokens", "6", "--total-steps", "4",
        "--save-every", "2", "--async-mode", "one-step-off", "--max-staleness", "1", "--rollout-backend", "hf",
        "--threads", "1", "--no-progress", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        producers = _wait_for(lambda: _producers(p.pid))
        _wait_for(lambda: (out / "ckpt-2").is_dir())
        p.kill()
        p.wait(timeout=30)
        _, alive = psutil.wait_procs(producers, timeout=15)
        assert not alive, "the producer outlived its killed learner"
    finally:
        if p.poll() is None:
            p.kill()
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and steps == sorted(set(steps)), steps

    long = [*cmd[: cmd.index("--total-steps") + 1], "1000", *cmd[cmd.index("--total-steps") + 2 : -1], str(out) + "2"]
    p = subprocess.Popen(long, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        producers = _wait_for(lambda: _producers(p.pid))
        metrics = out.parent / "run2" / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1)  # a step done: running
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        _, alive = psutil.wait_procs(producers, timeout=15)
        assert not alive
        assert p.returncode != 0 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    finally:
        if p.poll() is None:
            p.kill()


DDP_WORKER = """
import json, sys

import psutil
import torch

from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.tokenizer import build_char_tokenizer
from fusedrl.engine.trainer import PPOConfig, PPOTrainer

PROMPTS = __PROMPTS__


def distinct_chars(prompts, completions):
    return [float(len(set(c))) for c in completions]


def run(**overrides):
    tok = build_char_tokenizer()
    cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, learning_rate=1e-3, progress=False,
                    rollout_backend="hf", advantage_estimator="grpo", total_steps=3, seed=0, **overrides)
    tr = PPOTrainer(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0), tok, distinct_chars, cfg)
    rows = tr.train(PROMPTS)
    learned = [{k: v for k, v in r.items() if not k.startswith(("perf/", "async/"))} for r in rows]
    return learned, rows, {k: v.clone() for k, v in tr.policy.state_dict().items()}


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    sync, _, w_sync = run()
    zero, _, w_zero = run(async_mode="streaming", max_staleness=0)
    _, one_step, _ = run(async_mode="one-step-off", max_staleness=1, sync_warmup=False)
    _, warm, _ = run(async_mode="one-step-off", max_staleness=1)  # ranks hand over to their producers at one step
    left = [c.pid for c in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
    result = {"same_metrics": sync == zero, "same_weights": all(torch.equal(w_sync[k], w_zero[k]) for k in w_sync),
              "one_step": one_step, "warm": warm, "left": left, "rank": torch.distributed.get_rank()}
    with open(sys.argv[1] + f".{result['rank']}", "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_in_async_mode(tmp_path):
    """Two learners (DDP over gloo), each with its own producer process: streaming at staleness 0 reproduces the
    synchronous two-rank run (metrics and weights), one-step-off trains within its bound, no producer is left."""
    script = tmp_path / "async_worker.py"
    script.write_text(DDP_WORKER.replace("__PROMPTS__", repr(PROMPTS)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"out.{rank}").read_text())
        assert res["same_metrics"] and res["same_weights"], rank
        assert len(res["one_step"]) == 3 and all(row["async/staleness_max"] <= 1 for row in res["one_step"])
        assert len(res["warm"]) == 3 and res["warm"][0]["async/synchronous_step"] == 1.0
        assert res["left"] == []
