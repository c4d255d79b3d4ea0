"""Multi-turn episodes: the policy against an environment, turn by turn, as one trajectory per episode.

    class Calculator:                            # TRL's environment_factory contract, unchanged
        def reset(self, **row) -> str | None:    # one instance per rollout; the row's columns, prompt included
            self.answer = row["answer"]
        def multiply(self, a: int, b: int) -> int:
            '''Multiply two integers.

            Args:
                a: The first factor.
                b: The second factor.
            '''
            return a * b                         # public methods are tools (schema from hints + docstring)
        def get_reward(self) -> float: ...       # optional: the environment owns the reward

    PPOTrainer(policy, tok, None, PPOConfig(max_turns=4), environment_factory=Calculator).train(rows)

An environment is either a **tool environment** (its public methods other than ``reset`` / ``get_reward`` are
tools, rendered by the chat template; tool calls are parsed from the policy's turn, run, and answered as tool
messages; a turn without a tool call ends the episode) or a **text environment** (it defines ``step(completion:
str) -> str | None``: every turn goes to it; a string is the next observation, None ends the episode).

An episode: the policy samples a turn (up to a stop token or ``max_new_tokens``); the environment answers; its
text is tokenized once and appended; repeat until the environment ends it, ``max_turns`` or the episode's token
budget (then it is flagged truncated; the environment still saw that last turn: its ``step`` ran, or its tool
calls). A turn cut by ``max_new_tokens`` still goes to the environment. Token in,
token out: the policy's sampled tokens are kept as sampled, never decoded and re-encoded; the loss mask is 1 on
them and 0 on the prompt and on every environment token.

All active episodes' next turns are generated together. Turn-synchronous (plain hf, which cannot admit a request
mid-generation; hf-paged by default): one backend call per turn, then the environment calls, concurrently in
``EpisodeConfig.environment_workers`` threads. Re-admitting (vllm; hf-paged with ``readmit=True``): an episode's
environment runs while the engine decodes the others and its next turn joins the running batch as soon as the
observation is ready (``episode_stream.py``, which also says what stays reproducible). Either way an episode sees
only its own turns and its own environment's answers, whatever order the environments answer in.

Environment text with a chat template (tool environments, or chat prompts) is the template's rendering of only
the new messages: the conversation is rendered before and after them, and the tokens after the end of the
policy's turn (the last stop token) are appended. A template that renders the earlier conversation differently
once the new messages follow (not prefix-stable) is refused with an error naming the template and the turn.
Without a chat template an observation is appended as its plain encoding.

For GAE the environment tokens are not steps: the per-token recursion runs over the sampled tokens only, so the
value of the last token before an observation bootstraps from the value of the first token after it (the state
that includes the observation), discounted once.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .data import encode_prompts, is_conversation
from .episode_stream import readmits, run_readmitting
from .rewards import check_rewards
from .rollout_backends import RolloutOutput, SamplingSpec

# A tool call as Hermes / Qwen chat templates write it: a JSON object {"name": ..., "arguments": {...}}.
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NOT_TOOLS = ("reset", "step", "get_reward")


class EnvironmentFailure(RuntimeError):
    """An environment's ``reset`` / ``step`` / ``get_reward`` raised: the run stops, naming the class and the row."""


@dataclass
class Rollout:
    """A step's trajectories as the trainer consumes them: per sequence its prompt ids, the producer's output
    (responses with loss mask and engine log-probs), the prompt and completion texts the reward sees, the
    environments' rewards (or None), truncation flags and per-episode statistics for the metrics."""

    prompt_ids: list[list[int]]
    output: RolloutOutput
    prompts: list[str]
    completions: list[str]
    env_scores: torch.Tensor | None = None
    truncated: list[bool] | None = None
    stats: dict[str, list[float]] = field(default_factory=dict)


def single_turn(tr, prompts: Sequence[str]) -> Rollout:
    """The trainer's plain rollout: ``samples_per_prompt`` responses per prompt, one turn each."""
    cfg = tr.config
    prompt_ids = encode_prompts(tr.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, context=tr.context)
    if (longest := max(len(p) for p in prompt_ids) + cfg.max_new_tokens) > cfg.max_tokens_per_microbatch:
        raise ValueError(f"PPOConfig.max_tokens_per_microbatch={cfg.max_tokens_per_microbatch} is smaller than the "
                         f"longest possible sequence ({longest} tokens: prompt + max_new_tokens)")  # fmt: skip
    # Each prompt goes to the engine once with n samples (one prefill, shared KV); the group comes back
    # consecutive, as the group estimators expect.
    out = generate(tr, prompt_ids, n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens)
    n = cfg.samples_per_prompt
    completions = tr.tokenizer.batch_decode(out.responses, skip_special_tokens=True)
    return Rollout([p for p in prompt_ids for _ in range(n)], out, [p for p in prompts for _ in range(n)], completions)


def generate(tr, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int) -> RolloutOutput:
    """``n`` samples per prompt from the trainer's producer, checked."""
    cfg = tr.config
    spec = SamplingSpec(max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    out = tr.rollout.generate(tr.policy, prompt_ids, n=n, spec=spec, stop_ids=tr.stop_ids,
                              pad_token_id=tr.pad_token_id)  # fmt: skip
    out.check(len(prompt_ids) * n, tr.rollout_backend)
    return out


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a tool (type hints + Google-style docstring, through transformers), or a clear error."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - transformers raises several types; all mean the same to the user
        raise TypeError(f"tool {getattr(fn, '__qualname__', fn)!r} cannot be described to the policy: {e} (a tool "
                        "needs type hints and a Google-style docstring with an Args section)") from e  # fmt: skip


@dataclass
class _Episode:
    env: object
    row: dict
    index: int  # the row's position in the step's batch, for messages
    prompt: list[int]
    prompt_text: str
    limit: int  # most tokens after the prompt
    messages: list[dict] | None  # the conversation so far, when the chat template renders it
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    last_turn: int = 0  # tokens the policy sampled in its latest turn
    done: bool = False
    truncated: bool = False
    tool_calls: int = 0
    tool_failures: int = 0


class EpisodeRunner:
    """Runs a step's episodes for a trainer: ``run(trainer, rows)`` -> ``Rollout`` (see the module docstring).
    ``factory``: a zero-argument callable returning a fresh environment (a class); ``tools``: stateless tool
    functions offered beside the environment's methods."""

    def __init__(self, factory: Callable, tokenizer, config, *, stop_ids: Sequence[int], context: int | None,
                 tools: Sequence[Callable] = (), has_reward_fn: bool = True):  # fmt: skip
        if not callable(factory):
            raise TypeError(f"environment_factory must be a callable returning an environment, got {factory!r}")
        self.factory, self.tokenizer, self.config = factory, tokenizer, config
        self.stop_ids, self.context = set(stop_ids), context
        probe = factory()
        cls = type(probe)
        self.name = cls.__name__
        methods = {n for n, _ in inspect.getmembers(cls, predicate=inspect.isfunction)}
        if "reset" not in methods:
            raise TypeError(f"environment {self.name} must define reset(**row) -> str | None")
        self.text_env = "step" in methods
        self.env_reward = "get_reward" in methods
        if not has_reward_fn and not self.env_reward:
            raise ValueError(f"reward is None but environment {self.name} has no get_reward(): give a reward or "
                             "let the environment own it")  # fmt: skip
        self.tool_names = [] if self.text_env else sorted(n for n in methods if n not in _NOT_TOOLS
                                                          and not n.startswith("_"))  # fmt: skip
        self.free_tools = {t.__name__: t for t in tools}
        self.schemas = [tool_schema(getattr(probe, n)) for n in self.tool_names]
        self.schemas += [tool_schema(t) for t in self.free_tools.values()]
        self.template = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if self.schemas and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"environment {self.name} offers tools but tokenizer {self.template!r} has no chat "
                             "template to render them")  # fmt: skip
        if not self.schemas and not self.text_env:
            raise TypeError(f"environment {self.name} has neither tools (public methods) nor step(completion)")

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------
    def run(self, tr, rows: Sequence) -> Rollout:
        """Every row's ``samples_per_prompt`` episodes (consecutive), run to their end."""
        cfg = tr.config
        n = cfg.samples_per_prompt
        episodes = [self._start(row, i, tr) for i, row in enumerate(rows) for _ in range(n)]
        workers = cfg.environment_workers
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="fusedrl-env") if workers > 1 else _Inline() as pool:
            if readmits(tr):
                has_logprobs = run_readmitting(self, tr, episodes, None if workers == 1 else pool)
            else:
                has_logprobs = self._run_turns(tr, episodes, pool)
        return self._finish(episodes, has_logprobs=has_logprobs)

    def _run_turns(self, tr, episodes: list[_Episode], pool) -> bool:
        """Turn-synchronous: every active episode's next turn in one backend call, then their environment calls
        (concurrently in ``pool``). True when every turn came with the engine's log-probs."""
        cfg = tr.config
        n = cfg.samples_per_prompt
        active, first, has_logprobs = list(episodes), True, True
        while active:
            budget = [min(cfg.max_new_tokens, e.limit - len(e.tokens)) for e in active]
            prompts = [e.prompt + e.tokens for e in active]
            if first and all(prompts[i] == prompts[i - i % n] for i in range(len(prompts))):
                # The first turn of a group shares its prompt: one request with n samples (one prefill).
                out = generate(tr, prompts[::n], n=n, max_new_tokens=max(budget))
            else:
                out = generate(tr, prompts, n=1, max_new_tokens=max(budget))
            first = False
            for j, e in enumerate(active):
                self._add_turn(e, out.responses[j], None if out.logprobs is None else out.logprobs[j], budget[j])
            has_logprobs = has_logprobs and out.logprobs is not None
            reads = [self._read(e) for e in active]
            for e, read, reply in zip(active, reads, pool.map(self._ask, active, reads)):
                self._take(e, read, reply)
            active = [e for e in active if not e.done]
        return has_logprobs

    @staticmethod
    def _add_turn(e: _Episode, tokens: list[int], logprobs, budget: int) -> None:
        """Append a sampled turn (cut to the episode's ``budget``) with its log-probs (zeros when the engine gave
        none), loss mask 1."""
        toks = list(tokens[:budget])
        lps = logprobs[:budget] if logprobs is not None else [0.0] * len(toks)
        e.tokens += toks
        e.mask += [1] * len(toks)
        e.logprobs += [float(x) for x in lps]
        e.turns, e.last_turn = e.turns + 1, len(toks)

    def _start(self, row, index: int, tr) -> _Episode:
        row = {"prompt": row} if isinstance(row, str) else dict(row)
        if "prompt" not in row:
            raise ValueError(f"row {index} has no 'prompt' (environment rows are strings or dicts with a prompt)")
        prompt = row["prompt"]
        env = self.factory()
        obs = self._call(env, "reset", row, index, **row)
        if obs is not None and not isinstance(obs, str):
            raise TypeError(f"environment {self.name}.reset returned {type(obs).__name__} for row {index}; expected "
                            "a string or None")  # fmt: skip
        chat = bool(self.schemas) or is_conversation(prompt)
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"row {index}: the prompt is chat messages but tokenizer {self.template!r} has no chat "
                             "template to render them")  # fmt: skip
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
            if obs:  # appended to the last message, as TRL does
                messages[-1] = {**messages[-1], "content": messages[-1]["content"] + obs}
            ids = self._render(messages, add_generation_prompt=True)
            text = self.tokenizer.decode(ids)
        else:
            if not isinstance(prompt, str):
                raise TypeError(f"row {index}: prompt must be a string or chat messages, got {type(prompt).__name__}")
            messages, text = None, prompt + (obs or "")
            ids = encode_prompts(self.tokenizer, [text], max_new_tokens=1, context=self.context)[0]
        cfg = tr.config
        room = [cfg.max_tokens_per_microbatch - len(ids)]
        if self.context is not None:
            room.append(self.context - len(ids))
        if cfg.max_episode_tokens is not None:
            room.append(cfg.max_episode_tokens)
        if min(room) < 1:
            raise ValueError(f"row {index}: the prompt is {len(ids)} tokens, which leaves no room for a response "
                             f"within max_tokens_per_microbatch={cfg.max_tokens_per_microbatch} and the model's "
                             f"context {self.context}")  # fmt: skip
        return _Episode(env, row, index, list(ids), text, min(room), messages)

    def _answer(self, e: _Episode) -> None:
        """The environment's answer to the episode's last turn: appended, or the episode ends."""
        read = self._read(e)
        self._take(e, read, self._ask(e, read))

    # An answer in three parts, so that the environment call alone can run in a worker thread while the engine
    # generates: _read (tokenizer, this thread), _ask (the environment, any thread), _take (tokenizer, this thread).
    def _read(self, e: _Episode) -> tuple:
        """(turn text, ended by a stop token, tool calls, the turn's other text) of the episode's last turn."""
        turn = e.tokens[len(e.tokens) - e.last_turn :]
        ended = bool(turn) and turn[-1] in self.stop_ids
        text = self.tokenizer.decode(turn, skip_special_tokens=True)
        calls, content = ([], "") if self.text_env else self._tool_calls(e, turn, text)
        return text, ended, calls, content

    def _ask(self, e: _Episode, read: tuple):
        """The environment's reply to a turn: the new messages and the assistant message, or None (episode over).
        Touches only this episode's environment (and the stateless tools)."""
        text, _, calls, content = read
        if self.text_env:
            obs = self._call(e.env, "step", e.row, e.index, text)
            if obs is None:
                return None
            if not isinstance(obs, str):
                raise TypeError(f"environment {self.name}.step returned {type(obs).__name__} for row {e.index}; "
                                "expected a string or None")  # fmt: skip
            return [{"role": "user", "content": obs}], {"role": "assistant", "content": text}
        if not calls:
            return None
        new = []
        assistant = {"role": "assistant", "content": content, "tool_calls": []}
        for raw in calls:
            name, answer, ok, call = self._run_tool(e, raw)
            e.tool_calls += 1
            e.tool_failures += not ok
            if call is not None:
                assistant["tool_calls"].append(call)
            new.append({"role": "tool", "name": name, "content": answer})
        return new, assistant

    def _take(self, e: _Episode, read: tuple, reply) -> None:
        """Append the environment's reply as tokens, or end the episode (by the environment or a limit)."""
        if reply is None:
            e.done = True
            return
        new, assistant = reply
        if e.turns >= self.config.max_turns:  # the environment would go on: cut from outside
            e.done = e.truncated = True
            return
        if e.messages is not None:
            e.messages.append(assistant)
            delta = self._delta(e, new, read[1])
        else:
            delta = self.tokenizer(new[0]["content"], add_special_tokens=False)["input_ids"]
        if len(e.tokens) + len(delta) >= e.limit:  # no room for the observation and a next turn
            e.done = e.truncated = True
            return
        e.tokens += delta
        e.mask += [0] * len(delta)
        e.logprobs += [0.0] * len(delta)

    def _finish(self, episodes: list[_Episode], *, has_logprobs: bool) -> Rollout:
        env_scores = None
        if self.env_reward:
            values = [self._call(e.env, "get_reward", e.row, e.index) for e in episodes]
            env_scores = check_rewards(values, len(episodes), source=f"environment {self.name}.get_reward")
        out = RolloutOutput([e.tokens for e in episodes], [e.logprobs for e in episodes] if has_logprobs else None,
                            [e.mask for e in episodes])  # fmt: skip
        stats = {
            "episode/turns": [float(e.turns) for e in episodes],
            "episode/truncated_frac": [float(e.truncated) for e in episodes],
            "episode/env_tokens": [float(len(e.mask) - sum(e.mask)) for e in episodes],
        }
        if self.schemas:
            stats["tools/calls"] = [float(e.tool_calls) for e in episodes]
            stats["tools/failures"] = [float(e.tool_failures) for e in episodes]
        completions = self.tokenizer.batch_decode(out.responses, skip_special_tokens=True)
        return Rollout([e.prompt for e in episodes], out, [e.prompt_text for e in episodes], completions,
                       env_scores, [e.truncated for e in episodes], stats)  # fmt: skip

    # ------------------------------------------------------------------------------------------------
    # Environment text
    # ------------------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tools=self.schemas or None, tokenize=True, return_dict=False,
                                                 add_generation_prompt=add_generation_prompt)  # fmt: skip
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def _delta(self, e: _Episode, new: list[dict], ended: bool) -> list[int]:
        """The tokens the chat template adds for ``new`` messages after the policy's turn (which the conversation
        already ends with): everything after the stop token that closes that turn in the template's rendering,
        that stop token included when the policy's turn was cut before sampling one."""
        before = self._render(e.messages, add_generation_prompt=False)
        e.messages.extend(new)
        after = self._render(e.messages, add_generation_prompt=True)
        stops = [i for i, t in enumerate(before) if t in self.stop_ids]
        if not stops:
            raise ValueError(f"chat template of {self.template!r} renders the policy's turn without a stop token "
                             f"{sorted(self.stop_ids)}: cannot tell where environment text starts "
                             f"(turn {e.turns})")  # fmt: skip
        cut = stops[-1] + 1
        if after[:cut] != before[:cut]:
            at = next(i for i, (a, b) in enumerate(zip(after, before)) if a != b)
            raise ValueError(
                f"chat template of {self.template!r} is not prefix-stable at turn {e.turns} of row {e.index}: adding "
                f"the environment's messages re-renders the earlier conversation differently (first difference at "
                f"token {at}), so the tokens the policy sampled would not be what it sees next turn"
            )
        return after[cut if ended else cut - 1 :]

    def _tool_calls(self, e: _Episode, turn: list[int], text: str) -> tuple[list, str]:
        """The turn's tool calls, each a dict {"name", "arguments"} or an error message for one written malformed,
        and the turn's other text: through the tokenizer's own response parser when it has one
        (``response_template``), else in the Hermes / Qwen format ``<tool_call>{json}</tool_call>``."""
        if getattr(self.tokenizer, "response_template", None) is not None:
            context = e.prompt + e.tokens[: len(e.tokens) - len(turn)]
            try:
                parsed = self.tokenizer.parse_response(turn, prefix=context, tools=self.schemas or None)
            except ValueError as err:  # the parser's message: which region, what it could not read
                return [f"the tool call could not be parsed ({str(err).splitlines()[0]})"], text
            calls = [c.get("function", c) if isinstance(c, dict) else c for c in parsed.get("tool_calls") or []]
            return calls, parsed.get("content") or ""
        calls = []
        for raw in _TOOL_CALL.findall(text):
            try:
                calls.append(json.loads(raw))
            except json.JSONDecodeError as err:
                calls.append(f"the tool call is not valid JSON ({err.msg})")
        return calls, _TOOL_CALL.sub("", text).strip()

    def _run_tool(self, e: _Episode, call):
        """(tool name, message content, succeeded, the call as a chat-template tool_call or None) for a parsed call
        or a parse error. A bad call is answered with an error message, as TRL does."""
        if isinstance(call, str):
            return "unknown", f"error: {call}", False, None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return "unknown", 'error: a tool call must be a JSON object {"name": ..., "arguments": {...}}', False, None
        name, args = call["name"], call.get("arguments") or {}
        entry = {"type": "function", "function": {"name": name, "arguments": args}}
        fn = self.free_tools.get(name) or (getattr(e.env, name) if name in self.tool_names else None)
        if fn is None:
            known = self.tool_names + list(self.free_tools)
            return name, f"error: unknown tool {name!r}; available: {known}", False, entry
        if not isinstance(args, dict):
            return name, f"error: the arguments of {name} must be a JSON object, got {json.dumps(args)}", False, entry
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as err:
            return name, f"error: bad arguments for {name}: {err}", False, entry
        try:
            return name, str(fn(**args)), True, entry
        except Exception as err:  # noqa: BLE001 - a failing tool is the policy's problem: it reads the error
            return name, f"error: {name} raised {type(err).__name__}: {err}", False, entry

    def _call(self, env, what: str, row: dict, index: int, *args, **kwargs):
        try:
            return getattr(env, what)(*args, **kwargs)
        except Exception as err:
            shown = {k: (v if len(repr(v)) <= 80 else repr(v)[:77] + "...") for k, v in row.items()}
            raise EnvironmentFailure(f"environment {self.name}.{what} raised {type(err).__name__}: {err} (row {index}: "
                                    f"{shown})") from err  # fmt: skip


class _Inline:
    """``environment_workers=1``: environment calls run here, one at a time, in episode order."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, *iterables):
        return map(fn, *iterables)


class _Stateless:
    """The environment of ``tools=[...]`` given alone: nothing to reset, the tools are plain functions."""

    def reset(self, **row) -> None:
        return None


def make_episode_runner(environment_factory, tools, tokenizer, config, *, stop_ids, context,
                        has_reward_fn: bool) -> EpisodeRunner | None:  # fmt: skip
    """The trainer's episode runner: for an environment, or for stateless ``tools`` alone (as TRL's ``tools=``);
    None for neither."""
    if environment_factory is None:
        if not tools:
            return None
        environment_factory = _Stateless
    return EpisodeRunner(environment_factory, tokenizer, config, stop_ids=stop_ids, context=context, tools=tools or (),
                         has_reward_fn=has_reward_fn)  # fmt: skip


def mask_truncated(adv: torch.Tensor, layout, truncated: Sequence[bool] | None):
    """``PPOConfig.mask_truncated``: the episodes cut by a limit carry no loss. Returns the advantages (R,) with theirs
    zeroed and ``cut`` (R,) float32, 1 on their tokens, which the update leaves out of every loss and denominator
    (float: gathered over ranks with the other per-token tensors); ``(adv, None)`` without episodes."""
    if truncated is None:
        return adv, None
    cut = torch.tensor(list(truncated), dtype=torch.bool, device=layout.device)[layout.seq_index]
    return adv.masked_fill(cut, 0.0), cut.float()
