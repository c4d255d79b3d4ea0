"""``fusedrl dpo``: the data format and its errors (file:line), chat templates, pair-preserving packed
micro-batches against unpacked float64 log-probs, the config, and the trainer run as a user runs it (a
subprocess on the demo task), asserted on what it wrote and on the hidden gold reward, then resumed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close

from fusedrl.engine import demo, dpo
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.tokenizer import build_char_tokenizer

TASK = demo.DigitTask(prompt_len=(3, 6), completion_len=(3, 8))
SUBPROCESS_TIMEOUT_S = 600
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<a>{% endif %}")  # fmt: skip


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def test_string_records_encode_prompt_then_response_with_eos(tok, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "12:", "chosen": "98", "rejected": "1"}, "",
                                           {"prompt": "3:", "chosen": "4", "rejected": "55"}])  # fmt: skip
    pairs = dpo.load_pairs(f, tok)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(pairs) == 2  # the blank line is skipped
    assert pairs[0].prompt == enc("12:") and pairs[0].chosen == enc("98") + [tok.eos_token_id]
    assert pairs[1].rejected == enc("55") + [tok.eos_token_id]
    assert pairs[1].where == f"{f}:3"
    # max_length truncates the responses, never the prompt
    short = dpo.load_pairs(f, tok, max_length=4)
    assert short[0].chosen == enc("9") and short[1].rejected == enc("55")  # cut before its eos


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "1:", "chosen": "", "rejected": "2"}, "'chosen' is empty"),
        ({"prompt": "1:", "chosen": "2", "rejected": ""}, "'rejected' is empty"),
        ({"prompt": "1:", "chosen": "2"}, r"missing field\(s\) \['rejected'\]"),
        ({"prompt": "", "chosen": "2", "rejected": "3"}, "'prompt' encodes to zero tokens"),
        ({"prompt": "123456789:", "chosen": "2", "rejected": "3"}, "the prompt is 10 tokens, which leaves no room"),
        ({"prompt": "1:", "chosen": 2, "rejected": "3"}, "'chosen' must be a string"),
        ({"prompt": 7, "chosen": "2", "rejected": "3"}, "'prompt' must be a string or a list of chat messages"),
        ('{"prompt": "1:", ', "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"prompt": [{"role": "user", "content": "1"}], "chosen": "2", "rejected": "3"}, "has no chat template"),
    ],
)
def test_bad_records_name_file_and_line(tok, tmp_path, record, message):
    good = {"prompt": "5:", "chosen": "6", "rejected": "7"}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(ValueError, match=message) as e:
        dpo.load_pairs(f, tok, max_length=8)
    assert str(e.value).startswith(f"{f}:3: "), str(e.value)


def test_pair_over_the_token_budget_and_missing_file(tok, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "5:", "chosen": "6789", "rejected": "7"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: the pair is 11 tokens .* max_tokens_per_microbatch=10"):
        dpo.load_pairs(f, tok, max_pair_tokens=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dpo.load_pairs(tmp_path / "nope.jsonl", tok)
    with pytest.raises(ValueError, match="holds no records"):
        dpo.load_pairs(write_jsonl(tmp_path / "e.jsonl", [""]), tok)


def test_chat_messages_through_the_chat_template(tmp_path):
    tok = build_char_tokenizer("0123456789abcdefghijklmnopqrstuvwxyz <>:")
    tok.chat_template = CHAT_TEMPLATE
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "ok 3"}], "rejected": "no"},
            {"prompt": prompt, "chosen": [{"role": "assistant", "content": " "}], "rejected": "no"}]  # fmt: skip
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match=r"chat.jsonl:2: 'chosen' is empty"):
        dpo.load_pairs(f, tok)
    pair = dpo.load_pairs(write_jsonl(tmp_path / "one.jsonl", rows[:1]), tok)[0]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "ok 3"}], tokenize=False)
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert full.startswith(head)
    assert tok.decode(pair.prompt) == head and tok.decode(pair.chosen) == full[len(head) :]
    assert tok.decode(pair.rejected) == full[len(head) :].replace("ok 3", "no")
    assert pair.chosen[-1] == tok.eos_token_id  # the template's end of turn, no second eos appended


def test_cli_bad_record_is_one_line_naming_it(tmp_path):
    """``fusedrl dpo`` on a file with an empty response: exit status 1, one line naming file:line, no traceback,
    and nothing written to the output directory."""
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1:", "chosen": "2", "rejected": "3"},
                                               {"prompt": "1:", "chosen": "2", "rejected": ""}])  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", "dpo", "--data", str(f), "--output-dir",
                           str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"fusedrl dpo: {f}:2: 'rejected' is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_error_during_training_keeps_its_traceback(tmp_path, monkeypatch):
    """Set-up mistakes are one line (above); a ValueError raised by training itself is not the user's and must not
    be shortened into one (the set-up ran, so the data and model were fine)."""
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1:", "chosen": "2", "rejected": "3"}])
    calls = []
    monkeypatch.setattr(dpo, "setup", lambda cfg: (calls.append(cfg), ((), {}))[1])

    def broken(*a, **k):
        raise ValueError("boom inside a training step")

    monkeypatch.setattr(dpo, "train_dpo", broken)
    with pytest.raises(ValueError, match="boom inside a training step"):
        dpo.main(["--data", str(f), "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert len(calls) == 1
    monkeypatch.setattr(dpo, "setup", lambda cfg: (_ for _ in ()).throw(ValueError("bad setting")))
    with pytest.raises(SystemExit, match="fusedrl dpo: bad setting"):
        dpo.main(["--data", str(f), "--output-dir", str(tmp_path / "run"), "--no-progress"])


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
def test_config_and_flags(capsys):
    cfg = dpo.parse_args(["--data", "x.jsonl", "--loss-type", "simpo", "--beta", "2", "--simpo-gamma", "0.3"])
    assert cfg.loss_config().loss_type == "simpo" and cfg.beta == 2.0 and cfg.simpo_gamma == 0.3
    with pytest.raises(SystemExit):
        dpo.parse_args(["--data", "x.jsonl", "--loss-type", "kto"])
    assert "--loss-type must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dpo.parse_args([])
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo.DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing applies to dpo and simpo only"):
        dpo.DPOConfig(loss_type="orpo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="DPOConfig.pairs_per_step must be an int >= 1"):
        dpo.DPOConfig(pairs_per_step=0)


# ----------------------------------------------------------------------------------------------------
# Packed micro-batches
# ----------------------------------------------------------------------------------------------------
def test_micro_batches_keep_pairs_whole_and_match_unpacked_float64(tok):
    """A tight token budget splits the pairs over several micro-batches, each pair's two sequences in one;
    the packed sequence log-probs equal each sequence scored alone in float64."""
    rng = random.Random(0)
    pairs = []
    for i in range(9):
        p = TASK.prompts(1, rng)[0]
        pairs.append(dpo.EncodedPair(tok(p)["input_ids"], tok(TASK.demonstration(rng))["input_ids"] + [2],
                                     tok(TASK.demonstration(rng))["input_ids"] + [2], f"x:{i}"))  # fmt: skip
    buf, lengths = dpo.build_buffer(pairs)
    assert len(buf) == 18 and lengths.tolist() == [2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=1)
    model64 = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=1, dtype=torch.float64)
    budget = int(lengths.max()) + 8
    mbs = dpo.micro_batches(buf, lengths, np.arange(9), budget, torch.device("cpu"))
    assert len(mbs) > 2
    assert sorted(int(i) for ids, _ in mbs for i in ids) == list(range(9))
    for ids, mb in mbs:
        assert mb.input_ids.shape[1] <= budget
        assert mb.seq_ids.tolist() == [s for i in ids for s in (2 * i, 2 * i + 1)]
    got = dpo.reference_logps(model, buf, lengths, budget, torch.device("cpu"))
    truth = torch.zeros(9, 2, dtype=torch.float64)
    with torch.no_grad():
        for i, p in enumerate(pairs):
            for side, resp in enumerate((p.chosen, p.rejected)):
                lp = torch.log_softmax(model64(input_ids=torch.tensor([p.prompt + resp])).logits[0, :-1], -1)
                truth[i, side] = sum(lp[len(p.prompt) - 1 + j, t] for j, t in enumerate(resp))
    assert_close(got, truth, atol=1e-4, name="packed sequence log-probs")


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo", "orpo"])
def test_train_dpo_every_loss_and_the_micro_batch_split(loss_type, tok, tmp_path):
    """One step of ``train_dpo`` on 12 pairs in one micro-batch and in many (a tight budget): the same loss,
    metrics and gradient norm (the accumulation divides by the step's pairs, not the micro-batch's). At step
    one the policy is its own reference: DPO's loss is log 2 and IPO's (1 / (2 beta))^2."""
    rng = random.Random(2)
    pairs = []
    for i in range(12):
        p = TASK.prompts(1, rng)[0]
        pairs.append(dpo.EncodedPair(tok(p)["input_ids"], tok(TASK.demonstration(rng))["input_ids"] + [2],
                                     tok(TASK.demonstration(rng))["input_ids"] + [2], f"x:{i}"))  # fmt: skip
    _, lengths = dpo.build_buffer(pairs)
    cfg = dpo.DPOConfig(loss_type=loss_type, beta=0.2, rpo_alpha=0.5 if loss_type == "dpo" else 0.0,
                        pairs_per_step=12, learning_rate=1e-3, output_dir=str(tmp_path / "one"), progress=False)  # fmt: skip
    tight = dataclasses.replace(
        cfg, output_dir=str(tmp_path / "many"), max_tokens_per_microbatch=int(lengths.max()) + 4
    )
    runs = [dpo.train_dpo(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3), tok, pairs, c)[0]
            for c in (cfg, tight)]  # fmt: skip
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm"} | ({"nll_loss"} if loss_type in ("dpo", "orpo") else set()) | (
            {"log_odds_ratio"} if loss_type == "orpo" else set())  # fmt: skip
    assert keys <= set(runs[0]), keys - set(runs[0])
    for k in keys:
        assert_close(runs[1][k], runs[0][k], atol=1e-5 * max(1.0, abs(runs[0][k])), name=k)
    if loss_type == "dpo":  # + rpo_alpha * NLL of the chosen response per token
        assert_close(runs[0]["loss"], math.log(2) + 0.5 * runs[0]["nll_loss"], atol=1e-5, name="dpo loss at step 1")
        assert runs[0]["rewards/margins"] == 0.0
    if loss_type == "ipo":
        assert_close(runs[0]["loss"], (1 / 0.4) ** 2, atol=1e-4, name="ipo loss at step 1")
    assert (tmp_path / "one" / "policy" / "config.json").is_file() and (tmp_path / "one" / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------------------------------
# End to end, as a user runs it: the demo task
# ----------------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def _gold(model, tok, prompts) -> float:
    torch.manual_seed(123)
    texts, _, _ = demo.sample(model, tok, prompts, max_new_tokens=10)
    return sum(TASK.gold_scores(prompts, texts)) / len(prompts)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """An SFT policy on the demo task, pairs of its samples labelled by the gold scorer, then
    ``fusedrl dpo`` on them in a subprocess: (work dir, tokenizer, SFT policy, completed process)."""
    from fusedrl.engine.sft import SFTConfig, train_sft

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("dpo")
    tok = build_char_tokenizer(demo.DIGITS + demo.SEPARATOR)
    rng = random.Random(0)
    sft = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0, pad_token_id=tok.pad_token_id)
    prompts = TASK.prompts(1024, rng)
    train_sft(sft, tok, prompts, [TASK.demonstration(rng) for _ in prompts],
              SFTConfig(steps=120, batch_size=64, lr=3e-3), progress=False)  # fmt: skip
    sft.save_pretrained(work / "sft")
    tok.save_pretrained(work / "sft")
    prompts = TASK.prompts(512, rng)
    torch.manual_seed(0)
    a, _, _ = demo.sample(sft, tok, prompts, max_new_tokens=10)
    b, _, _ = demo.sample(sft, tok, prompts, max_new_tokens=10)
    pairs, _ = demo.label_pairs(TASK, prompts, a, b, flip_rate=0.0, rng=rng)
    write_jsonl(work / "pairs.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                       for p in pairs if p.chosen and p.rejected])  # fmt: skip
    proc = _run([sys.executable, "-m", "fusedrl.engine.cli", "dpo", "--policy", str(work / "sft"), "--data",
                 str(work / "pairs.jsonl"), "--output-dir", str(work / "run"), "--learning-rate", "1e-3",
                 "--beta", "0.1", "--epochs", "2", "--pairs-per-step", "32", "--max-tokens-per-microbatch", "512",
                 "--save-every", "10", "--threads", "1", "--no-progress"], cwd=work)  # fmt: skip
    return work, tok, sft, proc


@pytest.mark.slow
def test_dpo_cli_raises_the_gold_reward(dpo_run):
    from transformers import AutoModelForCausalLM

    work, tok, sft, proc = dpo_run
    n_pairs = len((work / "pairs.jsonl").read_text().splitlines())
    steps = 2 * -(-n_pairs // 32)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "grad_norm"):
        assert all(r[key] == r[key] for r in rows), key
    # DPO's loss starts at log 2 (policy = reference) and the implicit reward learns to rank the pairs.
    assert abs(rows[0]["loss"] - 0.6931) < 0.01, rows[0]["loss"]
    late = rows[-5:]
    assert sum(r["rewards/margins"] for r in late) / 5 > 0.05 and sum(r["rewards/accuracies"] for r in late) / 5 > 0.6
    assert (work / "run" / "latest").is_file() and (work / "run" / "config.yaml").is_file()
    policy = AutoModelForCausalLM.from_pretrained(work / "run" / "policy", local_files_only=True)
    held_out = TASK.prompts(256, random.Random(1))
    before, after = _gold(sft, tok, held_out), _gold(policy, tok, held_out)
    print(f"held-out gold reward: SFT {before:.3f} -> fusedrl dpo {after:.3f}")
    assert after > before + 0.03, (before, after)
    assert "model in" in proc.stderr


@pytest.mark.slow
def test_dpo_cli_resumes(dpo_run, tmp_path):
    """--resume continues from the last checkpoint with the stored reference log-probs (a third epoch)."""
    import shutil

    work, _, _, _ = dpo_run
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    n_pairs = len((work / "pairs.jsonl").read_text().splitlines())
    steps = 2 * -(-n_pairs // 32)
    proc = _run([sys.executable, "-m", "fusedrl.engine.cli", "dpo", "--policy", str(work / "sft"), "--data",
                 str(work / "pairs.jsonl"), "--output-dir", str(run), "--learning-rate", "1e-3", "--epochs", "3",
                 "--pairs-per-step", "32", "--max-tokens-per-microbatch", "512", "--resume", "--threads", "1",
                 "--no-progress"], cwd=tmp_path)  # fmt: skip
    assert "reference log-probs of" not in proc.stderr  # taken from the checkpoint, not recomputed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 3 * -(-n_pairs // 32) + 1))
    assert rows[steps]["loss"] < 0.6931  # the third epoch starts from the trained policy, not from scratch
    fresh = subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", "dpo", "--policy", str(work / "sft"),
                            "--data", str(work / "pairs.jsonl"), "--output-dir", str(run)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)  # fmt: skip
    assert fresh.returncode != 0 and "already holds a run" in fresh.stderr


# ----------------------------------------------------------------------------------------------------
# The reference on the fly (ref_logps="online")
# ----------------------------------------------------------------------------------------------------
def _pairs_of_task(tok, n: int, seed: int) -> list:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        p = TASK.prompts(1, rng)[0]
        pairs.append(dpo.EncodedPair(tok(p)["input_ids"], tok(TASK.demonstration(rng))["input_ids"] + [2],
                                     tok(TASK.demonstration(rng))["input_ids"] + [2], f"x:{i}"))  # fmt: skip
    return pairs


_ONLINE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "grad_norm")  # fmt: skip


@pytest.mark.parametrize("reference", ["policy", "other-model"])
def test_online_reference_makes_the_precomputed_losses(reference, tok, tmp_path, capsys):
    """Three steps with the reference scored per micro-batch on the fly equal three steps with the precomputed
    table: the same metrics every step and the same final weights. From step 2 on the policy has moved, so an
    online reference that followed the policy (instead of its initial weights) would show a zero margin."""
    pairs = _pairs_of_task(tok, 12, seed=4)
    _, lengths = dpo.build_buffer(pairs)
    runs = {}
    for mode in ("precompute", "online"):
        cfg = dpo.DPOConfig(loss_type="ipo" if reference == "other-model" else "dpo", beta=0.2, pairs_per_step=4,
                            learning_rate=1e-3, max_tokens_per_microbatch=int(lengths.max()) + 6, ref_logps=mode,
                            output_dir=str(tmp_path / mode), progress=False)  # fmt: skip
        policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3)
        ref = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=8) if reference == "other-model" else None
        runs[mode] = (dpo.train_dpo(policy, tok, pairs, cfg, ref_model=ref), policy.state_dict())
        # Online: no scoring pass up front.
        assert ("reference log-probs of 12 pairs" in capsys.readouterr().err) == (mode == "precompute")
    (pre, w_pre), (onl, w_onl) = runs["precompute"], runs["online"]
    assert len(pre) == len(onl) == 3
    assert abs(pre[1]["rewards/margins"]) > 1e-4  # the policy moved away from its reference
    for step, (a, b) in enumerate(zip(pre, onl), 1):
        for k in _ONLINE_KEYS:
            assert_close(b[k], a[k], atol=1e-5 * max(1.0, abs(a[k])), name=f"step {step} {k}")
    for k, v in w_pre.items():
        assert_close(w_onl[k], v, atol=1e-6, name=f"final weights {k}")


def test_online_reference_resumes_from_the_initial_policy(tok, tmp_path):
    """A resumed online run scores the reference with the policy's *initial* weights (those given to train_dpo),
    not the checkpoint's: steps after the resume equal the uninterrupted run's."""
    import shutil

    pairs = _pairs_of_task(tok, 9, seed=6)
    cfg = dpo.DPOConfig(beta=0.2, pairs_per_step=3, learning_rate=1e-3, ref_logps="online", save_every=1,
                        output_dir=str(tmp_path / "full"), progress=False)  # fmt: skip
    full = dpo.train_dpo(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3), tok, pairs, cfg)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "ckpt-3")  # a crash after step 2
    resumed = dpo.train_dpo(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3), tok, pairs,
                            dataclasses.replace(cfg, output_dir=str(tmp_path / "cut"), resume=True))  # fmt: skip
    assert [r["step"] for r in resumed] == [3]
    assert abs(full[2]["rewards/margins"]) > 1e-4
    for k in _ONLINE_KEYS:
        assert_close(resumed[0][k], full[2][k], atol=1e-5 * max(1.0, abs(full[2][k])), name=k)


def test_online_reference_config(tok, tmp_path):
    assert dpo.parse_args(["--data", "x.jsonl", "--ref-logps", "online"]).ref_logps == "online"
    assert dpo.DPOConfig().ref_logps == "precompute"
    with pytest.raises(ValueError, match="DPOConfig.ref_logps must be 'precompute' or 'online', got 'lazy'"):
        dpo.DPOConfig(ref_logps="lazy")
    pairs = _pairs_of_task(tok, 2, seed=1)
    cfg = dpo.DPOConfig(ref_logps="online", output_dir=str(tmp_path / "r"), progress=False)
    with pytest.raises(ValueError, match="ref_logps .* was given but cfg.ref_logps='online'"):
        dpo.train_dpo(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3), tok, pairs, cfg,
                      ref_logps=torch.zeros(2, 2))  # fmt: skip


def test_resume_precompute_from_an_online_checkpoint_with_a_ref_policy_is_refused(tok, tmp_path):
    """An online run's checkpoint holds no reference table; resuming it as precompute with a --ref-policy
    (which run() does not load on resume) must not silently take the policy as the reference."""
    pairs = _pairs_of_task(tok, 4, seed=2)
    cfg = dpo.DPOConfig(pairs_per_step=2, ref_logps="online", save_every=1, epochs=1, output_dir=str(tmp_path / "r"),
                        progress=False)  # fmt: skip
    dpo.train_dpo(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3), tok, pairs, cfg,
                  ref_model=build_causal_lm("tiny-llama", vocab_size=len(tok), seed=4))  # fmt: skip
    again = dataclasses.replace(cfg, ref_logps="precompute", ref_policy="some-ref", epochs=2, resume=True)
    with pytest.raises(ValueError, match="holds no reference log-probs .* resume with --ref-logps online"):
        dpo.train_dpo(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3), tok, pairs, again)
    fresh = dataclasses.replace(cfg, ref_logps="precompute", ref_policy="some-ref", output_dir=str(tmp_path / "f"))
    with pytest.raises(ValueError, match="ref_policy='some-ref' but neither ref_logps nor ref_model was given"):
        dpo.train_dpo(build_causal_lm("tiny-llama", vocab_size=len(tok), seed=3), tok, pairs, fresh)
