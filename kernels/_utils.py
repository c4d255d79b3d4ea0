"""Shared plumbing for the fused ops: Triton import, backend choice, launches on CPU (interpreter),
input validation and row views of (..., V) tensors. Internal; the constants (``IGNORE_INDEX``, ``BACKENDS``,
``KL_ESTIMATORS``, ``REWARD_KL_ESTIMATORS``, ``AGG_MODES``, defined once in ``fusedrl.names``) and, with the checks other
packages use (``check_float``, ``check_int``, ``check_labels_in_range``, ``check_cu_seqlens``,
``data_checks_enabled``), exported by fusedrl.kernels: import them from there. The row building blocks of
the logits ops live in ``_rows.py``.

CPU tensors run the very same kernel source through Triton's interpreter, which Triton only enables when
``TRITON_INTERPRET=1`` is in the environment before it is imported. On a machine without CUDA, where no
Triton kernel could be compiled anyway, importing fusedrl.kernels first sets it (if triton is not imported
yet); on a CUDA machine set it yourself to run Triton kernels on CPU tensors (tests/conftest.py explains the
two test passes there).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext

import torch

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:  # Triton ships wheels for Linux x86-64/aarch64 only; elsewhere the torch backend still works.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

    class _Shim:
        """Stands in for triton / triton.language so kernel definitions still import."""

        constexpr = int
        float32 = int64 = int32 = None

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):  # any other attribute: only touched inside kernels
            return None

    triton = tl = _Shim()  # type: ignore[assignment]

# The names every op and the engine share, defined once in fusedrl.names (torch-free; exported by fusedrl.kernels).
from fusedrl.names import (  # noqa: E402, F401 (re-exported)
    AGG_MODES,
    BACKENDS,
    IGNORE_INDEX,
    IS_LEVELS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    REWARD_KL_ESTIMATORS,
    ROLLOUT_CORRECTION_LEVELS,
    ROLLOUT_CORRECTIONS,
)

_VALIDATE = os.environ.get("FUSEDRL_VALIDATE", "1") != "0"


def set_validation(enabled: bool) -> None:
    """Turn the data-dependent input checks (label range) on or off. They cost one device-to-host sync
    per call on GPU and are skipped automatically while a CUDA graph is being captured; switch them off
    for the fastest steady-state loop. Shape/dtype/device checks are free and always run."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


@contextmanager
def validation(enabled: bool):
    """Context manager form of ``set_validation``."""
    global _VALIDATE
    old, _VALIDATE = _VALIDATE, bool(enabled)
    try:
        yield
    finally:
        _VALIDATE = old


def data_checks_enabled(t: torch.Tensor) -> bool:
    """True when checks that need the tensor's values (a host sync on GPU) should run."""
    if not _VALIDATE:
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> Triton on CUDA, the PyTorch reference path elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    return backend


class InterpreterUnavailable(RuntimeError):
    """backend='triton' on CPU tensors in a process whose Triton compiles for the GPU (no interpreter)."""


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """Launch a Triton kernel on the tensors' device. Triton launches on the current CUDA device and its current
    stream, so a CUDA launch runs under the tensors' device guard: tensors on cuda:1 while cuda:0 is current
    would otherwise be read through pointers of another device's context. Tensors on the CPU need the kernel
    to be an interpreted function."""
    if device.type == "cpu" and not hasattr(kernel, "rewrite"):
        raise InterpreterUnavailable(
            "backend='triton' on CPU tensors runs Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
            "environment before triton is imported (it was not set, or triton was imported first)"
        )
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        kernel[grid](*args, **kwargs)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def vocab_block(V: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a streaming pass over a vocabulary row.

    On GPU, 16-byte loads per thread want 8 bf16 / 4 fp32 elements; 8 warps x 32 threads x that many
    elements gives 2048 / 1024 per block, and two or four such tiles per iteration hide latency. The
    interpreter runs a block as one NumPy op, so there bigger blocks simply mean fewer Python loops."""
    if device.type == "cpu":
        return min(next_pow2(V), 32768), 1
    cap = 8192 if dtype.itemsize <= 2 else 4096
    block = min(next_pow2(V), cap)
    return block, (16 if block >= 8192 else 8 if block >= 2048 else 4)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32, bf16 or fp16), got dtype {t.dtype}")


def check_int(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got dtype {t.dtype}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int, name: str = "cu_seqlens",
                     device: torch.device | None = None) -> None:  # fmt: skip
    """``cu_seqlens`` is a 1-D integer tensor of B+1 offsets (B >= 0), starting at 0, non-decreasing, ending at
    ``n_tokens`` (and on ``device`` when given). The value checks are one host sync on GPU and run only while
    data checks are enabled (``fusedrl.kernels.set_validation``; never under CUDA-graph capture)."""
    check_int(name, cu_seqlens)
    if device is not None and cu_seqlens.device != torch.device(device):
        raise ValueError(f"{name} is on {cu_seqlens.device} but the per-token tensors are on {device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"{name} must be a 1-D tensor of B+1 sequence offsets (leading 0), got shape {tuple(cu_seqlens.shape)}"
        )
    if not data_checks_enabled(cu_seqlens):
        return
    # One transfer for all three facts: first offset, last offset, smallest step.
    steps = cu_seqlens.diff() if cu_seqlens.shape[0] > 1 else cu_seqlens.new_zeros(1)
    first, last, min_step = torch.stack([cu_seqlens[0], cu_seqlens[-1], steps.min()]).tolist()  # host sync
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {first}")
    if min_step < 0:
        b = int((steps < 0).nonzero()[0])
        raise ValueError(
            f"{name} must be non-decreasing (sequence lengths >= 0), got {name}[{b}] = {int(cu_seqlens[b])} > "
            f"{name}[{b + 1}] = {int(cu_seqlens[b + 1])}"
        )
    if last != n_tokens:
        raise ValueError(f"{name} must end at the number of tokens N = {n_tokens}, got {name}[-1] = {last}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    dev0 = named[0][1].device
    for k, v in named[1:]:
        if v.device != dev0:
            raise ValueError(f"{k} is on {v.device} but {named[0][0]} is on {dev0}: all tensors must be on one device")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def check_labels_in_range(labels: torch.Tensor, V: int, ignore_index: int, name: str = "labels") -> None:
    """Every label is in [0, V) or equals ignore_index. One host sync on GPU (see set_validation)."""
    if labels.numel() == 0 or not data_checks_enabled(labels):
        return
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):  # host sync: documented, skipped under graph capture / set_validation(False)
        idx = int(bad.flatten().nonzero()[0])
        val = int(labels.flatten()[idx])
        raise ValueError(
            f"{name} must be in [0, {V}) (the vocabulary size of logits) or equal ignore_index={ignore_index}; "
            f"got {val} at flat position {idx}"
        )


def per_token(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A per-token tensor (any shape, any strides) as the flat (n,) vector, in ``dtype`` when given, that the
    kernels index as ``PTR + row``. ``reshape(-1)`` alone may keep a stride (a column of a wider tensor, whose
    neighbours a kernel would read instead); such a view is copied: n elements beside the (n, V) logits the ops
    stream, and one indexing rule in every kernel. Contiguous input of the right dtype is returned as it is."""
    flat = t.reshape(-1)
    if dtype is not None:
        flat = flat.to(dtype)
    return flat.contiguous()


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` may address one element (an expanded or ``as_strided`` view): then writing
    through it in place is undefined. Sorted by stride, each dim must step over everything the smaller ones
    span (a sufficient test for no overlap; sliced, transposed and padded views pass it)."""
    span = 0
    for stride, size in sorted((abs(st), s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """View a (..., V) tensor as rows without copying.

    Returns ``(t, n_rows, inner, stride_outer, stride_inner, stride_v)`` such that row ``r`` starts at
    element ``(r // inner) * stride_outer + (r % inner) * stride_inner`` of ``t`` and its entries are
    ``stride_v`` apart. Leading dims that cannot be collapsed into at most two are copied (rare)."""
    V = x.shape[-1]
    lead = x.shape[:-1]
    n = 1
    for s in lead:
        n *= s
    # Drop size-1 leading dims, then merge leading dims whose strides are contiguous with each other.
    dims = [(s, st) for s, st in zip(lead, x.stride()[:-1]) if s != 1]
    merged: list[list[int]] = []
    for s, st in dims:
        if merged and merged[-1][1] == s * st:
            merged[-1] = [merged[-1][0] * s, st]
        else:
            merged.append([s, st])
    sv = x.stride(-1) if V > 1 else 1
    if len(merged) == 0:
        return x, n, max(n, 1), 0, 0, sv
    if len(merged) == 1:
        return x, n, n, 0, merged[0][1], sv
    if len(merged) == 2:
        return x, n, merged[1][0], merged[0][1], merged[1][1], sv
    y = x.reshape(n, V)  # more than two non-mergeable leading dims: copy
    return y, n, n, 0, y.stride(0), y.stride(1)
