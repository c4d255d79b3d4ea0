"""Data parallelism on CPU with gloo: two torchrun processes, each rolling out half of the step's prompts,
make the same first update as one process rolling out all of them (global token counts, DDP-summed
gradients, batch-wide whitening and metrics), and train on the micro-batches of one global
plan_microbatches(num_ranks=2) plan per mini-batch: the same number on each rank, token loads balanced.
The same holds with the policy sharded by FSDP2, whose checkpoint round trip and saved model are checked too."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from fusedrl.engine.packing import plan_microbatches
from helpers import assert_close

MAX_TOKENS = 24
# Config overrides per case. With two mini-batches the global batch is split the same way on every rank.
CASES = {
    "gae": {"advantage_estimator": "gae"},
    "grpo": {"advantage_estimator": "grpo"},
    "reinforce++": {"advantage_estimator": "reinforce++"},
    "grpo-2-minibatches": {"advantage_estimator": "grpo", "num_minibatches": 2},
    # The policy sharded with FSDP2 instead of DDP (the critic stays under DDP); one process ignores it.
    "gae-fsdp": {"advantage_estimator": "gae", "fsdp": True},
    # Multi-turn episodes against a text environment (cases named "episodes"): observations in every sequence.
    "gae-episodes": {"advantage_estimator": "gae", "max_turns": 3},
    "grpo-episodes-2-minibatches": {"advantage_estimator": "grpo", "num_minibatches": 2, "max_turns": 3},
    # Some episodes cut by the token budget and left out of the loss (their tokens masked on whichever rank).
    "gae-episodes-mask-truncated": {
        "advantage_estimator": "gae",
        "max_turns": 3,
        "max_episode_tokens": 14,
        "mask_truncated": True,
        "kl_coef": 0.1,
        "kl_in_reward": False,
    },
}

# Run by torchrun (2 ranks) and imported by the test (1 process). Generation is replaced by a
# deterministic function of (prompt, sample number) so that both layouts see identical rollouts.
WORKER = """
import os
import sys

import torch
from torch.distributed.tensor import DTensor

from fusedrl.engine import ppo as P
from fusedrl.engine import trainer as T
from fusedrl.engine.checkpoint import find_latest
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.rollout_backends import HFBackend
from fusedrl.engine.tokenizer import build_char_tokenizer

PROMPTS = ["ab", "hello", "x", "1+1=", "zzz", "q?"]
CASES = __CASES__


def fake_generate(policy, prompt_ids, *, max_new_tokens, **kw):
    seen, out = {}, []
    for p in prompt_ids:
        k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1  # sample number within the prompt's group
        # As a sampler: a response does not depend on the budget, which only cuts it (episodes generate a batch
        # with the largest budget of its episodes, then cut each to its own; batches differ between the layouts).
        n = min(1 + (sum(p) + 3 * k) % 6, max_new_tokens)
        out.append([4 + (sum(p) * 7 + 11 * k + 5 * i) % 50 for i in range(n)])
    return out


def distinct_chars(prompts, completions):
    return [float(len(set(c))) for c in completions]


class Echo:
    def reset(self, **row):
        self.turns = 0

    def step(self, completion):
        self.turns += 1
        return " ok " if self.turns < 3 else None

    def get_reward(self):
        return float(self.turns)


def run(case):
    # Restored below: the test also runs this in its own process, which later tests share.
    grads = []
    clip = torch.nn.utils.clip_grad_norm_
    # What the update trained: per policy optimizer step, the (buffer sequence ids, tokens) of each micro-batch.
    steps, current, updating = [], [], [False]
    micro_batch, update, optimizer_step = P.MicroBatch, T.PPOTrainer._update, T.PPOTrainer._optimizer_step

    class RecordingMicroBatch(micro_batch):
        def __init__(self, buffer, seq_ids, device, *layout):
            super().__init__(buffer, seq_ids, device, *layout)
            if updating[0]:
                current.append((self.seq_ids.tolist(), int(self.input_ids.shape[1])))

    def recording_update(self, *args):
        updating[0] = True
        try:
            return update(self, *args)
        finally:
            updating[0] = False

    def recording_step(self, model, optimizer, *args):
        if model is self.policy:
            steps.append(current[:])
            current.clear()
        return optimizer_step(self, model, optimizer, *args)

    def recording_clip(params, max_norm, *a, **k):
        # The trainer clips right after summing gradients over ranks: record what the optimizer will see.
        params = list(params)
        # FSDP holds gradient shards: gather them (every rank clips at the same point, so the collective matches).
        grads.append([p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.detach().clone()
                      for p in params])
        return clip(params, max_norm, *a, **k)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    P.MicroBatch, T.PPOTrainer._update, T.PPOTrainer._optimizer_step = (
        RecordingMicroBatch, recording_update, recording_step)
    tok = build_char_tokenizer()
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    cfg = T.PPOConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, learning_rate=1e-3,
                      critic_learning_rate=1e-3, max_tokens_per_microbatch=__MAX_TOKENS__, normalize_rewards=True,
                      progress=False, seed=0, **CASES[case])
    tr = T.PPOTrainer(policy, tok, distinct_chars, cfg, rollout=HFBackend(generate_fn=fake_generate),
                      environment_factory=Echo if "episodes" in case else None)
    try:
        metrics = tr.step(tr.sample_prompts(PROMPTS, 0))
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        P.MicroBatch, T.PPOTrainer._update, T.PPOTrainer._optimizer_step = micro_batch, update, optimizer_step
    state = tr.state_dict()  # with FSDP: gathered onto rank 0
    out = {"policy": state["policy"], "critic": tr.critic.state_dict() if tr.critic is not None else None,
           "grads": grads, "metrics": metrics, "world_size": tr.world_size, "steps": steps,
           "lengths": tr.buffer.lengths()}
    if cfg.fsdp:
        # Checkpoint round trip and final model: written by rank 0, every rank reloading its shards.
        cfg.output_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{case}-{tr.world_size}")
        tr.save_checkpoint()
        tr.save_pretrained(cfg.output_dir)
        fresh = T.PPOTrainer(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=1), tok, distinct_chars, cfg,
                             rollout=HFBackend(generate_fn=fake_generate))
        fresh.load_checkpoint(find_latest(cfg.output_dir))
        resumed = fresh.state_dict()
        out["optimizer"], out["resumed"] = state["policy_optimizer"], resumed
        if tr.rank == 0:
            out["saved"] = build_causal_lm(os.path.join(cfg.output_dir, "policy")).state_dict()
    return out


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {case: run(case) for case in CASES}
    for r in results.values():  # every rank's micro-batches, for the lockstep and balance checks
        r["steps_per_rank"] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(r["steps_per_rank"], r["steps"])
    if torch.distributed.get_rank() == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.destroy_process_group()
""".replace("__CASES__", repr(CASES)).replace("__MAX_TOKENS__", str(MAX_TOKENS))


RUNTIME_ABORT = "terminate called without an active exception"


def check_global_plan(one_steps, two_steps_per_rank, lengths, case):
    """Each 2-rank mini-batch was planned once over both ranks: rank r trained exactly the micro-batches
    plan_microbatches(num_ranks=2)[r] of the mini-batch the 1-process run trained, in lockstep."""
    assert len(two_steps_per_rank) == 2
    assert len(two_steps_per_rank[0]) == len(two_steps_per_rank[1]) == len(one_steps), case
    for s, one_mbs in enumerate(one_steps):
        mini = np.sort(np.concatenate([ids for ids, _ in one_mbs]))  # global sequence ids of the mini-batch
        plan = plan_microbatches(lengths[mini], MAX_TOKENS, num_ranks=2)
        trained = [two_steps_per_rank[r][s] for r in range(2)]
        assert len(trained[0]) == len(trained[1]) == len(plan[0]) == len(plan[1]), (case, s, trained, plan)
        loads = []
        for r in range(2):
            assert [ids for ids, _ in trained[r]] == [mini[mb].tolist() for mb in plan[r]], (case, s, r)
            assert [n for _, n in trained[r]] == [int(lengths[mini[mb]].sum()) for mb in plan[r]], (case, s, r)
            loads.append(sum(n for _, n in trained[r]))
        expected = [int(lengths[mini[np.concatenate(plan[r])]].sum()) for r in range(2)]
        assert (max(loads), min(loads)) == (max(expected), min(expected)), (case, s)
        assert sum(loads) == int(lengths[mini].sum()), (case, s)


def check_resumed_and_saved(run):
    """A checkpoint of the sharded policy, loaded into a fresh trainer (other initial weights), gives back the
    same weights and Adam moments, and the saved model holds the trained weights."""
    weights, resumed = run["policy"], run["resumed"]
    assert set(resumed["policy"]) == set(weights) == set(run["saved"])
    for k, v in weights.items():
        assert torch.equal(resumed["policy"][k], v), k
        assert torch.equal(run["saved"][k], v), k
    moments = run["optimizer"]["state"]
    assert len(moments) == len(weights)
    for k, m in moments.items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert m[name].abs().sum() > 0, (k, name)
            assert torch.equal(resumed["policy_optimizer"]["state"][k][name], m[name]), (k, name)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "dp_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two_ranks.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    if r.returncode != 0 and RUNTIME_ABORT in r.stderr:
        # A rank aborted inside the C++ runtime (std::terminate in a gloo / torch thread, no Python error): seen about
        # once in 20 runs on 2 loaded CPUs, never with a Python traceback. One retry; a second abort fails the test.
        warnings.warn(f"torchrun rank aborted ({RUNTIME_ABORT!r}); retrying once", stacklevel=1)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    two = torch.load(out, weights_only=False)

    spec = importlib.util.spec_from_file_location("dp_worker", script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case, overrides in CASES.items():
            one = worker.run(case)
            assert one["world_size"] == 1 and two[case]["world_size"] == 2
            # The summed gradients each optimizer step uses (policy, then critic for gae), per mini-batch.
            steps = overrides.get("num_minibatches", 1)
            assert len(one["steps"]) == steps
            assert len(one["grads"]) == len(two[case]["grads"]) == steps * (2 if "gae" in case else 1)
            assert case != "gae-fsdp" or isinstance(two[case]["policy"]["lm_head.weight"], torch.Tensor)
            per_step = 2 if "gae" in case else 1
            for which, (g1, g2) in enumerate(zip(one["grads"], two[case]["grads"])):
                assert len(g1) == len(g2)
                # The first optimizer step sees identical weights: its gradients agree to rounding. Later
                # mini-batches see weights after an Adam step, which amplifies last-bit gradient differences
                # where |g| ~ eps (see the weight bound below): their bound is a fraction of the gradient scale.
                later = which >= per_step
                for i, (a, b) in enumerate(zip(g1, g2)):
                    atol = 1e-3 * float(a.abs().max()) if later else 1e-7
                    assert_close(b, a, atol=max(atol, 1e-7), rtol=1e-4, name=f"{case} grads[{which}][{i}]")
            # And the weights after the step. Adam's first step is lr * g / (|g| + eps): where |g| is near
            # eps, last-bit differences in g show, so the bound is a small fraction of lr (1e-3).
            for name in ("policy", "critic"):
                if one[name] is None:
                    assert two[case][name] is None
                    continue
                for k, v in one[name].items():
                    assert_close(two[case][name][k], v, atol=1e-5, name=f"{case} {name}.{k}")
            init = worker.build_causal_lm("tiny-llama", vocab_size=54, seed=0).state_dict()
            moved = sum(not torch.equal(init[k], v) for k, v in one["policy"].items())
            assert moved > 0, "the update must change the policy for the comparison to mean anything"
            m1, m2 = one["metrics"], two[case]["metrics"]
            assert not overrides.get("mask_truncated") or 0 < m1["episode/truncated_frac"] < 1, m1
            for k in m1:
                if not k.startswith("perf/"):
                    assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6, nan_ok=True), (case, k)
            check_global_plan(one["steps"], two[case]["steps_per_rank"], np.asarray(one["lengths"]), case)
            if overrides.get("fsdp"):
                check_resumed_and_saved(two[case])
    finally:
        torch.set_num_threads(old_threads)
