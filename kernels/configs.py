"""The settings of the fused losses: frozen dataclasses, each validated once at construction with errors that name
the field, what it must be and what it got. Below the ops and the row / policy building blocks that read them
(``_rows.py``, ``_policy.py``, ``ppo_loss.py``, ``linear_ppo_loss.py``, ``linear_preference_loss.py``); the
engine's configs compose them rather than copying their fields. Exported by fusedrl.kernels.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

from ._utils import (
    AGG_MODES,
    IS_LEVELS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTION_LEVELS,
    ROLLOUT_CORRECTIONS,
)

__all__ = ["LOSS_TYPES", "PPOLossConfig", "PreferenceLossConfig"]


@dataclass(frozen=True)
class PPOLossConfig:
    """Settings of the PPO-family policy loss; every number is a runtime kernel argument (no recompile). The
    formulas and their papers: ``kernels/_policy.py``."""

    clip_low: float = 0.2
    """Lower clip: the ratio is clipped at ``1 - clip_low`` (CISPO: the IS weight's lower bound; 1 = none)."""
    clip_high: float = 0.2
    """Upper clip: the ratio is clipped at ``1 + clip_high`` (DAPO's clip-higher when > clip_low; CISPO: the IS
    weight's upper bound minus 1, e.g. 4 for TRL's ``epsilon_high=5``)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: for negative advantages the loss is bounded by ``-c * A``; None = off."""
    clip_delta: float | None = None
    """Two-sided clip (INTELLECT-2; TRL's and Liger's ``delta``): the unclipped ratio is clamped at ``delta`` > 1, which
    bounds the loss of negative-advantage tokens by ``-delta * A``; None = off. ``policy_loss='clip'`` only."""
    policy_loss: str = "clip"
    """``clip`` (PPO's clipped surrogate), ``cispo`` (``-sg[clip(r)] A logp``) or ``sapo`` (soft gate)."""
    importance_sampling_level: str = "token"
    """``token`` (one ratio per token), ``sequence`` (GSPO: ``exp(mean(logp - old_logp))`` per sequence) or
    ``sequence-token`` (GSPO-token: the sequence ratio's value, a token ratio's gradient). Sequence levels need
    sequences: (B, T) inputs or ``cu_seqlens``."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature for positive advantages."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for zero / negative advantages (TRL's and Liger's defaults)."""
    kl_coef: float = 0.0
    """Weight of the per-token KL(policy || reference) term in the loss (needs ``ref_logp``)."""
    kl_estimator: str = "k3"
    """``k1`` (logp - ref), ``k2`` ((logp - ref)^2 / 2), ``k3`` (exp(ref - logp) - (ref - logp) - 1),
    ``k3+`` (k3's value with k2's gradient, straight-through) or ``abs`` (|logp - ref|)."""
    kl_clamp: float | None = None
    """Clamp the per-token KL value to ``[-c, c]`` (no gradient where it holds; verl clamps at 10); None = off."""
    kl_importance_weighted: bool = False
    """Multiply the KL term by the importance ratio of the loss's level (DeepSeek-V3.2; TRL's
    ``use_bias_correction_kl``): the KL estimate under samples of the old policy."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: ``entropy_coef * H`` is subtracted from the loss."""
    temperature: float = 1.0
    """Sampling temperature: log-probs and entropy are those of ``softmax(logits / temperature)``."""
    agg: str = "token-mean"
    """One of ``AGG_MODES`` (see ``token_weights``)."""
    agg_norm_length: int | None = None
    """The constant length of ``agg='seq-mean-token-sum-norm'`` (Dr. GRPO; e.g. max_new_tokens); None = the padded
    width of (B, T) inputs (packed inputs must set it)."""
    log_ratio_clip: float | None = None
    """Clamp ``logp - old_logp`` to ``[-c, c]`` before the exponential (no gradient where it holds), so that a
    far-off-policy token cannot overflow the ratio (``exp`` > float32 past ~88.7); verl / OpenRLHF use 20.
    None = off. Applies to the loss, the ratio metrics and approx_kl, on every backend and in the reference."""
    rollout_correction: str = "none"
    """Importance correction for a rollout engine whose log-probs differ from the trainer's (needs
    ``rollout_logp``): ``none``, ``tis`` (truncated: weight ``min(w, rollout_is_max)``, ``w = exp(old_logp -
    rollout_logp)``) or ``mis`` (masked: ``w`` inside ``[rollout_is_min, rollout_is_max]``, 0 outside). The weight
    multiplies the policy term (not the KL or entropy terms)."""
    rollout_correction_level: str = "token"
    """``token``, ``sequence`` (w = the product of the sequence's token ratios) or ``sequence-mean`` (their
    geometric mean)."""
    rollout_is_max: float = 2.0
    """The rollout weight's upper bound C (TIS: truncation; MIS: rejection above it)."""
    rollout_is_min: float | None = None
    """The rollout weight's lower bound: None = ``1 / rollout_is_max`` for MIS and no lower bound for TIS."""

    def __post_init__(self):
        def number(name, lo=None, lo_open=False, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"PPOLossConfig.{name} must be a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"PPOLossConfig.{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"PPOLossConfig.{name} must be <= {hi}, got {v!r}")

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"PPOLossConfig.{name} must be one of {options}, got {getattr(self, name)!r}")

        number("clip_low", 0.0, hi=1.0)  # above 1 the lower bound 1 - clip_low would be negative
        number("clip_high", 0.0)
        number("kl_coef", 0.0)
        number("entropy_coef")
        number("temperature", 0.0, lo_open=True)
        number("sapo_temperature_pos", 0.0, lo_open=True)
        number("sapo_temperature_neg", 0.0, lo_open=True)
        number("rollout_is_max", 0.0, lo_open=True)
        for name in ("dual_clip", "clip_delta"):  # a bound of 1 or less would cap even on-policy ratios
            if getattr(self, name) is not None:
                number(name, 1.0, lo_open=True)
        for name in ("log_ratio_clip", "kl_clamp"):
            if getattr(self, name) is not None:
                number(name, 0.0, lo_open=True)
        if self.rollout_is_min is not None:
            number("rollout_is_min", 0.0, hi=self.rollout_is_max)
        if not isinstance(self.kl_importance_weighted, bool):
            raise ValueError(
                f"PPOLossConfig.kl_importance_weighted must be a bool, got {self.kl_importance_weighted!r}"
            )
        n = self.agg_norm_length
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"PPOLossConfig.agg_norm_length must be a positive int or None, got {n!r}")
        choice("kl_estimator", KL_ESTIMATORS)
        choice("agg", AGG_MODES)
        choice("policy_loss", POLICY_LOSSES)
        choice("importance_sampling_level", IS_LEVELS)
        choice("rollout_correction", ROLLOUT_CORRECTIONS)
        choice("rollout_correction_level", ROLLOUT_CORRECTION_LEVELS)
        if self.dual_clip is not None and self.clip_delta is not None:
            raise ValueError(
                f"PPOLossConfig.dual_clip={self.dual_clip} and clip_delta={self.clip_delta} both bound the loss of "
                "negative-advantage tokens: set one of them"
            )
        if self.policy_loss != "clip":
            for name in ("dual_clip", "clip_delta"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"PPOLossConfig.{name} applies to policy_loss='clip' only, got policy_loss={self.policy_loss!r}"
                    )


LOSS_TYPES = ("dpo", "ipo", "simpo", "orpo")
"""The preference losses of ``PreferenceLossConfig.loss_type``."""


@dataclass(frozen=True)
class PreferenceLossConfig:
    """Which preference loss and its constants. Every loss is a mean over pairs (or a sum divided by
    ``num_pairs`` across micro-batches)."""

    loss_type: Literal[LOSS_TYPES] = "dpo"
    """dpo (sigmoid, Rafailov et al. 2023), ipo (Azar et al. 2023), simpo (Meng et al. 2024), orpo (Hong et al. 2024)."""
    beta: float = 0.1
    """dpo/simpo: the inverse temperature of the implicit reward; ipo: tau (target margin 1 / (2 beta)); orpo: lambda, the weight of the odds-ratio term."""
    label_smoothing: float = 0.0
    """dpo/simpo: assumed label-flip probability eps (conservative DPO: -(1-eps) log s(z) - eps log s(-z)); 0 = off."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma."""
    rpo_alpha: float = 0.0
    """Weight of an extra length-normalised NLL term on the chosen response (RPO, Pang et al. 2024); 0 = off."""
    temperature: float = 1.0
    """The log-probs are of softmax(logits / temperature) (a model's logit scale s enters as temperature / s)."""

    def __post_init__(self):
        def number(v):
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"PreferenceLossConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not (number(self.beta) and self.beta > 0):
            raise ValueError(f"PreferenceLossConfig.beta must be a number > 0, got {self.beta!r}")
        if not (number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise ValueError(f"PreferenceLossConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss_type not in ("dpo", "simpo"):
            raise ValueError(f"PreferenceLossConfig.label_smoothing applies to dpo and simpo only, got "
                             f"label_smoothing={self.label_smoothing} with loss_type={self.loss_type!r}")  # fmt: skip
        if not number(self.simpo_gamma):
            raise ValueError(f"PreferenceLossConfig.simpo_gamma must be a finite number, got {self.simpo_gamma!r}")
        if not (number(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ValueError(f"PreferenceLossConfig.rpo_alpha must be a number >= 0, got {self.rpo_alpha!r}")
        if not (number(self.temperature) and self.temperature > 0):
            raise ValueError(f"PreferenceLossConfig.temperature must be a number > 0, got {self.temperature!r}")

    @property
    def needs_reference(self) -> bool:
        """dpo and ipo compare with the reference policy; simpo and orpo are reference-free."""
        return self.loss_type in ("dpo", "ipo")
