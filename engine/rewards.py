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
from collections.abc import Callable, Sequence
from pathlib import Path

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


def check_rewards(rewards, n: int, *, completions: Sequence[str] | None = None, source: str = "reward function"):
    """``rewards`` as a float32 tensor of shape (n,); a clear error for a wrong count or a NaN/inf value."""
    if isinstance(rewards, torch.Tensor):
        values = rewards.detach().float().cpu().reshape(-1).tolist() if rewards.dim() <= 1 else None
    else:
        try:
            values = [float(r) for r in rewards]
        except (TypeError, ValueError) as e:
            raise TypeError(f"{source} must return a sequence of numbers, got {type(rewards).__name__} ({e})") from e
    if values is None:
        raise ValueError(
            f"{source} must return one number per completion, got a tensor of shape {tuple(rewards.shape)}"
        )
    if len(values) != n:
        raise ValueError(f"{source} returned {len(values)} rewards for {n} completions (expected one per completion)")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            shown = f" {completions[i]!r}" if completions is not None else ""
            raise ValueError(f"{source} returned a non-finite reward {v} for completion {i}{shown}")
    return torch.tensor(values, dtype=torch.float32)
