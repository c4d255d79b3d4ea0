"""Run configuration: ``PPOConfig`` (everything a PPO / GRPO / RLOO / REINFORCE++ run needs besides the models and
the prompts) and the generator that turns any config dataclass into command-line flags.

Each dataclass field becomes ``--kebab-case-name`` with the field's type, default and the one-line docstring
after it as help; ``fusedrl train`` (cli.py) and ``fusedrl demo`` (demo.py) build their parsers from here, and
the trainer takes the dataclass itself.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Literal

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

from .trackers import parse_report_to


@dataclass
class PPOConfig:
    """Everything one PPO / GRPO / RLOO / REINFORCE++ run needs besides the models and the prompts."""

    # --- rollout
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
    """Generation engine: hf (plain generate), hf-paged (transformers continuous batching, paged KV cache), vllm (colocated vLLM: pip install 'fusedrl[vllm]'); auto: vllm when importable, else hf-paged on CUDA when this transformers has it, else hf (on CPU continuous batching measured 0.3-1.3x plain generate)."""
    rollout_page_size: int = 32
    """Tokens per KV-cache page of the hf-paged backend (its cache is sized from each step's token budget)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of GPU memory the vllm backend may take for weights + KV cache (CUDA only; the trainer needs the rest)."""
    vllm_kv_cache_gb: float | None = None
    """KV cache of the vllm backend on CPU, in GiB (rounded up to whole GiB); None sizes it from the first step's token budget."""
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
    kl_clamp: float | None = None
    """Clamp the per-token KL in the loss to [-c, c] (verl clamps at 10; None = off)."""
    kl_importance_weighted: bool = False
    """Weight the KL in the loss by the importance ratio (DeepSeek-V3.2; TRL's use_bias_correction_kl)."""
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
    # --- update
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Optimizer steps per PPO epoch (the batch is split into this many shuffled mini-batches)."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one packed forward/backward (gradient accumulation covers the rest)."""
    clip_low: float = 0.2
    """PPO ratio clip below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = 0.2
    """PPO ratio clip above 1 (ratio <= 1 + clip_high; 0.28 is DAPO's clip-higher)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (None = off)."""
    clip_delta: float | None = None
    """Two-sided clip (INTELLECT-2, TRL's delta): clamp the unclipped ratio at delta > 1 (None = off)."""
    policy_loss: Literal[POLICY_LOSSES] = "clip"
    """Per-token objective: clip (PPO's clipped surrogate), cispo (clipped detached IS weight) or sapo (soft gate)."""
    importance_sampling_level: Literal[IS_LEVELS] = "token"
    """Ratio per token, per sequence (GSPO: exp of the mean log-ratio) or sequence-token (GSPO-token)."""
    sapo_temperature_pos: float = 1.0
    """SAPO gate temperature for positive advantages."""
    sapo_temperature_neg: float = 1.05
    """SAPO gate temperature for zero / negative advantages."""
    rollout_correction: Literal[TRAINER_ROLLOUT_CORRECTIONS] = "auto"
    """Correct the rollout engine's log-prob mismatch: none, tis (truncated IS), mis (masked IS); auto = tis when the
    rollout backend returns its own log-probs, else none."""
    rollout_correction_level: Literal[ROLLOUT_CORRECTION_LEVELS] = "token"
    """Rollout weight per token, per sequence (product of token ratios) or sequence-mean (their geometric mean)."""
    rollout_is_max: float = 2.0
    """Upper bound C of the rollout weight (tis truncates at it, mis drops tokens above it)."""
    rollout_is_min: float | None = None
    """Lower bound of the rollout weight (None: 1/C for mis, no bound for tis)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    loss_agg: Literal[AGG_MODES] = "token-mean"
    """How per-token policy losses are aggregated."""
    value_clip: float | None = 0.2
    """Clip of the value prediction around its old value (None = unclipped)."""
    learning_rate: float = 1e-5
    """Policy AdamW learning rate."""
    critic_learning_rate: float = 1e-5
    """Critic AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (policy and critic)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (None = off)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF gradient checkpointing) to save memory."""
    backend: Literal[BACKENDS] = "auto"
    """Fused-op backend: auto = Triton on CUDA, PyTorch reference on CPU."""
    fsdp: bool = False
    """With several ranks, shard the policy with FSDP2 fully_shard (each decoder layer, then the rest) instead of DDP."""
    # --- run
    total_steps: int = 100
    """PPO steps that train() runs."""
    seed: int = 0
    """Seed of prompt sampling, generation and mini-batch shuffling."""
    output_dir: str | None = None
    """Where train() writes metrics.jsonl, checkpoints and the final model (None: write nothing)."""
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
    """Every this many steps write a sample of rollouts (prompt, completion, reward, advantage, length, truncated) to output_dir/completions.jsonl and the trackers' tables (0 = off)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"PPOConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def number(name):
            v = getattr(self, name)
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        def integer(name):
            v = getattr(self, name)
            return not isinstance(v, bool) and isinstance(v, int)

        for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "generation_batch_size",
                     "ppo_epochs", "num_minibatches", "max_tokens_per_microbatch", "total_steps"):  # fmt: skip
            need(integer(name) and getattr(self, name) >= (0 if name == "total_steps" else 1), name,
                 "an int >= " + ("0" if name == "total_steps" else "1"))  # fmt: skip
        for name in ("save_every", "keep_checkpoints", "top_k", "seed", "log_every", "log_completions"):
            need(integer(name) and getattr(self, name) >= 0, name, "an int >= 0")
        need(number("temperature") and self.temperature > 0, "temperature", "a number > 0")
        need(number("top_p") and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        for name in ("gamma", "lam"):
            need(number(name) and 0 <= getattr(self, name) <= 1, name, "a number in [0, 1]")
        for name in ("kl_coef", "entropy_coef", "weight_decay", "clip_low", "clip_high"):
            need(number(name) and getattr(self, name) >= 0, name, "a number >= 0")
        for name in ("learning_rate", "critic_learning_rate", "kl_target", "kl_horizon"):
            need(number(name) and getattr(self, name) > 0, name, "a number > 0")
        for name in ("reward_clip", "max_grad_norm", "value_clip"):
            ok = getattr(self, name) is None or (number(name) and getattr(self, name) > 0)
            need(ok, name, "None or a number > 0")
        for name in ("dual_clip", "clip_delta"):
            ok = getattr(self, name) is None or (number(name) and getattr(self, name) > 1)
            need(ok, name, "None or a number > 1")
        need(self.dual_clip is None or self.clip_delta is None, "clip_delta", "None when dual_clip is set (one bound)")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "rollout_is_max"):
            need(number(name) and getattr(self, name) > 0, name, "a number > 0")
        ok = self.kl_clamp is None or (number("kl_clamp") and self.kl_clamp > 0)
        need(ok, "kl_clamp", "None or a number > 0")
        ok = self.rollout_is_min is None or (
            number("rollout_is_min") and 0 <= self.rollout_is_min <= self.rollout_is_max
        )
        need(ok, "rollout_is_min", f"None or a number in [0, rollout_is_max = {self.rollout_is_max}]")
        need(self.policy_loss in POLICY_LOSSES, "policy_loss", f"one of {POLICY_LOSSES}")
        if self.policy_loss != "clip":
            need(self.dual_clip is None and self.clip_delta is None, "policy_loss",
                 "'clip' when dual_clip or clip_delta is set")  # fmt: skip
        need(self.importance_sampling_level in IS_LEVELS, "importance_sampling_level", f"one of {IS_LEVELS}")
        need(self.rollout_correction in TRAINER_ROLLOUT_CORRECTIONS, "rollout_correction",
             f"one of {TRAINER_ROLLOUT_CORRECTIONS}")  # fmt: skip
        need(self.rollout_correction_level in ROLLOUT_CORRECTION_LEVELS, "rollout_correction_level",
             f"one of {ROLLOUT_CORRECTION_LEVELS}")  # fmt: skip
        need(self.group_std in GROUP_STDS, "group_std", f"one of {GROUP_STDS}")
        need(self.advantage_estimator in ADVANTAGE_ESTIMATORS, "advantage_estimator", f"one of {ADVANTAGE_ESTIMATORS}")
        need(self.kl_estimator in (None, *KL_ESTIMATORS), "kl_estimator", f"None or one of {KL_ESTIMATORS}")
        if self.kl_estimator is not None and self.kl_in_reward_resolved:
            need(
                self.kl_estimator in REWARD_KL_ESTIMATORS,
                "kl_estimator",
                f"one of {REWARD_KL_ESTIMATORS} when the KL is in the reward (k3+ is a straight-through loss estimator)",
            )
        need(self.loss_agg in AGG_MODES, "loss_agg", f"one of {AGG_MODES}")
        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            raise ValueError(f"PPOConfig.{e}") from None
        need(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        need(self.rollout_backend in ROLLOUT_BACKENDS, "rollout_backend", f"one of {ROLLOUT_BACKENDS}")
        need(integer("rollout_page_size") and self.rollout_page_size >= 4, "rollout_page_size", "an int >= 4")
        ok = number("vllm_gpu_memory_utilization") and 0 < self.vllm_gpu_memory_utilization <= 1
        need(ok, "vllm_gpu_memory_utilization", "a number in (0, 1]")
        ok = self.vllm_kv_cache_gb is None or (number("vllm_kv_cache_gb") and self.vllm_kv_cache_gb > 0)
        need(ok, "vllm_kv_cache_gb", "None or a number > 0")
        if self.advantage_estimator in GROUP_ESTIMATORS:
            need(
                self.samples_per_prompt >= 2,
                "samples_per_prompt",
                f">= 2 for advantage_estimator={self.advantage_estimator!r} (a group of one has no baseline)",
            )

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


# ----------------------------------------------------------------------------------------------------
# Parser generation from dataclasses
# ----------------------------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string literal right after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):  # fmt: skip
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


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
    """``[(field, resolved type)]`` of a dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One ``--kebab-name`` flag per field of ``cls`` (default: SUPPRESS, so only given flags appear)."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for f, tp in dataclass_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        conv, base, choices, optional = _converter(flag, tp)
        help_text = f"{docs.get(f.name, '')} (default: {f.default!r})".replace("%", "%%")
        if base is bool and not optional:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        meta = "{" + ",".join(map(str, choices)) + "}" if choices else base.__name__.upper()
        group.add_argument(flag, type=conv, default=argparse.SUPPRESS, metavar=meta, dest=f.name, help=help_text)
