"""The PPO trainer: one step is rollout -> buffer -> score -> advantages -> update.

    trainer = PPOTrainer(policy, tokenizer, reward, PPOConfig(advantage_estimator="grpo"))
    trainer.train(prompts)          # or: for batch in my_loader: trainer.step(batch)

``policy`` is any transformers causal LM; ``reward`` a sequence-classification reward model (score read
at the last token) or a callable ``(prompts, completions) -> list[float]``. The reference policy defaults
to a frozen copy of the policy, the critic (``gae`` only) to a value model on a copy of its backbone.

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

import contextlib
import copy
import inspect
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint import state_dict as dcp_state
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from ..kernels import PPOLossConfig, linear_ppo_loss, value_loss
from ..kernels.gae import shape_token_rewards
from .advantages import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    clip_rewards,
    compute_advantages,
)
from .attention import use_packed_attention
from .checkpoint import (
    find_latest,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .metrics import MetricsLogger
from .models import ValueModel, backbone_of, lm_head_of
from .packing import RolloutBuffer, plan_microbatches
from .rollout import (
    MicroBatch,
    context_length,
    encode_prompts,
    fill_buffer,
    generate_responses,
    response_layout,
    score_logprobs,
    score_reward_fn,
    score_reward_model,
    score_values,
)

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")
BUFFER_FIELDS = ("old_logp", "ref_logp", "values", "rewards", "advantages", "returns")


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
    """Sequences per generate() call (bounds the KV cache)."""
    # --- advantages, KL, reward processing
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce++"] = "gae"
    """gae: critic + per-token KL reward; grpo: group-normalised; rloo: leave-one-out; reinforce++: batch-normalised."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise gae advantages over the batch (grpo/rloo are baselined per group, reinforce++ always whitens)."""
    kl_coef: float = 0.05
    """KL coefficient beta (initial value when adaptive_kl)."""
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] | None = None
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
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How per-token policy losses are aggregated."""
    value_clip: float = 0.2
    """Clip of the value prediction around its old value."""
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
    backend: Literal["auto", "triton", "torch"] = "auto"
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
    """Also log metrics to TensorBoard under output_dir/tensorboard."""
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
        for name in ("save_every", "keep_checkpoints", "top_k", "seed"):
            need(integer(name) and getattr(self, name) >= 0, name, "an int >= 0")
        need(number("temperature") and self.temperature > 0, "temperature", "a number > 0")
        need(number("top_p") and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        for name in ("gamma", "lam"):
            need(number(name) and 0 <= getattr(self, name) <= 1, name, "a number in [0, 1]")
        for name in ("kl_coef", "entropy_coef", "weight_decay", "clip_low", "clip_high", "value_clip"):
            need(number(name) and getattr(self, name) >= 0, name, "a number >= 0")
        for name in ("learning_rate", "critic_learning_rate", "kl_target", "kl_horizon"):
            need(number(name) and getattr(self, name) > 0, name, "a number > 0")
        for name in ("reward_clip", "max_grad_norm"):
            ok = getattr(self, name) is None or (number(name) and getattr(self, name) > 0)
            need(ok, name, "None or a number > 0")
        ok = self.dual_clip is None or (number("dual_clip") and self.dual_clip > 1)
        need(ok, "dual_clip", "None or a number > 1")
        need(self.advantage_estimator in ESTIMATORS, "advantage_estimator", f"one of {ESTIMATORS}")
        need(self.kl_estimator in (None, "k1", "k2", "k3", "k3+"), "kl_estimator", "None, 'k1', 'k2', 'k3' or 'k3+'")
        if self.kl_estimator == "k3+":
            need(not self.kl_in_reward_resolved, "kl_estimator",
                 "k1, k2 or k3 when the KL is in the reward (k3+ is a straight-through loss estimator)")  # fmt: skip
        need(self.loss_agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"), "loss_agg",
             "'token-mean', 'seq-mean-token-sum' or 'seq-mean-token-mean'")  # fmt: skip
        need(self.backend in ("auto", "triton", "torch"), "backend", "'auto', 'triton' or 'torch'")
        if self.advantage_estimator in ("grpo", "rloo"):
            need(self.samples_per_prompt >= 2, "samples_per_prompt",
                 f">= 2 for advantage_estimator={self.advantage_estimator!r} (a group of one has no baseline)")

    @property
    def kl_in_reward_resolved(self) -> bool:
        """Where the KL penalty goes: the usual default per estimator unless kl_in_reward is set."""
        if self.kl_in_reward is not None:
            return self.kl_in_reward
        return self.advantage_estimator in ("gae", "reinforce++")

    @property
    def kl_estimator_resolved(self) -> str:
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.kl_in_reward_resolved else "k3"


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio compares two forwards of the same weights: dropout would make it noise, not 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        cfg = getattr(m, "config", None)
        if cfg is not None:
            for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                         "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):  # fmt: skip
                if isinstance(getattr(cfg, name, None), float):
                    setattr(cfg, name, 0.0)


def enable_checkpointing(model: nn.Module) -> None:
    """HF activation (gradient) checkpointing on the outermost transformers model inside ``model``."""
    for m in model.modules():
        # transformers 5 renamed the method; older releases only have the gradient_ name.
        enable = getattr(m, "activation_checkpointing_enable", None) or getattr(m, "gradient_checkpointing_enable", None)
        if enable is not None and getattr(m, "supports_gradient_checkpointing", False):
            enable()
            return
    raise ValueError(f"gradient_checkpointing=True but {type(model).__name__} holds no model that supports it")


def _dist():
    """(rank, world_size) from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
    ):
        self.config = cfg = config if config is not None else PPOConfig()
        if not isinstance(cfg, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(cfg).__name__}")
        if not isinstance(policy, nn.Module) or not hasattr(policy, "generate"):
            raise TypeError(
                f"policy must be a transformers causal LM (an nn.Module with generate), got {type(policy).__name__}"
            )
        self.rank, self.world_size = _dist()
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
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer needs a pad_token_id or an eos_token_id to pad generation batches")
        self.eos_token_id = tokenizer.eos_token_id

        self.policy = policy
        disable_dropout(policy)
        use_packed_attention(policy)
        if cfg.gradient_checkpointing:
            enable_checkpointing(policy)
        policy.train()

        # The reference is a copy of the policy as given (before any update): KL is measured from there.
        self.ref_policy = ref_policy if ref_policy is not None else copy.deepcopy(policy)
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
        self._policy_root = _PolicyBody(policy)
        if self.fsdp:
            _fully_shard(self._policy_root)
            self._policy_body = self._policy_root
        else:
            self._policy_body = self._data_parallel(self._policy_root)
        self._critic_body = self._data_parallel(self.critic) if self.critic is not None else None
        self.policy_optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.critic_optimizer = (
            torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_learning_rate, weight_decay=cfg.weight_decay)
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
        self.buffer = RolloutBuffer(fields=BUFFER_FIELDS)
        # Every rank's rollouts, rank by rank, for the globally planned update (several ranks only).
        self._all_rollouts = RolloutBuffer(fields=BUFFER_FIELDS) if self.world_size > 1 else self.buffer
        self.global_step = 0
        self.context = context_length(policy)

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------
    def train(self, prompts: Sequence[str], *, resume: bool = False) -> list[dict]:
        """Run ``config.total_steps`` steps (from the latest checkpoint in output_dir when ``resume``),
        drawing each step's prompts from ``prompts`` with a sampler seeded by (seed, step). Returns the
        metric rows; with an output_dir also writes metrics.jsonl, checkpoints and the final model."""
        cfg = self.config
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: train() needs at least one prompt")
        encode_prompts(self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, context=self.context)
        out = Path(cfg.output_dir) if cfg.output_dir is not None else None
        if resume:
            if out is None:
                raise ValueError("resume=True needs config.output_dir (where the checkpoints are)")
            latest = find_latest(out)
            if latest is None:
                raise FileNotFoundError(f"resume=True but {str(out)!r} holds no complete checkpoint")
            self.load_checkpoint(latest)
        else:
            # Generation draws from torch's global RNG; ranks get different streams (different responses).
            torch.manual_seed(cfg.seed + 1000003 * self.rank)
        logger = MetricsLogger(
            out / "metrics.jsonl" if out is not None else None,
            tensorboard_dir=(out / "tensorboard") if (out is not None and cfg.tensorboard) else None,
            progress=cfg.progress, total_steps=cfg.total_steps,
            resume_step=self.global_step if resume else None, enabled=self.rank == 0,
        )  # fmt: skip
        rows = []
        with logger:
            while self.global_step < cfg.total_steps:
                metrics = self.step(self.sample_prompts(prompts, self.global_step))
                rows.append(logger.log(self.global_step, metrics))
                if out is not None and cfg.save_every and self.global_step % cfg.save_every == 0:
                    self.save_checkpoint()
        if out is not None:
            if cfg.save_every and self.global_step % cfg.save_every:  # a longer run can resume from the end
                self.save_checkpoint()
            self.save_pretrained(out)
        return rows

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
        cfg = self.config
        timer = _PhaseTimer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        # 1. Rollout: sample responses, put prompt + response sequences in the buffer.
        prompt_ids = encode_prompts(self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, context=self.context)
        longest = max(len(p) for p in prompt_ids) + cfg.max_new_tokens
        if longest > cfg.max_tokens_per_microbatch:
            raise ValueError(
                f"PPOConfig.max_tokens_per_microbatch={cfg.max_tokens_per_microbatch} is smaller than the longest "
                f"possible sequence ({longest} tokens: prompt + max_new_tokens)"
            )
        prompt_ids = [p for p in prompt_ids for _ in range(cfg.samples_per_prompt)]  # groups are consecutive
        prompt_texts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        responses = self._with_policy(
            generate_responses, self.policy, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            batch_size=cfg.generation_batch_size,
        )  # fmt: skip
        completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        fill_buffer(self.buffer, prompt_ids, responses)
        timer.lap("rollout")

        # 2. Score: old / reference log-probs, values, sequence scores.
        buf = self.buffer
        micro = self._micro_batches(np.arange(len(buf)))
        self._with_policy(score_logprobs, self.policy, micro, buf.field("old_logp"), temperature=cfg.temperature,
                          backend=cfg.backend)  # fmt: skip
        score_logprobs(self.ref_policy, micro, buf.field("ref_logp"), temperature=cfg.temperature, backend=cfg.backend)
        if self.critic is not None:
            score_values(self.critic, micro, buf.field("values"))
        if self.reward_model is not None:
            raw_scores = score_reward_model(self.reward_model, micro, len(buf))
        else:
            raw_scores = score_reward_fn(self.reward_fn, prompt_texts, completions)
        timer.lap("score")

        # 3. Advantages over the response tokens (R of them; cu_resp splits them by sequence).
        resp_index, cu_resp = response_layout(buf)
        field = lambda name: torch.from_numpy(buf.field(name))
        logp, ref_logp = field("old_logp")[resp_index], field("ref_logp")[resp_index]
        scores = self._process_scores(raw_scores)
        beta = self.kl_controller.value
        in_reward = cfg.kl_in_reward_resolved
        token_rewards, _ = shape_token_rewards(
            scores, logp, ref_logp, cu_resp, kl_coef=beta if in_reward else 0.0,
            estimator=cfg.kl_estimator_resolved if in_reward else "k1",  # unused: the KL is in the loss
        )
        values = field("values")[resp_index] if self.critic is not None else None
        seq_rewards = torch.zeros(len(buf)).index_add_(0, _seq_of(cu_resp), token_rewards)
        adv, returns = self._advantages(seq_rewards, token_rewards, values, cu_resp)
        field("rewards")[resp_index] = token_rewards
        field("advantages")[resp_index] = adv
        if returns is not None:
            field("returns")[resp_index] = returns
        timer.lap("advantages")

        # 4. Update: PPO epochs over shuffled mini-batches of token-budget micro-batches.
        update = self._update()
        timer.lap("update")

        # KL per sequence (k1: sum of log-ratios), the quantity the adaptive controller steers.
        seq_kl = torch.zeros(len(buf)).index_add_(0, _seq_of(cu_resp), (logp - ref_logp).float())
        kl_mean = self._mean_global(seq_kl)
        self.kl_controller.update(kl_mean, len(buf) * self.world_size)
        self.global_step += 1

        n_tokens = self._sum_global(float(buf.num_tokens))
        resp_len = cu_resp.diff().float()
        metrics = {
            "rollout/reward_mean": self._mean_global(raw_scores),
            "rollout/reward_std": self._std_global(raw_scores),
            "rollout/score_mean": self._mean_global(scores),
            "rollout/response_len": self._mean_global(resp_len),
            "rollout/eos_frac": self._mean_global(
                torch.tensor([float(len(r) > 0 and r[-1] == self.eos_token_id) for r in responses])
            ),
            "objective/kl": kl_mean,
            "objective/kl_coef": beta,
            "objective/advantage_mean": self._mean_global(adv),
            **update,
            "perf/tokens_per_s": n_tokens / max(timer.total, 1e-9),
            "perf/step_s": timer.total,
            **{f"perf/{k}_s": v for k, v in timer.laps.items()},
            "perf/peak_mem_gb": _peak_memory_gb(self.device),
        }
        if self.critic is not None:
            metrics["value/explained_variance"] = _explained_variance(
                self._gather_global(values), self._gather_global(returns)
            )
        return metrics

    # ------------------------------------------------------------------------------------------------
    # Stages
    # ------------------------------------------------------------------------------------------------
    def _plan(self, seq_ids: np.ndarray) -> list[np.ndarray]:
        """Token-budget micro-batches (lists of buffer sequence indices) covering ``seq_ids``."""
        lengths = np.asarray(self.buffer.lengths())[seq_ids]
        plan = plan_microbatches(lengths, self.config.max_tokens_per_microbatch)[0]
        return [seq_ids[np.asarray(mb, dtype=np.int64)] for mb in plan if len(mb)]

    def _micro_batches(self, seq_ids: np.ndarray) -> list[MicroBatch]:
        return [MicroBatch(self.buffer, mb, self.device) for mb in self._plan(seq_ids)]

    def _process_scores(self, raw: torch.Tensor) -> torch.Tensor:
        """Optional running-std normalisation, then optional clipping, of the sequence scores."""
        cfg = self.config
        scores = raw
        if cfg.normalize_rewards:
            self.reward_stats.update(self._gather_global(raw))
            scores = self.reward_stats.normalize(scores, center=False)
        return clip_rewards(scores, cfg.reward_clip)

    def _advantages(self, seq_rewards, token_rewards, values, cu_resp):
        """compute_advantages, with batch whitening over every rank's tokens when there are several ranks."""
        cfg = self.config
        est = cfg.advantage_estimator
        if self.world_size == 1 or est in ("grpo", "rloo"):  # groups never straddle ranks
            return compute_advantages(
                est, scores=seq_rewards, cu_seqlens=cu_resp,
                token_rewards=token_rewards if est in ("gae", "reinforce++") else None, values=values,
                group_size=cfg.samples_per_prompt, gamma=cfg.gamma, lam=cfg.lam,
                whiten_advantages=cfg.whiten_advantages,
            )  # fmt: skip
        if est == "gae":
            adv, returns = compute_advantages(
                "gae", scores=None, cu_seqlens=cu_resp, token_rewards=token_rewards, values=values,
                gamma=cfg.gamma, lam=cfg.lam, whiten_advantages=False,
            )  # fmt: skip
            return (self._whiten_global(adv) if cfg.whiten_advantages else adv), returns
        # reinforce++: returns-to-go (GAE with zero values and lam = 1), whitened over the global batch.
        rtg, _ = compute_advantages("gae", scores=None, cu_seqlens=cu_resp, token_rewards=token_rewards,
                                    values=torch.zeros_like(token_rewards), gamma=cfg.gamma, lam=1.0,
                                    whiten_advantages=False)  # fmt: skip
        return self._whiten_global(rtg), None

    def _update(self) -> dict[str, float]:
        cfg = self.config
        buf = self._gather_rollouts()
        field = buf.field
        lengths = np.asarray(buf.lengths())
        loss_tokens = _loss_tokens_per_sequence(buf)
        loss_cfg = PPOLossConfig(
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
            kl_coef=0.0 if cfg.kl_in_reward_resolved else self.kl_controller.value,
            kl_estimator=cfg.kl_estimator_resolved, entropy_coef=cfg.entropy_coef,
            temperature=cfg.temperature, agg=cfg.loss_agg,
        )  # fmt: skip
        use_ref = loss_cfg.kl_coef > 0
        # The same seed on every rank: all ranks split the global batch into the same mini-batches.
        rng = np.random.default_rng([cfg.seed, self.global_step, 1])
        sums = _Sums()
        for _ in range(cfg.ppo_epochs):
            for mini in np.array_split(rng.permutation(len(buf)), cfg.num_minibatches):
                mini = np.sort(mini)
                # One plan for the whole mini-batch, identical on every rank; this rank trains plan[rank].
                plan = plan_microbatches(lengths[mini], cfg.max_tokens_per_microbatch, num_ranks=self.world_size)
                mine = [mini[mb] for mb in plan[self.rank] if len(mb)]
                # Global denominators: each micro-batch loss is its share of the full mini-batch loss.
                n_tok, n_seq = int(loss_tokens[mini].sum()), len(mini)
                # A rank left without sequences still joins the gradient all-reduce, with a zero-weighted pass.
                passes = [(ids, 1.0) for ids in mine] or [(mini[:1], 0.0)]
                for i, (ids, scale) in enumerate(passes):
                    mb = MicroBatch(buf, ids, self.device)
                    # DDP all-reduces in the backward of the step's last micro-batch only; the others accumulate.
                    with self._no_sync(i < len(passes) - 1):
                        hidden = self._policy_body(mb.input_ids, mb.position_ids, **mb.attn_kwargs)[0][mb.rows]
                        # After the forward: FSDP swaps the gathered head weight in for the shard until backward.
                        weight, bias = lm_head_of(self.policy)
                        loss, m = linear_ppo_loss(
                            hidden, weight, mb.labels, mb.gather(field("old_logp")), mb.gather(field("advantages")),
                            bias=bias, ref_logp=mb.gather(field("ref_logp")) if use_ref else None,
                            config=loss_cfg, cu_seqlens=mb.cu_rows, num_tokens=n_tok, num_sequences=n_seq,
                            backend=cfg.backend,
                        )  # fmt: skip
                        (loss * scale).backward()
                        if self.critic is not None:
                            v = self._critic_body(mb.input_ids, position_ids=mb.position_ids, **mb.attn_kwargs)
                            vloss, vm = value_loss(
                                v[0][mb.rows], mb.gather(field("values")), mb.gather(field("returns")),
                                clip=cfg.value_clip, agg="token-mean", num_tokens=n_tok, backend=cfg.backend,
                            )  # fmt: skip
                            (vloss * scale).backward()
                    if scale == 0.0:
                        continue
                    w = mb.num_loss_tokens
                    sums.add("loss/policy", loss.detach())
                    for k in ("clipfrac", "approx_kl", "entropy", "kl"):
                        sums.add_weighted(f"policy/{k}", m[k], w)
                    sums.max("policy/ratio_max", m["ratio_max"])
                    if self.critic is not None:
                        sums.add("loss/value", vloss.detach())
                        sums.add_weighted("value/clipfrac", vm["clipfrac"], w)
                        sums.add_weighted("value/vpred_mean", vm["vpred_mean"], w)
                sums.add("policy/grad_norm", self._optimizer_step(self.policy, self.policy_optimizer))
                if self.critic is not None:
                    sums.add("value/grad_norm", self._optimizer_step(self.critic, self.critic_optimizer))
                sums.count_optimizer_step()
        return sums.result(self)

    def _optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Clip, step, zero (gradients are already summed over ranks by DDP / FSDP). Returns the (pre-clip)
        global gradient norm."""
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        if isinstance(norm, DTensor):  # FSDP shards: the norm is already reduced over ranks
            norm = norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    # ------------------------------------------------------------------------------------------------
    # Data parallelism
    # ------------------------------------------------------------------------------------------------
    def _data_parallel(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel with summed gradients when there are several ranks."""
        if self.world_size == 1:
            return module
        # No buffer broadcast before every forward: the only buffers are constants (rotary frequencies).
        # Newer torch renamed the flag (the old name still works but warns).
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device] if self.device.type == "cuda" else None, **no_buffer_sync
        )
        ddp.register_comm_hook(None, _allreduce_sum_hook)
        return ddp

    def _with_policy(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the policy outside the update (generation, scoring). With FSDP the full
        weights are gathered once for the whole call: ranks run different numbers of forwards there (their own
        rollouts), so a per-forward all-gather would not match up across ranks."""
        if not self.fsdp:
            return fn(*args, **kwargs)
        units = [m for m in self._policy_root.modules() if isinstance(m, FSDPModule)]
        layers = [m for m in units if m is not self._policy_root]
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
        for m in units:
            m.unshard()
        try:
            return self._policy_root.run(fn, *args, **kwargs)
        finally:
            for m in units:
                m.reshard()
            for m in layers:
                m.set_reshard_after_forward(True, recurse=False)

    def _no_sync(self, accumulate: bool):
        """Inside: backward passes accumulate local gradients without the DDP all-reduce / FSDP reduce-scatter."""
        stack = contextlib.ExitStack()
        if accumulate and self.world_size > 1:
            for body in (self._policy_body, self._critic_body):
                if isinstance(body, nn.parallel.DistributedDataParallel):
                    stack.enter_context(body.no_sync())
                elif body is not None:
                    body.set_requires_gradient_sync(False)
                    stack.callback(body.set_requires_gradient_sync, True)
        return stack

    def _gather_rollouts(self) -> RolloutBuffer:
        """Every rank's rollout buffer (tokens, response mask, fields), concatenated in rank order: the
        global batch, which a single process with all the prompts would hold in the same order."""
        if self.world_size == 1:
            return self.buffer
        buf = self.buffer
        mine = {"lengths": np.asarray(buf.lengths()), "tokens": np.array(buf.tokens()),
                "response_mask": np.array(buf.response_mask()),
                "fields": {f: np.array(buf.field(f)) for f in BUFFER_FIELDS}}  # fmt: skip
        parts = [None] * self.world_size
        torch.distributed.all_gather_object(parts, mine)  # small CPU arrays: pickled through the process group
        out = self._all_rollouts
        out.clear()
        for part in parts:
            cuts = np.cumsum(part["lengths"])[:-1]
            out.append_many(np.split(part["tokens"], cuts), np.split(part["response_mask"], cuts),
                            **{f: np.split(v, cuts) for f, v in part["fields"].items()})  # fmt: skip
        return out

    # ------------------------------------------------------------------------------------------------
    # Cross-rank reductions (identity in one process)
    # ------------------------------------------------------------------------------------------------
    def _sum_global(self, x: float) -> float:
        if self.world_size == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return float(t)

    def _whiten_global(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps) with mean and population variance over every rank's elements."""
        xd = x.double()
        n = self._sum_global(float(x.numel()))
        mean = self._sum_global(float(xd.sum())) / n
        var = self._sum_global(float(((xd - mean) ** 2).sum())) / n
        return ((xd - mean) / math.sqrt(var + eps)).float()

    def _max_global(self, x: float) -> float:
        if self.world_size == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def _gather_global(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [None] * self.world_size
        torch.distributed.all_gather_object(parts, x.detach().cpu())
        return torch.cat(parts)

    def _mean_global(self, x: torch.Tensor) -> float:
        x = x.detach().double().reshape(-1)
        n = self._sum_global(float(x.numel()))
        return self._sum_global(float(x.sum())) / n if n else math.nan

    def _std_global(self, x: torch.Tensor) -> float:
        x = self._gather_global(x.detach().double().reshape(-1))
        return float(x.std(unbiased=False)) if x.numel() else math.nan

    def _comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: weights, optimizer moments, RNG states,
        KL controller, reward statistics, step counter and config."""
        state = {
            "step": self.global_step,
            "config": asdict(self.config),
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
        diff = {k: (saved[k], v) for k, v in asdict(self.config).items()
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

    def save_checkpoint(self) -> Path | None:
        """``<output_dir>/ckpt-<step>``, written atomically by rank 0 (every rank holds the same weights)."""
        if self.config.output_dir is None:
            raise ValueError("save_checkpoint needs config.output_dir")
        if self.world_size > 1:
            # Each rank samples with its own RNG stream: rank 0 stores them all.
            states = [None] * self.world_size
            torch.distributed.all_gather_object(states, rng_state())
        state = self.state_dict()
        if self.world_size > 1:
            state["rng_per_rank"] = states
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.config.output_dir, self.global_step, state,
                                   keep_last=self.config.keep_checkpoints)  # fmt: skip
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location="cpu")
        if "rng_per_rank" in state:
            if len(state["rng_per_rank"]) != self.world_size:
                raise ValueError(
                    f"checkpoint was written by {len(state['rng_per_rank'])} ranks, this run has {self.world_size}"
                )
            state["rng"] = state["rng_per_rank"][self.rank]
        self.load_state_dict(state)

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


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------
def _seq_of(cu: torch.Tensor) -> torch.Tensor:
    """(R,) sequence index of every packed token, from (B+1,) offsets."""
    return torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())


class _PolicyBody(nn.Module):
    """The policy's forward as the fused loss needs it: packed hidden states (1, N, H), not logits.

    It holds the whole policy, so its parameters (what DDP reduces) include the lm_head that the fused loss
    applies outside this forward: the head's gradient comes from the same backward, so DDP's per-parameter
    hook fires for it as for any other and it is all-reduced with the rest."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, position_ids, **attn_kwargs):  # (1, N), (1, N) -> (1, N, H)
        body = backbone_of(self.policy)
        return body(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs).last_hidden_state

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``: generation or scoring, which use the policy outside ``forward``; with FSDP it
        runs under the root's forward hooks (``_fully_shard`` registers it as a forward method)."""
        return fn(*args, **kwargs)


def _fully_shard(body: _PolicyBody) -> None:
    """FSDP2 in place: each decoder layer is its own unit, the root holds the rest (embeddings, final norm, head).
    Gradients are summed over ranks like DDP's here (the losses already have the global denominator)."""
    layers = [m for child in backbone_of(body.policy).children() if isinstance(child, nn.ModuleList) for m in child]
    if not layers:
        raise ValueError(f"PPOConfig.fsdp=True needs a policy whose body has its decoder layers in an nn.ModuleList; "
                         f"{type(body.policy).__name__} has none")  # fmt: skip
    for layer in layers:
        fully_shard(layer)
    # The root (embeddings, norm, head) stays gathered after its forward: the fused loss reads the head weight
    # after the forward returns.
    fully_shard(body, reshard_after_forward=False)
    # Root hooks around run() too, so that the first call (generation) makes the body the FSDP root.
    register_fsdp_forward_method(body, "run")
    for m in body.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


def _allreduce_sum_hook(process_group, bucket):
    """DDP communication hook: sum gradients over ranks (DDP's default averages). Each rank's loss is
    already divided by the global token count, so the sum is the full-batch gradient."""
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _loss_tokens_per_sequence(buf: RolloutBuffer) -> np.ndarray:
    """(n,) int64 tokens carrying a loss per sequence: response tokens after the first position (a packed row
    predicts the next token, so a sequence's first token is never a target; ``MicroBatch.num_loss_tokens``)."""
    offsets = np.asarray(buf.offsets())
    mask = np.asarray(buf.response_mask()).astype(np.int64)
    mask[offsets[:-1]] = 0
    return np.add.reduceat(mask, offsets[:-1]) if len(offsets) > 1 else np.zeros(0, dtype=np.int64)


def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var = returns.var(unbiased=False)
    if var <= 0:
        return math.nan
    return float(1.0 - (returns - values).var(unbiased=False) / var)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss: the process's resident-set peak (kilobytes on Linux, bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class _PhaseTimer:
    """Wall time per phase of a step; on CUDA each lap synchronises so the time lands in its phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self.t0 = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: once per phase, for honest phase times
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.t0


class _Sums:
    """Accumulates update metrics without a host sync per micro-batch: device tensors (or floats) are
    summed, token-weighted or maxed as they come and read once, in ``result``."""

    def __init__(self):
        self.sum: dict = {}
        self.wsum: dict = {}
        self.maxes: dict = {}
        self.steps = 0

    def add(self, k, v):
        self.sum[k] = self.sum.get(k, 0.0) + v

    def add_weighted(self, k, v, w: float):
        s, n = self.wsum.get(k, (0.0, 0.0))
        self.wsum[k] = (s + v * w, n + w)

    def max(self, k, v):
        self.maxes[k] = v if k not in self.maxes else torch.maximum(torch.as_tensor(self.maxes[k]), v)

    def count_optimizer_step(self):
        self.steps += 1

    def result(self, trainer: PPOTrainer) -> dict[str, float]:
        out = {}
        n = max(self.steps, 1)
        for k, v in self.sum.items():
            # Losses: each optimizer step's rank-local sum of micro-batch losses is its share of the
            # global loss; summed over ranks it is the full mini-batch loss, averaged over optimizer steps.
            v = float(v)  # host sync: once per metric per step
            out[k] = (trainer._sum_global(v) if k.startswith("loss/") else v) / n
        for k, (s, w) in self.wsum.items():
            out[k] = trainer._sum_global(float(s)) / max(trainer._sum_global(w), 1e-12)
        for k, v in self.maxes.items():
            out[k] = trainer._max_global(float(v))
        return out
