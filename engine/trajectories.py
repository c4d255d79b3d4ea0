"""Trajectories: the one experience type every producer makes and every objective trains on.

A batch of trajectories lives in the packed C++ rollout buffer (``packing.RolloutBuffer``): per sequence its token
ids; per token a **loss mask** (the buffer's response mask: 1 = a token the policy sampled and the loss trains on,
0 = prompt, environment or tool output, padding) and float fields, among them the behaviour policy's log-prob of
each sampled token (``rollout_logp``, 0 where the engine gave none) and the **policy version** that sampled it
(``version``: the trainer step whose weights were served). Per sequence it keeps a **group id** (the samples of
one prompt share one; the group estimators read them) and a **score** (the sequence's reward) beside the per-token
fields (``RolloutBuffer.group_ids`` / ``scores``).

A trajectory is not limited to prompt + one response: a producer may return responses that interleave sampled
tokens with text it did not sample (a tool's output, an environment's observation) by giving their loss mask
(``RolloutOutput.loss_mask``); only the sampled tokens are scored, carry advantages and a loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .packing import RolloutBuffer

# Per-token float fields of the buffer, each at the flat position of the token it is about: the scoring stages'
# old / reference log-probs and values, the shaped rewards, advantages and returns, the behaviour log-prob the
# rollout engine reported and the policy version that sampled the token.
TOKEN_FIELDS = ("old_logp", "ref_logp", "values", "rewards", "advantages", "returns", "rollout_logp", "version")
BUFFER_FIELDS = TOKEN_FIELDS


def fill_buffer(buffer: RolloutBuffer, prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                loss_mask: Sequence[Sequence[int]] | None = None, logprobs: Sequence[Sequence[float]] | None = None,
                version: int | Sequence[Sequence[int]] = 0, group_ids: Sequence[int] | None = None) -> None:  # fmt: skip
    """Replace the buffer's content with prompt + response sequences. ``loss_mask``: per response token, 1 where the
    policy sampled it (default: every response token); prompt tokens get 0. ``logprobs``: the behaviour log-prob of
    each response token (``rollout_logp``; where the mask is 0 it is not read); ``version``: the policy version of
    every sampled token, or per response the version of each of its tokens; ``group_ids``: each sequence's group (the samples of one prompt share one)."""
    if len(prompt_ids) != len(responses):
        raise ValueError(f"fill_buffer: {len(prompt_ids)} prompts but {len(responses)} responses")
    buffer.clear()
    fields = set(buffer.fields)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        if len(r) == 0:
            raise ValueError("generate returned an empty response (max_new_tokens must be >= 1)")
        tokens = np.asarray(list(p) + list(r), dtype=np.int64)
        mask = np.zeros(len(tokens), dtype=np.uint8)
        mask[len(p) :] = 1 if loss_mask is None else np.asarray(loss_mask[i], dtype=np.uint8)
        if loss_mask is not None and not mask.any():
            raise ValueError(f"fill_buffer: response {i} has no token with loss mask 1 (nothing the policy sampled)")
        extra = {}
        if "version" in fields:
            v = np.zeros(len(tokens), dtype=np.float32)
            v[len(p) :] = version if isinstance(version, (int, float)) else np.asarray(version[i], dtype=np.float32)
            extra["version"] = mask.astype(np.float32) * v
        if logprobs is not None and "rollout_logp" in fields:
            lp = np.zeros(len(tokens), dtype=np.float32)
            lp[len(p) :] = np.asarray(logprobs[i], dtype=np.float32)
            extra["rollout_logp"] = lp * mask
        buffer.append(tokens, mask, **extra)
    if group_ids is not None:
        buffer.set_group_ids(np.asarray(group_ids, dtype=np.int64))
