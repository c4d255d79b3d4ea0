"""The README is run as written: every ```python block executes on CPU (each in a fresh namespace, in one
process, in a scratch directory), and the first `fusedrl train` command, on the data it names from examples/,
must learn what it says it learns."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def code_blocks(lang: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block of ``lang`` in the README."""
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            blocks.append((i + 2, "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return blocks


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: fusedrl turns the interpreter on itself without CUDA
    return env


RUNNER = r"""
import json, sys, traceback, warnings
warnings.simplefilter("ignore")
blocks = json.load(open(sys.argv[1]))
for line, code in blocks:
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except BaseException:
        print(f"README block at line {line} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"ok {line}", flush=True)
"""


def test_readme_has_python_blocks_and_a_train_example():
    assert len(code_blocks("python")) >= 6
    assert any("fusedrl train --prompts examples/" in code for _, code in code_blocks("bash"))


@pytest.mark.slow
def test_readme_python_blocks_run_on_cpu(tmp_path):
    blocks = code_blocks("python")
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    r = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], capture_output=True,
                       text=True, cwd=tmp_path, env=_env(), timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("ok ") == len(blocks), r.stdout


def first_train_command() -> list[str]:
    for _, code in code_blocks("bash"):
        text = code.replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("fusedrl train --prompts examples/"):
                return shlex.split(line.split("#")[0])
    raise AssertionError("no `fusedrl train --prompts examples/...` command in the README")


@pytest.mark.slow
def test_readme_train_example_learns(tmp_path):
    """The README's first training command, on the shipped examples/letters.jsonl: the reward (letters `a` per
    completion) must rise several-fold, and the run must say where its outputs went."""
    argv = first_train_command()
    assert argv[:2] == ["fusedrl", "train"]
    argv = [str(ROOT / a) if a.startswith("examples/") else a for a in argv[2:]]
    cmd = [sys.executable, "-m", "fusedrl.engine.cli", "train", *argv, "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / argv[argv.index("--output-dir") + 1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = sum(row["rollout/reward_mean"] for row in rows[:5]) / 5
    last = sum(row["rollout/reward_mean"] for row in rows[-5:]) / 5
    assert last > 4 * first and last > 2.0, f"reward {first:.2f} -> {last:.2f}"
    assert re.search(r"steps done in \d+ s; outputs in .*\n  metrics.jsonl .*\n  config.yaml .*\n  policy/ ",
                     r.stderr), r.stderr[-1000:]  # fmt: skip
    print(f"README example: reward {first:.2f} -> {last:.2f}; {r.stderr.strip().splitlines()[-4]}")


def test_examples_data_parse_and_their_references_score_correct():
    from fusedrl.engine.data import bind_columns, load_prompt_data
    from fusedrl.engine.rewards import math_answer

    plain = load_prompt_data(ROOT / "examples" / "gsm8k_mini.jsonl")
    assert len(plain) == 24 and plain.prompts[0].startswith("q: ") and plain.prompts[0].endswith(" a:")
    reward = bind_columns(math_answer, plain)
    # Each problem's own worked solution is a correct completion; the next problem's answer mostly is not.
    assert reward(plain.prompts, plain.columns["answer"]) == [1.0] * 24
    assert sum(reward(plain.prompts, plain.columns["answer"][1:] + plain.columns["answer"][:1])) < 12
    # The chat rows: the same answers, prompts that end with the user's turn (rendered by a model's template).
    from fusedrl.engine.data import is_conversation, load_rows

    rows = load_rows(ROOT / "examples" / "gsm8k_mini_chat.jsonl")
    assert [r["answer"] for r in rows] == plain.columns["answer"]
    assert all(is_conversation(r["prompt"]) and r["prompt"][-1]["role"] == "user" for r in rows)
    letters = load_prompt_data(ROOT / "examples" / "letters.jsonl")
    assert len(letters) >= 8


@pytest.mark.slow
def test_examples_sft_script_writes_a_loadable_policy(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gsm8k_mini_sft.py"), "--out", str(tmp_path / "m"), "--steps", "2"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"policy saved to {tmp_path / 'm'}/" in r.stdout
    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.tokenizer import load_tokenizer

    assert build_causal_lm(tmp_path / "m").config.vocab_size == len(load_tokenizer(tmp_path / "m"))


def test_readme_numbers_are_rendered_from_their_script():
    """The demo tables and the letters example's figures in the README are exactly what bench/readme_numbers.py
    renders from its committed JSON (`make readme-numbers` regenerates both): no hand-edited number."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "bench" / "readme_numbers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = json.loads(mod.RESULTS.read_text())
    assert res["machine"]["cpu"] and len(res["seeds"]) == 3
    text = README.read_text()
    assert mod.rewrite_readme(mod.render(res), text) == text, "README numbers differ: run make readme-numbers"
