"""Generalised advantage estimation over packed sequences, and the KL-shaped per-token reward that feeds it.

GAE (Schulman et al. 2016) per sequence, with the value after the last token taken as 0 (terminal):
``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``returns_t = A_t + V_t``.

Sequences are packed back to back in (N,) tensors and delimited by ``cu_seqlens`` (B+1,), the flash-attn
convention: sequence b owns tokens ``[cu_seqlens[b], cu_seqlens[b+1])``. One Triton program scans one
sequence backwards, a block of tokens at a time. Advantages are constants for the policy update, so
nothing here is differentiable: outputs are detached float32.
"""

from __future__ import annotations

import math

import torch

from ._utils import (
    REWARD_KL_ESTIMATORS,
    check_cu_seqlens,
    check_float,
    check_int,
    check_same_device,
    launch,
    resolve_backend,
    tl,
    triton,
)
from .ppo_loss import kl_penalty

# Tokens per block of the in-kernel reverse scan. The scan of a block is a (BLOCK, BLOCK) triangular
# weighting, so the block trades wasted multiply-adds (BLOCK per token) against serial loop steps.
_BLOCK_T = 64


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gae_fwd_kernel(
    R,  # (N,) rewards, any float dtype, element t at t * s_r
    V,  # (N,) values, any float dtype, element t at t * s_v
    CU,  # (B+1,) int32/int64 sequence offsets
    ADV,  # (N,) float32 out
    RET,  # (N,) float32 out
    N,
    s_r,
    s_v,
    gamma,  # runtime floats: a new gamma / lam never recompiles
    log2_c,  # log2(gamma * lam), or a large negative number when gamma * lam == 0
    BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    # Clamped to [0, N] so that a malformed cu_seqlens (checks switched off) never reads out of bounds.
    start = tl.minimum(tl.maximum(tl.load(CU + seq).to(tl.int64), 0), N)
    end = tl.minimum(tl.maximum(tl.load(CU + seq + 1).to(tl.int64), start), N)

    # A_i = sum_{j >= i} c^(j - i) delta_j inside a block, plus c^(BLOCK - i) times the advantage of the
    # first token after the block. Every weight is a power c^e with e >= 0, so (unlike a cumsum scaled
    # by c^-i) nothing overflows for any c in [0, 1]; the weights are loop-invariant and built once.
    i = tl.arange(0, BLOCK_T)
    e = (i[None, :] - i[:, None]).to(tl.float32)  # (BLOCK_T, BLOCK_T): output row i, input column j
    w = tl.where(e > 0.0, tl.exp2(tl.maximum(e, 1.0) * log2_c), 0.0)
    w = tl.where(e == 0.0, 1.0, w)
    w_carry = tl.exp2((BLOCK_T - i).to(tl.float32) * log2_c)  # (BLOCK_T,) c^(BLOCK - i)

    carry = 0.0  # advantage of the token just after the current block (0 past the sequence end)
    blk_end = end
    # A while loop, not range(n_blocks): Triton 3.6's interpreter cannot take a loaded value as a range
    # bound. Blocks are aligned to the sequence end, so only the last block processed (the sequence
    # head) is partial, and its masked lanes lie upstream of every valid token: they feed nothing.
    while blk_end > start:
        pos = blk_end - BLOCK_T + i
        ok = pos >= start
        ok_next = (pos + 1 >= start) & (pos + 1 < end)
        r = tl.load(R + pos * s_r, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(V + pos * s_v, mask=ok, other=0.0).to(tl.float32)
        v_next = tl.load(V + (pos + 1) * s_v, mask=ok_next, other=0.0).to(tl.float32)
        delta = tl.where(ok, r + gamma * v_next - v, 0.0)
        # Only columns j >= i feed row i: the zero weights above the diagonal are dropped, not multiplied, so
        # that a NaN or inf delta_j (0 * inf = NaN) never reaches the tokens after j, as in the recurrence.
        adv = tl.sum(tl.where(e >= 0.0, w * delta[None, :], 0.0), 1) + w_carry * carry
        tl.store(ADV + pos, adv, mask=ok)
        tl.store(RET + pos, adv + v, mask=ok)
        carry = tl.sum(tl.where(i == 0, adv, 0.0), 0)
        blk_end -= BLOCK_T


def _gae_triton(rewards, values, cu_seqlens, gamma, lam):
    n = rewards.shape[0]
    dev = rewards.device
    adv = torch.empty(n, dtype=torch.float32, device=dev)
    ret = torch.empty(n, dtype=torch.float32, device=dev)
    n_seq = cu_seqlens.shape[0] - 1
    if n > 0 and n_seq > 0:
        c = gamma * lam
        # exp2(e * -1000) is exactly 0 in float32 for every e >= 1: the c == 0 case without -inf * 0.
        log2_c = math.log2(c) if c > 0 else -1000.0
        launch(
            _gae_fwd_kernel, (n_seq,), dev,
            rewards, values, cu_seqlens.contiguous(), adv, ret,
            n, rewards.stride(0), values.stride(0), float(gamma), float(log2_c),
            BLOCK_T=_BLOCK_T, num_warps=4,
        )  # fmt: skip
    return adv, ret


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------
def _check_tokens(n_tokens: int | None, **tensors: torch.Tensor) -> int:
    """Every named tensor is 1-D float with the same length; returns that length."""
    for k, t in tensors.items():
        check_float(k, t)
        if t.dim() != 1:
            raise ValueError(f"{k} must be a 1-D (N,) tensor of packed per-token values, got shape {tuple(t.shape)}")
    names = list(tensors)
    n = tensors[names[0]].shape[0] if n_tokens is None else n_tokens
    for k in names:
        if tensors[k].shape[0] != n:
            raise ValueError(
                f"{k} must have the same length as {names[0]} (N = {n} packed tokens), got {tensors[k].shape[0]}"
            )
    return n


def _check_unit(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    return float(x)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor,  # (N,) packed per-token rewards, any float dtype, any stride
    values: torch.Tensor,  # (N,) packed critic values, any float dtype, any stride
    cu_seqlens: torch.Tensor,  # (B+1,) int32/int64 offsets, leading 0, last N
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over packed sequences, each one terminal at its last
    token (the value after it is 0).

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, ``returns = A + V``.
    ``backend``: ``"auto"`` (Triton on CUDA, ``gae_ref`` elsewhere), ``"triton"`` (a CPU tensor runs the
    kernel in Triton's interpreter) or ``"torch"``. Returns detached float32 ``(advantages, returns)``,
    both (N,).
    """
    n = _check_tokens(None, rewards=rewards, values=values)
    check_same_device(rewards=rewards, values=values, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, n)
    gamma = _check_unit("gamma", gamma)
    lam = _check_unit("lam", lam)
    backend = resolve_backend(backend, rewards.device)
    rewards, values = rewards.detach(), values.detach()
    if backend == "triton":
        return _gae_triton(rewards, values, cu_seqlens, gamma, lam)
    adv, ret = gae_ref(rewards, values, cu_seqlens, gamma=gamma, lam=lam)
    return adv.float(), ret.float()


def gae_ref(rewards, values, cu_seqlens, *, gamma=1.0, lam=0.95):
    """Reference GAE: the textbook backward recurrence, one step per token position counted from the
    sequence end, vectorised across sequences. Computes in (at least) float32; float64 stays float64 (the
    tests' ground truth). One host sync to read the sequence lengths."""
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r = rewards.detach().to(dtype)
    v = values.detach().to(dtype)
    cu = cu_seqlens.to(device=r.device, dtype=torch.int64)
    starts, ends = cu[:-1], cu[1:]
    lengths = ends - starts

    # V_{t+1}, with 0 after the last token of every sequence (terminal).
    v_next = torch.zeros_like(v)
    v_next[:-1] = v[1:]
    last = (ends - 1)[lengths > 0]
    v_next[last] = 0.0
    adv = r + gamma * v_next - v  # delta_t; becomes A_t below

    # Backward in time, every sequence at once: step k updates the k-th token before the end of every
    # sequence longer than k, from A at the token after it (updated at step k - 1). Tokens are laid out
    # wavefront by wavefront (all k = 0 tokens, then all k = 1, ...), sequences longest first within a
    # wavefront, so that both operands of a step are contiguous slices: one add per step.
    lengths_host = lengths.cpu()  # host sync: the loop bounds
    n_steps = int(lengths_host.max()) if lengths_host.numel() else 0
    hist = torch.bincount(lengths_host, minlength=n_steps + 1)
    active = hist.flip(0).cumsum(0).flip(0)[1:]  # active[k]: sequences longer than k
    first = torch.cat([active.new_zeros(1), active.cumsum(0)])  # wavefront k starts at first[k]
    ends_sorted = ends[torch.argsort(lengths, descending=True, stable=True)]
    slot = torch.arange(int(first[-1]))
    k_of = torch.searchsorted(first[1:], slot, right=True)  # wavefront of each slot
    rank = (slot - first[k_of]).to(r.device)
    k_of = k_of.to(r.device)
    token = ends_sorted[rank] - 1 - k_of  # wavefront slot -> packed token index
    wave = adv[token]
    active, first = active.tolist(), first.tolist()
    c = gamma * lam
    for k in range(1, n_steps):
        n = active[k]
        wave[first[k] : first[k] + n].add_(wave[first[k - 1] : first[k - 1] + n], alpha=c)
    adv[token] = wave
    return adv, adv + v


def shape_token_rewards(
    scores: torch.Tensor,  # (B,) sequence scores (reward model or reward function), any float dtype
    logp: torch.Tensor,  # (N,) packed policy log-probabilities of the sampled tokens
    ref_logp: torch.Tensor,  # (N,) packed reference-policy log-probabilities of the same tokens
    cu_seqlens: torch.Tensor,  # (B+1,) int32/int64 offsets, leading 0, last N
    *,
    kl_coef: float,
    estimator: str = "k1",
    clip_score: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-shaped per-token reward of RLHF: ``r_t = -kl_coef * kl_t``, plus the sequence's score at
    its last token. ``kl_t`` is the ``estimator`` (k1 / k2 / k3) of KL(pi || pi_ref) at token t; scores are
    clamped to ``[-clip_score, clip_score]`` first when ``clip_score`` is given. An empty sequence
    contributes nothing. No host sync besides the optional ``cu_seqlens`` value checks.

    Returns detached float32 ``(token_rewards, kl)``, both (N,).
    """
    n = _check_tokens(None, logp=logp, ref_logp=ref_logp)
    check_float("scores", scores)
    check_int("cu_seqlens", cu_seqlens)
    check_same_device(scores=scores, logp=logp, ref_logp=ref_logp, cu_seqlens=cu_seqlens)
    if scores.dim() != 1 or cu_seqlens.dim() != 1 or scores.shape[0] != cu_seqlens.shape[0] - 1:
        raise ValueError(
            f"scores must have shape (B,) with B = len(cu_seqlens) - 1: cu_seqlens {tuple(cu_seqlens.shape)} "
            f"needs scores ({max(cu_seqlens.shape[0] - 1, 0) if cu_seqlens.dim() == 1 else '?'},), "
            f"got {tuple(scores.shape)}"
        )
    check_cu_seqlens(cu_seqlens, n)
    if estimator not in REWARD_KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {REWARD_KL_ESTIMATORS}, got {estimator!r}")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
        raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
    if clip_score is not None and (
        isinstance(clip_score, bool) or not isinstance(clip_score, (int, float)) or not clip_score > 0
    ):
        raise ValueError(f"clip_score must be None or a number > 0, got {clip_score!r}")

    kl = kl_penalty(logp.detach().float(), ref_logp.detach().float(), estimator)  # the one k1 / k2 / k3
    rewards = -float(kl_coef) * kl
    s = scores.detach().float()
    if clip_score is not None:
        s = s.clamp(-float(clip_score), float(clip_score))
    if n > 0 and s.numel() > 0:
        cu = cu_seqlens.long()
        # An empty sequence has no last token: its score becomes 0 and lands (harmlessly) on the token
        # before it, or on token 0. Done with masks, not by filtering, so that no host sync is needed.
        s = torch.where(cu[1:] > cu[:-1], s, 0.0)
        rewards.index_add_(0, (cu[1:] - 1).clamp(min=0), s)
    return rewards, kl
