"""The PPO trainer: one step is rollout -> buffer -> score -> advantages -> update.

    trainer = PPOTrainer(policy, tokenizer, reward, PPOConfig(advantage_estimator="grpo"))
    trainer.train(prompts)          # or: for batch in my_loader: trainer.step(batch)

``policy`` is any transformers causal LM; ``reward`` a sequence-classification reward model (score read
at the last token) or a callable ``(prompts, completions) -> list[float]``. The reference policy defaults
to a frozen copy of the policy, the critic (``gae`` only) to a value model on a copy of its backbone.
The rollout runs through ``PPOConfig.rollout_backend`` (``rollout_backends``: plain generate, transformers'
continuous batching or a colocated vLLM that gets the weights after every optimizer step); an engine's own
sampled-token log-probs are kept as ``rollout_logp`` beside the trainer's ``old_logp``. With
``environment_factory=EnvClass`` each sample is a multi-turn episode against its own environment instance
(``episodes.py``; ``train`` then takes rows, strings or dicts with a prompt) and ``reward`` may be None when the
environment's ``get_reward`` owns it. A step is ``produce`` (``producer.py``: rollout + reward) then ``learn``; with
``PPOConfig.async_mode`` a producer process runs ahead (``async_rl.py``); ``dynamic_sampling``: ``dynamic_sampling.py``.

Multi-process (``torchrun``): each rank draws its own slice of the step's prompts, rolls out and scores them; the
update is planned over every rank's trajectories (``ppo.py``) with gradients summed over ranks (DDP, or FSDP2
``fully_shard`` with ``PPOConfig.fsdp``: generation and scoring then gather the full weights once per call,
checkpoints and saved models hold full weights, and ``trainer.policy`` holds DTensor shards).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusedrl.kernels import PPOLossConfig, shape_token_rewards
from fusedrl.names import TOKEN_REWARD_ESTIMATORS

from .async_rl import producer_state, scores_behaviour, step_source
from .advantages import AdaptiveKLController, FixedKLController, RunningMeanStd, clip_rewards, compute_advantages
from .checkpoint import rng_state, set_rng_state
from .compose import flat_dict
from .config import RESUME_MAY_CHANGE, PPOConfig
from .data import context_length, encode_prompts
from .dynamic_sampling import produce_step
from .episodes import make_episode_runner, mask_truncated
from .distributed import (
    Distributed,
    PolicyBody,
    full_state,
    fully_shard_policy,
    load_full_state,
    warn_if_oversubscribed,
)
from .metrics import PhaseTimer, completion_rows, explained_variance
from .heads import ValueModel
from .models import adapter_disabled, is_peft_model, logit_scale_of
from .packing import RolloutBuffer
from .ppo import ppo_update, prepare_model, rollout_metrics
from .rollout_backends import RolloutBackend, build_rollout_backend, print_choice
from .sampling import stop_token_ids
from .producer import Producer, ScoredBatch, draw_prompts, micro_batches
from .scoring import MicroBatch, ResponseLayout, score_logprobs, score_values
from .trajectories import BUFFER_FIELDS, fill_buffer
from .update import GuardedStep, RunDir, adamw, load_state, metrics_logger, run_loop, save_model, save_state

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
        environment_factory: Callable | None = None,
        tools: Sequence[Callable] | None = None,
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
        warn_if_oversubscribed(self.device)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer needs a pad_token_id or an eos_token_id to pad generation batches")
        self.stop_ids = stop_token_ids(tokenizer, policy)  # eos and a chat model's end-of-turn tokens

        # Fails now for a head the fused ops cannot express (soft-capped logits); the scale is folded into the
        # temperature of every log-prob, so scoring and the loss see the distribution generate() samples from.
        self.logit_scale = logit_scale_of(policy)
        self.policy = prepare_model(policy, trainable=True, checkpointing=cfg.gradient_checkpointing)

        # The reference is a copy of the policy as given (before any update): KL is measured from there.
        # A LoRA (peft) policy with no reference given is its own reference with the adapters disabled (the base
        # model): the frozen weights are held once, not copied.
        shared = ref_policy is None and is_peft_model(policy)
        self._ref_scope = lambda: adapter_disabled(policy, shared)  # noqa: E731
        self.ref_policy = policy if shared else ref_policy if ref_policy is not None else copy.deepcopy(policy)
        if not shared:
            prepare_model(self.ref_policy, trainable=False)

        if cfg.advantage_estimator == "gae":
            critic = (critic if critic is not None else ValueModel.from_causal_lm(policy)).to(self.device)
            self.critic = prepare_model(critic, trainable=True, checkpointing=cfg.gradient_checkpointing)
        elif critic is not None:
            raise ValueError(
                "critic is only used with advantage_estimator='gae', got "
                f"advantage_estimator={cfg.advantage_estimator!r}"
            )
        else:
            self.critic = None

        if isinstance(reward, nn.Module):
            self.reward_model, self.reward_fn = prepare_model(reward, trainable=False), None
        elif callable(reward) or (reward is None and environment_factory is not None):
            self.reward_model, self.reward_fn = None, reward  # None: the environment's get_reward (checked below)
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
        self._prompts: list | None = None  # train()'s prompts: where dynamic sampling draws more
        self.completions = None  # the last step's sample of rollouts, every log_completions steps
        self.guard = GuardedStep(self.dist)  # counts the optimizer steps skipped in the current update
        self.context = context_length(policy)
        # The producer: the object given, or the one PPOConfig.rollout_backend names.
        self._given_rollout = rollout  # what an async producer process gets (None: it builds the configured one)
        if rollout is None:
            rollout, why = build_rollout_backend(cfg, policy, rank=self.rank)
            if self.rank == 0:
                print_choice(getattr(rollout, "name", type(rollout).__name__), why)
        self.rollout = rollout
        # Multi-turn: episodes against an environment (engine/episodes.py) instead of one response per sample.
        self.episodes = make_episode_runner(environment_factory, tools, tokenizer, cfg, stop_ids=self.stop_ids,
                                            context=self.context, has_reward_fn=reward is not None)  # fmt: skip
        self.producer = Producer.of(self)  # rollout + reward: the step's producing half
        # A loss setting the kernels refuse fails here, not at the first update (an async producer scores log-probs).
        self._loss_config(cfg.kl_coef, rollout_logp=getattr(rollout, "returns_logprobs", True) or scores_behaviour(cfg))

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
        self._prompts = prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: train() needs at least one prompt")
        if self.episodes is None:  # rows for an environment are checked when their episodes start
            encode_prompts(self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, context=self.context)
        out = Path(cfg.output_dir) if cfg.output_dir is not None else None
        if out is None and (resume or overwrite or run_config is not None):
            raise ValueError("resume=True, overwrite=True and run_config need config.output_dir (where the run is)")
        run = out and RunDir(out, self.dist, resume=resume, overwrite=overwrite, keep_checkpoints=cfg.keep_checkpoints)
        if run and run_config is not None:  # the producer as a comment: the file stays a valid --config of the run
            run.write_config(run_config, f"# rollout backend: {self.rollout_backend} (asked: {cfg.rollout_backend})\n")
        if run is not None and run.latest is not None:
            self.load_checkpoint(run.latest)
        else:
            # Generation draws from torch's global RNG; ranks get different streams (different responses).
            torch.manual_seed(cfg.seed + 1000003 * self.rank)
        logger = metrics_logger(out, self.dist, cfg, total_steps=cfg.total_steps,
                                resume_step=self.global_step if run is not None and run.latest else None,
                                run_config=run_config if run_config is not None else flat_dict(cfg))  # fmt: skip
        with step_source(self, prompts) as step:  # async modes: a producer process runs ahead (async_rl.py)
            rows = run_loop(step, self.global_step, cfg.total_steps, logger, save_every=cfg.save_every,
                            save=(lambda _: self.save_checkpoint()) if out else None,
                            completions=lambda: self.completions)  # fmt: skip
        if out is not None:
            self.save_pretrained(out)
        return rows

    @property
    def buffer(self) -> RolloutBuffer:
        """The last step's rollouts (tokens, response mask) with their per-token fields (``BUFFER_FIELDS``: old /
        ref / rollout log-probs, values, rewards, advantages, returns) at the flat position of the token each is
        about, with each sequence's group id and score (its reward); fields and scores are copied from the device
        on the first read after a step, not by the step itself."""
        if self._pending_fields:
            fields, self._pending_fields = self._pending_fields, {}
            self._buffer.set_scores(fields.pop("scores").float().cpu())
            for name, t in fields.items():  # one device -> host copy per field
                self.layout.to_buffer(self._buffer, name, t)
        return self._buffer

    def sample_prompts(self, prompts: Sequence[str], step: int, round: int = 0) -> list[str]:
        """This rank's prompts for ``step`` (and dynamic sampling's ``round``): ``producer.draw_prompts``."""
        return draw_prompts(prompts, seed=self.config.seed, step=step, n=self.config.prompts_per_step,
                            world_size=self.world_size, rank=self.rank, round=round)  # fmt: skip

    def step(self, prompts: Sequence[str]) -> dict[str, float]:
        """One PPO step on these prompts (this rank's share): rollout, score, advantages, update.
        Returns the step's metrics (global over ranks); ``self.completions`` is then a sample of this rank's
        rollouts (``metrics.completion_rows``) on every ``log_completions``-th step, else None."""
        timer = PhaseTimer(self.device)  # restarts the peak-memory counter
        produce = lambda p: self._policy_root.run_gathered(self.producer.produce, p, version=self.global_step,  # noqa: E731
                                                           gather=getattr(self.rollout, "runs_policy", True))  # fmt: skip
        # Dynamic sampling's further rounds draw from train()'s prompts (the step's own outside train()).
        draw = lambda r: prompts if r == 0 else self.sample_prompts(self._prompts or prompts, self.global_step, r)  # noqa: E731
        return self.learn(produce_step(produce, draw, self.config, self.dist), timer)

    def learn(self, batch: ScoredBatch, timer: PhaseTimer | None = None) -> dict[str, float]:
        """The learner's half of a step on a produced batch (``producer.py``): old / reference log-probs and
        values, advantages, update. ``timer``: started before the batch was produced (its rollout lap)."""
        cfg, dist = self.config, self.dist
        timer = timer if timer is not None else PhaseTimer(self.device)

        # 1. Rollout: the produced sequences go in the buffer; a prompt's samples are consecutive, as the group
        # estimators expect.
        ro, rollout_s, raw_scores, reward_parts = batch.rollout, batch.rollout_s, batch.scores, batch.reward_parts
        prompt_ids, out, prompt_texts, completions = ro.prompt_ids, ro.output, ro.prompts, ro.completions
        responses = out.responses
        buf = self._buffer
        self._pending_fields = {}
        # A group is one prompt's samples; its id is the prompt's index among all ranks' prompts of the step.
        n_prompts, n = len(prompt_ids) // cfg.samples_per_prompt, cfg.samples_per_prompt
        fill_buffer(buf, prompt_ids, responses, loss_mask=out.loss_mask, logprobs=out.logprobs,
                    version=batch.versions if batch.versions is not None else batch.version,
                    group_ids=self.rank * n_prompts + np.arange(len(prompt_ids)) // n)  # fmt: skip
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
        raw_scores = raw_scores.to(self.device)
        timer.lap("score")

        # 3. Advantages, on the device: KL-shaped token rewards, then the estimator.
        scores = clip_rewards(self.reward_stats.normalize_stream(raw_scores, dist) if cfg.normalize_rewards
                              else raw_scores, cfg.reward_clip)  # fmt: skip
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
            group_index=torch.from_numpy(buf.group_ids()), group_std=cfg.group_std,  # host ids: no device sync
            gamma=cfg.gamma, lam=cfg.lam, whiten_advantages=cfg.whiten_advantages, dist=dist, backend=cfg.backend,
        )  # fmt: skip
        # Truncated episodes carry no loss: zero advantages, and the update leaves their tokens out (``cut``).
        adv, cut = mask_truncated(adv, layout, ro.truncated) if cfg.mask_truncated else (adv, None)
        per_token = {"old_logp": old_logp, "ref_logp": ref_logp, "values": values, "rewards": token_rewards,
                     "advantages": adv, "returns": returns}  # fmt: skip
        # Kept on the device; copied into the buffer's fields only when someone reads ``trainer.buffer``.
        self._pending_fields = {name: t for name, t in {**per_token, "scores": raw_scores}.items() if t is not None}
        timer.lap("advantages")

        # 4. Update: PPO epochs over shuffled mini-batches of token-budget micro-batches.
        update = self._update({**per_token, "rollout_logp": rollout_logp, "cut": cut})
        timer.lap("update")

        # KL per sequence (k1: sum of log-ratios), the quantity the adaptive controller steers.
        kl_mean = dist.mean(layout.sequence_sum(old_logp - ref_logp))
        self.kl_controller.update(kl_mean, len(buf) * self.world_size)
        self.global_step += 1

        eos = [float(len(r) > 0 and r[-1] in self.stop_ids) for r in responses]
        metrics = {
            **rollout_metrics(dist, layout, raw_scores, scores, reward_parts, eos, rollout_logp, old_logp),
            "objective/kl": kl_mean, "objective/kl_coef": beta, "objective/advantage_mean": dist.mean(adv), **update,
            "perf/tokens_per_s": dist.sum(float(buf.num_tokens)) / max(timer.total, 1e-9), "perf/step_s": timer.total,
            **{f"perf/{k}_s": v for k, v in timer.laps.items()},
            # CUDA: bytes allocated through torch; CPU: the process's resident set (see metrics.peak_memory_gb).
            "perf/peak_mem_gb": timer.peak_gb, **{f"perf/peak_mem_{k}_gb": v for k, v in timer.peaks_gb.items()},
            **{k: dist.mean(torch.tensor(v)) for k, v in {**ro.stats, **getattr(self.rollout, "stats", {})}.items()},
            **{k: (dist.max if k.endswith("rounds") else dist.sum)(v) for k, v in batch.stats.items()},  # producer's
        }  # fmt: skip
        metrics["perf/rollout_tokens_per_s"] = dist.sum(float(layout.num_tokens)) / max(dist.max(rollout_s), 1e-9)
        if self.critic is not None:
            metrics["value/explained_variance"] = explained_variance(dist.gather(values), dist.gather(returns))
        # Every log_completions steps, a sample of this rank's rollouts for completions.jsonl and the trackers.
        self.completions = None
        if cfg.log_completions and self.global_step % cfg.log_completions == 0:
            lengths = layout.cu.diff()
            self.completions = completion_rows(prompt_texts, completions, rewards=raw_scores, lengths=lengths,
                                               advantages=layout.sequence_sum(adv) / lengths.clamp(min=1),
                                               truncated=ro.truncated or [not e for e in eos],
                                               reward_parts=reward_parts)  # fmt: skip
        return metrics

    # ------------------------------------------------------------------------------------------------
    # Stages
    # ------------------------------------------------------------------------------------------------
    @property
    def rollout_backend(self) -> str:
        """The producer's name (``rollout.name``, else its class name)."""
        return getattr(self.rollout, "name", type(self.rollout).__name__)

    def _micro_batches(self, seq_ids: np.ndarray) -> list[MicroBatch]:
        """Token-budget micro-batches of this step's buffer covering ``seq_ids``, addressing ``self.layout``."""
        return micro_batches(self._buffer, self.layout, seq_ids, self.config.max_tokens_per_microbatch, self.device)

    def _update(self, per_token: dict[str, torch.Tensor | None]) -> dict[str, float]:
        return ppo_update(self, per_token)  # the objective's module: engine/ppo.py

    def _loss_config(self, kl_coef: float, rollout_logp: bool = False) -> PPOLossConfig:  # see PPOConfig.loss_config
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
            "producer": producer_state(self),  # where an async producer restarts
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("config", {})
        diff = {k: (saved[k], v) for k, v in flat_dict(self.config).items()
                if k in saved and saved[k] != v and k not in RESUME_MAY_CHANGE}  # fmt: skip
        if diff:
            warnings.warn(f"resuming with a config that differs from the checkpoint's (saved, now): {diff}",
                          stacklevel=2)  # fmt: skip
        if (self.critic is None) != ("critic" not in state):
            raise ValueError("checkpoint and trainer disagree on having a critic (advantage_estimator changed?)")
        load_full_state(self.policy, self.policy_optimizer, state["policy"], state["policy_optimizer"], self.fsdp)
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
        model, optimizer = full_state(self.policy, self.policy_optimizer, self.fsdp)  # FSDP: a collective
        return {"policy": model, "policy_optimizer": optimizer}

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The trained policy (+ tokenizer) as an HF directory ``out_dir/policy``, the critic in ``out_dir/critic``
        (written by rank 0; every rank must call it, FSDP gathering the weights)."""
        full = self._policy_state()["policy"] if self.fsdp else None
        if self.rank != 0:
            return
        out = Path(out_dir)
        save_model(self.policy, self.tokenizer, out / "policy", state_dict=full)
        if self.critic is not None and hasattr(self.critic, "save_pretrained"):
            self.critic.save_pretrained(out / "critic")
