"""fusedrl.kernels: fused Triton ops for RLHF losses, each with a plain PyTorch reference beside it."""
from ._utils import HAS_TRITON, set_validation, validation
from .logprobs import logprobs, logprobs_ref

__all__ = ["HAS_TRITON", "logprobs", "logprobs_ref", "set_validation", "validation"]
