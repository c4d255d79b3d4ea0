"""Per-step metrics: one JSON object per line (``metrics.jsonl``), the experiment trackers of ``--report-to``
(``trackers.py``), sampled rollouts (``completions.jsonl``), a console progress bar or summary line. Keys are namespaced (``rollout/reward_mean``, ``policy/clipfrac``, ``perf/tokens_per_s``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Shown in the progress bar's postfix and the --log-every line when present, in this order.
_BAR_KEYS = (("rollout/reward_mean", "reward"), ("objective/kl", "kl"), ("loss/policy", "pi_loss"), ("loss", "loss"),
             ("rewards/accuracies", "acc"), ("perf/step_s", "s/step"))  # fmt: skip


def _to_float(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        return float(v.item())
    if isinstance(v, (np.generic, np.ndarray)):
        return float(np.asarray(v).reshape(()))
    if isinstance(v, (int, float, bool)):
        return float(v)
    raise TypeError(f"metric {name!r} must be a number or a scalar tensor, got {type(v).__name__}")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every row of a metrics JSONL file, in order.

    A last line that is not a JSON object is what a crash in the middle of a write leaves: it is dropped with a
    warning (a resumed run logs that step again). A bad line anywhere else is a ``ValueError`` naming it."""
    import warnings

    rows, bad = [], None  # bad: (line number, error) of a line that is fatal unless no row follows it
    # errors="replace": a torn multi-byte character or a garbage tail becomes an unparsable line, not a crash.
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if bad is not None:
                raise ValueError(f"metrics file {str(path)!r}: line {bad[0]} is not a JSON object ({bad[1]}); only "
                                 f"a torn last line (a crash mid-write) is dropped")  # fmt: skip
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad = (number, e)
                continue
            if not isinstance(row, dict):
                bad = (number, f"got {type(row).__name__}")
                continue
            rows.append(row)
    if bad is not None:
        warnings.warn(f"metrics file {str(path)!r}: dropping its torn last line {bad[0]} ({bad[1]}), the trace of "
                      f"a crash mid-write", stacklevel=2)  # fmt: skip
    return rows


class MetricsLogger:
    """Append metrics rows to ``path`` (JSONL), send them to the experiment trackers, show progress.

    ``report_to``: tracker names (``fusedrl.engine.trackers``: tensorboard, wandb, trackio, mlflow), each given
    ``run_config`` once, every row and every completions table; ``tensorboard_dir`` adds TensorBoard there.
    ``resume_step``: rows with ``step > resume_step`` are dropped from an existing file (and from completions.jsonl)
    first, because a run that crashed after its last checkpoint logged steps that the resumed run will log again;
    the trackers that cannot rewind get only the steps after the last one the crashed run sent them, and one that
    the resumed run adds gets the rows up to the checkpoint first.
    ``progress``: a progress bar on a terminal; where stderr is not a terminal and ``log_every`` > 0, one summary
    line every ``log_every`` steps instead. ``enabled=False`` (non-zero ranks) makes every method a no-op."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        tensorboard_dir: str | os.PathLike | None = None,
        progress: bool = True,
        total_steps: int | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
        report_to: str | tuple[str, ...] = (),
        run_config: dict | None = None,
        log_every: int = 0,
    ):
        from .trackers import open_trackers, parse_report_to

        self.enabled = enabled
        self.path = Path(path) if path is not None else None
        self.total_steps = total_steps
        self.log_every = log_every
        self._file = None
        self._completions = None
        self._completions_bytes = 0
        self._trackers = []
        self._bar = None
        self._sent: dict[int, int] = {}  # id(tracker) -> the last step it already holds
        if not enabled:
            return
        names = parse_report_to(report_to) if isinstance(report_to, str) else tuple(report_to)
        if tensorboard_dir is not None and "tensorboard" not in names:
            names += ("tensorboard",)
        if names and self.path is None:
            raise ValueError(f"report_to={','.join(names)!r} needs a run directory (the metrics path is None)")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            logged = -1  # the last step the interrupted run sent its trackers
            if resume_step is not None and self.path.exists():
                logged = max((r.get("step", -1) for r in read_metrics(self.path)), default=-1)
            self._file = _open_truncated(self.path, resume_step)
            self._completions_path = self.path.parent / COMPLETIONS_FILE
            if resume_step is not None or self._completions_path.exists():
                self._completions = _open_truncated(self._completions_path, resume_step)
                self._completions_bytes = self._completions.tell()
            self._trackers = open_trackers(names, self.path.parent, config=run_config, resume_step=resume_step,
                                           tensorboard_dir=tensorboard_dir)  # fmt: skip
            for t in self._trackers:
                self._sent[id(t)] = -1 if t.rewinds else logged
                if resume_step is not None and t.fresh and not t.rewinds:
                    self._replay(t, resume_step)
        self._lines = log_every > 0 and not sys.stderr.isatty()
        if progress and not self._lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, desc="train", unit="step", dynamic_ncols=True)

    def _replay(self, tracker, resume_step: int) -> None:
        """A tracker a resumed run adds gets the rows and tables the run already has, up to its checkpoint."""
        for row in read_metrics(self.path):
            tracker.log(row["step"], row)
        tables: dict[int, list] = {}
        if self._completions_path.exists():
            for r in read_metrics(self._completions_path):
                tables.setdefault(r["step"], []).append(r)
        for step, rows in tables.items():
            tracker.log_table(step, "completions", rows)
        self._sent[id(tracker)] = resume_step

    def log(self, step: int, metrics: dict) -> dict:
        """Write one row ``{"step": step, **metrics}`` (values as floats) and advance the progress bar."""
        row = {"step": int(step)}
        row.update({k: _to_float(k, v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        for t in self._trackers:
            if step > self._sent[id(t)]:
                t.log(step, row)
        if self._bar is not None:
            self._bar.set_postfix({short: f"{row[k]:.4g}" for k, short in _BAR_KEYS if k in row}, refresh=False)
            self._bar.update(1)
        if self._lines and (step % self.log_every == 0 or step == self.total_steps):
            total = f"/{self.total_steps}" if self.total_steps else ""
            parts = [f"{short} {row[k]:.4g}" for k, short in _BAR_KEYS if k in row]
            print(f"step {step}{total}  " + "  ".join(parts), file=sys.stderr, flush=True)
        return row

    def log_completions(self, step: int, rows: list[dict]) -> None:
        """Append ``rows`` (one rollout each: prompt, completion, reward, ...) to completions.jsonl, each with its
        step, and send them to the trackers as one table. The file stops growing at ``COMPLETIONS_MAX_BYTES`` (one
        warning; the trackers still get the tables)."""
        if not self.enabled or self.path is None or not rows:
            return
        rows = [{"step": int(step), **r} for r in rows]
        if self._completions is None:
            self._completions = open(self._completions_path, "a")
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if self._completions_bytes + len(text) <= COMPLETIONS_MAX_BYTES:
            self._completions.write(text)
            self._completions.flush()
        elif self._completions_bytes <= COMPLETIONS_MAX_BYTES:
            import warnings

            warnings.warn(f"{self._completions_path} reached {COMPLETIONS_MAX_BYTES >> 20} MiB: later completions "
                          "go to the trackers only", RuntimeWarning, stacklevel=2)  # fmt: skip
        self._completions_bytes += len(text)
        for t in self._trackers:
            if step > self._sent[id(t)]:
                t.log_table(step, "completions", rows)

    def close(self) -> None:
        for f in (self._file, self._completions):
            if f is not None:
                f.close()
        self._file = self._completions = None
        trackers, self._trackers = self._trackers, []
        for t in trackers:
            t.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


COMPLETIONS_FILE = "completions.jsonl"
COMPLETIONS_MAX_BYTES = 64 << 20  # completions.jsonl stops growing here
COMPLETION_TEXT_CHARS = 2000  # a prompt or completion longer than this is cut in completions.jsonl and the tables


COMPLETIONS_PER_LOG = 16  # rollouts per logged step: the first ones, so whole groups of one prompt show together


def completion_rows(prompts, completions, *, rewards, advantages, lengths, truncated, reward_parts=None,
                    limit: int = COMPLETIONS_PER_LOG) -> list[dict]:  # fmt: skip
    """The first ``limit`` rollouts as rows for ``MetricsLogger.log_completions``: prompt and completion (cut at
    ``COMPLETION_TEXT_CHARS``), reward, each reward function's part (``reward_parts``: name -> per-rollout values),
    advantage (the mean over the response tokens), length in tokens, truncated (no stop token by the length limit).
    Tensors and arrays are read once here (a host sync on the step that logs)."""
    as_list = lambda x: np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x).tolist()  # noqa: E731
    n = min(limit, len(completions))
    rewards, advantages, lengths = (as_list(x)[:n] for x in (rewards, advantages, lengths))
    parts = {k: as_list(v)[:n] for k, v in (reward_parts or {}).items()}
    cut = lambda text: text if len(text) <= COMPLETION_TEXT_CHARS else text[:COMPLETION_TEXT_CHARS] + "..."  # noqa: E731
    rows = []
    for i in range(n):
        row = {"prompt": cut(str(prompts[i])), "completion": cut(str(completions[i])), "reward": float(rewards[i])}
        row.update({f"reward/{k}": float(v[i]) for k, v in parts.items()})
        row.update(advantage=float(advantages[i]), length=int(lengths[i]), truncated=bool(truncated[i]))
        rows.append(row)
    return rows


def _open_truncated(path: Path, resume_step: int | None):
    """``path`` opened for appending: emptied for a new run; for a resumed one without its rows after
    ``resume_step`` (written atomically)."""
    if resume_step is None:
        path.write_text("")
    elif path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", -1) <= resume_step]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return open(path, "a")


# ----------------------------------------------------------------------------------------------------
# Step timing and update statistics
# ----------------------------------------------------------------------------------------------------
def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process since the last ``reset_peak_memory`` (or its start): CUDA's allocator peak
    (bytes allocated through torch) on a GPU; on the CPU the resident-set high-water mark (every byte the
    process holds, Python and libraries included: a coarse view, since torch keeps no CPU allocator counters
    outside its profiler), Linux's VmHWM or, where /proc is missing, ``ru_maxrss``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    # ru_maxrss: kilobytes on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def reset_peak_memory(device: torch.device) -> None:
    """Restart ``peak_memory_gb`` from what is held now: CUDA's peak counter, or on Linux the resident-set
    high-water mark (writing 5 to /proc/self/clear_refs); a no-op where neither exists."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class PhaseTimer:
    """Wall time and peak memory (``peak_memory_gb``, restarted at every phase) per phase of a step; on CUDA
    each lap synchronises so the time lands in its phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self.peaks_gb: dict[str, float] = {}
        reset_peak_memory(device)
        self.t0 = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: once per phase, for honest phase times
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.peaks_gb[name] = peak_memory_gb(self.device)
        reset_peak_memory(self.device)
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.t0

    @property
    def peak_gb(self) -> float:
        """The step's peak: the largest phase peak."""
        return max(self.peaks_gb.values(), default=0.0)


class UpdateStats:
    """Accumulates update metrics without a host sync per micro-batch: device tensors (or floats) are
    summed, token-weighted or maxed as they come and read once, in ``result``, reduced over ranks by ``dist``
    (a ``fusedrl.engine.distributed.Distributed``)."""

    def __init__(self, dist):
        self.dist = dist
        self.sum: dict = {}
        self.wsum: dict = {}
        self.maxes: dict = {}
        self.steps = 0

    def add(self, k, v):
        self.sum[k] = self.sum.get(k, 0.0) + v

    def add_weighted(self, k, v, w: float):
        s, n = self.wsum.get(k, (0.0, 0.0))
        self.wsum[k] = (s + v * w, n + w)

    def max(self, k, v):
        self.maxes[k] = v if k not in self.maxes else torch.maximum(torch.as_tensor(self.maxes[k]), v)

    def count_optimizer_step(self):
        self.steps += 1

    def result(self) -> dict[str, float]:
        dist, out = self.dist, {}
        n = max(self.steps, 1)
        for k, v in self.sum.items():
            # Losses: each optimizer step's rank-local sum of micro-batch losses is its share of the
            # global loss; summed over ranks it is the full mini-batch loss, averaged over optimizer steps.
            v = float(v)  # host sync: once per metric per step
            out[k] = (dist.sum(v) if k.startswith("loss/") else v) / n
        for k, (s, w) in self.wsum.items():
            out[k] = dist.sum(float(s)) / max(dist.sum(float(w)), 1e-12)
        for k, v in self.maxes.items():
            out[k] = dist.max(float(v))
        return out


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var = returns.var(unbiased=False)
    if var <= 0:
        return math.nan
    return float(1.0 - (returns - values).var(unbiased=False) / var)
