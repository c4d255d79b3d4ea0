"""Token log-probs of any transformers causal LM without its (B, T, V) logits: the model's body runs as usual,
then ``fusedrl.kernels.linear_logprobs`` projects the last hidden state through the model's own lm_head weight
chunk by chunk, only at the positions that have a label.

    from fusedrl.integrations.hf import logprobs_from_model

    logp = logprobs_from_model(model, input_ids, labels, attention_mask=attention_mask)   # (B, T) float32

``labels[:, t]`` is the token whose log-prob is wanted at position t, i.e. already shifted (predicted from
``input_ids[:, :t + 1]``, so usually ``labels[:, t] = input_ids[:, t + 1]``), and -100 where nothing is wanted
(prompt, padding). Works for every model whose output head is a plain ``nn.Linear`` (tied embeddings included);
a constant logit scale in the config (Cohere ``logit_scale``, Granite ``logits_scaling``, ...) is folded into the
temperature; tanh soft-capping (Gemma 2/3 ``final_logit_softcapping``) is not linear and is refused.
"""

from __future__ import annotations

import numbers
from contextlib import nullcontext

import torch
from torch import nn

from fusedrl.engine.models import hidden_states, logit_scale_of, output_head, unwrap
from fusedrl.kernels import BACKENDS, IGNORE_INDEX, check_int, check_labels_in_range, linear_logprobs

__all__ = [
    "fused_head_logprobs",
    "head_compute_dtype",
    "last_hidden_state",
    "logit_scale_of",
    "logprobs_from_model",
    "output_head",
    "unwrap",
]


def last_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **model_kwargs) -> torch.Tensor:  # fmt: skip
    """The body's output ``(B, T, H)``: what the lm_head would be applied to, without applying it."""
    return hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)


def head_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, head_fp32: bool) -> torch.dtype:
    """The dtype the lm_head matmuls run in: what ``F.linear`` on this model would use."""
    if head_fp32:
        return torch.float32
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype


def fused_head_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,  # (..., H) body output
    labels: torch.Tensor,  # (...) integer, -100 = not wanted
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    head_fp32: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """``log softmax(logits / temperature)[labels]`` (and the entropy) from the body's hidden states through the
    model's own head, computed only where ``labels != -100`` (0 elsewhere). ``head_fp32`` runs the projection
    in float32 whatever the autocast state (TRL's ``cast_lm_head_to_fp32``). Returns float32 tensors shaped
    like ``labels``."""
    weight, bias, scale = output_head(unwrap(model))
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of the hidden states without their last dim {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    labels = labels.to(weight.device)
    check_labels_in_range(labels, weight.shape[0], IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    # Only labelled positions reach the head: a prompt or padding token costs no lm_head FLOPs. (The boolean
    # index is one host sync on GPU.)
    h = hidden.to(weight.device)[valid]  # (n, H)
    dtype = head_compute_dtype(h, weight, head_fp32)
    # Autocast off: the fused op's matmuls must run in the dtype chosen above, not be recast chunk by chunk.
    no_autocast = torch.autocast(h.device.type, enabled=False) if h.device.type in ("cuda", "cpu") else nullcontext()
    with no_autocast:
        out = linear_logprobs(
            h.to(dtype), weight.to(dtype), labels[valid], bias=None if bias is None else bias.to(dtype),
            temperature=temperature / scale, return_entropy=return_entropy, chunk_size=chunk_size, backend=backend,
        )  # fmt: skip
    outs = out if return_entropy else (out,)
    # masked_scatter keeps the result connected to the graph even when no position has a label.
    full = tuple(torch.zeros(labels.shape, dtype=torch.float32, device=o.device).masked_scatter(valid, o) for o in outs)
    return full if return_entropy else full[0]


def logprobs_from_model(
    model: nn.Module,
    input_ids: torch.Tensor,  # (B, T) integer
    labels: torch.Tensor,  # (B, T) integer, already shifted: labels[:, t] is predicted at position t; -100 = ignored
    *,
    attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = padding
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    **model_kwargs,
):
    """Per-position log-probs ``log softmax(logits[:, t] / temperature)[labels[:, t]]`` of a transformers causal
    LM, float32 ``(B, T)`` (0 where the label is -100), and the entropies with ``return_entropy``; differentiable
    w.r.t. every parameter. The body runs on ``input_ids`` (with ``attention_mask`` and any ``model_kwargs``
    such as ``position_ids``); the head is applied by the fused op, so the (B, T, V) logits never exist.
    ``backend`` and ``chunk_size`` are those of ``fusedrl.kernels.linear_logprobs``."""
    check_int("input_ids", input_ids)
    check_int("labels", labels)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(input_ids.shape)} (one label per position, already "
            f"shifted), got {tuple(labels.shape)}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    model = unwrap(model)
    output_head(model)  # a non-linear or soft-capped head fails here, before the body has run
    hidden = last_hidden_state(model, input_ids, attention_mask, **model_kwargs)
    return fused_head_logprobs(model, hidden, labels, temperature=float(temperature), return_entropy=return_entropy,
                               backend=backend, chunk_size=chunk_size)  # fmt: skip
