"""Re-admitting episodes (engine/episode_stream.py) and concurrent environment calls: on hf-paged an episode's
next turn starts while other episodes' turns still decode, and every episode's tokens, masks and engine
log-probs are still right; the plain hf loop runs environment calls concurrently (or one at a time, in order,
with environment_workers=1)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.rollout_backends import HFPagedBackend, hf_paged_available
from fusedrl.engine.trainer import PPOConfig, PPOTrainer
from helpers import assert_close

SMALL = {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 6, "max_turns": 3, "progress": False,
         "advantage_estimator": "grpo", "learning_rate": 1e-3}  # fmt: skip
ROWS = [{"prompt": p, "delay": d} for p, d in (("ab", 0.0), ("hello", 0.08), ("x", 0.0), ("1+1=", 0.08))]


class Slow:
    """A text environment whose step sleeps the row's ``delay`` (a remote environment's latency) on the first
    answer; its observations name the turn, so each episode's context shows which answers it got."""

    calls: list = []  # (row prompt, turn, start, end), all instances

    def reset(self, **row):
        self.prompt, self.delay, self.turns = row["prompt"], row.get("delay", 0.0), 0

    def step(self, completion: str) -> str | None:
        start = time.perf_counter()
        if self.turns == 0:
            time.sleep(self.delay)
        self.turns += 1
        Slow.calls.append((self.prompt, self.turns, start, time.perf_counter()))
        return None if self.turns >= 3 else f" ok{self.turns} "

    def get_reward(self) -> float:
        return float(self.turns)


class Recording(HFPagedBackend):
    """hf-paged whose sessions log ("submit" | "finish", episode) in order."""

    def __init__(self):
        super().__init__()
        self.events = []

    def stream(self, policy, **kw):
        session, events = super().stream(policy, **kw), self.events
        submit, poll = session.submit, session.poll

        def logged_submit(key, prompt_ids, *, n, **k):
            events.extend(("submit", key + i) for i in range(n))
            submit(key, prompt_ids, n=n, **k)

        def logged_poll(timeout):
            done = poll(timeout)
            events.extend(("finish", key) for key, _, _ in done)
            return done

        session.submit, session.poll = logged_submit, logged_poll
        return session


def make(tok, rollout=None, env=None, **overrides):
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    return PPOTrainer(policy, tok, None, PPOConfig(**{**SMALL, **overrides}), environment_factory=env or Slow,
                      rollout=rollout)  # fmt: skip


def episodes_of(tr):
    buf = tr.buffer
    offsets = np.asarray(buf.offsets())
    tokens, mask = np.asarray(buf.tokens()), np.asarray(buf.response_mask())
    engine, trainer = np.asarray(buf.field("rollout_logp")), np.asarray(buf.field("old_logp"))
    return [(tokens[a:b], mask[a:b], engine[a:b], trainer[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def check_episodes(tok, tr):
    """Every episode: 3 sampled turns, the environment's exact observations between them (mask 0, no engine
    log-prob), the engine's log-probs on exactly the sampled tokens, equal to the trainer's in fp32."""
    obs = [tok(f" ok{t} ", add_special_tokens=False)["input_ids"] for t in (1, 2)]
    seqs = episodes_of(tr)
    assert len(seqs) == 8
    for tokens, mask, engine, trainer in seqs:
        mask = mask.astype(bool)
        edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
        runs = list(zip(edges[::2], edges[1::2]))
        assert len(runs) == 3, runs
        for (_, end), (start, _), o in zip(runs, runs[1:], obs):
            assert tokens[end:start].tolist() == o
        assert not engine[~mask].any() and (engine[mask] < 0).all()
        assert_close(engine[mask], trainer[mask], atol=1e-4, name="engine vs trainer log-probs")
        assert np.abs(engine[mask] - trainer[mask]).max() < 1e-4


@pytest.mark.skipif(not hf_paged_available(), reason="this transformers has no continuous batching")
def test_hf_paged_readmits_an_episode_while_others_decode(tok):
    """With half the rows' environments slow on their first answer, the fast episodes' third turns start before
    the slow episodes' second turns finish (turn-synchronous: impossible); tokens, masks, log-probs stay right."""
    backend = Recording()
    tr = make(tok, rollout=backend, readmit=True)
    torch.manual_seed(3)
    m = tr.step(ROWS)
    assert m["episode/turns"] == 3.0 and m["rollout/logp_mismatch_k3"] < 1e-10
    check_episodes(tok, tr)
    ev = backend.events
    seen: dict[int, int] = {}
    order = []  # (event index, kind, episode, turn)
    for i, (kind, key) in enumerate(ev):
        if kind == "submit":
            seen[key] = seen.get(key, 0) + 1
        order.append((i, kind, key, seen[key]))
    slow = {k for k in range(8) if ROWS[k // 2]["delay"]}
    third_start = min(i for i, kind, k, t in order if kind == "submit" and t == 3 and k not in slow)
    second_done = max(i for i, kind, k, t in order if kind == "finish" and t == 2 and k in slow)
    assert third_start < second_done, ev
    assert sorted(ev.count(("finish", k)) for k in range(8)) == [3] * 8


@pytest.mark.skipif(not hf_paged_available(), reason="this transformers has no continuous batching")
def test_hf_paged_default_stays_turn_synchronous_and_reproducible(tok):
    """readmit=None: hf-paged samples from one random stream per batch, so it keeps the turn-synchronous loop
    and a seeded run repeats exactly."""
    runs = []
    for _ in range(2):
        backend = Recording()
        tr = make(tok, rollout=backend)
        torch.manual_seed(3)
        tr.step(ROWS[:2])
        assert backend.events == []  # no session opened
        runs.append([s[0].tolist() for s in episodes_of(tr)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("workers", [1, 8])
def test_environment_calls_run_concurrently_or_in_order(tok, workers):
    """hf (turn-synchronous): with 8 workers the slow environments' calls overlap in time; with 1 they run one at
    a time, in episode order, in the trainer's thread."""
    Slow.calls = []
    threads = set()
    step = Slow.step

    def spy(self, completion):
        threads.add(threading.get_ident())
        return step(self, completion)

    tr = make(tok, rollout_backend="hf", environment_workers=workers)
    Slow.step = spy
    try:
        torch.manual_seed(3)
        tr.step(ROWS)
    finally:
        Slow.step = step
    first = [c for c in Slow.calls if c[1] == 1]
    assert len(first) == 8
    overlap = any(a[2] < b[3] and b[2] < a[3] for i, a in enumerate(first) for b in first[i + 1 :])
    assert overlap == (workers > 1)
    if workers == 1:
        assert [c[0] for c in first] == [r["prompt"] for r in ROWS for _ in range(2)]
        assert threads == {threading.get_ident()}


class Failing(Slow):
    def step(self, completion: str) -> str | None:
        if self.prompt == "x" and self.turns == 1:
            raise ValueError("no answer")
        return super().step(completion)


@pytest.mark.skipif(not hf_paged_available(), reason="this transformers has no continuous batching")
def test_environment_failure_while_readmitting_stops_the_session(tok):
    """An exception in step() while other episodes decode stops the run naming the class and the row, and the
    manager is stopped (the next step runs on a fresh one)."""
    from fusedrl.engine.episodes import EnvironmentFailure

    tr = make(tok, rollout=HFPagedBackend(), env=Failing, readmit=True)
    with pytest.raises(EnvironmentFailure, match=r"Failing\.step raised ValueError: no answer \(row 2"):
        tr.episodes.run(tr, ROWS)
    rows = [r for r in ROWS if r["prompt"] != "x"]
    assert tr.episodes.run(tr, rows).stats["episode/turns"] == [3.0] * 6


@pytest.mark.parametrize("field,value", [("environment_workers", 0), ("environment_workers", 2.0), ("readmit", "yes")])
def test_bad_episode_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})
