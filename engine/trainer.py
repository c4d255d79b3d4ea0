"""The PPO trainer: one step is rollout -> buffer -> score -> advantages -> update.

    trainer = PPOTrainer(policy, tokenizer, reward, PPOConfig(advantage_estimator="grpo"))
    trainer.train(prompts)          # or: for batch in my_loader: trainer.step(batch)

``policy`` is any transformers causal LM; ``reward`` a sequence-classification reward model (score read
at the last token) or a callable ``(prompts, completions) -> list[float]``. The reference policy defaults
to a frozen copy of the policy, the critic (``gae`` only) to a value model on a copy of its backbone.
The rollout runs through ``PPOConfig.rollout_backend`` (``rollout_backends``: plain generate, transformers'
continuous batching or a colocated vLLM that gets the weights after every optimizer step); an engine's own
sampled-token log-probs are kept as ``rollout_logp`` beside the trainer's ``old_logp``.

Multi-process (``torchrun``): rank and world size come from ``torch.distributed`` when it is initialised.
Each rank draws its own slice of the step's prompts, rolls out and scores them. For the update every rank
gathers all ranks' rollouts and plans each mini-batch once, globally, with
``plan_microbatches(num_ranks=world_size)``: the same plan on every rank, each training on its own share
(token loads balanced, the same number of micro-batches everywhere), possibly sequences another rank rolled
out. Losses are divided by the mini-batch's global token (or sequence) count, and the policy and critic run
under DistributedDataParallel with gradients summed, not averaged, over ranks: the sum of the per-rank losses
is the full mini-batch loss, so N processes make the update one process would make on the same batch.
With ``PPOConfig.fsdp`` the policy is sharded with FSDP2 ``fully_shard`` instead (same sums; sharded weights,
gradients and optimizer state; the critic stays under DDP). Generation and scoring then gather the full
weights once per call, checkpoints and saved models hold the gathered full weights, and ``trainer.policy``
holds DTensor shards (use ``state_dict()`` or the saved model outside the trainer).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint import state_dict as dcp_state

from fusedrl.kernels import PPOLossConfig, kl_penalty, linear_ppo_loss, shape_token_rewards, value_loss
from fusedrl.names import TOKEN_REWARD_ESTIMATORS

from .advantages import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    clip_rewards,
    compute_advantages,
)
from .attention import use_packed_attention
from .checkpoint import rng_state, set_rng_state
from .config import PPOConfig, flat_dict
from .distributed import Distributed, PolicyBody, available_cpus, fully_shard_policy
from .metrics import PhaseTimer, UpdateStats, explained_variance
from .models import (
    ValueModel,
    adapter_disabled,
    disable_dropout,
    enable_checkpointing,
    is_peft_model,
    logit_scale_of,
    output_head,
)
from .packing import RolloutBuffer, plan_microbatches
from .data import context_length, encode_prompts
from .rollout_backends import RolloutBackend, SamplingSpec, build_rollout_backend, print_choice
from .sampling import stop_token_ids
from .trajectories import BUFFER_FIELDS, fill_buffer
from .update import (
    GuardedStep,
    RunDir,
    accumulate,
    adamw,
    load_state,
    metrics_logger,
    passes,
    run_loop,
    save_state,
)
from .scoring import (
    MicroBatch,
    ResponseLayout,
    score_logprobs,
    score_reward_fn,
    score_reward_model,
    score_values,
)

__all__ = ["PPOConfig", "PPOTrainer"]


class PPOTrainer:
    """PPO and its critic-free variants for transformers causal LMs, on packed padding-free batches."""

    def __init__(
        self,
        policy: nn.Module,
        tokenizer,
        reward: nn.Module | Callable[[list[str], list[str]], Sequence[float]],
        config: PPOConfig | None = None,
        *,
        ref_policy: nn.Module | None = None,
        critic: nn.Module | None = None,
        rollout: RolloutBackend | None = None,
    ):
        self.config = cfg = config if config is not None else PPOConfig()
        if not isinstance(cfg, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(cfg).__name__}")
        if not isinstance(policy, nn.Module) or not hasattr(policy, "generate"):
            raise TypeError(
                f"policy must be a transformers causal LM (an nn.Module with generate), got {type(policy).__name__}"
            )
        self.dist = Distributed(next(policy.parameters()).device)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        if cfg.prompts_per_step % self.world_size:
            raise ValueError(
                f"PPOConfig.prompts_per_step={cfg.prompts_per_step} must be divisible by the world size "
                f"{self.world_size}"
            )
        # Mini-batches split the global batch; each must hold a sequence for every rank.
        local_batch = cfg.prompts_per_step // self.world_size * cfg.samples_per_prompt
        if cfg.num_minibatches > local_batch:
            raise ValueError(
                f"PPOConfig.num_minibatches={cfg.num_minibatches} exceeds the {local_batch} sequences each rank "
                "rolls out per step (prompts_per_step / world size * samples_per_prompt): a mini-batch would "
                "leave a rank without sequences"
            )
        self.tokenizer = tokenizer
        self.device = next(policy.parameters()).device
        cpus = available_cpus() if self.device.type == "cpu" else None
        if cpus is not None and torch.get_num_threads() > cpus:
            # Not changed here (a process-wide setting belongs to the caller); fusedrl train picks it itself.
            warnings.warn(
                f"torch uses {torch.get_num_threads()} CPU threads but this process may run on {cpus} "
                "CPUs (affinity mask, cgroup quota): OpenMP threads then spin against each other and a step can be "
                "many times slower; call torch.set_num_threads(fusedrl.engine.distributed.default_threads())",
                RuntimeWarning,
                stacklevel=2,
            )
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer needs a pad_token_id or an eos_token_id to pad generation batches")
        self.stop_ids = stop_token_ids(tokenizer, policy)  # eos and a chat model's end-of-turn tokens

        self.policy = policy
        # Fails now for a head the fused ops cannot express (soft-capped logits); the scale is folded into the
        # temperature of every log-prob, so scoring and the loss see the distribution generate() samples from.
        self.logit_scale = logit_scale_of(policy)
        disable_dropout(policy)
        use_packed_attention(policy)
        if cfg.gradient_checkpointing:
            enable_checkpointing(policy)
        policy.train()

        # The reference is a copy of the policy as given (before any update): KL is measured from there.
        # A LoRA (peft) policy with no reference given is its own reference with the adapters disabled (the base
        # model): the frozen weights are held once, not copied.
        shared = ref_policy is None and is_peft_model(policy)
        self._ref_scope = lambda: adapter_disabled(policy, shared)  # noqa: E731
        self.ref_policy = policy if shared else ref_policy if ref_policy is not None else copy.deepcopy(policy)
        if not shared:
            self.ref_policy.requires_grad_(False).eval()
            disable_dropout(self.ref_policy)
            use_packed_attention(self.ref_policy)

        if cfg.advantage_estimator == "gae":
            self.critic = critic if critic is not None else ValueModel.from_causal_lm(policy)
            self.critic.to(self.device)
            disable_dropout(self.critic)
            use_packed_attention(self.critic)
            if cfg.gradient_checkpointing:
                enable_checkpointing(self.critic)
            self.critic.train()
        elif critic is not None:
            raise ValueError(
                "critic is only used with advantage_estimator='gae', got "
                f"advantage_estimator={cfg.advantage_estimator!r}"
            )
        else:
            self.critic = None

        if isinstance(reward, nn.Module):
            self.reward_model, self.reward_fn = reward, None
            reward.requires_grad_(False).eval()
            use_packed_attention(reward)
        elif callable(reward):
            self.reward_model, self.reward_fn = None, reward
        else:
            raise TypeError(
                f"reward must be a reward model (nn.Module) or a callable (prompts, completions) -> list[float], "
                f"got {type(reward).__name__}"
            )

        # What the step runs the policy through: ``_policy_root.run`` for generation and scoring,
        # ``_policy_body`` for the update's forwards (DDP-wrapped with several ranks). With FSDP the root
        # is sharded in place (the optimizer below must see the sharded parameters) and is the body too.
        self.fsdp = cfg.fsdp and self.world_size > 1
        self._policy_root = PolicyBody(policy)
        if self.fsdp:
            fully_shard_policy(self._policy_root)
            self._policy_body = self._policy_root
        else:
            self._policy_body = self.dist.data_parallel(self._policy_root)
        self._critic_body = self.dist.data_parallel(self.critic) if self.critic is not None else None
        self.policy_optimizer = adamw(
            [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.critic_optimizer = (
            adamw(list(self.critic.parameters()), lr=cfg.critic_learning_rate, weight_decay=cfg.weight_decay)
            if self.critic is not None else None
        )  # fmt: skip
        self.kl_controller = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )  # fmt: skip
        for name, model in (("ref_policy", self.ref_policy), ("critic", self.critic), ("reward", self.reward_model)):
            dev = next(model.parameters()).device if model is not None else self.device
            if dev != self.device:
                raise ValueError(f"{name} is on {dev} but the policy is on {self.device}: put all models on one device")
        self.reward_stats = RunningMeanStd()
        self._buffer = RolloutBuffer(fields=BUFFER_FIELDS)
        self._pending_fields: dict = {}  # this step's per-token tensors, copied into the buffer when it is read
        self.layout: ResponseLayout | None = None  # the current step's response tokens (set by the rollout)
        # Every rank's sequences, rank by rank, for the globally planned update (several ranks only); their
        # per-token values travel as tensors.
        self._all_rollouts = RolloutBuffer(fields=()) if self.world_size > 1 else self._buffer
        self.global_step = 0
        self.guard = GuardedStep(self.dist)  # counts the optimizer steps skipped in the current update
        self.context = context_length(policy)
        # The producer: the object given, or the one PPOConfig.rollout_backend names.
        if rollout is None:
            rollout, why = build_rollout_backend(cfg, policy, rank=self.rank, fsdp=self.fsdp)
            if self.rank == 0:
                print_choice(getattr(rollout, "name", type(rollout).__name__), why)
        self.rollout = rollout
        # A loss setting the kernels refuse fails here, not at the first update.
        self._loss_config(cfg.kl_coef, rollout_logp=getattr(rollout, "returns_logprobs", True))

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------
    def train(self, prompts: Sequence[str], *, resume: bool = False, overwrite: bool = False,
              run_config: dict | None = None) -> list[dict]:  # fmt: skip
        """Run ``config.total_steps`` steps (from the newest intact checkpoint in output_dir when ``resume``),
        drawing each step's prompts from ``prompts`` with a sampler seeded by (seed, step). Returns the
        metric rows; with an output_dir also writes metrics.jsonl, checkpoints and the final model.

        An output_dir that already holds a run is refused unless ``resume`` (continue it) or ``overwrite``
        (delete that run's files first); ``run_config`` is written as output_dir/config.yaml once the directory
        is ready, so a refused run writes nothing."""
        cfg = self.config
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: train() needs at least one prompt")
        encode_prompts(self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, context=self.context)
        out = Path(cfg.output_dir) if cfg.output_dir is not None else None
        if out is None and (resume or overwrite or run_config is not None):
            raise ValueError("resume=True, overwrite=True and run_config need config.output_dir (where the run is)")
        run = (
            RunDir(out, self.dist, resume=resume, overwrite=overwrite, keep_checkpoints=cfg.keep_checkpoints)
            if out
            else None
        )
        if run is not None and run_config is not None:
            # The resolved rollout backend as a comment: the file stays a valid --config of the same run.
            run.write_config(
                run_config, f"# rollout backend: {self.rollout_backend} (rollout_backend={cfg.rollout_backend})\n"
            )
        if run is not None and run.latest is not None:
            self.load_checkpoint(run.latest)
        else:
            # Generation draws from torch's global RNG; ranks get different streams (different responses).
            torch.manual_seed(cfg.seed + 1000003 * self.rank)
        logger = metrics_logger(out, self.dist, cfg, total_steps=cfg.total_steps,
                                resume_step=self.global_step if run is not None and run.latest else None)  # fmt: skip
        rows = run_loop(lambda i: self.step(self.sample_prompts(prompts, i)), self.global_step, cfg.total_steps, logger,
                        save_every=cfg.save_every, save=(lambda _: self.save_checkpoint()) if out else None)  # fmt: skip
        if out is not None:
            self.save_pretrained(out)
        return rows

    @property
    def buffer(self) -> RolloutBuffer:
        """The last step's rollouts (tokens, response mask) with their per-token fields (``BUFFER_FIELDS``: old /
        ref / rollout log-probs, values, rewards, advantages, returns) at the flat position of the token each is
        about. The fields are copied from the device on the first read after a step, not by the step itself."""
        if self._pending_fields:
            fields, self._pending_fields = self._pending_fields, {}
            for name, t in fields.items():  # one device -> host copy per field
                self.layout.to_buffer(self._buffer, name, t)
        return self._buffer

    def sample_prompts(self, prompts: Sequence[str], step: int) -> list[str]:
        """This rank's prompts for ``step``: a seeded draw without replacement (with, when there are fewer
        prompts than needed), derived from (seed, step) alone so that a resumed run draws the same ones."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, step])
        n = cfg.prompts_per_step
        idx = rng.choice(len(prompts), size=n, replace=len(prompts) < n)
        per_rank = n // self.world_size
        return [prompts[i] for i in idx[self.rank * per_rank : (self.rank + 1) * per_rank]]

    def step(self, prompts: Sequence[str]) -> dict[str, float]:
        """One PPO step on these prompts (this rank's share): rollout, score, advantages, update.
        Returns the step's metrics (global over ranks)."""
        cfg, dist = self.config, self.dist
        timer = PhaseTimer(self.device)  # restarts the peak-memory counter

        # 1. Rollout: sample responses, put prompt + response sequences in the buffer.
        prompt_ids = encode_prompts(self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, context=self.context)
        longest = max(len(p) for p in prompt_ids) + cfg.max_new_tokens
        if longest > cfg.max_tokens_per_microbatch:
            raise ValueError(
                f"PPOConfig.max_tokens_per_microbatch={cfg.max_tokens_per_microbatch} is smaller than the longest "
                f"possible sequence ({longest} tokens: prompt + max_new_tokens)"
            )
        # Each prompt goes to the engine once with n samples (one prefill, shared KV); the group comes back
        # consecutive, as the group estimators expect.
        rollout_t0 = time.perf_counter()
        out = self._policy_root.run_gathered(self._generate, prompt_ids)
        rollout_s = time.perf_counter() - rollout_t0
        responses = out.responses
        prompt_ids = [p for p in prompt_ids for _ in range(cfg.samples_per_prompt)]  # groups are consecutive
        prompt_texts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        buf = self._buffer
        self._pending_fields = {}
        fill_buffer(
            buf, prompt_ids, responses, loss_mask=out.loss_mask, logprobs=out.logprobs, version=self.global_step
        )
        self.layout = layout = ResponseLayout(buf, self.device)
        # The engine's own log-probs of the sampled tokens (the behaviour policy's), in the layout's order.
        rollout_logp = layout.from_buffer(buf, "rollout_logp") if out.logprobs is not None else None
        timer.lap("rollout")

        # 2. Score: old / reference log-probs and values, (R,) tensors on the device; sequence scores (B,).
        micro = self._micro_batches(np.arange(len(buf)))
        old_logp = self._policy_root.run_gathered(score_logprobs, self.policy, micro, layout,
                                                  temperature=cfg.temperature, backend=cfg.backend)  # fmt: skip
        with self._ref_scope():  # the LoRA policy's base model (adapters off), or the separate reference
            ref_logp = score_logprobs(self.ref_policy, micro, layout, temperature=cfg.temperature, backend=cfg.backend)
        values = score_values(self.critic, micro, layout) if self.critic is not None else None
        if self.reward_model is not None:
            raw_scores = score_reward_model(self.reward_model, micro, len(buf))
        else:
            raw_scores = score_reward_fn(self.reward_fn, prompt_texts, completions)
        raw_scores = raw_scores.to(self.device)
        timer.lap("score")

        # 3. Advantages, on the device: KL-shaped token rewards, then the estimator.
        scores = self._process_scores(raw_scores)
        beta = self.kl_controller.value
        reward_kl, _ = cfg.kl_coefs(beta)
        token_rewards, _ = shape_token_rewards(
            scores, old_logp, ref_logp, layout.cu, kl_coef=reward_kl,
            estimator=cfg.kl_estimator_resolved if reward_kl else "k1",  # unused when the KL is in the loss
        )  # fmt: skip
        est = cfg.advantage_estimator
        adv, returns = compute_advantages(
            est, scores=layout.sequence_sum(token_rewards), cu_seqlens=layout.cu,
            token_rewards=token_rewards if est in TOKEN_REWARD_ESTIMATORS else None, values=values,
            group_size=cfg.samples_per_prompt, group_std=cfg.group_std, gamma=cfg.gamma, lam=cfg.lam,
            whiten_advantages=cfg.whiten_advantages,
            dist=dist, backend=cfg.backend,
        )  # fmt: skip
        per_token = {"old_logp": old_logp, "ref_logp": ref_logp, "values": values, "rewards": token_rewards,
                     "advantages": adv, "returns": returns}  # fmt: skip
        # Kept on the device; copied into the buffer's fields only when someone reads ``trainer.buffer``.
        self._pending_fields = {name: t for name, t in per_token.items() if t is not None}
        timer.lap("advantages")

        # 4. Update: PPO epochs over shuffled mini-batches of token-budget micro-batches.
        update = self._update({**per_token, "rollout_logp": rollout_logp})
        timer.lap("update")

        # KL per sequence (k1: sum of log-ratios), the quantity the adaptive controller steers.
        kl_mean = dist.mean(layout.sequence_sum(old_logp - ref_logp))
        self.kl_controller.update(kl_mean, len(buf) * self.world_size)
        self.global_step += 1

        n_tokens = dist.sum(float(buf.num_tokens))
        eos = [float(len(r) > 0 and r[-1] in self.stop_ids) for r in responses]
        metrics = {
            "rollout/reward_mean": dist.mean(raw_scores),
            "rollout/reward_std": dist.std(raw_scores),
            "rollout/score_mean": dist.mean(scores),
            "rollout/response_len": dist.mean(layout.cu.diff().float()),
            "rollout/eos_frac": dist.mean(torch.tensor(eos)),
            "objective/kl": kl_mean,
            "objective/kl_coef": beta,
            "objective/advantage_mean": dist.mean(adv),
            **update,
            "perf/tokens_per_s": n_tokens / max(timer.total, 1e-9),
            "perf/step_s": timer.total,
            **{f"perf/{k}_s": v for k, v in timer.laps.items()},
            # CUDA: bytes allocated through torch; CPU: the process's resident set (see metrics.peak_memory_gb).
            "perf/peak_mem_gb": timer.peak_gb,
            **{f"perf/peak_mem_{k}_gb": v for k, v in timer.peaks_gb.items()},
        }
        metrics["perf/rollout_tokens_per_s"] = dist.sum(float(layout.num_tokens)) / max(dist.max(rollout_s), 1e-9)
        if rollout_logp is not None:
            # Engine vs trainer log-probs of the sampled tokens: k3 estimate of KL(engine || trainer), largest ratio.
            metrics["rollout/logp_mismatch_k3"] = dist.mean(kl_penalty(rollout_logp, old_logp, "k3"))
            metrics["rollout/ratio_max"] = dist.max(float((old_logp - rollout_logp).max().exp()))
        if self.critic is not None:
            metrics["value/explained_variance"] = explained_variance(dist.gather(values), dist.gather(returns))
        return metrics

    # ------------------------------------------------------------------------------------------------
    # Stages
    # ------------------------------------------------------------------------------------------------
    @property
    def rollout_backend(self) -> str:
        """The producer's name (``rollout.name``, else its class name)."""
        return getattr(self.rollout, "name", type(self.rollout).__name__)

    def _generate(self, prompt_ids: list[list[int]]):
        """``samples_per_prompt`` samples per prompt from the producer, checked (a ``RolloutOutput``)."""
        cfg = self.config
        spec = SamplingSpec(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k)  # fmt: skip
        out = self.rollout.generate(self.policy, prompt_ids, n=cfg.samples_per_prompt, spec=spec,
                                    stop_ids=self.stop_ids, pad_token_id=self.pad_token_id)  # fmt: skip
        out.check(len(prompt_ids) * cfg.samples_per_prompt, self.rollout_backend)
        return out

    def _micro_batches(self, seq_ids: np.ndarray) -> list[MicroBatch]:
        """Token-budget micro-batches of this step's buffer covering ``seq_ids``, addressing ``self.layout``."""
        lengths = np.asarray(self._buffer.lengths())[seq_ids]
        plan = plan_microbatches(lengths, self.config.max_tokens_per_microbatch)[0]
        return [MicroBatch(self._buffer, seq_ids[np.asarray(mb, dtype=np.int64)], self.device, self.layout)
                for mb in plan if len(mb)]  # fmt: skip

    def _process_scores(self, raw: torch.Tensor) -> torch.Tensor:
        """Optional running-std normalisation, then optional clipping, of the sequence scores."""
        cfg = self.config
        scores = raw
        if cfg.normalize_rewards:
            self.reward_stats.update(self.dist.gather(raw))
            scores = self.reward_stats.normalize(scores, center=False)
        return clip_rewards(scores, cfg.reward_clip)

    def _update(self, per_token: dict[str, torch.Tensor | None]) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches; each mini-batch is one optimizer step of the update loop."""
        cfg = self.config
        buf, layout, per_token = self._gather_rollouts(per_token)
        lengths = np.asarray(buf.lengths())
        loss_tokens = _loss_tokens_per_sequence(buf)
        loss_cfg = self._loss_config(self.kl_controller.value, rollout_logp=per_token.get("rollout_logp") is not None)
        use_ref, use_rollout = loss_cfg.kl_coef > 0, loss_cfg.rollout_correction != "none"
        # The same seed on every rank: all ranks split the global batch into the same mini-batches.
        rng = np.random.default_rng([cfg.seed, self.global_step, 1])
        stats = UpdateStats(self.dist)
        self.guard.reset()
        bodies = (self._policy_body, self._critic_body)
        for _ in range(cfg.ppo_epochs):
            for mini in np.array_split(rng.permutation(len(buf)), cfg.num_minibatches):
                mini = np.sort(mini)
                # One plan for the whole mini-batch, identical on every rank; this rank trains plan[rank].
                plan = plan_microbatches(lengths[mini], cfg.max_tokens_per_microbatch, num_ranks=self.world_size)
                # Global denominators: each micro-batch loss is its share of the full mini-batch loss.
                n_tok, n_seq = int(loss_tokens[mini].sum()), len(mini)
                losses = {"policy": [], "value": []}

                def objective(ids, weight):
                    mb = MicroBatch(buf, ids, self.device, layout)
                    take = lambda name: layout.gather(per_token[name], mb)  # noqa: E731
                    hidden = self._policy_body(mb.input_ids, mb.position_ids, **mb.attn_kwargs)[0][mb.rows]
                    # After the forward: FSDP swaps the gathered head weight in for the shard until backward.
                    head, bias, _ = output_head(self.policy)
                    loss, m = linear_ppo_loss(
                        hidden, head, mb.labels, take("old_logp"), take("advantages"), bias=bias,
                        ref_logp=take("ref_logp") if use_ref else None,
                        rollout_logp=take("rollout_logp") if use_rollout else None, config=loss_cfg,
                        cu_seqlens=mb.cu_rows, num_tokens=n_tok, num_sequences=n_seq, backend=cfg.backend,
                    )  # fmt: skip
                    losses["policy"].append(loss.detach())
                    yield loss
                    vloss = vm = None
                    if self.critic is not None:
                        v = self._critic_body(mb.input_ids, position_ids=mb.position_ids, **mb.attn_kwargs)
                        vloss, vm = value_loss(v[0][mb.rows], take("values"), take("returns"), clip=cfg.value_clip,
                                               agg="token-mean", num_tokens=n_tok, backend=cfg.backend)  # fmt: skip
                        losses["value"].append(vloss.detach())
                        yield vloss
                    if weight:
                        _record(stats, mb.num_loss_tokens, loss, m, vloss, vm, use_rollout)

                mine = [mini[mb] for mb in plan[self.rank] if len(mb)]
                accumulate(bodies, passes(mine, mini[:1]), objective)
                policy_ok = torch.isfinite(torch.stack(losses["policy"])).all()
                stats.add("policy/grad_norm", self._optimizer_step(self.policy, self.policy_optimizer, policy_ok))
                if self.critic is not None:
                    value_ok = torch.isfinite(torch.stack(losses["value"])).all()
                    stats.add("value/grad_norm", self._optimizer_step(self.critic, self.critic_optimizer, value_ok))
                stats.count_optimizer_step()
        return {**stats.result(), "train/skipped_steps": float(self.guard.skipped)}

    def _loss_config(self, kl_coef: float, rollout_logp: bool = False) -> PPOLossConfig:
        """The policy loss of this step at KL coefficient ``kl_coef`` (``PPOConfig.loss_config``)."""
        return self.config.loss_config(kl_coef, logit_scale=self.logit_scale, rollout_logp=rollout_logp,
                                       backend_name=self.rollout_backend)  # fmt: skip

    def _optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_ok=True) -> torch.Tensor:
        """The update loop's guarded step (``update.GuardedStep``); a policy step taken is pushed to the engine."""
        name = "policy" if model is self.policy else "critic"
        norm = self.guard.step(model, optimizer, loss_ok, max_grad_norm=self.config.max_grad_norm,
                               step=self.global_step, name=name)  # fmt: skip
        if self.guard.last_ok and model is self.policy:
            self.rollout.sync_weights(self.policy)  # the engine serves the new weights from the next rollout
        return norm

    def _gather_rollouts(self, per_token: dict) -> tuple[RolloutBuffer, ResponseLayout, dict]:
        """Every rank's sequences (tokens, response mask) concatenated in rank order, their layout, and their
        per-token tensors: the global batch, which a single process with all the prompts would hold in the same
        order."""
        if self.world_size == 1:
            return self._buffer, self.layout, per_token
        buf = self._buffer
        mine = {"lengths": np.asarray(buf.lengths()), "tokens": np.array(buf.tokens()),
                "response_mask": np.array(buf.response_mask())}  # fmt: skip
        out = self._all_rollouts
        out.clear()
        for part in self.dist.gather_objects(mine):  # small CPU arrays: pickled through the process group
            cuts = np.cumsum(part["lengths"])[:-1]
            out.append_many(np.split(part["tokens"], cuts), np.split(part["response_mask"], cuts))
        layout = ResponseLayout(out, self.device)
        return out, layout, {k: None if v is None else self.dist.gather(v) for k, v in per_token.items()}

    # ------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: weights, optimizer moments, RNG states,
        KL controller, reward statistics, step counter and config."""
        state = {
            "step": self.global_step,
            "config": flat_dict(self.config),
            **self._policy_state(),
            "kl_controller": self.kl_controller.state_dict(),
            "reward_stats": self.reward_stats.state_dict(),
            "rng": rng_state(),
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("config", {})
        diff = {k: (saved[k], v) for k, v in flat_dict(self.config).items()
                if k in saved and saved[k] != v and k not in _RESUME_MAY_CHANGE}  # fmt: skip
        if diff:
            warnings.warn(f"resuming with a config that differs from the checkpoint's (saved, now): {diff}",
                          stacklevel=2)  # fmt: skip
        if (self.critic is None) != ("critic" not in state):
            raise ValueError("checkpoint and trainer disagree on having a critic (advantage_estimator changed?)")
        if self.fsdp:
            # Every rank holds the full checkpoint: each keeps its own shards of it.
            full = dcp_state.StateDictOptions(full_state_dict=True)
            dcp_state.set_model_state_dict(self.policy, state["policy"], options=full)
            dcp_state.set_optimizer_state_dict(self.policy, self.policy_optimizer, state["policy_optimizer"],
                                               options=full)  # fmt: skip
        else:
            self.policy.load_state_dict(state["policy"])
            self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.reward_stats.load_state_dict(state["reward_stats"])
        set_rng_state(state["rng"])
        self.global_step = int(state["step"])
        self.rollout.sync_weights(self.policy)

    def save_checkpoint(self) -> Path | None:
        """``<output_dir>/ckpt-<step>``, written atomically by rank 0 (every rank holds the same weights)."""
        if self.config.output_dir is None:
            raise ValueError("save_checkpoint needs config.output_dir")
        return save_state(self.dist, self.config.output_dir, self.global_step, self.state_dict(),
                          keep_last=self.config.keep_checkpoints)  # fmt: skip

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(load_state(self.dist, path))

    def _policy_state(self) -> dict:
        """Policy weights and optimizer state; with FSDP gathered from every rank's shards (a collective: every
        rank calls it) onto rank 0's CPU, the other ranks getting empty dicts."""
        if not self.fsdp:
            return {"policy": self.policy.state_dict(), "policy_optimizer": self.policy_optimizer.state_dict()}
        full = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "policy": dcp_state.get_model_state_dict(self.policy, options=full),
            "policy_optimizer": dcp_state.get_optimizer_state_dict(self.policy, self.policy_optimizer, options=full),
        }

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The trained policy (+ tokenizer) as an HF directory ``out_dir/policy``, the critic in ``out_dir/critic``
        (written by rank 0; every rank must call it, FSDP gathering the weights)."""
        full = self._policy_state()["policy"] if self.fsdp else None
        if self.rank != 0:
            return
        out = Path(out_dir)
        self.policy.save_pretrained(out / "policy", state_dict=full)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(out / "policy")
        if self.critic is not None and hasattr(self.critic, "save_pretrained"):
            self.critic.save_pretrained(out / "critic")


# Settings a resumed run may legitimately change (run length, logging, where to save).
_RESUME_MAY_CHANGE = {"total_steps", "save_every", "keep_checkpoints", "tensorboard", "progress", "output_dir"}
# ... and the generation engine (same sampling law, same weights).
_RESUME_MAY_CHANGE |= {"rollout_backend", "rollout_page_size", "vllm_gpu_memory_utilization", "vllm_kv_cache_gb"}


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------
def _loss_tokens_per_sequence(buf: RolloutBuffer) -> np.ndarray:
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
