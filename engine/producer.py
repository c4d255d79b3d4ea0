"""The producer side of a PPO step: rollout (a backend, or episodes against environments) and reward scoring,
turning prompts into a ``ScoredBatch`` the learner consumes.

    producer = Producer.of(trainer)              # the trainer's own objects: the synchronous step
    batch = producer.produce(prompts, version=3) # trajectories + rewards, each token tagged with its version
    trainer.learn(batch)                         # old / reference log-probs, advantages, update

The same object runs in the trainer's process (``async_mode="off"``) or in a producer process of its own
(``async_rl.py``), where it generates with a copy of the policy that picks up published weights. A batch is plain
host data (token lists, a CPU score tensor), so it crosses a process boundary as it is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .episodes import Rollout, single_turn
from .packing import RolloutBuffer, plan_microbatches
from .rollout_backends import RolloutOutput
from .scoring import MicroBatch, ResponseLayout, score_logprobs, score_reward_fn, score_reward_model
from .trajectories import fill_buffer


@dataclass
class ScoredBatch:
    """A batch of scored trajectories: the rollout (prompts, responses with loss mask and behaviour log-probs,
    texts, environment rewards, truncation flags), each sequence's raw reward (``scores``, (B,) CPU float32) and
    each reward function's part, the policy version of every response token (``versions``: per sequence a list
    as long as its response; None: every token was sampled by ``version``) and the producer's seconds."""

    rollout: Rollout
    scores: torch.Tensor
    reward_parts: dict[str, list[float]] | None
    version: int
    versions: list[list[int]] | None = None
    rollout_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)  # producer-side counts (dynamic sampling)

    def __len__(self) -> int:
        return len(self.rollout.prompt_ids)

    def token_versions(self) -> list[list[int]]:
        """Per sequence, the version of each response token."""
        if self.versions is not None:
            return self.versions
        return [[self.version] * len(r) for r in self.rollout.output.responses]

    def oldest_version(self) -> int:
        """The oldest policy version that sampled a token of the batch."""
        return min((min(v) for v in self.token_versions() if v), default=self.version)

    def select(self, index: Sequence[int]) -> ScoredBatch:
        """The sequences ``index`` (in that order)."""
        return concat([self], [list(index)])


def concat(batches: Sequence[ScoredBatch], index: Sequence[Sequence[int]] | None = None) -> ScoredBatch:
    """Sequences ``index[k]`` of each ``batches[k]`` (all of them when ``index`` is None), in order, as one batch."""
    index = index if index is not None else [range(len(b)) for b in batches]
    pick = lambda xs, ix: [xs[i] for i in ix]  # noqa: E731
    parts = list(zip(batches, index))
    ros = [b.rollout for b in batches]
    has = lambda f: all(f(r) is not None for r in ros)  # noqa: E731
    out = RolloutOutput(
        [t for b, ix in parts for t in pick(b.rollout.output.responses, ix)],
        [t for b, ix in parts for t in pick(b.rollout.output.logprobs, ix)] if has(lambda r: r.output.logprobs) else None,
        [t for b, ix in parts for t in pick(b.rollout.output.loss_mask, ix)] if has(lambda r: r.output.loss_mask) else None,
    )  # fmt: skip
    stats = {k: [x for b, ix in parts for x in pick(b.rollout.stats[k], ix)] for k in ros[0].stats}
    rollout = Rollout(
        [t for b, ix in parts for t in pick(b.rollout.prompt_ids, ix)], out,
        [t for b, ix in parts for t in pick(b.rollout.prompts, ix)],
        [t for b, ix in parts for t in pick(b.rollout.completions, ix)],
        torch.cat([b.rollout.env_scores[list(ix)] for b, ix in parts]) if has(lambda r: r.env_scores) else None,
        [t for b, ix in parts for t in pick(b.rollout.truncated, ix)] if has(lambda r: r.truncated) else None,
        stats,
    )  # fmt: skip
    reward_parts = None
    if all(b.reward_parts is not None for b in batches):
        reward_parts = {k: [x for b, ix in parts for x in pick(list(b.reward_parts[k]), ix)]
                        for k in batches[0].reward_parts}  # fmt: skip
    same = len({b.version for b in batches}) == 1 and all(b.versions is None for b in batches)
    return ScoredBatch(
        rollout, torch.cat([b.scores[list(ix)] for b, ix in parts]), reward_parts, min(b.version for b in batches),
        None if same else [v for b, ix in parts for v in pick(b.token_versions(), ix)],
        rollout_s=sum(b.rollout_s for b in batches), stats=dict(batches[-1].stats),
    )  # fmt: skip


def draw_prompts(prompts: Sequence, *, seed: int, step: int, n: int, world_size: int = 1, rank: int = 0,
                 round: int = 0) -> list:  # fmt: skip
    """Rank ``rank``'s share of step ``step``'s ``n`` prompts: a seeded draw without replacement (with, when there are
    fewer prompts than needed), derived from (seed, step, round) alone so that a resumed run or a producer process
    draws the same ones (``round``: dynamic sampling's further rounds)."""
    rng = np.random.default_rng([seed, step] if round == 0 else [seed, step, 2, round])
    idx = rng.choice(len(prompts), size=n, replace=len(prompts) < n)
    per_rank = n // world_size
    return [prompts[i] for i in idx[rank * per_rank : (rank + 1) * per_rank]]


def micro_batches(buffer: RolloutBuffer, layout: ResponseLayout | None, seq_ids: np.ndarray, budget: int,
                  device: torch.device) -> list[MicroBatch]:  # fmt: skip
    """Token-budget micro-batches of ``buffer`` covering ``seq_ids``, addressing ``layout``."""
    lengths = np.asarray(buffer.lengths())[seq_ids]
    plan = plan_microbatches(lengths, budget)[0]
    return [MicroBatch(buffer, seq_ids[np.asarray(mb, dtype=np.int64)], device, layout) for mb in plan if len(mb)]


class Producer:
    """Rollout + reward scoring with a policy, a rollout backend, optional episodes and a reward (model or callable).
    Exposes the attributes ``episodes.single_turn`` / ``EpisodeRunner.run`` read (config, tokenizer, policy,
    rollout, stop_ids, pad_token_id, context)."""

    def __init__(self, *, config, tokenizer, policy, rollout, episodes, reward_model, reward_fn, stop_ids,
                 pad_token_id, context, device, behaviour_logp: bool = False):  # fmt: skip
        self.config, self.tokenizer, self.policy, self.rollout, self.episodes = (
            config,
            tokenizer,
            policy,
            rollout,
            episodes,
        )
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self.stop_ids, self.pad_token_id, self.context, self.device = stop_ids, pad_token_id, context, device
        # Score the sampled tokens' log-probs with the producer's own weights when the engine gives none: the
        # behaviour policy the loss corrects against once sampling and training weights differ (async modes).
        self.behaviour_logp = behaviour_logp

    @classmethod
    def of(cls, tr, **kwargs) -> Producer:
        """The producer made of trainer ``tr``'s own objects."""
        return cls(config=tr.config, tokenizer=tr.tokenizer, policy=tr.policy, rollout=tr.rollout, episodes=tr.episodes,
                   reward_model=tr.reward_model, reward_fn=tr.reward_fn, stop_ids=tr.stop_ids,
                   pad_token_id=tr.pad_token_id, context=tr.context, device=tr.device, **kwargs)  # fmt: skip

    @property
    def rollout_backend(self) -> str:
        return getattr(self.rollout, "name", type(self.rollout).__name__)

    def produce(self, prompts: Sequence, *, version: int, rank: int = 0) -> ScoredBatch:
        """Roll out ``prompts`` (a prompt's samples consecutive) and score their rewards."""
        t0 = time.perf_counter()
        ro = self.episodes.run(self, prompts) if self.episodes is not None else single_turn(self, prompts)
        # A streaming backend (``async_rl.StreamingBackend``) says which version sampled each token.
        versions = getattr(self.rollout, "last_versions", None) if self.episodes is None else None
        batch = ScoredBatch(ro, torch.zeros(0), None, version, versions, rollout_s=time.perf_counter() - t0)
        return self.score(batch)

    def score(self, batch: ScoredBatch) -> ScoredBatch:
        """``batch`` with its rewards (and, with ``behaviour_logp``, the missing behaviour log-probs) filled in."""
        ro, cfg = batch.rollout, self.config
        if self.behaviour_logp and ro.output.logprobs is None:
            logp = behaviour_logprobs(self.policy, ro.prompt_ids, ro.output.responses, cfg, self.device)
            batch = replace(batch, rollout=replace(ro, output=replace(ro.output, logprobs=logp)))
            ro = batch.rollout
        if self.reward_model is not None:
            buf = RolloutBuffer(fields=())
            fill_buffer(buf, ro.prompt_ids, ro.output.responses, loss_mask=ro.output.loss_mask)
            micro = micro_batches(buf, None, np.arange(len(buf)), cfg.max_tokens_per_microbatch, self.device)
        reward_parts = None
        if self.reward_model is not None:
            raw_scores = score_reward_model(self.reward_model, micro, len(buf))
        elif self.reward_fn is not None:
            raw_scores = score_reward_fn(self.reward_fn, ro.prompts, ro.completions)
            reward_parts = getattr(self.reward_fn, "last_parts", None)  # each function's part (rewards.combine)
        if ro.env_scores is not None:  # the environment's own reward adds to the reward's, as in TRL
            own = self.reward_fn is None and self.reward_model is None
            raw_scores = ro.env_scores if own else raw_scores + ro.env_scores
        if reward_parts is not None:
            reward_parts = {k: [float(x) for x in v] for k, v in reward_parts.items()}
        return replace(batch, scores=raw_scores.detach().float().cpu(), reward_parts=reward_parts)


def behaviour_logprobs(policy, prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], config,
                       device) -> list[list[float]]:  # fmt: skip
    """Per response, ``policy``'s log-prob of each of its tokens at the sampling temperature (packed forwards)."""
    buf = RolloutBuffer(fields=())
    fill_buffer(buf, prompt_ids, responses)
    layout = ResponseLayout(buf, device)
    micro = micro_batches(buf, layout, np.arange(len(buf)), config.max_tokens_per_microbatch, device)
    logp = score_logprobs(policy, micro, layout, temperature=config.temperature, backend=config.backend).cpu()
    cu = layout.cu.cpu().tolist()
    return [logp[cu[i] : cu[i + 1]].tolist() for i in range(len(responses))]
