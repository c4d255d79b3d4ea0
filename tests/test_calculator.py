"""The calculator example (examples/calculator): its shipped files are what make_data.py writes; an SFT
demonstration is, token for token, the episode the RL runner records when the policy writes the demonstrated turns
(SFT teaches exactly what RL samples and parses); the environment rewards the product submitted after the tool call
with 1 and anything else with 0; evaluate.py runs on a random policy."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.rollout_backends import RolloutBackend, RolloutOutput
from fusedrl.engine.sft_cli import encode_demonstration
from fusedrl.engine.tokenizer import load_tokenizer
from fusedrl.engine.trainer import PPOConfig, PPOTrainer

CALC = Path(__file__).resolve().parent.parent / "examples" / "calculator"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"calculator_example_{name}", CALC / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(CALC))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(CALC))
    return mod


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(CALC / "tokenizer"))


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (CALC / f"{name}.jsonl").read_text().splitlines()]


def test_shipped_files_are_what_make_data_writes(tmp_path):
    load("make_data").main(["--out", str(tmp_path)])
    for name in ("sft.jsonl", "train.jsonl", "test.jsonl"):
        assert filecmp.cmp(tmp_path / name, CALC / name, shallow=False), name
    written = sorted(p.name for p in (tmp_path / "tokenizer").iterdir())
    assert written == sorted(p.name for p in (CALC / "tokenizer").iterdir())
    for name in written:
        assert filecmp.cmp(tmp_path / "tokenizer" / name, CALC / "tokenizer" / name, shallow=False), name
    pairs = [(r["a"], r["b"]) for name in ("train", "test") for r in rows(name)]
    pairs += [tuple(map(int, r["messages"][0]["content"].split("*"))) for r in rows("sft")]
    assert len(set(pairs)) == len(pairs) == 956  # no pair in two files
    first_calls = [r["messages"][1]["tool_calls"][0]["function"]["name"] for r in rows("sft")]
    assert first_calls.count("multiply") == 400 and first_calls.count("answer") == 200
    assert all(100_000 <= a * b <= 999_999 and 100 <= min(a, b) and max(a, b) <= 999 for a, b in pairs)


class Demonstrated(RolloutBackend):
    """Writes turn k of every episode as ``turns[k]`` (then an empty turn): a policy that does what it was shown."""

    name = "demonstrated"
    returns_logprobs = False

    def __init__(self, tok, turns: list[str]):
        self.turns = [tok(t, add_special_tokens=False)["input_ids"] for t in turns]
        self.header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.end = tok.convert_tokens_to_ids("<|im_end|>")

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        out = []
        for p in prompt_ids:
            k = sum(p[i : i + len(self.header)] == self.header for i in range(len(p))) - 1
            out += [(self.turns[k] if k < len(self.turns) else [])[: spec.max_new_tokens - 1] + [self.end]] * n
        return RolloutOutput(out, None)


def run_episodes(tok, row: dict, turns: list[str]):
    calc = load("calculator")
    cfg = PPOConfig(prompts_per_step=1, samples_per_prompt=2, max_new_tokens=64, max_turns=3,
                    advantage_estimator="grpo", progress=False)  # fmt: skip
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    tr = PPOTrainer(policy, tok, None, cfg, environment_factory=calc.Calculator, rollout=Demonstrated(tok, turns))
    return tr.episodes.run(tr, [row])


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_a_demonstration_is_token_for_token_the_episode_rl_records(tok):
    demo = next(r for r in rows("sft") if r["messages"][1]["tool_calls"][0]["function"]["name"] == "multiply")
    sft = encode_demonstration(tok, demo, "sft.jsonl")
    msgs = demo["messages"]
    a, b = msgs[1]["tool_calls"][0]["function"]["arguments"].values()
    turns = [call("multiply", a=a, b=b), call("answer", value=a * b)]
    ro = run_episodes(tok, {"prompt": msgs[0]["content"], "a": a, "b": b}, turns)
    assert ro.env_scores.tolist() == [1.0, 1.0]
    assert ro.stats["tools/calls"] == [2.0, 2.0] and ro.stats["tools/failures"] == [0.0, 0.0]
    assert ro.stats["episode/turns"] == [3.0, 3.0] and ro.truncated == [False, False]
    episode = ro.prompt_ids[0] + ro.output.responses[0]
    # The template ends the last turn with a newline the policy never samples: the demonstration has one token more.
    assert episode == sft.tokens[:-1]
    newline, end = tok.convert_tokens_to_ids("\n"), tok.convert_tokens_to_ids("<|im_end|>")
    sampled = [t for t, m in zip(ro.output.responses[0], ro.output.loss_mask[0]) if m]
    # SFT also trains the newline after each end of turn, which RL leaves to the template (loss mask 0).
    trained = [
        t for i, (t, m) in enumerate(zip(sft.tokens, sft.mask)) if m and not (t == newline and sft.tokens[i - 1] == end)
    ]
    assert sampled == trained
    assert "tools: answer multiply" in tok.decode(episode[: ro.output.loss_mask[0].index(1) + len(ro.prompt_ids[0])])


@pytest.mark.parametrize(
    "turns",
    [
        ["call:answer+1"],  # the tool called, a wrong number submitted
        ["answer-only"],  # a guess, no tool
        ["call:stop"],  # the tool called, nothing submitted
        ["call:answer+1", "answer"],  # the first answer counts
    ],
)
def test_only_the_product_submitted_scores(tok, turns):
    a, b = 347, 829
    script = {"call": call("multiply", a=a, b=b), "answer": call("answer", value=a * b),
              "answer+1": call("answer", value=a * b + 1), "answer-only": call("answer", value=280000),
              "stop": ""}  # fmt: skip
    written = [script[p] for t in turns for p in t.split(":")]
    ro = run_episodes(tok, {"prompt": f"{a}*{b}", "a": a, "b": b}, written)
    assert ro.env_scores.tolist() == [0.0, 0.0]


def test_sft_record_tools_reach_the_template_untrained(tok):
    demo = rows("sft")[0]
    sft = encode_demonstration(tok, demo, "sft.jsonl:1")
    context = tok.decode(sft.tokens[: sft.mask.index(1)])
    assert context.startswith("<|im_start|>system\ntools: answer multiply<|im_end|>")
    without = encode_demonstration(tok, {"messages": demo["messages"]}, "x")
    assert "tools:" not in tok.decode(without.tokens) and sum(without.mask) == sum(sft.mask)
    with pytest.raises(ValueError, match=r"^x: 'tools' must be a list of JSON schema objects, got str$"):
        encode_demonstration(tok, {**demo, "tools": "multiply"}, "x")


def test_evaluate_runs_on_a_random_policy(tok):
    evaluate = load("evaluate")
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    torch.set_num_threads(1)
    got = evaluate.success_rates(policy, tok, rows("test")[:2], samples=2)
    assert set(got) == {"greedy", "sampled", "tool_calls"}
    assert got["greedy"] == got["sampled"] == 0.0  # random weights do not multiply
