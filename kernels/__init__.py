"""fusedrl.kernels: fused Triton ops for RLHF losses, each with a plain PyTorch reference beside it."""
from ._utils import HAS_TRITON, set_validation, validation
from .logprobs import logprobs, logprobs_ref

__all__ = ["HAS_TRITON", "logprobs", "logprobs_ref", "set_validation", "validation"]
from .gae import gae, gae_ref, shape_token_rewards

__all__ += ["gae", "gae_ref", "shape_token_rewards"]
from .ppo_loss import PPOLossConfig, kl_penalty, ppo_loss, ppo_loss_ref, token_weights

__all__ += ["PPOLossConfig", "kl_penalty", "ppo_loss", "ppo_loss_ref", "token_weights"]
from .linear_ppo_loss import linear_logprobs, linear_logprobs_ref, linear_ppo_loss, linear_ppo_loss_ref

__all__ += ["linear_logprobs", "linear_logprobs_ref", "linear_ppo_loss", "linear_ppo_loss_ref"]
from .value_loss import value_loss, value_loss_ref

__all__ += ["value_loss", "value_loss_ref"]
