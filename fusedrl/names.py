"""The names of fusedrl's modes, each defined once and importable without torch (the CLI's ``--help`` builds its
choices from them before anything heavy is imported). ``fusedrl.kernels`` and ``fusedrl.engine`` re-export the
ones they use."""

IGNORE_INDEX = -100
"""Label of a token that is not scored (logp 0, no gradient): the PyTorch / Hugging Face convention."""
BACKENDS = ("auto", "triton", "torch")
"""Fused-op backends: auto = Triton on CUDA, the PyTorch path elsewhere."""
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+", "abs")
"""Per-token KL(pi || pi_ref) estimators of the loss: k1, k2, k3, k3+ (k3's value, k2's gradient) and abs (|k1|)."""
REWARD_KL_ESTIMATORS = tuple(e for e in KL_ESTIMATORS if e != "k3+")
"""Estimators valid in reward shaping: a reward carries no gradient, so k3+ (a gradient trick) would be k3."""
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""How per-token losses are aggregated into one number (``fusedrl.kernels.token_weights``)."""
POLICY_LOSSES = ("clip", "cispo", "sapo")
"""Per-token policy objectives: PPO's clipped surrogate, CISPO's clipped detached IS weight, SAPO's soft gate."""
IS_LEVELS = ("token", "sequence", "sequence-token")
"""Where the importance ratio lives: per token (PPO), per sequence (GSPO) or GSPO-token."""
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
"""Rollout importance correction from the rollout engine's log-probs: off, truncated (TIS) or masked (MIS)."""
TRAINER_ROLLOUT_CORRECTIONS = ("auto", *ROLLOUT_CORRECTIONS)
"""The trainer's choices: auto = tis when the rollout backend returns its own log-probs, else none."""
ROLLOUT_CORRECTION_LEVELS = ("token", "sequence", "sequence-mean")
"""The rollout weight per token, per sequence (the product of its token ratios) or their geometric mean."""
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")
"""The trainer's advantage estimators."""
GROUP_STDS = ("population", "unbiased")
"""GRPO's group std: divide by the group size (fusedrl's default) or by size - 1 (DeepSeekMath, TRL, verl)."""
GROUP_ESTIMATORS = ("grpo", "rloo")
"""Baselined within groups of samples of one prompt (need group_size >= 2; never whitened over the batch)."""
TOKEN_REWARD_ESTIMATORS = ("gae", "reinforce++")
"""Built from per-token rewards (so a KL penalty in the reward reaches them token by token)."""
ROLLOUT_BACKENDS = ("auto", "hf", "hf-paged", "vllm")
"""Rollout (generation) backends: hf = plain ``generate``, hf-paged = transformers continuous batching, vllm =
colocated vLLM; auto = vllm when importable, else hf-paged on CUDA when this transformers has it, else hf."""
