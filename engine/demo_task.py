"""The demo's synthetic task and its evaluation (``fusedrl demo``; see ``demo.py`` for the story): digit-string
prompts and completions, the hidden gold scorer, labelled comparison pairs, sampling and the gold / proxy / KL
evaluation of a policy, and the proxy reward PPO climbs."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DIGITS = "0123456789"
SEPARATOR = ":"


# ----------------------------------------------------------------------------------------------------
# The synthetic task and its hidden gold scorer
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitTask:
    """Prompts are digit strings ending in ':'; completions are digit strings; the gold score is hidden."""

    prompt_len: tuple[int, int]
    """(fewest, most) digits in a prompt."""
    completion_len: tuple[int, int]
    """(fewest, most) digits in a well-formed completion."""

    def prompts(self, n: int, rng: random.Random) -> list[str]:
        lo, hi = self.prompt_len
        return ["".join(rng.choices(DIGITS, k=rng.randint(lo, hi))) + SEPARATOR for _ in range(n)]

    def demonstration(self, rng: random.Random) -> str:
        """A well-formed completion with no preference in it: uniform length, uniform digits."""
        lo, hi = self.completion_len
        return "".join(rng.choices(DIGITS, k=rng.randint(lo, hi)))

    def well_formed(self, completion: str) -> bool:
        lo, hi = self.completion_len
        return lo <= len(completion) <= hi and all(c in DIGITS for c in completion)

    def gold(self, prompt: str, completion: str) -> float:
        """Mean over the completion's digits of d / 9, where a digit that repeats the one before it (the first
        is compared with the prompt's last digit) counts 0; 0 if the completion is not well formed."""
        if not self.well_formed(completion):
            return 0.0
        prev = prompt.rstrip(SEPARATOR)[-1:]
        total = 0
        for c in completion:
            total += int(c) if c != prev else 0
            prev = c
        return total / (9 * len(completion))

    def gold_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [self.gold(p, c) for p, c in zip(prompts, completions)]


def label_pairs(
    task: DigitTask,
    prompts: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    *,
    flip_rate: float,
    rng: random.Random,
):
    """Annotate (prompt, first, second) comparisons: the gold-preferred completion wins, except that a
    ``flip_rate`` fraction of labels is flipped. Ties in gold are dropped (the annotator has no preference).

    Returns ``(pairs, clean)``: the noisy ``PreferencePair`` list and the same pairs labelled by gold alone."""
    from .reward_model import PreferencePair

    pairs, clean = [], []
    for p, a, b in zip(prompts, first, second):
        ga, gb = task.gold(p, a), task.gold(p, b)
        if ga == gb:
            continue
        win, lose = (a, b) if ga > gb else (b, a)
        clean.append(PreferencePair(p, win, lose))
        if rng.random() < flip_rate:
            win, lose = lose, win
        pairs.append(PreferencePair(p, win, lose))
    return pairs, clean


# ----------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------------
def sample(policy, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 256):
    """One completion per prompt at temperature 1 (the distribution PPO trains): ``(texts, prompt_ids,
    response_ids)``; a response keeps its eos, a truncated one has none."""
    from .data import context_length, encode_prompts
    from .sampling import generate_responses

    prompt_ids = encode_prompts(tokenizer, prompts, max_new_tokens=max_new_tokens, context=context_length(policy))
    responses = generate_responses(
        policy, prompt_ids, max_new_tokens=max_new_tokens, temperature=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
    )  # fmt: skip
    return tokenizer.batch_decode(responses, skip_special_tokens=True), prompt_ids, responses


@torch.no_grad()
def response_logprob(
    model, prompt_ids: list[list[int]], responses: list[list[int]], *, pad_token_id: int
) -> torch.Tensor:
    """(B,) float32 log-probability of each whole response given its prompt (sum over its tokens)."""
    from fusedrl.kernels import IGNORE_INDEX, logprobs

    from .sft import pad_right

    device = next(model.parameters()).device
    ids, mask, labels = pad_right(prompt_ids, responses, pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    model.train(was_training)
    lp = logprobs(logits[:, :-1], labels[:, 1:].to(device), ignore_index=IGNORE_INDEX)  # (B, T-1), 0 off the response
    return lp.sum(1).float().cpu()


def evaluate(
    policy, ref_policy, reward_model, tokenizer, task: DigitTask, prompts: Sequence[str], *, max_new_tokens: int
) -> dict:
    """Gold and proxy reward of fresh samples of ``policy`` on ``prompts``, and KL(policy || ref) per
    sequence (the mean of log pi(y|x) - log pi_ref(y|x) over those samples: the k1 estimate)."""
    from .reward_model import score_sequences

    texts, prompt_ids, responses = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens)
    gold = torch.tensor(task.gold_scores(prompts, texts))
    proxy = score_sequences(reward_model, tokenizer, prompts, texts)
    kl = response_logprob(policy, prompt_ids, responses, pad_token_id=tokenizer.pad_token_id) - response_logprob(
        ref_policy, prompt_ids, responses, pad_token_id=tokenizer.pad_token_id
    )
    return {
        "gold": gold.mean().item(),
        "proxy": proxy.mean().item(),
        "kl": kl.mean().item(),
        "well_formed": sum(task.well_formed(t) for t in texts) / len(texts),
        "length": sum(len(t) for t in texts) / len(texts),
        "examples": [p + t for p, t in zip(prompts[:6], texts[:6])],
    }


class ProxyReward:
    """The reward PPO optimises: the learned reward model's score of prompt + completion + eos.

    It also scores the same completions with the hidden gold scorer and appends one row per call (one
    call per PPO step) to ``log_path``; the policy never sees those numbers, the report does."""

    def __init__(self, reward_model, tokenizer, task: DigitTask, log_path: Path, step_of=lambda: 0):
        self.reward_model, self.tokenizer, self.task = reward_model, tokenizer, task
        self.log_path = Path(log_path)
        self.step_of = step_of  # the PPO step these rollouts belong to, asked at call time

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        from .reward_model import score_sequences

        proxy = score_sequences(self.reward_model, self.tokenizer, prompts, completions)
        gold = self.task.gold_scores(prompts, completions)
        row = {
            "step": int(self.step_of()),
            "gold/reward_mean": sum(gold) / len(gold),
            "gold/well_formed_frac": sum(self.task.well_formed(c) for c in completions) / len(completions),
            "proxy/reward_mean": proxy.mean().item(),
        }
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return proxy.tolist()
