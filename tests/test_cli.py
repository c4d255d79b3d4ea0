"""The ``fusedrl`` CLI: a parser generated from the dataclasses (flags, YAML, errors), reward loading,
and a short training run in a subprocess, as a user runs it, that must raise the reward markedly."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from fusedrl.engine import cli, distributed
from fusedrl.engine.compose import field_docs, flat_fields
from fusedrl.engine.metrics import read_metrics
from fusedrl.engine.rewards import check_rewards, count_token, load_reward_fn
from fusedrl.engine.trainer import PPOConfig


def test_every_config_field_is_a_documented_flag():
    parser = cli.build_train_parser()
    help_text = parser.format_help()
    for f in flat_fields(PPOConfig):  # its own fields and its parts' (the loss, rollout, optimizer, run)
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        assert f.doc, f"PPOConfig.{f.name} has no docstring"
    assert "--log-ratio-clip" in help_text and "--loss-agg" in help_text and "--agg " not in help_text
    assert "{gae,grpo,rloo,reinforce++}" in help_text
    assert set(field_docs(cli.TrainArgs)) == {f.name for f in dataclasses.fields(cli.TrainArgs)}


def test_flags_yaml_and_precedence(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("advantage-estimator: rloo\nkl_coef: 0.3\nreward_clip: 5\nwhiten_advantages: false\n"
                 "reward_kwargs: {token: b}\nmax_tokens_per_microbatch: 512\n")  # fmt: skip
    args, cfg = cli.parse_train_args(["--config", str(y), "--kl-coef", "0.01", "--dual-clip", "3",
                                      "--prompts", "p.txt", "--no-progress"])  # fmt: skip
    assert cfg.advantage_estimator == "rloo" and cfg.kl_coef == 0.01  # the flag wins over the file
    assert cfg.reward_clip == 5.0 and isinstance(cfg.reward_clip, float)
    assert cfg.whiten_advantages is False and cfg.dual_clip == 3.0 and cfg.progress is False
    assert cfg.max_tokens_per_microbatch == 512
    assert json.loads(args.reward_kwargs) == {"token": "b"} and args.prompts == "p.txt"
    _, cfg = cli.parse_train_args(["--reward-clip", "none", "--kl-estimator", "k3"])
    assert cfg.reward_clip is None and cfg.kl_estimator == "k3"
    assert cli.parse_train_args([])[1] == PPOConfig()


@pytest.mark.parametrize(
    "argv, yaml_text, match",
    [
        (["--advantage-estimator", "ppo"], None, "invalid choice|must be one of"),
        (["--kl-coef", "abc"], None, "--kl-coef expects float"),
        (["--ppo-epochs", "1.5"], None, "--ppo-epochs expects int"),
        (["--samples-per-prompt", "1", "--advantage-estimator", "grpo"], None, "samples_per_prompt"),
        ([], "bogus_field: 1\n", "unknown field 'bogus_field'"),
        ([], "kl_coef: [1, 2]\n", "kl_coef in .* expects float"),
        ([], "- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_parser_errors(tmp_path, capsys, argv, yaml_text, match):
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = argv + ["--config", str(tmp_path / "c.yaml")]
    with pytest.raises(SystemExit) as e:
        cli.parse_train_args(argv)
    assert e.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err), capsys.readouterr().err


def test_negative_numbers_in_scientific_notation_parse(capsys):
    parser = cli.build_train_parser()
    argv = ["--kl-coef", "-1e-3", "--reward-clip", "-.5", "--seed", "-2", "--no-progress", "--prompts", "-1e3.txt"]
    assert cli._join_negative_numbers(argv, parser) == ["--kl-coef=-1e-3", "--reward-clip=-.5", "--seed=-2",
                                                        "--no-progress", "--prompts", "-1e3.txt"]  # fmt: skip
    # The value reaches the field's check (before: "argument --kl-coef: expected one argument").
    with pytest.raises(SystemExit):
        cli.parse_train_args(["--kl-coef", "-1e-3"])
    err = capsys.readouterr().err
    assert "PPOConfig.kl_coef must be a number >= 0, got -0.001" in err and "expected one argument" not in err
    assert cli.parse_train_args(["--lora-dropout", "1e-1", "--learning-rate", "3E-4"])[1].learning_rate == 3e-4


def test_available_cpus_honours_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert distributed.available_cpus(str(tmp_path)) == 8  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert distributed.available_cpus(str(tmp_path)) == 8
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of quota -> 2 threads
    assert distributed.available_cpus(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("1600000 100000\n")  # a quota above the affinity mask
    assert distributed.available_cpus(str(tmp_path)) == 8
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert distributed.available_cpus(str(tmp_path)) == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1 "no limit"
    assert distributed.available_cpus(str(tmp_path)) == 8
    monkeypatch.setattr(distributed, "available_cpus", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.0, 0.0))  # an idle machine: every CPU
    assert distributed.default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun: the CPUs are shared among the node's processes
    assert distributed.default_threads() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "getloadavg", lambda: (12.0, 0.0, 0.0))  # 3/4 of the host busy: 2 of our 8
    assert distributed.default_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))  # overloaded: still one thread
    assert distributed.default_threads() == 1
    assert "affinity mask capped by the cgroup CPU quota, less the share other processes keep busy" in \
        " ".join(cli.build_train_parser().format_help().split())  # fmt: skip


def test_reward_loading(tmp_path):
    assert load_reward_fn("count_token", token="b")(["p"], ["abba", "c"]) == [2.0, 0.0]
    assert load_reward_fn("fusedrl.engine.rewards:target_length", target=3)([""] * 2, ["ab", "abcd"]) == [-1.0, -1.0]
    (tmp_path / "myrew.py").write_text("def r(prompts, completions):\n    return [len(c) for c in completions]\n")
    assert load_reward_fn(f"{tmp_path / 'myrew.py'}:r")(["p"], ["abc"]) == [3]
    for spec, err, match in [
        ("nonexistent_builtin", ValueError, "module:function"),
        ("no_such_module_xyz:f", ValueError, "cannot import module 'no_such_module_xyz'"),
        ("fusedrl.engine.rewards:nope", ValueError, "has no attribute 'nope'"),
        ("fusedrl.engine.rewards:BUILTIN_REWARDS", TypeError, "not a callable"),
        (f"{tmp_path / 'missing.py'}:r", FileNotFoundError, "missing.py"),
    ]:
        with pytest.raises(err, match=match):
            load_reward_fn(spec)
    with pytest.raises(ValueError, match="token must be a non-empty"):
        count_token([], ["a"], token="")
    assert check_rewards([1, 2.5], 2).tolist() == [1.0, 2.5]


def _env():
    # One thread: the 2-core CI box is shared, and OpenMP threads spinning against other processes make a
    # tiny-model step tens of times slower.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_cli_usage_and_bad_invocations(tmp_path, capsys):
    assert cli.main(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--prompts is required"):
        cli.main(["train", "--reward-fn", "count_token"])
    (tmp_path / "p.txt").write_text("ab\ncd\n")
    with pytest.raises(SystemExit, match="give one of --reward-model and --reward-fn"):
        cli.main(["train", "--prompts", str(tmp_path / "p.txt")])
    with pytest.raises(SystemExit, match="not both"):
        cli.main(["train", "--prompts", str(tmp_path / "p.txt"), "--reward-fn", "count_token", "--reward-model", "x"])
    with pytest.raises(SystemExit, match="--reward-kwargs must be a JSON object"):
        cli.main(["train", "--prompts", str(tmp_path / "p.txt"), "--reward-fn", "count_token",
                  "--reward-kwargs", "{oops"])  # fmt: skip


def test_cli_subprocess_usage_and_reward_error(tmp_path):
    """As a user runs it: a reward function returning NaN fails the run loudly, before anything is saved."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", *a], capture_output=True,
                                    cwd=tmp_path, text=True, env=_env(), timeout=120, check=False)  # fmt: skip
    (tmp_path / "p.txt").write_text("ab\ncd\n")
    (tmp_path / "nan_reward.py").write_text(
        "def f(prompts, completions):\n    return [float('nan')] * len(completions)\n"
    )
    r = run("train", "--prompts", str(tmp_path / "p.txt"), "--reward-fn", f"{tmp_path / 'nan_reward.py'}:f",
            "--total-steps", "1", "--max-new-tokens", "2", "--threads", "1", "--no-progress",
            "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode != 0 and "non-finite reward nan for completion 0" in r.stderr
    assert not (tmp_path / "o" / "policy").exists()


@pytest.mark.slow
def test_cli_training_run_learns_rule_based_reward(tmp_path):
    """GRPO on the tiny preset, reward = number of 'a' characters in the completion. The untrained
    policy emits "a" about once in 54 tokens; after a short run it must do so far more often."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hi", "ok", "1+2", "go:", "why?", "xy"]))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts), "--policy", "tiny-llama",
        "--reward-fn", "count_token", "--reward-kwargs", '{"token": "a"}', "--advantage-estimator", "grpo",
        "--prompts-per-step", "4", "--samples-per-prompt", "8", "--max-new-tokens", "8", "--total-steps", "16",
        "--learning-rate", "1e-2", "--kl-coef", "0.0", "--ppo-epochs", "1", "--num-minibatches", "1",
        "--save-every", "8", "--save-hf-checkpoints", "--seed", "0", "--threads", "1", "--no-progress",
        "--output-dir", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 17))
    first = sum(row["rollout/reward_mean"] for row in rows[:5]) / 5
    last = sum(row["rollout/reward_mean"] for row in rows[-5:]) / 5
    assert last > first + 1.5 and last > 3 * first, f"mean reward {first:.3f} -> {last:.3f}"
    for row in rows:
        assert all(isinstance(v, float) for k, v in row.items() if k != "step")
    # What the run left behind: the config it ran with and a loadable HF model.
    assert (out / "config.yaml").is_file() and (out / "policy" / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (out / "policy" / name).is_file(), name
    assert f"outputs in {out}/" in r.stderr and "policy/" in r.stderr and "metrics.jsonl" in r.stderr, r.stderr
    model = AutoModelForCausalLM.from_pretrained(out / "policy")
    from fusedrl.engine.checkpoint import find_latest

    assert find_latest(out).name == "ckpt-16"  # the HF directories inside do not upset checkpoint verification
    for step in (8, 16):
        saved = AutoModelForCausalLM.from_pretrained(out / f"ckpt-{step}" / "policy")
        assert saved.config.vocab_size == 54 and (out / f"ckpt-{step}" / "policy" / "tokenizer.json").is_file()
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))
    assert model.config.vocab_size == 54


def test_user_mistakes_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    import torch

    (tmp_path / "p.txt").write_text("ab\ncd\n")
    base = ["train", "--prompts", str(tmp_path / "p.txt"), "--reward-fn", "count_token", "--total-steps", "1",
            "--output-dir", str(tmp_path / "o")]  # fmt: skip
    cases = [
        (["--prompts", str(tmp_path / "missing.jsonl")], "prompts file '.*missing.jsonl' does not exist"),
        (["--reward-fn", "no_such_reward"], "reward function spec must be a built-in name"),
        (["--policy", str(tmp_path / "no_model")], "policy '.*no_model' does not exist"),
        (["--prompt-field", "question"], "holds plain strings; --prompt-field 'question' applies to rows"),
        (["--lora-r", "2", "--lora-target-modules", "lm_head"], "include the output head 'lm_head'"),
        (["--merge-lora"], "--merge-lora applies with --lora-r only"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for extra, match in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(base + extra)
        msg = str(e.value.code)
        assert msg.startswith("fusedrl train: ") and "\n" not in msg and re.search(match, msg), (extra, msg)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("peft", "tensorboard")
                        else real(name, *a))  # fmt: skip
    for extra, match in [(["--lora-r", "4"], r"--lora-r needs the peft package: pip install 'fusedrl\[lora\]'"),
                         (["--tensorboard"], r"pip install 'fusedrl\[tensorboard\]'")]:  # fmt: skip
        with pytest.raises(SystemExit, match=match):
            cli.main(base + extra)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # a refused run writes nothing


def test_cli_subprocess_errors_without_traceback_and_help_without_torch(tmp_path):
    """As a user runs it: an uncached Hub id offline is one line on stderr and exit status 1; --help and
    --version answer without importing torch (what made --help take seconds)."""
    (tmp_path / "p.txt").write_text("ab\n")
    env = {**_env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", "p.txt", "--reward-fn",
                        "count_token", "--policy", "Qwen/Qwen2.5-0.5B-Instruct"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fusedrl train: policy 'Qwen/Qwen2.5-0.5B-Instruct' is not a local directory") and \
        "hf download Qwen/Qwen2.5-0.5B-Instruct" in last, last  # fmt: skip
    code = ("import sys, io, contextlib\nfrom fusedrl.engine.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    main(['--version']); main(['--help'])\n"
            "print(buf.getvalue().splitlines()[0], 'torch' in sys.modules)\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60,
                       check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "fusedrl 0.1.0 False", r.stdout + r.stderr[-2000:]


def test_train_help_does_not_import_torch():
    """The parser comes from torch-free modules (fusedrl.engine.config, fusedrl.names): --help is instant."""
    code = ("import sys, io, contextlib\nfrom fusedrl.engine.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['train', '--help'])\n")  # fmt: skip
    code = f"try:\n    {code.replace(chr(10), chr(10) + '    ')}\nexcept SystemExit:\n    pass\n" \
        "print('torch' in sys.modules)\n"  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60,
                       check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr[-2000:]


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}; {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")  # fmt: skip


@pytest.mark.slow
def test_cli_lora_chat_prompts_from_parquet_with_a_math_reward(tmp_path):
    """The path a user takes with their own model: a local HF directory whose tokenizer has a chat template,
    chat prompts and reference answers in a Parquet file, math_answer reading the answer column, LoRA with the
    adapter merged at the end. The saved policy loads with from_pretrained, tokenizer and generation config
    included."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.tokenizer import build_char_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model_dir = tmp_path / "my-model"
    build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"what is {a}+{b}?"}], "answer": str(a + b)}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "spy.py").write_text(
        "import json\nfrom fusedrl.engine.rewards import math_answer\n"
        "def reward(prompts, completions, answer, **kw):\n"
        "    with open('seen.jsonl', 'a') as f:\n"
        "        f.write(json.dumps({'prompts': prompts, 'answer': answer}) + '\\n')\n"
        "    return math_answer(prompts, completions, answer=answer)\n"
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fusedrl.engine.cli", "train", "--policy", str(model_dir), "--prompts",
           "train.parquet", "--reward-fn", "spy.py:reward", "--advantage-estimator", "grpo", "--lora-r", "4",
           "--lora-target-modules", "q_proj,v_proj", "--merge-lora", "--prompts-per-step", "2",
           "--samples-per-prompt", "2", "--max-new-tokens", "4", "--total-steps", "2", "--threads", "1",
           "--no-progress", "--output-dir", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LoRA r=4" in r.stderr and "not copied" in r.stderr and f"outputs in {out}/" in r.stderr, r.stderr
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 2
    expected = {f"user: what is {row['prompt'][0]['content'][8:]}; assistant:": row["answer"] for row in rows}
    for call in seen:  # rendered with the chat template, each with its own row's answer
        assert len(call["prompts"]) == 4 and [expected[p] for p in call["prompts"]] == call["answer"]
    policy = out / "policy"
    assert not (policy / "adapter_config.json").exists()  # merged: a plain model
    model = AutoModelForCausalLM.from_pretrained(policy)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(policy).chat_template == CHAT_TEMPLATE
    assert GenerationConfig.from_pretrained(policy).eos_token_id == tok.eos_token_id
    assert len(read_metrics(out / "metrics.jsonl")) == 2


def test_ppo_config_composes_the_kernels_loss_config(tmp_path, capsys):
    """One source of truth per setting: the policy-loss settings live in a PPOLossConfig that the kernels validate
    (at construction, with their message), reachable by flat names, flags and a flat config.yaml."""
    from fusedrl.engine.compose import flat_dict
    from fusedrl.kernels import PPOLossConfig

    with pytest.raises(ValueError, match=r"^PPOLossConfig.clip_low must be <= 1.0, got 1.5$"):
        PPOConfig(clip_low=1.5)
    with pytest.raises(ValueError, match="PPOLossConfig.clip_delta applies to policy_loss='clip' only"):
        PPOConfig(policy_loss="cispo", clip_delta=2.0)
    cfg = PPOConfig(log_ratio_clip=20.0, loss_agg="seq-mean-token-sum-norm", max_new_tokens=7, temperature=0.5,
                    kl_coef=0.1, advantage_estimator="grpo")  # fmt: skip
    assert isinstance(cfg.loss, PPOLossConfig) and cfg.loss.log_ratio_clip == 20.0 == cfg.log_ratio_clip
    loss = cfg.loss_config(logit_scale=2.0)  # what the trainer hands the fused loss
    assert (loss.log_ratio_clip, loss.agg, loss.agg_norm_length, loss.temperature) == (20.0, cfg.loss_agg, 7, 0.25)
    assert (loss.kl_coef, loss.kl_estimator) == (0.1, "k3")
    # Where the KL goes, decided once: the loss for grpo, the reward for gae.
    assert cfg.kl_coefs(0.3) == (0.0, 0.3) and PPOConfig().kl_coefs(0.3) == (0.3, 0.0)
    assert PPOConfig(kl_coef=0.1).loss_config().kl_coef == 0.0
    cfg.clip_low = 0.3  # set by its flat name: the frozen loss config is replaced and validated again
    assert cfg.loss.clip_low == 0.3
    with pytest.raises(ValueError, match="PPOLossConfig.clip_low must be <= 1.0"):
        cfg.clip_low = 2.0
    with pytest.raises(ValueError, match="PPOConfig decides itself"):
        PPOConfig(loss=PPOLossConfig(kl_coef=0.2))
    with pytest.raises(TypeError, match="unexpected keyword argument 'clip_lo'"):
        PPOConfig(clip_lo=0.1)
    # The optimizer part is shared with DPO; PPO runs a constant learning rate, so its schedule is no PPO setting.
    from fusedrl.engine.config import OptimConfig

    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup_steps'"):
        PPOConfig(warmup_steps=10)
    with pytest.raises(ValueError, match="PPOConfig.optim must be an OptimConfig with lr_schedule='constant'"):
        PPOConfig(optim=OptimConfig(lr_schedule="cosine"))
    # Flags keep their flat names; a bad loss setting is one parser error with the kernels' message.
    _, c = cli.parse_train_args(["--log-ratio-clip", "10", "--clip-low", "0.1", "--loss-agg", "token-sum"])
    assert (c.loss.log_ratio_clip, c.loss.clip_low, c.loss.agg) == (10.0, 0.1, "token-sum")
    with pytest.raises(SystemExit):
        cli.parse_train_args(["--clip-low", "1.5"])
    assert "PPOLossConfig.clip_low must be <= 1.0, got 1.5" in capsys.readouterr().err
    # A config.yaml as the previous (flat) layout wrote it loads into the parts; the new one round-trips.
    old = tmp_path / "old.yaml"
    old.write_text("clip_low: 0.1\nloss_agg: token-sum\nlearning_rate: 0.001\nrollout_backend: hf\nseed: 3\n"
                   "prompts_per_step: 4\nkl_coef: 0.02\n")  # fmt: skip
    _, c = cli.parse_train_args(["--config", str(old)])
    assert (c.loss.clip_low, c.loss.agg, c.optim.learning_rate, c.rollout.rollout_backend, c.run.seed) == (
        0.1, "token-sum", 1e-3, "hf", 3)  # fmt: skip
    import yaml

    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(flat_dict(c)))
    assert cli.parse_train_args(["--config", str(new)])[1] == c


def test_engine_exports_its_public_names_lazily():
    """``fusedrl.engine`` names its public API; importing the package imports no torch (fusedrl --help stays
    instant), each name resolves to its defining module's object."""
    code = ("import sys, fusedrl.engine as e\n"
            "print('torch' in sys.modules)\n"
            "print(all(getattr(e, n).__module__.startswith('fusedrl.engine.') for n in e.__all__))\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.split() == ["False", "True"], r.stderr[-2000:]
    import fusedrl.engine as e
    from fusedrl.engine.dpo import train_dpo
    from fusedrl.engine.rollout_backends import RolloutBackend, RolloutOutput, SamplingSpec

    from fusedrl.engine.trainer import PPOTrainer

    assert (e.PPOTrainer, e.PPOConfig, e.train_dpo) == (PPOTrainer, PPOConfig, train_dpo)
    assert (e.RolloutBackend, e.RolloutOutput, e.SamplingSpec) == (RolloutBackend, RolloutOutput, SamplingSpec)
    assert {"train_sft", "train_reward_model", "DPOConfig", "SFTConfig", "RewardModelConfig"} <= set(e.__all__)


def test_loss_flags_read_from_source_match_the_kernels_class():
    """--help reads PPOLossConfig from its source (no torch): the same fields and defaults as the class itself."""
    from fusedrl.engine.compose import _source_fields
    from fusedrl.kernels import PPOLossConfig

    read = [(name, default) for name, _, default, _ in _source_fields("fusedrl.kernels", "PPOLossConfig")]
    assert read == [(f.name, f.default) for f in dataclasses.fields(PPOLossConfig)]
