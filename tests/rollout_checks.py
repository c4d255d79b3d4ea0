"""Checks every rollout backend must pass, shared by tests/test_rollout_backends.py (hf, hf-paged) and
tests/test_vllm.py (vllm, in its own environment): greedy parity with HF ``generate`` in fp32, engine log-probs
equal to a full forward's, serving updated weights, and the sampling law (chi-square against HF logits)."""

from __future__ import annotations

import math

import torch
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.rollout_backends import HFBackend, SamplingSpec
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

STOP = [2]


def tiny_policy(seed: int = 0, vocab: int = 64, **overrides):
    """A random tiny Llama in fp32; head_dim 32 (2 heads of hidden 64): vLLM's CPU attention has no head_dim 16."""
    kw = dict(num_attention_heads=2, num_key_value_heads=1, **overrides)
    return build_causal_lm("tiny-llama", vocab_size=vocab, seed=seed, **kw)


def long_prompts(count: int, length: int, vocab: int = 64, seed: int = 0) -> list[list[int]]:
    """Prompts of ``length`` +- a few tokens (ids 3..vocab-1: never a stop id), longer than a KV block/page."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length + i % 5,), generator=g).tolist() for i in range(count)]


def forward_logprobs(policy, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of each response token, from one full forward of prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = policy(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def check_greedy_parity(backend, policy, prompts, *, max_new_tokens=12, n=1, logp_atol=1e-4):
    """Greedy output identical to HF generate's; the engine's log-probs (if any) match a full forward."""
    spec = SamplingSpec(max_new_tokens=max_new_tokens, greedy=True)
    ref = HFBackend().generate(policy, prompts, n=n, spec=spec, stop_ids=STOP, pad_token_id=0).responses
    out = backend.generate(policy, prompts, n=n, spec=spec, stop_ids=STOP, pad_token_id=0)
    assert len(out.responses) == len(prompts) * n
    for i, (got, want) in enumerate(zip(out.responses, ref)):
        assert got == want, f"{backend.name}: prompt {i // n} (len {len(prompts[i // n])}): {got} != HF {want}"
    if out.logprobs is not None:
        for i, (resp, lp) in enumerate(zip(out.responses, out.logprobs)):
            want = forward_logprobs(policy, prompts[i // n], resp)
            err = (torch.tensor(lp) - want).abs().max().item()
            assert err <= logp_atol, f"{backend.name}: sequence {i}: engine log-probs off by {err:.2e}"
    return out


def perturb_(policy, seed: int = 1, scale: float = 0.5) -> None:
    """An in-place 'optimizer step': every weight moves by scale * its std * noise (the tensors stay the same)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))


def check_weight_sync(backend, policy, prompts, *, max_new_tokens=10):
    """Generate, update the weights in place, sync, generate again: the second output is HF's on the new
    weights, and differs from the first (so the check can fail)."""
    spec = SamplingSpec(max_new_tokens=max_new_tokens, greedy=True)
    kw = dict(n=1, spec=spec, stop_ids=STOP, pad_token_id=0)
    before = backend.generate(policy, prompts, **kw).responses
    perturb_(policy)
    backend.sync_weights(policy)
    after = backend.generate(policy, prompts, **kw).responses
    ref = HFBackend().generate(policy, prompts, **kw).responses
    assert after != before, "the perturbed weights gave the same greedy outputs: the check cannot tell"
    for i, (got, want) in enumerate(zip(after, ref)):
        assert got == want, f"{backend.name} after sync, prompt {i} (len {len(prompts[i])}): {got} != HF {want}"


def target_probs(policy, prompt, temperature, top_p, top_k) -> torch.Tensor:
    """The law of the next token: softmax(logits / T), top-k then top-p truncated (transformers' warpers)."""
    with torch.no_grad():
        scores = policy(torch.tensor([prompt])).logits[:, -1].float() / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0].double()


def chi2_critical(df: int, z: float = 3.29) -> float:
    """Upper quantile of chi-square(df) at normal quantile z (Wilson-Hilferty; 3.29 ~ p = 5e-4)."""
    a = 2.0 / (9.0 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def check_distribution(backend, policy, prompt, *, samples=3000, temperature=0.7, top_p=0.9, top_k=0):
    """``samples`` one-token responses to ``prompt`` (one request, n = samples): no token outside the truncated
    support, and the frequencies pass a chi-square test against ``target_probs`` (bins with expected count < 5
    pooled). Returns (statistic, critical value)."""
    spec = SamplingSpec(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
    out = backend.generate(policy, [prompt], n=samples, spec=spec, stop_ids=[], pad_token_id=0)
    tokens = torch.tensor([r[0] for r in out.responses])
    p = target_probs(policy, prompt, temperature, top_p, top_k)
    counts = torch.bincount(tokens, minlength=len(p)).double()
    outside = int(counts[p == 0].sum())
    assert outside == 0, f"{backend.name}: {outside} samples outside the top-p/top-k support"
    expected = p * samples
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    crit = chi2_critical(int(keep.sum()) - 1)
    assert stat < crit, f"{backend.name}: chi-square {stat:.1f} >= critical {crit:.1f} over {int(keep.sum())} bins"
    if out.logprobs is not None:  # the engine's log-prob of each sampled token is the truncated law's
        lp = torch.tensor([x[0] for x in out.logprobs]).double()
        err = (lp - p[tokens].log()).abs().max().item()
        assert err < 1e-4, f"{backend.name}: sampled-token log-probs off the truncated law by {err:.2e}"
    return stat, crit


def peaked_(policy, factor: float = 8.0):
    """Sharpen the output head (in place) so that the next-token law is far from uniform: a sampler that ignores
    temperature or top-p then fails the chi-square test clearly."""
    with torch.no_grad():
        policy.lm_head.weight.mul_(factor)
    return policy
