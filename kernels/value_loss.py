"""Clipped value (critic) loss: ``0.5 * max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2)`` per token,
aggregated with the same token weights as the PPO policy loss.

One elementwise kernel computes the weighted loss, the gradient coefficient w.r.t. the value and both
metrics' per-token terms in a single read of the three inputs; backward is one multiply by grad_out.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._utils import AGG_MODES, check_cu_seqlens, check_float, launch, next_pow2, per_token, resolve_backend, tl, triton
from ._policy import check_binary_mask, check_per_token, token_weights

# Rows of the (4, N) float32 per-token statistics.
_LOSS, _GRAD, _CLIPPED, _VPRED = range(4)


@triton.jit
def _value_loss_fwd_kernel(
    VALUES,  # (n,) any float dtype
    OLD,  # (n,) any float dtype
    RETURNS,  # (n,) any float dtype
    WEIGHT,  # (n,) float32 aggregation weights w (0 on masked tokens)
    MASK,  # (n,) float32 1.0 / 0.0
    STATS,  # (4, n) float32 out: w * loss, w * dloss/dv, clipped, v (masked tokens: 0)
    n,
    clip,  # runtime float; +inf = unclipped
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    v = tl.load(VALUES + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(OLD + offs, mask=inb, other=0.0).to(tl.float32)
    ret = tl.load(RETURNS + offs, mask=inb, other=0.0).to(tl.float32)
    w = tl.load(WEIGHT + offs, mask=inb, other=0.0)
    keep = tl.load(MASK + offs, mask=inb, other=0.0) != 0.0

    diff = v - old
    err = v - ret
    # NaN-propagating min / max: the default fmin / fmax would turn a NaN value into a finite loss.
    diff_c = tl.minimum(tl.maximum(diff, -clip, propagate_nan=tl.PropagateNan.ALL), clip,
                        propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
    # Where the clamp does not bind the clipped error is the unclipped one, exactly: old + (v - old) - R would round
    # differently from v - R and turn a tie into a spurious "clipped" token (and clip=inf, no clip, into noise).
    err_clip = tl.where(diff_c == diff, err, old + diff_c - ret)
    l_unclipped = err * err
    l_clipped = err_clip * err_clip
    loss = 0.5 * tl.maximum(l_unclipped, l_clipped, propagate_nan=tl.PropagateNan.ALL)
    # Gradient of the larger square; the clipped one only moves with v inside the clip range. A tie
    # splits it in half, as autograd does for max.
    inside = (diff >= -clip) & (diff <= clip)
    g_clip = tl.where(inside, err_clip, 0.0)
    grad = tl.where(l_unclipped > l_clipped, err, tl.where(l_clipped > l_unclipped, g_clip, 0.5 * (err + g_clip)))

    # Padding may hold anything (NaN included): masked tokens store exact zeros.
    tl.store(STATS + offs, tl.where(keep, w * loss, 0.0), mask=inb)
    tl.store(STATS + n + offs, tl.where(keep, w * grad, 0.0), mask=inb)
    tl.store(STATS + 2 * n + offs, tl.where(keep, tl.where(l_clipped > l_unclipped, 1.0, 0.0), 0.0), mask=inb)
    tl.store(STATS + 3 * n + offs, tl.where(keep, v, 0.0), mask=inb)


def _value_loss_fwd_triton(values, old, returns, weight, keep, clip):
    n = values.numel()
    stats = torch.empty(4, n, dtype=torch.float32, device=values.device)
    if n > 0:
        # GPU: 1024 elements x 4 warps; the interpreter runs a block as one NumPy op, so bigger is faster.
        block = 1024 if values.is_cuda else min(next_pow2(n), 1 << 16)
        launch(_value_loss_fwd_kernel, (triton.cdiv(n, block),), values.device,
               values, old, returns, weight, keep, stats, n, float(clip), BLOCK=block, num_warps=4)  # fmt: skip
    return stats


def _value_loss_fwd_torch(values, old, returns, weight, keep, clip):
    with torch.enable_grad():
        v = values.detach().float().requires_grad_(True)
        t = _value_terms_ref(v, old, returns, keep, clip)
        weighted = weight * t["loss"]
        (grad,) = torch.autograd.grad(weighted.sum(), v)
    return torch.stack([weighted.detach(), grad, t["clipped"].float(), t["vpred"].detach()])


class _ValueLoss(torch.autograd.Function):
    """L = sum_i w_i 0.5 max((v_i - R_i)^2, (v_clip,i - R_i)^2); dL/dv_i = w_i (v_i - R_i) where the
    unclipped square is larger, w_i (v_clip,i - R_i) [|v_i - old_i| <= clip] where the clipped one is."""

    @staticmethod
    def forward(ctx, values, old, returns, weight, keep, clip, use_triton):
        fwd = _value_loss_fwd_triton if use_triton else _value_loss_fwd_torch
        stats = fwd(per_token(values), old, returns, weight, keep, clip)
        ctx.save_for_backward(stats)
        ctx.shape, ctx.dtype = values.shape, values.dtype
        ctx.mark_non_differentiable(stats)
        return stats[_LOSS].sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (stats,) = ctx.saved_tensors
        grad = (stats[_GRAD] * grad_loss).to(ctx.dtype).view(ctx.shape)
        return grad, None, None, None, None, None, None


def _check_clip(clip) -> float:
    """The clip range as the kernel's float: None (unclipped, OpenRLHF's ``clip_eps=None``) is +inf."""
    if clip is None:
        return math.inf
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(
            f"clip must be None (unclipped) or a positive finite number (the value clip range), got {clip!r}"
        )
    return float(clip)


def value_loss(
    values: torch.Tensor,  # (B, T) padded or (N,) packed, any float dtype; the critic's predictions
    old_values: torch.Tensor,  # (B, T) / (N,) predictions at rollout time
    returns: torch.Tensor,  # (B, T) / (N,) value targets
    mask: torch.Tensor | None = None,  # (B, T) / (N,) nonzero = token counts; None = all tokens
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    num_tokens=None,
    cu_seqlens: torch.Tensor | None = None,  # (B + 1,) int, for packed tokens
    num_sequences=None,
    backend: str = "auto",
):
    """Clipped value loss ``0.5 * max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2)`` (``clip=None``: the
    unclipped ``0.5 * (v - R)^2``) aggregated by ``agg`` exactly like ``ppo_loss`` (see ``token_weights``: ``num_tokens`` / ``num_sequences`` are the
    global counts for micro-batching). Gradient only w.r.t. ``values``. No host sync.

    Returns ``(loss, metrics)``: 0-dim float32 loss, ``clipfrac`` (share of tokens where the clipped
    square is the larger) and ``vpred_mean``, masked means over this batch's tokens."""
    check_float("values", values)
    check_per_token("old_values", old_values, values, like_name="values")
    check_per_token("returns", returns, values, like_name="values")
    if mask is not None:
        check_per_token("mask", mask, values, like_name="values", floating=False)
        check_binary_mask(mask)
    clip = _check_clip(clip)
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, values.numel(), device=values.device)
    backend = resolve_backend(backend, values.device)

    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask != 0
    weight = token_weights(keep, agg, cu_seqlens=cu_seqlens, num_tokens=num_tokens,
                           num_sequences=num_sequences).reshape(-1)  # fmt: skip
    keep_f = per_token(keep, torch.float32)
    loss, stats = _ValueLoss.apply(values, per_token(old_values), per_token(returns), weight, keep_f, clip,
                                   backend == "triton")  # fmt: skip
    count = keep_f.sum().clamp(min=1.0)
    means = stats[_CLIPPED:].sum(1) / count
    return loss, {"clipfrac": means[0], "vpred_mean": means[1]}


def _value_terms_ref(values, old_values, returns, keep, clip):
    """Per-token clipped value loss, textbook form; masked tokens zeroed (their inputs may be garbage)."""
    keep = keep.reshape(values.shape) != 0
    zero = torch.zeros_like(values)
    v = torch.where(keep, values, zero)
    old = torch.where(keep, old_values.reshape(values.shape).to(values.dtype).detach(), zero)
    ret = torch.where(keep, returns.reshape(values.shape).to(values.dtype).detach(), zero)
    diff = v - old
    diff_c = torch.clamp(diff, -clip, clip)
    v_clipped = torch.where(diff_c == diff, v, old + diff_c)  # the kernel's form: no rounding where it does not bind
    loss_unclipped = (v - ret) ** 2
    loss_clipped = (v_clipped - ret) ** 2
    return {
        "loss": torch.where(keep, 0.5 * torch.maximum(loss_unclipped, loss_clipped), zero),
        "clipped": keep & (loss_clipped > loss_unclipped),
        "vpred": v,
    }


def value_loss_ref(values, old_values, returns, mask=None, *, clip=0.2, agg="token-mean", num_tokens=None,
                   cu_seqlens=None, num_sequences=None):  # fmt: skip
    """Textbook reference of ``value_loss`` in (at least) float32; float64 stays float64."""
    v = values.to(torch.promote_types(values.dtype, torch.float32))
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask != 0
    t = _value_terms_ref(v, old_values, returns, keep, _check_clip(clip))
    w = token_weights(keep, agg, cu_seqlens=cu_seqlens, num_tokens=num_tokens, num_sequences=num_sequences,
                      dtype=v.dtype)  # fmt: skip
    count = keep.sum().clamp(min=1)
    metrics = {"clipfrac": t["clipped"].sum() / count, "vpred_mean": t["vpred"].detach().sum() / count}
    return (w * t["loss"]).sum(), metrics
