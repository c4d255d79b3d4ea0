"""The PPO / GRPO objective: a micro-batch's policy loss (the fused lm_head loss) and, with a critic, its value
loss, each divided by the global denominators of its mini-batch (loss tokens and sequences over every rank); and
the update of one step, ``ppo_epochs`` passes of shuffled mini-batches through the update loop (``update.py``).

Multi-process: every rank gathers all ranks' trajectories (``gather_rollouts``) and plans each mini-batch once,
globally, with ``plan_microbatches(num_ranks=world_size)``: the same plan on every rank, each training on its own
share (token loads balanced), possibly sequences another rank rolled out. With the global denominators and
gradients summed over ranks, N processes make the update one process makes on the same batch.
"""

from __future__ import annotations

import numpy as np
import torch

from fusedrl.kernels import kl_penalty, linear_ppo_loss, value_loss

from .attention import use_packed_attention
from .metrics import UpdateStats
from .models import disable_dropout, enable_checkpointing, output_head
from .packing import RolloutBuffer, plan_microbatches
from .scoring import MicroBatch, ResponseLayout
from .update import accumulate, passes


def prepare_model(model, *, trainable: bool, checkpointing: bool = False):
    """A model of the run as the step uses it: no dropout (the ratio compares two forwards of the same weights,
    which must agree), packed attention; trained ones in train mode (optionally recomputing activations in
    backward), the frozen ones (reference, reward model) without gradients in eval mode. Returns it."""
    disable_dropout(model)
    use_packed_attention(model)
    if not trainable:
        return model.requires_grad_(False).eval()
    if checkpointing:
        enable_checkpointing(model)
    return model.train()


def ppo_update(tr, per_token: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """The update of one PPO step for trainer ``tr``: ``ppo_epochs`` passes over the global batch in shuffled
    mini-batches, each one optimizer step of the update loop. ``per_token``: this rank's (R,) stage tensors by name;
    its optional ``cut`` (1.0 per token of a sequence left out: ``mask_truncated``) takes those sequences out of
    every loss and denominator. Returns the update's metrics."""
    cfg = tr.config
    buf, layout, per_token = gather_rollouts(tr, per_token)
    lengths = np.asarray(buf.lengths())
    loss_tokens = loss_tokens_per_sequence(buf)
    # Sequences left out of the loss (mask_truncated): masked token by token, so each micro-batch keeps its rows
    # (an all-masked sequence contributes exact zeros in every aggregation mode), and out of every denominator.
    cut = per_token.get("cut")
    kept = np.ones(len(buf), dtype=bool) if cut is None else (layout.sequence_sum(cut) == 0).cpu().numpy()
    loss_tokens = loss_tokens * kept
    loss_cfg = tr._loss_config(tr.kl_controller.value, rollout_logp=per_token.get("rollout_logp") is not None)
    use_ref, use_rollout = loss_cfg.kl_coef > 0, loss_cfg.rollout_correction != "none"
    # The same seed on every rank: all ranks split the global batch into the same mini-batches.
    rng = np.random.default_rng([cfg.seed, tr.global_step, 1])
    stats = UpdateStats(tr.dist)
    tr.guard.reset()
    bodies = (tr._policy_body, tr._critic_body)
    for _ in range(cfg.ppo_epochs):
        for mini in np.array_split(rng.permutation(len(buf)), cfg.num_minibatches):
            mini = np.sort(mini)
            # One plan for the whole mini-batch, identical on every rank; this rank trains plan[rank].
            plan = plan_microbatches(lengths[mini], cfg.max_tokens_per_microbatch, num_ranks=tr.world_size)
            # Global denominators: each micro-batch loss is its share of the full mini-batch loss.
            # At least 1: a mini-batch of truncated sequences alone has a zero loss, not 0 / 0.
            n_tok, n_seq = max(int(loss_tokens[mini].sum()), 1), max(int(kept[mini].sum()), 1)
            losses = {"policy": [], "value": []}

            def objective(ids, weight):
                mb = MicroBatch(buf, ids, tr.device, layout)
                take = lambda name: layout.gather(per_token[name], mb)  # noqa: E731
                mask = None if cut is None else take("cut") == 0
                hidden = tr._policy_body(mb.input_ids, mb.position_ids, **mb.attn_kwargs)[0][mb.rows]
                # After the forward: FSDP swaps the gathered head weight in for the shard until backward.
                head, bias, _ = output_head(tr.policy)
                loss, m = linear_ppo_loss(
                    hidden, head, mb.labels, take("old_logp"), take("advantages"), mask, bias=bias,
                    ref_logp=take("ref_logp") if use_ref else None,
                    rollout_logp=take("rollout_logp") if use_rollout else None, config=loss_cfg,
                    cu_seqlens=mb.cu_rows, num_tokens=n_tok, num_sequences=n_seq, backend=cfg.backend,
                )  # fmt: skip
                losses["policy"].append(loss.detach())
                yield loss
                vloss = vm = None
                if tr.critic is not None:
                    v = tr._critic_body(mb.input_ids, position_ids=mb.position_ids, **mb.attn_kwargs)
                    vloss, vm = value_loss(v[0][mb.rows], take("values"), take("returns"), mask, clip=cfg.value_clip,
                                           agg="token-mean", num_tokens=n_tok, backend=cfg.backend)  # fmt: skip
                    losses["value"].append(vloss.detach())
                    yield vloss
                if weight:
                    _record(stats, int(loss_tokens[ids].sum()), loss, m, vloss, vm, use_rollout)

            mine = [mini[mb] for mb in plan[tr.rank] if len(mb)]
            accumulate(bodies, passes(mine, mini[:1]), objective)
            policy_ok = torch.isfinite(torch.stack(losses["policy"])).all()
            stats.add("policy/grad_norm", tr._optimizer_step(tr.policy, tr.policy_optimizer, policy_ok))
            if tr.critic is not None:
                value_ok = torch.isfinite(torch.stack(losses["value"])).all()
                stats.add("value/grad_norm", tr._optimizer_step(tr.critic, tr.critic_optimizer, value_ok))
            stats.count_optimizer_step()
    return {**stats.result(), "train/skipped_steps": float(tr.guard.skipped)}


def gather_rollouts(tr, per_token: dict) -> tuple[RolloutBuffer, ResponseLayout, dict]:
    """Every rank's sequences (tokens, response mask) concatenated in rank order, their layout, and their
    per-token tensors: the global batch, which a single process with all the prompts would hold in the same
    order."""
    if tr.world_size == 1:
        return tr._buffer, tr.layout, per_token
    buf = tr._buffer
    mine = {"lengths": np.asarray(buf.lengths()), "tokens": np.array(buf.tokens()),
            "response_mask": np.array(buf.response_mask())}  # fmt: skip
    out = tr._all_rollouts
    out.clear()
    for part in tr.dist.gather_objects(mine):  # small CPU arrays: pickled through the process group
        cuts = np.cumsum(part["lengths"])[:-1]
        out.append_many(np.split(part["tokens"], cuts), np.split(part["response_mask"], cuts))
    layout = ResponseLayout(out, tr.device)
    return out, layout, {k: None if v is None else tr.dist.gather(v) for k, v in per_token.items()}


def loss_tokens_per_sequence(buf: RolloutBuffer) -> np.ndarray:
    """(n,) int64 tokens carrying a loss per sequence: response tokens after the first position (a packed row
    predicts the next token, so a sequence's first token is never a target; ``MicroBatch.num_loss_tokens``)."""
    offsets = np.asarray(buf.offsets())
    mask = np.asarray(buf.response_mask()).astype(np.int64)
    mask[offsets[:-1]] = 0
    return np.add.reduceat(mask, offsets[:-1]) if len(offsets) > 1 else np.zeros(0, dtype=np.int64)


def _record(stats: UpdateStats, w: int, loss, m: dict, vloss, vm: dict | None, use_rollout: bool) -> None:
    """One micro-batch's losses and loss metrics, token-weighted by its ``w`` loss tokens."""
    stats.add("loss/policy", loss.detach())
    for k in ("clipfrac", "clipfrac_low", "clipfrac_high", "dualclip_frac", "approx_kl", "entropy", "kl"):
        stats.add_weighted(f"policy/{k}", m[k], w)
    stats.max("policy/ratio_max", m["ratio_max"])
    if use_rollout:  # tokens whose rollout weight was truncated (tis) or masked (mis)
        stats.add_weighted("rollout/corrected_frac", m["rollout_corrected_frac"], w)
    if vloss is not None:
        stats.add("loss/value", vloss.detach())
        stats.add_weighted("value/clipfrac", vm["clipfrac"], w)
        stats.add_weighted("value/vpred_mean", vm["vpred_mean"], w)


def rollout_metrics(dist, layout: ResponseLayout, raw_scores, scores, reward_parts: dict | None, eos: list[float],
                    rollout_logp, old_logp) -> dict[str, float]:  # fmt: skip
    """A step's ``rollout/*`` metrics over every rank: rewards (and each reward function's part), processed scores,
    response lengths, the share that ended with a stop token and, when the engine returned its own log-probs, its
    mismatch with the trainer's (k3 estimate of KL(engine || trainer), largest ratio)."""
    device = raw_scores.device
    metrics = {
        "rollout/reward_mean": dist.mean(raw_scores),
        "rollout/reward_std": dist.std(raw_scores),
        **{f"rollout/reward/{k}": dist.mean(torch.tensor(v, device=device)) for k, v in (reward_parts or {}).items()},
        "rollout/score_mean": dist.mean(scores),
        "rollout/response_len": dist.mean(layout.cu.diff().float()),
        "rollout/eos_frac": dist.mean(torch.tensor(eos)),
    }
    if rollout_logp is not None:
        metrics["rollout/logp_mismatch_k3"] = dist.mean(kl_penalty(rollout_logp, old_logp, "k3"))
        metrics["rollout/ratio_max"] = dist.max(float((old_logp - rollout_logp).max().exp()))
    return metrics
