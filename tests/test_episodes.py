"""Multi-turn episodes (engine/episodes.py) on tiny models: token in, token out (the trained tokens are the sampled
ones, environment text appended as the chat template's delta), environment tokens out of every loss aggregation,
a one-turn environment equal to the single-turn trainer, GAE across observations against a reference written for
it, the tool-calling path with a chat tokenizer built in code, and bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from fusedrl.engine.episodes import EnvironmentFailure
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.packing import RolloutBuffer
from fusedrl.engine.ppo import loss_tokens_per_sequence, ppo_update
from fusedrl.engine.rollout_backends import HFBackend, RolloutBackend, RolloutOutput, hf_paged_available
from fusedrl.engine.scoring import MicroBatch, ResponseLayout
from fusedrl.engine.tokenizer import build_char_tokenizer
from fusedrl.engine.trainer import PPOConfig, PPOTrainer
from fusedrl.engine.trajectories import BUFFER_FIELDS
from fusedrl.kernels import linear_logprobs, linear_ppo_loss
from fusedrl.names import AGG_MODES
from helpers import Echo, OneTurn, assert_close, distinct_chars

PROMPTS = ["ab", "hello", "x", "1+1="]
SMALL = {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 5, "learning_rate": 1e-3,
         "critic_learning_rate": 1e-3, "progress": False, "rollout_backend": "hf"}  # fmt: skip


class RecordingBackend(HFBackend):
    """The hf backend, remembering every (context, sampled tokens) pair it produced."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def generate(self, policy, prompt_ids, *, n, spec, **kw):
        out = super().generate(policy, prompt_ids, n=n, spec=spec, **kw)
        for i, r in enumerate(out.responses):
            self.seen.add((tuple(prompt_ids[i // n]), tuple(r)))
        return out


def make(tok, reward=distinct_chars, env=Echo, rollout=None, **overrides):
    cfg = PPOConfig(**{**SMALL, **overrides})
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    return PPOTrainer(policy, tok, reward, cfg, environment_factory=env, rollout=rollout)


def turns_of(mask):
    """[(start, end)] of the maximal runs of loss mask 1."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def sequences(buf):
    offsets = np.asarray(buf.offsets())
    tokens, mask = np.asarray(buf.tokens()), np.asarray(buf.response_mask())
    return [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]


def test_tokens_trained_are_tokens_sampled(tok):
    backend = RecordingBackend()
    tr = make(tok, rollout=backend, advantage_estimator="grpo")
    torch.manual_seed(0)
    m = tr.step(PROMPTS[:2])
    seqs = sequences(tr.buffer)
    assert len(seqs) == 4
    multi = 0
    for tokens, mask in seqs:
        runs = turns_of(mask)
        multi += len(runs) > 1
        for s, e in runs:  # each turn: exactly what the engine sampled after exactly this context
            assert (tuple(tokens[:s]), tuple(tokens[s:e])) in backend.seen
        env = [t for (a, b), (c, _) in zip(runs, runs[1:]) for t in tokens[b:c]]
        assert all(tok.decode(tokens[b:c]) == " ok " for (_, b), (c, _) in zip(runs, runs[1:]))
        assert len(env) == 4 * (len(runs) - 1)
    assert multi == 4  # Echo answers twice: three turns each
    assert m["episode/turns"] == 3.0 and m["episode/truncated_frac"] == 0.0 and m["episode/env_tokens"] == 8.0
    # The reward function sees the whole episode after the prompt (observations included), plus get_reward's 3.
    completions = [tok.decode(t[k.index(1) :], skip_special_tokens=True) for t, k in seqs]
    assert m["rollout/reward_mean"] == pytest.approx(3.0 + np.mean(distinct_chars(None, completions)))


def test_environment_tokens_get_zero_gradient_in_every_aggregation(tok):
    tr = make(tok, advantage_estimator="grpo")
    torch.manual_seed(1)
    tr.step(PROMPTS[2:])
    buf = tr.buffer
    mask = np.asarray(buf.response_mask())
    offsets = np.asarray(buf.offsets())
    assert (mask == 0).sum() > (offsets[:-1] < offsets[1:]).sum() * 8  # prompts and observations
    trained = mask.copy()
    trained[offsets[:-1]] = 0  # a sequence's first token is never predicted
    assert loss_tokens_per_sequence(buf).tolist() == np.add.reduceat(trained, offsets[:-1]).tolist()
    mb = MicroBatch(buf, np.arange(len(buf)), tr.device, tr.layout)
    with torch.no_grad():
        hidden = tr.policy.model(mb.input_ids, position_ids=mb.position_ids, **mb.attn_kwargs)[0][0]  # (N, H)
    head = tr.policy.lm_head.weight.detach()
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(tr.layout.num_tokens, generator=g)
    # The current weights' log-probs, shifted: every ratio exp(0.1), inside the clip range, so no row is clipped.
    old = linear_logprobs(hidden[mb.rows], head, mb.labels, temperature=tr.config.temperature) - 0.1
    for agg in AGG_MODES:
        h = hidden.clone().requires_grad_(True)
        cfg = dataclasses.replace(tr._loss_config(0.0), agg=agg, agg_norm_length=8 if "norm" in agg else None)
        loss, _ = linear_ppo_loss(h[mb.rows], head, mb.labels, old, adv[mb.resp], config=cfg,
                                  cu_seqlens=mb.cu_rows)  # fmt: skip
        loss.backward(torch.tensor(1.0))
        nonzero = h.grad.abs().sum(1) != 0  # (N,) packed rows that got any gradient
        # The rows that got a gradient predict exactly the sampled tokens.
        predicts = torch.full((len(nonzero),), -1, dtype=torch.long)
        predicts[mb.rows] = mb.targets
        got = set(predicts[nonzero].tolist())
        assert got == set(np.flatnonzero(trained).tolist()), agg


def test_one_turn_environment_reproduces_single_turn_trainer(tok):
    runs = []
    for env in (None, OneTurn):
        tr = make(tok, env=env, advantage_estimator="grpo", total_steps=2)
        runs.append(tr.train(PROMPTS))
    for a, b in zip(*runs):
        keep = [k for k in a if not k.startswith("perf/")]
        assert {k: a[k] for k in keep} == {k: b[k] for k in keep}
        assert b["episode/turns"] == 1.0


def gae_reference(tokens_mask, values, rewards, gamma, lam):
    """GAE over one whole sequence where environment and prompt positions (mask 0) are not steps: walking back over
    every position, a sampled token's next value is the value at the next *sampled* token (0 after the last), so
    the critic bootstraps across observations and the discount applies once per sampled token."""
    adv = np.zeros(len(values))
    next_value, next_adv = 0.0, 0.0
    for t in range(len(values) - 1, -1, -1):
        if not tokens_mask[t]:
            continue
        delta = rewards[t] + gamma * next_value - values[t]
        adv[t] = next_adv = delta + gamma * lam * next_adv
        next_value = values[t]
    return adv


def test_gae_bootstraps_across_environment_tokens(tok):
    tr = make(tok, advantage_estimator="gae", whiten_advantages=False, gamma=0.9, lam=0.8)
    torch.manual_seed(2)
    tr.step(PROMPTS[:2])
    buf = tr.buffer
    mask = np.asarray(buf.response_mask())
    offsets = np.asarray(buf.offsets())
    v, r, a = (np.asarray(buf.field(n), dtype=np.float64) for n in ("values", "rewards", "advantages"))
    for s, e in zip(offsets[:-1], offsets[1:]):
        assert len(turns_of(mask[s:e])) == 3
        ref = gae_reference(mask[s:e], v[s:e], r[s:e], 0.9, 0.8)
        assert_close(a[s:e], ref, atol=1e-5, name="gae advantages")


def test_max_turns_truncates_and_mask_truncated_leaves_every_token_out(tok):
    tr = make(tok, advantage_estimator="grpo", max_turns=2, mask_truncated=True)
    torch.manual_seed(3)
    m = tr.step(PROMPTS[:2])
    assert m["episode/truncated_frac"] == 1.0 and m["episode/turns"] == 2.0
    # Every episode cut: nothing carries a loss, and the step's metrics stay finite (no 0 / 0).
    assert m["loss/policy"] == 0.0 and m["policy/grad_norm"] == 0.0
    assert all(math.isfinite(v) for v in m.values()), {k: v for k, v in m.items() if not math.isfinite(v)}
    buf = tr.buffer
    assert all(len(turns_of(mask)) == 2 for _, mask in sequences(buf))
    assert not np.asarray(buf.field("advantages")).any()


def test_episode_token_budget(tok):
    tr = make(tok, advantage_estimator="grpo", max_episode_tokens=7)
    torch.manual_seed(4)
    m = tr.step(PROMPTS[:2])
    for tokens, mask in sequences(tr.buffer):
        first = mask.index(1)
        assert len(tokens) - first <= 7
    assert m["episode/truncated_frac"] == 1.0  # 5 sampled + 4 observation tokens do not fit in 7


class Boom:
    def __init__(self, where):
        self.where = where

    def reset(self, **row):
        if self.where == "reset" and row["prompt"] == "hello":
            raise KeyError("no such level")

    def step(self, completion):
        if self.where == "step":
            raise RuntimeError("game over")

    def get_reward(self):
        if self.where == "get_reward":
            raise ZeroDivisionError("oops")
        return 0.0


@pytest.mark.parametrize("where", ["reset", "step", "get_reward"])
def test_environment_exception_names_class_and_row(tok, where):
    tr = make(tok, reward=None, env=lambda: Boom(where), advantage_estimator="grpo")
    with pytest.raises(EnvironmentFailure, match=rf"Boom\.{where} raised .*row \d+: \{{'prompt': "):
        tr.step(["ab", "hello"])


def test_reward_none_needs_get_reward(tok):
    with pytest.raises(ValueError, match="OneTurn has no get_reward"):
        make(tok, reward=None, env=OneTurn)


# ----------------------------------------------------------------------------------------------------
# Tools, with a chat tokenizer built here
# ----------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
UNSTABLE = CHAT_TEMPLATE.replace("{{ m.content }}", "{% if loop.last %}{{ m.content }}{% else %}.{% endif %}")


def chat_tokenizer(template=CHAT_TEMPLATE, response_template=None):
    chars = "0123456789abcdefghijklmnopqrstuvwxyz +-=*/.,:;?!()\n{}[]\"'_<>|"
    tok = build_char_tokenizer(chars)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = template
    if response_template is not None:  # transformers' response parser: tool calls read by the tokenizer itself
        tok.response_template = response_template
    return tok


def qwen_response_template():
    return pytest.importorskip("trl.chat_template_utils").qwen3_template


PARSERS = ["hermes", "response_template"]


class Calculator:
    def reset(self, **row):
        self.answer, self.said = row["answer"], None

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        return a * b

    def get_reward(self) -> float:
        return 1.0


class ScriptedBackend(RolloutBackend):
    """Answers turn k of every episode with script[k] (encoded), whatever the context: a policy that calls tools."""

    name = "scripted"
    returns_logprobs = False

    def __init__(self, tok, script):
        self.script = [tok(s, add_special_tokens=False)["input_ids"] for s in script]
        self.start = tok.convert_tokens_to_ids("<|im_start|>")

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        out = []
        for p in prompt_ids:
            turn = (sum(t == self.start for t in p) - 3) // 2  # system, user, assistant; then tool + assistant
            out += [self.script[min(turn, len(self.script) - 1)][: spec.max_new_tokens]] * n
        return RolloutOutput(out, None)


def tool_trainer(tok, script, **overrides):
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    cfg = PPOConfig(**{**SMALL, "max_new_tokens": 96, "advantage_estimator": "grpo", **overrides})
    return PPOTrainer(policy, tok, None, cfg, environment_factory=Calculator, rollout=ScriptedBackend(tok, script))


@pytest.mark.parametrize("parser", PARSERS)
def test_tool_calls_answered_as_tool_messages_token_in_token_out(parser):
    tok = chat_tokenizer(response_template=qwen_response_template() if parser == "response_template" else None)
    call = '<tool_call>{"name": "multiply", "arguments": {"a": 3, "b": 4}}</tool_call><|im_end|>'
    tr = tool_trainer(tok, [call, "12<|im_end|>"])
    m = tr.step([{"prompt": "3*4?", "answer": 12}])
    assert m["tools/calls"] == 1.0 and m["tools/failures"] == 0.0 and m["episode/turns"] == 2.0
    tokens, mask = sequences(tr.buffer)[0]
    sampled = [t for t, k in zip(tokens, mask) if k]
    assert sampled == tok(call + "12<|im_end|>", add_special_tokens=False)["input_ids"]
    # The whole sequence is the template's rendering of the conversation, the policy's turns as it wrote them.
    conversation = [{"role": "user", "content": "3*4?"}, {"role": "assistant", "content": call[: -len("<|im_end|>")]},
                    {"role": "tool", "name": "multiply", "content": "12"}, {"role": "assistant", "content": "12"}]  # fmt: skip
    schema = tr.episodes.schemas
    rendered = tok.apply_chat_template(conversation, tools=schema, tokenize=True, return_dict=False)
    assert tokens == list(rendered)[:-1]  # the template's newline after the last turn is not sampled


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first term.
        b: The second term.
    """
    return a + b


def test_stateless_tools_without_an_environment():
    tok = chat_tokenizer()
    call = '<tool_call>{"name": "add", "arguments": {"a": 30, "b": 4}}</tool_call><|im_end|>'
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    cfg = PPOConfig(**{**SMALL, "max_new_tokens": 96, "advantage_estimator": "grpo"})
    tr = PPOTrainer(policy, tok, distinct_chars, cfg, tools=[add], rollout=ScriptedBackend(tok, [call, "34<|im_end|>"]))
    m = tr.step(["30+4?"])
    assert m["tools/calls"] == 1.0 and m["tools/failures"] == 0.0 and m["episode/turns"] == 2.0
    tokens, mask = sequences(tr.buffer)[0]
    assert "tools: add" in tok.decode(tokens) and "<|im_start|>tool\n34<|im_end|>" in tok.decode(tokens)


def test_bad_tool_calls_are_answered_with_errors_and_counted():
    tok = chat_tokenizer()
    calls = ('<tool_call>{"name": "divide", "arguments": {"a": 1}}</tool_call>'
             '<tool_call>{"name": "multiply", "arguments": {"x": 1}}</tool_call><tool_call>{oops</tool_call><|im_end|>')  # fmt: skip
    tr = tool_trainer(tok, [calls, "done<|im_end|>"], max_new_tokens=200)
    m = tr.step([{"prompt": "hi", "answer": 0}])
    assert m["tools/calls"] == 3.0 and m["tools/failures"] == 3.0
    tokens, mask = sequences(tr.buffer)[0]
    env = tok.decode([t for t, k in zip(tokens, mask) if not k])
    assert "error: unknown tool 'divide'" in env and "error: bad arguments for multiply" in env
    assert "error: the tool call is not valid" in env


def test_malformed_call_through_the_response_parser_is_answered_with_its_error():
    tok = chat_tokenizer(response_template=qwen_response_template())
    tr = tool_trainer(tok, ["<tool_call>{oops</tool_call><|im_end|>", "done<|im_end|>"])
    m = tr.step([{"prompt": "hi", "answer": 0}])
    assert m["tools/calls"] == 1.0 and m["tools/failures"] == 1.0 and m["episode/turns"] == 2.0
    tokens, mask = sequences(tr.buffer)[0]
    assert "error: the tool call could not be parsed" in tok.decode([t for t, k in zip(tokens, mask) if not k])


def test_prefix_unstable_template_is_refused():
    tok = chat_tokenizer(UNSTABLE)
    call = '<tool_call>{"name": "multiply", "arguments": {"a": 3, "b": 4}}</tool_call><|im_end|>'
    tr = tool_trainer(tok, [call, "12<|im_end|>"])
    with pytest.raises(ValueError, match="not prefix-stable at turn 1 of row 0"):
        tr.step([{"prompt": "3*4?", "answer": 12}])


def test_tools_need_a_chat_template(tok):
    with pytest.raises(ValueError, match="Calculator offers tools but tokenizer .* has no chat template"):
        PPOTrainer(build_causal_lm("tiny-llama", vocab_size=len(tok)), tok, None, PPOConfig(**SMALL),
                   environment_factory=Calculator)  # fmt: skip


def test_budget_cut_turn_still_reaches_environment():
    tok = chat_tokenizer()
    call = '<tool_call>{"name": "multiply", "arguments": {"a": 3, "b": 4}}</tool_call>'  # no end of turn
    tr = tool_trainer(tok, [call + "zzz", "12<|im_end|>"], max_new_tokens=len(call))
    m = tr.step([{"prompt": "3*4?", "answer": 12}])
    assert m["tools/calls"] == 1.0 and m["episode/turns"] == 2.0
    tokens, mask = sequences(tr.buffer)[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    first_env = mask.index(0, mask.index(1))
    assert tokens[first_env] == end  # the template's end of turn closes the cut turn, outside the loss
    assert math.isfinite(m["loss/policy"])


@pytest.mark.skipif(not hf_paged_available(), reason="this transformers has no continuous batching")
def test_hf_paged_episodes_keep_engine_logprobs_of_sampled_tokens(tok):
    """hf-paged returns its own log-probs: they cover exactly the sampled tokens of every turn and match the
    trainer's (fp32), observations carry none."""
    tr = make(tok, advantage_estimator="grpo", rollout_backend="hf-paged")
    torch.manual_seed(5)
    m = tr.step(PROMPTS[:2])
    buf = tr.buffer
    mask = np.asarray(buf.response_mask()).astype(bool)
    engine, trainer = np.asarray(buf.field("rollout_logp")), np.asarray(buf.field("old_logp"))
    assert m["episode/turns"] == 3.0
    assert not engine[~mask].any()
    assert_close(engine[mask], trainer[mask], atol=1e-4, name="engine vs trainer log-probs")
    assert m["rollout/logp_mismatch_k3"] < 1e-10


ENV_FILE = """
class Guess:
    def reset(self, **row):
        self.target, self.turns = row["target"], 0
        return " guess:"

    def step(self, completion):
        self.turns += 1
        if row_fails(self.target):
            raise ValueError("cannot score " + self.target)
        return None if self.turns >= 2 else " again:"

    def get_reward(self):
        return float(self.turns)


def row_fails(target):
    return target == "boom"
"""


def test_cli_environment_run(tmp_path):
    """fusedrl train --environment file.py:Class, as a user runs it: episodes in the metrics, the row's columns in
    reset(), no reward function needed; an environment that raises stops the run naming the class and the row."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "env.py").write_text(ENV_FILE)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "target": t}) + "\n" for q, t in [("ab", "x"), ("cd", "y")]))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(rows), "--environment",
           f"{tmp_path / 'env.py'}:Guess", "--advantage-estimator", "grpo", "--prompts-per-step", "2",
           "--samples-per-prompt", "2", "--max-new-tokens", "4", "--total-steps", "2", "--max-turns", "3",
           "--threads", "1", "--no-progress", "--rollout-backend", "hf", "--output-dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    from fusedrl.engine.metrics import read_metrics

    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["episode/turns"] for m in metrics] == [2.0, 2.0]
    assert [m["rollout/reward_mean"] for m in metrics] == [2.0, 2.0]
    rows.write_text(json.dumps({"prompt": "ab", "target": "boom"}) + "\n")
    r = subprocess.run([*cmd[:-1], str(tmp_path / "run2")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=240, check=False)  # fmt: skip
    assert r.returncode != 0
    assert "Guess.step raised ValueError: cannot score boom (row 0: {'target': 'boom', 'prompt': 'ab'})" in r.stderr
    from fusedrl.engine import cli

    with pytest.raises(SystemExit, match=r"^fusedrl train: environment spec .*has no attribute 'Nope'$"):
        cli.main([*cmd[3:7], f"{tmp_path / 'env.py'}:Nope", *cmd[8:-1], str(tmp_path / "run3")])


def test_the_same_environment_class_runs_in_trl_grpo_trainer(tmp_path):
    """The contract is TRL's: the class given to PPOTrainer trains one step in TRL's GRPOTrainer unchanged (reset
    gets the row's columns, get_reward is the reward)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import os
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    tok = chat_tokenizer(CHAT_TEMPLATE.replace("{{ c.function.name }}", "{{ c.function | tojson }}"),
                         response_template=qwen_response_template())  # fmt: skip
    rows = []

    class Recording(Calculator):
        def reset(self, **row):
            rows.append(row)
            return super().reset(**row)

    prompt = [{"role": "user", "content": "3*4?"}]
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                          per_device_train_batch_size=2, num_generations=2, max_completion_length=8, max_steps=1,
                          save_strategy="no", beta=0.0, logging_steps=1, seed=0)  # fmt: skip
    trainer = trl.GRPOTrainer(model=build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0), args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": [prompt] * 2, "answer": [12, 12]}),
                              processing_class=tok, environment_factory=Recording)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert rows and all(r["answer"] == 12 and r["prompt"] == prompt for r in rows)
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert logged and logged[0]["reward"] == 1.0  # Calculator.get_reward, the only reward
    # And the same class in fusedrl, on the same rows.
    rows.clear()
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    tr = PPOTrainer(
        policy, tok, None, PPOConfig(**{**SMALL, "advantage_estimator": "grpo"}), environment_factory=Recording
    )
    m = tr.step([{"prompt": prompt, "answer": 12}])
    assert len(rows) == 2 and all(r["answer"] == 12 for r in rows) and m["rollout/reward_mean"] == 1.0


class Silent:
    """Answers with an empty observation: the next turn follows the last one directly."""

    def reset(self, **row):
        self.seen = []

    def step(self, completion):
        self.seen.append(completion)
        return None if len(self.seen) >= 2 else ""

    def get_reward(self):
        return float(len(self.seen[1]))


def test_each_step_sees_only_its_own_turn(tok):
    envs = []

    def factory():
        envs.append(Silent())
        return envs[-1]

    tr = make(tok, reward=None, env=factory, advantage_estimator="grpo", max_new_tokens=3, temperature=5.0)
    torch.manual_seed(6)
    tr.step(PROMPTS[:2])
    for env, (tokens, mask) in zip(envs[1:], sequences(tr.buffer)):  # envs[0] is the trainer's probe
        sampled = [t for t, k in zip(tokens, mask) if k]
        assert len(env.seen) == 2 and "".join(env.seen) == tok.decode(sampled, skip_special_tokens=True)
        assert all(len(c) <= 3 for c in env.seen)


def test_chat_prompt_needs_a_chat_template(tok):
    tr = make(tok)
    with pytest.raises(ValueError, match="row 0: the prompt is chat messages but tokenizer .* has no chat template"):
        tr.step([{"prompt": [{"role": "user", "content": "hi"}]}])


class ShortPromptsEnd:
    """Ends the episode after the first turn for a prompt of at most two characters; answers every turn of a
    longer one, which max_turns then cuts."""

    def reset(self, **row):
        self.short = len(row["prompt"]) <= 2

    def step(self, completion: str) -> str | None:
        return None if self.short else " ok "

    def get_reward(self) -> float:
        return 1.0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_mask_truncated_gradient_is_that_of_the_batch_without_truncated_episodes(tok, agg, monkeypatch):
    tr = make(tok, env=ShortPromptsEnd, advantage_estimator="gae", max_turns=2, mask_truncated=True, kl_coef=0.1,
              kl_in_reward=False, entropy_coef=0.01, loss_agg=agg, ppo_epochs=1, num_minibatches=1)  # fmt: skip
    torch.manual_seed(3)
    m = tr.step(PROMPTS[:2])  # "ab" ends after a turn, "hello" is cut by max_turns
    assert m["episode/truncated_frac"] == 0.5
    buf, layout = tr.buffer, tr.layout
    truncated = [len(turns_of(mask)) == 2 for _, mask in sequences(buf)]
    assert truncated == [False, False, True, True]
    assert not np.asarray(buf.field("advantages"))[np.asarray(buf.offsets())[2] :].any()
    g = torch.Generator().manual_seed(0)
    per_token = {name: layout.from_buffer(buf, name) for name in ("old_logp", "ref_logp", "values", "returns")}
    # Nonzero advantages and a KL term on every token: only the mask can keep truncated tokens out of the loss.
    per_token["advantages"] = torch.randn(layout.num_tokens, generator=g)
    per_token["ref_logp"] = per_token["ref_logp"] + 0.1 * torch.randn(layout.num_tokens, generator=g)
    per_token["returns"] = per_token["values"] + torch.randn(layout.num_tokens, generator=g)
    per_token["rollout_logp"] = None
    cut = torch.tensor(truncated)[layout.seq_index]

    grads = []

    def capture(model, optimizer, loss_ok=True):
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        model.zero_grad()
        return torch.tensor(0.0)

    monkeypatch.setattr(tr, "_optimizer_step", capture)
    masked = ppo_update(tr, {**per_token, "cut": cut.float()})
    unmasked = ppo_update(tr, {**per_token, "cut": None})
    # The same update on a batch of the episodes that ended by themselves.
    sub = RolloutBuffer(fields=BUFFER_FIELDS)
    for (tokens, mask), t in zip(sequences(buf), truncated):
        if not t:
            sub.append(np.asarray(tokens), np.asarray(mask))
    tr._buffer, tr.layout = sub, ResponseLayout(sub, tr.device)
    alone = ppo_update(tr, {k: None if v is None else v[~cut] for k, v in per_token.items()})
    (policy, critic), (policy_all, _), (policy_ref, critic_ref) = grads[0:2], grads[2:4], grads[4:6]
    assert policy.abs().sum() > 0 and critic.abs().sum() > 0
    assert_close(policy, policy_ref, atol=1e-6, name=f"policy gradient ({agg})")
    assert_close(critic, critic_ref, atol=1e-6, name=f"critic gradient ({agg})")
    assert not torch.allclose(policy, policy_all, atol=1e-4)  # the truncated episodes would have counted
    for k in ("loss/policy", "loss/value", "policy/kl", "policy/entropy"):
        assert masked[k] == pytest.approx(alone[k], rel=1e-5, abs=1e-7), k
    assert masked["loss/policy"] != pytest.approx(unmasked["loss/policy"], rel=1e-4)
