"""Padding-free attention for Hugging Face causal LMs: packed sequences attend only within themselves.

A micro-batch of variable-length sequences is packed into one row: ``input_ids (1, N)`` with
``cu_seqlens (S+1,)`` (int32, leading 0, flash-attn convention) and ``position_ids (1, N)`` that restart
at 0 for every sequence. ``use_packed_attention(model)`` switches a loaded model to an attention function
registered with transformers' ``AttentionInterface`` under the name ``"fusedrl_packed"``; afterwards

    model(input_ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)

(transformers' own ``FlashAttentionKwargs`` names) returns per-token outputs equal to running each sequence
alone. Given only packed ``position_ids``, sequence boundaries are where the positions stop counting up by
one. The packed attention itself runs on one of (see ``packed_attention_backend``):

- ``flash_attn``: ``flash_attn_varlen_func`` (CUDA, fp16/bf16, the flash-attn package installed);
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, recent torch);
- ``flex``: compiled ``flex_attention`` with a causal same-sequence block mask (CUDA, any float dtype);
- ``sdpa_blockdiag``: the block-diagonal causal attention computed block by block, one exact SDPA call per
  sequence (CPU, and CUDA when nothing above applies).

Why stock transformers is not enough: it detects packing from ``position_ids`` only when no KV cache is
built, and ``config.use_cache`` defaults to True, so a plain ``model(ids, position_ids=pos)`` with SDPA lets
every sequence attend to the ones before it. Inputs that are not packed (a padded batch with an
``attention_mask``, cached decoding in ``generate``) fall through to transformers' plain SDPA with the mask
transformers builds, so the same model still generates normally.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusedrl.kernels import check_int, data_checks_enabled

ATTN_IMPLEMENTATION = "fusedrl_packed"
"""The name the attention function (and its mask builder) is registered under in transformers."""

BACKENDS = ("flash_attn", "torch_varlen", "flex", "sdpa_blockdiag")

_HALF = (torch.float16, torch.bfloat16)
# Keyword arguments that describe packing; stripped before falling back to transformers' SDPA.
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# ----------------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------------
@functools.cache
def _has_flash_attn() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:  # a wheel built against another torch imports but fails to load its CUDA library
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _torch_varlen_params() -> frozenset[str] | None:
    """Parameter names of ``torch.nn.attention.varlen.varlen_attn``, or None where torch lacks it. Its
    signature moved between releases (``is_causal`` -> ``window_size``, then ``scale`` and ``enable_gqa``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _choose_backend(device_type: str, dtype: torch.dtype, *, sm80: bool, flash_attn: bool, varlen: bool,
                    flex: bool) -> str:  # fmt: skip
    """The selection rule of ``packed_attention_backend`` as a pure function of what is available."""
    if device_type != "cuda":
        return "sdpa_blockdiag"
    # Both varlen kernels are flash-attention 2 underneath: half precision on Ampere or newer only.
    if dtype in _HALF and sm80:
        if flash_attn:
            return "flash_attn"
        if varlen:
            return "torch_varlen"
    if flex:
        return "flex"
    return "sdpa_blockdiag"


def packed_attention_backend(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Which kernel runs packed attention for tensors of ``dtype`` on ``device``.

    CUDA, fp16/bf16, compute capability >= 8.0: ``"flash_attn"`` when the flash-attn package imports, else
    ``"torch_varlen"`` when ``torch.nn.attention.varlen`` exists. Otherwise on CUDA (fp32, older GPUs, older
    torch): ``"flex"`` (compiled flex attention with a causal same-sequence block mask) when available, else
    ``"sdpa_blockdiag"``. Any other device: ``"sdpa_blockdiag"``, the block-diagonal causal attention done
    as one exact SDPA call per sequence."""
    device = torch.device(device)
    sm80 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    return _choose_backend(
        device.type, dtype, sm80=sm80, flash_attn=device.type == "cuda" and _has_flash_attn(),
        varlen=_torch_varlen_params() is not None, flex=_has_flex(),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Packed layout: cu_seqlens, max length, host copy of the boundaries
# ----------------------------------------------------------------------------------------------------
def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of one packed row: a new sequence starts wherever ``position_ids`` does not
    continue the previous position by exactly one (normally a restart at 0).

    ``position_ids``: (N,) or (1, N) integer. Returns ``(cu_seqlens (S+1,) int32 on the same device,
    max_len)``. Two device-to-host syncs on GPU (the number of sequences and the longest one)."""
    check_int("position_ids", position_ids)
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        pos = position_ids[0]
    elif position_ids.dim() == 1:
        pos = position_ids
    else:
        raise ValueError(f"position_ids must have shape (N,) or (1, N) (one packed row), got "
                         f"{tuple(position_ids.shape)}")  # fmt: skip
    n = pos.numel()
    if n == 0:
        return torch.zeros(1, dtype=torch.int32, device=pos.device), 0
    starts = torch.ones(n, dtype=torch.bool, device=pos.device)
    starts[1:] = pos[1:] != pos[:-1] + 1
    first = starts.nonzero().flatten()  # host sync: the number of sequences
    cu = torch.cat([first, first.new_tensor([n])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())  # host sync
    return cu, max_len


@dataclass
class _Layout:
    """Where the packed sequences lie, shared by every layer of one forward."""

    cu: torch.Tensor
    """(S+1,) int32 cumulative lengths on the attention's device."""
    max_len: int
    """Longest sequence (the varlen kernels size their grid by it)."""
    bounds: list[int] | None = None
    """Host copy of ``cu``, read when a path loops over sequences or the data checks ran."""
    block_mask: Any = None
    """flex-attention BlockMask, built on the first flex call."""


# One-slot memo: every layer of a forward gets the same cu_seqlens / position_ids tensor objects, so the
# boundaries (and their host syncs) are worked out once per forward instead of once per layer. The key keeps
# the tensor itself alive (its id cannot be reused) and its version counter (an in-place refill of a reused
# buffer invalidates the entry).
_memo: tuple[Any, ...] | None = None


def _memo_key(t: torch.Tensor, *extra) -> tuple | None:
    try:
        return (t, t._version, *extra)
    except RuntimeError:  # inference-mode tensors carry no version counter: do not memoise them
        return None


def _memo_get(key):
    if key is None or _memo is None:
        return None
    old = _memo[0]
    same = old[0] is key[0] and old[1:] == key[1:]
    return _memo[1] if same else None


def _memo_put(key, layout: _Layout) -> _Layout:
    global _memo
    if key is not None:
        _memo = (key, layout)
    return layout


def _as_int(name: str, v) -> int | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be an int (the longest packed sequence), got a tensor of shape "
                             f"{tuple(v.shape)}")  # fmt: skip
        return int(v)  # host sync when the caller passed a device scalar
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int (the longest packed sequence), got {type(v).__name__}")
    return v


def _layout_from_cu(cu: torch.Tensor, max_len, n_tokens: int, device: torch.device, need_bounds: bool) -> _Layout:
    max_len = _as_int("max_length_q", max_len)
    key = _memo_key(cu, max_len, n_tokens, device, need_bounds)
    hit = _memo_get(key)
    if hit is not None:
        return hit
    check_int("cu_seq_lens_q", cu)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seq_lens_q must be a 1-D tensor (S+1,) with a leading 0, got shape {tuple(cu.shape)}")
    bounds = None
    if need_bounds or max_len is None or data_checks_enabled(cu):
        bounds = cu.tolist()  # host sync: documented; skipped on GPU with max_length given and checks off
        lengths = [b - a for a, b in pairwise(bounds)]
        if bounds[0] != 0 or bounds[-1] != n_tokens or min(lengths) < 0:
            raise ValueError(f"cu_seq_lens_q must start at 0, never decrease and end at the number of packed tokens "
                             f"{n_tokens}; got {bounds if len(bounds) <= 12 else bounds[:6] + ['...'] + bounds[-3:]}")  # fmt: skip
        actual = max(lengths)
        if max_len is not None and max_len < actual:
            raise ValueError(f"max_length_q must be at least the longest packed sequence {actual}, got {max_len}")
        max_len = actual if max_len is None else max_len
    cu = cu.to(device=device, dtype=torch.int32)
    return _memo_put(key, _Layout(cu=cu, max_len=max_len, bounds=bounds))


def _layout_from_positions(position_ids: torch.Tensor, device: torch.device) -> _Layout | None:
    """The packed layout of a (1, N) row whose positions restart, or None for a single sequence."""
    key = _memo_key(position_ids, device, "positions")
    hit = _memo_get(key)
    if hit is not None:
        return hit if hit.cu.numel() > 2 else None
    cu, max_len = cu_seqlens_from_position_ids(position_ids)
    layout = _memo_put(key, _Layout(cu=cu.to(device), max_len=max_len, bounds=cu.tolist()))
    return layout if cu.numel() > 2 else None


# ----------------------------------------------------------------------------------------------------
# Packed attention, one function per backend
# ----------------------------------------------------------------------------------------------------
def _sdpa_blockdiag(q, k, v, layout: _Layout, scaling: float, dropout: float) -> torch.Tensor:
    """q (1, Hq, N, D), k/v (1, Hkv, N, D) -> (1, Hq, N, D): the block-diagonal causal attention, block by
    block. Each block is exactly the SDPA call the sequence gets when run alone, and nothing N x N is built."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # older torch SDPA has no enable_gqa; the copy is (Hq, N, D), small next to the MLP
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    bounds = layout.bounds
    outs = [
        F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout, is_causal=True, scale=scaling
        )
        for a, b in pairwise(bounds)
        if b > a
    ]
    return torch.cat(outs, dim=2) if outs else torch.empty_like(q)


def _flash_attn_varlen(q, k, v, layout: _Layout, scaling: float, dropout: float) -> torch.Tensor:
    """q (N, Hq, D), k/v (N, Hkv, D) -> (N, Hq, D); flash-attn shares KV heads across query groups itself."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, layout.cu, layout.cu, layout.max_len, layout.max_len,
        dropout_p=dropout, softmax_scale=scaling, causal=True,
    )  # fmt: skip


def _torch_varlen(q, k, v, layout: _Layout, scaling: float) -> torch.Tensor:
    """q (N, Hq, D), k/v (N, Hkv, D) -> (N, Hq, D) through torch's varlen_attn, whichever signature it has."""
    from torch.nn.attention.varlen import varlen_attn

    params = _torch_varlen_params()
    kw: dict[str, Any] = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in params:
        kw["scale"] = scaling
    else:  # the oldest signature always scales by 1/sqrt(D): fold the model's own scale into q
        q = q * (scaling * q.shape[-1] ** 0.5)
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # (left, right) = (unbounded, 0): causal; it must be this exact tuple
    return varlen_attn(q, k, v, layout.cu, layout.cu, layout.max_len, layout.max_len, **kw)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex attention materialises the whole (N, N) score matrix; compiled, it is a fused kernel.
    return torch.compile(flex_attention)


def _flex_packed(q, k, v, layout: _Layout, scaling: float, *, compiled: bool = True) -> torch.Tensor:
    """q (1, Hq, N, D), k/v (1, Hkv, N, D) -> (1, Hq, N, D) with a causal same-sequence block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[2]
    if layout.block_mask is None:
        tokens = torch.arange(n, device=q.device, dtype=torch.int64)
        seq_of = torch.searchsorted(layout.cu[1:].to(torch.int64), tokens, right=True)  # (N,) sequence index

        def causal_same_sequence(b, h, q_idx, kv_idx):
            return (seq_of[q_idx] == seq_of[kv_idx]) & (q_idx >= kv_idx)

        layout.block_mask = create_block_mask(causal_same_sequence, None, None, n, n, device=q.device)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=layout.block_mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def packed_attention_ref(
    query: torch.Tensor,  # (1, Hq, N, D)
    key: torch.Tensor,  # (1, Hkv, N, D), Hq a multiple of Hkv
    value: torch.Tensor,  # (1, Hkv, N, D)
    cu_seqlens: torch.Tensor | list[int],  # (S+1,) leading 0
    scale: float,
) -> torch.Tensor:
    """Textbook reference: for each sequence, softmax(q k^T * scale + causal mask) v, in (at least) float32;
    float64 inputs stay float64 (the tests' ground truth). Returns (1, Hq, N, D)."""
    dt = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    q, k, v = query.to(dt), key.to(dt).repeat_interleave(groups, 1), value.to(dt).repeat_interleave(groups, 1)
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    out = torch.zeros_like(q)
    for a, b in pairwise(bounds):
        scores = q[:, :, a:b] @ k[:, :, a:b].transpose(-1, -2) * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        out[:, :, a:b] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, a:b]
    return out


# ----------------------------------------------------------------------------------------------------
# The attention function registered with transformers, and its mask builder
# ----------------------------------------------------------------------------------------------------
def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, Hq, Tq, D)
    key: torch.Tensor,  # (B, Hkv, Tk, D)
    value: torch.Tensor,  # (B, Hkv, Tk, D)
    attention_mask: torch.Tensor | None,  # None or the 4-D mask built by ``_packed_attention_mask``
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: packed causal attention when the input is packed (explicit
    ``cu_seq_lens_q`` / ``cu_seq_lens_k``, or restarting ``position_ids`` on a single row without a mask),
    transformers' SDPA otherwise. Returns ``(out (B, Tq, Hq, D), None)`` like every attention function."""
    if sliding_window is not None:
        raise ValueError(f"packed attention supports full causal attention only; this layer asks for "
                         f"sliding_window={sliding_window}")  # fmt: skip
    if softcap is not None:
        raise ValueError(f"packed attention does not support attention logit softcapping (softcap={softcap})")
    is_causal = kwargs.pop("is_causal", None)
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) is not False
    cu = kwargs.get("cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu is None:
        cu = cu_k
    elif cu_k is not None and cu_k is not cu and data_checks_enabled(cu) and not torch.equal(cu_k.to(cu.device), cu):
        raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: packed attention is causal self-attention")
    B, _, Tq, D = query.shape
    Tk = key.shape[2]
    scaling = D**-0.5 if scaling is None else float(scaling)

    layout = None
    backend = packed_attention_backend(query.device, query.dtype)
    if cu is not None:
        if B != 1:
            raise ValueError(f"packed inputs (cu_seq_lens_q given) need batch size 1, got query batch {B}")
        if attention_mask is not None:
            raise ValueError("packed inputs take no attention_mask (padding-free: every token is real); got a mask of "
                             f"shape {tuple(attention_mask.shape)} together with cu_seq_lens_q")  # fmt: skip
        if Tq != Tk:
            raise ValueError(f"packed inputs cannot be used with a KV cache: {Tq} query tokens, {Tk} key tokens")
        layout = _layout_from_cu(cu, kwargs.get("max_length_q"), Tq, query.device, backend == "sdpa_blockdiag")
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and attention_mask is None and B == 1 and Tq == Tk and Tq > 1:
            layout = _layout_from_positions(position_ids, query.device)

    if layout is None:
        if not causal:
            raise ValueError("the fusedrl_packed attention supports causal (decoder) self-attention only")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        rest = {k: v for k, v in kwargs.items() if k not in _PACKING_KWARGS}
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **rest)  # fmt: skip

    if not causal:
        raise ValueError("packed attention is causal only; this attention layer is not causal")
    if dropout > 0.0 and backend in ("torch_varlen", "flex"):
        raise ValueError(f"attention dropout {dropout} is not supported by the {backend} packed backend: "
                         "use model.eval() or a config with attention dropout 0")  # fmt: skip
    if backend == "sdpa_blockdiag":
        if layout.bounds is None:
            layout.bounds = layout.cu.tolist()  # host sync (once per forward thanks to the memo)
        out = _sdpa_blockdiag(query, key, value, layout, scaling, dropout)
        return out.transpose(1, 2), None
    if backend == "flex":
        out = _flex_packed(query, key, value, layout, scaling)
        return out.transpose(1, 2), None
    # The varlen kernels take (N, H, D); HF hands (1, H, N, D) views of (1, N, H, D) projections, so the
    # transposes below are usually free.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    if backend == "flash_attn":
        out = _flash_attn_varlen(q, k, v, layout, scaling, dropout)
    else:
        out = _torch_varlen(q, k, v, layout, scaling)
    return out.unsqueeze(0), None


def _packed_attention_mask(**kwargs):
    """transformers mask builder paired with ``packed_attention_forward``.

    A fresh forward without a padding mask gets no mask at all: causality and packing are the attention
    function's job, and a model-built (N, N) mask would both cost O(N^2) memory and, combined naively,
    either leak across sequences or block the packed path. Padding masks and cached decoding get exactly
    the mask transformers builds for SDPA."""
    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:  # older transformers mask signature
        q_length = kwargs["cache_position"].shape[0]
    if kwargs.get("attention_mask") is None and q_length is not None and q_length == kwargs.get("kv_length"):
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # Class-level registration: seen by every model's ALL_ATTENTION_FUNCTIONS / ALL_MASK_ATTENTION_FUNCTIONS,
    # and the mask builder must be in the global mapping or transformers skips masks (padding included).
    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _packed_attention_mask)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def _hf_models(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _check_full_causal(config) -> None:
    name = type(config).__name__
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"use_packed_attention supports full causal attention only; {name} has sliding_window="
                         f"{config.sliding_window}")  # fmt: skip
    other = sorted({t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"})
    if other:
        raise ValueError(f"use_packed_attention supports full causal attention only; {name} has layer types {other}")
    if getattr(config, "is_causal", True) is False:
        raise ValueError(f"use_packed_attention supports causal models only; {name} has is_causal=False")


def use_packed_attention(model: nn.Module) -> nn.Module:
    """Switch every transformers model inside ``model`` (a ``PreTrainedModel`` or a module wrapping one,
    such as ``ValueModel``) to the ``fusedrl_packed`` attention, in place; returns ``model``.

    Raises ValueError for models with sliding-window or other non-full attention, TypeError when the
    module holds no transformers model or one that cannot switch its attention implementation."""
    hf = _hf_models(model)
    if not hf:
        raise TypeError(f"model must be or contain a transformers PreTrainedModel, got {type(model).__name__}")
    for m in hf:
        _check_full_causal(m.config)
    _register()
    for m in hf:
        if m.config._attn_implementation == ATTN_IMPLEMENTATION:
            continue
        if hasattr(m, "set_attn_implementation"):
            m.set_attn_implementation(ATTN_IMPLEMENTATION)
        else:  # transformers before set_attn_implementation
            m.config._attn_implementation = ATTN_IMPLEMENTATION
    not_switched = [type(m).__name__ for m in hf if m.config._attn_implementation != ATTN_IMPLEMENTATION]
    if not_switched:
        raise TypeError(f"could not switch {not_switched} to packed attention: they do not dispatch attention "
                        "through transformers' AttentionInterface")  # fmt: skip
    return model


def is_packed_attention(model: nn.Module) -> bool:
    """True when every transformers model inside ``model`` runs the ``fusedrl_packed`` attention."""
    hf = _hf_models(model)
    return bool(hf) and all(m.config._attn_implementation == ATTN_IMPLEMENTATION for m in hf)
