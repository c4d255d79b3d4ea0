"""The names of fusedrl's modes, each defined once and importable without torch (the CLI's ``--help`` builds its
choices from them before anything heavy is imported). ``fusedrl.kernels`` and ``fusedrl.engine`` re-export the
ones they use."""

IGNORE_INDEX = -100
"""Label of a token that is not scored (logp 0, no gradient): the PyTorch / Hugging Face convention."""
BACKENDS = ("auto", "triton", "torch")
"""Fused-op backends: auto = Triton on CUDA, the PyTorch path elsewhere."""
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
"""Per-token KL(pi || pi_ref) estimators of the loss: k1, k2, k3 and k3+ (k3's value, k2's gradient)."""
REWARD_KL_ESTIMATORS = tuple(e for e in KL_ESTIMATORS if e != "k3+")
"""Estimators valid in reward shaping: a reward carries no gradient, so k3+ (a gradient trick) would be k3."""
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
"""How per-token losses are aggregated into one number."""
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")
"""The trainer's advantage estimators."""
GROUP_ESTIMATORS = ("grpo", "rloo")
"""Baselined within groups of samples of one prompt (need group_size >= 2; never whitened over the batch)."""
TOKEN_REWARD_ESTIMATORS = ("gae", "reinforce++")
"""Built from per-token rewards (so a KL penalty in the reward reaches them token by token)."""
ROLLOUT_BACKENDS = ("auto", "hf", "hf-paged", "vllm")
"""Rollout (generation) backends: hf = plain ``generate``, hf-paged = transformers continuous batching, vllm =
colocated vLLM; auto = vllm when importable, else hf-paged on CUDA when this transformers has it, else hf."""
