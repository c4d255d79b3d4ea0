"""Sampling with Hugging Face ``generate``: fusedrl's exact sampler (``NextTokenSampler``) as the last logits processor
of a greedy decoding loop, so that the tokens come from exactly the distribution the losses assume. The ``hf``
rollout backend (``rollout_backends.HFBackend``) and the demo's evaluation generate through it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper


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


def sampling_config(*, max_new_tokens, eos_token_id, pad_token_id) -> GenerationConfig:
    """The decoding loop ``generate`` runs around ``NextTokenSampler``: ``do_sample=False``, so that none of
    transformers' samplers or warpers runs (nor any a model's own generation_config would switch on: only its
    unset fields are merged in, and warpers exist only in sample mode) and the argmax emits the token the
    sampler drew."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        # Not min_new_tokens=0: generate turns any min_new_tokens into min_length = prompt + it, and a
        # min_length > 0 adds a processor that clones the (B, V) scores every token to change nothing.
        min_length=0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


# Tokens per block of the two-stage draw: the first stage picks a block, the second a token inside it.
_SAMPLE_BLOCK = 1024


def sample_next_tokens(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) token ids drawn from softmax(scores / temperature), row by row; ``scores`` (B, V) float32 is
    overwritten with the unnormalised probabilities (no (B, V) copy).

    Exact two-stage inverse sampling: a block of ``_SAMPLE_BLOCK`` tokens with probability its share of the
    row's mass, then a token of that block with probability its share of the block's. Each stage is a
    ``torch.multinomial`` over B x ~V/1024 or B x 1024 weights: the same law as one multinomial over (B, V),
    whose per-element exponential draws made it the bulk of CPU decoding time (28 ms of a 29 ms token at
    B=16, V=32000). Rows with NaN, +inf or no mass raise, as ``torch.multinomial`` does."""
    B, V = scores.shape
    if not scores.is_contiguous():
        scores = scores.contiguous()
    if temperature != 1.0:
        scores.div_(temperature)  # the arithmetic of transformers' temperature warper, in place
    p = scores.sub_(scores.amax(-1, keepdim=True)).exp_()  # (B, V): an all -inf row becomes NaN and raises below
    full = V // _SAMPLE_BLOCK
    mass = torch.as_strided(p, (B, full, _SAMPLE_BLOCK), (V, _SAMPLE_BLOCK, 1)).sum(-1)  # (B, full)
    if full * _SAMPLE_BLOCK < V:
        mass = torch.cat([mass, p[:, full * _SAMPLE_BLOCK :].sum(-1, keepdim=True)], dim=1)
    block = torch.multinomial(mass, 1)  # (B, 1)
    cols = block * _SAMPLE_BLOCK + torch.arange(_SAMPLE_BLOCK, device=p.device)  # (B, 1024)
    weights = p.gather(1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, 0.0)  # the last block may be short
    return cols.gather(1, torch.multinomial(weights, 1)).squeeze(1)


class NextTokenSampler(LogitsProcessor):
    """Ancestral sampling from softmax(logits / temperature), optionally top-k / top-p truncated (transformers'
    own warpers, in its order: temperature, top-k, top-p), as the last logits processor of a ``do_sample=False``
    generate: it draws the token with ``sample_next_tokens`` and leaves 0 at it and -inf elsewhere, in place,
    so that the argmax emits it. The losses assume the samples came from exactly this distribution."""

    def __init__(self, temperature: float, top_p: float = 1.0, top_k: int = 0):
        self.temperature = float(temperature)
        self.warpers = LogitsProcessorList()
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.warpers:
            scores = self.warpers(input_ids, scores / self.temperature)
            tokens = sample_next_tokens(scores, 1.0)
        else:
            tokens = sample_next_tokens(scores, self.temperature)
        return scores.fill_(-math.inf).scatter_(1, tokens[:, None], 0.0)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's eos and every eos id of the model's generation config (chat
    models end their turn with a template token such as ``<|im_end|>`` or ``<|eot_id|>``, often listed there
    beside the document eos). The first one a response samples ends it and stays in it (it carries a loss: the
    policy learns to stop)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gen) if isinstance(gen, (list, tuple)) else [gen]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@torch.no_grad()
def generate_responses(
    policy,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    batch_size: int = 64,
    greedy: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt (ids after the prompt, up to and including the first EOS; ``eos_token_id``
    may list several stop ids, see ``stop_token_ids``); ``greedy`` takes the argmax instead (parity tests).

    Prompts are left-padded into batches of ``batch_size`` and decoded with the KV cache; a response
    that reaches ``max_new_tokens`` without EOS is kept truncated."""
    device = next(policy.parameters()).device
    gen_cfg = sampling_config(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if getattr(getattr(policy, "generation_config", None), "min_new_tokens", None):
        gen_cfg.min_new_tokens = 0  # a model's own minimum would forbid early EOS: 0 keeps every length possible
    sampler = LogitsProcessorList([] if greedy else [NextTokenSampler(temperature, top_p=top_p, top_k=top_k)])
    if isinstance(eos_token_id, int) or eos_token_id is None:
        stops = set() if eos_token_id is None else {eos_token_id}
    else:
        stops = set(eos_token_id)
        gen_cfg.eos_token_id = list(eos_token_id) or None
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
            out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                                  logits_processor=sampler)  # fmt: skip
            new = out[:, width:].tolist()  # host sync: the responses go to the CPU buffer anyway
            for row in new:
                end = next((i for i, t in enumerate(row) if t in stops), None)
                responses.append(row if end is None else row[: end + 1])
    return responses
