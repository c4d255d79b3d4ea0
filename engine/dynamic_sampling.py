"""Dynamic sampling (DAPO, Yu et al. 2025): a group whose samples all got the same reward has zero advantage under
the group estimators and only dilutes the batch, so it is dropped and more prompts are sampled until the step's batch
holds ``prompts_per_step`` groups.

Oversampling is bounded: at most ``max_sampling_rounds`` rollout rounds per step (each the size of the batch), so a
step samples at most that many times its batch. A batch still short after the last round is filled with the most
recent dropped groups, so that every step trains on a batch of the configured size; the metrics count the rounds,
the dropped groups and the groups used to fill.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .producer import ScoredBatch, concat


def informative_groups(batch: ScoredBatch, group_size: int) -> np.ndarray:
    """(G,) bool: the groups (``group_size`` consecutive sequences each) whose rewards are not all equal."""
    scores = batch.scores.reshape(-1, group_size)
    return (scores.amax(1) != scores.amin(1)).numpy()


def fill_batch(produce: Callable[[int], ScoredBatch], *, group_size: int, num_groups: int, max_rounds: int,
               dist=None) -> ScoredBatch:  # fmt: skip
    """``num_groups`` groups with informative rewards from up to ``max_rounds`` calls ``produce(round)`` (each a
    batch of whole groups), kept in the order they were produced; with ``dist`` (several ranks) the rounds go on
    while any rank is short, so that every rank runs the same number of (collective) rollouts."""
    kept, dropped = [], []  # (batch index, group) pairs
    batches: list[ScoredBatch] = []
    rounds = 0
    while rounds < max_rounds:
        batch = produce(rounds)
        rounds += 1
        batches.append(batch)
        good = informative_groups(batch, group_size)
        kept += [(len(batches) - 1, g) for g in np.flatnonzero(good)]
        dropped += [(len(batches) - 1, g) for g in np.flatnonzero(~good)]
        short = float(max(num_groups - len(kept), 0))
        if (dist.max(short) if dist is not None and dist.world_size > 1 else short) == 0:
            break
    filled = dropped[::-1][: max(num_groups - len(kept), 0)]  # the newest dropped groups first
    chosen = sorted(kept[:num_groups]) + sorted(filled)
    index = [[g * group_size + j for b, g in chosen if b == k for j in range(group_size)] for k in range(len(batches))]
    out = concat(batches, index)
    out.stats.update({
        "rollout/dynamic_rounds": float(rounds),
        "rollout/dynamic_dropped_groups": float(len(dropped) - len(filled)),
        "rollout/dynamic_filled_groups": float(len(filled)),
        "rollout/dynamic_surplus_groups": float(max(len(kept) - num_groups, 0)),  # informative, beyond the batch
    })  # fmt: skip
    return out


def produce_step(produce: Callable, draw: Callable[[int], list], config, dist=None) -> ScoredBatch:
    """A step's batch: ``produce(draw(0))``, or with ``config.dynamic_sampling`` the groups ``fill_batch`` keeps
    from rounds ``produce(draw(round))``."""
    if not config.dynamic_sampling:
        return produce(draw(0))
    first = draw(0)
    return fill_batch(lambda r: produce(first if r == 0 else draw(r)), group_size=config.samples_per_prompt,
                      num_groups=len(first), max_rounds=config.max_sampling_rounds, dist=dist)  # fmt: skip
