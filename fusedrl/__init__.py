"""fusedrl: a kernel-optimised RLHF engine for PyTorch.

- ``fusedrl.kernels``: fused Triton ops (log-probs, PPO loss, KL, entropy, value loss, GAE) with
  plain PyTorch references beside them.
- ``fusedrl.engine``: packed rollouts, padding-free attention and the PPO/GRPO/RLOO/REINFORCE++ trainer.
"""

__version__ = "0.1.0"
