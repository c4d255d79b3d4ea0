"""Experiment trackers behind ``--report-to``: TensorBoard, Weights & Biases, Trackio, MLflow.

Every tracker gets the same three things from ``MetricsLogger``: the run's config once (when its tracker run is
created), every metrics row (``step`` plus float values; non-finite values stay in metrics.jsonl only, as a chart
cannot draw them), and the completions tables (``--log-completions``) in its own table type. Each talks to its own
library, an optional extra (``pip install 'fusedrl[wandb]'``), imported only when asked for, and each works with no
network: ``WANDB_MODE=offline`` (files under ``<run>/wandb``, ``wandb sync`` uploads them later), Trackio's local
store (``TRACKIO_DIR``, by default ``~/.cache/huggingface/trackio``), an MLflow tracking URI of a local store
(``MLFLOW_TRACKING_URI=sqlite:///mlflow.db`` or a ``file:`` directory). Project and experiment names come from the
libraries' own variables (``WANDB_PROJECT``, ``TRACKIO_PROJECT``, ``MLFLOW_EXPERIMENT_NAME``), ``fusedrl`` when unset;
the tracker run is named after the output directory.

Resuming: ``<run>/trackers.json`` holds each tracker's run id, so a resumed run continues the same tracker run and
sends its config no second time. Steps that the interrupted run logged after its last checkpoint are computed again
by the resumed run; TensorBoard drops its events from that step on (``purge_step``) and receives them again, the
others keep what they received first and get only the steps after it (they cannot rewind), so no tracker holds a
step twice. A tracker that only the resumed run reports to starts its own run and first gets the rows (and tables)
up to the checkpoint.

This module imports no tracker (nor torch) at import time: the configs validate ``report_to`` with it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
"""The values ``report_to`` accepts besides ``none`` (several comma-separated)."""
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
STATE_FILE = "trackers.json"  # in the run directory: each tracker's run id, for --resume


def parse_report_to(spec: str) -> tuple[str, ...]:
    """``"wandb,mlflow"`` -> ``("wandb", "mlflow")``; ``"none"`` or ``""`` -> ``()``. ValueError naming the bad name."""
    if not isinstance(spec, str):
        raise ValueError(f"report_to must be a string such as 'wandb,mlflow', got {spec!r}")
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if names == ["none"] or not names:
        return ()
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; expected none or a comma-separated list of "
                             f"{', '.join(TRACKERS)}")  # fmt: skip
    return tuple(dict.fromkeys(names))  # in order, once each


def check_installed(names) -> None:
    """ImportError naming the extra of the first tracker in ``names`` whose package is not installed."""
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ImportError(f"--report-to {name} needs the {_MODULES[name]} package: pip install 'fusedrl[{name}]'")


def _finite(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and math.isfinite(v)}


def _columns(rows: list[dict]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def _cell(v):
    """A table cell: numbers and strings as they are, anything else (a dict of reward parts, turns) as JSON."""
    return v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v)


class TensorBoardTracker:
    """``SummaryWriter`` under ``<run>/tensorboard``; the config as a text summary; tables as markdown text."""

    rewinds = True  # purge_step drops the events a crashed run logged after its checkpoint

    def __init__(self, log_dir: Path, *, config: dict | None, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        if config is not None:
            self._w.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", global_step=0)

    def log(self, step: int, row: dict) -> None:
        for k, v in _finite(row).items():
            self._w.add_scalar(k, v, global_step=step)

    def log_table(self, step: int, key: str, rows: list[dict]) -> None:
        cols = _columns(rows)
        esc = lambda v: str(_cell(v)).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(esc(r.get(c)) for c in cols) + " |" for r in rows]
        self._w.add_text(key, "\n".join(lines), global_step=step)

    def close(self) -> None:
        self._w.close()


class WandbTracker:
    """A W&B run with its files under ``<run>/wandb`` (``WANDB_MODE=offline`` keeps everything there)."""

    rewinds = False

    def __init__(self, run_dir: Path, name: str, *, config: dict | None, run_id: str | None):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fusedrl"), name=name, dir=str(run_dir),
                               config=config, id=run_id, resume="allow" if run_id else None,
                               settings=wandb.Settings(silent=True))  # fmt: skip
        self.run_id = self._run.id

    def log(self, step: int, row: dict) -> None:
        self._run.log(_finite(row), step=step)

    def log_table(self, step: int, key: str, rows: list[dict]) -> None:
        cols = _columns(rows)
        table = self._wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in rows])
        self._run.log({key: table}, step=step)

    def close(self) -> None:
        self._run.finish()


class TrackioTracker:
    """A Trackio run in its local store (``TRACKIO_DIR``); no system metrics are sampled on the side."""

    rewinds = False

    def __init__(self, name: str, *, config: dict | None, run_id: str | None):
        import trackio

        self._trackio = trackio
        self._run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fusedrl"), name=run_id or name,
                                 config=config, resume="must" if run_id else "never", embed=False,
                                 auto_log_cpu=False, auto_log_gpu=False)  # fmt: skip
        self.run_id = self._run.name

    def log(self, step: int, row: dict) -> None:
        self._run.log(_finite(row), step=step)

    def log_table(self, step: int, key: str, rows: list[dict]) -> None:
        cols = _columns(rows)
        self._run.log({key: self._trackio.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in rows])},
                      step=step)  # fmt: skip

    def close(self) -> None:
        self._run.finish()


class MLflowTracker:
    """An MLflow run at the tracking URI MLflow resolves (``MLFLOW_TRACKING_URI``); the config as parameters, each
    completions table as a JSON artifact ``completions/step_<step>.json`` (MLflow's ``log_table``)."""

    rewinds = False
    _MAX_BATCH = 100  # MLflow's limit of params (and of metrics: 1000) per log_batch call

    def __init__(self, name: str, *, config: dict | None, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient()
        if run_id is None:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fusedrl")
            exp = client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
            run_id = client.create_run(exp_id, run_name=name).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        if config is not None:
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in config.items()]
            for i in range(0, len(params), self._MAX_BATCH):
                client.log_batch(run_id, params=params[i : i + self._MAX_BATCH])

    def log(self, step: int, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in _finite(row).items()])

    def log_table(self, step: int, key: str, rows: list[dict]) -> None:
        cols = _columns(rows)
        data = {c: [_cell(r.get(c)) for r in rows] for c in cols}
        self._client.log_table(self.run_id, data=data, artifact_file=f"{key}/step_{step:08d}.json")

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def open_trackers(names, run_dir: str | os.PathLike, *, config: dict | None, resume_step: int | None,
                  tensorboard_dir: str | os.PathLike | None = None) -> list:  # fmt: skip
    """The trackers ``names`` for the run in ``run_dir``: new tracker runs (given ``config``) when ``resume_step`` is
    None, else the ones ``<run_dir>/trackers.json`` names (config not sent again; a tracker the file does not name
    starts a run of its own). Writes the file. ImportError naming the extra when a package is missing."""
    names = tuple(names)
    check_installed(names)
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    saved = json.loads(state_path.read_text()) if resume_step is not None and state_path.is_file() else {}
    name = run_dir.resolve().name
    out, ids = [], dict(saved)
    try:
        for tracker in names:
            rid = saved.get(tracker)
            cfg = config if rid is None else None
            if tracker == "tensorboard":
                log_dir = Path(tensorboard_dir) if tensorboard_dir is not None else run_dir / "tensorboard"
                # Its files are the run's own: a resumed run continues them whatever trackers.json says.
                t = TensorBoardTracker(log_dir, config=config if resume_step is None else None, resume_step=resume_step)
            elif tracker == "wandb":
                t = WandbTracker(run_dir, name, config=cfg, run_id=rid)
            elif tracker == "trackio":
                t = TrackioTracker(name, config=cfg, run_id=rid)
            else:
                t = MLflowTracker(name, config=cfg, run_id=rid)
            t.fresh = resume_step is None or rid is None  # a tracker run of its own, not a continued one
            out.append(t)
            if tracker != "tensorboard":
                ids[tracker] = t.run_id
    except BaseException:
        for t in out:
            t.close()
        raise
    if ids:
        tmp = state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ids, indent=2) + "\n")
        os.replace(tmp, state_path)
    return out
