"""SFT -> reward model -> PPO as a user runs it: `fusedrl sft`, `fusedrl rm` and `fusedrl train --reward-model` in
subprocesses on the shipped examples/pipeline data with the tiny preset, asserted on what each wrote: metrics, the
held-out pairwise accuracy, the saved directories loading with from_pretrained, and the PPO policy writing bigger
digits than the SFT policy (the preference the comparisons encode). Then resume, refusals and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts fusedrl in a subprocess

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "pipeline"
TIMEOUT_S = 300  # generous: CI machines are shared; each command takes seconds on 2 idle cores
# The README's commands, shortened (a repeated flag's last value wins): seconds each instead of ~20.
SHORTER = {"sft": ["--epochs", "4", "--save-every", "10"], "rm": ["--epochs", "5"], "train": ["--total-steps", "12"]}


def readme_pipeline() -> dict[str, list[str]]:
    """The README's pipeline commands (bench/readme_numbers.py reads them for the README's numbers), shortened."""
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "bench" / "readme_numbers.py")
    readme_numbers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_numbers)
    return {cmd: [*argv, *SHORTER[cmd], "--no-progress"] for cmd, argv in readme_numbers.pipeline_commands().items()}


PIPELINE = readme_pipeline()
SFT = PIPELINE["sft"]


def fusedrl(args: list[str], cwd: Path, *, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)  # fmt: skip
    if ok:
        assert proc.returncode == 0, f"fusedrl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    fusedrl(SFT, work)
    fusedrl(PIPELINE["rm"], work)  # from the SFT policy, with a fresh score head, as in the seeds' pipeline
    ppo = fusedrl(PIPELINE["train"], work)
    return work, ppo


def test_sft_learns_the_demonstrations(pipeline):
    work, _ = pipeline
    rows = metrics(work / "runs/sft/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))  # 4 epochs of ceil(180 / 32) steps
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # from ~ln(54) towards the entropy of random digits
    assert "eval/loss" in rows[-1] and rows[-1]["eval/loss"] < 2.8
    assert sorted(p.name for p in (work / "runs/sft").glob("ckpt-*")) == ["ckpt-20", "ckpt-24"]


def test_rm_ranks_held_out_pairs_and_loads_as_fusedrl_train_loads_it(pipeline):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    work, _ = pipeline
    last = metrics(work / "runs/rm/metrics.jsonl")[-1]
    assert last["eval/accuracy"] >= 0.75, last  # 60 held-out pairs; chance is 0.5
    rm = AutoModelForSequenceClassification.from_pretrained(work / "runs/rm/reward_model")
    tok = AutoTokenizer.from_pretrained(work / "runs/rm/reward_model")
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])  # noqa: E731
    with torch.no_grad():
        assert rm(ids("123:9898")).logits.item() > rm(ids("123:1010")).logits.item()


def test_ppo_against_the_learned_reward_model_writes_bigger_digits(pipeline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, ppo = pipeline
    rows = metrics(work / "runs/ppo/metrics.jsonl")
    assert len(rows) == 12
    first, last = (sum(r["rollout/reward_mean"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert last > first + 1.0, (first, last)
    tok = AutoTokenizer.from_pretrained(work / "runs/ppo/policy")
    prompts = [json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").read_text().splitlines()][:32]

    def mean_digit(policy_dir: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(policy_dir)
        torch.manual_seed(0)
        digits = []
        for p in prompts:
            x = torch.tensor([tok(p)["input_ids"]])
            y = model.generate(x, max_new_tokens=8, do_sample=True, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)[0, x.shape[1] :]  # fmt: skip
            digits += [int(c) for c in tok.decode(y, skip_special_tokens=True) if c.isdigit()]
        return sum(digits) / max(1, len(digits))

    # The comparisons prefer bigger digits; random demonstrations average 4.5.
    assert mean_digit(work / "runs/ppo/policy") > mean_digit(work / "runs/sft/policy") + 1.0


def test_resume_continues_a_longer_run_and_a_run_dir_is_never_mixed(pipeline, tmp_path):
    work, _ = pipeline
    shutil.copytree(work / "runs/sft", tmp_path / "runs/sft")
    (tmp_path / "runs/sft/ckpt-24").rename(tmp_path / "runs/sft/gone")  # as if killed after step 20's checkpoint
    (tmp_path / "runs/sft/latest").write_text("ckpt-20")
    shutil.rmtree(tmp_path / "runs/sft/gone")
    refused = fusedrl(SFT, tmp_path, ok=False)
    assert refused.returncode != 0 and "already holds a run" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    fusedrl([*SFT, "--epochs", "5", "--resume"], tmp_path)  # 30 steps
    rows = metrics(tmp_path / "runs/sft/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    before = metrics(work / "runs/sft/metrics.jsonl")
    # Steps 1-20 are the original run's rows; step 21 onwards continues from its checkpoint (a longer cosine
    # schedule from there on, so the numbers differ from the 24-step run's).
    assert rows[:20] == before[:20]


@pytest.mark.parametrize("command, record, message", [
    ("sft", {"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]},
     "no chat template"),
    ("rm", {"prompt": "1:", "chosen": "", "rejected": "3"}, "'chosen' is empty"),
])  # fmt: skip
def test_a_bad_record_is_one_line_naming_file_and_line(tmp_path, command, record, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1:", "completion": "2", "chosen": "2", "rejected": "3"}) + "\n"
                    + json.dumps(record) + "\n")  # fmt: skip
    proc = fusedrl([command, "--data", str(data), "--no-progress"], tmp_path, ok=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fusedrl {command}: {data}:2: ") and message in lines[0], lines
    assert not (tmp_path / "runs" / command / "metrics.jsonl").exists()


def test_sft_on_chat_messages_from_parquet_with_a_model_directory(tmp_path):
    """A saved model whose tokenizer has a chat template, {"messages"} records in Parquet, --eval-data JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }};{% endfor %}"
                         "{% if add_generation_prompt %}a: {% endif %}")  # fmt: skip
    build_causal_lm("tiny-llama", vocab_size=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    chat = lambda i: {"messages": [{"role": "user", "content": f"{i}+1"},  # noqa: E731
                                   {"role": "assistant", "content": str(i + 1)}]}  # fmt: skip
    pq.write_table(pa.Table.from_pylist([chat(i) for i in range(40)]), tmp_path / "chat.parquet")
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(40, 48)))
    proc = fusedrl(["sft", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "chat.parquet"), "--eval-data",
                    str(tmp_path / "held.jsonl"), "--epochs", "2", "--batch-size", "8", "--learning-rate", "3e-3",
                    "--log-every", "5", "--output-dir", "out"], tmp_path)  # fmt: skip
    assert "40 demonstrations" in proc.stderr and "8 held out" in proc.stderr
    assert "step 5/10" in proc.stderr and "step 10/10" in proc.stderr  # --log-every: stderr is no terminal here
    rows = metrics(tmp_path / "out/metrics.jsonl")
    assert len(rows) == 10 and math.isfinite(rows[-1]["eval/loss"]) and rows[-1]["loss"] < rows[0]["loss"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out/policy").chat_template == tok.chat_template


def test_rm_reports_to_tensorboard(tmp_path):
    """--report-to reaches the trackers as for fusedrl train and fusedrl dpo (each tracker is tested in test_trackers.py)."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("tensorboard")
    proc = fusedrl(["rm", "--data", str(DATA / "pairs.jsonl"), "--epochs", "1", "--batch-size", "100",
                    "--report-to", "tensorboard", "--no-progress", "--output-dir", "out"], tmp_path)  # fmt: skip
    assert list((tmp_path / "out/tensorboard").glob("events.out.tfevents.*")), proc.stderr
    assert "tensorboard --logdir" in proc.stderr
