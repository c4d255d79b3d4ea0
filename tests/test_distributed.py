"""Data parallelism on CPU with gloo: two torchrun processes, each rolling out half of the step's prompts,
make the same first update as one process rolling out all of them (global token counts, summed
gradients, batch-wide whitening and metrics)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

ESTIMATORS = ("gae", "grpo", "reinforce++")

# Run by torchrun (2 ranks) and imported by the test (1 process). Generation is replaced by a
# deterministic function of (prompt, sample number) so that both layouts see identical rollouts.
WORKER = '''
import os
import sys

import torch

from fusedrl.engine import trainer as T
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.tokenizer import build_char_tokenizer

PROMPTS = ["ab", "hello", "x", "1+1=", "zzz", "q?"]


def fake_generate(policy, prompt_ids, *, max_new_tokens, **kw):
    seen, out = {}, []
    for p in prompt_ids:
        k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1  # sample number within the prompt's group
        n = 1 + (sum(p) + 3 * k) % max_new_tokens
        out.append([4 + (sum(p) * 7 + 11 * k + 5 * i) % 50 for i in range(n)])
    return out


def distinct_chars(prompts, completions):
    return [float(len(set(c))) for c in completions]


def run(estimator):
    T.generate_responses = fake_generate
    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        # The trainer clips right after summing gradients over ranks: record what the optimizer will see.
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return clip(params, max_norm, *a, **k)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    tok = build_char_tokenizer()
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    cfg = T.PPOConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, advantage_estimator=estimator,
                      learning_rate=1e-3, critic_learning_rate=1e-3, max_tokens_per_microbatch=24,
                      normalize_rewards=True, progress=False, seed=0)
    tr = T.PPOTrainer(policy, tok, distinct_chars, cfg)
    try:
        metrics = tr.step(tr.sample_prompts(PROMPTS, 0))
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    return {"policy": policy.state_dict(), "critic": tr.critic.state_dict() if tr.critic is not None else None,
            "grads": grads, "metrics": metrics, "world_size": tr.world_size}


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {est: run(est) for est in sys.argv[2].split(",")}
    if torch.distributed.get_rank() == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "dp_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two_ranks.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(out), ",".join(ESTIMATORS)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    two = torch.load(out, weights_only=False)

    spec = importlib.util.spec_from_file_location("dp_worker", script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for est in ESTIMATORS:
            one = worker.run(est)
            assert one["world_size"] == 1 and two[est]["world_size"] == 2
            # The summed gradients the optimizer steps with (policy, then critic for gae).
            assert len(one["grads"]) == len(two[est]["grads"]) == (2 if est == "gae" else 1)
            for which, (g1, g2) in enumerate(zip(one["grads"], two[est]["grads"])):
                assert len(g1) == len(g2)
                for i, (a, b) in enumerate(zip(g1, g2)):
                    assert_close(b, a, atol=1e-7, rtol=1e-4, name=f"{est} grads[{which}][{i}]")
            # And the weights after the step. Adam's first step is lr * g / (|g| + eps): where |g| is near
            # eps, last-bit differences in g show, so the bound is a small fraction of lr (1e-3).
            for name in ("policy", "critic"):
                if one[name] is None:
                    assert two[est][name] is None
                    continue
                for k, v in one[name].items():
                    assert_close(two[est][name][k], v, atol=1e-5, name=f"{est} {name}.{k}")
            init = worker.build_causal_lm("tiny-llama", vocab_size=54, seed=0).state_dict()
            moved = sum(not torch.equal(init[k], v) for k, v in one["policy"].items())
            assert moved > 0, "the update must change the policy for the comparison to mean anything"
            m1, m2 = one["metrics"], two[est]["metrics"]
            for k in m1:
                if not k.startswith("perf/"):
                    assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6, nan_ok=True), (est, k)
    finally:
        torch.set_num_threads(old_threads)
