"""Row building blocks of the ops that read (..., V) logits: logprobs, ppo_loss, linear_logprobs and
linear_ppo_loss. Internal to fusedrl.kernels; everything named here without a leading underscore is its
contract, used by those op files (and by nothing outside the package, which uses fusedrl.kernels' public
names).

The contract:
- Rows. ``logits`` is any (..., V) float tensor with strides (``_utils.as_rows`` views it as rows without a
  copy); ``labels`` are flat int64 (n,) with ``IGNORE_INDEX`` on ignored rows. Per-token tensors are flat
  float32 (n,). Nothing here validates user input except the ``check_*`` functions and
  ``prepare_ppo_inputs``; nothing here is an autograd Function.
- Streaming row softmax: ``logprobs_fwd_triton`` / ``logprobs_fwd_torch`` return ``(logp, entropy, mls)``
  with ``mls`` the (2, n) float32 row max m of logits / T and log sum exp(logits / T - m), the only
  per-row state backward needs; ``logprobs_bwd_triton`` / ``logprobs_bwd_torch`` and the per-chunk
  ``torch_chunk_fwd`` / ``torch_chunk_bwd`` give dL/dlogits from upstream dlogp (and dH) in the logits'
  dtype, optionally in place (``out=``). The Triton and torch versions of a block compute the same math.
  ``row_chunks`` splits (..., V) logits into ~1M-element row chunks; ``chunk_workspace`` is the float32
  scratch one op allocates once and passes to every chunk (``work=``, optional). On CPU float32 / bfloat16
  logits with a contiguous V axis the ``*_torch`` functions run native loops instead (csrc/cpu_rows/rows.cpp,
  ``fusedrl.kernels._cpu_rows``: one read per row forward, one read + one write backward, no temporaries, rows
  split over ``torch.get_num_threads()`` threads); ``native_cpu = False`` switches them off.
- PPO per-token step: ``ppo_fwd_triton`` (the fused kernel: the token-level clipped surrogate in registers) returns
  ``(stats, mls)`` with ``stats`` the (N_STATS, n) float32 per-token statistics (row ``STAT_LOSS`` holds the
  weighted loss, ``STAT_C_LP`` / ``STAT_C_H`` dL/dlogp and dL/dH, ``STAT_CLIP`` a ``CLIP_*`` code);
  ``ppo_bwd_triton`` / ``ppo_bwd_torch`` / ``dlogits_torch_chunk`` turn them into dL/dlogits. The same contract
  for every other setting, and on the torch backend, is ``_policy.ppo_fwd``, where the textbook per-token formulas
  (``_policy.policy_terms``) live.
- NaN and Inf are never hidden: a NaN or +inf input gives NaN in every output it feeds, on both backends
  (Triton's min / max are used with ``propagate_nan=ALL``; its default fmin / fmax would drop NaN);
  ignored / masked rows store exact zeros whatever they hold.
"""

from __future__ import annotations

import math
import torch

from ._utils import (
    IGNORE_INDEX,
    as_rows,
    check_float,
    check_int,
    check_labels_in_range,
    check_same_device,
    launch,
    next_pow2,
    per_token,
    resolve_backend,
    tl,
    triton,
    vocab_block,
)
from .configs import PPOLossConfig

# Rows per chunk on the PyTorch path: bounds the float32 temporaries at ~1M elements (4 MiB each) whatever N is.
_TORCH_CHUNK_ELEMS = 1 << 20
_F32_LOWEST = torch.finfo(torch.float32).min

# Native CPU loops (csrc/cpu_rows/rows.cpp) for the streaming row softmax on CPU float32 / bfloat16 logits: the
# torch path's math in one read of each row forward and one read + one write backward, no float32 temporaries.
# Optional: without the compiled module (or with ``native_cpu = False``, which the tests use to check the torch
# ops too) the chunked torch ops below run.
try:
    from . import _cpu_rows as _native
except ImportError:  # pragma: no cover - the extension is built with the package
    _native = None
native_cpu = _native is not None


# ----------------------------------------------------------------------------------------------------
# Streaming row softmax: Triton kernels and launchers
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
        # The mask is (cols < V) & row: a bound the compiler can see is constant over aligned groups of columns,
        # so the load is a 16-byte vector per thread; a per-row bound such as where(valid, V, 0) is data it
        # cannot see through, and every element becomes its own predicated scalar load.
        mask = (cols[None, :] < V) & valid[:, None]
        x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
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
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        ptrs = base[:, None] + cols[None, :].to(tl.int64) * s_v
        in_v = cols[None, :] < V  # vector loads and stores: see _stream_rows
        x = tl.load(ptrs, mask=in_v & valid[:, None], other=0.0).to(tl.float32) * inv_temp
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
        tl.store(dptrs, g.to(DX.dtype.element_ty), mask=in_v & row_ok[:, None])  # ignored rows get their zeros


# Elements of one (BLOCK_M, BLOCK_V) tile in the interpreter: bounds its NumPy temporaries.
_INTERPRETER_TILE = 1 << 20


def rows_per_program(n: int, block_v: int, device: torch.device) -> int:
    """One row per program on GPU (a vocabulary row already keeps an SM's loads in flight); in the
    interpreter every op costs a Python dispatch whatever its size, so a program takes as many rows as fit
    a tile."""
    if device.type != "cpu":
        return 1
    return max(1, min(next_pow2(n), _INTERPRETER_TILE // block_v, 256))


def logprobs_fwd_triton(logits, labels, inv_temp, ignore_index, return_entropy):
    x, n, inner, s_outer, s_inner, s_v = as_rows(logits)
    labels = per_token(labels)
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


def logprobs_bwd_triton(logits, labels, stats, ent, dlogp, dent, inv_temp, ignore_index, out=None):
    """Gradient w.r.t. logits, written into ``out`` (default: a new tensor shaped like the logits; pass
    ``out=logits`` to overwrite them in place). ``stats`` is the forward kernel's (2, n) row max and log
    sum-exp; a plain (n,) logsumexp is accepted too (slightly less accurate near p = 1). An ``out`` whose rows
    ``as_rows`` can only copy gets the gradient written back from that copy."""
    x, n, inner, s_outer, s_inner, s_v = as_rows(logits)
    labels, dlogp = per_token(labels), per_token(dlogp)
    ent = None if ent is None else per_token(ent)
    dent = None if dent is None else per_token(dent)
    if stats.dim() == 1:
        stats = torch.stack([stats.float(), torch.zeros_like(stats, dtype=torch.float32)])
    stats = stats.contiguous()  # read as one (2, n) block
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
        if dx.data_ptr() != out.data_ptr():
            out.copy_(dx.view(out.shape))
    return out


# ----------------------------------------------------------------------------------------------------
# Streaming row softmax: the same math in torch ops, chunked over rows
# ----------------------------------------------------------------------------------------------------
def _row_blocks(x: torch.Tensor, first: int = 0) -> list[tuple[int, torch.Tensor]]:
    """(first_row, 2-D view) pieces covering a (..., V) tensor's rows in order, never a copy (the backward
    writes through them in place): the whole tensor when its leading dims merge, else one piece per index of
    the leading dim, recursively."""
    V = x.shape[-1]
    if x.dim() <= 2:
        return [(first, x.reshape(-1, V) if x.dim() < 2 else x)]
    try:
        return [(first, x.view(-1, V))]
    except RuntimeError:  # leading dims whose strides do not merge
        rows = x[0].numel() // max(V, 1)
        return [piece for b in range(x.shape[0]) for piece in _row_blocks(x[b], first + b * rows)]


def row_chunks(x: torch.Tensor):
    V = max(x.shape[-1], 1)
    step = max(1, _TORCH_CHUNK_ELEMS // V)
    for first, block in _row_blocks(x):
        for i in range(0, block.shape[0], step):
            yield first + i, block[i : i + step]


def _pieces(logits: torch.Tensor, n_bufs: int, *outs: torch.Tensor):
    """The (first_row, rows) pieces a ``*_torch`` backward walks, and their float32 scratch: whole row blocks and
    none where the native loops take ``logits`` (and ``outs``), ~1M-element chunks and one workspace of
    ``n_bufs`` buffers for the torch ops."""
    if _native_ok(logits, *outs):
        return _row_blocks(logits), None
    return row_chunks(logits), chunk_workspace(logits, n_bufs)


def chunk_workspace(x: torch.Tensor, n_bufs: int = 2) -> torch.Tensor:
    """Float32 scratch for ``torch_chunk_fwd`` / ``torch_chunk_bwd`` over the chunks of ``x`` (..., V):
    (n_bufs, rows of the largest chunk, V). Allocated once per op and reused by every chunk: a fresh
    multi-MiB tensor per chunk is fresh pages from the OS each time, and on CPU those page faults cost
    more than the arithmetic."""
    V = max(x.shape[-1], 1)
    rows = min(max(1, _TORCH_CHUNK_ELEMS // V), max(1, x.numel() // V))
    return torch.empty(n_bufs, rows, V, dtype=torch.float32, device=x.device)


def _buf(work: torch.Tensor | None, i: int, like: torch.Tensor) -> torch.Tensor:
    """Scratch buffer i shaped like the (rows, V) chunk ``like``, float32."""
    if work is None or work.shape[0] <= i or work.shape[1] < like.shape[0] or work.shape[2] != like.shape[1]:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return work[i, : like.shape[0]]


def _f32_rows(chunk: torch.Tensor, inv_temp: float, out: torch.Tensor | None) -> torch.Tensor:
    """float32(chunk) / T written into ``out``; with ``out=None`` float32 logits at T = 1 are returned as they
    are (read only)."""
    if out is None:
        if chunk.dtype == torch.float32 and inv_temp == 1.0:
            return chunk
        out = torch.empty(chunk.shape, dtype=torch.float32, device=chunk.device)
    if inv_temp == 1.0:
        return out.copy_(chunk)
    # A 1-element float32 tensor (not a Python float or a 0-dim tensor, which would leave the product in
    # bf16 / fp16) makes this one pass: x / T in float32, as the kernel rounds it.
    return torch.mul(chunk, torch.full((1,), inv_temp, dtype=torch.float32, device=chunk.device), out=out)


def _native_ok(*tensors) -> bool:
    """Whether the native CPU loops take these (rows, V) tensors: CPU float32 / bfloat16, V contiguous."""
    return native_cpu and all(
        t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.bfloat16)
        and (t.shape[-1] <= 1 or t.stride(-1) == 1)
        for t in tensors
    )


def _np(t: torch.Tensor):
    """A NumPy view of a CPU tensor (bfloat16 as its int16 bits) for the native loops: no copy."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _np_f32(t: torch.Tensor | None):
    return None if t is None else _np(t.float().contiguous())


def _np_i64(t: torch.Tensor):
    return _np(t.to(torch.int64).contiguous())


def _label_index(labels: torch.Tensor, V: int):
    """(in_range, safe): labels in [0, V) and, for gathers, the labels with column 0 for the others."""
    in_range = (labels >= 0) & (labels < V)
    return in_range, torch.where(in_range, labels, torch.zeros_like(labels)).unsqueeze(-1)


# torch.compile of this per-chunk math (max, sum exp(x - m) and exp(x - lse) * c fused by inductor) was
# measured on the CI CPU (torch 2.13, one thread, 6 x 151936 bf16 chunks): forward 1.26 ns/element and
# backward 3.3 against ~1.0 each for the torch ops below, after a 66 s compile. Not used.
def torch_chunk_fwd(chunk, labels, inv_temp, ignore_index, return_entropy, work=None):
    """The forward kernel's math on a (rows, V) chunk with torch ops: logp, entropy, row max, log sum-exp.

    torch's row softmax does the max / sum-exp / normalise passes in one kernel with its fast vectorised
    exp (a separate torch.exp costs about twice the whole softmax here), so p = softmax(x / T) is formed and
    the state the kernel keeps is read off it: m = max(x / T), log s = -log max_j p_j (p is largest at the
    row max, where it is 1 / s), logp = (x_y / T - m) - log s. Scratch: one float32 (rows, V) buffer (two
    with the entropy), from ``work`` (``chunk_workspace``) when given; about four passes over the chunk."""
    valid = labels != ignore_index
    in_range, safe = _label_index(labels, chunk.shape[-1])
    needs_copy = return_entropy or chunk.dtype != torch.float32 or inv_temp != 1.0
    x = _f32_rows(chunk, inv_temp, _buf(work, 0, chunk) if needs_copy else None)  # (rows, V) float32
    m = x.amax(dim=-1)
    x_y = x.gather(-1, safe).squeeze(-1)
    # In place over the copy, unless x is still needed (the entropy) or is the caller's logits.
    p = torch.softmax(x, dim=-1, out=_buf(work, int(return_entropy), chunk) if (return_entropy or x is chunk) else x)
    log_s = -p.amax(dim=-1).log()
    # Only an all -inf row (nothing to normalise) is re-referenced, as in the kernel: a +inf or NaN row max
    # must stay and make the row NaN.
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    # (x_y - m) - log s rather than x_y - (m + log s), as in the kernel: log s survives when it is tiny.
    # A label outside [0, V) (range checks switched off) reads column 0 and gives NaN, as in the kernel.
    logp = ((x_y - m) - log_s).clamp(max=0.0)
    logp = torch.where(valid, torch.where(in_range, logp, float("nan")), 0.0)
    ent = None
    if return_entropy:
        # H = log s - sum_j p_j (x_j - m), the kernel's form: a difference of O(1) terms. A -inf logit has
        # p = 0 and adds 0, not 0 * -inf = NaN.
        z = x.sub_(m.unsqueeze(-1)).clamp_(min=_F32_LOWEST)
        w = p.mul_(z).sum(-1)
        ent = torch.where(valid, (log_s - w).clamp(min=0.0), 0.0)
    return logp, ent, m, log_s


def torch_chunk_bwd(chunk, labels, m, log_s, ent, g_lp, g_h, inv_temp, ignore_index, out=None, work=None):
    """The backward kernel's math on a chunk: (1/T) [g_lp ([j = y] - p) - g_H p (log p + H)], written into
    ``out`` (any float dtype, may be ``chunk`` itself) or returned as float32.

    p = softmax(x / T) by torch's row softmax (see ``torch_chunk_fwd``), then one multiply by the per-row
    coefficients; the label column is then fixed from the exact ``(x_y / T - m) - log s``. Scratch: one
    float32 (rows, V) buffer (two with the entropy term; none for float32 logits overwritten in place),
    from ``work`` when given; about three passes."""
    if _native_ok(chunk) and (out is None or _native_ok(out)):
        dest = torch.empty(chunk.shape, dtype=torch.float32, device=chunk.device) if out is None else out
        ent = None if g_h is None else ent  # the entropy is read only with its gradient
        _native.logprobs_bwd(_np(chunk), _np_i64(labels), _np_f32(m), _np_f32(log_s), _np_f32(ent), _np_f32(g_lp),
                             _np_f32(g_h), float(inv_temp), int(ignore_index), _np(dest),
                             torch.get_num_threads())  # fmt: skip
        if out is not None:
            torch.autograd.graph.increment_version(out)  # written through NumPy: autograd must see an in-place op
        return dest
    valid = labels != ignore_index
    in_range, safe = _label_index(labels, chunk.shape[-1])
    # Read before anything is written: ``out`` may be the chunk.
    x_y = chunk.gather(-1, safe).squeeze(-1).float() * inv_temp
    lp_y = (x_y - m) - log_s  # the kernel's rounding: log s survives when it is tiny (p_y -> 1)
    g_lp = torch.where(valid, g_lp, 0.0)
    at_label = g_lp * (-torch.expm1(lp_y))  # 1 - p_y without cancellation near p = 1
    if g_h is None:
        # Float32 logits that are overwritten anyway (out is chunk) are scaled and normalised in place.
        if out is chunk and chunk.dtype == torch.float32:
            x = chunk.mul_(inv_temp) if inv_temp != 1.0 else chunk
            p = torch.softmax(x, dim=-1, out=x)
        elif out is not None and out.dtype == torch.float32 and out.is_contiguous():
            # A float32 gradient buffer is its own scratch: softmax straight into it (from the logits at T = 1),
            # no float32 copy in and no copy out -- two passes fewer over the chunk.
            if chunk.dtype == torch.float32 and inv_temp == 1.0:
                p = torch.softmax(chunk, dim=-1, out=out)
            else:
                p = torch.softmax(_f32_rows(chunk, inv_temp, out), dim=-1, out=out)
        else:
            x = _f32_rows(chunk, inv_temp, _buf(work, 0, chunk))
            p = torch.softmax(x, dim=-1, out=x)
        p.mul_((-g_lp * inv_temp).unsqueeze(-1))
    else:
        x = _f32_rows(chunk, inv_temp, _buf(work, 0, chunk))
        p = torch.softmax(x, dim=-1, out=_buf(work, 1, chunk))
        g_h = torch.where(valid, g_h, 0.0)
        # -p (g_lp + g_h (log p + H)) / T = p (a + b log p): a, b per row. A -inf logit has p = 0 and must
        # give 0, not 0 * -inf = NaN.
        # (x - m) - log s in two steps, as the kernel rounds it: m + log s rounded first loses ~ulp(m) in
        # every log p, which the entropy term multiplies by g_H p / T.
        lp = x.sub_(m.unsqueeze(-1)).sub_(log_s.unsqueeze(-1)).clamp_(min=_F32_LOWEST)
        a = (-(g_lp + g_h * ent) * inv_temp).unsqueeze(-1)
        b = (-g_h * inv_temp).unsqueeze(-1)
        p.mul_(torch.addcmul(a, lp, b, out=lp))
        at_label = at_label - g_h * lp_y.exp() * (lp_y + ent)
    # The cast to the output dtype is a plain copy (a multiply with a bf16 out= allocates a float32 temporary).
    if out is None:
        dest = p if work is None else p.clone()  # the result must outlive the workspace
    else:
        dest = out if out is p else out.copy_(p)
    # A row whose label is outside [0, V) has no label column (as in the kernel): column 0 keeps its value.
    # index_put_, not scatter_: scatter_ on CPU walks the whole (rows, V) tensor for its (rows, 1) update.
    at = (torch.arange(dest.shape[0], device=dest.device), safe.squeeze(-1))
    fix = torch.where(in_range, at_label * inv_temp, dest[at].float())
    return dest.index_put_(at, fix.to(dest.dtype))


def logprobs_fwd_torch(logits, labels, inv_temp, ignore_index, return_entropy):
    """``logprobs_fwd_triton``'s contract with torch ops, chunk by chunk over rows: peak memory is a few
    float32 chunks (~1M elements each), never (N, V)."""
    n = labels.numel()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=logits.device)
    stats = torch.empty(2, n, dtype=torch.float32, device=logits.device)
    if _native_ok(logits):
        # Whole row blocks per call: the native loops keep no temporaries and split the rows over threads.
        for r0, block in _row_blocks(logits):
            rows = slice(r0, r0 + block.shape[0])
            _native.logprobs_fwd(_np(block), _np_i64(labels[rows]), float(inv_temp), int(ignore_index), _np(logp[rows]),
                                 _np(stats[0, rows]), _np(stats[1, rows]), _np(ent[rows]) if return_entropy else None,
                                 torch.get_num_threads())  # fmt: skip
        return logp, ent, stats
    work = chunk_workspace(logits, 2 if return_entropy else 1)
    for r0, chunk in row_chunks(logits):
        rows = slice(r0, r0 + chunk.shape[0])
        lp, h, m, log_s = torch_chunk_fwd(chunk, labels[rows], inv_temp, ignore_index, return_entropy, work)
        logp[rows], stats[0, rows], stats[1, rows] = lp, m, log_s
        if return_entropy:
            ent[rows] = h
    return logp, ent, stats


def logprobs_bwd_torch(logits, labels, stats, ent, dlogp, dent, inv_temp, ignore_index):
    """``logprobs_bwd_triton``'s contract with torch ops, recomputing the softmax one chunk at a time."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad.view(-1, logits.shape[-1])
    with_ent = dent is not None
    pieces, work = _pieces(logits, 2 if with_ent else 1, grad)
    for r0, chunk in pieces:
        rows = slice(r0, r0 + chunk.shape[0])
        torch_chunk_bwd(chunk, labels[rows], stats[0, rows], stats[1, rows], ent[rows] if with_ent else None,
                        dlogp[rows], dent[rows] if with_ent else None, inv_temp, ignore_index,
                        out=grad_rows[rows], work=work)  # fmt: skip
    return grad


def check_temperature(temperature) -> None:
    """A finite number > 0 (inf would silently make every distribution uniform)."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
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


# ----------------------------------------------------------------------------------------------------
# PPO per-token step: Triton kernel and launchers
# ----------------------------------------------------------------------------------------------------
_KL_MODE = {"k1": 1, "k2": 2, "k3": 3, "k3+": 4, "abs": 5}  # 0: no reference log-probs
_POLICY_MODE = {"clip": 0, "cispo": 1, "sapo": 2}

# Rows of the (8, N) float32 per-token statistics written by the forward pass (both backends).
STAT_LOSS, STAT_C_LP, STAT_C_H, STAT_RATIO, STAT_CLIP, STAT_APPROX_KL, STAT_KL, STAT_ENT = range(8)
N_STATS = 8
# Values of row STAT_CLIP: no bound holds, the lower clip, the upper clip, the dual-clip (or delta) bound.
CLIP_NONE, CLIP_LOW, CLIP_HIGH, CLIP_DUAL = 0.0, 1.0, 2.0, 3.0


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
    IS_W,  # (n_rows,) float32 rollout importance weights on the policy term (read only when HAS_IS)
    STATS,  # (8, n_rows) float32 out, rows STAT_LOSS.._ENT, s_stat apart
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
    clip_delta,  # +inf when the two-sided clip is off
    log_ratio_clip,  # +inf when the log-ratio clamp is off
    sapo_tau_pos,
    sapo_tau_neg,
    kl_clamp,  # +inf when the KL value clamp is off
    kl_coef,
    entropy_coef,
    ignore_index,
    KL_MODE: tl.constexpr,  # 0 none, 1 k1, 2 k2, 3 k3, 4 k3+, 5 abs
    KL_IW: tl.constexpr,  # the KL term times the importance ratio
    POLICY: tl.constexpr,  # 0 clip, 1 cispo, 2 sapo (_POLICY_MODE)
    HAS_IS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: 1 on GPU; many in the interpreter, where each op costs the same
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)  # tail rows of the last program alias row 0 and store nothing
    base = X + (rows // inner) * s_outer + (rows % inner) * s_inner  # (BLOCK_M,) row pointers
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    valid = label != ignore_index  # a masked token reads nothing
    # One read of the row: max, log sum-exp, the label's logp and the entropy (see _stream_rows).
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
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    if POLICY == 0:  # PPO's clipped surrogate
        # The two-sided clip clamps the unclipped ratio at delta (INTELLECT-2); +inf leaves it as it is.
        over_delta = ratio > clip_delta
        pg1 = -adv * tl.minimum(ratio, clip_delta, propagate_nan=tl.PropagateNan.ALL)
        pg2 = -adv * tl.minimum(tl.maximum(ratio, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                                propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        clipped = pg2 > pg1
        pg = tl.maximum(pg1, pg2, propagate_nan=tl.PropagateNan.ALL)
        dual_bound = -dual_clip * adv
        dual = tl.where(adv < 0.0, pg > dual_bound, False)
        pg = tl.where(dual, dual_bound, pg)
        dual = dual | (over_delta & ~clipped)  # the delta bound holds (the dual bound's twin; never both set)
        # d pg / d logp = -A r where the unclipped branch is active, 0 where a clip (or the dual / delta bound) is.
        g_pg = tl.where(clipped | dual | over_delta | lr_frozen, 0.0, -adv * ratio)
        state = tl.where(dual, 3.0, tl.where(clipped, tl.where(ratio < 1.0, 1.0, 2.0), 0.0))
    elif POLICY == 1:  # CISPO: -sg[clip(r)] A logp, the weight's gradient is never taken
        w_is = tl.minimum(tl.maximum(ratio, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                          propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        pg = -w_is * adv * logp
        g_pg = -w_is * adv
        state = tl.where(ratio < lo, 1.0, tl.where(ratio > hi, 2.0, 0.0))
    else:  # SAPO: -A (4 / tau) sigmoid(tau (r - 1)), tau by the advantage's sign
        tau = tl.where(adv > 0.0, sapo_tau_pos, sapo_tau_neg)
        z = tau * (ratio - 1.0)
        sig = tl.sigmoid(z)
        pg = -adv * sig * (4.0 / tau)
        # d pg / d logp = -A 4 sig (1 - sig) r: 0 where the gate is flat (and as 0 * inf once r overflows) or the
        # log-ratio clamp holds, as the torch path detaches it there.
        g_pg = tl.where((z > 40.0) | lr_frozen, 0.0, -adv * 4.0 * sig * (1.0 - sig) * ratio)
        state = tl.zeros([BLOCK_M], tl.float32)
    if HAS_IS:  # the rollout weight scales the policy term and its gradient
        is_w = tl.load(IS_W + rows, mask=row_ok, other=0.0)
        pg = pg * is_w
        g_pg = g_pg * is_w

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
        elif KL_MODE == 5:  # abs: |d|, gradient sign(d) (0 at 0, NaN stays NaN)
            kl = tl.abs(d)
            g_kl = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, tl.where(d == 0.0, 0.0, d)))
        else:
            # k3 = expm1(-d) + d and its gradient -expm1(-d), by the series of the torch path's _k3 below
            # |d| = 0.1 (exp(-d) - 1 + d cancels there), the closed form above it.
            small = tl.abs(d) < 0.1
            kl = tl.where(small, _k3_series(d), tl.exp(-d) + d - 1.0)
            if KL_MODE == 3:
                g_kl = tl.where(small, _k3_grad_series(d), 1.0 - tl.exp(-d))
            else:
                g_kl = d  # k3+: straight-through, k2's gradient
        # The value clamp (verl's [-10, 10]; +inf = off): no gradient where it holds.
        g_kl = tl.where((kl < -kl_clamp) | (kl > kl_clamp), 0.0, g_kl)
        kl = tl.minimum(tl.maximum(kl, -kl_clamp, propagate_nan=tl.PropagateNan.ALL), kl_clamp,
                        propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
        if KL_IW:  # importance-weighted KL: r k, d(r k)/dlogp = r k' + k r (r's gradient is 0 where lr is clamped)
            g_kl = ratio * g_kl + tl.where(lr_frozen, 0.0, kl * ratio)
            kl = kl * ratio

    loss = pg + kl_coef * kl - entropy_coef * ent
    c_lp = wt * (g_pg + kl_coef * g_kl)
    c_h = -wt * entropy_coef

    # Masked tokens store exact zeros whatever their inputs held (padding may be NaN).
    out = STATS + rows
    tl.store(out + 0 * s_stat, tl.where(valid, wt * loss, 0.0), mask=row_ok)
    tl.store(out + 1 * s_stat, tl.where(valid, c_lp, 0.0), mask=row_ok)
    tl.store(out + 2 * s_stat, tl.where(valid, c_h, 0.0), mask=row_ok)
    tl.store(out + 3 * s_stat, tl.where(valid, ratio, 0.0), mask=row_ok)
    # Clip state (CLIP_* codes): which bound holds, for the per-direction clip fractions.
    tl.store(out + 4 * s_stat, tl.where(valid, state, 0.0), mask=row_ok)
    tl.store(out + 5 * s_stat, tl.where(valid, approx_kl, 0.0), mask=row_ok)
    tl.store(out + 6 * s_stat, tl.where(valid, kl, 0.0), mask=row_ok)
    tl.store(out + 7 * s_stat, tl.where(valid, ent, 0.0), mask=row_ok)
    tl.store(MLS + rows, tl.where(valid, m, 0.0), mask=row_ok)
    tl.store(MLS + n_rows + rows, tl.where(valid, log_s, 0.0), mask=row_ok)


def ppo_fwd_triton(logits, labels, old, adv, ref, weight, config: PPOLossConfig, stats=None, is_weight=None):
    """Run the forward kernel. Returns ``stats`` (8, n; may be given as a view into a larger buffer) and
    ``mls`` (2, n), the row max and log sum-exp the logprobs backward kernel reads."""
    x, n, inner, s_outer, s_inner, s_v = as_rows(logits)
    labels, old, adv, weight = per_token(labels), per_token(old), per_token(adv), per_token(weight)
    ref = None if ref is None else per_token(ref)
    is_weight = None if is_weight is None else per_token(is_weight)
    V = logits.shape[-1]
    dev = logits.device
    if stats is None:
        stats = torch.empty(N_STATS, n, dtype=torch.float32, device=dev)
    mls = torch.empty(2, n, dtype=torch.float32, device=dev)
    if n > 0:
        block, warps = vocab_block(V, logits.dtype, dev)
        block_m = rows_per_program(n, block, dev)
        off = lambda v: float("inf") if v is None else float(v)  # noqa: E731
        launch(
            _ppo_fwd_kernel, (triton.cdiv(n, block_m),), dev,
            x, labels, old, adv, old if ref is None else ref, weight, old if is_weight is None else is_weight,
            stats, mls, n, V, inner, s_outer, s_inner, s_v, stats.stride(0),
            1.0 / float(config.temperature), float(config.clip_low), float(config.clip_high), off(config.dual_clip),
            off(config.clip_delta), off(config.log_ratio_clip), float(config.sapo_temperature_pos),
            float(config.sapo_temperature_neg), off(config.kl_clamp), float(config.kl_coef), float(config.entropy_coef),
            IGNORE_INDEX, KL_MODE=0 if ref is None else _KL_MODE[config.kl_estimator],
            KL_IW=bool(config.kl_importance_weighted), POLICY=_POLICY_MODE[config.policy_loss],
            HAS_IS=is_weight is not None,
            BLOCK_M=block_m, BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return stats, mls


def ppo_bwd_triton(logits, labels, mls, stats, grad_loss, config: PPOLossConfig, out=None):
    """dL/dlogits = grad_loss * (c_lp dlogp/dx + c_H dH/dx), by the logprobs backward kernel; the
    coefficients stay on the device (no sync)."""
    dlogp = stats[STAT_C_LP] * grad_loss
    dent = stats[STAT_C_H] * grad_loss if config.entropy_coef != 0 else None
    inv_temp = 1.0 / float(config.temperature)
    return logprobs_bwd_triton(logits, labels, mls, stats[STAT_ENT], dlogp, dent, inv_temp, IGNORE_INDEX, out=out)


# ----------------------------------------------------------------------------------------------------
# PPO per-token step: torch twins (same contract as the Triton launchers)
# ----------------------------------------------------------------------------------------------------
def ppo_bwd_torch(logits, labels, mls, stats, grad_loss, config: PPOLossConfig, out=None):
    """``ppo_bwd_triton``'s contract in torch ops, recomputing one chunk's softmax at a time; ``out=logits``
    overwrites the logits in place."""
    grad = out if out is not None else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = None if out is logits else grad.view(-1, logits.shape[-1])
    pieces, work = _pieces(logits, 2 if config.entropy_coef != 0 else 1, grad)
    for r0, chunk in pieces:
        rows = slice(r0, r0 + chunk.shape[0])
        # In place: torch_chunk_bwd reads this chunk of the logits before it writes any of it.
        dlogits_torch_chunk(chunk, labels[rows], mls[:, rows], stats[:, rows], grad_loss, config,
                            out=chunk if grad_rows is None else grad_rows[rows], work=work)  # fmt: skip
    return grad


def dlogits_torch_chunk(chunk, labels, mls, stats, grad_loss, config: PPOLossConfig, out=None, work=None):
    """Torch twin of ``ppo_bwd_triton`` on one (rows, V) chunk: written into ``out`` (may be ``chunk``) or
    returned as float32."""
    dent = stats[STAT_C_H] * grad_loss if config.entropy_coef != 0 else None
    return torch_chunk_bwd(chunk, labels, mls[0], mls[1], stats[STAT_ENT] if dent is not None else None,
                           stats[STAT_C_LP] * grad_loss, dent, 1.0 / float(config.temperature), IGNORE_INDEX,
                           out=out, work=work)  # fmt: skip
