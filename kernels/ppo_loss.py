"""Fused PPO clipped-surrogate loss from logits, with KL-to-reference and entropy terms.

Per token, with ``logp = log softmax(logits / T)[label]`` and ``r = exp(logp - old_logp)``::

    pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))      (dual clip, A < 0: min(pg, -c A))
    loss = pg + kl_coef * KL(logp, ref_logp) - entropy_coef * H(softmax(logits / T))

summed with per-token weights ``w`` from the aggregation mode (``token_weights``). One forward kernel
streams each vocabulary row once (online logsumexp and entropy sums, gathered label logit) and finishes
the whole per-token computation in registers: loss, metrics and the two coefficients ``c_lp = w dl/dlogp``
and ``c_H = w dl/dH``. Backward is the logprobs backward kernel fed with ``c * grad_out``: one more
streaming read and one write of the logits, optionally in place.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ._rows import _ppo_fwd_kernel  # noqa: F401  tests/test_gpu_compile.py compiles it here
from ._rows import (
    STAT_LOSS,
    check_logits_labels,
    kl_estimate,
    ppo_bwd_torch,
    ppo_bwd_triton,
    ppo_fwd_torch,
    ppo_fwd_triton,
    ppo_metrics,
    ppo_terms_ref,
    prepare_ppo_inputs,
    token_weights,
)
from ._utils import AGG_MODES, IGNORE_INDEX, KL_ESTIMATORS, check_float
from .logprobs import logprobs_ref


@dataclass(frozen=True)
class PPOLossConfig:
    """Settings of the PPO policy loss; every number is a runtime kernel argument (no recompile)."""

    clip_low: float = 0.2
    """Lower clip: the ratio is clipped at ``1 - clip_low``."""
    clip_high: float = 0.2
    """Upper clip: the ratio is clipped at ``1 + clip_high`` (DAPO's clip-higher when > clip_low)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: for negative advantages the loss is bounded by ``-c * A``; None = off."""
    kl_coef: float = 0.0
    """Weight of the per-token KL(policy || reference) term in the loss (needs ``ref_logp``)."""
    kl_estimator: str = "k3"
    """``k1`` (logp - ref), ``k2`` ((logp - ref)^2 / 2), ``k3`` (exp(ref - logp) - (ref - logp) - 1),
    ``k3+`` (k3's value with k2's gradient, straight-through)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: ``entropy_coef * H`` is subtracted from the loss."""
    temperature: float = 1.0
    """Sampling temperature: log-probs and entropy are those of ``softmax(logits / temperature)``."""
    agg: str = "token-mean"
    """``token-mean``, ``seq-mean-token-sum`` or ``seq-mean-token-mean`` (see ``token_weights``)."""
    log_ratio_clip: float | None = None
    """Clamp ``logp - old_logp`` to ``[-c, c]`` before the exponential (no gradient where it holds), so that a
    far-off-policy token cannot overflow the ratio (``exp`` > float32 past ~88.7); verl / OpenRLHF use 20.
    None = off. Applies to the loss, the ratio metrics and approx_kl, on every backend and in the reference."""

    def __post_init__(self):
        def number(name, lo=None, lo_open=False, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"PPOLossConfig.{name} must be a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"PPOLossConfig.{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"PPOLossConfig.{name} must be <= {hi}, got {v!r}")

        number("clip_low", 0.0, hi=1.0)  # above 1 the lower bound 1 - clip_low would be negative
        number("clip_high", 0.0)
        number("kl_coef", 0.0)
        number("entropy_coef")
        number("temperature", 0.0, lo_open=True)
        if self.dual_clip is not None:
            number("dual_clip", 1.0, lo_open=True)
        if self.log_ratio_clip is not None:
            number("log_ratio_clip", 0.0, lo_open=True)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"PPOLossConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.agg not in AGG_MODES:
            raise ValueError(f"PPOLossConfig.agg must be one of {AGG_MODES}, got {self.agg!r}")


# ----------------------------------------------------------------------------------------------------
# Autograd Function over the fused kernels and the chunked torch path (kernels/_rows.py)
# ----------------------------------------------------------------------------------------------------
class _PPOLoss(torch.autograd.Function):
    """L = sum_i w_i l_i(logp_i, H_i); dL/dx_ij = (1/T) [c_lp,i ([j = y_i] - p_ij) - c_H,i p_ij (log p_ij + H_i)]
    with c_lp = w dl/dlogp and c_H = w dl/dH written by the forward pass: the Triton kernels, or the same math
    in chunked torch ops (peak memory a few float32 chunks, never (N, V))."""

    @staticmethod
    def forward(ctx, logits, labels, old, adv, ref, weight, config, inplace, use_triton):
        fwd = ppo_fwd_triton if use_triton else ppo_fwd_torch
        stats, mls = fwd(logits, labels, old, adv, ref, weight, config)
        ctx.save_for_backward(logits, labels, mls, stats)
        ctx.config, ctx.inplace, ctx.use_triton = config, inplace, use_triton
        ctx.mark_non_differentiable(stats)
        return stats[STAT_LOSS].sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, labels, mls, stats = ctx.saved_tensors
        bwd = ppo_bwd_triton if ctx.use_triton else ppo_bwd_torch
        grad = bwd(logits, labels, mls, stats, grad_loss, ctx.config, out=logits if ctx.inplace else None)
        if ctx.inplace and ctx.use_triton:
            # The kernel wrote through a pointer; tell autograd, so that any other node that saved these
            # logits (or a view of them) and runs after this one raises instead of reading the gradient.
            # The torch path's copy_ bumps the version counter itself.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def ppo_loss(
    logits: torch.Tensor,  # (B, T, V) padded or (N, V) packed; fp32 / bf16 / fp16, any strides
    labels: torch.Tensor,  # (B, T) / (N,) integer; -100 = ignored
    old_logp: torch.Tensor,  # (B, T) / (N,) log-probs of the behaviour policy
    advantages: torch.Tensor,  # (B, T) / (N,)
    mask: torch.Tensor | None = None,  # (B, T) / (N,) nonzero = token counts; None = label != -100
    *,
    ref_logp: torch.Tensor | None = None,  # (B, T) / (N,) reference-policy log-probs, for the KL term
    config: PPOLossConfig = PPOLossConfig(),
    cu_seqlens: torch.Tensor | None = None,  # (B + 1,) int32/int64 sequence offsets of packed tokens
    num_tokens=None,
    num_sequences=None,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """PPO clipped-surrogate loss (asymmetric / dual clip) + ``kl_coef`` KL to a reference - ``entropy_coef``
    entropy, aggregated over unmasked tokens by ``config.agg``; see ``PPOLossConfig`` and ``token_weights``.

    ``num_tokens`` / ``num_sequences`` (int or 0-dim tensor) are the global denominators of the token /
    sequence means, so that micro-batch losses sum to the full-batch loss. ``old_logp``, ``advantages``
    and ``ref_logp`` are constants (no gradient). ``inplace_backward=True`` writes the gradient into the
    logits buffer (halving peak memory): the logits are overwritten during backward and must not be used
    afterwards. No host sync except the label / cu_seqlens range checks (see ``set_validation``); the
    Triton path is CUDA-graph capturable.

    Returns ``(loss, metrics)``: a 0-dim float32 loss and 0-dim float32 tensors ``clipfrac``,
    ``approx_kl`` (mean (r - 1) - log r), ``kl`` (the configured estimator vs ``ref_logp``, 0 without it),
    ``entropy`` and ``ratio_max``, masked means (max) over this batch's tokens.
    """
    if not isinstance(config, PPOLossConfig):
        raise TypeError(f"config must be a PPOLossConfig, got {type(config).__name__}")
    backend = check_logits_labels(logits, labels, config.temperature, ignore_index=IGNORE_INDEX, backend=backend)
    if inplace_backward:
        _check_inplace_logits(logits)
    labels_f, old, adv, ref, weight, valid = prepare_ppo_inputs(
        labels, old_logp, advantages, mask, ref_logp, config, cu_seqlens, num_tokens, num_sequences
    )
    loss, stats = _PPOLoss.apply(logits, labels_f, old, adv, ref, weight, config, bool(inplace_backward),
                                 backend == "triton")  # fmt: skip
    return loss, ppo_metrics(stats, valid)


def _check_inplace_logits(logits: torch.Tensor) -> None:
    """inplace_backward=True overwrites the logits with their gradient: that needs every element to own its
    memory (not an expanded, stride-0, view) and nobody to need the logits after this op's backward (other
    nodes that saved them then raise autograd's version-counter error, see _PPOLoss.backward)."""
    if any(st == 0 and sz > 1 for sz, st in zip(logits.shape, logits.stride())):
        raise ValueError(
            f"inplace_backward=True needs logits whose elements do not share memory, got an expanded view "
            f"(shape {tuple(logits.shape)}, strides {logits.stride()}): pass inplace_backward=False or "
            f"logits.contiguous()"
        )


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, differentiable:
    ``k1 = logp - ref``, ``k2 = (logp - ref)^2 / 2``, ``k3 = exp(ref - logp) - (ref - logp) - 1`` and
    ``k3+`` = k3's value with k2's gradient (straight-through). k3 keeps full relative accuracy for tiny
    differences (a series below |logp - ref| = 0.1, where exp(-d) - 1 + d cancels), as the kernel does; reward
    shaping (``shape_token_rewards``) computes its KL by this function."""
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return kl_estimate(logp, ref_logp, estimator)


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------
def ppo_loss_ref(
    logits, labels, old_logp, advantages, mask=None, *, ref_logp=None, config=PPOLossConfig(),
    cu_seqlens=None, num_tokens=None, num_sequences=None,
):  # fmt: skip
    """Textbook reference of ``ppo_loss``: full log-softmax in (at least) float32, per-token terms, then
    the aggregation weights. Differentiable by autograd; float64 logits give a float64 ground truth."""
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask != 0)
    logp, entropy = logprobs_ref(logits, labels, temperature=config.temperature, return_entropy=True)
    t = ppo_terms_ref(logp, entropy, old_logp, advantages, ref_logp, valid, config)
    w = token_weights(valid, config.agg, cu_seqlens=cu_seqlens, num_tokens=num_tokens,
                      num_sequences=num_sequences, dtype=logp.dtype)  # fmt: skip
    loss = (w * t["loss"]).sum()
    count = valid.sum().clamp(min=1)
    metrics = {
        "clipfrac": t["clipped"].sum() / count,
        "approx_kl": t["approx_kl"].sum() / count,
        "kl": t["kl"].sum() / count,
        "entropy": t["entropy"].sum() / count,
        "ratio_max": t["ratio"].amax() if t["ratio"].numel() else t["ratio"].new_zeros(()),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}
