"""Supervised fine-tuning on demonstrations: next-token loss on the completion tokens only.

Stage 1 of the RLHF pipeline: the result is the reference policy pi_ref that PPO later stays close to.
The prompt conditions the model but carries no loss, so the model learns what follows a prompt rather
than how prompts look; every completion ends with the tokenizer's eos so that the policy learns to stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fusedrl.kernels import IGNORE_INDEX, logprobs

from .compose import composed, part
from .config import OptimConfig, RunConfig
from .distributed import Distributed
from .update import GuardedStep, accumulate, adamw, lr_factor


@composed
@dataclass(frozen=True)
class SFTConfig:
    """Settings for ``train_sft``; ``lr`` and ``grad_clip`` are the shared optimizer's learning_rate and
    max_grad_norm."""

    steps: int = 300
    """Optimizer steps (each draws ``batch_size`` demonstrations at random)."""
    batch_size: int = 64
    """Demonstrations per step."""
    optim: OptimConfig = part(lambda: OptimConfig(learning_rate=3e-3, lr_schedule="cosine", warmup_steps=20),
                              rename={"learning_rate": "lr", "max_grad_norm": "grad_clip"},
                              owned=("lr_schedule", "backend"))  # fmt: skip
    """The optimizer (shared with every objective): linear warmup, cosine decay to 10%."""
    run: RunConfig = part(RunConfig, owned=tuple(f for f in RunConfig.__dataclass_fields__ if f != "seed"))
    """Only the seed (of the batch sampler): ``train_sft`` writes nothing."""


def encode_demonstrations(
    tokenizer, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (all (B, T)) for prompt + completion + eos.

    ``labels`` equals ``input_ids`` on completion and eos tokens and ``-100`` on prompt and padding."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}"
        )
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer needs eos and pad tokens, got eos_token_id={tokenizer.eos_token_id}, "
            f"pad_token_id={tokenizer.pad_token_id}"
        )
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return pad_right(p_ids, [c + [tokenizer.eos_token_id] for c in c_ids], pad_token_id=tokenizer.pad_token_id)


def pad_right(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (all (B, T)) of prompt + response rows.

    ``labels`` equals ``input_ids`` on response tokens and ``IGNORE_INDEX`` on prompt and padding. Right
    padding keeps every real token at its unpadded position: the same numbers as a packed forward."""
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, rows)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        labels[i, len(p) : len(r)] = torch.tensor(r[len(p) :])
    return input_ids, attention_mask, labels


def sft_loss(
    model,
    input_ids: torch.Tensor,  # (B, T) right-padded
    attention_mask: torch.Tensor,  # (B, T)
    labels: torch.Tensor,  # (B, T), -100 where no loss
) -> torch.Tensor:
    """Mean negative log-likelihood of the labelled tokens (token-mean over the batch)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    # Position t predicts token t + 1: shift the labels rather than copying the logits.
    targets = labels[:, 1:]
    n_tok = (targets != IGNORE_INDEX).sum()
    if int(n_tok) == 0:
        raise ValueError("labels has no position to learn from (all -100 after the first token)")
    logp = logprobs(logits[:, :-1], targets, ignore_index=IGNORE_INDEX)  # (B, T-1), 0 where ignored
    return -logp.sum() / n_tok


def train_sft(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    config: SFTConfig = SFTConfig(),
    *,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` (an HF causal LM, on its own device) on demonstrations; returns the loss per step.

    Batches are drawn at random with replacement, so ``config.steps`` sets the budget whatever the data size."""
    from tqdm.auto import tqdm

    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={config.steps}, batch_size={config.batch_size}")
    input_ids, attention_mask, labels = encode_demonstrations(tokenizer, prompts, completions)
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)

    # The update loop's pieces: fused AdamW, the schedule, the guarded step (a non-finite loss or gradient skips
    # the step with a warning instead of writing NaN into the weights).
    opt = adamw(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("cosine", config.warmup_steps, config.steps))
    guard = GuardedStep(Distributed(device, single=True))
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="stage 1/3 SFT", disable=not progress, leave=True)
    for step in bar:
        idx = torch.randint(0, input_ids.shape[0], (config.batch_size,), generator=gen).to(device)
        # Trim the batch to its longest row: random batches are often shorter than the global max.
        T = int(attention_mask[idx].sum(1).max())

        def objective(rows, weight):
            losses.append(sft_loss(model, input_ids[rows, :T], attention_mask[rows, :T], labels[rows, :T]))
            yield losses[-1]

        accumulate((), [(idx, 1.0)], objective)
        losses[-1] = losses[-1].item()  # host sync once per step: the progress bar shows it anyway
        guard.step(model, opt, math.isfinite(losses[-1]), max_grad_norm=config.grad_clip, step=step + 1, name="sft")
        sched.step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
