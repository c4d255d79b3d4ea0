"""Rollout: encode the prompts, sample responses with HF ``generate`` and put prompt + response sequences in
the packed rollout buffer (the store of record of a step: packing, the exchange between ranks, checkpoints).
Scoring the buffer is ``fusedrl.engine.scoring``."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from transformers import GenerationConfig

from .packing import RolloutBuffer

# Per-token float fields of the rollout buffer, each at the flat position of the token it is about.
BUFFER_FIELDS = ("old_logp", "ref_logp", "values", "rewards", "advantages", "returns")


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------
def context_length(model) -> int | None:
    """The longest sequence the model's positions support, from its config (None when it has no limit)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_new_tokens: int, context: int | None) -> list[list[int]]:
    """Token ids of each prompt; a clear error for an empty list, an empty prompt or one that leaves no
    room for ``max_new_tokens`` in the model's context."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single str (wrap it in a list)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        toks = tokenizer(p, add_special_tokens=True)["input_ids"]
        if len(toks) == 0:
            raise ValueError(f"prompts[{i}] = {p!r} encodes to zero tokens: generation needs at least one")
        if context is not None and len(toks) + max_new_tokens > context:
            raise ValueError(
                f"prompts[{i}] is {len(toks)} tokens long; with max_new_tokens={max_new_tokens} that needs "
                f"{len(toks) + max_new_tokens} positions but the model's context is {context}"
            )
        ids.append(list(toks))
    return ids


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------
@contextmanager
def eval_mode(*models):
    """Put models in eval mode for the duration (generation and scoring), restoring their modes after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(models, modes):
            m.train(was)


def sampling_config(*, max_new_tokens, temperature, top_p, top_k, eos_token_id, pad_token_id) -> GenerationConfig:
    """Plain ancestral sampling from softmax(logits / temperature), optionally top-p / top-k truncated.

    Every warper a model's own generation_config could switch on is set to its no-op value explicitly:
    the losses assume the samples came from exactly the distribution they score."""
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,  # 0 disables (transformers' global default would be 50)
        typical_p=1.0,
        min_p=0.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


@torch.no_grad()
def generate_responses(
    policy,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Sample one response per prompt (ids after the prompt, up to and including the first EOS).

    Prompts are left-padded into batches of ``batch_size`` and decoded with the KV cache; a response
    that reaches ``max_new_tokens`` without EOS is kept truncated."""
    device = next(policy.parameters()).device
    gen_cfg = sampling_config(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id)  # fmt: skip
    responses: list[list[int]] = []
    with eval_mode(policy):
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
            new = out[:, width:].tolist()  # host sync: the responses go to the CPU buffer anyway
            for row in new:
                if eos_token_id is not None and eos_token_id in row:
                    row = row[: row.index(eos_token_id) + 1]
                responses.append(row)
    return responses


def fill_buffer(buffer: RolloutBuffer, prompt_ids: list[list[int]], responses: list[list[int]]) -> None:
    """Append prompt + response sequences; the response mask marks the response tokens."""
    buffer.clear()
    for p, r in zip(prompt_ids, responses):
        if len(r) == 0:
            raise ValueError("generate returned an empty response (max_new_tokens must be >= 1)")
        tokens = np.asarray(p + r, dtype=np.int64)
        mask = np.zeros(len(tokens), dtype=np.uint8)
        mask[len(p) :] = 1
        buffer.append(tokens, mask)
