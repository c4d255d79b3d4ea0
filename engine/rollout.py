"""Rollout and scoring: sample responses with HF ``generate``, put them in the packed rollout buffer, and
score the buffer with padding-free packed forwards (policy / reference log-probs, critic values,
reward-model scores) over token-budget micro-batches.

Token bookkeeping, shared with the trainer: a per-token quantity about token j of a sequence (its
log-prob, the value of the state before it, its reward, its advantage) is stored in the buffer at
token j's flat position. A packed forward produces it at the row *before* j, which is why every
scatter and gather here goes through the packed batch's ``target_index`` (the flat position of the
next token, -1 at a sequence's last token). Only response tokens carry loss and advantages.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from transformers import GenerationConfig

from ..kernels import linear_logprobs
from .models import backbone_of, lm_head_of, score_packed
from .packing import PackedBatch, RolloutBuffer, pack
from .rewards import check_rewards


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


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """(B,) counts -> (B+1,) int64 offsets with a leading 0."""
    cu = torch.zeros(len(counts) + 1, dtype=torch.long)
    cu[1:] = counts.cumsum(0)
    return cu


def _count_per_sequence(positions: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """How many of the sorted flat ``positions`` fall in each sequence of offsets ``cu`` (B+1,)."""
    counts = torch.zeros(len(cu) - 1, dtype=torch.long)
    return counts.index_add_(0, torch.bucketize(positions, cu[1:], right=True), torch.ones_like(positions))


def response_layout(buffer: RolloutBuffer) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat buffer positions of every response token, sequence by sequence, (R,) int64, and the
    matching offsets (B+1,) int64 of each sequence's response tokens within them."""
    index = torch.from_numpy(np.asarray(buffer.response_mask())).nonzero().squeeze(1)
    offsets = torch.from_numpy(np.asarray(buffer.offsets())).long()
    return index, _offsets(_count_per_sequence(index, offsets))


# ----------------------------------------------------------------------------------------------------
# Packed forwards
# ----------------------------------------------------------------------------------------------------
class MicroBatch:
    """One packed micro-batch on the model's device: model inputs and the rows that carry a loss.

    ``rows`` (M,): packed rows whose next token is a response token; ``targets`` (M,): those tokens'
    flat buffer positions (where their per-token values live); ``labels`` (M,): their ids;
    ``cu_rows`` (b+1,): per-sequence offsets into ``rows`` (a sequence's response rows are contiguous)."""

    def __init__(self, buffer: RolloutBuffer, seq_ids: np.ndarray, device: torch.device):
        tokens = torch.from_numpy(np.asarray(buffer.tokens())).long()
        self.seq_ids = np.asarray(seq_ids, dtype=np.int64)  # buffer indices of the packed sequences, in order
        pb: PackedBatch = pack(buffer.offsets(), self.seq_ids, buffer.tokens())
        target = torch.from_numpy(pb.target_index)
        keep = target >= 0
        keep[keep.clone()] = torch.from_numpy(np.asarray(buffer.response_mask())).bool()[target[keep]]
        rows = keep.nonzero().squeeze(1)
        cu = torch.from_numpy(pb.cu_seqlens).long()

        self.num_sequences = len(self.seq_ids)
        self.num_loss_tokens = len(rows)
        self.max_seqlen = int(pb.max_seqlen)
        self.targets = target[rows]  # stays on the CPU: indexes the buffer's NumPy fields
        self.rows = rows.to(device)
        self.labels = torch.from_numpy(pb.labels)[rows].to(device)
        self.cu_rows = _offsets(_count_per_sequence(rows, cu)).to(device=device, dtype=torch.int32)
        self.input_ids = tokens[torch.from_numpy(pb.index)][None].to(device)  # (1, N)
        self.position_ids = torch.from_numpy(pb.position_ids)[None].to(device)  # (1, N)
        self.cu_seqlens = cu.to(device=device, dtype=torch.int32)  # (b+1,)
        self.attn_kwargs = {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                            "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}  # fmt: skip

    def gather(self, flat: np.ndarray) -> torch.Tensor:
        """(M,) float32 values of a buffer field at this micro-batch's target tokens, on the device."""
        return torch.from_numpy(np.asarray(flat))[self.targets].to(self.rows.device)

    def scatter(self, values: torch.Tensor, flat: np.ndarray) -> None:
        """Write (M,) values into a buffer field (a writable numpy view) at the target tokens."""
        torch.from_numpy(flat)[self.targets] = values.detach().float().cpu()


def hidden_states(model, mb: MicroBatch) -> torch.Tensor:
    """(N, H) last hidden states of the packed micro-batch, every sequence attending only to itself."""
    out = backbone_of(model)(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, **mb.attn_kwargs)
    return out.last_hidden_state[0]


def token_logprobs(model, mb: MicroBatch, *, temperature: float, backend: str = "auto") -> torch.Tensor:
    """(M,) log-probs of the micro-batch's response tokens under ``model`` at ``temperature``, through the
    fused linear log-prob op (no (N, V) logits)."""
    h = hidden_states(model, mb)[mb.rows]
    weight, bias = lm_head_of(model)
    return linear_logprobs(h, weight, mb.labels, bias=bias, temperature=temperature, backend=backend)


@torch.no_grad()
def score_logprobs(model, micro_batches: list[MicroBatch], out: np.ndarray, *, temperature, backend="auto"):
    """Fill ``out`` (a flat float32 buffer field) with the log-prob of every response token."""
    with eval_mode(model):
        for mb in micro_batches:
            mb.scatter(token_logprobs(model, mb, temperature=temperature, backend=backend), out)


@torch.no_grad()
def score_values(critic, micro_batches: list[MicroBatch], out: np.ndarray) -> None:
    """Fill ``out`` with the critic's value of the state before every response token."""
    with eval_mode(critic):
        for mb in micro_batches:
            v = critic(mb.input_ids, position_ids=mb.position_ids, **mb.attn_kwargs)[0]
            mb.scatter(v[mb.rows], out)


@torch.no_grad()
def score_reward_model(reward_model, micro_batches: list[MicroBatch], num_sequences: int) -> torch.Tensor:
    """(B,) float32 reward-model scores (read at each sequence's last token), in buffer order."""
    scores = torch.full((num_sequences,), math.nan, dtype=torch.float32)
    with eval_mode(reward_model):
        for mb in micro_batches:
            s = score_packed(reward_model, mb.input_ids, mb.position_ids, mb.cu_seqlens, max_length=mb.max_seqlen)
            scores[torch.from_numpy(mb.seq_ids)] = s.float().cpu()
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"reward model returned a non-finite score {scores[bad].item()} for sequence {bad}")
    return scores


def score_reward_fn(fn: Callable, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """(B,) float32 scores from a Python reward callable, checked for count and finiteness."""
    rewards = fn(list(prompts), list(completions))
    return check_rewards(rewards, len(completions), completions=completions, source="reward function")
