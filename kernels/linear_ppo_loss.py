"""lm_head fused with token log-probs / the PPO loss: ``logits = hidden @ weight.T (+ bias)`` is formed one
chunk of tokens at a time and never whole, so memory is O(N * H + chunk * V) instead of O(N * V).

Per chunk, on the Triton path: the chunk's logits in the input dtype, the fused forward kernel, the
backward kernel written in place into the same chunk buffer, then ``dh = dlogits @ W``,
``dW += dlogits.T @ h`` (accumulated in float32, cast to the weight dtype at the end) and
``db += sum(dlogits)``. ``linear_ppo_loss`` has a scalar loss, so it does all of this in forward and its
backward only scales the stored gradients; ``linear_logprobs`` has per-token upstream gradients, so its
backward recomputes each chunk of logits. The torch path has the same structure, with the row softmax of
kernels/_rows.py run over ~1M-element sub-chunks of the chunk in place; every chunk reuses one logits
buffer, and on CPU ``linear_ppo_loss`` drops the unscored rows before the GEMMs. How many tokens a chunk
holds (by arithmetic intensity, within a memory budget) is explained at ``_chunk_rows``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._policy import ppo_fwd, ppo_metrics, prepare_ppo_inputs
from ._rows import (
    N_STATS,
    STAT_LOSS,
    check_temperature,
    chunk_workspace,
    logprobs_bwd_triton,
    logprobs_fwd_torch,
    logprobs_fwd_triton,
    ppo_bwd_torch,
    ppo_bwd_triton,
    row_chunks,
    torch_chunk_bwd,
)
from ._utils import (
    IGNORE_INDEX,
    check_float,
    check_int,
    check_labels_in_range,
    check_same_device,
    per_token,
    resolve_backend,
)
from .logprobs import logprobs_ref
from .configs import PPOLossConfig
from .ppo_loss import ppo_loss_ref

# Tokens per chunk. Each chunk runs three GEMMs against the whole (V, H) weight -- logits = h W^T,
# dh = dlogits W, dW += dlogits^T h -- i.e. 6 c V H flops for c rows, while W is streamed twice in the input
# dtype and the float32 dW accumulator is read and written once: (2 s + 8) V H bytes (s = itemsize) whatever
# c is. The arithmetic intensity 6 c / (2 s + 8) flop/B (0.375 c in fp32, 0.5 c in bf16) must sit well
# above the machine balance, or the chunks are memory-bound on W (at the old CPU rule of 2M elements / V,
# c = 13 at V = 151936: ~5 flop/B, and the loss ran 4x slower than eager). Within that, a memory budget on
# the chunk's logits keeps the O(chunk * V) promise.
# - CPU: one core does ~90 GFLOP/s fp32 against ~10 GB/s (balance ~9 flop/B); c = 512 gives 192 flop/B.
#   Measured at V = 151936, one thread: on a 2-vCPU AMD EPYC the GEMMs' time per token was flat from c = 128 to
#   1024 (3-4x worse at c = 13); on a 2-vCPU Intel Xeon (AVX-512) 256-row chunks made h W^T and dlogits W ~25%
#   slower than 512-row ones (the whole loss at N = 1024: 4-5% slower), flat from 512 to 1024. The budget of
#   512 MiB of float32 logits caps c at 883 rows at V = 151936 (311 MB per chunk at c = 512).
#   The elementwise softmax work runs over sub-chunks of ~1M elements of the chunk (kernels/_rows.py), so
#   its float32 scratch stays a few MiB whatever c is. And c <= H: then a chunk's (c, V) float32 logits never
#   outgrow the (V, H) float32 head gradient the caller holds anyway, so a small-H model's peak stays bound by
#   its weights (at H=64, V=151936 a 512-row chunk is 311 MiB, 8x the gradient), while 6c / 16 flop per byte
#   of W at c = 64 is still ~4x a core's balance.
# - GPU (H200: ~990 TFLOP/s bf16 against 4.8 TB/s, balance ~206 flop/B): 256 MiB of logits in the input
#   dtype gives c = 880 at V = 151936 bf16 (440 flop/B, ~2x the balance) in whole 16-row MMA tiles; the
#   (c, V) chunk is ~0.4% of the (N, V) logits at N = 64k. Not yet checked against a GPU measurement.
# Chunks are balanced (n = 1000 at c = 512 runs 2 chunks of 500, not 512 and 488).
_GPU_CHUNK_BYTES = 256 << 20
_CPU_CHUNK_ROWS = 512
_CPU_CHUNK_BYTES = 512 << 20


def _chunk_rows(n: int, V: int, H: int, dtype: torch.dtype, device: torch.device, chunk_size) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
        return chunk_size
    if device.type == "cuda":
        rows = _GPU_CHUNK_BYTES // (V * dtype.itemsize)
        rows = max(16, rows // 16 * 16)  # whole MMA tiles
        return max(1, min(n, rows))
    rows = max(1, min(_CPU_CHUNK_ROWS, H, _CPU_CHUNK_BYTES // (V * 4)))
    n_chunks = -(-max(n, 1) // rows)
    return max(1, -(-n // n_chunks))


def _project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor | None = None):
    """(n, H) @ (V, H).T (+ b) in the input dtype -> contiguous (n, V), written into the first n rows of
    ``buf`` when given: one (chunk, V) buffer serves every chunk (a fresh one per chunk is fresh pages from
    the OS each time on CPU)."""
    out = None if buf is None else buf[: h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _chunk_buffer(chunk: int, n: int, weight: torch.Tensor) -> torch.Tensor | None:
    """The reusable (chunk, V) logits buffer, or None for a single chunk (nothing to reuse)."""
    if n <= chunk:
        return None
    return torch.empty(chunk, weight.shape[0], dtype=weight.dtype, device=weight.device)


def _scored_rows(labels: torch.Tensor, use_triton: bool) -> torch.Tensor | None:
    """Indices of the rows that are scored (label != IGNORE_INDEX), or None for all of them. On the CPU torch
    path the other rows are skipped: they add nothing to the loss or to any gradient, and their share of
    the three GEMMs is pure waste (prompt and padding tokens are often most of a packed batch). The index
    is a host sync, which is free on CPU; the GPU path keeps its no-sync contract and computes them."""
    if use_triton or labels.device.type != "cpu":
        return None
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    return None if keep.numel() == labels.numel() else keep


# Devices whose torch has a float32-output addmm for bf16 / fp16 operands (CPU torch has none: there the chunk is
# upcast, as documented), and whether it has worked so far: cleared, with one warning, the first time it fails.
_ADDMM_OUT_DTYPE_DEVICES = ("cuda",)
_addmm_out_dtype = True


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with ``acc`` in float32 (or float64) and a, b in the input dtype, without rounding the
    partial product to bf16 / fp16 and, on CUDA, without an upcast copy of the chunk."""
    global _addmm_out_dtype
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.device.type in _ADDMM_OUT_DTYPE_DEVICES and _addmm_out_dtype:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError) as e:
            _addmm_out_dtype = False
            warnings.warn(
                f"torch.addmm(..., out_dtype={acc.dtype}) with {a.dtype} operands is unavailable in torch "
                f"{torch.__version__} on {a.device.type} ({type(e).__name__}): the fused lm_head losses now accumulate "
                f"dW through a {acc.dtype} copy of every chunk, a {acc.dtype} GEMM several times slower than the "
                f"{a.dtype} one (a torch with out_dtype addmm avoids it)",
                RuntimeWarning,
                stacklevel=2,
            )
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _GradAccumulator:
    """dh rows, float32 dW and db for the chunks of one lm_head, in the layout autograd wants back."""

    def __init__(self, h, weight, bias, needs):
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        self.weight = weight
        self.dh = torch.empty_like(h) if needs[0] else None
        # Same-dtype dW starts as the first chunk's product (mm into it): no zero-filled (V, H) pass first.
        self.dw_pending = needs[1] and acc_dtype == weight.dtype
        make = torch.empty if self.dw_pending else torch.zeros
        self.dw = make(weight.shape, dtype=acc_dtype, device=weight.device) if needs[1] else None
        self.db = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if (
            bias is not None and needs[2]) else None  # fmt: skip

    def add(self, rows: slice, h_c: torch.Tensor, dlogits: torch.Tensor) -> None:
        if self.dh is not None:
            torch.mm(dlogits, self.weight, out=self.dh[rows])
        if self.dw is not None and self.dw_pending:
            torch.mm(dlogits.t(), h_c, out=self.dw)
            self.dw_pending = False
        elif self.dw is not None:
            _addmm_acc(self.dw, dlogits.t(), h_c)
        if self.db is not None:
            self.db += dlogits.sum(0, dtype=self.db.dtype)

    def results(self, hidden_shape, weight, bias):
        if self.dw_pending:  # no rows at all
            self.dw.zero_()
        dh = None if self.dh is None else self.dh.view(hidden_shape)
        dw = None if self.dw is None else self.dw.to(weight.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return dh, dw, db


# ----------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------
class _LinearPPOLoss(torch.autograd.Function):
    """L = sum_i w_i l_i(logp, H) with logits = h W^T + b. Per chunk: dlogits from the fused PPO kernels
    (c_lp, c_H as in ``ppo_loss``), dh = dlogits W, dW = sum dlogits^T h, db = sum dlogits -- all in
    forward; backward multiplies them by grad_out. A sequence-level ratio (GSPO) couples tokens of different
    chunks: then a first pass over the chunks writes every token's logp and H, the per-token math runs on those
    (n,) vectors, and a second pass recomputes each chunk's logits for its gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, config, chunk, use_triton):
        h = hidden.reshape(-1, hidden.shape[-1])
        n = h.shape[0]
        keep = _scored_rows(tokens.labels, use_triton)
        if keep is not None:  # only the scored rows, compacted (the others hold zeros in stats and dh)
            h, tokens = h.index_select(0, keep), tokens.take(keep)
        n_k = h.shape[0]
        grads = _GradAccumulator(h, weight, bias, ctx.needs_input_grad)
        buf = _chunk_buffer(chunk, n_k, weight)
        bwd = ppo_bwd_triton if use_triton else ppo_bwd_torch
        if config.importance_sampling_level == "token":
            stats = torch.empty(N_STATS, n_k, dtype=torch.float32, device=h.device)
            for c0 in range(0, n_k, chunk):
                rows = slice(c0, min(n_k, c0 + chunk))
                logits = _project(h[rows], weight, bias, buf)  # (chunk, V), input dtype
                _, mls = ppo_fwd(logits, tokens.take(rows), config, use_triton, stats=stats[:, rows])
                dlogits = bwd(logits, tokens.labels[rows], mls, stats[:, rows], 1.0, config, out=logits)
                grads.add(rows, h[rows], dlogits)
                del logits, dlogits
        else:
            logp = torch.empty(n_k, dtype=torch.float32, device=h.device)
            ent = torch.empty_like(logp)
            mls = torch.empty(2, n_k, dtype=torch.float32, device=h.device)
            fwd = logprobs_fwd_triton if use_triton else logprobs_fwd_torch
            for c0 in range(0, n_k, chunk):
                rows = slice(c0, min(n_k, c0 + chunk))
                logits = _project(h[rows], weight, bias, buf)
                logp[rows], ent[rows], mls[:, rows] = fwd(logits, tokens.labels[rows], 1.0 / float(config.temperature),
                                                          IGNORE_INDEX, True)  # fmt: skip
                del logits
            stats, _ = ppo_fwd(None, tokens, config, use_triton, stream=(logp, ent, mls))
            for c0 in range(0, n_k, chunk):
                rows = slice(c0, min(n_k, c0 + chunk))
                logits = _project(h[rows], weight, bias, buf)
                dlogits = bwd(logits, tokens.labels[rows], mls[:, rows].contiguous(), stats[:, rows], 1.0, config,
                              out=logits)  # fmt: skip
                grads.add(rows, h[rows], dlogits)
                del logits, dlogits
        dh, dw, db = grads.results((n_k, h.shape[1]), weight, bias)
        if keep is not None:
            stats = torch.zeros(N_STATS, n, dtype=torch.float32, device=h.device).index_copy_(1, keep, stats)
            if dh is not None:
                dh = torch.zeros(n, h.shape[1], dtype=dh.dtype, device=dh.device).index_copy_(0, keep, dh)
        if dh is not None:
            dh = dh.view(hidden.shape)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh, dw, db)))
        ctx.has = (dh is not None, dw is not None, db is not None)
        ctx.mark_non_differentiable(stats)
        return stats[STAT_LOSS].sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        saved = ctx.saved_tensors
        # grad_out = 1, the plain loss.backward(), on CPU (where reading it is no sync): the stored gradients
        # as they are, without a scaled copy of dW (V x H) next to them.
        if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
            return (*(g if has else None for g, has in zip(saved, ctx.has)), None, None, None, None)
        dh, dw, db = (g * grad_loss if has else None for g, has in zip(saved, ctx.has))
        return dh, dw, db, None, None, None, None


class _LinearLogProbs(torch.autograd.Function):
    """logp_i = x_{i,y_i} - logsumexp(x_i), H_i = -sum_j p_ij log p_ij with x = (h W^T + b) / T, chunked;
    backward recomputes each chunk of logits and overwrites it with dlogits before the three matmuls."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy, chunk, use_triton):
        h = hidden.reshape(-1, hidden.shape[-1])
        n = h.shape[0]
        dev = h.device
        logp = torch.empty(n, dtype=torch.float32, device=dev)
        ent = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=dev)
        mls = torch.empty(2, n, dtype=torch.float32, device=dev)
        buf = _chunk_buffer(chunk, n, weight)
        for c0 in range(0, n, chunk):
            rows = slice(c0, min(n, c0 + chunk))
            logits = _project(h[rows], weight, bias, buf)
            if use_triton:
                lp, ent_c, mls[:, rows] = logprobs_fwd_triton(logits, labels[rows], 1.0 / temperature,
                                                               ignore_index, return_entropy)  # fmt: skip
            else:
                lp, ent_c, mls_c = logprobs_fwd_torch(logits, labels[rows], 1.0 / temperature, ignore_index,
                                                      return_entropy)  # fmt: skip
                mls[:, rows] = mls_c
            logp[rows] = lp
            if return_entropy:
                ent[rows] = ent_c
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, mls, ent)
        ctx.set_materialize_grads(False)  # an entropy nobody differentiates arrives as None: no work for it
        ctx.cfg = (temperature, ignore_index, return_entropy, chunk, use_triton)
        if not return_entropy:
            ctx.mark_non_differentiable(ent)
        shape = hidden.shape[:-1]
        return logp.view(shape), ent.view(shape if return_entropy else (0,))

    @staticmethod
    def backward(ctx, dlogp, dent):
        hidden, weight, bias, labels, mls, ent = ctx.saved_tensors
        temperature, ignore_index, return_entropy, chunk, use_triton = ctx.cfg
        h = hidden.reshape(-1, hidden.shape[-1])
        n = h.shape[0]
        dlogp = torch.zeros(n, device=h.device) if dlogp is None else dlogp.reshape(-1).float().contiguous()
        dent = dent.reshape(-1).float().contiguous() if (return_entropy and dent is not None) else None
        grads = _GradAccumulator(h, weight, bias, ctx.needs_input_grad)
        buf = _chunk_buffer(chunk, n, weight)
        work = None
        for c0 in range(0, n, chunk):
            rows = slice(c0, min(n, c0 + chunk))
            logits = _project(h[rows], weight, bias, buf)
            if work is None and not use_triton:
                work = chunk_workspace(logits, 1 if dent is None else 2)
            dent_c = None if dent is None else dent[rows]
            ent_c = None if dent is None else ent[rows]
            if use_triton:
                # The kernel reads the (2, rows) stats as one contiguous block.
                dlogits = logprobs_bwd_triton(logits, labels[rows], mls[:, rows].contiguous(), ent_c,
                                               dlogp[rows], dent_c, 1.0 / temperature, ignore_index,
                                               out=logits)  # fmt: skip
            else:
                dlogits = logits  # overwritten in place, one sub-chunk at a time (kernels/_rows.py)
                for r0, sub in row_chunks(logits):
                    sr = slice(c0 + r0, c0 + r0 + sub.shape[0])
                    torch_chunk_bwd(sub, labels[sr], mls[0, sr], mls[1, sr], None if ent_c is None else ent[sr],
                                    dlogp[sr], None if dent is None else dent[sr], 1.0 / temperature, ignore_index,
                                    out=sub, work=work)  # fmt: skip
            grads.add(rows, h[rows], dlogits)
            del logits, dlogits
        dh, dw, db = grads.results(hidden.shape, weight, bias)
        return dh, dw, db, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def _check_lm_head(hidden, weight, bias, labels, ignore_index, backend) -> str:
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_int("labels", labels)
    if bias is not None:
        check_float("bias", bias)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) or (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be ({weight.shape[0]},) of dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have V >= 1 rows (the vocabulary), got shape {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of hidden without its last dim: {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    check_labels_in_range(labels, weight.shape[0], ignore_index)
    return resolve_backend(backend, hidden.device)


def linear_logprobs(
    hidden: torch.Tensor,  # (N, H) or (B, T, H), fp32 / bf16 / fp16
    weight: torch.Tensor,  # (V, H), dtype of hidden
    labels: torch.Tensor,  # (N,) or (B, T) integer
    *,
    bias: torch.Tensor | None = None,  # (V,)
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    """``logprobs(hidden @ weight.T + bias, labels)`` without materialising the (N, V) logits: chunks of
    ``chunk_size`` tokens (default ~256 MB of logits on GPU), float32 dW accumulation, gradients w.r.t.
    hidden, weight and bias. Returns ``logp`` (shape of labels, float32) or ``(logp, entropy)``."""
    backend = _check_lm_head(hidden, weight, bias, labels, ignore_index, backend)
    check_temperature(temperature)
    n = labels.numel()
    chunk = _chunk_rows(n, *weight.shape, hidden.dtype, hidden.device, chunk_size)
    flat_labels = per_token(labels, torch.int64)
    logp, ent = _LinearLogProbs.apply(hidden, weight, bias, flat_labels, float(temperature), int(ignore_index),
                                      bool(return_entropy), chunk, backend == "triton")  # fmt: skip
    return (logp, ent) if return_entropy else logp


def linear_ppo_loss(
    hidden: torch.Tensor,  # (N, H) packed or (B, T, H) padded, fp32 / bf16 / fp16
    weight: torch.Tensor,  # (V, H), dtype of hidden
    labels: torch.Tensor,  # (N,) / (B, T) integer; -100 = ignored
    old_logp: torch.Tensor,  # (N,) / (B, T)
    advantages: torch.Tensor,  # (N,) / (B, T)
    mask: torch.Tensor | None = None,  # (N,) / (B, T)
    *,
    bias: torch.Tensor | None = None,  # (V,)
    ref_logp: torch.Tensor | None = None,  # (N,) / (B, T)
    rollout_logp: torch.Tensor | None = None,  # (N,) / (B, T)
    config: PPOLossConfig = PPOLossConfig(),
    cu_seqlens: torch.Tensor | None = None,  # (B + 1,) int
    num_tokens=None,
    num_sequences=None,
    chunk_size: int | None = None,
    return_per_token: bool = False,
    backend: str = "auto",
):
    """``ppo_loss(hidden @ weight.T + bias, ...)`` (same arguments, same ``(loss, metrics)``) without
    materialising the (N, V) logits; gradients w.r.t. hidden, weight and bias are computed chunk by chunk
    during forward (float32 dW accumulation), so backward costs nothing but a scale by grad_out. Sequence-level
    ratios (``importance_sampling_level != "token"``) project each chunk twice (see ``_LinearPPOLoss``)."""
    if not isinstance(config, PPOLossConfig):
        raise TypeError(f"config must be a PPOLossConfig, got {type(config).__name__}")
    backend = _check_lm_head(hidden, weight, bias, labels, IGNORE_INDEX, backend)
    tokens, valid, rollout_metrics = prepare_ppo_inputs(
        labels, old_logp, advantages, mask, ref_logp, rollout_logp, config, cu_seqlens, num_tokens, num_sequences
    )
    chunk = _chunk_rows(tokens.labels.numel(), *weight.shape, hidden.dtype, hidden.device, chunk_size)
    loss, stats = _LinearPPOLoss.apply(hidden, weight, bias, tokens, config, chunk, backend == "triton")
    return loss, ppo_metrics(stats, valid, rollout_metrics, per_token=return_per_token)


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------
def linear_logprobs_ref(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                        return_entropy=False):  # fmt: skip
    """Eager lm_head, then ``logprobs_ref`` on the full (N, V) logits."""
    return logprobs_ref(F.linear(hidden, weight, bias), labels, temperature=temperature,
                        ignore_index=ignore_index, return_entropy=return_entropy)  # fmt: skip


def linear_ppo_loss_ref(hidden, weight, labels, old_logp, advantages, mask=None, *, bias=None, **kwargs):
    """Eager lm_head, then ``ppo_loss_ref`` on the full (N, V) logits (same keywords)."""
    return ppo_loss_ref(F.linear(hidden, weight, bias), labels, old_logp, advantages, mask, **kwargs)
