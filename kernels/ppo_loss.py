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

from ._utils import (
    AGG_MODES,
    IGNORE_INDEX,
    KL_ESTIMATORS,
    as_rows,
    check_cu_seqlens,
    check_float,
    check_int,
    check_same_device,
    check_shape,
    data_checks_enabled,
    launch,
    tl,
    triton,
    vocab_block,
)
from .logprobs import (
    _logprobs_bwd_triton,
    _logprobs_fwd_torch,
    _row_chunks,
    _stream_rows,
    _torch_chunk_bwd,
    check_logits_labels,
    logprobs_ref,
    rows_per_program,
)

_KL_MODE = {"k1": 1, "k2": 2, "k3": 3, "k3+": 4}  # 0: no reference log-probs

# Rows of the (8, N) float32 per-token statistics written by the forward pass (both backends).
_LOSS, _C_LP, _C_H, _RATIO, _CLIPPED, _APPROX_KL, _KL, _ENT = range(8)
_N_STATS = 8


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
# Triton kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _k3_series(d):
    """k3 = exp(-d) - 1 + d = d^2 (1/2 - d/6 + d^2/24 - d^3/120 + d^4/720) + O(d^7): float32-exact for |d| < 0.1."""
    return d * d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0 - d * (1.0 / 120.0 - d * (1.0 / 720.0)))))


@triton.jit
def _k3_grad_series(d):
    """dk3/dd = 1 - exp(-d) = d (1 - d/2 + d^2/6 - d^3/24 + d^4/120) + O(d^6)."""
    return d * (1.0 - d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0 - d * (1.0 / 120.0)))))


@triton.jit
def _ppo_fwd_kernel(
    X,  # (n_rows, V) logits, any float dtype, row r at (r // inner) * s_outer + (r % inner) * s_inner
    LABELS,  # (n_rows,) int64, ignore_index on masked tokens
    OLD_LOGP,  # (n_rows,) float32
    ADV,  # (n_rows,) float32
    REF_LOGP,  # (n_rows,) float32 (read only when KL_MODE != 0)
    WEIGHT,  # (n_rows,) float32 aggregation weights w
    STATS,  # (8, n_rows) float32 out, rows _LOSS.._ENT, s_stat apart
    MLS,  # (2, n_rows) float32 out: row max m of logits / T and log sum exp(logits / T - m), for backward
    n_rows,
    V,
    inner,
    s_outer,
    s_inner,
    s_v,
    s_stat,
    inv_temp,  # runtime floats from here on: new values never recompile
    clip_low,
    clip_high,
    dual_clip,  # +inf when dual clip is off
    log_ratio_clip,  # +inf when the log-ratio clamp is off
    kl_coef,
    entropy_coef,
    ignore_index,
    KL_MODE: tl.constexpr,  # 0 none, 1 k1, 2 k2, 3 k3, 4 k3+
    BLOCK_M: tl.constexpr,  # rows per program: 1 on GPU; many in the interpreter, where each op costs the same
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)  # tail rows of the last program alias row 0 and store nothing
    base = X + (rows // inner) * s_outer + (rows % inner) * s_inner  # (BLOCK_M,) row pointers
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    valid = label != ignore_index  # a masked token reads nothing
    # One read of the row: max, log sum-exp, the label's logp and the entropy (see logprobs._stream_rows).
    m, log_s, logp, ent = _stream_rows(base, label, valid, V, s_v, inv_temp, True, BLOCK_M, BLOCK_V)

    old = tl.load(OLD_LOGP + rows, mask=row_ok, other=0.0)
    adv = tl.load(ADV + rows, mask=row_ok, other=0.0)
    wt = tl.load(WEIGHT + rows, mask=row_ok, other=0.0)

    # NaN-propagating min / max throughout: the default fmin / fmax would make a NaN input a finite loss.
    lr_raw = logp - old
    log_ratio = tl.minimum(tl.maximum(lr_raw, -log_ratio_clip, propagate_nan=tl.PropagateNan.ALL), log_ratio_clip,
                           propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
    lr_frozen = (lr_raw < -log_ratio_clip) | (lr_raw > log_ratio_clip)  # the clamp holds: no gradient to logp
    ratio = tl.exp(log_ratio)
    # (r - 1) - log r = expm1(lr) - lr cancels for small lr: use its series there.
    approx_kl = tl.where(
        tl.abs(log_ratio) < 1e-2,
        log_ratio * log_ratio * (0.5 + log_ratio * (1.0 / 6.0 + log_ratio * (1.0 / 24.0))),
        ratio - 1.0 - log_ratio,
    )
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low, propagate_nan=tl.PropagateNan.ALL), 1.0 + clip_high,
                            propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
    clipped = pg2 > pg1
    pg = tl.maximum(pg1, pg2, propagate_nan=tl.PropagateNan.ALL)
    dual_bound = -dual_clip * adv
    dual = tl.where(adv < 0.0, pg > dual_bound, False)
    pg = tl.where(dual, dual_bound, pg)
    # d pg / d logp = -A r where the unclipped branch is active, 0 where a clip (or the dual bound) is.
    g_pg = tl.where(clipped | dual | lr_frozen, 0.0, -adv * ratio)

    kl = tl.zeros([BLOCK_M], tl.float32)
    g_kl = tl.zeros([BLOCK_M], tl.float32)
    if KL_MODE != 0:
        d = logp - tl.load(REF_LOGP + rows, mask=row_ok, other=0.0)
        if KL_MODE == 1:
            kl = d
            g_kl = d * 0.0 + 1.0
        elif KL_MODE == 2:
            kl = 0.5 * d * d
            g_kl = d
        else:
            # k3 = expm1(-d) + d and its gradient -expm1(-d), by the series of kl_penalty's k3 below
            # |d| = 0.1 (exp(-d) - 1 + d cancels there), the closed form above it.
            small = tl.abs(d) < 0.1
            kl = tl.where(small, _k3_series(d), tl.exp(-d) + d - 1.0)
            if KL_MODE == 3:
                g_kl = tl.where(small, _k3_grad_series(d), 1.0 - tl.exp(-d))
            else:
                g_kl = d  # k3+: straight-through, k2's gradient

    loss = pg + kl_coef * kl - entropy_coef * ent
    c_lp = wt * (g_pg + kl_coef * g_kl)
    c_h = -wt * entropy_coef

    # Masked tokens store exact zeros whatever their inputs held (padding may be NaN).
    out = STATS + rows
    tl.store(out + 0 * s_stat, tl.where(valid, wt * loss, 0.0), mask=row_ok)
    tl.store(out + 1 * s_stat, tl.where(valid, c_lp, 0.0), mask=row_ok)
    tl.store(out + 2 * s_stat, tl.where(valid, c_h, 0.0), mask=row_ok)
    tl.store(out + 3 * s_stat, tl.where(valid, ratio, 0.0), mask=row_ok)
    tl.store(out + 4 * s_stat, tl.where(valid, tl.where(clipped, 1.0, 0.0), 0.0), mask=row_ok)
    tl.store(out + 5 * s_stat, tl.where(valid, approx_kl, 0.0), mask=row_ok)
    tl.store(out + 6 * s_stat, tl.where(valid, kl, 0.0), mask=row_ok)
    tl.store(out + 7 * s_stat, tl.where(valid, ent, 0.0), mask=row_ok)
    tl.store(MLS + rows, tl.where(valid, m, 0.0), mask=row_ok)
    tl.store(MLS + n_rows + rows, tl.where(valid, log_s, 0.0), mask=row_ok)


def _ppo_fwd_triton(logits, labels, old, adv, ref, weight, config: PPOLossConfig, stats=None):
    """Run the forward kernel. Returns ``stats`` (8, n; may be given as a view into a larger buffer) and
    ``mls`` (2, n), the row max and log sum-exp the logprobs backward kernel reads."""
    x, n, inner, s_outer, s_inner, s_v = as_rows(logits)
    V = logits.shape[-1]
    dev = logits.device
    if stats is None:
        stats = torch.empty(_N_STATS, n, dtype=torch.float32, device=dev)
    mls = torch.empty(2, n, dtype=torch.float32, device=dev)
    if n > 0:
        block, warps = vocab_block(V, logits.dtype, dev)
        block_m = rows_per_program(n, block, dev)
        dual = float("inf") if config.dual_clip is None else float(config.dual_clip)
        lr_clip = float("inf") if config.log_ratio_clip is None else float(config.log_ratio_clip)
        launch(
            _ppo_fwd_kernel, (triton.cdiv(n, block_m),), dev,
            x, labels, old, adv, old if ref is None else ref, weight, stats, mls, n,
            V, inner, s_outer, s_inner, s_v, stats.stride(0),
            1.0 / float(config.temperature), float(config.clip_low), float(config.clip_high), dual, lr_clip,
            float(config.kl_coef), float(config.entropy_coef), IGNORE_INDEX,
            KL_MODE=0 if ref is None else _KL_MODE[config.kl_estimator], BLOCK_M=block_m, BLOCK_V=block,
            num_warps=warps,
        )  # fmt: skip
    return stats, mls


def _ppo_bwd_triton(logits, labels, mls, stats, grad_loss, config: PPOLossConfig, out=None):
    """dL/dlogits = grad_loss * (c_lp dlogp/dx + c_H dH/dx), by the logprobs backward kernel; the
    coefficients stay on the device (no sync)."""
    dlogp = stats[_C_LP] * grad_loss
    dent = stats[_C_H] * grad_loss if config.entropy_coef != 0 else None
    inv_temp = 1.0 / float(config.temperature)
    return _logprobs_bwd_triton(logits, labels, mls, stats[_ENT], dlogp, dent, inv_temp, IGNORE_INDEX, out=out)


# ----------------------------------------------------------------------------------------------------
# PyTorch path (same contract as the Triton launchers) and the autograd Function
# ----------------------------------------------------------------------------------------------------
def _token_stats_torch(logp, ent, old, adv, ref, weight, valid, config):
    """The (8, n) per-token statistics from log-probs and entropies via the reference formulas; the
    coefficients c_lp, c_H by autograd on these (n,) vectors only."""
    with torch.enable_grad():
        logp = logp.detach().requires_grad_(True)
        ent = ent.detach().requires_grad_(True)
        t = _ppo_terms_ref(logp, ent, old, adv, ref, valid, config)
        weighted = weight * t["loss"]
        c_lp, c_h = torch.autograd.grad(weighted.sum(), (logp, ent), allow_unused=True)
    zeros = torch.zeros_like(weighted)
    return torch.stack([
        weighted.detach(), zeros if c_lp is None else c_lp, zeros if c_h is None else c_h, t["ratio"].detach(),
        t["clipped"].to(weighted.dtype), t["approx_kl"].detach(), t["kl"].detach(), t["entropy"].detach(),
    ])  # fmt: skip


def _ppo_fwd_torch(logits, labels, old, adv, ref, weight, config: PPOLossConfig):
    """``_ppo_fwd_triton``'s contract in torch ops: the logprobs op's chunked forward (row max and log
    sum-exp kept, never (N, V) float32), then the per-token statistics on (n,) vectors."""
    inv_temp = 1.0 / float(config.temperature)
    logp, ent, mls = _logprobs_fwd_torch(logits, labels, inv_temp, IGNORE_INDEX, True)
    return _token_stats_torch(logp, ent, old, adv, ref, weight, labels != IGNORE_INDEX, config), mls


def _ppo_bwd_torch(logits, labels, mls, stats, grad_loss, config: PPOLossConfig, out=None):
    """``_ppo_bwd_triton``'s contract in torch ops, recomputing one chunk's softmax at a time; ``out=logits``
    overwrites the logits in place."""
    grad = out if out is not None else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = None if out is logits else grad.view(-1, logits.shape[-1])
    for r0, chunk in _row_chunks(logits):
        rows = slice(r0, r0 + chunk.shape[0])
        g = _dlogits_torch_chunk(chunk, labels[rows], mls[:, rows], stats[:, rows], grad_loss, config)
        # In place: this chunk of the logits has just been read for the last time.
        (chunk if grad_rows is None else grad_rows[rows]).copy_(g)
    return grad


class _PPOLoss(torch.autograd.Function):
    """L = sum_i w_i l_i(logp_i, H_i); dL/dx_ij = (1/T) [c_lp,i ([j = y_i] - p_ij) - c_H,i p_ij (log p_ij + H_i)]
    with c_lp = w dl/dlogp and c_H = w dl/dH written by the forward pass: the Triton kernels, or the same math
    in chunked torch ops (peak memory a few float32 chunks, never (N, V))."""

    @staticmethod
    def forward(ctx, logits, labels, old, adv, ref, weight, config, inplace, use_triton):
        fwd = _ppo_fwd_triton if use_triton else _ppo_fwd_torch
        stats, mls = fwd(logits, labels, old, adv, ref, weight, config)
        ctx.save_for_backward(logits, labels, mls, stats)
        ctx.config, ctx.inplace, ctx.use_triton = config, inplace, use_triton
        ctx.mark_non_differentiable(stats)
        return stats[_LOSS].sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, labels, mls, stats = ctx.saved_tensors
        bwd = _ppo_bwd_triton if ctx.use_triton else _ppo_bwd_torch
        grad = bwd(logits, labels, mls, stats, grad_loss, ctx.config, out=logits if ctx.inplace else None)
        if ctx.inplace and ctx.use_triton:
            # The kernel wrote through a pointer; tell autograd, so that any other node that saved these
            # logits (or a view of them) and runs after this one raises instead of reading the gradient.
            # The torch path's copy_ bumps the version counter itself.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None, None, None


def _dlogits_torch_chunk(chunk, labels, mls, stats, grad_loss, config: PPOLossConfig):
    """Torch twin of ``_ppo_bwd_triton`` on one (rows, V) chunk; float32 result."""
    dent = stats[_C_H] * grad_loss if config.entropy_coef != 0 else None
    return _torch_chunk_bwd(chunk, labels, mls[0], mls[1], stats[_ENT] if dent is not None else None,
                            stats[_C_LP] * grad_loss, dent, 1.0 / float(config.temperature), IGNORE_INDEX)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Aggregation weights (shared with value_loss) and boundary checks
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
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` (shape of mask) such that the aggregated loss is ``sum(w * per_token_loss)``.

    - ``token-mean``: ``w = m / num_tokens`` (default: unmasked tokens in this batch);
    - ``seq-mean-token-sum``: ``w = m / num_sequences`` (each sequence's token sum, averaged);
    - ``seq-mean-token-mean``: ``w = m / (len_s * num_sequences)`` with ``len_s`` the unmasked tokens of
      the token's sequence (each sequence's token mean, averaged).

    ``num_sequences`` defaults to the sequences with at least one unmasked token. Passing the global
    counts makes micro-batch losses sum to the full-batch loss. No host sync."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    m = (mask != 0).to(dtype)
    if agg == "token-mean":
        denom = _count("num_tokens", num_tokens, mask.device)
        return m / (m.sum().clamp(min=1.0) if denom is None else denom)

    flat = m.reshape(-1)
    n = flat.numel()
    if cu_seqlens is not None:
        n_seq = cu_seqlens.numel() - 1
        ends = cu_seqlens[1:].to(device=mask.device, dtype=torch.int64)
        seq = torch.bucketize(torch.arange(n, device=mask.device), ends, right=True)
    elif mask.dim() >= 2:
        T = mask.shape[-1]
        n_seq = n // max(T, 1)
        seq = torch.arange(n, device=mask.device) // max(T, 1)
    else:
        raise ValueError(
            f"agg={agg!r} needs sequence boundaries: pass padded (B, T) inputs (one sequence per row) or "
            f"cu_seqlens for packed (N,) tokens; got 1-D tokens of shape {tuple(mask.shape)} without cu_seqlens"
        )
    # Slot n_seq catches nothing for valid cu_seqlens; it keeps the scatter in bounds without a sync.
    seq_len = torch.zeros(n_seq + 1, dtype=dtype, device=mask.device).index_add_(0, seq, flat)
    denom = _count("num_sequences", num_sequences, mask.device)
    if denom is None:
        denom = (seq_len[:n_seq] > 0).sum().to(dtype).clamp(min=1.0)
    if agg == "seq-mean-token-sum":
        w = flat / denom
    else:
        w = flat / (seq_len.clamp(min=1.0)[seq] * denom)
    return w.view(mask.shape)


def check_per_token(name: str, t, like: torch.Tensor, *, like_name: str = "labels", floating: bool = True) -> None:
    """``t`` is a tensor (floating unless told) with one entry per token: the shape and device of ``like``."""
    if floating:
        check_float(name, t)
    elif not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_shape(name, t, tuple(like.shape), f"one entry per token, the shape of {like_name}")
    check_same_device(**{like_name: like, name: t})


def _prepare(labels, old_logp, advantages, mask, ref_logp, config, cu_seqlens, num_tokens, num_sequences):
    """Boundary checks shared by ppo_loss and linear_ppo_loss; returns the flat float32 / int64 per-token
    tensors the kernels read, the valid-token mask and the aggregation weights (no host sync)."""
    if not isinstance(config, PPOLossConfig):
        raise TypeError(f"config must be a PPOLossConfig, got {type(config).__name__}")
    check_per_token("old_logp", old_logp, labels)
    check_per_token("advantages", advantages, labels)
    if ref_logp is not None:
        check_per_token("ref_logp", ref_logp, labels)
    if mask is not None:
        check_per_token("mask", mask, labels, floating=False)
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"config.kl_coef={config.kl_coef} needs ref_logp (the reference policy's log-probs)")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, labels.numel(), device=labels.device)
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & (mask != 0)
    weight = token_weights(valid, config.agg, cu_seqlens=cu_seqlens, num_tokens=num_tokens,
                           num_sequences=num_sequences).reshape(-1)  # fmt: skip
    flat_labels = torch.where(valid, labels, IGNORE_INDEX).reshape(-1).to(torch.int64)
    as_f32 = lambda t: None if t is None else t.reshape(-1).to(torch.float32).contiguous()  # noqa: E731
    return flat_labels, as_f32(old_logp), as_f32(advantages), as_f32(ref_logp), weight, valid


def _metrics(stats: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked means (ratio_max: masked max, 0 when nothing is unmasked) of the per-token statistics;
    masked tokens hold zeros in ``stats``. 0-dim float32 tensors, no host sync."""
    count = valid.sum().to(torch.float32).clamp(min=1.0)
    means = stats[_CLIPPED : _ENT + 1].sum(1) / count
    ratio_max = stats[_RATIO].amax() if stats.shape[1] > 0 else stats.new_zeros(())
    return {"clipfrac": means[0], "approx_kl": means[1], "kl": means[2], "entropy": means[3], "ratio_max": ratio_max}


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
    labels_f, old, adv, ref, weight, valid = _prepare(
        labels, old_logp, advantages, mask, ref_logp, config, cu_seqlens, num_tokens, num_sequences
    )
    loss, stats = _PPOLoss.apply(logits, labels_f, old, adv, ref, weight, config, bool(inplace_backward),
                                 backend == "triton")  # fmt: skip
    return loss, _metrics(stats, valid)


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
    ``k3+`` = k3's value with k2's gradient (straight-through)."""
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    k2 = 0.5 * diff**2
    if estimator == "k2":
        return k2
    k3 = _k3(diff)
    if estimator == "k3":
        return k3
    return k2 + (k3 - k2).detach()


def _k3(d: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-d) - 1 + d, accurate for every d in d's dtype (differentiable), the formula of the kernel:
    its series below |d| = 0.1, where exp(-d) - 1 + d cancels (0 in float32 for |d| ~ 1e-4), and
    expm1(-d) + d above (whose relative error there is ~1e-5 at worst)."""
    small = d.abs() < 0.1
    ds = torch.where(small, d, torch.zeros_like(d))  # the unused branch stays finite: no 0 * inf in backward
    series = ds * ds * (0.5 - ds * (1.0 / 6.0 - ds * (1.0 / 24.0 - ds * (1.0 / 120.0 - ds * (1.0 / 720.0)))))
    return torch.where(small, series, torch.expm1(-d) + d)


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------
def _ppo_terms_ref(logp, entropy, old_logp, advantages, ref_logp, valid, config: PPOLossConfig):
    """Per-token PPO quantities, textbook formulas, in logp's dtype. Masked tokens are zeroed first so
    that whatever their inputs hold (padding, NaN) they contribute nothing, not even to gradients."""
    zero = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero)
    old = torch.where(valid, old_logp.to(logp.dtype).detach(), zero)
    A = torch.where(valid, advantages.to(logp.dtype).detach(), zero)

    log_ratio = logp - old
    if config.log_ratio_clip is not None:
        log_ratio = torch.clamp(log_ratio, -config.log_ratio_clip, config.log_ratio_clip)
    with torch.no_grad():  # which tokens sit on a clip (or the dual bound), where d pg / d logp = 0
        r = torch.exp(log_ratio)
        pu, pc = -A * r, -A * torch.clamp(r, 1.0 - config.clip_low, 1.0 + config.clip_high)
        frozen = pc > pu
        if config.dual_clip is not None:
            frozen |= (A < 0) & (torch.maximum(pu, pc) > -config.dual_clip * A)
    # Their log-ratio is detached: its gradient is 0 anyway, but autograd would form it as 0 * exp(log_ratio),
    # NaN once the ratio overflows float32 (log-ratio > ~88.7), where the kernel's gradient is a finite 0.
    ratio = torch.exp(torch.where(frozen, log_ratio.detach(), log_ratio))
    pg_unclipped = -A * ratio
    pg_clipped = -A * torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if config.dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -config.dual_clip * A), pg)
    if ref_logp is None:
        kl = zero
    else:
        kl = kl_penalty(logp, torch.where(valid, ref_logp.to(logp.dtype).detach(), zero), config.kl_estimator)
    loss = pg + config.kl_coef * kl - config.entropy_coef * entropy
    return {
        "loss": torch.where(valid, loss, zero),
        "ratio": torch.where(valid, ratio, zero),
        "clipped": valid & (pg_clipped > pg_unclipped),
        "approx_kl": torch.where(valid, (ratio - 1.0) - log_ratio, zero),
        "kl": torch.where(valid, kl, zero),
        "entropy": entropy,
    }


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
    t = _ppo_terms_ref(logp, entropy, old_logp, advantages, ref_logp, valid, config)
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
