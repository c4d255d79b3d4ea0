"""fusedrl.integrations.trl.FusedGRPOTrainer against TRL's own GRPOTrainer: on a tiny Llama built in code, the char
tokenizer and a fixed batch, TRL's ``_compute_loss`` and ours give the same loss, the same gradient for every
parameter and the same logged metrics, for each loss type, with KL and entropy terms, at a temperature != 1;
three ways where it matters (ours and TRL in float32 against TRL in float64). Spies prove which path ran: the
fused loss must not call TRL's loss or its chunked log-prob op, the TRL-math path must not call TRL's op."""

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


def make(cls, model_dir, tmp_path, *, dtype=torch.float32, extra=None, **overrides):
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
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def batch(model_dir, tmp_path_factory):
    """What TRL's generation step hands _compute_loss, built by hand so that every case is present: a left-
    padded prompt; full, partial, one-token and empty completions; old log-probs 0.3 nats off the current ones
    (so both clip directions trigger) and reference log-probs 0.1 nats off."""
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
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": (logp + 0.3 * torch.randn(B, C, generator=g)) * completion_mask,
        "ref_per_token_logps": (logp + 0.1 * torch.randn(B, C, generator=g)) * completion_mask,
        # the generation batch spans two micro-batches; the other one has 17 completion tokens
        "num_items_in_batch": completion_mask.sum() + 17,
    }  # fmt: skip


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
FUSED_CASES = [
    dict(loss_type="grpo", beta=0.04, entropy_coef=0.0),
    dict(loss_type="grpo", beta=0.0, entropy_coef=0.01),  # the advantages absorb the per-sequence weight
    dict(loss_type="bnpo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dr_grpo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dapo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dapo", beta=0.0, entropy_coef=0.0, epsilon=0.1, epsilon_high=0.1, temperature=1.0),
    dict(loss_type="luspo", beta=0.04, entropy_coef=0.01),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_loss_matches_trl(case, model_dir, batch, tmp_path, spies):
    trl32 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, **case), batch)
    trl64 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, dtype=torch.float64, **case), batch)
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, **case)
    assert fused.fallback_reason(batch) is None
    spies["trl_logprobs"]()
    spies["trl_loss"]()
    ours = loss_and_grads(fused, batch)
    check_against_trl(ours, trl32, trl64)

    metrics, trl_metrics = ours[2], trl32[2]
    assert metrics["fusedrl/fused_loss"] == 1.0
    assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0  # both clips hit
    shared = {"kl", "entropy", "clip_ratio/region_mean", "policy_loss", "entropy_coef"} & trl_metrics.keys()
    assert {"entropy", "clip_ratio/region_mean"} <= shared
    assert shared <= metrics.keys()
    for key in shared:
        assert_close(metrics[key], trl_metrics[key], atol=1e-5 * max(abs(trl_metrics[key]), 1.0), name=key)


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


def test_fused_loss_triton_backend(model_dir, batch, tmp_path, spies):
    """The same parity with the Triton kernels (interpreter on CPU)."""
    case = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    trl32 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, **case), batch)
    trl64 = loss_and_grads(make(GRPOTrainer, model_dir, tmp_path, dtype=torch.float64, **case), batch)
    fused = make(FusedGRPOTrainer, model_dir, tmp_path, extra={"fusedrl_backend": "triton"}, **case)
    spies["trl_logprobs"]()
    spies["trl_loss"]()
    check_against_trl(loss_and_grads(fused, batch), trl32, trl64)


# ----------------------------------------------------------------------------------------------------
# TRL's loss math on fusedrl's log-probs: what the fused loss does not express
# ----------------------------------------------------------------------------------------------------
FALLBACK_CASES = [
    (dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, use_bias_correction_kl=True), "use_bias_correction_kl"),
    (dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="cispo", beta=0.0, epsilon_high=5.0), "loss_type='cispo'"),
    (dict(loss_type="sapo", beta=0.0), "loss_type='sapo'"),
    (dict(loss_type="grpo", beta=0.04, entropy_coef=0.01), "both beta and entropy_coef"),
    (dict(loss_type="bnpo", beta=0.0, delta=1.5), "delta"),
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
