"""The pluggable rollout stage: backend choice, hf-paged (transformers continuous batching) against the hf
reference (greedy parity, log-probs, weight sync, sampling law), the trainer's rollout_logp and mismatch metrics,
and `fusedrl train --rollout-backend hf-paged` end to end. vLLM's own tests are tests/test_vllm.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from fusedrl.engine import rollout_backends as rb
from fusedrl.engine.rollout_backends import HFBackend, HFPagedBackend, SamplingSpec, resolve_rollout_backend
from fusedrl.engine.tokenizer import build_char_tokenizer
from fusedrl.engine.trainer import PPOConfig, PPOTrainer
from rollout_checks import (
    check_distribution,
    check_greedy_parity,
    check_weight_sync,
    long_prompts,
    peaked_,
    tiny_policy,
)

needs_paged = pytest.mark.skipif(not rb.hf_paged_available(), reason="this transformers has no generate_batch")


def test_resolve_and_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="rollout_backend must be one of"):
        resolve_rollout_backend("sglang")
    with pytest.raises(ValueError, match="RolloutConfig.rollout_backend must be one of"):
        PPOConfig(rollout_backend="sglang")
    with pytest.raises(ValueError, match="RolloutConfig.rollout_page_size must be an int >= 4"):
        PPOConfig(rollout_page_size=2)
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization must be a number in"):
        PPOConfig(vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="n .samples per prompt. must be an int >= 1"):
        HFBackend().generate(None, [[1]], n=0, spec=SamplingSpec(max_new_tokens=1), stop_ids=[2], pad_token_id=0)
    with pytest.raises(ValueError, match="SamplingSpec.top_p must be in"):
        SamplingSpec(max_new_tokens=1, top_p=0.0)
    # auto: vllm first, then hf-paged, then hf.
    monkeypatch.setattr(rb, "vllm_available", lambda: True)
    assert resolve_rollout_backend("auto")[0] == "vllm"
    monkeypatch.setattr(rb, "vllm_available", lambda: False)
    monkeypatch.setattr(rb, "hf_paged_available", lambda policy=None: True)
    assert resolve_rollout_backend("auto", device="cuda")[0] == "hf-paged"
    assert resolve_rollout_backend("auto", device="cpu")[0] == "hf"  # slower there on fixed-length responses
    monkeypatch.setattr(rb, "hf_paged_available", lambda policy=None: False)
    assert resolve_rollout_backend("auto", device="cuda")[0] == "hf"
    with pytest.raises(ImportError, match="needs vllm"):
        resolve_rollout_backend("vllm")
    with pytest.raises(ImportError, match="generate_batch"):
        resolve_rollout_backend("hf-paged")


@needs_paged
def test_hf_paged_greedy_parity_logprobs_and_groups():
    """Prompts longer than a page (8 tokens), groups of n = 3: every sample of a greedy group is HF's output, and
    the engine's log-probs are a full forward's."""
    policy = tiny_policy()
    prompts = long_prompts(5, 19)
    out = check_greedy_parity(HFPagedBackend(page_size=8), policy, prompts, n=3, max_new_tokens=10)
    assert out.logprobs is not None and all(len(a) == len(b) for a, b in zip(out.logprobs, out.responses))


@needs_paged
def test_hf_paged_serves_updated_weights():
    policy = tiny_policy(seed=3)
    check_weight_sync(HFPagedBackend(page_size=8), policy, long_prompts(4, 21, seed=1))


@needs_paged
@pytest.mark.parametrize("backend", ["hf", "hf-paged"])
@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 0), (1.3, 1.0, 5)])
def test_sampling_law_chi_square(backend, temperature, top_p, top_k):
    """Token frequencies of 3000 samples at one prompt vs the softmax of HF's logits (temperature, top-p, top-k):
    one request with n = 3000 (hf-paged forks them after one prefill: the samples must still be independent)."""
    policy = peaked_(tiny_policy(seed=5), 6.0)
    make = {"hf": lambda: HFBackend(batch_size=512), "hf-paged": lambda: HFPagedBackend(page_size=8)}[backend]
    torch.manual_seed(0)
    check_distribution(make(), policy, long_prompts(1, 12, seed=2)[0], temperature=temperature, top_p=top_p,
                       top_k=top_k)  # fmt: skip


@needs_paged
def test_hf_paged_stops_at_every_stop_id_and_keeps_rng():
    """Per-request stop: a response ends at its first stop id (kept), and the caller's RNG stream is as if the
    engine had drawn one number from it (generate_batch re-seeds torch's global RNG internally)."""
    policy = peaked_(tiny_policy(seed=7), 4.0)
    prompts = long_prompts(6, 10, seed=4)
    spec = SamplingSpec(max_new_tokens=16, temperature=1.5)
    stops = list(range(3, 40))  # most tokens stop
    torch.manual_seed(11)
    out = HFPagedBackend(page_size=8).generate(policy, prompts, n=2, spec=spec, stop_ids=stops, pad_token_id=0)
    after = torch.rand(())
    torch.manual_seed(11)
    torch.randint(0, 2**31 - 1, ())
    assert torch.equal(after, torch.rand(())), "hf-paged changed the caller's RNG stream"
    ended = 0
    for r in out.responses:
        assert all(t not in stops for t in r[:-1]), r
        ended += r[-1] in stops
    assert ended >= len(out.responses) // 2, out.responses


@needs_paged
def test_trainer_stores_rollout_logp_and_reports_mismatch():
    """hf-paged in the trainer (groups of 4 sent once each): rollout_logp in the buffer at the response tokens,
    and in fp32 with top_p = 1 the engine's log-probs are the trainer's (mismatch ~ 0, ratio ~ 1)."""
    tok = build_char_tokenizer()
    policy = tiny_policy(vocab=len(tok))
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=4, max_new_tokens=6, advantage_estimator="grpo",
                    learning_rate=1e-2, progress=False, rollout_backend="hf-paged", rollout_page_size=4,
                    temperature=0.8)  # fmt: skip
    tr = PPOTrainer(policy, tok, lambda p, c: [float(x.count("a")) for x in c], cfg)
    assert tr.rollout_backend == "hf-paged"
    for step in range(2):  # the second step samples from the updated weights
        m = tr.step(["hello there", "a b c d e f"])
        buf, layout = tr.buffer, tr.layout
        rollout = layout.from_buffer(buf, "rollout_logp")
        old = layout.from_buffer(buf, "old_logp")
        assert rollout.shape == (layout.num_tokens,) and bool((rollout < 0).all())
        assert (rollout - old).abs().max().item() < 1e-4
        assert 0 <= m["rollout/logp_mismatch_k3"] < 1e-7 and abs(m["rollout/ratio_max"] - 1) < 1e-4
        assert m["perf/rollout_tokens_per_s"] > 0
    # hf gives no engine log-probs: no mismatch metrics, the field stays 0.
    tr_hf = PPOTrainer(tiny_policy(vocab=len(tok)), tok, lambda p, c: [0.0] * len(c),
                       PPOConfig(**{**cfg.__dict__, "rollout_backend": "hf"}))  # fmt: skip
    m = tr_hf.step(["hello there", "a b c d e f"])
    assert "rollout/logp_mismatch_k3" not in m
    assert not tr_hf.layout.from_buffer(tr_hf.buffer, "rollout_logp").any()


@needs_paged
@pytest.mark.parametrize("correction", ["auto", "mis", "none"])
def test_rollout_logp_reaches_the_loss_as_its_correction(correction, monkeypatch):
    """With an engine that returns log-probs, rollout_correction='auto' trains with TIS on them, an explicit mode
    with that mode, 'none' without them; an explicit mode with the hf backend (no engine log-probs) is refused at
    construction."""
    from fusedrl.engine import ppo as ppo_mod

    seen = []
    real = ppo_mod.linear_ppo_loss

    def spy(*a, **kw):
        seen.append((kw["config"].rollout_correction, kw.get("rollout_logp"), a[2].numel()))
        return real(*a, **kw)

    monkeypatch.setattr(ppo_mod, "linear_ppo_loss", spy)
    tok = build_char_tokenizer()
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, advantage_estimator="grpo",
                    progress=False, rollout_backend="hf-paged", rollout_page_size=4, rollout_correction=correction)  # fmt: skip
    tr = PPOTrainer(tiny_policy(vocab=len(tok)), tok, lambda p, c: [float(len(x)) for x in c], cfg)
    m = tr.step(["hello there", "a b c d e f"])
    expected = {"auto": "tis", "mis": "mis", "none": "none"}[correction]
    assert seen and all(mode == expected for mode, _, _ in seen)
    if expected == "none":
        assert all(r is None for _, r, _ in seen) and "rollout/corrected_frac" not in m
    else:  # one engine log-prob per scored token of the micro-batch, the engine's own values
        assert all(r is not None and r.shape == (n,) and bool((r < 0).all()) for _, r, n in seen)
        assert 0.0 <= m["rollout/corrected_frac"] <= 1.0
    if correction == "mis":
        with pytest.raises(ValueError, match="rollout_correction='mis' needs a rollout backend that returns"):
            PPOTrainer(tiny_policy(vocab=len(tok)), tok, lambda p, c: [0.0] * len(c),
                       PPOConfig(**{**cfg.__dict__, "rollout_backend": "hf"}))  # fmt: skip


@pytest.mark.slow
@needs_paged
def test_cli_trains_with_hf_paged(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\nok\n1+2\ngo:\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts), "--policy", "tiny-llama",
           "--reward-fn", "count_token", "--reward-kwargs", '{"token": "a"}', "--advantage-estimator", "grpo",
           "--prompts-per-step", "2", "--samples-per-prompt", "4", "--max-new-tokens", "6", "--total-steps", "3",
           "--rollout-backend", "hf-paged", "--threads", "1", "--no-progress", "--output-dir", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       cwd=tmp_path, timeout=240, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollout backend hf-paged" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["rollout/logp_mismatch_k3"] < 1e-6 for row in rows)
    assert (out / "config.yaml").read_text().startswith("# rollout backend: hf-paged")


class ToolCallingBackend:
    """A producer of the user's own, not derived from RolloutBackend: each sample is two sampled tokens, three tokens
    of "tool output" it did not sample (loss mask 0), then two more sampled tokens; log-probs of its own."""

    name = "tool-calling"

    def __init__(self):
        self.synced = 0

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        responses, masks, logprobs = [], [], []
        for i in range(len(prompt_ids) * n):
            responses.append([5 + i % 7, 6, 9, 9, 9, 7, 8])
            masks.append([1, 1, 0, 0, 0, 1, 1])
            logprobs.append([-1.5, -2.0, 0.0, 0.0, 0.0, -1.0, -3.0])
        return rb.RolloutOutput(responses, logprobs, masks)

    def sync_weights(self, policy):
        self.synced += 1

    def close(self):
        pass


def test_a_producer_object_with_tool_output_trains_on_its_sampled_tokens_only():
    """PPOTrainer(..., rollout=obj) with nothing else changed: the loss mask reaches the buffer, only the sampled
    tokens are scored, trained on and carry the behaviour log-prob and the policy version; every optimizer step
    pushes the weights to the producer."""
    tok = build_char_tokenizer()
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, advantage_estimator="grpo",
                    progress=False, rollout_correction="tis", num_minibatches=2)  # fmt: skip
    backend = ToolCallingBackend()
    tr = PPOTrainer(tiny_policy(vocab=len(tok)), tok, lambda p, c: [float(len(set(x))) for x in c], cfg,
                    rollout=backend)  # fmt: skip
    assert tr.rollout is backend and tr.rollout_backend == "tool-calling"
    for step in range(2):
        m = tr.step(["hello", "ab"])
        buf, layout = tr.buffer, tr.layout
        assert layout.num_tokens == 4 * 4 and int(buf.response_mask().sum()) == 16  # 4 sampled tokens per sample
        mask = buf.response_mask().astype(bool)
        assert len(buf) == 4
        for seq in (buf.get(i) for i in range(len(buf))):  # the tool tokens carry no loss and no per-token values
            resp = seq["response_mask"][-7:]
            assert resp.tolist() == [1, 1, 0, 0, 0, 1, 1]
            assert seq["rollout_logp"][-7:].tolist() == [-1.5, -2.0, 0.0, 0.0, 0.0, -1.0, -3.0]
            assert seq["version"][-7:].tolist() == [step] * 2 + [0] * 3 + [step] * 2
            assert not seq["old_logp"][-5:-2].any() and seq["old_logp"][-7:-5].all()
        assert not buf.field("advantages")[~mask].any()
        assert math.isfinite(m["loss/policy"]) and "rollout/logp_mismatch_k3" in m
    assert backend.synced == 2 * cfg.num_minibatches
