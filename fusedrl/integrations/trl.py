"""``FusedGRPOTrainer``: TRL's ``GRPOTrainer`` with its log-probs and its GRPO loss computed by fusedrl's fused
lm_head ops. Same constructor, same ``GRPOConfig``, same logged metrics; one extra keyword, ``fusedrl_backend``.

    from fusedrl.integrations.trl import FusedGRPOTrainer

    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Two levels, both inside the model's forward (so DDP / FSDP wrappers see an ordinary forward call):

1. Every per-token log-prob and entropy TRL asks for (policy, old policy, reference) comes from
   ``fusedrl.kernels.linear_logprobs``: the forward TRL patches onto the model (``fused_lm_head=True``) is
   replaced by one that runs the body and the fused head (``fusedrl.integrations.hf``).
2. When the batch carries old log-probs (``num_iterations > 1``, more generation steps than accumulation steps,
   or vLLM's importance-sampling correction) the whole loss and its gradient come from
   ``fusedrl.kernels.linear_ppo_loss`` in one pass over the lm_head (3 matmuls instead of 4), with TRL's settings
   mapped onto ``PPOLossConfig``:

   - ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo: the clipped surrogate (``epsilon`` / ``epsilon_high``,
     two-sided ``delta`` -> ``clip_delta``); cispo: ``policy_loss='cispo'`` with the weight clamped at
     ``epsilon_high`` only (``clip_low=1``, ``clip_high=epsilon_high - 1``); sapo: ``policy_loss='sapo'`` with
     ``sapo_temperature_pos`` / ``_neg``; each with TRL's normalisation (see ``FusedGRPOTrainer._aggregation``);
   - ``importance_sampling_level`` token / sequence (GSPO) -> the same ``importance_sampling_level``;
   - ``beta`` -> the k3 KL term, ``use_bias_correction_kl`` (TRL's default) -> ``kl_importance_weighted`` (the KL
     times the loss's differentiated ratio); ``entropy_coef`` -> the entropy bonus (a token mean, as TRL's);
   - vLLM's ``vllm_importance_sampling_correction`` -> ``rollout_logp`` = the batch's
     ``sampling_per_token_logps`` (NaN, unscored by vLLM, replaced by the old log-prob: weight 1, as TRL's
     ``nan_to_num``) with ``vllm_importance_sampling_mode`` ``{token,sequence}_{truncate,mask}`` ->
     ``rollout_correction`` tis / mis at ``rollout_correction_level`` token / sequence (the product of the token
     ratios), bounds ``vllm_importance_sampling_clip_min`` / ``_max`` (None: no bound).

   Everything else runs TRL's own loss math on level-1 log-probs: on-policy batches (the ratio is identically 1
   and TRL's loss costs the same), vespo, entropy masks (``top_entropy_quantile < 1``),
   ``off_policy_mask_threshold``, adaptive entropy, MoE router losses, multimodal batches, grpo / sapo with both
   ``beta`` and ``entropy_coef`` (two different token weights), cispo with ``epsilon_high < 1``, settings
   ``PPOLossConfig`` refuses. ``trainer.fallback_reason(inputs)`` says which and why, and the metric
   ``fusedrl/fused_loss`` logs the fraction of micro-batches that took the fused loss.

The fused loss logs the same metric keys as TRL's loss: ``kl``, ``entropy``, ``clip_ratio/low_mean``,
``low_min``, ``high_mean``, ``high_max``, ``region_mean`` (``cispo_clip_ratio`` for cispo), ``policy_loss`` and
``entropy_coef`` with an entropy bonus; the clip flags follow TRL's definitions on the fused op's per-token ratios
(``return_per_token=True``).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch
import torch.nn.functional as F

try:
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as e:  # pragma: no cover - trl is in the [test] / [bench] extras
    raise ImportError("fusedrl.integrations.trl needs TRL: pip install trl") from e

from fusedrl.engine.models import hidden_states, output_head, unwrap
from fusedrl.integrations.hf import head_compute_dtype, fused_head_logprobs
from fusedrl.kernels import BACKENDS, IGNORE_INDEX, PPOLossConfig, linear_ppo_loss

# loss_type values whose per-token loss is the PPO clipped surrogate; with cispo and sapo, those linear_ppo_loss
# expresses (TRL's normalisations: FusedGRPOTrainer._aggregation).
_CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_FUSED_LOSS_TYPES = (*_CLIP_LOSS_TYPES, "cispo", "sapo")
# TRL's vllm_importance_sampling_mode -> (rollout_correction, rollout_correction_level) of PPOLossConfig.
_VLLM_IS_MODES = {
    "token_truncate": ("tis", "token"), "token_mask": ("mis", "token"),
    "sequence_truncate": ("tis", "sequence"), "sequence_mask": ("mis", "sequence"),
}  # fmt: skip
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
                 for k in ("old_logp", "advantages", "ref_logp", "rollout_logp")}  # fmt: skip
    h = hidden[valid]  # (n, H)
    dtype = head_compute_dtype(h, weight, head_fp32)
    config = dataclasses.replace(spec["config"], temperature=spec["config"].temperature / scale)
    with torch.autocast(h.device.type, enabled=False):
        loss, metrics = linear_ppo_loss(
            h.to(dtype), weight.to(dtype), labels[valid], per_token["old_logp"], per_token["advantages"],
            bias=None if bias is None else bias.to(dtype), ref_logp=per_token["ref_logp"],
            rollout_logp=per_token["rollout_logp"], config=config, cu_seqlens=cu_seqlens,
            num_tokens=spec["num_tokens"], num_sequences=spec["num_sequences"], return_per_token=True,
            backend=backend,
        )  # fmt: skip
    # The per-token ratios back in the batch's (B, C) layout, for TRL's clip metrics (1 where nothing is scored).
    ratio = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    ratio[valid] = metrics.pop("per_token")["ratio"].to(torch.float32)
    return {"loss": loss, "metrics": {**metrics, "ratio": ratio}}


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

    @property
    def _vllm_is(self) -> bool:
        """TRL multiplies the policy term by its vLLM importance-sampling ratio (``importance_sampling_ratio``)."""
        return bool(self.use_vllm and self.vllm_importance_sampling_correction)

    def _loss_config(self) -> tuple[PPOLossConfig | None, str | None]:
        """``(config, None)``: the ``PPOLossConfig`` of this trainer's settings (``agg`` and ``entropy_coef`` are
        set per micro-batch by ``_aggregation``); ``(None, why)`` when they need TRL's loss math. Read at every
        micro-batch, so that attributes changed after construction count."""
        a = self.args
        checks = [
            (self.loss_type not in _FUSED_LOSS_TYPES,
             f"loss_type={self.loss_type!r} is not one of the fused losses {_FUSED_LOSS_TYPES}"),
            (self.top_entropy_quantile < 1.0, f"top_entropy_quantile={self.top_entropy_quantile} (entropy mask)"),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold is set (off-policy sequence mask)"),
            (self.use_adaptive_entropy, "use_adaptive_entropy=True"),
            (self.aux_loss_enabled, "MoE router auxiliary loss"),
            (self._vllm_is and self.vllm_importance_sampling_mode not in _VLLM_IS_MODES,
             f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}"),
            (self.loss_type == "cispo" and self.epsilon_high < 1.0,
             f"loss_type='cispo' with epsilon_high={self.epsilon_high} < 1 (the fused weight bound is >= 1)"),
            # grpo and sapo weight the policy and KL terms per sequence but TRL's entropy bonus per token: two
            # different token weights, and linear_ppo_loss has one. (Without the KL term the advantages absorb the
            # per-sequence weight.)
            (self.loss_type in ("grpo", "sapo") and self.entropy_coef != 0.0 and self.beta != 0.0,
             f"loss_type={self.loss_type!r} with both beta and entropy_coef"),
        ]  # fmt: skip
        why = next((why for bad, why in checks if bad), None)
        if why is not None:
            return None, why
        kw = dict(
            policy_loss="clip" if self.loss_type in _CLIP_LOSS_TYPES else self.loss_type,
            importance_sampling_level=self.importance_sampling_level, kl_coef=float(self.beta), kl_estimator="k3",
            kl_importance_weighted=bool(self.beta != 0.0 and a.use_bias_correction_kl),
            temperature=float(self.temperature),
        )  # fmt: skip
        if self.loss_type in _CLIP_LOSS_TYPES:
            kw.update(clip_low=float(self.epsilon_low), clip_high=float(self.epsilon_high), clip_delta=a.delta)
        elif self.loss_type == "cispo":  # TRL's cispo: clamp(ratio, max=epsilon_high), no lower bound
            kw.update(clip_low=1.0, clip_high=float(self.epsilon_high) - 1.0)
        else:
            kw.update(sapo_temperature_pos=float(a.sapo_temperature_pos),
                      sapo_temperature_neg=float(a.sapo_temperature_neg))  # fmt: skip
        if self._vllm_is:
            correction, level = _VLLM_IS_MODES[self.vllm_importance_sampling_mode]
            lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
            # TRL's None is "no bound"; PPOLossConfig's bounds are finite numbers: the largest float32 for no upper
            # bound (a weight above it is inf, where TRL's loss is not finite either) and 0 for no lower bound.
            kw.update(rollout_correction=correction, rollout_correction_level=level,
                      rollout_is_max=float(torch.finfo(torch.float32).max if hi is None else hi),
                      rollout_is_min=0.0 if lo is None else float(lo))  # fmt: skip
        try:
            return PPOLossConfig(**kw), None
        except ValueError as e:
            return None, f"TRL's settings map to a loss configuration the fused op refuses: {e}"

    def fallback_reason(self, inputs: dict) -> str | None:
        """None when this micro-batch's loss goes through ``linear_ppo_loss``; otherwise why TRL's loss math runs
        (on fusedrl's log-probs)."""
        _, why = self._loss_config()
        if why is not None:
            return why
        if inputs.get("old_per_token_logps") is None:
            return "on-policy batch (no old log-probs: the ratio is identically 1)"
        if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
            return "multimodal inputs"
        if self._vllm_is and inputs.get("sampling_per_token_logps") is None:
            return "vLLM importance-sampling correction without sampling_per_token_logps in the batch"
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
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, C)
        old_logp = inputs["old_per_token_logps"]
        rollout_logp = None
        if self._vllm_is:
            # Tokens vLLM could not score carry NaN: the old log-prob there gives weight exp(0) = 1, TRL's nan_to_num.
            sampling = inputs["sampling_per_token_logps"].to(old_logp.dtype)
            rollout_logp = torch.where(torch.isnan(sampling), old_logp, sampling)
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        agg, num_tokens, num_sequences, token_advantages, entropy_coef = self._aggregation(
            mask, advantages.expand(labels.shape), inputs, mode, accum
        )
        config, _ = self._loss_config()
        config = dataclasses.replace(config, agg=agg, entropy_coef=entropy_coef)
        spec = {
            "labels": labels, "old_logp": old_logp, "advantages": token_advantages,
            "ref_logp": inputs["ref_per_token_logps"] if self.beta != 0.0 else None, "rollout_logp": rollout_logp,
            "config": config, "num_tokens": num_tokens, "num_sequences": num_sequences,
        }  # fmt: skip
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, fusedrl_grpo=spec)
        loss, metrics = out["loss"], out["metrics"]
        self._log_fused_metrics(mode, loss, metrics, mask, advantages, accum)
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
        per_sequence_mean = self.loss_type in ("grpo", "sapo")
        if per_sequence_mean and not on:
            return "seq-mean-token-mean", None, B * accum, advantages, 0.0
        if per_sequence_mean:
            # Every fused per-token loss is positively homogeneous in A (the clip, CISPO and SAPO branches depend
            # on A's sign only), so the per-sequence weight 1 / (len_s B) becomes the token weight 1 / count with
            # A scaled by count / (len_s B); the entropy bonus then needs no rescale.
            lengths = (mask != 0).sum(-1, keepdim=True).to(torch.float32).clamp(min=1.0)
            return "token-mean", count * accum, None, advantages * (count / (lengths * B)), coef
        if self.loss_type == "luspo":
            # weights 1 / (B accum); the bonus's 1 / (count accum) is B / count of that (one host sync). With
            # sequence-level ratios every token of a sequence carries its loss: the token sum is TRL's len_s * loss.
            return "seq-mean-token-sum", None, B * accum, advantages, coef * B / count.item() if on else 0.0
        if self.loss_type == "bnpo":
            denom = count * accum
        elif self.loss_type == "dr_grpo":
            denom = float(B * self.max_completion_length * accum)
        else:  # dapo, cispo: num_items_in_batch spans the generation batch; rescale it to one accumulation window
            denom = inputs["num_items_in_batch"].to(torch.float32).clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                denom = denom * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        # token-mean weights 1 / denom; the bonus wants 1 / (count accum): the ratio (one host sync when on).
        entropy_coef = coef * float(denom) / (count.item() * accum) if on else 0.0
        return "token-mean", denom, None, advantages, entropy_coef

    def _log_fused_metrics(self, mode, loss, metrics, mask, advantages, accum):
        """TRL's metrics from the fused loss: masked means summed over processes, and the clip flags of TRL's
        definitions on the per-token ratios (``advantages`` (B, 1) or (B, C), as TRL's)."""
        mask = mask.to(metrics["ratio"].device)
        valid = mask != 0
        n = valid.sum().to(torch.float32)
        sequence_level = self.importance_sampling_level == "sequence"

        def global_mean(local_mean):  # a token mean of this process -> the token mean over all processes
            totals = self.accelerator.reduce(torch.stack([local_mean.detach() * n, n]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def global_masked_mean(x):  # TRL's: (B, 1) flags average over sequences, (B, C) ones over scored tokens
            local = (x.sum(), torch.tensor(float(x.shape[0]), device=x.device)) if x.shape[1] == 1 else (
                (x * mask).sum(), mask.sum().float())  # fmt: skip
            totals = self.accelerator.reduce(torch.stack(local), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):  # per sequence (NaN for an empty one at token level, as TRL's)
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        if self.entropy_coef != 0.0:
            # policy_loss is TRL's loss before the entropy bonus and before the accumulation scaling (dapo's and
            # cispo's normaliser already covers one window).
            bonus = self.entropy_coef * metrics["entropy"] / accum
            policy = (loss.detach() + bonus) * (1 if self.loss_type in ("dapo", "cispo") else accum)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(metrics["kl"]))
        self._metrics[mode]["entropy"].append(global_mean(metrics["entropy"]))

        ratio = metrics["ratio"]  # (B, C)
        if sequence_level:
            # TRL's (B, 1) sequence ratio: the value each scored token of the sequence carries, exp(0) = 1 for a
            # sequence without any (argmax finds the first scored token).
            first = valid.to(torch.int8).argmax(-1, keepdim=True)
            ratio = torch.where(valid.any(-1, keepdim=True), ratio.gather(1, first), torch.ones_like(ratio[:, :1]))
        advantages = advantages.to(ratio.device)
        if self.loss_type in _CLIP_LOSS_TYPES:
            coef_1 = ratio if self.args.delta is None else ratio.clamp(max=self.args.delta)  # TRL's, after delta
            low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
            m = self._metrics[mode]
            m["clip_ratio/low_mean"].append(global_masked_mean(low))
            m["clip_ratio/high_mean"].append(global_masked_mean(high))
            m["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            m["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            m["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif self.loss_type == "cispo":
            clipped = ((ratio > self.epsilon_high) & (advantages > 0)).float()
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped))
