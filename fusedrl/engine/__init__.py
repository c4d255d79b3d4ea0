"""fusedrl.engine: producers -> trajectories -> objectives -> the update loop.

    from fusedrl.engine import PPOConfig, PPOTrainer
    trainer = PPOTrainer(policy, tokenizer, reward, PPOConfig(advantage_estimator="grpo"), rollout=my_backend)

The public names below are imported on first use (``fusedrl --help`` imports this package and must not import
torch). The modules are in the repository's top-level engine/ folder (see fusedrl/__init__.py for why it is not a
package itself)."""

from fusedrl import _with_sources

__path__ = _with_sources(__path__, "engine")

# public name -> the module that defines it
_EXPORTS = {
    # PPO / GRPO / RLOO / REINFORCE++ and the configs it composes
    "PPOTrainer": "trainer",
    "PPOConfig": "config",
    "RolloutConfig": "config",
    "OptimConfig": "config",
    "RunConfig": "config",
    "EpisodeConfig": "config",
    "AsyncConfig": "config",
    # producers and the experience they make
    "RolloutBackend": "rollout_backends",
    "RolloutOutput": "rollout_backends",
    "SamplingSpec": "rollout_backends",
    "HFBackend": "rollout_backends",
    "HFPagedBackend": "rollout_backends",
    "VLLMBackend": "vllm_backend",
    "fill_buffer": "trajectories",
    "Producer": "producer",
    "ScoredBatch": "producer",
    # multi-turn episodes against environments
    "EpisodeRunner": "episodes",
    "EnvironmentFailure": "episodes",
    # the update loop every objective runs through
    "GuardedStep": "update",
    "RunDir": "update",
    "accumulate": "update",
    "adamw": "update",
    # offline objectives
    "DPOConfig": "dpo",
    "train_dpo": "dpo",
    "load_pairs": "dpo",
    "SFTConfig": "sft",
    "train_sft": "sft",
    "RewardModelConfig": "reward_model",
    "PreferencePair": "reward_model",
    "train_reward_model": "reward_model",
    "pairwise_accuracy": "reward_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
