"""Fused token log-probabilities and entropy: ``log softmax(logits / T)[label]`` and ``H(softmax(logits / T))``.

One streaming pass over each vocabulary row (online max / sum-exp), the label logit gathered directly,
a per-row logsumexp kept for backward. No (N, V) float32 tensor is ever allocated; backward writes the
gradient w.r.t. the logits in their own dtype.
"""

from __future__ import annotations

import torch

from ._rows import (
    check_logits_labels,
    logprobs_bwd_torch,
    logprobs_bwd_triton,
    logprobs_fwd_torch,
    logprobs_fwd_triton,
)
from ._rows import _logprobs_bwd_kernel, _logprobs_fwd_kernel  # noqa: F401  tests/test_gpu_compile.py compiles them here
from ._utils import per_token


# ----------------------------------------------------------------------------------------------------
# Autograd Function over the Triton kernels and the chunked torch path (kernels/_rows.py)
# ----------------------------------------------------------------------------------------------------
class _LogProbs(torch.autograd.Function):
    """logp_i = x_{i,y_i} - logsumexp(x_i), H_i = logsumexp(x_i) - sum_j p_ij x_ij, with x = logits / T.
    Forward keeps only the per-row max and log sum-exp (and the entropy); backward streams the logits once
    more: d/dx_j = (1/T) [g_logp ([j = y] - p_j) - g_H p_j (log p_j + H)]. Triton kernels or the same math
    in chunked torch ops."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, use_triton):
        flat_labels = per_token(labels, torch.int64)
        inv_temp = 1.0 / temperature
        fwd = logprobs_fwd_triton if use_triton else logprobs_fwd_torch
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
        bwd = logprobs_bwd_triton if use_triton else logprobs_bwd_torch
        grad = bwd(logits, flat_labels, stats, ent, dlogp, dent, inv_temp, ignore_index)
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
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
