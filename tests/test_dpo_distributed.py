"""``fusedrl dpo`` data parallel on CPU with gloo: the CLI under ``torch.distributed.run`` with two ranks makes
the updates one process makes on the same pairs (one global pair plan per step, global pair-count
denominators, DDP-summed gradients, metrics reduced over ranks), including a step of one pair that leaves a
rank without work; the precomputed reference table gathered from both ranks equals the one-process table; and
both ranks resume from rank 0's checkpoint (with the reference now scored on the fly, ``--ref-logps online``)
and continue where the one-process run continues."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close

from fusedrl.engine import dpo
from fusedrl.engine.checkpoint import load_checkpoint
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.packing import plan_microbatches

TIMEOUT_S = 300
# 9 pairs, 4 per step: steps of 4, 4 and 1 pairs per epoch (the 1-pair step leaves rank 1 without work).
N_PAIRS, PER_STEP, STEPS_PER_EPOCH = 9, 4, 3
MAX_TOKENS = 40  # a few micro-batches per step on each rank

# Run as ``python WORKER OUT dpo ...`` (one process) and under torch.distributed.run (each rank). It records the
# gradient every optimizer step sees (after DDP's all-reduce, before clipping) and runs the real CLI entry point.
WORKER = """
import os
import sys

import torch

from fusedrl.engine import cli, dpo

grads, plans, world = [], [], []
clip, micro_batches = torch.nn.utils.clip_grad_norm_, dpo.micro_batches


def recording_clip(params, max_norm, *args, **kwargs):
    params = list(params)
    grads.append([p.grad.detach().clone() for p in params])
    world.append(torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    return clip(params, max_norm, *args, **kwargs)


def recording_micro_batches(buf, lengths, pair_ids, max_tokens, device, **kwargs):
    out = micro_batches(buf, lengths, pair_ids, max_tokens, device, **kwargs)
    plans.append((kwargs.get("num_ranks", 1), pair_ids.tolist(), [ids.tolist() for ids, _ in out]))
    return out


torch.nn.utils.clip_grad_norm_, dpo.micro_batches = recording_clip, recording_micro_batches
code = cli.main(sys.argv[2:])
torch.save({"grads": grads, "plans": plans, "world": world}, f"{sys.argv[1]}-rank{os.environ.get('RANK', '0')}.pt")
sys.exit(code)
"""


def _pairs(path: Path) -> Path:
    rng = random.Random(5)

    def digits(lo: int, hi: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))

    rows = [{"prompt": digits(2, 5) + ":", "chosen": digits(1, 7), "rejected": digits(1, 7)} for _ in range(N_PAIRS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(work: Path, name: str, extra=()) -> list[str]:
    return ["dpo", "--policy", "tiny-llama", "--data", str(work / "pairs.jsonl"), "--output-dir", str(work / name),
            "--beta", "0.2", "--learning-rate", "1e-3", "--pairs-per-step", str(PER_STEP),
            "--max-tokens-per-microbatch", str(MAX_TOKENS), "--epochs", "2", "--save-every", str(STEPS_PER_EPOCH),
            "--seed", "3", "--threads", "1", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def _one_process(work: Path, name: str, monkeypatch) -> list:
    """``fusedrl dpo`` in this process (one rank): the gradient of every optimizer step, as the worker records."""
    from fusedrl.engine import cli

    grads, clip = [], torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    threads = torch.get_num_threads()
    try:
        assert cli.main(_args(work, name)) == 0
    finally:
        torch.set_num_threads(threads)
    return grads


def _two_ranks(work: Path, name: str, extra=()) -> tuple[list, str]:
    """The worker under torch.distributed.run, 2 ranks: (rank 0's gradients per step, stderr); asserts that
    rank 1 saw the same (summed) gradients."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(work / "worker.py"), str(work / f"{name}-grads"), *_args(work, name, extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert r.returncode == 0, f"{name} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    ranks = [torch.load(work / f"{name}-grads-rank{k}.pt") for k in range(2)]
    assert [w for rank in ranks for w in rank["world"]] == [2] * (2 * len(ranks[0]["grads"]))
    assert len(ranks[1]["grads"]) == len(ranks[0]["grads"])
    for s, (a, b) in enumerate(zip(ranks[0]["grads"], ranks[1]["grads"])):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"{name}: rank 1's step {s + 1} gradient {i} differs from rank 0's"
    return ranks, r.stderr


def _check_plans(work: Path, ranks: list, first_step: int, *, reference: bool) -> None:
    """Each rank scored (``reference``) and trained exactly its share of one global 2-rank plan of the pairs:
    the planner's ``[rank]`` micro-batches, a pair never split, together every pair once; the 1-pair step leaves
    a rank without pairs."""
    from fusedrl.engine.tokenizer import build_char_tokenizer

    pairs = dpo.load_pairs(work / "pairs.jsonl", build_char_tokenizer())
    _, lengths = dpo.build_buffer(pairs)
    cfg = dpo.DPOConfig(pairs_per_step=PER_STEP, seed=3)
    want = ([np.arange(N_PAIRS)] if reference else []) + [
        dpo._step_pairs(N_PAIRS, cfg, s) for s in range(first_step, 2 * STEPS_PER_EPOCH)]  # fmt: skip
    got = [[p for p in rank["plans"] if p[0] == 2] for rank in ranks]  # the zero-weighted pass plans 1 rank
    assert len(got[0]) == len(got[1]) == len(want)
    idle = 0
    for k, ids in enumerate(want):
        plan = plan_microbatches(lengths[ids], MAX_TOKENS, num_ranks=2)
        for r in range(2):
            assert got[r][k][1] == ids.tolist()
            assert got[r][k][2] == [ids[mb].tolist() for mb in plan[r] if len(mb)], (k, r)
        trained = sorted(i for r in range(2) for mb in got[r][k][2] for i in mb)
        assert trained == sorted(ids.tolist()), k
        idle += sum(not got[r][k][2] for r in range(2))
    assert idle == (2 if first_step == 0 else 1), idle  # the two 1-pair steps (one after the resume)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_grads(got: list, want: list, first: int) -> None:
    assert len(got) == len(want)
    for s, (a, b) in enumerate(zip(want, got), first):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            # Step 1 sees identical weights: the gradients agree to rounding. Later steps see weights after Adam
            # steps, whose lr * g / (|g| + eps) amplifies last-bit differences where |g| ~ eps: a bound relative
            # to the gradient's scale.
            atol = 1e-6 if s == 1 else 1e-4 * float(x.abs().max())
            assert_close(y, x, atol=max(atol, 1e-7), rtol=1e-4, name=f"gradient of step {s}, parameter {i}")


def _check_weights(run: Path, want: dict, what: str) -> None:
    got = build_causal_lm(str(run / "policy")).state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert_close(got[k], v, atol=1e-5, name=f"{what}: {k}")


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_resume(tmp_path, monkeypatch):
    (tmp_path / "worker.py").write_text(WORKER)
    _pairs(tmp_path / "pairs.jsonl")
    steps = 2 * STEPS_PER_EPOCH
    g1 = _one_process(tmp_path, "one", monkeypatch)
    two, err = _two_ranks(tmp_path, "two")
    assert len(g1) == steps
    _check_grads(two[0]["grads"], g1, 1)
    _check_plans(tmp_path, two, 0, reference=True)
    assert err.count("reference log-probs of 9 pairs") == 1  # scored once (rank 0 reports it)
    assert err.count("fusedrl dpo: 6 steps") == 1  # rank 0 reports; rank 1 is silent

    rows1, rows2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == list(range(1, steps + 1))  # rank 0 only
    assert abs(rows1[0]["loss"] - 0.6931) < 1e-3  # the policy is its own reference at step 1
    for a, b in zip(rows1, rows2):
        assert set(a) == set(b)
        for k in a:
            if not k.startswith("perf/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)

    # The reference table, scored half by each rank and gathered, is the one-process table; rank 0 wrote one
    # checkpoint per save; the final models agree, and the second epoch moved them.
    c1, c2 = load_checkpoint(tmp_path / "one" / "ckpt-3"), load_checkpoint(tmp_path / "two" / "ckpt-3")
    assert c2["ref_logps"].shape == (N_PAIRS, 2) and torch.isfinite(c2["ref_logps"]).all()
    assert_close(c2["ref_logps"], c1["ref_logps"], atol=1e-5, name="gathered reference log-probs")
    assert sorted(p.name for p in (tmp_path / "two").glob("ckpt-*")) == ["ckpt-3", "ckpt-6"]
    final = build_causal_lm(str(tmp_path / "one" / "policy")).state_dict()
    assert any(not torch.equal(final[k], c1["policy"][k]) for k in final)
    _check_weights(tmp_path / "two", final, "two ranks' final weights")

    # A crash after step 3: both ranks resume from ckpt-3 and redo steps 4-6 as the one process did. They resume
    # with the reference scored on the fly (each rank a frozen copy of the initial policy, on its own
    # micro-batches), which must make the same losses as the precomputed table.
    shutil.rmtree(tmp_path / "two" / "ckpt-6")
    shutil.rmtree(tmp_path / "two" / "policy")
    resumed, err = _two_ranks(tmp_path, "two", extra=("--resume", "--ref-logps", "online"))
    assert "reference log-probs" not in err  # no scoring pass up front
    _check_grads(resumed[0]["grads"], g1[STEPS_PER_EPOCH:], STEPS_PER_EPOCH + 1)
    _check_plans(tmp_path, resumed, STEPS_PER_EPOCH, reference=False)
    assert [r["step"] for r in _rows(tmp_path / "two")] == list(range(1, steps + 1))
    _check_weights(tmp_path / "two", final, "resumed two ranks' final weights")
