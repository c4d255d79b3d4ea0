"""``fusedrl rm``: a reward model fit to your comparisons with the Bradley-Terry loss, the second stage of
SFT -> reward model -> PPO.

    fusedrl rm --model runs/sft/policy --data pairs.jsonl --eval-fraction 0.1 --output-dir runs/rm
    fusedrl train --policy runs/sft/policy --reward-model runs/rm/reward_model --prompts prompts.jsonl ...

Records: ``fusedrl dpo``'s formats (``dpo.encode_record``), from a .jsonl/.json/.parquet file, a datasets
directory or a Hub data set: ``{"prompt", "chosen", "rejected"}`` as three strings (each response tokenized
after the prompt and ended by eos, as ``fusedrl train`` builds the sequences its reward model scores) or as
chat messages rendered with the tokenizer's chat template.

The model is a one-output sequence classifier (``build_reward_model``): a preset, a saved reward model, or a
causal LM such as the SFT policy, which gets a fresh score head. A sequence's reward is the head applied to
its last token's hidden state, read padding-free from packed micro-batches as ``fusedrl train`` scores it
(``models.score_packed``); the loss is ``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))``, the mean over each
step's pairs (a pair's two sequences always travel in one micro-batch). Held-out pairs (``--eval-data`` or
``--eval-fraction``) give the pairwise accuracy (``eval/accuracy``: the share of pairs where the chosen
response scores higher, ties counted half). Output directory: ``metrics.jsonl``, ``config.yaml``, checkpoints
and the final ``reward_model/`` (``AutoModelForSequenceClassification.from_pretrained`` loads it, and so does
``fusedrl train --reward-model``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .offline import OfflineConfig


class PackedPairs:
    """Encoded pairs in ``dpo.build_buffer``'s layout (pair i = sequences 2i, 2i + 1), planned with the pair whole."""

    def __init__(self, pairs, max_tokens: int, device: torch.device):
        from .dpo import build_buffer

        self.buf, self.lengths = build_buffer(pairs)
        self.max_tokens, self.device = max_tokens, device

    def __len__(self) -> int:
        return len(self.lengths)

    def micro_batches(self, ids: np.ndarray) -> list:
        from .dpo import micro_batches

        return [mb for _, mb in micro_batches(self.buf, self.lengths, ids, self.max_tokens, self.device)]


def pair_rewards(model, mb) -> tuple[torch.Tensor, torch.Tensor]:
    """(p,), (p,) float32 rewards of the chosen and the rejected sequence of each pair in the micro-batch."""
    from .heads import score_packed

    r = score_packed(model, mb.input_ids, mb.position_ids, mb.cu_seqlens, max_length=mb.max_seqlen).view(-1, 2)
    return r[:, 0], r[:, 1]


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs (the loop divides them by the pair count): an exact tie counts as half a win."""
    wins = (r_chosen > r_rejected).float().sum() + 0.5 * (r_chosen == r_rejected).float().sum()
    return {"loss": loss.detach(), "accuracy": wins, "rewards/chosen": r_chosen.detach().sum(),
            "rewards/rejected": r_rejected.detach().sum(), "rewards/margins": (r_chosen - r_rejected).detach().sum()}  # fmt: skip


class RMObjective:
    """Summed Bradley-Terry loss of the pairs of a micro-batch; the step's mean is over its pairs."""

    def __init__(self, model, train: PackedPairs, held_out: PackedPairs | None):
        self.model, self.train, self.held_out = model, train, held_out
        self.num_records = len(train)

    def micro_batches(self, ids: np.ndarray) -> list:
        return self.train.micro_batches(ids)

    def denominator(self, ids: np.ndarray) -> float:
        return float(len(ids))

    def loss(self, mb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .reward_model import bradley_terry_loss

        r_c, r_r = pair_rewards(self.model, mb)
        loss = bradley_terry_loss(r_c, r_r, reduction="sum")
        return loss, pair_metrics(r_c, r_r, loss)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.held_out is None:
            return {}
        from .reward_model import bradley_terry_loss

        sums: dict[str, float] = {}
        for mb in self.held_out.micro_batches(np.arange(len(self.held_out))):
            r_c, r_r = pair_rewards(self.model, mb)
            for k, v in pair_metrics(r_c, r_r, bradley_terry_loss(r_c, r_r, reduction="sum")).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"eval/{k}": v / len(self.held_out) for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
DATA_HELP = "comparison records {prompt, chosen, rejected} as fusedrl dpo reads them: a .jsonl/.json/.parquet file, a datasets directory or a Hub data set"  # fmt: skip


def encode_pairs(tokenizer, records, *, max_length: int | None, max_tokens: int) -> list:
    """Every ``(where, row)`` record as a ``dpo.EncodedPair``; a bad record is a ValueError naming it."""
    from .dpo import encode_record

    out = []
    for where, row in records:
        pair = encode_record(tokenizer, row, where, max_length=max_length)
        total = 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
        if total > max_tokens:
            raise ValueError(f"{where}: the pair is {total} tokens (prompt twice, chosen and rejected), more than "
                             f"max_tokens_per_microbatch={max_tokens}: a pair is never split, raise the budget")  # fmt: skip
        out.append(pair)
    return out


def setup(cfg: OfflineConfig):
    """Everything before the first step: ``(model, tokenizer, objective)``; the user's mistakes surface here."""
    from .attention import use_packed_attention
    from .checkpoint import prepare_run_dir
    from .models import PRESETS, build_reward_model
    from .offline import load_tokenizer_for, max_length_of, read_records, setup_device, split_records

    device = setup_device(cfg)
    prepare_run_dir(Path(cfg.output_dir), resume=cfg.resume, overwrite=cfg.overwrite, extra_files=("reward_model",))
    tokenizer = load_tokenizer_for(cfg)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {cfg.tokenizer or cfg.model!r} has no eos token to end responses with")
    train, held = split_records(read_records(cfg.data, split=cfg.dataset_split, config=cfg.dataset_config), cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = build_reward_model(cfg.model, vocab_size=len(tokenizer) if cfg.model in PRESETS else None, seed=cfg.seed,
                               pad_token_id=pad, dtype=getattr(torch, cfg.dtype)).to(device)  # fmt: skip
    max_length = max_length_of(cfg, model)
    encode = lambda recs: encode_pairs(tokenizer, recs, max_length=max_length, max_tokens=cfg.max_tokens_per_microbatch)
    pack = lambda pairs: PackedPairs(pairs, cfg.max_tokens_per_microbatch, device)
    use_packed_attention(model)
    return model, tokenizer, RMObjective(model, pack(encode(train)), pack(encode(held)) if held else None)


def main(argv: Sequence[str] | None = None) -> int:
    import dataclasses

    from .offline import USER_ERRORS, fit, parse_args, report, run_config_of

    cfg = parse_args(sys.argv[1:] if argv is None else argv, prog="fusedrl rm", data_help=DATA_HELP,
                     description="Fit a reward model to {prompt, chosen, rejected} comparisons with the Bradley-Terry "
                     "loss, packed; held-out pairwise accuracy. Writes metrics.jsonl, config.yaml, checkpoints and the "
                     "final reward_model/ (what fusedrl train --reward-model takes) to --output-dir (runs/rm when not "
                     "given).")  # fmt: skip
    if cfg.output_dir is None:
        cfg = dataclasses.replace(cfg, output_dir="runs/rm")
    started = time.monotonic()
    try:
        model, tokenizer, objective = setup(cfg)
    except USER_ERRORS as e:
        raise SystemExit(f"fusedrl rm: {' '.join(str(e).split())}") from None
    held = objective.held_out
    print(f"fusedrl rm: {objective.num_records} pairs from {cfg.data}" + (f", {len(held)} held out" if held else
          ", none held out (--eval-fraction or --eval-data gives a held-out accuracy)") + f"; model {cfg.model}",
          file=sys.stderr)  # fmt: skip
    rows = fit(model, tokenizer, objective, cfg, final_name="reward_model", run_config=run_config_of(cfg))
    last = rows[-1] if rows else {}
    summary = f"last loss {last.get('loss', math.nan):.4f}, train accuracy {last.get('accuracy', math.nan):.2f}"
    if "eval/accuracy" in last:
        summary += f", held-out accuracy {last['eval/accuracy']:.3f} on {len(held)} pairs"
    out = Path(cfg.output_dir)
    report("fusedrl rm", out, rows, summary, [
        ("metrics.jsonl", "one JSON object of metrics per step (loss, accuracy, rewards/*, eval/accuracy)"),
        ("config.yaml", "the run's settings"),
        ("reward_model", f"the reward model + tokenizer: fusedrl train --reward-model {out / 'reward_model'}, "
                         "AutoModelForSequenceClassification.from_pretrained"),
    ], time.monotonic() - started)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
