"""PPOTrainer on tiny models: one step's invariants (ratio starts at 1, the policy moves, losses are
finite), packed scoring against plain per-sequence forwards at the sampling temperature, micro-batching
against one batch, every advantage estimator, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fusedrl.engine import ppo as ppo_mod
from fusedrl.engine import distributed
from fusedrl.engine import trainer as trainer_mod
from fusedrl.engine.models import build_causal_lm, build_reward_model
from fusedrl.engine.rewards import count_token
from fusedrl.engine.trainer import PPOConfig, PPOTrainer
from fusedrl.engine.update import adamw
from fusedrl.kernels import linear_logprobs
from helpers import assert_close, distinct_chars

PROMPTS = ["ab", "hello", "x", "1+1=", "abc d", "zz"]
SMALL = {
    "prompts_per_step": 2,
    "samples_per_prompt": 3,
    "max_new_tokens": 6,
    "learning_rate": 1e-3,
    "critic_learning_rate": 1e-3,
    "progress": False,
    # The reference rollout: these tests' seeded draws were written against it (test_reward_model_scores' check
    # reads the score before a sampled pad id); the other backends are tests/test_rollout_backends.py's.
    "rollout_backend": "hf",
}


def make(tok, reward=None, **overrides):
    cfg = PPOConfig(**{**SMALL, **overrides})
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    return PPOTrainer(policy, tok, reward if reward is not None else distinct_chars, cfg)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_one_step_ratio_starts_at_one_and_updates(tok, monkeypatch):
    tr = make(tok, temperature=0.7, ppo_epochs=1, num_minibatches=1, max_tokens_per_microbatch=4096)
    seen = []
    real = ppo_mod.linear_ppo_loss

    def spy(hidden, weight, labels, old_logp, advantages, *a, **kw):
        # The new log-probs the loss is about to use: same weights as the rollout, so exp(new - old) == 1.
        new = linear_logprobs(hidden.detach(), weight.detach(), labels, temperature=kw["config"].temperature)
        seen.append(((new - old_logp).abs().max().item(), labels.numel()))
        return real(hidden, weight, labels, old_logp, advantages, *a, **kw)

    monkeypatch.setattr(ppo_mod, "linear_ppo_loss", spy)
    before_pi, before_v = params(tr.policy), params(tr.critic)
    torch.manual_seed(0)
    m = tr.step(PROMPTS[:2])
    assert len(seen) == 1 and seen[0][1] == int(tr.buffer.response_mask().sum())  # one micro-batch, all responses
    assert seen[0][0] < 1e-5, f"old logp recomputed differs from new logp by {seen[0][0]}"
    assert abs(m["policy/ratio_max"] - 1.0) < 1e-5 and m["policy/clipfrac"] == 0.0
    assert abs(m["policy/approx_kl"]) < 1e-8
    for k, v in m.items():
        assert math.isfinite(v), f"metric {k} = {v}"
    for k in ("rollout/reward_mean", "rollout/response_len", "objective/kl", "policy/entropy", "loss/policy",
              "loss/value", "value/explained_variance", "perf/tokens_per_s", "perf/step_s", "perf/rollout_s",
              "perf/score_s", "perf/update_s", "perf/peak_mem_gb"):  # fmt: skip
        assert k in m, k
    assert m["objective/kl"] == 0.0  # the reference is the policy before its first update
    moved = [k for k, v in params(tr.policy).items() if not torch.equal(v, before_pi[k])]
    assert len(moved) == len(before_pi), f"parameters that did not move: {set(before_pi) - set(moved)}"
    assert any(not torch.equal(v, before_v[k]) for k, v in params(tr.critic).items())
    assert all(torch.equal(p, before_pi[k]) for k, p in tr.ref_policy.named_parameters())
    assert tr.global_step == 1


def test_packed_scoring_matches_plain_forward(tok, monkeypatch):
    """old/ref log-probs (at the sampling temperature, not 1) and the token layout against a plain
    per-sequence forward, with a token budget that forces several micro-batches."""
    T = 0.6
    tr = make(tok, temperature=T, max_tokens_per_microbatch=16, max_new_tokens=8)
    seen_mbs = []
    real = trainer_mod.PPOTrainer._micro_batches

    def spy(self, ids):
        seen_mbs.append(real(self, ids))
        return seen_mbs[-1]

    monkeypatch.setattr(trainer_mod.PPOTrainer, "_micro_batches", spy)
    ref_before = params(tr.ref_policy)
    policy_before = {k: v.clone() for k, v in tr.policy.state_dict().items()}  # the weights that scored
    torch.manual_seed(1)
    tr.step(PROMPTS[2:4])
    assert len(seen_mbs[0]) >= 2, "the token budget should have split the rollout"
    buf = tr.buffer
    plain = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    plain.load_state_dict(policy_before)
    offsets, tokens, resp = buf.offsets(), buf.tokens(), buf.response_mask()
    old_logp, ref_logp = buf.field("old_logp"), buf.field("ref_logp")
    for i in range(len(buf)):
        a, b = int(offsets[i]), int(offsets[i + 1])
        ids = torch.from_numpy(np.asarray(tokens[a:b])).long()[None]
        with torch.no_grad():
            logits = plain(ids).logits[0].double() / T
        lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
        r = torch.from_numpy(np.asarray(resp[a + 1 : b])).bool()
        assert r.any() and not bool(resp[a])
        assert_close(torch.from_numpy(old_logp[a + 1 : b])[r], lp[r], atol=2e-5, name=f"old_logp seq {i}")
        assert_close(torch.from_numpy(ref_logp[a + 1 : b])[r], lp[r], atol=2e-5, name=f"ref_logp seq {i}")
        # Prompt positions carry no per-token values.
        assert not np.asarray(old_logp[a : a + 1]).any()
    assert all(torch.equal(p, ref_before[k]) for k, p in tr.ref_policy.named_parameters())


def test_values_match_plain_critic_forward(tok):
    tr = make(tok, max_tokens_per_microbatch=16)
    critic_before = {k: v.clone() for k, v in tr.critic.state_dict().items()}
    torch.manual_seed(2)
    tr.step(PROMPTS[:2])
    from fusedrl.engine.heads import ValueModel

    plain = ValueModel.from_causal_lm(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0))
    plain.load_state_dict(critic_before)
    buf = tr.buffer
    offsets, tokens, resp, values = buf.offsets(), buf.tokens(), buf.response_mask(), buf.field("values")
    for i in range(len(buf)):
        a, b = int(offsets[i]), int(offsets[i + 1])
        ids = torch.from_numpy(np.asarray(tokens[a:b])).long()[None]
        with torch.no_grad():
            v = plain(ids)[0]  # value of the state after token t = the value stored at token t + 1
        r = torch.from_numpy(np.asarray(resp[a + 1 : b])).bool()
        assert_close(torch.from_numpy(values[a + 1 : b])[r], v[:-1][r], atol=2e-5, name=f"values seq {i}")


def test_micro_batches_sum_to_the_full_batch(tok):
    """Global token counts as denominators: the same rollout split in micro-batches (with gradient
    checkpointing on) gives the same losses and gradient norms as one micro-batch."""
    out = []
    for budget in (4096, 14):
        tr = make(tok, max_tokens_per_microbatch=budget, loss_agg="seq-mean-token-mean", max_grad_norm=None,
                  gradient_checkpointing=budget < 4096)  # fmt: skip
        assert tr.policy.model.gradient_checkpointing == tr.critic.backbone.gradient_checkpointing == (budget < 4096)
        torch.manual_seed(3)
        out.append(tr.step(PROMPTS[:2]))
    for k in ("loss/policy", "loss/value", "policy/grad_norm", "value/grad_norm", "policy/entropy"):
        assert out[1][k] == pytest.approx(out[0][k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++"])
def test_critic_free_estimators(tok, estimator):
    tr = make(tok, advantage_estimator=estimator, adaptive_kl=True, kl_target=0.01, kl_horizon=10.0,
              ppo_epochs=2, num_minibatches=2)  # fmt: skip
    assert tr.critic is None
    before = params(tr.policy)
    torch.manual_seed(4)
    m1 = tr.step(PROMPTS[:2])
    m2 = tr.step(PROMPTS[2:4])
    for m in (m1, m2):
        assert all(math.isfinite(v) for k, v in m.items() if k != "value/explained_variance"), m
        assert "loss/value" not in m
    assert any(not torch.equal(v, before[k]) for k, v in params(tr.policy).items())
    # After one update the policy differs from the reference: measured KL > 0.
    assert m2["objective/kl"] != 0.0
    # Adaptive controller moved the coefficient (KL below target on step 1 -> smaller beta).
    assert m2["objective/kl_coef"] != m1["objective/kl_coef"]
    # grpo/rloo: KL in the loss by default; reinforce++: in the reward.
    assert tr.config.kl_in_reward_resolved == (estimator == "reinforce++")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(policy_loss="cispo", clip_low=1.0, clip_high=4.0),
        dict(policy_loss="sapo", importance_sampling_level="sequence"),
        dict(
            importance_sampling_level="sequence-token",
            clip_delta=1.5,
            kl_importance_weighted=True,
            kl_estimator="abs",
            kl_clamp=5.0,
            loss_agg="seq-mean-token-sum-norm",
            group_std="unbiased",
        ),
    ],
    ids=["cispo", "gspo-sapo", "gspo-token-delta-kl"],
)
def test_policy_loss_settings_reach_the_loss(tok, monkeypatch, overrides):
    """PPOConfig's loss settings arrive in the fused loss's PPOLossConfig (Dr. GRPO's constant length is
    max_new_tokens), and two GRPO steps train with finite metrics, the per-direction clip fractions included."""
    seen = []
    real = ppo_mod.linear_ppo_loss

    def spy(*a, **kw):
        seen.append(kw["config"])
        return real(*a, **kw)

    monkeypatch.setattr(ppo_mod, "linear_ppo_loss", spy)
    tr = make(tok, advantage_estimator="grpo", ppo_epochs=2, kl_coef=0.05, **overrides)
    torch.manual_seed(6)
    ms = [tr.step(PROMPTS[:2]), tr.step(PROMPTS[2:4])]
    loss_cfg = seen[-1]
    for k, v in overrides.items():
        if k == "loss_agg":
            assert loss_cfg.agg == v and loss_cfg.agg_norm_length == tr.config.max_new_tokens
        elif k != "group_std":
            assert getattr(loss_cfg, k) == v, k
    for m in ms:
        assert all(math.isfinite(v) for v in m.values()), m
        for k in ("policy/clipfrac_low", "policy/clipfrac_high", "policy/dualclip_frac"):
            assert k in m, k


def test_group_advantages_use_groups_of_samples(tok):
    """grpo: groups whose samples all score the same get zero advantage."""
    tr = make(tok, advantage_estimator="grpo", kl_coef=0.0, reward=lambda p, c: [float(len(q)) for q in p])
    torch.manual_seed(5)
    tr.step(PROMPTS[:2])
    adv = tr.buffer.field("advantages")
    assert not np.asarray(adv).any()


def test_reward_model_scores(tok):
    rm = build_reward_model("tiny-llama", vocab_size=len(tok), seed=7)
    tr = make(tok, reward=rm, max_tokens_per_microbatch=16)
    torch.manual_seed(6)
    m = tr.step(PROMPTS[:2])
    buf = tr.buffer
    scores = []
    for i in range(len(buf)):
        a, b = int(buf.offsets()[i]), int(buf.offsets()[i + 1])
        ids = torch.from_numpy(np.asarray(buf.tokens()[a:b])).long()[None]
        with torch.no_grad():
            scores.append(rm(ids).logits[0, 0].item())
    assert m["rollout/reward_mean"] == pytest.approx(float(np.mean(scores)), abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_bad_prompts(tok):
    tr = make(tok)
    with pytest.raises(ValueError, match="prompts is empty"):
        tr.train([])
    with pytest.raises(ValueError, match="prompts is empty"):
        tr.step([])
    with pytest.raises(ValueError, match=r"prompts\[1\] is 600 tokens long.*context is 512"):
        tr.step(["ok", "a" * 600])
    with pytest.raises(ValueError, match=r"prompts\[0\].*zero tokens"):
        tr.step([""])
    with pytest.raises(TypeError, match="single str"):
        tr.step("abc")


@pytest.mark.parametrize(
    "reward, match",
    [
        (lambda p, c: [float("nan")] * len(c), "non-finite reward nan for completion 0"),
        (lambda p, c: [0.0, math.inf] + [0.0] * (len(c) - 2), "non-finite reward inf for completion 1"),
        (lambda p, c: [1.0, 2.0, 3.0], "returned 3 rewards for 6 completions"),
        (lambda p, c: None, "sequence of numbers"),
    ],
)
def test_bad_reward_callable(tok, reward, match):
    tr = make(tok, reward=reward)
    with pytest.raises((ValueError, TypeError), match=match):
        tr.step(PROMPTS[:2])


def test_bad_construction(tok):
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    with pytest.raises(TypeError, match="reward must be"):
        PPOTrainer(policy, tok, "count_token", PPOConfig(progress=False))
    with pytest.raises(ValueError, match="critic is only used"):
        PPOTrainer(policy, tok, count_token, PPOConfig(advantage_estimator="grpo"), critic=torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="samples_per_prompt.*>= 2"):
        PPOConfig(advantage_estimator="rloo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        PPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="k3\\+"):
        PPOConfig(advantage_estimator="gae", kl_estimator="k3+")
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        make(tok, max_tokens_per_microbatch=5).step(PROMPTS[:1])


# ----------------------------------------------------------------------------------------------------
# Stages on the training device, logit scales, non-finite updates
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["gae", "reinforce++"])
def test_advantages_run_on_the_training_device_through_the_gae_kernel(tok, device, estimator, monkeypatch):
    """The advantage stage gets (R,) tensors on the policy's device and runs fusedrl.kernels.gae with the
    trainer's backend: the Triton kernel (under the interpreter on CPU with backend='triton', compiled with
    'auto' on CUDA), never a CPU detour."""
    import sys

    gae_module = sys.modules["fusedrl.kernels.gae"]
    seen = []
    real_triton = gae_module._gae_triton

    def spy(rewards, values, cu_seqlens, *args):
        seen.append((rewards.device, values.device, cu_seqlens.device))
        return real_triton(rewards, values, cu_seqlens, *args)

    monkeypatch.setattr(gae_module, "_gae_triton", spy)
    backend = "triton" if device.type == "cpu" else "auto"
    cfg = PPOConfig(**{**SMALL, "advantage_estimator": estimator, "backend": backend})
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0).to(device)
    tr = PPOTrainer(policy, tok, distinct_chars, cfg)
    torch.manual_seed(7)
    m = tr.step(PROMPTS[:2])
    assert seen, "the Triton GAE kernel did not run inside the trainer"
    assert all(d.type == device.type for devs in seen for d in devs), seen
    assert tr.layout.cu.device.type == device.type
    assert math.isfinite(m["objective/advantage_mean"])


def _granite(tok, scaling: float):
    import transformers

    cfg = transformers.GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     logits_scaling=scaling, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.GraniteForCausalLM(cfg).eval()


def test_logit_scale_reaches_scoring_and_the_loss(tok, monkeypatch):
    """Granite divides its logits by logits_scaling before generate() samples: the engine's old/ref log-probs
    and the loss must score that same distribution (temperature / scale in the fused head), not the bare head."""
    T = 0.8
    policy = _granite(tok, 4.0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    seen = []
    real = ppo_mod.linear_ppo_loss

    def spy(hidden, weight, labels, old_logp, advantages, *a, **kw):
        new = linear_logprobs(hidden.detach(), weight.detach(), labels, temperature=kw["config"].temperature)
        seen.append((new - old_logp).abs().max().item())
        return real(hidden, weight, labels, old_logp, advantages, *a, **kw)

    monkeypatch.setattr(ppo_mod, "linear_ppo_loss", spy)
    tr = PPOTrainer(policy, tok, distinct_chars, PPOConfig(**{**SMALL, "temperature": T}))
    assert tr.logit_scale == 0.25
    torch.manual_seed(8)
    m = tr.step(PROMPTS[:2])
    plain = _granite(tok, 4.0)
    plain.load_state_dict(before)
    buf = tr.buffer
    offsets, tokens, resp, old_logp = buf.offsets(), buf.tokens(), buf.response_mask(), buf.field("old_logp")
    for i in range(len(buf)):
        a, b = int(offsets[i]), int(offsets[i + 1])
        ids = torch.from_numpy(np.asarray(tokens[a:b])).long()[None]
        with torch.no_grad():
            logits = plain(ids).logits[0].double() / T  # transformers applies logits_scaling in forward
        lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
        r = torch.from_numpy(np.asarray(resp[a + 1 : b])).bool()
        assert_close(torch.from_numpy(old_logp[a + 1 : b])[r], lp[r], atol=2e-5, name=f"old_logp seq {i}")
    assert seen and max(seen) < 1e-5, seen  # the loss's new log-probs use the same temperature / scale
    assert abs(m["policy/ratio_max"] - 1.0) < 1e-5


def test_non_finite_loss_skips_the_optimizer_step(tok, monkeypatch, tmp_path):
    """A NaN loss on one mini-batch skips that optimizer step (weights and Adam state untouched, a warning, a
    metric); the next mini-batch trains and the checkpoint holds finite weights."""
    real = ppo_mod.linear_ppo_loss
    calls = []

    def nan_first(*a, **kw):
        loss, m = real(*a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), m

    monkeypatch.setattr(ppo_mod, "linear_ppo_loss", nan_first)
    tr = make(tok, advantage_estimator="grpo", num_minibatches=2, output_dir=str(tmp_path / "run"))
    before = params(tr.policy)
    torch.manual_seed(9)
    with pytest.warns(RuntimeWarning, match="step 0: non-finite policy loss.*skipped"):
        m = tr.step(PROMPTS[:2])
    assert m["train/skipped_steps"] == 1.0
    after = params(tr.policy)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(v, before[k]) for k, v in after.items()), "the second mini-batch must still train"
    tr.save_checkpoint()  # refuses non-finite weights: would raise had the NaN step gone through
    assert (tmp_path / "run" / "ckpt-1").is_dir()


def test_fresh_run_into_an_existing_run_is_refused(tok, tmp_path):
    out = tmp_path / "run"
    tr = make(tok, advantage_estimator="grpo", total_steps=1, save_every=1, output_dir=str(out))
    tr.train(PROMPTS[:2])
    files = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="already holds a run.*--resume.*--overwrite"):
        make(tok, advantage_estimator="grpo", total_steps=1, output_dir=str(out)).train(PROMPTS[:2])
    assert sorted(p.name for p in out.iterdir()) == files
    with pytest.warns(RuntimeWarning, match="nothing to resume.*starting from step 0"):
        rows = make(tok, total_steps=1, output_dir=str(tmp_path / "empty")).train(PROMPTS[:2], resume=True)
    assert [r["step"] for r in rows] == [1] and (tmp_path / "empty" / "policy").is_dir()
    rows = make(tok, advantage_estimator="grpo", total_steps=1, output_dir=str(out)).train(PROMPTS[:2], overwrite=True)
    assert len(rows) == 1 and not (out / "ckpt-1").exists()


# ----------------------------------------------------------------------------------------------------
# Rollout sampling and the step's memory
# ----------------------------------------------------------------------------------------------------
def _frequencies_match(tokens, probs, n):
    """Every token's count within 5 standard deviations of n * p, and never a token of probability 0."""
    f = torch.bincount(tokens, minlength=len(probs)).double() / n
    p = probs.double()
    z = (f - p).abs() / (p * (1 - p) / n).sqrt().clamp(min=1e-12)
    assert float(z.max()) < 5, (
        f"token {int(z.argmax())}: frequency {float(f[z.argmax()])}, probability {float(p[z.argmax()])}"
    )
    assert not bool((f[p == 0] > 0).any()), "drew a token of probability 0"


def test_sampler_draws_from_softmax_of_logits_over_temperature(monkeypatch):
    from fusedrl.engine import sampling

    # Blocks of 8 over V=37: four full blocks, a short last one, a -inf token and a whole block of -inf.
    monkeypatch.setattr(sampling, "_SAMPLE_BLOCK", 8)
    torch.manual_seed(0)
    V, n, T = 37, 40000, 0.7
    logits = torch.randn(V) * 1.5
    logits[5] = logits[16:24] = -math.inf
    _frequencies_match(sampling.sample_next_tokens(logits.expand(n, V).clone(), T), torch.softmax(logits / T, -1), n)
    # A row with NaN, or no finite logit, raises instead of drawing anything.
    for bad in (torch.tensor([0.0, math.nan, 1.0]), torch.full((3,), -math.inf)):
        with pytest.raises(RuntimeError, match="probability tensor"):
            sampling.sample_next_tokens(bad[None].clone(), 1.0)


def test_sampler_with_top_k_top_p_matches_transformers_warpers(monkeypatch):
    from fusedrl.engine import sampling
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    monkeypatch.setattr(sampling, "_SAMPLE_BLOCK", 8)
    torch.manual_seed(1)
    V, n, T = 41, 40000, 0.9
    logits = torch.randn(V) * 0.6
    out = sampling.NextTokenSampler(T, top_p=0.8, top_k=12)(None, logits.expand(n, V).clone())
    # What generate's argmax sees: 0 at the drawn token, -inf elsewhere.
    assert bool((out.max(-1).values == 0).all()) and int(torch.isfinite(out).sum()) == n
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(12)(None, (logits / T)[None]))[0]
    _frequencies_match(out.argmax(-1), torch.softmax(warped, -1), n)


def test_generate_with_top_k_1_is_greedy_decoding(tok):
    """The sampler's draw is the token generate emits (EOS and padding handled by generate as before)."""
    from fusedrl.engine.sampling import generate_responses

    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3)
    prompts = [tok("hello")["input_ids"], tok("ab")["input_ids"]]
    got = generate_responses(policy, prompts, max_new_tokens=7, temperature=0.8, top_k=1, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    for p, r in zip(prompts, got):
        want = policy.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=7, pad_token_id=tok.pad_token_id)[0, len(p):]  # fmt: skip
        assert r == want.tolist()


def test_generation_holds_few_vocabulary_sized_tensors(tok):
    """No (B, V) buffers beyond the three generate's loop holds (the model's last logits, its float32 copy, the
    previous token's scores): no processor clones the scores (min_new_tokens=0 used to add one), the sampler
    works in place. The torch allocator's peak during a rollout at V=32000 stays under 4 (B, V) float32."""
    from fusedrl.engine.sampling import generate_responses
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline  # as bench/common.py

    V, B = 32000, 8
    policy = build_causal_lm("tiny-llama", vocab_size=V, seed=0)
    prompts = [tok(p)["input_ids"] for p in ["ab", "hello", "x", "1+1="] * 2]
    generate_responses(policy, prompts[:1], max_new_tokens=2, temperature=1.0, eos_token_id=None, pad_token_id=0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        generate_responses(policy, prompts, max_new_tokens=6, temperature=1.0, eos_token_id=None, pad_token_id=0)
    live = peak = 0
    for _, action, _, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    assert peak < 4 * B * V * 4, f"rollout peak {peak / 2**20:.1f} MiB = {peak / (B * V * 4):.1f} (B, V) buffers"


def test_step_reports_the_peak_memory_of_each_phase(tok):
    tr = make(tok, advantage_estimator="grpo")
    torch.manual_seed(0)
    m = tr.step(PROMPTS[:2])
    phases = [m[f"perf/peak_mem_{k}_gb"] for k in ("rollout", "score", "advantages", "update")]
    assert all(math.isfinite(v) and v > 0 for v in phases), phases
    assert m["perf/peak_mem_gb"] == max(phases)


def test_optimizer_is_fused_adamw_with_the_plain_update(tok):
    """Fused AdamW (no per-step temporaries) makes the update the for-loop AdamW makes, to rounding."""
    tr = make(tok, advantage_estimator="grpo")
    assert tr.policy_optimizer.defaults["fused"] is True
    torch.manual_seed(0)
    ps = [torch.randn(37, 5), torch.randn(11)]
    a = [torch.nn.Parameter(p.clone()) for p in ps]
    b = [torch.nn.Parameter(p.clone()) for p in ps]
    fused = adamw(a, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ps]
        for opt, params in ((fused, a), (plain, b)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(a, b):
        assert_close(x.detach(), y.detach(), atol=1e-6, rtol=1e-5)


def _step_peak_bytes(tr, prompts):
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline  # as bench/common.py

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        tr.step(prompts)
    live = peak = 0
    for _, action, _, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def test_step_peak_is_bound_by_the_head_weights(tok):
    """At a large vocabulary the (V, H) head dominates the model: a GRPO step's torch-allocator peak stays
    under 3.25 head-sized float32 buffers (its gradient, the fused op's dW accumulator, one (H, V) chunk of
    logits, ...). The default per-tensor AdamW (~3 copies of each weight per step) with the kernels' own
    (256, V) chunks of logits made it 4.1."""
    V = 16384
    policy = build_causal_lm("tiny-llama", vocab_size=V, seed=0)
    cfg = PPOConfig(**{**SMALL, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
                    advantage_estimator="grpo", kl_coef=0.04, max_tokens_per_microbatch=4096)  # fmt: skip
    tr = PPOTrainer(policy, tok, distinct_chars, cfg)
    torch.manual_seed(0)
    tr.step(PROMPTS[:2])  # the optimizer's state is made on its first step
    head = V * policy.config.hidden_size * 4
    peak = _step_peak_bytes(tr, PROMPTS[2:4])
    assert peak < 3.25 * head, f"step peak {peak / 2**20:.1f} MiB = {peak / head:.2f} x the head's size"


def test_every_stop_id_ends_a_response(tok):
    """A chat model ends its turn with a template token its generation config lists beside the eos: the rollout
    stops at the first of any of them and keeps it (it carries the loss that teaches the policy to stop)."""
    from fusedrl.engine.sampling import generate_responses, stop_token_ids

    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    turn_end = tok.convert_tokens_to_ids("z")
    head = torch.nn.Linear(policy.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[turn_end] = 30.0  # every sampled token is the turn end
    policy.lm_head = head
    prompt = [tok("ab")["input_ids"]]
    kw = dict(max_new_tokens=5, temperature=1.0, pad_token_id=tok.pad_token_id)
    assert generate_responses(policy, prompt, eos_token_id=tok.eos_token_id, **kw) == [[turn_end] * 5]
    policy.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    stops = stop_token_ids(tok, policy)
    assert stops == [tok.eos_token_id, turn_end]
    assert generate_responses(policy, prompt, eos_token_id=stops, **kw) == [[turn_end]]
    tr = PPOTrainer(policy, tok, distinct_chars, PPOConfig(**{**SMALL, "advantage_estimator": "grpo"}))
    m = tr.step(PROMPTS[:2])
    assert tr.buffer.response_mask().sum() == 6 and m["rollout/eos_frac"] == 1.0  # 6 responses of one token


def test_more_torch_threads_than_cpus_warns(tok, monkeypatch):
    import warnings

    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    monkeypatch.setattr(distributed, "available_cpus", lambda: torch.get_num_threads())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        PPOTrainer(policy, tok, distinct_chars, PPOConfig(**SMALL))  # threads == CPUs: silent
    monkeypatch.setattr(distributed, "available_cpus", lambda: torch.get_num_threads() - 1)
    with pytest.warns(RuntimeWarning, match="CPU threads but this process may run on"):
        PPOTrainer(policy, tok, distinct_chars, PPOConfig(**SMALL))


def test_the_step_copies_per_token_fields_to_the_host_only_when_the_buffer_is_read(tok, monkeypatch):
    """Nothing test-only on the hot path: a step leaves its per-token tensors on the device; reading
    ``trainer.buffer`` copies them into its fields once."""
    from fusedrl.engine.scoring import ResponseLayout

    copies = []
    real = ResponseLayout.to_buffer
    monkeypatch.setattr(ResponseLayout, "to_buffer", lambda self, buf, name, t: copies.append(name) or real(
        self, buf, name, t))  # fmt: skip
    tr = make(tok)  # gae: old / ref log-probs, values, rewards, advantages, returns
    torch.manual_seed(0)
    tr.step(PROMPTS[:2])
    assert copies == []
    adv = tr.buffer.field("advantages")
    assert sorted(copies) == ["advantages", "old_logp", "ref_logp", "returns", "rewards", "values"]
    assert np.asarray(adv)[np.asarray(tr.buffer.response_mask()).astype(bool)].any()
    tr.buffer.field("old_logp")
    assert len(copies) == 6  # once per step


def test_the_buffer_keeps_each_sequence_s_group_id_and_score(tok):
    """Each trajectory carries its group (the prompt's index in the step) and its score (the step's reward), and
    the group estimator reads the group ids: every group's advantages are baselined within the group."""
    seen = []

    def reward(prompts, completions):
        seen.append((list(prompts), list(completions)))
        return [float(len(set(c))) + 10.0 * (p == "hello") for p, c in zip(prompts, completions)]

    tr = make(tok, reward, advantage_estimator="grpo")
    torch.manual_seed(0)
    tr.step(["hello", "x"])
    (prompts, completions), buf = seen[0], tr.buffer
    assert prompts == ["hello"] * 3 + ["x"] * 3
    np.testing.assert_array_equal(buf.group_ids(), [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(buf.scores(), reward(prompts, completions))
    adv = torch.from_numpy(buf.field("advantages"))
    mask = torch.from_numpy(buf.response_mask())
    seq = torch.repeat_interleave(torch.arange(len(buf)), torch.from_numpy(buf.lengths()))
    last = [int(np.flatnonzero(np.asarray(mask) & (seq.numpy() == i))[-1]) for i in range(len(buf))]
    per_seq = adv[last].view(2, 3)  # a sequence's advantage sits on every one of its response tokens
    torch.testing.assert_close(per_seq.mean(1), torch.zeros(2), atol=1e-5, rtol=0)  # the +10 of "hello" is gone
