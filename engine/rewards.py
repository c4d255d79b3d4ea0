"""Rule-based rewards: plain callables ``(prompts, completions) -> list[float]``, and the loader that
turns a ``module:function`` (or ``path/to/file.py:function``) string into one.

The built-ins are toy tasks with a known optimum, small enough for a CPU run to learn in seconds;
they are what the end-to-end tests and the CLI demo train against.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def count_token(prompts: Sequence[str], completions: Sequence[str], *, token: str = "a") -> list[float]:
    """Number of (non-overlapping) occurrences of ``token`` in each completion."""
    if not token:
        raise ValueError("count_token: token must be a non-empty string")
    return [float(c.count(token)) for c in completions]


def target_length(prompts: Sequence[str], completions: Sequence[str], *, target: int = 8) -> list[float]:
    """Minus the distance between the completion's length in characters and ``target``."""
    return [-float(abs(len(c) - target)) for c in completions]


def echo_prompt(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Fraction of the prompt's characters repeated, position by position, at the start of the completion."""
    out = []
    for p, c in zip(prompts, completions):
        hits = sum(1 for a, b in zip(p, c) if a == b)
        out.append(hits / max(len(p), 1))
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "count_token": count_token,
    "target_length": target_length,
    "echo_prompt": echo_prompt,
}


def load_reward_fn(spec: str, **kwargs) -> RewardFn:
    """A reward callable from ``spec``: a built-in name (``count_token``), ``package.module:function`` or
    ``path/to/file.py:function``. ``kwargs`` are bound to it as keyword arguments."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward function spec must be a non-empty string, got {spec!r}")
    if spec in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec]
    else:
        if ":" not in spec:
            raise ValueError(
                f"reward function spec must be a built-in name {sorted(BUILTIN_REWARDS)} or 'module:function' "
                f"or 'path/to/file.py:function', got {spec!r}"
            )
        mod_name, _, attr = spec.rpartition(":")
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise FileNotFoundError(f"reward function file {str(path)!r} (from spec {spec!r}) does not exist")
            mspec = importlib.util.spec_from_file_location(f"_fusedrl_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError as e:
                raise ValueError(f"reward function spec {spec!r}: cannot import module {mod_name!r} ({e})") from e
        fn = getattr(module, attr, None)
        if fn is None:
            raise ValueError(f"reward function spec {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TypeError(f"reward function spec {spec!r} names a {type(fn).__name__}, not a callable")
    return functools.partial(fn, **kwargs) if kwargs else fn


def _show(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _real(x) -> float | None:
    """``x`` as a Python float when it is one real number (bools count: 0/1, a pass/fail verifier's natural
    answer), else None. Python ints too large for a float raise OverflowError here."""
    if isinstance(x, torch.Tensor):
        return float(x.item()) if x.dim() == 0 and not x.is_complex() else None
    if isinstance(x, np.ndarray):
        return float(x.item()) if x.ndim == 0 and x.dtype.kind in "biuf" else None
    if isinstance(x, (numbers.Real, np.bool_)):  # int, float, bool, Fraction, NumPy integers and floats
        return float(x)
    return None


def check_rewards(rewards, n: int, *, completions: Sequence[str] | None = None, source: str = "reward function"):
    """``rewards`` as a float32 tensor of shape (n,), or a clear error naming ``source``.

    Accepted: a list/tuple (any ``Sequence`` but str/bytes) of real numbers (Python or NumPy ints, floats or
    bools, 0-d real tensors/arrays), or a 1-D real NumPy array / torch tensor, with one value per completion.
    Refused: strings, dicts, sets, generators, nested lists, complex numbers, None entries, and any value that
    is not finite once in float32 (1e39 is a finite float64 but inf in float32, and would turn the loss NaN)."""
    expected = f"a list, tuple or 1-D array/tensor of {n} real numbers (one per completion)"
    if isinstance(rewards, torch.Tensor):
        if rewards.dim() != 1 or rewards.is_complex():
            raise ValueError(f"{source} must return {expected}, got a {rewards.dtype} tensor of shape "
                             f"{tuple(rewards.shape)}")  # fmt: skip
        values = rewards.detach().cpu().double().tolist()
    elif isinstance(rewards, np.ndarray) and rewards.dtype.kind in "biuf":
        if rewards.ndim != 1:
            raise ValueError(f"{source} must return {expected}, got a {rewards.dtype} array of shape {rewards.shape}")
        values = rewards.astype(np.float64).tolist()
    elif isinstance(rewards, (Sequence, np.ndarray)) and not isinstance(rewards, (str, bytes, bytearray, memoryview)):
        if isinstance(rewards, np.ndarray) and (rewards.ndim != 1 or rewards.dtype.kind != "O"):
            raise TypeError(f"{source} must return {expected}, got a {rewards.dtype} array of shape {rewards.shape}")
        values = []
        for i, r in enumerate(rewards):
            try:
                v = _real(r)
            except OverflowError:
                raise ValueError(f"{source} returned reward {_show(r)} for completion {i}, which is too large for "
                                 f"float32 (expected a finite real number)") from None  # fmt: skip
            if v is None:
                raise TypeError(f"{source} must return {expected}: the value for completion {i} is "
                                f"{type(r).__name__} {_show(r)}, not a real number")  # fmt: skip
            values.append(v)
    else:
        raise TypeError(f"{source} must return a sequence of numbers ({expected}), got {type(rewards).__name__} "
                        f"{_show(rewards)}")  # fmt: skip
    if len(values) != n:
        raise ValueError(f"{source} returned {len(values)} rewards for {n} completions (expected one per completion)")
    out = torch.tensor(values, dtype=torch.float32)  # values beyond float32's range become +-inf here
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        shown = f" {completions[i]!r}" if completions is not None else ""
        if math.isfinite(values[i]):
            limit = torch.finfo(torch.float32).max
            raise ValueError(f"{source} returned reward {values[i]!r} for completion {i}{shown}, which is beyond "
                             f"float32's range (|r| <= {limit:.4g}): it would be inf")  # fmt: skip
        raise ValueError(f"{source} returned a non-finite reward {values[i]} for completion {i}{shown}")
    return out
