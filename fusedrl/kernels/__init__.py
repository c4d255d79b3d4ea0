"""fusedrl.kernels: fused Triton ops for RLHF losses, each with a plain PyTorch reference beside it.

Everything other packages (fusedrl.engine, fusedrl.integrations, user code) use is exported here by a
public name: the ops and their references, the shared constants and the boundary checks. The modules are in the
repository's top-level kernels/ folder (see fusedrl/__init__.py for why it is not a package itself)."""

from fusedrl import _with_sources

__path__ = _with_sources(__path__, "kernels")

from ._utils import (
    AGG_MODES,
    BACKENDS,
    HAS_TRITON,
    IGNORE_INDEX,
    IS_LEVELS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    REWARD_KL_ESTIMATORS,
    ROLLOUT_CORRECTION_LEVELS,
    ROLLOUT_CORRECTIONS,
    check_cu_seqlens,
    check_float,
    check_int,
    check_labels_in_range,
    data_checks_enabled,
    set_validation,
    validation,
)
from .logprobs import logprobs, logprobs_ref

__all__ = [
    "AGG_MODES", "BACKENDS", "HAS_TRITON", "IGNORE_INDEX", "IS_LEVELS", "KL_ESTIMATORS", "POLICY_LOSSES",
    "REWARD_KL_ESTIMATORS", "ROLLOUT_CORRECTION_LEVELS", "ROLLOUT_CORRECTIONS",
    "check_cu_seqlens", "check_float", "check_int", "check_labels_in_range", "data_checks_enabled",
    "logprobs", "logprobs_ref", "set_validation", "validation",
]  # fmt: skip
from .gae import gae, gae_ref, shape_token_rewards

__all__ += ["gae", "gae_ref", "shape_token_rewards"]
from .configs import LOSS_TYPES, PPOLossConfig, PreferenceLossConfig
from .ppo_loss import kl_penalty, ppo_loss, ppo_loss_from_logprobs, ppo_loss_ref, token_weights

__all__ += ["PPOLossConfig", "kl_penalty", "ppo_loss", "ppo_loss_from_logprobs", "ppo_loss_ref", "token_weights"]
from .linear_ppo_loss import linear_logprobs, linear_logprobs_ref, linear_ppo_loss, linear_ppo_loss_ref

__all__ += ["linear_logprobs", "linear_logprobs_ref", "linear_ppo_loss", "linear_ppo_loss_ref"]
from .value_loss import value_loss, value_loss_ref

__all__ += ["value_loss", "value_loss_ref"]
from .linear_preference_loss import linear_preference_loss, linear_preference_loss_ref, pair_losses

__all__ += ["LOSS_TYPES", "PreferenceLossConfig", "linear_preference_loss", "linear_preference_loss_ref", "pair_losses"]
