"""``fusedrl demo``: the synthetic task (gold scorer, noisy annotator), the SFT stage (encoding, loss), the
config and flags, and the whole pipeline run as a user runs it -- a subprocess, ``--quick`` -- with the
assertions made on what it wrote (summary, metrics, plot, checkpoints), then resumed through ``fusedrl demo``."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from fusedrl.engine import demo, demo_task
from fusedrl.engine.demo import DemoConfig, DigitTask, label_pairs
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.sft import IGNORE_INDEX, encode_demonstrations, sft_loss, train_sft, SFTConfig
from fusedrl.engine.tokenizer import build_char_tokenizer

TASK = DigitTask(prompt_len=(3, 6), completion_len=(3, 8))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_PPO_STEPS = 30  # the --quick preset's PPO steps; the run below checkpoints every 10
SUBPROCESS_TIMEOUT_S = 600  # generous: CI machines are shared; --quick takes ~30 s on 2 idle cores


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(demo.DIGITS + demo.SEPARATOR)


# ----------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("5:", "678", (6 + 7 + 8) / 27),
        ("9:", "919", (0 + 1 + 9) / 27),  # the first 9 repeats the prompt's last digit
        ("12:", "2215", (0 + 0 + 1 + 5) / 36),
        ("40:", "98989898", 68 / 72),  # the best kind of answer: big digits, no repeats
        ("3:", "99999", 9 / 45),  # the collapse an over-optimised policy finds
        ("3:", "333", 0.0),
        ("3:", "12", 0.0),  # too short: not well formed
        ("3:", "123456789", 0.0),  # too long: not well formed
        ("3:", "12:4", 0.0),  # a non-digit
        ("3:", "", 0.0),
    ],
)
def test_gold_hand_computed(prompt, completion, expected):
    assert TASK.gold(prompt, completion) == pytest.approx(expected)


def test_gold_of_random_demonstrations_is_unaligned():
    """Uniform digits score 0.9 * 4.5 / 9 = 0.45 on average: the SFT data carries no preference."""
    rng = random.Random(0)
    prompts = TASK.prompts(4000, rng)
    demos = [TASK.demonstration(rng) for _ in prompts]
    assert all(TASK.well_formed(d) for d in demos)
    assert all(p.endswith(":") and p[:-1].isdigit() and 3 <= len(p) - 1 <= 6 for p in prompts)
    mean = sum(TASK.gold_scores(prompts, demos)) / len(demos)
    assert 0.42 < mean < 0.48, mean


def test_label_pairs_drops_ties_and_flips_the_asked_fraction():
    rng = random.Random(1)
    prompts = TASK.prompts(3000, rng)
    a = [TASK.demonstration(rng) for _ in prompts]
    b = [TASK.demonstration(rng) for _ in prompts]
    noisy, clean = label_pairs(TASK, prompts, a, b, flip_rate=0.25, rng=random.Random(2))
    ties = sum(TASK.gold(p, x) == TASK.gold(p, y) for p, x, y in zip(prompts, a, b))
    assert len(noisy) == len(clean) == len(prompts) - ties and ties > 0
    assert all(TASK.gold(c.prompt, c.chosen) > TASK.gold(c.prompt, c.rejected) for c in clean)
    flipped = sum(n.chosen != c.chosen for n, c in zip(noisy, clean))
    assert abs(flipped / len(noisy) - 0.25) < 0.03, flipped / len(noisy)
    exact, _ = label_pairs(TASK, prompts, a, b, flip_rate=0.0, rng=random.Random(2))
    assert exact == clean


# ----------------------------------------------------------------------------------------------------
# Stage 1: SFT
# ----------------------------------------------------------------------------------------------------
def test_encode_demonstrations_masks_prompt_and_padding(tok):
    ids, mask, labels = encode_demonstrations(tok, ["12:", "4:"], ["345", "6"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids[0].tolist() == enc("12:345") + [eos]
    assert ids[1].tolist() == enc("4:6") + [eos] + [pad] * 3
    assert mask.tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + enc("345") + [eos]
    assert labels[1].tolist() == [IGNORE_INDEX] * 2 + enc("6") + [eos] + [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="prompts and completions must have the same length"):
        encode_demonstrations(tok, ["1:"], [])


def test_sft_loss_matches_float64_reference(tok):
    """Mean NLL of the completion tokens against a float64 log-softmax of the same model, and its gradient
    w.r.t. the weights (the loss is a scalar: its upstream gradient is a random scale)."""
    rng = random.Random(3)
    prompts = TASK.prompts(9, rng)
    ids, mask, labels = encode_demonstrations(tok, prompts, [TASK.demonstration(rng) for _ in prompts])
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=4)
    model64 = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=4, dtype=torch.float64)
    g = torch.randn(()).item()

    loss = sft_loss(model, ids, mask, labels)
    (loss * g).backward()
    logits = model64(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    truth = -(lp * keep).sum() / keep.sum()
    (truth * g).backward()
    assert_close(loss, truth, atol=1e-5, name="sft loss")
    for (name, p), p64 in zip(model.named_parameters(), model64.parameters()):
        assert_close(p.grad, p64.grad, atol=1e-5 * max(1.0, p64.grad.abs().max().item()), name=f"grad {name}")


def test_train_sft_learns_the_format(tok):
    """A few dozen steps already cut the loss well below uniform (log 15) and teach digits then eos."""
    rng = random.Random(5)
    prompts = TASK.prompts(512, rng)
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=6, pad_token_id=tok.pad_token_id)
    losses = train_sft(model, tok, prompts, [TASK.demonstration(rng) for _ in prompts],
                       SFTConfig(steps=60, batch_size=32, lr=5e-3), progress=False)  # fmt: skip
    assert len(losses) == 60
    assert losses[0] > 2.5 and sum(losses[-5:]) / 5 < 2.45, (losses[0], losses[-5:])


def test_response_logprob_matches_unpadded_float64(tok):
    """The evaluation's log pi(y|x) (right-padded batch, float32) against each sequence alone in float64."""
    rng = random.Random(7)
    prompt_ids = [[rng.randrange(4, len(tok)) for _ in range(rng.randint(1, 6))] for _ in range(7)]
    responses = [[rng.randrange(3, len(tok)) for _ in range(rng.randint(1, 9))] for _ in range(7)]
    responses[0][-1] = tok.eos_token_id
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=8)
    model64 = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=8, dtype=torch.float64)
    got = demo_task.response_logprob(model, prompt_ids, responses, pad_token_id=tok.pad_token_id)
    truth = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, responses):
            lp = torch.log_softmax(model64(input_ids=torch.tensor([p + r])).logits[0, :-1], -1)
            truth.append(sum(lp[len(p) - 1 + j, t] for j, t in enumerate(r)))
    assert_close(got, torch.stack(truth), atol=1e-4, name="response logprob")


# ----------------------------------------------------------------------------------------------------
# Config and flags
# ----------------------------------------------------------------------------------------------------
def test_flags_quick_preset_and_validation(capsys):
    cfg, quick = demo.parse_args(["--quick", "--kl-coef", "0.01", "--out", "x", "--no-progress"])
    assert quick and cfg.kl_coef == 0.01 and cfg.out == "x" and cfg.progress is False
    assert cfg.ppo_steps == demo.QUICK["ppo_steps"] == QUICK_PPO_STEPS
    cfg, _ = demo.parse_args(["--quick", "--ppo-steps", "7"])
    assert cfg.ppo_steps == 7  # a flag overrides the preset
    cfg, quick = demo.parse_args([])
    assert not quick and cfg == DemoConfig()
    with pytest.raises(SystemExit):
        demo.parse_args(["--flip-rate", "0.7"])
    assert "flip_rate must be in [0, 0.5)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="DemoConfig.completion_len_max must be >= completion_len_min=5"):
        DemoConfig(completion_len_min=5, completion_len_max=4)
    with pytest.raises(ValueError, match="DemoConfig.ppo_steps must be an int >= 1"):
        DemoConfig(ppo_steps=0)
    cfg, _ = demo.parse_args(["--quick", "--compare", "--dpo-beta", "0.2"])
    assert cfg.compare and cfg.dpo_beta == 0.2 and not DemoConfig().compare  # the default demo stays PPO only
    with pytest.raises(ValueError, match="DemoConfig.compare must be False with resume=True"):
        DemoConfig(compare=True, resume=True)


# ----------------------------------------------------------------------------------------------------
# The report: the over-optimisation verdict, --compare's table and plot
# ----------------------------------------------------------------------------------------------------
def _summary(**over):
    base = dict(rm_accuracy=0.7, gold_reward_sft=0.45, proxy_reward_sft=-0.5, gold_reward_final=0.5,
                proxy_reward_final=0.6, kl_final=2.0, well_formed_sft=0.97, well_formed_final=0.96,
                gold_reward_peak=0.6, gold_reward_peak_step=20, kl_at_gold_peak=3.0, gold_reward_last=0.58,
                proxy_reward_at_gold_peak=0.5, proxy_reward_last=0.7, kl_coef=0.1, ppo_steps=30,
                examples_sft=["1:2"], examples_final=["1:9"], timings_s={"total_s": 1.0}, device="cpu")  # fmt: skip
    return {**base, **over}


def test_overoptimisation_verdict_is_read_off_the_numbers():
    """The report claims over-optimisation only when the gold fell by > 0.05 from its peak while the proxy kept
    rising (at the default beta the demo shows none, and says so)."""
    from fusedrl.engine.demo_report import format_summary, overoptimised

    rows = [{"step": 1, "gold/reward_mean": 0.5, "rollout/reward_mean": 0.1, "objective/kl": 0.1}]
    assert not overoptimised(_summary())
    assert "no over-optimisation at beta = 0.1" in format_summary(_summary(), rows)
    fell = _summary(gold_reward_last=0.4)
    assert overoptimised(fell) and "over-optimisation: the gold reward peaked at 0.600" in format_summary(fell, rows)
    assert not overoptimised(_summary(gold_reward_last=0.4, proxy_reward_last=0.3))  # both fell: not hacking


def test_compare_table_json_and_plot(tmp_path):
    from fusedrl.engine.demo_report import format_compare, make_compare, plot_compare

    gold_log = tmp_path / "gold.jsonl"
    gold_log.write_text("".join(json.dumps({"step": i, "gold/reward_mean": 0.4 + i / 100}) + "\n" for i in range(1, 9)))
    ev = lambda g, kl, t: dict(gold=g, proxy=g - 1, kl=kl, well_formed=0.9, length=5.0, examples=["1:2"] * 6, wall_s=t)  # noqa: E731
    evals = {"sft": ev(0.45, 0.0, 0.0), "ppo": ev(0.55, 2.0, 12.3), "grpo": ev(0.5, 3.0, 9.0),
             "dpo": dict(ev(0.6, 2.5, 4.0), pairs=100)}  # fmt: skip
    result = make_compare(DemoConfig(), evals, {"ppo": gold_log, "grpo": gold_log})
    assert list(result["methods"]) == ["sft", "ppo", "grpo", "dpo"]
    assert result["methods"]["ppo"]["gold_per_step"] == pytest.approx([0.4 + i / 100 for i in range(1, 9)])
    assert result["methods"]["dpo"]["pairs"] == 100 and "gold_per_step" not in result["methods"]["dpo"]
    table = format_compare(result)
    assert "DPO on the pairs" in table and "   12.3" in table and "0.600" in table
    json.dumps(result)  # compare.json is plain JSON
    plot_compare(result, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_SIGNATURE


# ----------------------------------------------------------------------------------------------------
# End to end, as a user runs it
# ----------------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m fusedrl.engine.demo --quick --compare`` once for the module: (output dir, completed process).
    The PPO stage and everything before it are the default demo's; --compare adds GRPO and DPO after them."""
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = _run([sys.executable, "-m", "fusedrl.engine.demo", "--quick", "--compare", "--out", str(out),
                 "--save-every", "10", "--no-progress"], cwd=out.parent)  # fmt: skip
    return out, proc


@pytest.mark.slow
def test_quick_demo_writes_the_report(quick_run):
    out, proc = quick_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("rm_accuracy", "gold_reward_sft", "gold_reward_final", "proxy_reward_final", "kl_final"):
        assert isinstance(summary[key], float), key
    # The learned reward beats chance on held-out pairs, against the gold preference it never saw.
    assert summary["rm_accuracy"] > 0.6, summary["rm_accuracy"]
    # PPO against that proxy raised the hidden gold reward over the SFT policy's, on the same held-out prompts.
    assert summary["gold_reward_final"] > summary["gold_reward_sft"] + 0.03, (
        summary["gold_reward_sft"],
        summary["gold_reward_final"],
    )
    assert summary["proxy_reward_final"] > summary["proxy_reward_sft"]
    assert summary["kl_final"] > 0.0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, QUICK_PPO_STEPS + 1))
    for r in rows:
        for key in ("rollout/reward_mean", "gold/reward_mean", "objective/kl", "proxy/reward_mean"):
            assert key in r and r[key] == r[key], (r["step"], key)  # present and not NaN
        # The proxy the report logs is the reward the trainer optimised, for the same rollouts.
        assert abs(r["proxy/reward_mean"] - r["rollout/reward_mean"]) < 1e-4
    first, last = rows[:5], rows[-5:]
    assert sum(r["gold/reward_mean"] for r in last) > sum(r["gold/reward_mean"] for r in first)

    png = (out / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    img = matplotlib.image.imread(out / "report.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600, img.shape
    assert float(img[..., :3].std()) > 0.05, "the plot is blank"

    for d in ("sft", "reward_model", "ppo/policy", "ppo/critic"):
        assert (out / d).is_dir(), d
    assert (out / "ppo" / "latest").is_file()
    assert "reward model held-out accuracy" in proc.stdout and "PPO policy (final)" in proc.stdout


@pytest.mark.slow
def test_resume_through_the_fusedrl_command(quick_run, tmp_path):
    """``fusedrl demo --resume`` reuses stages 1-2 and continues PPO from the last checkpoint (step 30)."""
    out, _ = quick_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    summary_before = json.loads((out / "summary.json").read_text())
    fusedrl = shutil.which("fusedrl")
    cmd = [fusedrl] if fusedrl else [sys.executable, "-m", "fusedrl.engine.cli"]
    proc = _run(cmd + ["demo", "--quick", "--out", str(copy), "--resume", "--ppo-steps", str(QUICK_PPO_STEPS + 3),
                       "--no-progress"], cwd=tmp_path)  # fmt: skip
    assert "loaded the SFT policy and the reward model" in proc.stderr
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, QUICK_PPO_STEPS + 4))
    assert all("gold/reward_mean" in r for r in rows)
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["rm_accuracy"] == summary_before["rm_accuracy"]  # stage 2 was not redone
    assert summary["ppo_steps"] == QUICK_PPO_STEPS + 3


@pytest.mark.slow
def test_compare_writes_table_and_plot(quick_run):
    """--compare: PPO, GRPO and DPO from the same SFT reference on the same held-out prompts; DPO trained on the
    reward model's own training pairs (pairs.jsonl, fusedrl dpo's format) raises the gold reward over SFT's."""
    from fusedrl.engine.dpo import load_pairs

    out, proc = quick_run
    result = json.loads((out / "compare.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["sft", "ppo", "grpo", "dpo"]
    for name in ("ppo", "grpo", "dpo"):
        r = methods[name]
        assert r["wall_s"] > 0 and r["kl"] > 0 and 0 <= r["gold"] <= 1, (name, r)
    summary = json.loads((out / "summary.json").read_text())
    assert (
        methods["sft"]["gold"] == summary["gold_reward_sft"] and methods["ppo"]["gold"] == summary["gold_reward_final"]
    )
    assert len(methods["grpo"]["gold_per_step"]) == QUICK_PPO_STEPS
    assert methods["dpo"]["gold"] > methods["sft"]["gold"] + 0.03, (methods["sft"]["gold"], methods["dpo"]["gold"])
    tok = build_char_tokenizer(demo.DIGITS + demo.SEPARATOR)
    pairs = load_pairs(out / "pairs.jsonl", tok)
    assert methods["dpo"]["pairs"] == len(pairs) and len(pairs) > 0.95 * demo.QUICK["rm_pairs"]
    dpo_rows = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(dpo_rows) == 2 * -(-len(pairs) // 32) and "rewards/accuracies" in dpo_rows[-1]
    for d in ("grpo/policy", "dpo/policy"):
        assert (out / d / "config.json").is_file(), d
    assert (out / "compare.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "DPO on the pairs" in proc.stdout and "GRPO vs reward model" in proc.stdout
