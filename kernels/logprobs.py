"""Fused token log-probabilities and entropy: ``log softmax(logits / T)[label]`` and ``H(softmax(logits / T))``.

One streaming pass over each vocabulary row (online max / sum-exp), the label logit gathered directly,
a per-row logsumexp kept for backward. No (N, V) float32 tensor is ever allocated; backward writes the
gradient w.r.t. the logits in their own dtype.
"""
from __future__ import annotations

import math

import torch

from ._utils import (
    as_rows,
    check_float,
    check_int,
    check_labels_in_range,
    check_same_device,
    launch,
    next_pow2,
    resolve_backend,
    tl,
    triton,
    vocab_block,
)

# Rows per chunk on the PyTorch path: bounds the float32 temporaries at ~1M elements (4 MiB each) whatever N is.
_TORCH_CHUNK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _stream_rows(
    base,  # (BLOCK_M,) row pointers
    label,  # (BLOCK_M,) int64
    valid,  # (BLOCK_M,) bool: False rows read nothing
    V,
    s_v,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One streaming read of BLOCK_M vocabulary rows of logits / T -> (m, log_s, logp, entropy): the row
    max, log sum exp(x - m), the label's log-probability (NaN for a label outside [0, V)) and the entropy
    (garbage unless WITH_ENTROPY). Shared by the logprobs and PPO forward kernels."""
    n_read = tl.where(valid, V, 0)
    cols0 = tl.arange(0, BLOCK_V)
    # Running max m, sum-exp s = sum exp(x - m) and, for the entropy, w = sum exp(x - m) * (x - m).
    # Keeping w relative to the running max makes H = log s - w / s a difference of O(1) terms; the
    # algebraically equal lse - sum p x cancels two numbers of the size of the logits.
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        ptrs = base[:, None] + cols[None, :].to(tl.int64) * s_v
        x = tl.load(ptrs, mask=cols[None, :] < n_read[:, None], other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        alpha = tl.exp(m - m_ref)
        e = tl.exp(x - m_ref[:, None])
        if WITH_ENTROPY:
            shift = tl.where(s > 0.0, (m - m_ref) * s, 0.0)  # re-reference the old terms to m_new
            w = alpha * (w + shift) + tl.sum(tl.where(e > 0.0, e * (x - m_ref[:, None]), 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new

    log_s = tl.log(s)
    in_range = (label >= 0) & (label < V)
    safe_label = tl.where(in_range, label, 0)
    x_label = tl.load(base + safe_label * s_v).to(tl.float32) * inv_temp
    # (x - m) - log s rather than x - (m + log s): rounding m + log s to float32 would lose log s when it
    # is tiny (p -> 1), i.e. exactly the true-class term. logp <= 0; the clamp removes a last-ulp excess.
    # NaN-propagating clamps: tl.minimum / tl.maximum default to fmin / fmax, which would turn the NaN of a
    # row holding NaN or +inf into logp = 0, entropy = 0.
    logp = tl.minimum((x_label - m) - log_s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    logp = tl.where(in_range, logp, float("nan"))  # an out-of-range label never reads out of bounds
    ent = tl.maximum(log_s - w / s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return m, log_s, logp, ent


@triton.jit
def _logprobs_fwd_kernel(
    X,  # (n_rows, V) logits, any float dtype, row r at (r // inner) * s_outer + (r % inner) * s_inner
    LABELS,  # (n_rows,) int64
    n_rows,
    LOGP,  # (n_rows,) float32 out
    ENT,  # (n_rows,) float32 out (written only when RETURN_ENTROPY)
    STATS,  # (2, n_rows) float32 out: row max m of logits / T and log sum exp(logits / T - m), for backward
    V,
    inner,
    s_outer,
    s_inner,
    s_v,
    inv_temp,  # runtime float: a new temperature never recompiles
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: 1 on GPU; many in the interpreter, where each op costs the same
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)  # tail rows of the last program alias row 0 and store nothing
    base = X + (rows // inner) * s_outer + (rows % inner) * s_inner  # (BLOCK_M,) row pointers
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    valid = label != ignore_index  # an ignored row reads nothing
    m, log_s, logp, ent = _stream_rows(base, label, valid, V, s_v, inv_temp, RETURN_ENTROPY, BLOCK_M, BLOCK_V)
    tl.store(LOGP + rows, tl.where(valid, logp, 0.0), mask=row_ok)
    tl.store(STATS + rows, tl.where(valid, m, 0.0), mask=row_ok)
    tl.store(STATS + n_rows + rows, tl.where(valid, log_s, 0.0), mask=row_ok)
    if RETURN_ENTROPY:
        tl.store(ENT + rows, tl.where(valid, ent, 0.0), mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    X,  # (n_rows, V) logits (read)
    DX,  # (n_rows, V) gradient out, logits dtype; may alias X (then same strides)
    LABELS,
    n_rows,
    STATS,  # (2, n_rows) float32 saved row max and log sum-exp (see the forward kernel)
    ENT,  # (n_rows,) float32 saved entropy (read only when HAS_DENT)
    DLOGP,  # (n_rows,) upstream gradient of logp
    DENT,  # (n_rows,) upstream gradient of entropy (read only when HAS_DENT)
    V,
    inner,
    s_outer,
    s_inner,
    s_v,
    dx_rows_inner,  # the gradient buffer has its own row layout (it may be contiguous while X is sliced)
    dx_outer,
    dx_inner,
    dx_v,
    inv_temp,
    ignore_index,
    HAS_DENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    base = X + (rows // inner) * s_outer + (rows % inner) * s_inner
    dbase = DX + (rows // dx_rows_inner) * dx_outer + (rows % dx_rows_inner) * dx_inner
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    valid = label != ignore_index
    m = tl.load(STATS + rows, mask=row_ok, other=0.0)
    log_s = tl.load(STATS + n_rows + rows, mask=row_ok, other=0.0)
    g_lp = tl.where(valid, tl.load(DLOGP + rows, mask=row_ok, other=0.0).to(tl.float32), 0.0)
    g_h = tl.zeros([BLOCK_M], tl.float32)
    ent = tl.zeros([BLOCK_M], tl.float32)
    if HAS_DENT:
        g_h = tl.where(valid, tl.load(DENT + rows, mask=row_ok, other=0.0).to(tl.float32), 0.0)
        ent = tl.load(ENT + rows, mask=row_ok, other=0.0)
    n_read = tl.where(valid, V, 0)
    n_write = tl.where(row_ok, V, 0)  # ignored rows still get their zeros written
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        ptrs = base[:, None] + cols[None, :].to(tl.int64) * s_v
        x = tl.load(ptrs, mask=cols[None, :] < n_read[:, None], other=0.0).to(tl.float32) * inv_temp
        lp = (x - m[:, None]) - log_s[:, None]
        p = tl.exp(lp)
        # d logp / dx_j = [j == y] - p_j. At the label, 1 - p is formed as -expm1(lp) in float32: the
        # naive 1 - p cancels catastrophically when p -> 1 (Liger-Kernel #1329 did it in bf16).
        one_minus_p = tl.where(lp > -1e-2, -lp * (1.0 + lp * (0.5 + lp * (1.0 / 6.0))), 1.0 - p)
        g = tl.where(cols[None, :] == label[:, None], g_lp[:, None] * one_minus_p, -g_lp[:, None] * p)
        if HAS_DENT:
            # dH / dx_j = -p_j (log p_j + H)
            g -= g_h[:, None] * tl.where(p > 0.0, p * (lp + ent[:, None]), 0.0)
        g = tl.where(valid[:, None], g * inv_temp, 0.0)
        dptrs = dbase[:, None] + cols[None, :].to(tl.int64) * dx_v
        tl.store(dptrs, g.to(DX.dtype.element_ty), mask=cols[None, :] < n_write[:, None])


# Elements of one (BLOCK_M, BLOCK_V) tile in the interpreter: bounds its NumPy temporaries.
_INTERPRETER_TILE = 1 << 20


def rows_per_program(n: int, block_v: int, device: torch.device) -> int:
    """One row per program on GPU (a vocabulary row already keeps an SM's loads in flight); in the
    interpreter every op costs a Python dispatch whatever its size, so a program takes as many rows as fit
    a tile."""
    if device.type != "cpu":
        return 1
    return max(1, min(next_pow2(n), _INTERPRETER_TILE // block_v, 256))


def _logprobs_fwd_triton(logits, labels, inv_temp, ignore_index, return_entropy):
    x, n, inner, s_outer, s_inner, s_v = as_rows(logits)
    V = logits.shape[-1]
    dev = logits.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.empty(2, n, dtype=torch.float32, device=dev)
    ent = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=dev)
    if n > 0:
        block, warps = vocab_block(V, logits.dtype, dev)
        block_m = rows_per_program(n, block, dev)
        launch(
            _logprobs_fwd_kernel, (triton.cdiv(n, block_m),), dev,
            x, labels, n, logp, ent if return_entropy else logp, stats,
            V, inner, s_outer, s_inner, s_v, inv_temp, ignore_index,
            RETURN_ENTROPY=return_entropy, BLOCK_M=block_m, BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return logp, ent, stats


def _logprobs_bwd_triton(logits, labels, stats, ent, dlogp, dent, inv_temp, ignore_index, out=None):
    """Gradient w.r.t. logits, written into ``out`` (default: a new tensor shaped like the logits; pass
    ``out=logits`` to overwrite them in place). ``stats`` is the forward kernel's (2, n) row max and log
    sum-exp; a plain (n,) logsumexp is accepted too (slightly less accurate near p = 1)."""
    x, n, inner, s_outer, s_inner, s_v = as_rows(logits)
    if stats.dim() == 1:
        stats = torch.stack([stats.float(), torch.zeros_like(stats, dtype=torch.float32)])
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    dx, _, d_rows_inner, d_outer, d_inner, d_v = as_rows(out)
    V = logits.shape[-1]
    if n > 0:
        block, warps = vocab_block(V, logits.dtype, logits.device)
        block_m = rows_per_program(n, block, logits.device)
        has_dent = dent is not None
        launch(
            _logprobs_bwd_kernel, (triton.cdiv(n, block_m),), logits.device,
            x, dx, labels, n, stats, ent if has_dent else dlogp, dlogp, dent if has_dent else dlogp,
            V, inner, s_outer, s_inner, s_v, d_rows_inner, d_outer, d_inner, d_v, inv_temp, ignore_index,
            HAS_DENT=has_dent, BLOCK_M=block_m, BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# PyTorch path: the reference, chunked over rows and recomputed in backward
# ----------------------------------------------------------------------------------------------------
def _row_blocks(x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(first_row, 2-D view) pieces covering a (..., V) tensor's rows in order, without copying."""
    V = x.shape[-1]
    try:
        return [(0, x.view(-1, V))]
    except RuntimeError:
        flat = x.flatten(0, -3) if x.dim() > 3 else x  # (B, T, V) with non-mergeable strides
        T = flat.shape[-2]
        return [(b * T, flat[b]) for b in range(flat.shape[0])]


def _row_chunks(x: torch.Tensor):
    V = max(x.shape[-1], 1)
    step = max(1, _TORCH_CHUNK_ELEMS // V)
    for first, block in _row_blocks(x):
        for i in range(0, block.shape[0], step):
            yield first + i, block[i : i + step]


def _torch_chunk_fwd(chunk, labels, inv_temp, ignore_index, return_entropy):
    """The forward kernel's math on a (rows, V) chunk with torch ops: logp, entropy, row max, log sum-exp."""
    valid = labels != ignore_index
    x = chunk.float() * inv_temp  # (rows, V) float32 temporary, one chunk at a time
    m = x.amax(dim=-1, keepdim=True)
    # Only an all -inf row (nothing to normalise) is re-referenced, as in the kernel: a +inf or NaN row max
    # must stay and make the row NaN.
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    x.sub_(m)
    e = x.exp()
    s = e.sum(-1)
    log_s = s.log()
    # A label outside [0, V) (range checks switched off) reads column 0 and gives NaN, as in the kernel.
    in_range = (labels >= 0) & (labels < x.shape[-1])
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).unsqueeze(-1)
    logp = (x.gather(-1, safe).squeeze(-1) - log_s).clamp(max=0.0)
    logp = torch.where(valid, torch.where(in_range, logp, float("nan")), 0.0)
    ent = None
    if return_entropy:
        w = torch.where(e > 0, e * x, 0.0).sum(-1)  # sum exp(x - m) (x - m), as in the kernel
        ent = torch.where(valid, (log_s - w / s).clamp(min=0.0), 0.0)
    return logp, ent, m.squeeze(-1), log_s


def _torch_chunk_bwd(chunk, labels, m, log_s, ent, g_lp, g_h, inv_temp, ignore_index):
    """The backward kernel's math on a chunk: (1/T) [g_lp ([j = y] - p) - g_H p (log p + H)]."""
    valid = labels != ignore_index
    lp = chunk.float() * inv_temp
    lp.sub_((m + log_s).unsqueeze(-1))
    p = lp.exp()
    g_lp = torch.where(valid, g_lp, 0.0).unsqueeze(-1)
    grad = p * (-g_lp)
    in_range = ((labels >= 0) & (labels < lp.shape[-1])).unsqueeze(-1)
    safe = torch.where(in_range.squeeze(-1), labels, torch.zeros_like(labels)).unsqueeze(-1)
    lp_y = lp.gather(-1, safe)
    at_label = g_lp * (-torch.expm1(lp_y))  # 1 - p_y without cancellation near p = 1
    if g_h is not None:
        g_h = torch.where(valid, g_h, 0.0).unsqueeze(-1)
        h = ent.unsqueeze(-1)
        grad.sub_(g_h * torch.where(p > 0, p * (lp + h), 0.0))
        at_label = at_label - g_h * lp_y.exp() * (lp_y + h)
    # A row whose label is outside [0, V) has no label column (as in the kernel): column 0 keeps its value.
    grad.scatter_(-1, safe, torch.where(in_range, at_label, grad.gather(-1, safe)))
    return grad.mul_(inv_temp)


def _logprobs_fwd_torch(logits, labels, inv_temp, ignore_index, return_entropy):
    """``_logprobs_fwd_triton``'s contract with torch ops, chunk by chunk over rows: peak memory is a few
    float32 chunks (~1M elements each), never (N, V)."""
    n = labels.numel()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=logits.device)
    stats = torch.empty(2, n, dtype=torch.float32, device=logits.device)
    for r0, chunk in _row_chunks(logits):
        rows = slice(r0, r0 + chunk.shape[0])
        lp, h, m, log_s = _torch_chunk_fwd(chunk, labels[rows], inv_temp, ignore_index, return_entropy)
        logp[rows], stats[0, rows], stats[1, rows] = lp, m, log_s
        if return_entropy:
            ent[rows] = h
    return logp, ent, stats


def _logprobs_bwd_torch(logits, labels, stats, ent, dlogp, dent, inv_temp, ignore_index):
    """``_logprobs_bwd_triton``'s contract with torch ops, recomputing the softmax one chunk at a time."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad.view(-1, logits.shape[-1])
    for r0, chunk in _row_chunks(logits):
        rows = slice(r0, r0 + chunk.shape[0])
        with_ent = dent is not None
        g = _torch_chunk_bwd(chunk, labels[rows], stats[0, rows], stats[1, rows], ent[rows] if with_ent else None,
                             dlogp[rows], dent[rows] if with_ent else None, inv_temp, ignore_index)  # fmt: skip
        grad_rows[rows].copy_(g)
    return grad


class _LogProbs(torch.autograd.Function):
    """logp_i = x_{i,y_i} - logsumexp(x_i), H_i = logsumexp(x_i) - sum_j p_ij x_ij, with x = logits / T.
    Forward keeps only the per-row max and log sum-exp (and the entropy); backward streams the logits once
    more: d/dx_j = (1/T) [g_logp ([j = y] - p_j) - g_H p_j (log p_j + H)]. Triton kernels or the same math
    in chunked torch ops."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, use_triton):
        flat_labels = labels.reshape(-1).to(torch.int64)
        inv_temp = 1.0 / temperature
        fwd = _logprobs_fwd_triton if use_triton else _logprobs_fwd_torch
        logp, ent, stats = fwd(logits, flat_labels, inv_temp, ignore_index, return_entropy)
        ctx.save_for_backward(logits, flat_labels, stats, ent)
        ctx.set_materialize_grads(False)  # an entropy nobody differentiates arrives as None: no work for it
        ctx.cfg = (inv_temp, ignore_index, return_entropy, use_triton)
        if not return_entropy:
            ctx.mark_non_differentiable(ent)
        return logp.view(labels.shape), ent.view(labels.shape if return_entropy else (0,))

    @staticmethod
    def backward(ctx, dlogp, dent):
        logits, flat_labels, stats, ent = ctx.saved_tensors
        inv_temp, ignore_index, return_entropy, use_triton = ctx.cfg
        dlogp = torch.zeros_like(stats[0]) if dlogp is None else dlogp.reshape(-1).float().contiguous()
        dent = dent.reshape(-1).float().contiguous() if (return_entropy and dent is not None) else None
        bwd = _logprobs_bwd_triton if use_triton else _logprobs_bwd_torch
        grad = bwd(logits, flat_labels, stats, ent, dlogp, dent, inv_temp, ignore_index)
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def check_temperature(temperature) -> None:
    """A finite number > 0 (inf would silently make every distribution uniform)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_logits_labels(logits, labels, temperature, *, ignore_index=-100, backend="auto") -> str:
    """Shared boundary checks for ops that take (..., V) logits and (...) labels; returns the backend."""
    check_float("logits", logits)
    check_int("labels", labels)
    check_same_device(logits=logits, labels=labels)
    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of logits without its last (vocabulary) dim: logits {tuple(logits.shape)} "
            f"needs labels {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a vocabulary dim V >= 1 (the last dim), got shape {tuple(logits.shape)}")
    check_temperature(temperature)
    check_labels_in_range(labels, logits.shape[-1], ignore_index)
    return resolve_backend(backend, logits.device)


def logprobs(
    logits: torch.Tensor,  # (..., V) fp32 / bf16 / fp16, any strides
    labels: torch.Tensor,  # (...) integer
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Token log-probabilities ``log softmax(logits / temperature)[labels]`` as float32, and optionally the
    entropy of ``softmax(logits / temperature)``.

    Positions whose label is ``ignore_index`` give logp 0, entropy 0 and zero gradient. ``backend``:
    ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` (a CPU tensor runs the same kernels in
    Triton's interpreter) or ``"torch"`` (the chunked reference). Labels are range-checked with one host
    sync unless ``fusedrl.kernels.set_validation(False)`` or during CUDA-graph capture.

    Returns ``logp`` (shape of labels) or ``(logp, entropy)``.
    """
    backend = check_logits_labels(logits, labels, temperature, ignore_index=ignore_index, backend=backend)
    logp, ent = _LogProbs.apply(logits, labels, float(temperature), int(ignore_index), bool(return_entropy),
                                backend == "triton")  # fmt: skip
    return (logp, ent) if return_entropy else logp


def logprobs_ref(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Textbook reference: full log-softmax in (at least) float32, gather, entropy. Differentiable by
    autograd; float64 inputs stay float64 (the tests' ground truth)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lp = torch.log_softmax(x, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = torch.where(valid, lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return logp
    p = lp.exp()
    # p log p -> 0 as p -> 0: a -inf logit (a masked vocabulary entry) adds 0, not 0 * -inf = NaN, to the
    # entropy and (lp zeroed there first) to its gradient.
    ent = torch.where(valid, -(p * torch.where(p > 0, lp, 0.0)).sum(-1), 0.0)
    return logp, ent
