"""fusedrl.integrations.trl.FusedGRPOTrainer against TRL's own GRPOTrainer: on a tiny Llama built in code, the char
tokenizer and a fixed batch, TRL's ``_compute_loss`` and ours give the same loss, the same gradient for every
parameter and the same logged metrics, for each loss type and policy-loss variant (clip, delta, cispo, sapo,
sequence-level ratios, the ratio-weighted KL, vLLM's importance-sampling correction), with KL and entropy terms,
at a temperature != 1; three ways where it matters (ours and TRL in float32 against TRL in float64). Spies prove
which path ran: the fused loss must not call TRL's loss or its chunked log-prob op, the TRL-math path must not
call TRL's op."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

trl = pytest.importorskip("trl", reason="the TRL drop-in needs trl (pip install -e '.[test]')")
datasets = pytest.importorskip("datasets", reason="TRL's trainer needs the datasets package")

from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

from fusedrl.engine.models import build_causal_lm  # noqa: E402
from fusedrl.engine.tokenizer import build_char_tokenizer  # noqa: E402
from fusedrl.integrations.trl import FusedGRPOTrainer  # noqa: E402
from helpers import assert_close, assert_kernel_close  # noqa: E402

# The batch, declared once: B completions of up to C tokens after prompts of up to P tokens (left padded).
B, P, C = 4, 5, 7
ACCUM = 2  # gradient-accumulation steps: every normalisation divides by it
BASE = dict(epsilon=0.2, epsilon_high=0.28, temperature=0.9, use_bias_correction_kl=False)
PROMPTS = ["1+1=", "2+3=", "9-4=", "7*2="]

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved to disk: TRL builds its reference model from the policy's path."""
    tok = build_char_tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama")
    build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def digits_reward(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def make(cls, model_dir, tmp_path, *, dtype=torch.float32, extra=None, attrs=None, **overrides):
    """A trainer of ``cls`` on the tiny model; ``attrs`` are trainer attributes set after construction (``use_vllm``:
    GRPOConfig(use_vllm=True) needs vLLM installed, the loss only reads the attribute)."""
    fixed = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=C,
        max_steps=1,
        gradient_accumulation_steps=ACCUM,
        num_iterations=2,
        logging_steps=1,
        save_strategy="no",
    )
    args = GRPOConfig(**{**fixed, **BASE, **overrides})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    trainer = cls(model=model, reward_funcs=digits_reward, args=args,
                  train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                  processing_class=build_char_tokenizer(), **(extra or {}))  # fmt: skip
    trainer.current_gradient_accumulation_steps = ACCUM  # set by Trainer's loop; _compute_loss reads it
    for name, value in (attrs or {}).items():
        setattr(trainer, name, value)
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def scored(model_dir, tmp_path_factory):
    """``{"batch": what TRL's generation step hands _compute_loss, "logp": the current policy's log-probs}``, the
    batch built by hand so that every case is present: a left-padded prompt; full, partial, one-token and empty
    completions; old log-probs 0.3 nats off the current ones (so both clip directions trigger) and reference
    log-probs 0.1 nats off."""
    g = torch.Generator().manual_seed(7)
    prompt_ids = torch.randint(4, 54, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(4, 54, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0
    completion_mask[3, :] = 0
    scorer = make(GRPOTrainer, model_dir, tmp_path_factory.mktemp("scorer"))
    with torch.no_grad():
        logp, _, _ = scorer._get_per_token_logps_and_entropies(
            scorer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), C
        )
    batch = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": (logp + 0.3 * torch.randn(B, C, generator=g)) * completion_mask,
        "ref_per_token_logps": (logp + 0.1 * torch.randn(B, C, generator=g)) * completion_mask,
        # the generation batch spans two micro-batches; the other one has 17 completion tokens
        "num_items_in_batch": completion_mask.sum() + 17,
    }  # fmt: skip
    return {"batch": batch, "logp": logp}


@pytest.fixture(scope="module")
def batch(scored):
    return scored["batch"]


def with_vllm_sampling(batch, mode, clip_min, clip_max):
    """``batch`` plus what TRL's generation step adds with vLLM's importance-sampling correction: the sampler's
    log-probs (0.2 nats off the old ones, 0 on padding as TRL pads them, NaN at one scored token: one vLLM could
    not score) and ``importance_sampling_ratio``, computed here from TRL's documented rule: w = exp(old - sampling)
    per token (NaN differences count as 0) or its product per sequence (``sequence_*``), clamped to [clip_min,
    clip_max] (``*_truncate``) or zeroed outside it (``*_mask``; None = no bound)."""
    g = torch.Generator().manual_seed(11)
    mask, old = batch["completion_mask"], batch["old_per_token_logps"]
    sampling = (old + 0.2 * torch.randn(old.shape, generator=g)) * mask
    sampling[0, 2] = float("nan")
    log_w = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        log_w = log_w.sum(-1, keepdim=True)
    w = torch.exp(log_w)
    if mode.endswith("truncate"):
        ratio = torch.clamp(w, min=clip_min, max=clip_max)
    else:
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        ratio = torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)
    scored = mask.bool() if not mode.startswith("sequence") else mask.bool().any(-1, keepdim=True)
    changed = (ratio != w) & scored
    assert changed.any() and (~changed & scored).any(), "the bounds must act on some weights and not on others"
    return {**batch, "sampling_per_token_logps": sampling, "importance_sampling_ratio": ratio}


def loss_and_grads(trainer, inputs):
    """Loss, {name: grad} of every parameter and the metrics this call logged."""
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def check_against_trl(ours, trl32, trl64):
    """Loss and every gradient: err(ours) <= 2 err(TRL fp32) + 1e-5 relative, both against TRL in float64."""
    (loss, grads, _), (loss32, grads32, _), (loss64, grads64, _) = ours, trl32, trl64
    assert_kernel_close(loss, loss32, loss64, atol=1e-5 * abs(loss64.item()) + 1e-8, name="loss")
    assert_close(loss, loss32, atol=1e-5 * abs(loss32.item()) + 1e-8, name="loss vs TRL fp32")
    assert grads.keys() == grads32.keys() == grads64.keys()
    for name in grads64:
        scale = grads64[name].abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the case tests nothing"
        assert_kernel_close(grads[name], grads32[name], grads64[name], atol=1e-5 * scale, name=name)


@pytest.fixture
def spies(monkeypatch):
    """Make TRL's own loss and its chunked log-prob op raise, where a test says they must not run."""

    def forbid(target, name):
        def boom(*args, **kwargs):
            raise AssertionError(f"{name} ran, but the fused path should have replaced it")

        monkeypatch.setattr(target, "apply" if name == "TRL chunked log-probs" else "_compute_loss", boom)

    return {"trl_logprobs": lambda: forbid(trl_utils._ChunkedLogProbFunction, "TRL chunked log-probs"),
            "trl_loss": lambda: forbid(GRPOTrainer, "GRPOTrainer._compute_loss")}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The fused loss (linear_ppo_loss): every loss type it covers, with KL and entropy
# ----------------------------------------------------------------------------------------------------
SEQ = dict(importance_sampling_level="sequence", epsilon=3e-3, epsilon_high=4e-3)  # GSPO's clip range
FUSED_CASES = [
    dict(loss_type="grpo", beta=0.04, entropy_coef=0.0),
    dict(loss_type="grpo", beta=0.0, entropy_coef=0.01),  # the advantages absorb the per-sequence weight
    dict(loss_type="bnpo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dr_grpo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dapo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dapo", beta=0.0, entropy_coef=0.0, epsilon=0.1, epsilon_high=0.1, temperature=1.0),
    dict(loss_type="luspo", beta=0.04, entropy_coef=0.01),
    # GSPO: sequence-level ratios, clipped per sequence
    dict(loss_type="grpo", beta=0.04, **SEQ),
    dict(loss_type="luspo", beta=0.0, entropy_coef=0.01, **SEQ),
    # two-sided clip: delta caps the unclipped ratio of negative-advantage tokens
    dict(loss_type="bnpo", beta=0.04, entropy_coef=0.01, epsilon=0.02, epsilon_high=0.02, delta=1.03),
    # CISPO: the detached weight clamped at epsilon_high only
    dict(loss_type="cispo", beta=0.04, entropy_coef=0.01, epsilon_high=1.04),
    dict(loss_type="cispo", beta=0.0, epsilon_high=1.002, importance_sampling_level="sequence"),
    # SAPO: the soft gate, grpo's normalisation
    dict(loss_type="sapo", beta=0.04, entropy_coef=0.0),
    dict(loss_type="sapo", beta=0.0, entropy_coef=0.01, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
    # TRL's default use_bias_correction_kl: the KL term times the (differentiated) ratio of the loss's level
    dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, use_bias_correction_kl=True),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, **SEQ),
    # vLLM's importance-sampling correction, each mode (vllm=True: the batch carries the sampler's log-probs)
    dict(loss_type="dapo", beta=0.04, vllm_importance_sampling_mode="token_truncate",
         vllm_importance_sampling_clip_min=0.9, vllm_importance_sampling_clip_max=1.1, vllm=True),
    dict(loss_type="bnpo", beta=0.0, entropy_coef=0.01, vllm_importance_sampling_mode="token_mask",
         vllm_importance_sampling_clip_min=0.8, vllm_importance_sampling_clip_max=None, vllm=True),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, vllm_importance_sampling_mode="sequence_mask",
         vllm_importance_sampling_clip_max=1.3, vllm=True),
    dict(loss_type="dr_grpo", beta=0.04, vllm_importance_sampling_mode="sequence_truncate",
         vllm_importance_sampling_clip_min=0.7, vllm_importance_sampling_clip_max=1.3, vllm=True),
]  # fmt: skip


def case_id(case):
    short = {"importance_sampling_level": "level", "use_bias_correction_kl": "bias_kl",
             "vllm_importance_sampling_mode": "vllm", "vllm_importance_sampling_clip_min": "is_min",
             "vllm_importance_sampling_clip_max": "is_max"}  # fmt: skip
    return "-".join(f"{short.get(k, k)}={v}" for k, v in case.items() if k != "vllm")


@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_fused_loss_matches_trl(case, model_dir, scored, tmp_path, spies):
    case = dict(case)
    batch, attrs = scored["batch"], None
    if case.pop("vllm", False):
        attrs = {"use_vllm": True}  # the loss reads the attribute; GRPOConfig(use_vllm=True) needs vLLM itself
        batch = with_vllm_sampling(batch, case["vllm_importance_sampling_mode"],
                                   case.get("vllm_importance_sampling_clip_min"),
                                   case.get("vllm_importance_sampling_clip_max", 3.0))  # fmt: skip
    trl32 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, attrs=attrs, **case), batch)
    trl64 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, dtype=torch.float64, attrs=attrs, **case), batch)
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, attrs=attrs, **case)
    assert fused.fallback_reason(batch) is None
    spies["trl_logprobs"]()
    spies["trl_loss"]()
    ours = loss_and_grads(fused, batch)
    check_against_trl(ours, trl32, trl64)

    # The case exercises what it names: clips on both sides (token level), some clipped sequence, some token
    # whose ratio delta caps.
    metrics, trl_metrics = ours[2], trl32[2]
    assert metrics["fusedrl/fused_loss"] == 1.0
    level = case.get("importance_sampling_level", "token")
    if case["loss_type"] == "cispo":
        assert trl_metrics["cispo_clip_ratio"] > 0
    elif case["loss_type"] != "sapo":
        assert trl_metrics["clip_ratio/region_mean"] > 0
        if level == "token":
            assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
    if case.get("delta") is not None:
        ratio = torch.exp(scored["logp"] - batch["old_per_token_logps"])
        capped = (ratio > case["delta"]) & (batch["advantages"][:, None] < 0) & batch["completion_mask"].bool()
        assert capped.any()
    # Every metric TRL's loss logs, logged equal
    assert {"entropy"} <= trl_metrics.keys() <= metrics.keys()
    for key, value in trl_metrics.items():
        assert_close(metrics[key], value, atol=1e-5 * max(abs(value), 1.0), name=key)


def test_fused_loss_in_eval_mode(model_dir, batch, tmp_path, spies):
    """Eval: no accumulation scaling and dapo's normaliser without the window rescale."""
    case = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    trainers = [make(cls, model_dir, tmp_path, **case) for cls in (GRPOTrainer, FusedGRPOTrainer)]
    losses = []
    for t in trainers:
        t.model.eval()
        with torch.no_grad():
            losses.append(t._compute_loss(t.model, dict(batch)))
    assert trainers[1]._metrics["eval"]["fusedrl/fused_loss"] == [1.0]
    assert_close(losses[1], losses[0], atol=1e-5 * abs(losses[0].item()), name="eval loss")


TRITON_CASES = [
    dict(loss_type="dapo", beta=0.04, entropy_coef=0.01),  # the fused PPO kernel's in-register math
    # delta and the token-level vLLM weights: the fused kernel too; GSPO with the weighted KL: the generic path
    dict(loss_type="bnpo", beta=0.04, epsilon=0.02, epsilon_high=0.02, delta=1.03,
         vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.9,
         vllm_importance_sampling_clip_max=1.1, vllm=True),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, **SEQ),
]  # fmt: skip


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_fused_loss_triton_backend(case, model_dir, batch, tmp_path, spies):
    """The same parity with the Triton kernels (interpreter on CPU)."""
    case, attrs = dict(case), None
    if case.pop("vllm", False):
        attrs = {"use_vllm": True}
        batch = with_vllm_sampling(batch, case["vllm_importance_sampling_mode"],
                                   case["vllm_importance_sampling_clip_min"],
                                   case["vllm_importance_sampling_clip_max"])  # fmt: skip
    trl32 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, attrs=attrs, **case), batch)
    trl64 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, dtype=torch.float64, attrs=attrs, **case), batch)
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, extra={"fusedrl_backend": "triton"}, attrs=attrs, **case)
    spies["trl_logprobs"]()
    spies["trl_loss"]()
    ours = loss_and_grads(fused, batch)
    check_against_trl(ours, trl32, trl64)
    for key, value in trl32[2].items():
        assert_close(ours[2][key], value, atol=1e-5 * max(abs(value), 1.0), name=key)


# ----------------------------------------------------------------------------------------------------
# TRL's loss math on fusedrl's log-probs: what the fused loss does not express
# ----------------------------------------------------------------------------------------------------
FALLBACK_CASES = [
    (dict(loss_type="vespo", beta=0.0), "loss_type='vespo'"),
    (dict(loss_type="dapo", beta=0.04, top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(loss_type="dapo", beta=0.0, entropy_coef=0.01, off_policy_mask_threshold=0.02), "off_policy_mask"),
    (dict(loss_type="grpo", beta=0.04, entropy_coef=0.01), "both beta and entropy_coef"),
    (dict(loss_type="sapo", beta=0.04, entropy_coef=0.01), "both beta and entropy_coef"),
    (dict(loss_type="cispo", beta=0.0), "epsilon_high=0.28 < 1"),  # TRL clamps the weight below 1
    (dict(loss_type="bnpo", beta=0.0, delta=1.0), "clip_delta"),  # PPOLossConfig needs delta > 1
]


@pytest.mark.parametrize("case,why", FALLBACK_CASES, ids=lambda c: c if isinstance(c, str) else c["loss_type"])
def test_trl_loss_on_fused_logprobs(case, why, model_dir, batch, tmp_path, spies):
    trl32 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, **case), batch)
    trl64 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, dtype=torch.float64, **case), batch)
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, **case)
    assert why in fused.fallback_reason(batch)
    spies["trl_logprobs"]()
    ours = loss_and_grads(fused, batch)
    check_against_trl(ours, trl32, trl64)
    assert ours[2]["fusedrl/fused_loss"] == 0.0
    for key, value in trl32[2].items():  # TRL's own math: every metric it logs, equal
        assert_close(ours[2][key], value, atol=1e-5 * max(abs(value), 1.0), name=key)


def test_vllm_correction_needs_sampling_logprobs(model_dir, batch, tmp_path):
    """vLLM's correction without the sampler's log-probs in the batch (a subclass that keeps only TRL's ratio):
    TRL's loss math, which reads the ratio."""
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, loss_type="dapo", beta=0.0, attrs={"use_vllm": True})
    assert "sampling_per_token_logps" in fused.fallback_reason(batch)
    assert fused.fallback_reason(with_vllm_sampling(batch, "sequence_mask", None, 1.3)) is None


def test_on_policy_batch_uses_trl_loss(model_dir, batch, tmp_path, spies):
    """No old log-probs (num_iterations=1): TRL detaches the current ones, ratio == 1; same result."""
    on_policy = {k: v for k, v in batch.items() if k != "old_per_token_logps"}
    case = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    trl32 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, **case), on_policy)
    trl64 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, dtype=torch.float64, **case), on_policy)
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, **case)
    assert "on-policy" in fused.fallback_reason(on_policy)
    spies["trl_logprobs"]()
    check_against_trl(loss_and_grads(fused, on_policy), trl32, trl64)


def test_reference_and_old_logprobs_are_fused(model_dir, batch, tmp_path, spies):
    """The scoring calls of the generation step (policy with entropies, reference without) go through fusedrl."""
    case = dict(loss_type="dapo", beta=0.04)
    trl_trainer = make(GRPOTrainer, model_dir, tmp_path, **case)
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, **case)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        expected = {
            "policy": trl_trainer._get_per_token_logps_and_entropies(
                trl_trainer.model, ids, mask, C, compute_entropy=True
            ),
            "ref": trl_trainer._get_per_token_logps_and_entropies(trl_trainer.ref_model, ids, mask, C),
        }
        spies["trl_logprobs"]()
        policy = fused._get_per_token_logps_and_entropies(fused.model, ids, mask, C, batch_size=3, compute_entropy=True)
        ref = fused._get_per_token_logps_and_entropies(fused.ref_model, ids, mask, C)
    assert_close(policy[0], expected["policy"][0], atol=1e-5, name="policy logp")
    assert_close(policy[1], expected["policy"][1], atol=1e-5, name="policy entropy")
    assert_close(ref[0], expected["ref"][0], atol=1e-5, name="reference logp")
    assert policy[0].abs().sum() > 0 and (policy[0][3] == 0).all()  # the empty completion scores exact zeros


# ----------------------------------------------------------------------------------------------------
# A real training step, generation included, as a user runs it
# ----------------------------------------------------------------------------------------------------
def test_train_step_matches_trl(model_dir, tmp_path):
    """trainer.train() for one optimizer step (two micro-batches, generation, reference, fused loss): the same
    completions (same seed), the same logged metrics and the same weight update as TRL's trainer. Plain SGD, so
    that the update is the (clipped) gradient itself: Adam's g / sqrt(v) would magnify rounding on tiny grads."""
    case = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, learning_rate=1e-2, optim="sgd")
    results = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        trainer = make(cls, model_dir, tmp_path / cls.__name__, per_device_train_batch_size=B // 2, **case)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        log = next(h for h in trainer.state.log_history if "loss" in h)
        results.append((log, {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}))
    ulp = {n: torch.finfo(p.dtype).eps * p.abs().max().item() for n, p in before.items()}
    (trl_log, trl_update), (log, update) = results
    assert log["fusedrl/fused_loss"] == 1.0  # num_iterations=2: old log-probs exist, the fused loss ran
    for key in ("loss", "reward", "entropy", "kl", "clip_ratio/region_mean", "grad_norm"):
        assert_close(log[key], trl_log[key], atol=1e-5 * max(abs(trl_log[key]), 1.0), name=key)
    for name, u in trl_update.items():
        scale = u.abs().max().item()
        assert scale > 0, f"{name} did not move"
        # new - old carries the rounding of the weights themselves: a couple of ulps of the weight
        assert_close(update[name], u, atol=1e-5 * scale + 2 * ulp[name], name=name)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_bad_backend(model_dir, tmp_path):
    with pytest.raises(ValueError, match="fusedrl_backend must be one of"):
        make(FusedGRPOTrainer, model_dir, tmp_path, extra={"fusedrl_backend": "cuda"})


def test_softcapped_model_is_refused(tmp_path):
    from transformers import Gemma2Config

    tok = build_char_tokenizer()
    cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        final_logit_softcapping=30.0,
    )
    path = tmp_path / "gemma2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        make(FusedGRPOTrainer, path, tmp_path)
