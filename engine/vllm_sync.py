"""What the colocated vLLM engine is given of the policy: its weights under the transformers names, streamed one
tensor at a time, whatever wraps the model (DDP, peft LoRA, FSDP2 shards).

    for name, tensor in engine_weights(policy, merge_lora=True):   # plain, DDP, peft or FSDP2-sharded policy
        ...                                                         # each tensor full and detached

- A peft policy gives its base weights (``merge_lora=False``: the engine serves the adapter beside them) or
  each adapted weight with its adapters merged, ``W + scale * B @ A``, computed into a fresh tensor one layer at
  a time: the trained model itself is never merged.
- An FSDP2-sharded parameter (a ``DTensor``) is all-gathered on its own when its turn comes and dropped once the
  consumer has moved on, so no more than one full parameter exists beyond the engine's own copy. Every rank must
  walk the same weights in the same order (the gathers are collectives): they all hold the same model.
- ``lora_sync_mode`` says how a LoRA policy's updates reach the engine: the adapter alone (vLLM's LoRA
  serving) where that serves exactly what the trainer trains, else the merged weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

LORA_SYNC_MODES = ("auto", "adapter", "merged")


def unwrap(policy: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (``.module``), or the policy itself."""
    return getattr(policy, "module", policy)


def peft_of(policy: nn.Module):
    """The peft wrapper (``PeftModel``) of a LoRA policy, else None."""
    model = unwrap(policy)
    return model if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config") else None


def transformers_model(policy: nn.Module) -> nn.Module:
    """The transformers model (a peft policy's base model, its LoRA layers still inside)."""
    peft = peft_of(policy)
    return peft.get_base_model() if peft is not None else unwrap(policy)


def _is_lora_layer(module: nn.Module) -> bool:
    return (
        hasattr(module, "lora_A")
        and hasattr(module, "base_layer")
        and callable(getattr(module, "get_delta_weight", None))
    )


def _lora_delta(module: nn.Module) -> torch.Tensor | None:
    """The sum of the active adapters' ``scale * B @ A`` of one LoRA layer (None when none applies)."""
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None  # merged: already inside the base weight; disabled: the layer computes the base alone
    deltas = [_full(module.get_delta_weight(a)) for a in module.active_adapters if a in module.lora_A]
    return sum(deltas[1:], deltas[0]) if deltas else None


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # an FSDP2 shard (DTensor): gathered here, on every rank alike
    return (full() if callable(full) else t).detach()


def _walk(module: nn.Module, prefix: str, merge: bool) -> Iterator[tuple[str, torch.Tensor]]:
    if _is_lora_layer(module):
        delta = _lora_delta(module) if merge else None
        for name, t in _walk(module.base_layer, prefix, merge):
            if delta is not None and name == prefix + "weight":
                t = t + delta.to(t.dtype)
            yield name, t
        return
    for name, p in module._parameters.items():
        if p is not None:
            yield prefix + name, _full(p)
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, _full(b)
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, prefix + name + ".", merge)


@torch.no_grad()
def engine_weights(policy: nn.Module, *, merge_lora: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of the transformers model under its own names (``state_dict``'s, without
    peft's ``base_layer`` / ``lora_*`` entries), one at a time: see the module docstring."""
    yield from _walk(transformers_model(policy), "", merge_lora)


def adapter_limits(policy: nn.Module) -> tuple[int, list[str]] | None:
    """(largest LoRA rank, reasons the adapter alone would not carry the update) of a peft policy, else None.
    The adapter alone falls short where something besides the LoRA matrices trains (their base weights then
    move too), where the layer is not a plain low-rank sum (DoRA, several adapters at once), or where the
    adapters are FSDP shards (peft saves an adapter from full tensors)."""
    peft = peft_of(policy)
    if peft is None:
        return None
    reasons = []
    trained = [n for n, p in peft.named_parameters() if p.requires_grad and ".lora_" not in n]
    if trained:
        reasons.append(f"{len(trained)} trained tensors besides the LoRA matrices (e.g. {trained[0]})")
    configs = list(peft.peft_config.values())
    if len(configs) != 1:
        reasons.append(f"{len(configs)} adapters")
    if any(getattr(c, "use_dora", False) for c in configs):
        reasons.append("DoRA")
    if any(getattr(c, "modules_to_save", None) for c in configs):
        reasons.append("modules_to_save")
    if any(getattr(m, "merged", False) for m in peft.modules() if _is_lora_layer(m)):
        reasons.append("adapters merged into the model")
    if any(callable(getattr(p, "full_tensor", None)) for p in peft.parameters()):
        reasons.append("FSDP-sharded weights")
    rank = max((int(getattr(c, "r", 0)) for c in configs), default=0)
    rank = max([rank, *(int(r) for c in configs for r in (getattr(c, "rank_pattern", None) or {}).values())])
    return rank, reasons
