"""What ``fusedrl sft`` and ``fusedrl rm`` share: their settings (``OfflineConfig``), reading records from a
file, a ``datasets`` directory or a Hub data set, and the packed training run over records held in a
``RolloutBuffer``.

    records = read_records("demos.jsonl")                 # [(where, row)]: "demos.jsonl:12" names a bad one
    train, held_out = split_records(records, cfg)         # --eval-data, else a seeded --eval-fraction of them
    rows = fit(model, tokenizer, objective, cfg, ...)     # checkpoints, metrics.jsonl, final model

An objective (``sft_cli.SFTObjective``, ``rm_cli.RMObjective``) holds its records packed in a buffer and says,
for the record ids of one optimizer step, which packed micro-batches train them (a record is never split),
what the step's denominator is (its loss tokens, or its pairs), and the summed loss of one micro-batch. Each
micro-batch's loss is divided by the whole step's denominator before its backward, so the gradient is that
of the step's mean however the token budget splits it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from .compose import composed, flat_dict, part
from .config import OptimConfig, RunConfig
from .trackers import parse_report_to

# Raised while setting a run up, they are the user's mistakes (a missing file or model, a bad record, a run directory
# in use): one line, no traceback. Once training runs, an error keeps its traceback.
USER_ERRORS = (OSError, ValueError, TypeError, ImportError)


@composed
@dataclass
class OfflineConfig:
    """Settings of ``fusedrl sft`` and ``fusedrl rm``; each field is a ``--kebab-case`` flag."""

    model: str = "tiny-llama"
    """Model to train: a preset name (fusedrl.engine.models.PRESETS), a local HF directory or a Hub id. For rm, a causal LM (e.g. the SFT policy) gets a fresh one-output score head."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub id; default: the model's, or the built-in character tokenizer for a preset."""
    data: str | None = None
    """Training records: a .jsonl/.json/.parquet file, a datasets directory (save_to_disk) or a Hub data set name."""
    eval_data: str | None = None
    """Held-out records in the same formats (default: a seeded --eval-fraction of --data)."""
    eval_fraction: float = 0.0
    """Share of --data held out for evaluation when no --eval-data is given (a seeded random subset)."""
    dataset_split: str = "train"
    """Split of a datasets directory or Hub data set (both --data and --eval-data)."""
    dataset_config: str | None = None
    """Configuration (subset) of a Hub data set."""
    epochs: int = 1
    """Passes over the training records."""
    batch_size: int = 32
    """Records (sft: demonstrations, rm: comparison pairs) per optimizer step, packed into micro-batches."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one packed forward/backward; a record (rm: both sequences of a pair) must fit in it."""
    max_length: int | None = None
    """Longest sequence in tokens (completions beyond it are truncated); None: the model's context."""
    optim: OptimConfig = part(lambda: OptimConfig(lr_schedule="cosine"), owned=("lr_schedule",))
    """The optimizer (shared with every objective): linear warmup, cosine decay to 10%."""
    eval_every: int = 0
    """Evaluate on the held-out records every this many steps (0 = after the last step only)."""
    run: RunConfig = part(
        RunConfig, owned=("tensorboard", "log_completions")
    )  # nothing sampled; tensorboard: report_to
    """Output directory (default: runs/sft or runs/rm), seed (of the record order, the held-out split and a preset's
    random weights), checkpoints, logging."""
    resume: bool = False
    """Continue from the newest intact checkpoint in output_dir."""
    overwrite: bool = False
    """Start over in an output_dir that holds a run (its run files are deleted first)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the model weights."""
    threads: int = 0
    """torch CPU threads (0: the CPUs this process may actually use, as for fusedrl train)."""

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)!r}")

        for name in ("epochs", "batch_size", "max_tokens_per_microbatch"):
            need(getattr(self, name) >= 1, name, "an int >= 1")
        for name in ("eval_every", "threads"):
            need(getattr(self, name) >= 0, name, "an int >= 0")
        need(self.max_length is None or self.max_length >= 2, "max_length", "None or an int >= 2")
        need(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "in [0, 1)")
        need(not (self.eval_data is not None and self.eval_fraction > 0), "eval_fraction",
             "0 when --eval-data is given (one held-out set)")  # fmt: skip
        need(not (self.resume and self.overwrite), "overwrite", "False with --resume (they exclude each other)")


def parse_args(argv: Sequence[str], *, prog: str, description: str, data_help: str) -> OfflineConfig:
    """``OfflineConfig`` from the command line of ``prog``; a bad value is one line (argparse's exit 2)."""
    import argparse

    from .config import add_dataclass_arguments

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_dataclass_arguments(parser, OfflineConfig, f"{prog.split()[-1]} settings (OfflineConfig)")
    ns = vars(parser.parse_args(list(argv)))
    try:
        cfg = OfflineConfig(**ns)
    except ValueError as e:
        parser.error(str(e))
    if cfg.data is None:
        parser.error(f"--data is required ({data_help})")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------
def read_records(source: str, *, split: str = "train", config: str | None = None) -> list[tuple[str, object]]:
    """``(where, row)`` of every record of ``source``: ``file:line`` for JSON lines, ``source row i`` for the
    rows of any other source ``data.load_rows`` reads (JSON, Parquet, CSV, a saved data set, a Hub data set)."""
    from .data import load_rows

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        if not path.exists() and (Path(source).suffix or source.startswith((".", "/", "~"))):
            raise FileNotFoundError(f"data file {source!r} does not exist")
        out = [(f"{source} row {i}", row) for i, row in enumerate(load_rows(source, split=split, config=config), 1)]
    if not out:
        raise ValueError(f"data {source!r} holds no records")
    return out


def split_records(records: list, cfg: OfflineConfig) -> tuple[list, list]:
    """(training records, held-out records): ``--eval-data``'s, or a seeded ``--eval-fraction`` of ``records``."""
    if cfg.eval_data is not None:
        return records, read_records(cfg.eval_data, split=cfg.dataset_split, config=cfg.dataset_config)
    n_eval = round(cfg.eval_fraction * len(records))
    if cfg.eval_fraction > 0 and not 1 <= n_eval < len(records):
        raise ValueError(f"--eval-fraction {cfg.eval_fraction} of {len(records)} records leaves "
                         f"{n_eval} held out and {len(records) - n_eval} to train on: both need at least one")  # fmt: skip
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(records))
    held = set(order[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def load_tokenizer_for(cfg: OfflineConfig):
    """The tokenizer of ``cfg.tokenizer``, else of ``cfg.model``; the character tokenizer for a preset."""
    from .models import PRESETS
    from .tokenizer import build_char_tokenizer, load_tokenizer

    if cfg.tokenizer is None and cfg.model in PRESETS:
        return build_char_tokenizer()
    return load_tokenizer(cfg.tokenizer or cfg.model, "tokenizer" if cfg.tokenizer else "model")


def max_length_of(cfg: OfflineConfig, model) -> int | None:
    """``--max-length``, else the model's context length."""
    from .data import context_length

    return cfg.max_length if cfg.max_length is not None else context_length(model)


def step_records(n: int, per_step: int, seed: int, step: int) -> np.ndarray:
    """The record ids of ``step`` (0-based): epoch-wise seeded shuffles, derived from (seed, epoch) alone so a
    resumed run draws the same records."""
    epoch, k = divmod(step, math.ceil(n / per_step))
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * per_step : (k + 1) * per_step]


# ----------------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------------
class Objective(Protocol):
    """A loss over packed micro-batches of records (see the module docstring)."""

    num_records: int

    def micro_batches(self, ids: np.ndarray) -> list:
        """The packed micro-batches that train records ``ids`` (each record whole, within the token budget)."""

    def denominator(self, ids: np.ndarray) -> float:
        """What the step's loss is a mean over: its loss tokens (sft) or its records (rm)."""

    def loss(self, mb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's summed loss and metric sums (each becomes a mean over the step's denominator)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (``eval/...``; the model is in eval mode); empty when there are no held-out records."""


def fit(model, tokenizer, objective: Objective, cfg: OfflineConfig, *, final_name: str,
        run_config: dict | None = None) -> list[dict]:  # fmt: skip
    """Train ``model`` (on its device, packed attention switched on) on ``objective``; returns the metrics rows.
    ``cfg.output_dir`` gets metrics.jsonl, config.yaml (``run_config``), checkpoints (``--save-every``, resumed
    with ``--resume``) and the final model as ``final_name/`` (``save_pretrained``, with the tokenizer).

    An optimizer step whose gradient norm is not finite is skipped (warned, counted in ``train/skipped_steps``):
    one bad batch must not write NaN into the weights."""
    from .distributed import Distributed
    from .metrics import MetricsLogger
    from .update import GuardedStep, RunDir, accumulate, adamw, lr_factor, run_loop, save_model

    dist = Distributed(next(model.parameters()).device, single=True)
    out = Path(cfg.output_dir)
    run = RunDir(out, dist, resume=cfg.resume, overwrite=cfg.overwrite, keep_checkpoints=cfg.keep_checkpoints,
                 extra_files=(final_name,))  # fmt: skip
    if run_config is not None:
        run.write_config(run_config)
    n = objective.num_records
    total = cfg.epochs * math.ceil(n / cfg.batch_size)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("cosine", cfg.warmup_steps, total))
    guard = GuardedStep(dist)
    step = 0
    state = run.load()  # this process's RNG state restored: dropout draws continue where the checkpoint left them
    if state is not None:
        if int(state["num_records"]) != n:
            raise ValueError(f"resume: the checkpoint {str(run.latest)!r} was trained on {int(state['num_records'])} "
                             f"records, the data now holds {n}")  # fmt: skip
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, guard.skipped = int(state["step"]), int(state["skipped_steps"])
        del state

    def save(at: int) -> None:
        run.save(at, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "num_records": n, "skipped_steps": guard.skipped})  # fmt: skip

    def one_step(i: int) -> dict:
        t0 = time.perf_counter()
        ids = step_records(n, cfg.batch_size, cfg.seed, i)
        denominator = objective.denominator(ids)
        sums: dict[str, torch.Tensor] = {}
        n_tok, losses = [0], []

        def loss_of(mb, weight):
            loss, m = objective.loss(mb)
            losses.append(loss.detach())
            yield loss / denominator
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_tok[0] += int(mb.input_ids.shape[1])

        accumulate((), [(mb, 1.0) for mb in objective.micro_batches(ids)], loss_of)
        ok = torch.isfinite(torch.stack(losses)).all()
        norm = guard.step(model, opt, ok, max_grad_norm=cfg.max_grad_norm, step=i + 1, name="model")
        sched.step()
        keys = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]) / denominator
        metrics = dict(zip(keys, values.tolist()))  # one host sync for the step's metrics
        dt = time.perf_counter() - t0
        metrics.update({"grad_norm": norm.item(), "lr": sched.get_last_lr()[0], "epoch": (i + 1) * cfg.batch_size / n,
                        "train/skipped_steps": float(guard.skipped), "perf/step_s": dt,
                        "perf/tokens_per_s": n_tok[0] / dt})  # fmt: skip
        if i + 1 == total or (cfg.eval_every and (i + 1) % cfg.eval_every == 0):
            model.eval()
            metrics.update(objective.evaluate())
            model.train()
        return metrics

    logger = MetricsLogger(out / "metrics.jsonl", progress=cfg.progress, total_steps=total,
                           resume_step=step if run.latest is not None else None, report_to=cfg.report_to,
                           log_every=cfg.log_every,
                           run_config=run_config if run_config is not None else flat_dict(cfg))  # fmt: skip
    model.train()
    rows = run_loop(one_step, step, total, logger, save_every=cfg.save_every, save=save)
    model.eval()
    save_model(model, tokenizer, out / final_name)
    return rows


def setup_device(cfg: OfflineConfig) -> torch.device:
    """Threads and device of a run; a torchrun launch is refused (these commands train in one process), and so is a
    tracker whose package is missing, before any model is built."""
    from .distributed import default_threads, resolve_device
    from .trackers import check_installed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fusedrl sft / rm train in one process; run them without torchrun")
    check_installed(parse_report_to(cfg.report_to))
    torch.set_num_threads(cfg.threads or default_threads())
    return resolve_device(cfg.device)


def run_config_of(cfg: OfflineConfig) -> dict:
    """The run's settings for config.yaml (without how this invocation treats the directory)."""
    run = flat_dict(cfg)
    run.pop("resume"), run.pop("overwrite")
    return run


def report(prog: str, out: Path, rows: list[dict], summary: str, outputs: list[tuple[str, str]],
           elapsed: float) -> None:  # fmt: skip
    """The last lines of a run: what it reached and every output with how to use it."""
    outputs = [*outputs, ("tensorboard", f"tensorboard --logdir {out / 'tensorboard'}"),
               ("wandb", f"offline W&B runs: wandb sync {out / 'wandb'}/offline-run-*")]  # fmt: skip
    found = [(name + ("/" if (out / name).is_dir() else ""), what) for name, what in outputs if (out / name).exists()]
    ckpts = sorted(out.glob("ckpt-*"))
    if ckpts:
        found.append((f"{ckpts[-1].name}/", f"newest of {len(ckpts)} checkpoint(s): --resume continues from it"))
    width = max((len(name) for name, _ in found), default=0)
    lines = [f"{prog}: {len(rows)} steps done in {elapsed:.0f} s; {summary}; outputs in {out}/"]
    lines += [f"  {name:<{width}}  {what}" for name, what in found]
    print("\n".join(lines), file=sys.stderr)
