"""Rule-based rewards: plain callables ``(prompts, completions, **columns) -> list[float]``, and the loader that
turns a built-in name, a ``module:function`` or a ``path/to/file.py:function`` string into one.

Two kinds of built-ins: toy tasks with a known optimum (``count_token``, ``target_length``, ``echo_prompt``),
small enough for a CPU run to learn in seconds, which the end-to-end tests train against; and the verifiable
rewards real runs use: ``math_answer`` (the final answer, from ``\boxed{}``, ``####`` or the last number,
against a reference column of the data set), ``format_reward`` (a regular expression) and ``length_penalty``
(soft over-length), added up with ``combine``. Data set columns (``answer``) reach a reward as keyword
arguments through ``fusedrl.engine.data.bind_columns``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
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


# ----------------------------------------------------------------------------------------------------
# Verifiable rewards: math answers, format, length
# ----------------------------------------------------------------------------------------------------
# A number as people write answers: sign, thousands commas, decimals, exponent ("-1,234.5", "3e-2", ".5").
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
# Maximal numeric runs in running text; a trailing full stop or comma is the sentence's, not the number's.
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, nested braces included; None
    when there is none or it is never closed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_answer(text: str) -> str | None:
    r"""The final answer written in ``text``: the last ``\boxed{...}``, else what follows the last ``####`` (the
    GSM8K convention, up to the end of its line), else the last number; None when there is none of these."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer needs a str, got {type(text).__name__}")
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    found = [n.rstrip(".,") for n in _NUMBER_IN_TEXT.findall(text)]
    found = [n for n in found if any(c.isdigit() for c in n)]
    return found[-1] if found else None


def parse_number(answer: str) -> Fraction | None:
    r"""``answer`` as an exact number when it is one: ``72``, ``-1,234.50``, ``$18``, ``25%`` (as 25), ``3/4``,
    ``\frac{3}{4}``, ``1e-3``, ``12.`` (a sentence's full stop); None otherwise."""
    s = answer.strip().rstrip(".").strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").rstrip("%").replace("\\!", "").strip()
    s = s.replace("\\left", "").replace("\\right", "").strip("()").strip()
    m = _FRAC.fullmatch(s)
    if m:
        num, den = parse_number(m.group(1)), parse_number(m.group(2))
        return num / den if num is not None and den else None
    if "/" in s:
        num, _, den = s.partition("/")
        num, den = parse_number(num), parse_number(den)
        return num / den if num is not None and den else None
    if not s or not _NUMBER.fullmatch(s) or not any(c.isdigit() for c in s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(answer: str) -> str:
    r"""A non-numeric answer for string comparison: no surrounding space, ``$``, ``\text{}``, trailing full
    stop; case folded; inner spaces collapsed."""
    s = answer.strip().rstrip(".").replace("$", "")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return " ".join(s.split()).casefold()


def answers_match(predicted: str | None, reference) -> bool:
    """Whether two final answers agree: as exact numbers when both parse (``0.5`` == ``1/2``), else as
    normalised strings."""
    if predicted is None or reference is None:
        return False
    reference = str(reference)
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return normalize_answer(predicted) == normalize_answer(reference)


def _reference_answer(reference) -> str | None:
    if reference is None:
        return None
    if isinstance(reference, numbers.Real) and not isinstance(reference, bool):
        return str(reference)
    if not isinstance(reference, str):
        raise TypeError(f"math_answer: each answer must be a str or a number, got {type(reference).__name__}")
    # A full worked solution (GSM8K's "answer" column) carries its final answer after ####, or boxed.
    if "####" in reference or "\\boxed" in reference:
        return extract_answer(reference)
    return reference


def math_answer(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence, **_) -> list[float]:
    r"""1.0 when the completion's final answer (``extract_answer``) equals the reference ``answer``, else 0.0.
    ``answer`` is the data set's column (one value per completion): the final answer itself (``"72"``, ``72``)
    or a worked solution ending in ``#### 72`` or a ``\boxed{}``."""
    if isinstance(answer, (str, bytes)) or not isinstance(answer, Sequence) or len(answer) != len(completions):
        got = len(answer) if isinstance(answer, Sequence) and not isinstance(answer, (str, bytes)) else repr(answer)
        raise ValueError(f"math_answer: answer must be a list with one reference per completion "
                         f"({len(completions)}), got {got}")  # fmt: skip
    return [float(answers_match(extract_answer(c), _reference_answer(a))) for c, a in zip(completions, answer)]


def format_reward(prompts: Sequence[str], completions: Sequence[str], *, pattern: str,
                  full_match: bool = True, **_) -> list[float]:  # fmt: skip
    r"""1.0 when the completion matches the regular expression ``pattern`` (``re.DOTALL``: ``.`` spans lines;
    the whole completion must match unless ``full_match=False``), else 0.0. E.g.
    ``r"<think>.*</think>\s*<answer>.*</answer>"``."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except (re.error, TypeError) as e:
        raise ValueError(f"format_reward: pattern {pattern!r} is not a valid regular expression ({e})") from None
    match = rx.fullmatch if full_match else rx.search
    return [float(match(c.strip() if full_match else c) is not None) for c in completions]


def length_penalty(prompts: Sequence[str], completions: Sequence[str], *, max_length: int,
                   buffer: int | None = None, penalty: float = 1.0, **_) -> list[float]:  # fmt: skip
    """A soft over-length penalty in characters (DAPO's shape): 0 up to ``max_length - buffer``, then falling
    linearly to ``-penalty`` at ``max_length``, and ``-penalty`` beyond. ``buffer`` defaults to a quarter of
    ``max_length``; ``buffer=0`` is a hard cut-off."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"length_penalty: max_length must be an int >= 1, got {max_length!r}")
    buffer = max_length // 4 if buffer is None else buffer
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 <= buffer <= max_length:
        raise ValueError(f"length_penalty: buffer must be an int in [0, max_length={max_length}], got {buffer!r}")
    if not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"length_penalty: penalty must be a finite number >= 0, got {penalty!r}")
    start = max_length - buffer
    out = []
    for c in completions:
        n = len(c)
        if n <= start:
            out.append(0.0)
        elif n >= max_length:
            out.append(-float(penalty))
        else:
            out.append(-float(penalty) * (n - start) / buffer)
    return out


def combine(*terms: tuple[float, RewardFn] | RewardFn) -> RewardFn:
    """The weighted sum of several rewards: ``combine(math_answer, (0.2, format_reward_bound), ...)``. Each term
    is a reward callable (weight 1) or ``(weight, callable)``; data set columns reach every term that takes
    them (the combined function accepts ``**columns``).

    The combined function's ``last_parts`` holds each term's weighted values from its last call, by the term's
    function name (``{"math_answer": [...], "format_reward": [...]}``, a repeated name numbered from _1): the trainer logs
    them as ``rollout/reward/<name>`` and in the completions tables."""
    if not terms:
        raise ValueError("combine needs at least one reward")
    weighted = [t if isinstance(t, tuple) else (1.0, t) for t in terms]
    for w, fn in weighted:
        if not callable(fn) or not isinstance(w, (int, float)):
            raise TypeError(f"combine: each term must be a callable or (weight, callable), got {(w, fn)!r}")
    bases = [_name(fn).removeprefix("reward ") for _, fn in weighted]
    names = [b if bases.count(b) == 1 else f"{b}_{bases[:i].count(b) + 1}" for i, b in enumerate(bases)]

    def reward(prompts, completions, **columns):
        from .data import reward_columns

        parts = {}
        for name, (w, fn) in zip(names, weighted):
            kw = {k: columns[k] for k in reward_columns(fn, list(columns))}
            values = check_rewards(fn(prompts, completions, **kw), len(completions), source=_name(fn))
            parts[name] = [w * float(v) for v in values]
        reward.last_parts = parts
        return [sum(p) for p in zip(*parts.values())]

    reward.last_parts = None
    return reward


def _name(fn) -> str:
    inner = getattr(fn, "func", fn)
    return f"reward {getattr(inner, '__name__', type(inner).__name__)}"


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "count_token": count_token,
    "target_length": target_length,
    "echo_prompt": echo_prompt,
    "math_answer": math_answer,
    "format_reward": format_reward,
    "length_penalty": length_penalty,
}


def load_object(spec: str, what: str = "object"):
    """The attribute ``spec`` names: ``package.module:name`` or ``path/to/file.py:name``; ``what`` names it in
    errors (``reward function``, ``environment``)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} spec must be 'module:name' or 'path/to/file.py:name', got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {str(path)!r} (from spec {spec!r}) does not exist")
        mspec = importlib.util.spec_from_file_location(f"_fusedrl_{what.replace(' ', '_')}_{path.stem}", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise ValueError(f"{what} spec {spec!r}: cannot import module {mod_name!r} ({e})") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"{what} spec {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    return obj


def load_reward_fn(spec: str, **kwargs) -> RewardFn:
    """A reward callable from ``spec``: a built-in name (``count_token``), ``package.module:function`` or
    ``path/to/file.py:function``. ``kwargs`` are bound to it as keyword arguments."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward function spec must be a non-empty string, got {spec!r}")
    if spec in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec]
    elif ":" not in spec:
        raise ValueError(
            f"reward function spec must be a built-in name {sorted(BUILTIN_REWARDS)} or 'module:function' "
            f"or 'path/to/file.py:function', got {spec!r}"
        )
    else:
        fn = load_object(spec, "reward function")
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
