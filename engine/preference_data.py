"""The offline producer of preference pairs: ``{prompt, chosen, rejected}`` JSONL records (strings, or chat messages
rendered with the tokenizer's template) checked and encoded into token ids, then laid out as trajectories in the
packed buffer (pair i = sequences 2i, 2i + 1; the loss mask marks the responses). ``fusedrl dpo`` trains on them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class EncodedPair:
    """One preference pair as token ids, and where it came from."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    where: str
    """``file:line`` of the record."""


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _render_chat(tokenizer, prompt, response, where: str, field: str) -> tuple[str, str]:
    """(prompt text with the generation prompt, response text): the template applied to prompt + response,
    cut where the prompt's own rendering ends."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: the record holds chat messages but the tokenizer has no chat template "
                         "(give plain strings, or a tokenizer with a chat_template)")  # fmt: skip
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    if not _is_messages(response):
        raise ValueError(f"{where}: {field!r} must be a string or a list of {{'role', 'content'}} messages")
    if not any(str(m["content"]).strip() for m in response):
        raise ValueError(f"{where}: {field!r} is empty (an empty response carries no preference)")
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(head):
        raise ValueError(f"{where}: the chat template renders prompt + {field} with a different prefix than the "
                         "prompt alone, so the response tokens cannot be told apart")  # fmt: skip
    return head, full[len(head) :]


def encode_record(tokenizer, row, where: str, *, max_length: int | None) -> EncodedPair:
    """Token ids of one record (see the module docstring for the formats); ValueError naming ``where``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt', 'chosen' and 'rejected', got "
                         f"{type(row).__name__}")  # fmt: skip
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (each record needs 'prompt', 'chosen', 'rejected')")
    prompt = row["prompt"]
    ids = {}
    if _is_messages(prompt):
        for field in ("chosen", "rejected"):
            head, text = _render_chat(tokenizer, prompt, row[field], where, field)
            ids[field] = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids["prompt"] = tokenizer(head, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, str):
        for field in ("chosen", "rejected"):
            if not isinstance(row[field], str):
                raise ValueError(f"{where}: {field!r} must be a string when 'prompt' is one, got "
                                 f"{type(row[field]).__name__}")  # fmt: skip
            if not row[field]:
                raise ValueError(f"{where}: {field!r} is empty (an empty response carries no preference)")
            ids[field] = tokenizer(row[field], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids["prompt"] = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not ids["prompt"]:
        raise ValueError(f"{where}: 'prompt' encodes to zero tokens (the first response token needs a context)")
    for field in ("chosen", "rejected"):
        if not ids[field]:
            raise ValueError(f"{where}: {field!r} encodes to zero tokens")
    if max_length is not None:
        if len(ids["prompt"]) >= max_length:
            raise ValueError(f"{where}: the prompt is {len(ids['prompt'])} tokens, which leaves no room for a response "
                             f"within max_length={max_length}")  # fmt: skip
        room = max_length - len(ids["prompt"])
        ids["chosen"], ids["rejected"] = ids["chosen"][:room], ids["rejected"][:room]
    return EncodedPair(list(ids["prompt"]), list(ids["chosen"]), list(ids["rejected"]), where)


def load_pairs(path: str | Path, tokenizer, *, max_length: int | None = None,
               max_pair_tokens: int | None = None) -> list[EncodedPair]:  # fmt: skip
    """Every record of a JSONL file as an ``EncodedPair``; a bad record raises ValueError naming ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"preference data file {str(p)!r} does not exist")
    pairs = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        pair = encode_record(tokenizer, row, where, max_length=max_length)
        total = 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
        if max_pair_tokens is not None and total > max_pair_tokens:
            raise ValueError(f"{where}: the pair is {total} tokens (prompt twice, chosen and rejected), more than "
                             f"max_tokens_per_microbatch={max_pair_tokens}: a pair is never split, raise the budget")  # fmt: skip
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"preference data file {str(p)!r} holds no records")
    return pairs


def build_buffer(pairs: Sequence[EncodedPair]):
    """A ``RolloutBuffer`` holding pair i as sequences 2i (prompt + chosen) and 2i + 1 (prompt + rejected),
    response tokens masked in; and the (P,) token count of each pair."""
    from .packing import RolloutBuffer

    buf = RolloutBuffer(fields=())
    tokens, masks = [], []
    for pr in pairs:
        for resp in (pr.chosen, pr.rejected):
            tokens.append(np.asarray(pr.prompt + resp, dtype=np.int64))
            masks.append(np.asarray([0] * len(pr.prompt) + [1] * len(resp), dtype=np.uint8))
    buf.append_many(tokens, masks)
    lengths = np.asarray([2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs], dtype=np.int64)
    return buf, lengths
