"""Fused PPO-family policy loss from logits, with KL-to-reference and entropy terms.

Per token, with ``logp = log softmax(logits / T)[label]`` and ``r = exp(logp - old_logp)`` (the default, PPO)::

    pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))      (dual clip, A < 0: min(pg, -c A))
    loss = pg + kl_coef * KL(logp, ref_logp) - entropy_coef * H(softmax(logits / T))

summed with per-token weights ``w`` from the aggregation mode (``token_weights``). ``PPOLossConfig`` also selects
CISPO and SAPO objectives, sequence-level ratios (GSPO, GSPO-token), the two-sided clip ``clip_delta``, rollout
importance correction (TIS / MIS from ``rollout_logp``), the importance-weighted KL and the abs / clamped KL; their
formulas and sources are in ``kernels/_policy.py``.

One forward kernel streams each vocabulary row once (online logsumexp and entropy sums, gathered label logit). For
every token-level setting (clip, CISPO, SAPO, rollout weights, every KL form) it finishes the whole per-token
computation in registers: loss, metrics and the two coefficients ``c_lp = w dl/dlogp`` and ``c_H = w dl/dH``; for
sequence-level ratios the streaming log-softmax kernel writes logp and H and the per-token math runs on those (n,)
vectors (a sequence's ratio couples its tokens there).
Backward is the logprobs backward kernel fed with ``c * grad_out``: one more streaming read and one write of the
logits, optionally in place. ``ppo_loss_from_logprobs`` is the same math on log-probs the caller already has.
"""

from __future__ import annotations

import torch

from ._policy import (
    kl_estimate,
    policy_terms,
    ppo_fwd,
    ppo_metrics,
    prepare_ppo_inputs,
    rollout_weights,
    sequence_index,
    terms_stats,
    token_weights,
)
from ._rows import _ppo_fwd_kernel  # noqa: F401  tests/test_gpu_compile.py compiles it here
from ._rows import STAT_LOSS, check_logits_labels, ppo_bwd_torch, ppo_bwd_triton
from ._utils import IGNORE_INDEX, KL_ESTIMATORS, check_float, has_internal_overlap
from .configs import PPOLossConfig
from .logprobs import logprobs_ref

__all__ = ["PPOLossConfig", "kl_penalty", "ppo_loss", "ppo_loss_from_logprobs", "ppo_loss_ref", "token_weights"]


# ----------------------------------------------------------------------------------------------------
# Autograd Function over the fused kernels and the chunked torch path (kernels/_rows.py, kernels/_policy.py)
# ----------------------------------------------------------------------------------------------------
class _PPOLoss(torch.autograd.Function):
    """L = sum_i w_i l_i(logp, H); dL/dx_ij = (1/T) [c_lp,i ([j = y_i] - p_ij) - c_H,i p_ij (log p_ij + H_i)]
    with c_lp = dL/dlogp_i and c_H = dL/dH_i written by the forward pass: the Triton kernels, or the same math
    in chunked torch ops (peak memory a few float32 chunks, never (N, V))."""

    @staticmethod
    def forward(ctx, logits, tokens, config, inplace, use_triton):
        stats, mls = ppo_fwd(logits, tokens, config, use_triton)
        ctx.save_for_backward(logits, tokens.labels, mls, stats)
        ctx.config, ctx.inplace, ctx.use_triton = config, inplace, use_triton
        ctx.mark_non_differentiable(stats)
        return stats[STAT_LOSS].sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, labels, mls, stats = ctx.saved_tensors
        bwd = ppo_bwd_triton if ctx.use_triton else ppo_bwd_torch
        grad = bwd(logits, labels, mls, stats, grad_loss, ctx.config, out=logits if ctx.inplace else None)
        if ctx.inplace:
            # The Triton kernel and the native CPU loops write through a pointer; tell autograd, so that any
            # other node that saved these logits (or a view of them) and runs after this one raises instead of
            # reading the gradient.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def ppo_loss(
    logits: torch.Tensor,  # (B, T, V) padded or (N, V) packed; fp32 / bf16 / fp16, any strides
    labels: torch.Tensor,  # (B, T) / (N,) integer; -100 = ignored
    old_logp: torch.Tensor,  # (B, T) / (N,) log-probs of the behaviour policy
    advantages: torch.Tensor,  # (B, T) / (N,)
    mask: torch.Tensor | None = None,  # (B, T) / (N,) bool or 0 / 1: 1 = the token counts; None = label != -100
    *,
    ref_logp: torch.Tensor | None = None,  # (B, T) / (N,) reference-policy log-probs, for the KL term
    rollout_logp: torch.Tensor | None = None,  # (B, T) / (N,) the rollout engine's log-probs of the samples
    config: PPOLossConfig = PPOLossConfig(),
    cu_seqlens: torch.Tensor | None = None,  # (B + 1,) int32/int64 sequence offsets of packed tokens
    num_tokens=None,
    num_sequences=None,
    inplace_backward: bool = False,
    return_per_token: bool = False,
    backend: str = "auto",
):
    """PPO-family policy loss (``config.policy_loss``: clipped surrogate, CISPO or SAPO, at token or sequence level)
    + ``kl_coef`` KL to a reference - ``entropy_coef`` entropy, aggregated over unmasked tokens by ``config.agg``;
    see ``PPOLossConfig`` and ``token_weights``.

    ``num_tokens`` / ``num_sequences`` (int or 0-dim tensor) are the global denominators of the token /
    sequence means, so that micro-batch losses sum to the full-batch loss. ``old_logp``, ``advantages``,
    ``ref_logp`` and ``rollout_logp`` are constants (no gradient). ``mask`` must be binary (fractional token
    weights are refused: fold them into the advantages). ``inplace_backward=True`` writes the gradient into the
    logits buffer (halving peak memory): the logits are overwritten during backward and must not be used
    afterwards. No host sync except the label / cu_seqlens / mask value checks (see ``set_validation``); the
    Triton path is CUDA-graph capturable.

    Returns ``(loss, metrics)``: a 0-dim float32 loss and 0-dim float32 tensors ``clipfrac`` (= ``clipfrac_low`` +
    ``clipfrac_high``: tokens on the lower / upper clip), ``dualclip_frac`` (on the dual-clip or delta bound),
    ``approx_kl`` (mean (r - 1) - log r of the token ratio), ``kl`` (the configured estimator vs ``ref_logp``, 0
    without it), ``entropy`` and ``ratio_max``, masked means (max) over this batch's tokens; with ``rollout_logp``
    also ``rollout_k3``, ``rollout_ratio_max`` and ``rollout_corrected_frac`` (see ``_policy.rollout_weights``).
    ``return_per_token=True`` adds ``metrics["per_token"]``: ``ratio`` and the ``clipped_low`` / ``clipped_high`` /
    ``dual_clipped`` flags in the labels' shape.
    """
    if not isinstance(config, PPOLossConfig):
        raise TypeError(f"config must be a PPOLossConfig, got {type(config).__name__}")
    backend = check_logits_labels(logits, labels, config.temperature, ignore_index=IGNORE_INDEX, backend=backend)
    if inplace_backward:
        _check_inplace_logits(logits)
    tokens, valid, rollout_metrics = prepare_ppo_inputs(
        labels, old_logp, advantages, mask, ref_logp, rollout_logp, config, cu_seqlens, num_tokens, num_sequences
    )
    loss, stats = _PPOLoss.apply(logits, tokens, config, bool(inplace_backward), backend == "triton")
    return loss, ppo_metrics(stats, valid, rollout_metrics, per_token=return_per_token)


def ppo_loss_from_logprobs(
    logp: torch.Tensor,  # (B, T) / (N,) float: the policy's log-probs of the sampled tokens (differentiable)
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,  # bool or 0 / 1; None = every token counts
    *,
    entropy: torch.Tensor | None = None,  # per-token entropies (differentiable), needed for entropy_coef != 0
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    config: PPOLossConfig = PPOLossConfig(),
    cu_seqlens: torch.Tensor | None = None,
    num_tokens=None,
    num_sequences=None,
    return_per_token: bool = False,
):
    """The loss of ``ppo_loss`` (same config, aggregation and metrics) from log-probs the caller already has: for
    trainers that compute log-probs themselves (e.g. with ``linear_logprobs`` or their own model code). Autograd
    differentiates it through ``logp`` (and ``entropy``); the computation is in ``logp``'s dtype, at least float32.
    ``metrics["entropy"]`` is the mean of ``entropy`` (0 without it)."""
    if not isinstance(config, PPOLossConfig):
        raise TypeError(f"config must be a PPOLossConfig, got {type(config).__name__}")
    check_float("logp", logp)
    if entropy is not None:
        check_float("entropy", entropy)
        if tuple(entropy.shape) != tuple(logp.shape):
            raise ValueError(f"entropy must have the shape of logp {tuple(logp.shape)}, got {tuple(entropy.shape)}")
    elif config.entropy_coef != 0:
        raise ValueError(f"config.entropy_coef={config.entropy_coef} needs entropy (the per-token entropies)")
    labels = torch.zeros(logp.shape, dtype=torch.int64, device=logp.device)  # every token scored; mask selects
    dtype = torch.promote_types(logp.dtype, torch.float32)
    tokens, valid, rollout_metrics = prepare_ppo_inputs(labels, old_logp, advantages, mask, ref_logp, rollout_logp,
                                                        config, cu_seqlens, num_tokens, num_sequences, dtype)  # fmt: skip
    lp = logp.reshape(-1).to(dtype)
    ent = torch.zeros_like(lp) if entropy is None else entropy.reshape(-1).to(dtype)
    t = policy_terms(lp, ent, tokens.old, tokens.adv, tokens.ref, tokens.valid, config, is_weight=tokens.is_weight,
                     seq=tokens.seq, n_seq=tokens.n_seq)  # fmt: skip
    loss = (tokens.weight.to(dtype) * t["loss"]).sum()
    return loss, ppo_metrics(terms_stats(t), valid, rollout_metrics, per_token=return_per_token)


def _check_inplace_logits(logits: torch.Tensor) -> None:
    """inplace_backward=True overwrites the logits with their gradient: that needs every element to own its
    memory (not an expanded, stride-0, view) and nobody to need the logits after this op's backward (other
    nodes that saved them then raise autograd's version-counter error, see _PPOLoss.backward)."""
    if has_internal_overlap(logits):
        raise ValueError(
            f"inplace_backward=True needs logits whose elements do not share memory, got a view whose elements "
            f"overlap (an expanded or as_strided view: shape {tuple(logits.shape)}, strides {logits.stride()}): pass "
            f"inplace_backward=False or logits.contiguous()"
        )


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, differentiable:
    ``k1 = logp - ref``, ``k2 = (logp - ref)^2 / 2``, ``k3 = exp(ref - logp) - (ref - logp) - 1`` and
    ``k3+`` = k3's value with k2's gradient (straight-through), ``abs = |logp - ref|``. k3 keeps full relative accuracy for tiny
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
    logits, labels, old_logp, advantages, mask=None, *, ref_logp=None, rollout_logp=None, config=PPOLossConfig(),
    cu_seqlens=None, num_tokens=None, num_sequences=None, return_per_token=False,
):  # fmt: skip
    """Textbook reference of ``ppo_loss``: full log-softmax in (at least) float32, the per-token terms, then the
    aggregation weights. Differentiable by autograd; float64 logits give a float64 ground truth."""
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask != 0)
    logp, entropy = logprobs_ref(logits, labels, temperature=config.temperature, return_entropy=True)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    seq, n_seq = sequence_index(tuple(labels.shape), cu_seqlens, labels.device)
    is_weight, rollout_metrics = None, {}
    if rollout_logp is not None:
        is_weight, rollout_metrics = rollout_weights(flat(old_logp).to(logp.dtype), flat(rollout_logp).to(logp.dtype),
                                                     flat(valid), seq, n_seq, config)  # fmt: skip
    t = policy_terms(flat(logp), flat(entropy), flat(old_logp), flat(advantages), flat(ref_logp), flat(valid), config,
                     is_weight=is_weight, seq=seq, n_seq=n_seq)  # fmt: skip
    w = token_weights(valid, config.agg, cu_seqlens=cu_seqlens, num_tokens=num_tokens, num_sequences=num_sequences,
                      norm_length=config.agg_norm_length, dtype=logp.dtype)  # fmt: skip
    loss = (flat(w) * t["loss"]).sum()
    return loss, ppo_metrics(terms_stats(t), valid, rollout_metrics, per_token=return_per_token)
