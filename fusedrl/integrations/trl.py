"""``FusedGRPOTrainer``: TRL's ``GRPOTrainer`` with its log-probs and its GRPO loss computed by fusedrl's fused
lm_head ops. Same constructor, same ``GRPOConfig``, same logged metrics; one extra keyword, ``fusedrl_backend``.

    from fusedrl.integrations.trl import FusedGRPOTrainer

    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Two levels, both inside the model's forward (so DDP / FSDP wrappers see an ordinary forward call):

1. Every per-token log-prob and entropy TRL asks for (policy, old policy, reference) comes from
   ``fusedrl.kernels.linear_logprobs``: the forward TRL patches onto the model (``fused_lm_head=True``) is
   replaced by one that runs the body and the fused head (``fusedrl.integrations.hf``).
2. When the batch carries old log-probs (``num_iterations > 1``, or more generation steps than accumulation
   steps) and the configuration is one ``fusedrl.kernels.linear_ppo_loss`` expresses, the whole loss --
   clipped surrogate with TRL's epsilon_low / epsilon_high, beta * k3 KL, entropy bonus, the normalisation of
   ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo -- and its gradient come from that op in one pass over
   the lm_head (3 matmuls instead of 4). Anything else (on-policy batches, where the ratio is identically 1
   and TRL's loss on level-1 log-probs costs the same; sequence-level importance sampling, delta, cispo,
   sapo, vespo, entropy masks, vLLM corrections, the ratio-weighted KL of ``use_bias_correction_kl=True`` --
   TRL's default, so set it False for the fused loss when beta != 0 -- ...) runs TRL's own loss math on
   level-1 log-probs: ``trainer.fallback_reason(inputs)`` says which and why, and the metric
   ``fusedrl/fused_loss`` logs the fraction of micro-batches that took the fused loss.

The fused loss logs TRL's ``kl``, ``entropy``, ``clip_ratio/region_mean`` (and ``policy_loss`` /
``entropy_coef`` with an entropy bonus); the per-direction ``clip_ratio/low_*`` / ``high_*`` need per-token
ratios the fused op does not return, and are logged only by the TRL-math path.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch
import torch.nn.functional as F

try:
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as e:  # pragma: no cover - trl is in the [test] / [bench] extras
    raise ImportError("fusedrl.integrations.trl needs TRL: pip install trl") from e

from fusedrl.engine.models import hidden_states, output_head, unwrap
from fusedrl.integrations.hf import head_compute_dtype, fused_head_logprobs
from fusedrl.kernels import BACKENDS, IGNORE_INDEX, PPOLossConfig, linear_ppo_loss

# loss_type values whose per-token loss is the PPO clipped surrogate, and the fusedrl aggregation that gives
# TRL's normalisation (the global denominators are passed explicitly, see FusedGRPOTrainer._aggregation).
_FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Model inputs of vision-language batches: those go through TRL's own loss (its per-chunk slicing of images).
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The model's forward
# ----------------------------------------------------------------------------------------------------
def _grpo_loss_forward(model, args, kwargs, spec: dict, *, head_fp32: bool, backend: str):
    """The fused GRPO loss of one micro-batch: body, then ``linear_ppo_loss`` on the completion tokens packed
    back to back. Returns ``{"loss": 0-dim, "metrics": {...}}``."""
    labels = spec["labels"]  # (B, C) completion tokens, -100 where the loss mask is 0
    hidden = hidden_states(model, *args, **kwargs)  # (B, L, H)
    C = labels.shape[1]
    if hidden.shape[1] <= C:
        raise ValueError(
            f"the batch has {hidden.shape[1]} positions for {C} completion tokens: it needs a prompt of at least "
            "one token, whose last hidden state predicts the first completion token"
        )
    hidden = hidden[:, -C - 1 : -1]  # the hidden state before each completion token predicts it
    weight, bias, scale = output_head(model)
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    valid = labels != IGNORE_INDEX
    # Packing drops padding and masked tokens before the head; cu_seqlens keeps the sequences for the
    # per-sequence normalisations (empty sequences included: they count in the grpo / luspo means).
    cu_seqlens = F.pad(valid.sum(-1).cumsum(0), (1, 0))
    per_token = {k: None if spec[k] is None else spec[k].to(weight.device)[valid]
                 for k in ("old_logp", "advantages", "ref_logp")}  # fmt: skip
    h = hidden[valid]  # (n, H)
    dtype = head_compute_dtype(h, weight, head_fp32)
    config = dataclasses.replace(spec["config"], temperature=spec["config"].temperature / scale)
    with torch.autocast(h.device.type, enabled=False):
        loss, metrics = linear_ppo_loss(
            h.to(dtype), weight.to(dtype), labels[valid], per_token["old_logp"], per_token["advantages"],
            bias=None if bias is None else bias.to(dtype), ref_logp=per_token["ref_logp"], config=config,
            cu_seqlens=cu_seqlens, num_tokens=spec["num_tokens"], num_sequences=spec["num_sequences"],
            backend=backend,
        )  # fmt: skip
    return {"loss": loss, "metrics": metrics}


def patch_forward(model, *, temperature: float, head_fp32: bool = False, entropy: bool = True,
                  backend: str = "auto") -> None:  # fmt: skip
    """Make ``model(..., labels=..., fused_lm_head=True)`` -- the call TRL's trainers score with -- compute its
    log-probs (and entropies) with fusedrl's fused head, and ``model(..., fusedrl_grpo=spec)`` the fused GRPO
    loss. Must run after TRL's own ``add_fused_lm_head``: calls this forward does not handle (no fused head,
    MoE router losses) go to the forward TRL installed."""
    model = unwrap(model)
    output_head(model)  # a non-linear or soft-capped head fails now rather than at the first step
    trl_forward = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                fusedrl_grpo=None, **kwargs):  # fmt: skip
        if fusedrl_grpo is not None:
            return _grpo_loss_forward(self, args, kwargs, fusedrl_grpo, head_fp32=head_fp32, backend=backend)
        router = kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False)
        if not fused_lm_head or router or (labels is None and shift_labels is None):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)  # fmt: skip
        hidden = hidden_states(self, *args, **kwargs)
        if shift_labels is None:  # position t predicts labels[:, t + 1]
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        out = fused_head_logprobs(self, hidden, shift_labels, temperature=temperature, return_entropy=entropy,
                                  head_fp32=head_fp32, backend=backend)  # fmt: skip
        log_probs, ent = out if entropy else (out, None)
        mask = shift_labels.to(log_probs.device) != IGNORE_INDEX
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=ent, label_mask=mask)

    model.forward = types.MethodType(forward, model)


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------
class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs come from ``fusedrl.kernels.linear_logprobs`` and whose GRPO loss, where
    expressible, from ``fusedrl.kernels.linear_ppo_loss`` (see the module docstring). ``fusedrl_backend`` is the
    ops' backend: ``auto`` (Triton on CUDA), ``triton`` or ``torch``."""

    def __init__(self, *args, fusedrl_backend: str = "auto", **kwargs):
        if fusedrl_backend not in BACKENDS:
            raise ValueError(f"fusedrl_backend must be one of {BACKENDS}, got {fusedrl_backend!r}")
        super().__init__(*args, **kwargs)
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "FusedGRPOTrainer does not support DeepSpeed ZeRO-3: the fused lm_head reads the full head weight, "
                "which ZeRO-3 keeps partitioned outside the head's own forward; use ZeRO-2, FSDP or trl.GRPOTrainer"
            )
        self.fusedrl_backend = fusedrl_backend
        head_fp32 = bool(self.args.cast_lm_head_to_fp32)
        patch_forward(self.model, temperature=self.temperature, head_fp32=head_fp32, backend=fusedrl_backend)
        if self.ref_model is not None:
            patch_forward(self.accelerator.unwrap_model(self.ref_model), temperature=self.temperature,
                          head_fp32=head_fp32, entropy=False, backend=fusedrl_backend)  # fmt: skip
        self._static_fallback = self._config_fallback_reason()

    def _config_fallback_reason(self) -> str | None:
        """Why this trainer's configuration needs TRL's loss math (None when linear_ppo_loss expresses it)."""
        a = self.args
        checks = [
            (self.loss_type not in _FUSED_LOSS_TYPES, f"loss_type={self.loss_type!r} is not a clipped surrogate"),
            (self.importance_sampling_level != "token",
             f"importance_sampling_level={self.importance_sampling_level!r} (the fused loss clips per-token ratios)"),
            (a.delta is not None, f"delta={a.delta} (two-sided clipping)"),
            (self.top_entropy_quantile < 1.0, f"top_entropy_quantile={self.top_entropy_quantile} (entropy mask)"),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold is set"),
            (self.use_vllm and self.vllm_importance_sampling_correction, "vLLM importance-sampling correction"),
            (self.use_adaptive_entropy, "use_adaptive_entropy=True"),
            (self.beta != 0.0 and a.use_bias_correction_kl, "use_bias_correction_kl=True"),
            (self.aux_loss_enabled, "MoE router auxiliary loss"),
            (not 0.0 <= self.epsilon_low <= 1.0, f"epsilon={self.epsilon_low} outside [0, 1]"),
            (self.epsilon_high < 0.0, f"epsilon_high={self.epsilon_high} < 0"),
            (self.beta < 0.0, f"beta={self.beta} < 0"),
            # grpo weights the policy and KL terms per sequence but TRL's entropy bonus per token: two different
            # token weights, and linear_ppo_loss has one. (Without the KL term the advantages absorb the ratio.)
            (self.loss_type == "grpo" and self.entropy_coef != 0.0 and self.beta != 0.0,
             "loss_type='grpo' with both beta and entropy_coef"),
        ]  # fmt: skip
        return next((why for bad, why in checks if bad), None)

    def fallback_reason(self, inputs: dict) -> str | None:
        """None when this micro-batch's loss goes through ``linear_ppo_loss``; otherwise why TRL's loss math runs
        (on fusedrl's log-probs)."""
        if self._static_fallback is not None:
            return self._static_fallback
        if inputs.get("old_per_token_logps") is None:
            return "on-policy batch (no old log-probs: the ratio is identically 1)"
        if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
            return "multimodal inputs"
        return None

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        use_fused = self.fallback_reason(inputs) is None
        self._metrics[mode]["fusedrl/fused_loss"].append(float(use_fused))
        if not use_fused:
            return super()._compute_loss(model, inputs)

        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        labels = completion_ids.masked_fill(mask == 0, IGNORE_INDEX)
        advantages = inputs["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand(labels.shape)
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        agg, num_tokens, num_sequences, advantages, entropy_coef = self._aggregation(
            mask, advantages, inputs, mode, accum
        )
        config = PPOLossConfig(
            clip_low=float(self.epsilon_low), clip_high=float(self.epsilon_high), kl_coef=float(self.beta),
            kl_estimator="k3", entropy_coef=entropy_coef, temperature=float(self.temperature), agg=agg,
        )  # fmt: skip
        spec = {
            "labels": labels, "old_logp": inputs["old_per_token_logps"], "advantages": advantages,
            "ref_logp": inputs["ref_per_token_logps"] if self.beta != 0.0 else None, "config": config,
            "num_tokens": num_tokens, "num_sequences": num_sequences,
        }  # fmt: skip
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, fusedrl_grpo=spec)
        loss, metrics = out["loss"], out["metrics"]
        self._log_fused_metrics(mode, loss, metrics, mask, accum)
        return loss

    def _aggregation(self, mask, advantages, inputs, mode, accum):
        """``(agg, num_tokens, num_sequences, advantages, entropy_coef)`` for linear_ppo_loss such that
        ``sum_i w_i (pg_i + beta kl_i) - entropy_coef sum_i w_i H_i`` is TRL's loss for ``self.loss_type``,
        including its division by the gradient-accumulation steps and its token-mean entropy bonus
        ``entropy_coef * sum(H mask) / sum(mask) / accum``."""
        B = mask.shape[0]
        count = mask.sum().to(torch.float32).clamp(min=1.0)  # (,) valid tokens of this micro-batch
        coef = float(self.entropy_coef)
        on = coef != 0.0
        if self.loss_type == "grpo" and not on:
            return "seq-mean-token-mean", None, B * accum, advantages, 0.0
        if self.loss_type == "grpo":
            # The surrogate is positively homogeneous in A, so the per-sequence weight 1 / (len_s B) becomes the
            # token weight 1 / count with A scaled by count / (len_s B); the entropy bonus then needs no rescale.
            lengths = (mask != 0).sum(-1, keepdim=True).to(torch.float32).clamp(min=1.0)
            return "token-mean", count * accum, None, advantages * (count / (lengths * B)), coef
        if self.loss_type == "luspo":
            # weights 1 / (B accum); the bonus's 1 / (count accum) is B / count of that (one host sync).
            return "seq-mean-token-sum", None, B * accum, advantages, coef * B / count.item() if on else 0.0
        if self.loss_type == "bnpo":
            denom = count * accum
        elif self.loss_type == "dr_grpo":
            denom = float(B * self.max_completion_length * accum)
        else:  # dapo: num_items_in_batch spans the generation batch; rescale it to one accumulation window
            denom = inputs["num_items_in_batch"].to(torch.float32).clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                denom = denom * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        # token-mean weights 1 / denom; the bonus wants 1 / (count accum): the ratio (one host sync when on).
        entropy_coef = coef * float(denom) / (count.item() * accum) if on else 0.0
        return "token-mean", denom, None, advantages, entropy_coef

    def _log_fused_metrics(self, mode, loss, metrics, mask, accum):
        """TRL's metrics from the fused loss's masked means (summed over processes like TRL's own)."""
        n = (mask != 0).sum().to(torch.float32)

        def global_mean(local_mean):
            totals = self.accelerator.reduce(torch.stack([local_mean.detach() * n, n]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.entropy_coef != 0.0:
            # policy_loss is TRL's loss before the entropy bonus and before the accumulation scaling (dapo's
            # normaliser already covers one window).
            bonus = self.entropy_coef * metrics["entropy"] / accum
            policy = (loss.detach() + bonus) * (1 if self.loss_type == "dapo" else accum)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(metrics["kl"]))
        self._metrics[mode]["entropy"].append(global_mean(metrics["entropy"]))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(metrics["clipfrac"]))
