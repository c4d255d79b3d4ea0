"""``--report-to`` trackers (W&B offline, Trackio's local store, an MLflow file store) through their real packages:
what each one holds, read back from its own files, equals metrics.jsonl step by step; the config went once; the
completions tables equal completions.jsonl; a resumed run leaves no step twice. Also ``--log-completions`` and
``--log-every`` on a run, and the one-line errors."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import yaml
from fusedrl.engine import cli
from fusedrl.engine.metrics import read_metrics
from fusedrl.engine.trackers import parse_report_to

PROMPTS = ["hi", "ok", "1+2", "go:", "why?", "xy"]


def _require(module: str):
    """The tracker's package; CI installs the test extra, so a missing one fails there and skips elsewhere."""
    if os.environ.get("CI") == "true":
        return __import__(module)
    return pytest.importorskip(module)


def _env(tmp_path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "TRACKIO_DIR": str(tmp_path / "trackio"), "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_PROJECT": "p", "TRACKIO_PROJECT": "p",
            "MLFLOW_EXPERIMENT_NAME": "p"}  # fmt: skip


def _train(tmp_path, out, *extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cmd = [
        sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts), "--reward-fn", "count_token",
        "--advantage-estimator", "grpo", "--prompts-per-step", "2", "--samples-per-prompt", "4",
        "--max-new-tokens", "6", "--learning-rate", "1e-2", "--kl-coef", "0.01", "--seed", "0", "--threads", "1",
        "--no-progress", "--output-dir", str(out), *extra,
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


# ----------------------------------------------------------------------------------------------------
# Reading each tracker's own files back
# ----------------------------------------------------------------------------------------------------
def _wandb_records(run_file: str) -> list:
    """The protobuf records of an offline W&B run file: a 7-byte header, then a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = open(run_file, "rb").read(), 32768
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def _wandb_read(out) -> tuple[list[dict], list[dict], dict]:
    """(history rows in order, one per step, over every segment of the run; the user config of each segment;
    completions tables by step)."""
    history, configs, tables = [], [], {}
    for run_dir in sorted(glob.glob(str(out / "wandb" / "offline-run-*"))):
        (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        config = {}
        for rec in _wandb_records(run_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update if i.key != "_wandb"})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key != "_wandb"})
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                step = int(row["_step"])
                history.append(
                    {"step": step, **{k: v for k, v in row.items() if not k.startswith(("_", "completions"))}}
                )
                if "completions/path" in row:
                    table = json.loads(open(os.path.join(run_dir, "files", row["completions/path"])).read())
                    tables[step] = [dict(zip(table["columns"], r)) for r in table["data"]]
        configs.append(config)
    return history, configs, tables


def _trackio_read(tmp_path, name):
    """(run records, metric rows, config, completions tables by step) from Trackio's store, read in a fresh
    interpreter: trackio fixes its directory (TRACKIO_DIR) when imported."""
    code = (
        "import json\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
        f"print(json.dumps([S.get_run_records('p'), S.get_logs('p', {name!r}), S.get_run_config('p', {name!r})]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=120,
                       check=True)  # fmt: skip
    runs, logs, config = json.loads(r.stdout.strip().splitlines()[-1])
    tables = {r["step"]: r["completions"]["_value"] for r in logs if "completions" in r}
    metrics = [{"step": r["step"], **{k: v for k, v in r.items() if k not in ("step", "timestamp", "completions")}}
               for r in logs if set(r) - {"step", "timestamp", "completions"}]  # fmt: skip
    return runs, metrics, config, tables


def _mlflow_read(tmp_path, run_id):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("p")
    runs = client.search_runs([exp.experiment_id])
    run = client.get_run(run_id)
    by_step: dict[int, dict] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"step": m.step})
            assert key not in by_step[m.step], f"mlflow holds step {m.step} of {key} twice"
            by_step[m.step][key] = m.value
    tables = {}
    for f in client.list_artifacts(run_id, "completions"):
        step = int(f.path.rsplit("_", 1)[1].split(".")[0])
        local = client.download_artifacts(run_id, f.path, str(tmp_path / "dl"))
        t = json.loads(open(local).read())
        tables[step] = [dict(zip(t["columns"], r)) for r in t["data"]]
    return runs, [by_step[s] for s in sorted(by_step)], run.data.params, tables


def _tensorboard_read(out):
    """(scalar rows by step, the config texts, completions tables by step) from the run's event files, as
    TensorBoard's own loader sees them (events a resumed run purged are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    by_step: dict[int, dict] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            by_step.setdefault(ev.step, {"step": ev.step})
            assert tag not in by_step[ev.step], f"tensorboard holds step {ev.step} of {tag} twice"
            by_step[ev.step][tag] = ev.value
    text = lambda tag: [(ev.step, ev.tensor_proto.string_val[0].decode()) for ev in acc.Tensors(tag)]  # noqa: E731
    tables = {step: t for step, t in text("completions/text_summary")}
    return [by_step[s] for s in sorted(by_step)], text("config/text_summary"), tables


def _finite_rows(rows):
    return [{k: v for k, v in r.items() if k == "step" or math.isfinite(v)} for r in rows]


def _same_rows(got, want, tracker, rel=1e-12):
    assert [r["step"] for r in got] == [r["step"] for r in want], tracker
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (tracker, w["step"], set(g) ^ set(w))
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=rel, abs=0), (tracker, w["step"], k, g[k], w[k])


def _same_tables(got, completions, tracker):
    want = {}
    for r in completions:
        want.setdefault(r["step"], []).append({k: v for k, v in r.items() if k != "step"})
    assert sorted(got) == sorted(want), tracker
    for step, rows in want.items():
        assert len(got[step]) == len(rows), (tracker, step)
        for g, w in zip(got[step], rows):
            g = {k: v for k, v in g.items() if k != "step"}
            assert g.keys() == w.keys(), (tracker, step, set(g) ^ set(w))
            for k, v in w.items():
                # MLflow's log_table writes its JSON through pandas, with 10 significant digits.
                same = g[k] == pytest.approx(v, rel=1e-9) if isinstance(v, float) else g[k] == v
                assert same, (tracker, step, k, g[k], v)


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trackers_hold_what_metrics_jsonl_holds_and_resume_logs_no_step_twice(tmp_path):
    for module in ("tensorboard", "wandb", "trackio", "mlflow"):
        _require(module)
    out = tmp_path / "run"
    _train(tmp_path, out, "--total-steps", "4", "--save-every", "2", "--keep-checkpoints", "0", "--report-to",
           "tensorboard,wandb,trackio,mlflow", "--log-completions", "2")  # fmt: skip
    rows = _finite_rows(read_metrics(out / "metrics.jsonl"))
    completions = read_metrics(out / "completions.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {r["step"] for r in completions} == {2, 4}
    assert len(completions) == 2 * 8 and set(completions[0]) == {"step", "prompt", "completion", "reward", "advantage",
                                                                 "length", "truncated"}  # fmt: skip
    config = yaml.safe_load((out / "config.yaml").read_text())
    ids = json.loads((out / "trackers.json").read_text())

    history, configs, tables = _wandb_read(out)
    _same_rows(history, rows, "wandb")
    assert configs == [config]
    _same_tables(tables, completions, "wandb")
    runs, metrics, tconfig, ttables = _trackio_read(tmp_path, ids["trackio"])
    assert len(runs) == 1 and ids["trackio"] == "run"
    _same_rows(metrics, rows, "trackio")
    assert {k: v for k, v in tconfig.items() if not k.startswith("_")} == config
    _same_tables(ttables, completions, "trackio")
    mruns, mmetrics, params, mtables = _mlflow_read(tmp_path, ids["mlflow"])
    assert len(mruns) == 1
    _same_rows(mmetrics, rows, "mlflow")
    assert params == {k: str(v) for k, v in config.items()}
    _same_tables(mtables, completions, "mlflow")
    tb_rows, tb_config, tb_tables = _tensorboard_read(out)
    _same_rows(tb_rows, rows, "tensorboard", rel=1e-6)  # TensorBoard keeps float32 scalars
    assert [step for step, _ in tb_config] == [0] and json.loads(tb_config[0][1].strip("`\n")) == config
    assert sorted(tb_tables) == [2, 4] and all(c["completion"].replace("|", "\\|") in tb_tables[c["step"]]
                                                 for c in completions if "\n" not in c["completion"])  # fmt: skip

    # A crash after step 4, whose last checkpoint is step 2: the resumed run computes steps 3 and 4 again. The
    # trackers keep what they got first for those and receive only 5 and 6; the config goes nowhere again.
    shutil.rmtree(out / "ckpt-4")
    _train(tmp_path, out, "--total-steps", "6", "--save-every", "2", "--report-to", "tensorboard,wandb,trackio,mlflow",
           "--log-completions", "2", "--resume")  # fmt: skip
    resumed = _finite_rows(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    expected = rows + resumed[4:]  # the first run's 1-4, the resumed run's 5-6
    history, configs, tables = _wandb_read(out)
    _same_rows(history, expected, "wandb resumed")
    assert configs == [config, {}]  # the second segment of the same W&B run carries no config
    assert json.loads((out / "trackers.json").read_text()) == ids
    runs, metrics, _, ttables = _trackio_read(tmp_path, ids["trackio"])
    assert len(runs) == 1
    _same_rows(metrics, expected, "trackio resumed")
    mruns, mmetrics, params, _ = _mlflow_read(tmp_path, ids["mlflow"])
    assert len(mruns) == 1 and params == {k: str(v) for k, v in config.items()}
    _same_rows(mmetrics, expected, "mlflow resumed")
    assert sorted(ttables) == sorted(tables) == [2, 4, 6]
    # TensorBoard drops what the first run logged after step 2 and holds the resumed run's steps 3-6.
    tb_rows, tb_config, tb_tables = _tensorboard_read(out)
    _same_rows(tb_rows, resumed, "tensorboard resumed", rel=1e-6)
    assert [step for step, _ in tb_config] == [0] and sorted(tb_tables) == [2, 4, 6]


def test_report_to_values_and_missing_extras_are_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    assert parse_report_to("none") == () and parse_report_to(" wandb, mlflow,wandb ") == ("wandb", "mlflow")
    with pytest.raises(ValueError, match="unknown tracker 'comet'; expected none or a comma-separated list"):
        parse_report_to("wandb,comet")
    with pytest.raises(SystemExit) as e:
        cli.parse_train_args(["--report-to", "comet"])
    assert e.value.code == 2 and "RunConfig.report_to: unknown tracker 'comet'" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("ab\ncd\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SystemExit, match=r"^fusedrl train: --report-to mlflow needs the mlflow package: pip install "
                                         r"'fusedrl\[mlflow\]'$"):  # fmt: skip
        cli.main(["train", "--prompts", str(tmp_path / "p.txt"), "--reward-fn", "count_token", "--report-to",
                  "trackio,mlflow", "--output-dir", str(tmp_path / "o")])  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_log_every_prints_a_line_per_n_steps_when_not_a_terminal(tmp_path):
    code = (
        "import sys\nfrom fusedrl.engine.metrics import MetricsLogger\n"
        f"with MetricsLogger({str(tmp_path / 'm.jsonl')!r}, total_steps=7, log_every=3) as log:\n"
        "    for s in range(1, 8):\n        log.log(s, {'rollout/reward_mean': s / 2, 'objective/kl': 0.5})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    lines = r.stderr.strip().splitlines()
    assert lines == ["step 3/7  reward 1.5  kl 0.5", "step 6/7  reward 3  kl 0.5", "step 7/7  reward 3.5  kl 0.5"], (
        r.stderr
    )
    assert [row["step"] for row in read_metrics(tmp_path / "m.jsonl")] == list(range(1, 8))


def test_each_reward_functions_part_reaches_metrics_and_completions(tmp_path):
    """A combined reward: every function's part is a metric (their means add up to the reward's) and a column of
    the completions rows (adding up to each row's reward); completions.jsonl holds the sampled steps only."""
    import torch
    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.rewards import combine, count_token, target_length
    from fusedrl.engine.tokenizer import build_char_tokenizer
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer

    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    reward = combine(count_token, (0.5, target_length), (2.0, count_token))
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=3, max_new_tokens=6, advantage_estimator="grpo",
                    total_steps=3, log_completions=2, progress=False, rollout_backend="hf",
                    output_dir=str(tmp_path / "run"))  # fmt: skip
    trainer = PPOTrainer(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0), tok, reward, cfg)
    rows = trainer.train(PROMPTS)
    parts = ("count_token_1", "target_length", "count_token_2")
    for row in rows:
        assert sum(row[f"rollout/reward/{p}"] for p in parts) == pytest.approx(row["rollout/reward_mean"])
        assert row["rollout/reward/count_token_2"] == pytest.approx(2 * row["rollout/reward/count_token_1"])
    completions = read_metrics(tmp_path / "run" / "completions.jsonl")
    assert [c["step"] for c in completions] == [2] * 6
    for c in completions:
        assert sum(c[f"reward/{p}"] for p in parts) == pytest.approx(c["reward"])
        assert c["reward/target_length"] == pytest.approx(-0.5 * abs(len(c["completion"]) - 8))
        assert c["length"] >= 1 and isinstance(c["truncated"], bool) and c["prompt"] in PROMPTS
    # Sampled rows are the first sequences: whole groups of one prompt, in rollout order.
    assert len({c["prompt"] for c in completions[:3]}) == 1 and len({c["prompt"] for c in completions[3:]}) == 1


def test_a_tracker_added_on_resume_gets_the_earlier_rows_first(tmp_path, monkeypatch):
    """MetricsLogger alone: a run reports to W&B, crashes after step 4 with its checkpoint at 2, and resumes reporting
    to W&B and MLflow. W&B keeps steps 1-4 as first sent and gets 5-6; MLflow, new, gets 1-2 (and the step-2 table)
    replayed from the files, then 3-6: exactly what metrics.jsonl holds."""
    _require("wandb"), _require("mlflow")
    from fusedrl.engine.metrics import MetricsLogger

    for k, v in _env(tmp_path).items():
        if k.startswith(("WANDB", "MLFLOW")):
            monkeypatch.setenv(k, v)
    path, config = tmp_path / "run" / "metrics.jsonl", {"lr": 0.1, "name": "x"}
    with MetricsLogger(path, progress=False, report_to="wandb", run_config=config) as log:
        for s in range(1, 5):
            log.log(s, {"loss": s / 3, "kl": float("nan") if s == 3 else s / 7})
            if s % 2 == 0:
                log.log_completions(s, [{"prompt": "p", "completion": f"c{s}", "reward": float(s)}])
    first = _finite_rows(read_metrics(path))
    with MetricsLogger(path, progress=False, report_to="wandb,mlflow", run_config=config, resume_step=2) as log:
        for s in range(3, 7):
            log.log(s, {"loss": s / 5, "kl": s / 11})
            if s % 2 == 0:
                log.log_completions(s, [{"prompt": "p", "completion": f"d{s}", "reward": float(s)}])
    rows = _finite_rows(read_metrics(path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[2]["loss"] == 3 / 5
    history, configs, _ = _wandb_read(tmp_path / "run")
    _same_rows(history, first + rows[4:], "wandb")
    assert configs == [config, {}]
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    _, mrows, params, tables = _mlflow_read(tmp_path, ids["mlflow"])
    _same_rows(mrows, rows, "mlflow")
    assert params == {"lr": "0.1", "name": "x"}
    assert {s: [r["completion"] for r in t] for s, t in tables.items()} == {2: ["c2"], 4: ["d4"], 6: ["d6"]}


def test_dpo_and_demo_take_report_to(tmp_path, monkeypatch):
    import importlib.util

    from fusedrl.engine import demo, dpo

    with pytest.raises(ValueError, match="DemoConfig.report_to: unknown tracker 'comet'"):
        demo.DemoConfig(report_to="comet")
    assert dpo.DPOConfig(report_to="trackio,mlflow", log_every=5).report_to == "trackio,mlflow"
    assert demo.parse_args(["--report-to", "wandb", "--log-completions", "3"])[0].log_completions == 3
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match=r"^fusedrl dpo: --report-to wandb needs the wandb package: pip install "
                                         r"'fusedrl\[wandb\]'$"):  # fmt: skip
        dpo.main(["--data", str(tmp_path / "pairs.jsonl"), "--report-to", "wandb", "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"^fusedrl demo: --report-to wandb needs the wandb package"):
        demo.parse_args(["--report-to", "wandb"])
    assert not (tmp_path / "o").exists()


def test_completions_are_bounded(tmp_path, monkeypatch):
    """At most COMPLETIONS_PER_LOG rows per logged step, texts cut at COMPLETION_TEXT_CHARS, and a file that stops
    growing at COMPLETIONS_MAX_BYTES with one warning."""
    import warnings

    from fusedrl.engine import metrics

    n = metrics.COMPLETIONS_PER_LOG + 5
    rows = metrics.completion_rows(["p" * 5000] * n, ["c"] * n, rewards=[1.0] * n, advantages=[0.5] * n,
                                   lengths=[3] * n, truncated=[False] * n)  # fmt: skip
    assert len(rows) == metrics.COMPLETIONS_PER_LOG
    assert rows[0]["prompt"] == "p" * metrics.COMPLETION_TEXT_CHARS + "..." and rows[0]["completion"] == "c"
    monkeypatch.setattr(metrics, "COMPLETIONS_MAX_BYTES", 3000)
    with metrics.MetricsLogger(tmp_path / "metrics.jsonl", progress=False) as log:
        log.log_completions(1, rows[:1])  # ~2100 bytes: fits
        with pytest.warns(RuntimeWarning, match="reached 0 MiB: later completions go to the trackers only"):
            log.log_completions(2, rows[:1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            log.log_completions(3, rows[:1])
    assert [r["step"] for r in read_metrics(tmp_path / "completions.jsonl")] == [1]
