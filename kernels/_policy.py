"""The per-token policy-loss math of the PPO family (``ppo_loss``, ``linear_ppo_loss``, ``ppo_loss_from_logprobs``)
and its inputs: aggregation weights, boundary checks, rollout importance weights and metrics. Internal to
fusedrl.kernels, like ``_rows.py``; written once in torch and used four ways:

- the references (``ppo_loss_ref``) run ``policy_terms`` on full-softmax log-probs, in float64 for the ground truth;
- ``ppo_loss_from_logprobs`` runs it on the caller's log-probs and lets autograd differentiate it;
- the fused ops' PyTorch backend, and their Triton backend for every setting the fused PPO kernel does not
  express (``kernel_math``), run the streaming log-softmax kernels of ``_rows.py`` and then ``token_stats``:
  autograd over ``policy_terms`` on (n,) vectors gives ``c_lp = dL/dlogp`` and ``c_H = dL/dH`` per token, which the
  backward kernel turns into dL/dlogits. Sequence-level ratios (GSPO) are segment reductions over these (n,)
  vectors, so a sequence's ratio couples its tokens without any (N, V) tensor: the logits are read twice at most
  (forward, backward), on every path.

The variants, with their sources (the per-token loss ``l``; ``r`` the importance ratio, ``A`` the advantage):

- ``clip``: PPO's clipped surrogate (Schulman et al. 2017), ``l = max(-A r', -A clip(r, 1 - eps_low, 1 + eps_high))``,
  with DAPO's clip-higher (Yu et al. 2025: eps_high > eps_low), dual clip (Ye et al. 2020: for A < 0, ``min(l, -c A)``)
  or the two-sided clip of INTELLECT-2 (Prime Intellect 2025: ``r' = min(r, delta)``; TRL's and Liger's ``delta``).
- ``cispo``: MiniMax-M1 (MiniMax 2025): ``l = -sg[clip(r, 1 - eps_low, 1 + eps_high)] A logp``: the IS weight is clipped
  and detached, and no token's gradient is ever dropped.
- ``sapo``: Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv 2511.20347): a smooth gate instead of the hard
  clip, ``l = -A (4 / tau) sigmoid(tau (r - 1))`` with ``tau = tau_pos`` for A > 0 and ``tau_neg`` otherwise (the gate's
  slope at r = 1 is 1, as the unclipped surrogate's).
- ``importance_sampling_level``: ``token`` (r per token), ``sequence`` (GSPO, Zheng et al. 2025, arXiv 2507.18071: one
  ratio per sequence, ``r_i = exp(mean_t(logp - old_logp))`` over its scored tokens, clipped per sequence) or
  ``sequence-token`` (GSPO-token: ``r_i,t = sg[r_i] pi_t / sg[pi_t]``: the value of r_i, the gradient of a token ratio).
- Rollout correction (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
  the rollout engine's own log-probs give ``w = exp(old_logp - rollout_logp)`` per token (or per sequence: the
  product, or its geometric mean), truncated (TIS: ``min(w, C)``) or masked (MIS: ``w`` inside ``[1/C, C]``, 0
  outside, as TRL's ``*_mask`` modes), a constant factor on the policy term.
- The KL term: k1 / k2 / k3 / k3+ / abs of ``logp - ref_logp`` (``abs``: ``|logp - ref|``, verl's), optionally
  clamped to ``[-c, c]`` (verl clamps its low-variance KL to [-10, 10]), optionally importance-weighted
  (DeepSeek-V3.2, 2025; TRL's ``use_bias_correction_kl``): ``kl * r`` with the unclipped ratio of the loss's level.
  The ratio is differentiated, as in TRL and Liger: ``E_old[r k]`` is the KL estimate under samples of the old
  policy, and its gradient is that of the estimate.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
import torch

from ._rows import (
    CLIP_DUAL,
    CLIP_HIGH,
    CLIP_LOW,
    STAT_APPROX_KL,
    STAT_CLIP,
    STAT_ENT,
    STAT_RATIO,
    logprobs_fwd_torch,
    logprobs_fwd_triton,
    ppo_fwd_triton,
)
from ._utils import AGG_MODES, IGNORE_INDEX, check_cu_seqlens, check_float, check_shape, data_checks_enabled
from ._utils import check_same_device, per_token
from .configs import PPOLossConfig


# ----------------------------------------------------------------------------------------------------
# Sequences of flat tokens
# ----------------------------------------------------------------------------------------------------
def sequence_index(shape, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor | None, int]:
    """``(seq, n_seq)``: the sequence of each of the flat tokens of a (B, T) padded (one sequence per row) or (N,)
    packed batch (``cu_seqlens``), as an (n,) int64 index in [0, n_seq]; slot n_seq holds no token for valid
    ``cu_seqlens`` and keeps every scatter in bounds without a host sync when the value checks are off.
    ``(None, 0)`` for 1-D tokens without ``cu_seqlens`` (no sequence boundaries)."""
    n = math.prod(shape)
    if cu_seqlens is not None:
        ends = per_token(cu_seqlens[1:], torch.int64).to(device)
        return torch.bucketize(torch.arange(n, device=device), ends, right=True), cu_seqlens.numel() - 1
    if len(shape) >= 2:
        T = max(shape[-1], 1)
        return torch.arange(n, device=device) // T, n // T
    return None, 0


def _needs_sequences(what: str, shape) -> ValueError:
    return ValueError(
        f"{what} needs sequence boundaries: pass padded (B, T) inputs (one sequence per row) or cu_seqlens for "
        f"packed (N,) tokens; got 1-D tokens of shape {tuple(shape)} without cu_seqlens"
    )


def segment_sum(x: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Per-token sum of ``x`` over the token's sequence (differentiable; tokens must already be zero where masked)."""
    return x.new_zeros(n_seq + 1).index_add(0, seq, x)[seq]


def segment_mean(x: torch.Tensor, valid: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Per-token mean of ``x`` over the scored tokens of the token's sequence (0 for a sequence without any)."""
    count = x.new_zeros(n_seq + 1).index_add(0, seq, valid.to(x.dtype)).clamp(min=1.0)
    return x.new_zeros(n_seq + 1).index_add(0, seq, x)[seq] / count[seq]


# ----------------------------------------------------------------------------------------------------
# Aggregation weights
# ----------------------------------------------------------------------------------------------------
def _count(name: str, value, device: torch.device) -> torch.Tensor | float | None:
    """A user-given global count: a positive number or a one-element tensor (kept on the device)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}"
            )
        count = value.reshape(()).to(device=device, dtype=torch.float32)
        if data_checks_enabled(count):
            v = float(count)  # host sync: documented, skipped under graph capture / set_validation(False)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0 and finite (a global count of tokens or sequences), got {v}")
        return count.clamp(min=1.0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int or a 0-dim tensor, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite (a global count of tokens or sequences), got {value!r}")
    return float(value)


def token_weights(
    mask: torch.Tensor,  # (B, T) padded: each row a sequence; or (N,) packed with cu_seqlens; nonzero = counts
    agg: str = "token-mean",
    *,
    cu_seqlens: torch.Tensor | None = None,  # (B + 1,) int, leading 0, for packed tokens
    num_tokens=None,
    num_sequences=None,
    norm_length: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` (shape of mask) such that the aggregated loss is ``sum(w * per_token_loss)``; ``m``
    is 1 for an unmasked token, 0 otherwise.

    - ``token-mean``: ``w = m / num_tokens`` (default: unmasked tokens in this batch);
    - ``token-sum``: ``w = m`` (verl's token-sum: the plain sum);
    - ``seq-mean-token-sum``: ``w = m / num_sequences`` (each sequence's token sum, averaged);
    - ``seq-mean-token-mean``: ``w = m / (len_s * num_sequences)`` with ``len_s`` the unmasked tokens of
      the token's sequence (each sequence's token mean, averaged);
    - ``seq-mean-token-sum-norm``: ``w = m / (num_sequences * norm_length)`` (Dr. GRPO, Liu et al. 2025: sequence
      sums over a constant length, TRL's ``dr_grpo`` and verl's mode of this name; ``norm_length`` defaults to the
      padded width T of (B, T) inputs and must be given for packed ones: the generation budget,
      ``max_new_tokens``, keeps micro-batch losses summing to the full-batch loss).

    ``num_sequences`` defaults to the sequences with at least one unmasked token. Passing the global
    counts makes micro-batch losses sum to the full-batch loss. No host sync."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    m = (mask != 0).to(dtype)
    if agg == "token-mean":
        denom = _count("num_tokens", num_tokens, mask.device)
        return m / (m.sum().clamp(min=1.0) if denom is None else denom)
    if agg == "token-sum":
        return m

    flat = m.reshape(-1)
    seq, n_seq = sequence_index(tuple(mask.shape), cu_seqlens, mask.device)
    if seq is None:
        raise _needs_sequences(f"agg={agg!r}", mask.shape)
    seq_len = torch.zeros(n_seq + 1, dtype=dtype, device=mask.device).index_add_(0, seq, flat)
    denom = _count("num_sequences", num_sequences, mask.device)
    if denom is None:
        denom = (seq_len[:n_seq] > 0).sum().to(dtype).clamp(min=1.0)
    if agg == "seq-mean-token-sum":
        w = flat / denom
    elif agg == "seq-mean-token-mean":
        w = flat / (seq_len.clamp(min=1.0)[seq] * denom)
    else:
        if norm_length is None:
            if cu_seqlens is not None:
                raise ValueError(
                    "agg='seq-mean-token-sum-norm' with packed tokens (cu_seqlens) needs norm_length (the constant "
                    "length each sequence sum is divided by, e.g. max_new_tokens)"
                )
            norm_length = mask.shape[-1]
        w = flat / (denom * float(max(norm_length, 1)))
    return w.view(mask.shape)


# ----------------------------------------------------------------------------------------------------
# Per-token inputs and their boundary checks
# ----------------------------------------------------------------------------------------------------
@dataclass
class TokenInputs:
    """The flat (n,) per-token inputs the PPO-family ops read, checked and converted once by
    ``prepare_ppo_inputs``: float32, or int64 labels with ``IGNORE_INDEX`` where a token is not scored."""

    labels: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    ref: torch.Tensor | None
    weight: torch.Tensor  # aggregation weights (token_weights)
    valid: torch.Tensor  # bool: the token is scored
    is_weight: torch.Tensor | None  # rollout importance weights (a constant factor on the policy term), or None
    seq: torch.Tensor | None  # int64 sequence index (sequence_index), when the config needs sequences
    n_seq: int

    def take(self, rows) -> TokenInputs:
        """These inputs at ``rows`` (a slice or an index tensor); the sequence index keeps its numbering."""
        pick = (lambda t: None if t is None else t[rows]) if isinstance(rows, slice) else (
            lambda t: None if t is None else t.index_select(0, rows))  # fmt: skip
        return replace(self, **{k: pick(getattr(self, k)) for k in
                                ("labels", "old", "adv", "ref", "weight", "valid", "is_weight", "seq")})  # fmt: skip


def check_per_token(name: str, t, like: torch.Tensor, *, like_name: str = "labels", floating: bool = True) -> None:
    """``t`` is a tensor (floating unless told) with one entry per token: the shape and device of ``like``."""
    if floating:
        check_float(name, t)
    elif not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_shape(name, t, tuple(like.shape), f"one entry per token, the shape of {like_name}")
    check_same_device(**{like_name: like, name: t})


def check_binary_mask(mask: torch.Tensor) -> None:
    """A loss mask says which tokens count: bool, or numbers that are all 0 or 1. Fractional token weights (verl and
    OpenRLHF multiply the loss by the mask value) are refused rather than silently rounded to 1: the aggregation
    modes count tokens. One host sync on GPU, skipped when data checks are off (``set_validation``)."""
    if mask.dtype == torch.bool or not data_checks_enabled(mask):
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(
            f"mask must be binary (bool, or 0 / 1 values): fractional token weights are not supported; got "
            f"mask.flatten()[{i}] = {mask.reshape(-1)[i].item()} (fold weights into the advantages instead)"
        )


def prepare_ppo_inputs(labels, old_logp, advantages, mask, ref_logp, rollout_logp, config, cu_seqlens, num_tokens,
                       num_sequences, dtype=torch.float32):  # fmt: skip
    """Boundary checks shared by the PPO-family ops; returns ``(tokens, valid, rollout_metrics)``: the flat
    ``TokenInputs`` the kernels read (in ``dtype``: float32 for the kernels), the valid-token mask in the labels'
    shape and the mismatch metrics of the rollout log-probs (empty without them). No host sync beyond the
    documented value checks."""
    check_per_token("old_logp", old_logp, labels)
    check_per_token("advantages", advantages, labels)
    if ref_logp is not None:
        check_per_token("ref_logp", ref_logp, labels)
    if rollout_logp is not None:
        check_per_token("rollout_logp", rollout_logp, labels)
    if mask is not None:
        check_per_token("mask", mask, labels, floating=False)
        check_binary_mask(mask)
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"config.kl_coef={config.kl_coef} needs ref_logp (the reference policy's log-probs)")
    if config.rollout_correction != "none" and rollout_logp is None:
        raise ValueError(
            f"config.rollout_correction={config.rollout_correction!r} needs rollout_logp (the rollout engine's "
            "log-probs of the sampled tokens)"
        )
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, labels.numel(), device=labels.device)
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask != 0)
    weight = token_weights(valid, config.agg, cu_seqlens=cu_seqlens, num_tokens=num_tokens,
                           num_sequences=num_sequences, norm_length=config.agg_norm_length,
                           dtype=dtype).reshape(-1)  # fmt: skip
    needs_seq = config.importance_sampling_level != "token" or (
        rollout_logp is not None and config.rollout_correction_level != "token")  # fmt: skip
    seq, n_seq = sequence_index(tuple(labels.shape), cu_seqlens, labels.device) if needs_seq else (None, 0)
    if needs_seq and seq is None:
        what = (f"importance_sampling_level={config.importance_sampling_level!r}"
                if config.importance_sampling_level != "token"
                else f"rollout_correction_level={config.rollout_correction_level!r}")  # fmt: skip
        raise _needs_sequences(what, labels.shape)
    flat_valid = valid.reshape(-1)
    flat_labels = per_token(torch.where(valid, labels, IGNORE_INDEX), torch.int64)
    as_f32 = lambda t: None if t is None else per_token(t, dtype)  # noqa: E731
    old = as_f32(old_logp)
    is_weight, rollout_metrics = None, {}
    if rollout_logp is not None:
        is_weight, rollout_metrics = rollout_weights(old, as_f32(rollout_logp), flat_valid, seq, n_seq, config)
    tokens = TokenInputs(flat_labels, old, as_f32(advantages), as_f32(ref_logp), weight, flat_valid, is_weight,
                         seq, n_seq)  # fmt: skip
    return tokens, valid, rollout_metrics


def rollout_weights(old, rollout, valid, seq, n_seq, config: PPOLossConfig):
    """``(is_weight, metrics)``: the rollout importance weights of ``config.rollout_correction`` (None for
    ``none``) and the mismatch metrics between the trainer's old log-probs and the rollout engine's: ``rollout_k3``
    (mean k3 estimate of KL(rollout || old)), ``rollout_ratio_max`` (the largest raw weight) and
    ``rollout_corrected_frac`` (tokens whose weight was truncated or masked; 0 for ``none``)."""
    zero = torch.zeros_like(old)
    d = torch.where(valid, old - rollout, zero)
    level = config.rollout_correction_level
    log_w = d if level == "token" else (segment_sum(d, seq, n_seq) if level == "sequence"
                                        else segment_mean(d, valid, seq, n_seq))  # fmt: skip
    w = torch.exp(log_w)
    hi = float(config.rollout_is_max)
    lo = config.rollout_is_min
    if config.rollout_correction == "mis":
        lo = 1.0 / hi if lo is None else float(lo)
        outside = (w < lo) | (w > hi)
        weight = torch.where(outside, zero, w)  # NaN stays NaN: a comparison with NaN is False
    else:
        lo = 0.0 if lo is None else float(lo)
        outside = (w < lo) | (w > hi)
        weight = torch.clamp(w, min=lo, max=hi)
    count = valid.sum().to(torch.float32).clamp(min=1.0)
    k3 = torch.where(valid, kl_estimate(rollout, old, "k3"), zero)
    # Sums in one stack: a handful of launches, no host sync.
    sums = torch.stack([k3, (valid & outside).to(torch.float32)]).sum(1) / count
    metrics = {
        "rollout_k3": sums[0],
        "rollout_ratio_max": torch.where(valid, w, zero).amax() if w.numel() else w.new_zeros(()),
        "rollout_corrected_frac": sums[1] if config.rollout_correction != "none" else sums[1] * 0.0,
    }
    if config.rollout_correction == "none":
        return None, metrics
    return torch.where(valid, weight, zero), metrics


# ----------------------------------------------------------------------------------------------------
# Per-token formulas (the references, ppo_loss_from_logprobs and the generic fused path differentiate these)
# ----------------------------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate (``estimator`` already checked), differentiable, in the inputs'
    dtype: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d, k3+ = k3's value with k2's gradient, abs = |d|;
    d = logp - ref."""
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "abs":
        return diff.abs()
    k2 = 0.5 * diff**2
    if estimator == "k2":
        return k2
    k3 = _k3(diff)
    if estimator == "k3":
        return k3
    return k2 + (k3 - k2).detach()


# Below this |d| k3 is its five-term series (the kernel's float32 threshold). The series' truncation, d^7 / 5040 in
# the value and d^6 / 720 in the gradient, is below float32's rounding there but ~1e-9 in float64, so float64 switches
# to the closed form sooner: at 5e-3 the gradient's truncation is ~2e-17 and the closed form's cancellation costs
# ~2 eps / d ~ 4e-14 of the value's relative accuracy, i.e. ~1e-18 absolute.
_K3_SERIES_BELOW = {torch.float64: 5e-3}


def _k3(d: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-d) - 1 + d, accurate for every d in d's dtype (differentiable), the formula of the kernel:
    its series below a per-dtype |d| (0.1 up to float32, where exp(-d) - 1 + d cancels: 0 in float32 for |d| ~
    1e-4), and expm1(-d) + d above (whose relative error there is ~1e-5 at worst in float32)."""
    small = d.abs() < _K3_SERIES_BELOW.get(d.dtype, 0.1)
    ds = torch.where(small, d, torch.zeros_like(d))  # the unused branch stays finite: no 0 * inf in backward
    series = ds * ds * (0.5 - ds * (1.0 / 6.0 - ds * (1.0 / 24.0 - ds * (1.0 / 120.0 - ds * (1.0 / 720.0)))))
    return torch.where(small, series, torch.expm1(-d) + d)


# Above this the SAPO gate sigmoid(z) is 1 to float64 precision; its gradient is detached there (see policy_terms).
_SAPO_FLAT = 40.0


def policy_terms(logp, entropy, old_logp, advantages, ref_logp, valid, config: PPOLossConfig, *, is_weight=None,
                 seq=None, n_seq=0):  # fmt: skip
    """Per-token policy-loss quantities (see the module docstring), textbook formulas in logp's dtype, on flat or
    shaped tokens (``seq`` / ``n_seq`` from ``sequence_index`` on the flat ones, for sequence-level ratios).
    Returns ``loss`` (unweighted, differentiable in logp and entropy), ``ratio`` (the loss's importance ratio),
    ``clip`` (CLIP_* codes), ``approx_kl`` ((r - 1) - log r of the token ratio), ``kl`` and ``entropy``. Masked
    tokens are zeroed first so that whatever their inputs hold (padding, NaN) they contribute nothing, not even
    to gradients."""
    cfg = config
    zero = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero)
    old = torch.where(valid, old_logp.to(logp.dtype).detach(), zero)
    A = torch.where(valid, advantages.to(logp.dtype).detach(), zero)

    log_ratio = logp - old
    if cfg.log_ratio_clip is not None:
        log_ratio = torch.clamp(log_ratio, -cfg.log_ratio_clip, cfg.log_ratio_clip)
    if cfg.importance_sampling_level == "token":
        lr = log_ratio
    else:
        s = segment_mean(log_ratio, valid, seq, n_seq)
        lr = s if cfg.importance_sampling_level == "sequence" else s.detach() + (log_ratio - log_ratio.detach())
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    with torch.no_grad():
        r = torch.exp(lr)
        state = torch.zeros_like(r)
    if cfg.policy_loss == "clip":
        with torch.no_grad():  # which tokens sit on a bound, where d l / d logp = 0
            r1 = r if cfg.clip_delta is None else torch.clamp(r, max=cfg.clip_delta)
            pu, pc = -A * r1, -A * torch.clamp(r, lo, hi)
            clipped = pc > pu
            frozen = clipped.clone()
            if cfg.dual_clip is not None:
                bound = (A < 0) & (torch.maximum(pu, pc) > -cfg.dual_clip * A)
            elif cfg.clip_delta is not None:
                bound = ~clipped & (r > cfg.clip_delta)
            else:
                bound = torch.zeros_like(clipped)
            frozen |= bound
            if cfg.clip_delta is not None:
                frozen |= r > cfg.clip_delta
            state = torch.where(bound, CLIP_DUAL, torch.where(clipped, torch.where(r < 1.0, CLIP_LOW, CLIP_HIGH),
                                                                0.0)).to(r.dtype)  # fmt: skip
        # The frozen tokens' log-ratio is detached: its gradient is 0 anyway, but autograd would form it as
        # 0 * exp(lr), NaN once the ratio overflows float32 (lr > ~88.7), where the kernel's gradient is a finite 0.
        ratio = torch.exp(torch.where(frozen, lr.detach(), lr))
        r1 = ratio if cfg.clip_delta is None else torch.clamp(ratio, max=cfg.clip_delta)
        pg = torch.maximum(-A * r1, -A * torch.clamp(ratio, lo, hi))
        if cfg.dual_clip is not None:
            pg = torch.where(A < 0, torch.minimum(pg, -cfg.dual_clip * A), pg)
    elif cfg.policy_loss == "cispo":
        with torch.no_grad():
            state = torch.where(r < lo, CLIP_LOW, torch.where(r > hi, CLIP_HIGH, 0.0)).to(r.dtype)
            w = torch.clamp(r, lo, hi)
        pg = -w * A * logp
    else:  # sapo
        tau = torch.where(A > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(logp.dtype)
        with torch.no_grad():
            flat = tau * (r - 1.0) > _SAPO_FLAT  # sigmoid'(z) r -> 0 there, but as 0 * inf once r overflows
        ratio = torch.exp(torch.where(flat, lr.detach(), lr))
        pg = -A * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    if is_weight is not None:
        pg = pg * is_weight.to(logp.dtype)

    if ref_logp is None:
        kl = zero
    else:
        kl = kl_estimate(logp, torch.where(valid, ref_logp.to(logp.dtype).detach(), zero), cfg.kl_estimator)
        if cfg.kl_clamp is not None:
            kl = torch.clamp(kl, -cfg.kl_clamp, cfg.kl_clamp)
        if cfg.kl_importance_weighted:
            kl = kl * torch.exp(lr)
    loss = pg + cfg.kl_coef * kl - cfg.entropy_coef * entropy
    with torch.no_grad():
        tr = torch.exp(log_ratio)
        approx_kl = torch.where(log_ratio.abs() < 1e-2,
                                log_ratio * log_ratio * (0.5 + log_ratio * (1.0 / 6.0 + log_ratio * (1.0 / 24.0))),
                                (tr - 1.0) - log_ratio)  # fmt: skip
    return {
        "loss": torch.where(valid, loss, zero),
        "ratio": torch.where(valid, r, zero),
        "clip": torch.where(valid, state, zero),
        "approx_kl": torch.where(valid, approx_kl, zero),
        "kl": torch.where(valid, kl, zero).detach(),
        "entropy": entropy.detach(),
    }


def kernel_math(config: PPOLossConfig) -> bool:
    """True when the fused PPO kernel's in-register per-token math (``_ppo_fwd_kernel``) expresses this setting:
    every token-level one (the clipped surrogate with asymmetric, dual or two-sided clip; CISPO; SAPO; the log-ratio
    clamp, rollout weights, every KL estimator with its clamp and importance weight, the entropy bonus). Sequence-level
    ratios couple tokens of different rows: they take the streaming log-softmax kernel and ``token_stats``."""
    return config.importance_sampling_level == "token"


def token_stats(logp, ent, tokens: TokenInputs, config: PPOLossConfig) -> torch.Tensor:
    """The (N_STATS, n) per-token statistics of the fused ops' contract (``_rows.py``) from log-probs and entropies:
    ``policy_terms`` on these (n,) vectors, and the coefficients c_lp, c_H by autograd on them only."""
    with torch.enable_grad():
        logp = logp.detach().requires_grad_(True)
        ent = ent.detach().requires_grad_(True)
        t = policy_terms(logp, ent, tokens.old, tokens.adv, tokens.ref, tokens.valid, config,
                         is_weight=tokens.is_weight, seq=tokens.seq, n_seq=tokens.n_seq)  # fmt: skip
        weighted = tokens.weight * t["loss"]
        c_lp, c_h = torch.autograd.grad(weighted.sum(), (logp, ent), allow_unused=True)
    return terms_stats(t, weighted.detach(), c_lp, c_h)


def terms_stats(t: dict, weighted=None, c_lp=None, c_h=None) -> torch.Tensor:
    """``policy_terms``' output in the (N_STATS, n) layout of the fused ops' statistics (rows without a value: 0),
    so that the references and ``ppo_loss_from_logprobs`` share ``ppo_metrics`` with the kernels."""
    zeros = torch.zeros_like(t["ratio"])
    pick = lambda x: zeros if x is None else x  # noqa: E731
    return torch.stack([pick(weighted), pick(c_lp), pick(c_h), t["ratio"], t["clip"], t["approx_kl"], t["kl"],
                        t["entropy"]])  # fmt: skip


def ppo_fwd(logits, tokens: TokenInputs, config: PPOLossConfig, use_triton: bool, stats=None, stream=None):
    """Forward of the PPO-family ops over (rows, V) logits: ``(stats, mls)`` (see ``_rows.py``'s contract). The fused
    PPO kernel where ``kernel_math`` holds, else the streaming log-softmax (Triton or torch) and ``token_stats``.
    ``stream`` = precomputed ``(logp, ent, mls)`` skips the log-softmax (the lm_head op's two-pass forward)."""
    if use_triton and stream is None and kernel_math(config):
        return ppo_fwd_triton(logits, tokens.labels, tokens.old, tokens.adv, tokens.ref, tokens.weight, config,
                              stats=stats, is_weight=tokens.is_weight)  # fmt: skip
    if stream is None:
        fwd = logprobs_fwd_triton if use_triton else logprobs_fwd_torch
        stream = fwd(logits, tokens.labels, 1.0 / float(config.temperature), IGNORE_INDEX, True)
    logp, ent, mls = stream
    s = token_stats(logp, ent, tokens, config)
    if stats is not None:
        stats.copy_(s)
        s = stats
    return s, mls


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------
def ppo_metrics(stats: torch.Tensor, valid: torch.Tensor, rollout_metrics: dict | None = None,
                per_token: bool = False) -> dict:  # fmt: skip
    """Masked means (ratio_max: masked max, 0 when nothing is unmasked) of the per-token statistics; masked tokens
    hold zeros in ``stats``. 0-dim float32 tensors, no host sync. ``per_token=True`` adds ``per_token``: the ratio
    and the clip flags in the shape of ``valid``."""
    count = valid.sum().to(torch.float32).clamp(min=1.0)
    clip = stats[STAT_CLIP]
    sums = torch.cat([
        torch.stack([clip == CLIP_LOW, clip == CLIP_HIGH, clip == CLIP_DUAL]).to(torch.float32).sum(1),
        stats[STAT_APPROX_KL : STAT_ENT + 1].sum(1),
    ]) / count  # fmt: skip
    ratio_max = stats[STAT_RATIO].amax() if stats.shape[1] > 0 else stats.new_zeros(())
    out = {
        "clipfrac": sums[0] + sums[1], "clipfrac_low": sums[0], "clipfrac_high": sums[1], "dualclip_frac": sums[2],
        "approx_kl": sums[3], "kl": sums[4], "entropy": sums[5], "ratio_max": ratio_max, **(rollout_metrics or {}),
    }  # fmt: skip
    if per_token:
        shape = valid.shape
        out["per_token"] = {
            "ratio": stats[STAT_RATIO].view(shape), "clipped_low": (clip == CLIP_LOW).view(shape),
            "clipped_high": (clip == CLIP_HIGH).view(shape), "dual_clipped": (clip == CLIP_DUAL).view(shape),
        }  # fmt: skip
    return out
