"""Packed variable-length rollouts: the rollout buffer, token-budget micro-batch planning and
padding-free packing.

Everything here runs in C++ (``fusedrl.engine._rollout``, torch-free, over NumPy arrays); this module is
the thin documented layer that turns CPU tensors and lists into NumPy arrays and states the contract.
The GPU side applies the returned indices with torch ops::

    buf = RolloutBuffer()
    for tokens, mask, logp in rollouts:
        buf.append(tokens, mask, old_logp=logp)
    for mb in plan_microbatches(buf.lengths(), max_tokens=16384, num_ranks=world)[rank]:
        b = pack(buf.offsets(), mb, buf.tokens())
        input_ids = torch.from_numpy(buf.tokens())[torch.from_numpy(b.index)]   # (N,)
        labels = torch.from_numpy(b.labels)                                     # (N,), never crosses sequences
        old_logp = torch.from_numpy(buf.field("old_logp"))[torch.from_numpy(b.index)]

A pure-Python reference of every algorithm here lives in ``tests/packing_ref.py``.
"""

from __future__ import annotations

import operator
import sys
from typing import NamedTuple

import numpy as np

from fusedrl.names import IGNORE_INDEX

from . import _rollout

DEFAULT_FIELDS = ("old_logp", "ref_logp", "values", "rewards", "advantages", "returns")


def _as_numpy(name: str, x, *, floating: bool = False) -> np.ndarray:
    """NumPy view of a NumPy array, a CPU torch tensor or any buffer (zero-copy), or an array made from a
    list. With ``floating``, a float tensor of another dtype (bf16, fp16) is converted to float32 first,
    NumPy having no bf16."""
    if isinstance(x, np.ndarray):
        return x
    torch = sys.modules.get("torch")  # never imported here: only a caller that has tensors has torch
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(
                f"{name} must be a NumPy array or a CPU tensor, got a tensor on {x.device}: call .cpu() first"
            )
        x = x.detach()
        if floating and x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.numpy()
    if isinstance(x, (list, tuple, range)) or hasattr(x, "__array__"):
        return np.asarray(x)
    try:
        return np.asarray(memoryview(x))
    except TypeError:
        raise TypeError(f"{name} must be a NumPy array, a CPU torch tensor or a list, got {type(x).__name__}") from None


def _as_int(name: str, x) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {x!r} ({type(x).__name__})") from None


class RolloutBuffer:
    """Variable-length sequences stored back to back: token ids, a response mask and named per-token
    float32 fields, with int64 offsets (sequence i is ``[offsets[i], offsets[i+1])`` of every flat array).

    Flat exports (``tokens``, ``response_mask``, ``field``) are zero-copy, writable NumPy views: wrap them
    with ``torch.from_numpy`` to read, or to write back (e.g. advantages) in place. A view covers the
    tokens present when it was taken and stays aliased to the buffer until the next ``append`` or
    ``clear``; take a fresh one after appending. (An older view never dangles: once the buffer has
    grown it keeps the old memory alive, it just no longer sees the buffer.) Capacity grows
    geometrically and is kept by ``clear``, so a training loop stops allocating after its first step.

    Per sequence the buffer also keeps a group id (``group_ids``: the samples of one prompt share one; -1 until
    set) and a score (``scores``: the sequence's reward; NaN until set), both set for all sequences at once.
    """

    def __init__(self, fields=DEFAULT_FIELDS, token_dtype=np.int64):
        if isinstance(fields, str):
            raise TypeError(f"fields must be a sequence of names, got the single string {fields!r}")
        self._impl = _rollout.RolloutBuffer(list(fields), token_dtype)
        # Per-sequence columns live here, beside the C++ buffer's per-token ones; a sequence appended after the
        # last set_* reads the fill value.
        self._group_ids = np.empty(0, dtype=np.int64)
        self._scores = np.empty(0, dtype=np.float32)

    def append(self, tokens, response_mask, **fields) -> int:
        """Append one sequence and return its index.

        ``tokens`` (L,) integer ids >= 0 (L >= 1); ``response_mask`` (L,) bool or integer 0/1; each named
        field (L,) float32 (float64 and torch bf16/fp16 are converted), finite. A field not given is
        zero-filled; an unknown field name raises ValueError naming it. Nothing is appended on error."""
        return self._impl.append(
            _as_numpy("tokens", tokens),
            _as_numpy("response_mask", response_mask),
            {k: None if v is None else _as_numpy(k, v, floating=True) for k, v in fields.items()},
        )

    def append_many(self, tokens, response_masks, **fields) -> None:
        """Append several sequences: ``tokens`` and ``response_masks`` are sequences of 1-D arrays, each
        field a sequence of one array per sequence. All or nothing: a bad item appends none of them."""
        if isinstance(tokens, np.ndarray) and tokens.ndim == 2:
            tokens = list(tokens)  # equal-length rows
        if isinstance(response_masks, np.ndarray) and response_masks.ndim == 2:
            response_masks = list(response_masks)
        self._impl.append_many(
            [_as_numpy(f"tokens[{i}]", t) for i, t in enumerate(tokens)],
            [_as_numpy(f"response_masks[{i}]", m) for i, m in enumerate(response_masks)],
            {k: None if v is None else [_as_numpy(f"{k}[{i}]", x, floating=True) for i, x in enumerate(v)]
             for k, v in fields.items()},
        )  # fmt: skip

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self._impl)

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences."""
        return self._impl.num_tokens

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the per-token float32 fields, in construction order."""
        return self._impl.fields

    @property
    def token_dtype(self) -> np.dtype:
        """int32 or int64."""
        return self._impl.token_dtype

    def get(self, i: int) -> dict[str, np.ndarray]:
        """Copies of sequence ``i`` (negative counts from the end): "tokens", "response_mask" (bool) and
        every field."""
        return self._impl.get(_as_int("i", i))

    def lengths(self) -> np.ndarray:
        """(n,) int64 tokens per sequence."""
        return self._impl.lengths()

    def offsets(self) -> np.ndarray:
        """(n + 1,) int64, ``offsets[0] == 0``, ``offsets[-1] == num_tokens`` (a copy)."""
        return self._impl.offsets()

    def tokens(self) -> np.ndarray:
        """(num_tokens,) token ids, zero-copy view (see the class docstring for its lifetime)."""
        return self._impl.tokens()

    def response_mask(self) -> np.ndarray:
        """(num_tokens,) bool, zero-copy view."""
        return self._impl.response_mask()

    def field(self, name: str) -> np.ndarray:
        """(num_tokens,) float32, zero-copy writable view of a named field; unknown name -> ValueError."""
        return self._impl.field(name)

    def group_ids(self) -> np.ndarray:
        """(n,) int64 group id of each sequence (-1: none set), a copy."""
        return _padded(self._group_ids, len(self), -1)

    def set_group_ids(self, group_ids) -> None:
        """Set every sequence's group id: (n,) integers >= 0, one per sequence in buffer order."""
        ids = _as_numpy("group_ids", group_ids)
        if ids.shape != (len(self),) or (ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0)):
            raise ValueError(f"group_ids must be ({len(self)},) integers >= 0 (one per sequence), "
                             f"got shape {ids.shape} dtype {ids.dtype}")  # fmt: skip
        self._group_ids = ids.astype(np.int64, copy=True)

    def scores(self) -> np.ndarray:
        """(n,) float32 score of each sequence (NaN: none set), a copy."""
        return _padded(self._scores, len(self), np.nan)

    def set_scores(self, scores) -> None:
        """Set every sequence's score: (n,) floats, one per sequence in buffer order."""
        s = _as_numpy("scores", scores, floating=True)
        if s.shape != (len(self),) or s.dtype.kind not in "fiu":
            raise ValueError(f"scores must be ({len(self)},) numbers (one per sequence), "
                             f"got shape {s.shape} dtype {s.dtype}")  # fmt: skip
        self._scores = s.astype(np.float32, copy=True)

    def clear(self) -> None:
        """Drop every sequence (with its group id and score), keeping the allocated capacity."""
        self._impl.clear()
        self._group_ids = self._group_ids[:0]
        self._scores = self._scores[:0]

    def __repr__(self) -> str:
        return (
            f"RolloutBuffer({len(self)} sequences, {self.num_tokens} tokens, fields={self.fields}, "
            f"token_dtype={self.token_dtype})"
        )


def _padded(a: np.ndarray, n: int, fill) -> np.ndarray:
    """A copy of ``a`` extended to ``n`` items with ``fill`` (for sequences appended after it was set)."""
    out = np.full(n, fill, dtype=a.dtype)
    out[: min(n, len(a))] = a[:n]
    return out


def plan_microbatches(lengths, max_tokens: int, *, num_ranks: int = 1, balance: str = "kk") -> list[list[np.ndarray]]:
    """Split sequences of the given ``lengths`` ((n,) integers >= 1) into token-budget micro-batches
    for ``num_ranks`` data-parallel ranks: ``result[rank][k]`` is an int64 array of sequence indices
    (ascending).

    Guarantees: every sequence appears exactly once; every micro-batch holds at most ``max_tokens``
    tokens (a sequence is never split, so ``max_tokens`` must be >= the longest one); every rank gets
    the same number M of micro-batches, as few as the balancing found to fit (ranks step through
    micro-batches in lockstep). A micro-batch is empty only when there are fewer sequences than the
    ``num_ranks * M`` slots (e.g. fewer sequences than ranks); empty ones come last on a rank, and a
    trainer should still step through them (with no tokens) to stay in lockstep. No sequences: every
    rank gets an empty list.

    Balancing: sequences are partitioned into ``num_ranks * M`` bins with Karmarkar-Karp largest
    differencing (``balance="kk"``) or longest-processing-time greedy (``"lpt"``); the bins sorted by
    load are cut into M chunks, and each rank takes one bin of each chunk (again by Karmarkar-Karp, or
    heaviest bin to the lightest rank): micro-batch k weighs about the same on every rank, and rank
    totals are balanced. Micro-batches are ordered heaviest first. Deterministic for the same input.

    Cost: about n log n. Each tried bin count is one partition (LPT: O(1) per sequence with a bucket queue;
    KK: O(log k)), and the search tries O(log) of them: 100k sequences in ~4 ms (lpt) / ~25 ms (kk), 1M in
    ~90 ms / ~1 s on one CPU core at 8 ranks and a 16k budget. ``num_ranks`` <= 2**20.
    """
    return _rollout.plan_microbatches(
        _as_numpy("lengths", lengths), _as_int("max_tokens", max_tokens), _as_int("num_ranks", num_ranks), balance
    )


class PackedBatch(NamedTuple):
    """One micro-batch packed into a single row of N tokens (see ``pack``)."""

    cu_seqlens: np.ndarray
    """(B+1,) int32 cumulative sequence lengths with a leading 0 (flash-attn varlen convention)."""
    position_ids: np.ndarray
    """(N,) int64 position within its own sequence, restarting at 0."""
    index: np.ndarray
    """(N,) int64: packed token t is buffer flat position index[t]."""
    target_index: np.ndarray
    """(N,) int64 buffer flat position of the next token of the same sequence (the one predicted at t),
    -1 at each sequence's last token."""
    labels: np.ndarray | None
    """(N,) int64 ``tokens[target_index]``, ``ignore_index`` where target_index == -1 (only when tokens were
    given)."""
    max_seqlen: int
    """Longest sequence in the micro-batch (0 when empty)."""


def pack(offsets, indices, tokens=None, *, ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """Pack the sequences ``indices`` ((B,) integers, in the order given; may be empty) of a buffer laid out
    by ``offsets`` ((n+1,) int64, ``RolloutBuffer.offsets()``) into one padding-free row.

    With ``tokens`` (the buffer's flat (offsets[-1],) int32/int64 ids) the next-token ``labels`` come too;
    they never cross a sequence boundary. O(B + N); only the referenced sequences are validated."""
    cu, pos, index, target, labels, max_seqlen = _rollout.pack(
        _as_numpy("offsets", offsets),
        _as_numpy("indices", indices),
        None if tokens is None else _as_numpy("tokens", tokens),
        _as_int("ignore_index", ignore_index),
    )
    return PackedBatch(cu, pos, index, target, labels, max_seqlen)


def unpack(values, index, out) -> None:
    """Scatter packed per-token results back to buffer order: ``out[index[t]] = values[t]``.

    ``values`` (N, ...) and ``out`` (T, ...) share a dtype and their trailing dims; ``out`` is a writable
    NumPy array (e.g. ``buf.field("values")``) or CPU tensor, written in place; ``index`` (N,) is
    ``PackedBatch.index`` (or ``target_index`` filtered to >= 0). A bad index leaves ``out`` untouched."""
    if isinstance(out, (list, tuple)):
        raise TypeError(f"out must be a NumPy array or a CPU tensor (it is written in place), got {type(out).__name__}")
    _rollout.unpack(_as_numpy("values", values), _as_numpy("index", index), _as_numpy("out", out))
