"""Reward-model training on preference pairs with the Bradley-Terry loss.

Stage 2 of the RLHF pipeline. Annotators compare two completions of one prompt; the Bradley-Terry model
says P(y_w preferred to y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)), so the reward model r is fit by
minimising -log sigmoid(r(x, y_w) - r(x, y_l)). Only reward differences are identified: the offset is
arbitrary (PPO's advantage whitening removes it) and the scale is set by how noisy the labels are (it
trades off against the KL coefficient of the PPO stage).

The reward model is an HF sequence-classification model with one output; a sequence is
prompt + completion + eos and its reward is the output at its last token (HF picks the last token that is
not ``config.pad_token_id``, hence pad must differ from eos).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .compose import composed, part
from .config import OptimConfig, RunConfig
from .distributed import Distributed
from .sft import encode_demonstrations
from .update import GuardedStep, accumulate, adamw, lr_factor


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: two completions of one prompt, the preferred one first."""

    prompt: str
    """The context x both completions continue."""
    chosen: str
    """The preferred completion y_w (without eos)."""
    rejected: str
    """The other completion y_l (without eos)."""


@composed
@dataclass(frozen=True)
class RewardModelConfig:
    """Settings for ``train_reward_model``; ``lr`` and ``grad_clip`` are the shared optimizer's learning_rate and
    max_grad_norm."""

    epochs: int = 2
    """Passes over the pairs."""
    batch_size: int = 64
    """Pairs per optimizer step (2 x batch_size sequences per forward)."""
    optim: OptimConfig = part(lambda: OptimConfig(learning_rate=1e-3, lr_schedule="cosine", weight_decay=0.01),
                              rename={"learning_rate": "lr", "max_grad_norm": "grad_clip"},
                              owned=("lr_schedule", "warmup_steps", "backend"))  # fmt: skip
    """The optimizer (shared with every objective): linear warmup over the first 10% of steps, cosine decay to 10%."""
    run: RunConfig = part(RunConfig, owned=tuple(f for f in RunConfig.__dataclass_fields__ if f != "seed"))
    """Only the seed (of the pair shuffling): ``train_reward_model`` writes nothing."""


def bradley_terry_loss(
    r_chosen: torch.Tensor,  # (B,) rewards of the preferred completions
    r_rejected: torch.Tensor,  # (B,) rewards of the other completions
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """``-log sigmoid(r_chosen - r_rejected)``, in float32 at least; ``reduction``: mean | sum | none.

    Computed as ``softplus(r_rejected - r_chosen)``, which stays finite for any margin."""
    for name, t in (("r_chosen", r_chosen), ("r_rejected", r_rejected)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(
            f"r_chosen and r_rejected must have the same shape, got {tuple(r_chosen.shape)} and "
            f"{tuple(r_rejected.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    dtype = torch.promote_types(torch.promote_types(r_chosen.dtype, r_rejected.dtype), torch.float32)
    loss = F.softplus(r_rejected.to(dtype) - r_chosen.to(dtype))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def encode_sequences(
    tokenizer, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (both (B, T)) of prompt + completion + eos: the
    same token sequences as the SFT stage's demonstrations."""
    input_ids, attention_mask, _ = encode_demonstrations(tokenizer, prompts, completions)
    return input_ids, attention_mask


def _check_model_tokenizer(model, tokenizer) -> None:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None or pad != tokenizer.pad_token_id:
        raise ValueError(
            f"model.config.pad_token_id must equal tokenizer.pad_token_id ({tokenizer.pad_token_id}) so that the "
            f"reward is read at the last real token, got {pad}"
        )
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id == pad:
        raise ValueError(
            f"tokenizer.eos_token_id must be set and differ from the pad id {pad}, got {tokenizer.eos_token_id}"
        )


def _rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 1)
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"the reward model must output one score per sequence (B, 1), got {tuple(logits.shape)}")
    return logits[:, 0].float()


@torch.no_grad()
def score_sequences(
    model, tokenizer, prompts: Sequence[str], completions: Sequence[str], *, batch_size: int = 256
) -> torch.Tensor:
    """Rewards r(x, y) (float32, shape (len(prompts),), on the CPU) of prompt + completion + eos."""
    _check_model_tokenizer(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_sequences(tokenizer, prompts[i : i + batch_size], completions[i : i + batch_size])
        out.append(_rewards(model, ids.to(device), mask.to(device)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _as_pairs(pairs) -> list[PreferencePair]:
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, PreferencePair):
            out.append(p)
        elif isinstance(p, (tuple, list)) and len(p) == 3:
            out.append(PreferencePair(*p))
        else:
            raise TypeError(f"pairs[{i}] must be a PreferencePair or a (prompt, chosen, rejected) tuple, got {p!r}")
    if not out:
        raise ValueError("pairs must not be empty")
    return out


def train_reward_model(
    model,
    pairs: Sequence[PreferencePair | tuple[str, str, str]],
    *,
    tokenizer,
    config: RewardModelConfig = RewardModelConfig(),
    progress: bool = True,
) -> list[float]:
    """Fit ``model`` (HF sequence classification, one label, on its own device) to ``pairs`` with the
    Bradley-Terry loss; returns the loss per step."""
    from tqdm.auto import tqdm

    pairs = _as_pairs(pairs)
    _check_model_tokenizer(model, tokenizer)
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(
            f"epochs and batch_size must be >= 1, got epochs={config.epochs}, batch_size={config.batch_size}"
        )
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    # The update loop's pieces: fused AdamW, the schedule, the guarded step.
    opt = adamw(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("cosine", max(1, total // 10), total))
    guard = GuardedStep(Distributed(device, single=True))
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc="stage 2/3 reward model", disable=not progress, leave=True)

    def objective(batch, weight):
        n = len(batch)
        # Chosen and rejected in one forward: half the launches, and r[:n] - r[n:] pairs them row by row.
        ids, mask = encode_sequences(
            tokenizer, [p.prompt for p in batch] * 2, [p.chosen for p in batch] + [p.rejected for p in batch]
        )
        r = _rewards(model, ids.to(device), mask.to(device))
        losses.append(bradley_terry_loss(r[:n], r[n:]))  # the mean over the step's pairs: its own denominator
        yield losses[-1]

    for _ in range(config.epochs):
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for s in range(0, len(pairs), config.batch_size):
            accumulate((), [([pairs[j] for j in order[s : s + config.batch_size]], 1.0)], objective)
            losses[-1] = losses[-1].item()  # host sync once per step, for the progress bar
            guard.step(model, opt, math.isfinite(losses[-1]), max_grad_norm=config.grad_clip, step=len(losses),
                       name="reward model")  # fmt: skip
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def pairwise_accuracy(
    model, pairs: Sequence[PreferencePair | tuple[str, str, str]], *, tokenizer, batch_size: int = 256
) -> float:
    """Fraction of pairs where r(chosen) > r(rejected); an exact tie counts one half."""
    pairs = _as_pairs(pairs)
    prompts = [p.prompt for p in pairs]
    r_c = score_sequences(model, tokenizer, prompts, [p.chosen for p in pairs], batch_size=batch_size)
    r_r = score_sequences(model, tokenizer, prompts, [p.rejected for p in pairs], batch_size=batch_size)
    wins = int((r_c > r_r).sum()) + 0.5 * int((r_c == r_r).sum())
    return wins / len(pairs)
