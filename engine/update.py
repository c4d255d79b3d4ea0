"""The update loop every objective runs through (PPO / GRPO, DPO, SFT, reward model).

    optimizer = adamw(params, lr=..., weight_decay=...)             # torch's fused AdamW where it exists
    schedule = lr_schedule(optimizer, cfg.optim, total_steps)       # constant or warmup + cosine
    accumulate(bodies, passes, objective)                           # one optimizer step's micro-batches
    guard = GuardedStep(dist); norm = guard.step(model, optimizer, loss_ok, max_grad_norm=..., step=...)
    run = RunDir(out, dist, resume=..., overwrite=...)               # the run's directory, checkpoints, metrics

An **objective** is a loss over one micro-batch, already divided by the global denominators of its optimizer step
(the step's tokens or sequences summed over every rank): ``objective(micro_batch)`` yields its losses one by one
(PPO: the policy loss, then the critic's), and ``accumulate`` backpropagates each, scaled by the pass weight,
before asking for the next (one graph alive at a time).

Data parallelism: every rank runs the same global micro-batch plan (``plan_microbatches(num_ranks=N)``) and trains
its own share. DDP all-reduces (sums) the gradients in the backward of the last micro-batch only (``no_sync`` for
the others); a rank left without sequences runs one zero-weighted pass so that it still joins the all-reduce.
Because the losses carry the global denominators, N processes make the update one process makes on the whole batch.

The guarded step clips the global gradient norm and skips the optimizer step, on every rank alike, when any rank's
loss or the norm is not finite: a warning, ``train/skipped_steps``, the weights and moments left as they were.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .checkpoint import load_checkpoint, prepare_run_dir, rng_state, save_checkpoint, set_rng_state
from .metrics import MetricsLogger

__all__ = [
    "GuardedStep",
    "RunDir",
    "accumulate",
    "adamw",
    "load_state",
    "lr_factor",
    "lr_schedule",
    "metrics_logger",
    "no_sync",
    "passes",
    "run_loop",
    "save_model",
    "save_state",
]


# ----------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------
def adamw(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW through torch's fused kernel where it has one for these parameters (CUDA and CPU): one pass per
    parameter, no temporaries. The default per-tensor loop allocates ~3 copies of each parameter inside every
    optimizer step (the step's peak at a large vocabulary) and is several times slower on CPU. The same update;
    only the rounding of its few float ops differs."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warmup over ``warmup`` steps, then 1 (``constant``) or a cosine decay
    to 0.1 at ``total`` (``cosine``)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    return factor


def lr_schedule(optimizer: torch.optim.Optimizer, optim, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of an ``OptimConfig`` (``lr_schedule``, ``warmup_steps``) over ``total`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim.lr_schedule, optim.warmup_steps, total))


# ----------------------------------------------------------------------------------------------------
# Micro-batches of one optimizer step
# ----------------------------------------------------------------------------------------------------
def no_sync(bodies, accumulate: bool) -> contextlib.ExitStack:
    """Inside: backward passes accumulate local gradients without the DDP all-reduce / FSDP reduce-scatter."""
    stack = contextlib.ExitStack()
    if not accumulate:
        return stack
    for body in bodies:
        if isinstance(body, nn.parallel.DistributedDataParallel):
            stack.enter_context(body.no_sync())
        elif isinstance(body, FSDPModule):
            body.set_requires_gradient_sync(False)
            stack.callback(body.set_requires_gradient_sync, True)
    return stack


def passes(mine: list, idle) -> list[tuple[object, float]]:
    """``(micro-batch, weight)`` pairs of this rank: its own micro-batches at weight 1, or, when the global plan left
    it none, ``idle`` (any micro-batch) at weight 0: the rank still joins the gradient all-reduce."""
    return [(mb, 1.0) for mb in mine] or [(idle, 0.0)]


def accumulate(bodies, steps: list[tuple[object, float]],
               objective: Callable[[object, float], Iterator[torch.Tensor]]) -> None:  # fmt: skip
    """Forward and backward every ``(micro-batch, weight)`` of one optimizer step: ``objective(mb, weight)`` yields
    its losses (each divided by the step's global denominator; metrics recorded only where ``weight`` is not 0) and
    each is backpropagated times ``weight`` before the next is asked for. DDP / FSDP reduce gradients in the last
    micro-batch's backward only."""
    for i, (mb, weight) in enumerate(steps):
        with no_sync(bodies, i < len(steps) - 1):
            for loss in objective(mb, weight):
                (loss * weight).backward()


# ----------------------------------------------------------------------------------------------------
# The guarded optimizer step
# ----------------------------------------------------------------------------------------------------
class GuardedStep:
    """Clip, step, zero, for every objective. ``skipped`` counts the steps skipped since ``reset``."""

    def __init__(self, dist):
        self.dist = dist
        self.skipped = 0
        self.last_ok = True

    def reset(self) -> None:
        self.skipped = 0

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_ok=True, *,
             max_grad_norm: float | None, step: int, name: str = "policy") -> torch.Tensor:  # fmt: skip
        """Returns the (pre-clip) global gradient norm; gradients are already summed over ranks (DDP / FSDP).

        A non-finite loss on any rank (``loss_ok`` False: a 0-dim bool tensor or a bool) or a non-finite gradient
        norm skips the step (the weights and the optimizer state stay as they were) on every rank, with a warning:
        one bad batch must not write NaN into the weights and every later checkpoint. Returns the norm; ``True``
        in ``self.last_ok`` when the step was taken."""
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        if isinstance(norm, DTensor):  # FSDP shards: the norm is already reduced over ranks
            norm = norm.full_tensor()
        # Host sync, once per optimizer step: every rank must take the same decision.
        bad = self.dist.max(float(not bool(loss_ok) or not bool(torch.isfinite(norm))))
        self.last_ok = not bad
        if bad:
            self.skipped += 1
            warnings.warn(f"step {step}: non-finite {name} loss or gradient norm ({float(norm)}); that optimizer "
                          "step was skipped", RuntimeWarning, stacklevel=3)  # fmt: skip
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()


# ----------------------------------------------------------------------------------------------------
# The loop over optimizer steps and its metrics
# ----------------------------------------------------------------------------------------------------
def metrics_logger(out: Path | None, dist, run, *, total_steps: int, resume_step: int | None,
                   run_config: dict | None = None) -> MetricsLogger:  # fmt: skip
    """The metrics of a run (``RunConfig`` settings ``run``: progress bar or ``log_every`` lines, TensorBoard, the
    ``report_to`` trackers, which get ``run_config`` once): ``out/metrics.jsonl`` written by rank 0; rows after
    ``resume_step`` (a crashed run's last steps, logged again) are dropped."""
    return MetricsLogger(
        out / "metrics.jsonl" if out is not None else None,
        tensorboard_dir=(out / "tensorboard") if (out is not None and run.tensorboard) else None,
        progress=run.progress, total_steps=total_steps, resume_step=resume_step, enabled=dist.rank == 0,
        report_to=run.report_to, log_every=run.log_every, run_config=run_config,
    )  # fmt: skip


def run_loop(step_fn: Callable[[int], dict], start: int, total: int, logger: MetricsLogger, *, save_every: int,
             save: Callable[[int], object] | None, completions: Callable[[], list | None] | None = None) -> list[dict]:  # fmt: skip
    """Steps ``start`` .. ``total - 1`` (0-based): ``step_fn(i)`` runs step i and returns its metrics, logged as step
    i + 1 (with ``completions()``'s rows, when it returns some, as that step's completions table); with ``save`` a
    checkpoint every ``save_every`` steps and one at the end (a longer run can resume from there). Returns the
    logged rows."""
    rows = []
    with logger:
        for i in range(start, total):
            rows.append(logger.log(i + 1, step_fn(i)))
            if completions is not None and (table := completions()):
                logger.log_completions(i + 1, table)
            if save is not None and save_every and (i + 1) % save_every == 0:
                save(i + 1)
    if save is not None and save_every and total % save_every:
        save(total)
    return rows


# ----------------------------------------------------------------------------------------------------
# The run directory: checkpoints, config.yaml, final model
# ----------------------------------------------------------------------------------------------------
class RunDir:
    """One run's output directory as every objective uses it: prepared once by rank 0 (``prepare_run_dir``: a
    fresh run refuses a directory holding another unless ``overwrite``; ``resume`` finds the newest intact
    checkpoint, or starts from step 0 when there is none), ``config.yaml``, checkpoints written by rank 0 with
    every rank's RNG state, loaded by every rank."""

    def __init__(self, out: str | Path, dist, *, resume: bool = False, overwrite: bool = False,
                 keep_checkpoints: int = 2, extra_files: tuple[str, ...] = ()):  # fmt: skip
        self.out, self.dist, self.keep = Path(out), dist, keep_checkpoints
        self.latest = dist.on_rank0(prepare_run_dir, self.out, resume=resume, overwrite=overwrite,
                                    extra_files=extra_files)  # fmt: skip

    def write_config(self, run_config: dict, header: str = "") -> None:
        """``config.yaml``: the run's settings by flat name (a valid ``--config`` of the same command)."""
        if self.dist.rank == 0:
            import yaml

            (self.out / "config.yaml").write_text(header + yaml.safe_dump(run_config, sort_keys=False))

    def save(self, step: int, state: dict) -> Path | None:
        return save_state(self.dist, self.out, step, state, keep_last=self.keep)

    def load(self) -> dict | None:
        """The checkpoint ``resume`` found (None when there is none), this rank's RNG state restored."""
        return load_state(self.dist, self.latest) if self.latest is not None else None


def save_state(dist, out: str | Path, step: int, state: dict, *, keep_last: int) -> Path | None:
    """``<out>/ckpt-<step>``, written atomically by rank 0 with every rank's RNG state (each rank samples with its
    own stream); every rank calls it. Returns the path on rank 0."""
    states = dist.gather_objects(rng_state())
    state = {**state, "step": step, "rng": states[0]}
    if dist.world_size > 1:
        state["rng_per_rank"] = states
    path = None
    if dist.rank == 0:
        path = save_checkpoint(out, step, state, keep_last=keep_last)
    dist.barrier()
    return path


def load_state(dist, path: str | Path) -> dict:
    """The checkpoint at ``path``, verified, with this rank's RNG state restored (and in ``state["rng"]``)."""
    state = load_checkpoint(path, map_location="cpu")
    if "rng_per_rank" in state:
        if len(state["rng_per_rank"]) != dist.world_size:
            raise ValueError(f"checkpoint was written by {len(state['rng_per_rank'])} ranks, this run has "
                             f"{dist.world_size}")  # fmt: skip
        state["rng"] = state["rng_per_rank"][dist.rank]
    if "rng" in state:
        set_rng_state(state["rng"])
    return state


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, *, state_dict: dict | None = None) -> None:
    """``model`` (+ ``tokenizer``) as a ``from_pretrained`` directory (``state_dict``: gathered full weights)."""
    model.save_pretrained(Path(out_dir), state_dict=state_dict)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(Path(out_dir))
