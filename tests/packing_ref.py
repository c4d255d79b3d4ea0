"""Pure-Python references for ``fusedrl.engine.packing`` (csrc/plan.cpp, csrc/pack.cpp): the same
algorithms and the same tie-breaking rules, written with lists and ``heapq`` for clarity.

One copy, imported by tests/test_packing.py and (by path) by bench/bench_packing.py, so the tests and
the benchmark can never compare against different references. ``kk_partition_textbook`` is the plain
dense formulation of Karmarkar-Karp; the tests check that the sparse one used here and in C++ agrees
with it.
"""

from __future__ import annotations

import heapq


def _as_list(x) -> list:
    if isinstance(x, list):
        return x
    return x.tolist() if hasattr(x, "tolist") else list(x)


# ----------------------------------------------------------------------------------------------------
# Partitions into k bins: each returns k lists of ascending sequence indices
# ----------------------------------------------------------------------------------------------------
def lpt_partition(lengths, k: int) -> list[list[int]]:
    """Longest first, each into the lightest bin (ties: lowest bin number). Bins in bin-number order."""
    lengths = _as_list(lengths)
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return [sorted(b) for b in bins]


def kk_partition(lengths, k: int) -> list[list[int]]:
    """k-way Karmarkar-Karp largest differencing, tuples stored sparsely.

    A tuple is a min-heap of its non-empty bins as (load, id), id = the bin's smallest sequence index,
    plus its heaviest load; its other bins are empty. Take the two tuples of largest spread (ties: oldest)
    and pair the i-th heaviest bin of one with the i-th lightest of the other; only the smaller tuple's
    non-empty bins need touching. Bins ordered by load (heaviest first, ties by id), empty ones last."""
    lengths = _as_list(lengths)
    n = len(lengths)
    if n == 0:
        return [[] for _ in range(k)]
    members = {i: [i] for i in range(n)}  # bin id -> sequence indices
    tuples = {}  # tuple id -> (heap, max load)
    queue = []

    def spread(heap, mx):
        return mx - (heap[0][0] if len(heap) == k else 0)

    for i, length in enumerate(lengths):
        tuples[i] = ([(length, i)], length)
        queue.append((-spread(*tuples[i]), i))
    heapq.heapify(queue)
    next_tid = n
    while len(queue) > 1:
        (ha, ma), (hb, mb) = tuples.pop(heapq.heappop(queue)[1]), tuples.pop(heapq.heappop(queue)[1])
        if len(ha) < len(hb):  # A: the tuple with more non-empty bins, whose heap is reused
            ha, ma, hb, mb = hb, mb, ha, ma
        empty = k - len(ha)
        heavy_first = sorted(hb, reverse=True)
        n_pop = max(0, len(heavy_first) - empty)
        popped = [heapq.heappop(ha) for _ in range(n_pop)]
        mx = ma if ha else 0  # A's heaviest survives unless all of A was popped
        for j, (load, bid) in enumerate(heavy_first):
            if j >= empty:  # meets a non-empty bin of A, else one of A's empty bins
                qload, qid = popped[j - empty]
                a, b = members.pop(qid), members.pop(bid)
                if len(a) < len(b):
                    a, b = b, a
                a.extend(b)
                bid = min(qid, bid)
                members[bid] = a
                load += qload
            mx = max(mx, load)
            heapq.heappush(ha, (load, bid))
        tuples[next_tid] = (ha, mx)
        heapq.heappush(queue, (-spread(ha, mx), next_tid))
        next_tid += 1
    ((heap, _),) = tuples.values()
    bins = [sorted(members[bid]) for _, bid in sorted(heap, key=lambda e: (-e[0], e[1]))]
    return bins + [[] for _ in range(k - len(bins))]


def kk_partition_textbook(lengths, k: int) -> list[list[int]]:
    """Dense k-way Karmarkar-Karp, O(n k log k): every tuple holds all k bins as [load, id, items], an empty
    bin being [0, inf, []]. Same ordering rules as ``kk_partition``."""
    lengths = _as_list(lengths)
    n = len(lengths)
    inf = float("inf")
    queue = []
    for i, length in enumerate(lengths):
        bins = [(length, i, [i])] + [(0, inf, [])] * (k - 1)
        queue.append((-(length if k > 1 else 0), i, bins))
    heapq.heapify(queue)
    next_tid = n
    while len(queue) > 1:
        a = sorted(heapq.heappop(queue)[2], key=lambda b: (b[0], b[1]))
        b = sorted(heapq.heappop(queue)[2], key=lambda b: (b[0], b[1]), reverse=True)
        merged = [(x[0] + y[0], min(x[1], y[1]), x[2] + y[2]) for x, y in zip(a, b)]
        loads = [m[0] for m in merged]
        heapq.heappush(queue, (-(max(loads) - min(loads)), next_tid, merged))
        next_tid += 1
    if not queue:
        return [[] for _ in range(k)]
    final = sorted(queue[0][2], key=lambda b: (-b[0], b[1]))
    return [sorted(b[2]) for b in final]


PARTITIONS = {"kk": kk_partition, "lpt": lpt_partition}


# ----------------------------------------------------------------------------------------------------
# Micro-batch plan
# ----------------------------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _assign_ranks(loads: list[int], R: int, M: int, balance: str) -> list[list[int]]:
    """rank_bins[r][c]: position (in the heaviest-first order) of rank r's c-th micro-batch; one bin of
    every chunk of R consecutive positions per rank."""
    if balance == "lpt":
        total = [0] * R
        rank_bins = [[0] * M for _ in range(R)]
        for c in range(M):
            for j, r in enumerate(sorted(range(R), key=lambda r: (total[r], r))):
                rank_bins[r][c] = c * R + j
                total[r] += loads[c * R + j]
        return rank_bins
    # Karmarkar-Karp over chunks: a tuple is a list of R slots [load, key, positions].
    queue = []
    tuples = {}
    for c in range(M):
        tuples[c] = [[loads[c * R + j], c * R + j, [c * R + j]] for j in range(R)]
        queue.append((-(max(s[0] for s in tuples[c]) - min(s[0] for s in tuples[c])), c))
    heapq.heapify(queue)
    next_tid = M
    while len(queue) > 1:
        a = sorted(tuples.pop(heapq.heappop(queue)[1]), key=lambda s: (s[0], s[1]))
        b = sorted(tuples.pop(heapq.heappop(queue)[1]), key=lambda s: (s[0], s[1]), reverse=True)
        merged = [[x[0] + y[0], min(x[1], y[1]), x[2] + y[2]] for x, y in zip(a, b)]
        tuples[next_tid] = merged
        heapq.heappush(queue, (-(max(s[0] for s in merged) - min(s[0] for s in merged)), next_tid))
        next_tid += 1
    (final,) = tuples.values()
    return [sorted(s[2]) for s in sorted(final, key=lambda s: (-s[0], s[1]))]


def rank_loads(lengths, plan) -> list[int]:
    """Tokens per rank of a plan."""
    return [sum(lengths[i] for mb in rank for i in mb) for rank in plan]


def plan_microbatches_ref(
    lengths, max_tokens: int, *, num_ranks: int = 1, balance: str = "kk"
) -> list[list[list[int]]]:
    """Reference of ``plan_microbatches``: result[rank][k] = ascending list of sequence indices. "kk" keeps
    the greedy plan where that one has the smaller max/min rank load."""
    lengths = _as_list(lengths)
    plan = plan_single_ref(lengths, max_tokens, num_ranks=num_ranks, balance=balance)
    if balance == "kk" and num_ranks > 1:
        greedy = plan_single_ref(lengths, max_tokens, num_ranks=num_ranks, balance="lpt")
        (hp, lp), (hg, lg) = [(max(t), min(t)) for t in (rank_loads(lengths, plan), rank_loads(lengths, greedy))]
        if hp * lg > hg * lp:
            return greedy
    return plan


def smallest_fitting(fits, m_lo: int, m_hi: int):
    """``(M, what fits(M) built)`` for the smallest M in [m_lo, m_hi] with ``fits(M)[0]`` (``fits(m_hi)`` must
    hold): m_lo first, then an exponential and a binary search, probing the bin counts the C++ planner probes."""
    ok, best = fits(m_lo)
    if ok:
        return m_lo, best
    lo, step = m_lo, 1
    while True:
        hi = min(m_hi, lo + step)
        ok, best = fits(hi)
        if ok:
            break
        lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, bins = fits(mid)
        if ok:
            hi, best = mid, bins
        else:
            lo = mid
    return hi, best


def plan_single_ref(lengths, max_tokens: int, *, num_ranks: int = 1, balance: str = "kk") -> list[list[list[int]]]:
    """One balancing method alone, without the "kk" -> greedy fallback."""
    lengths = _as_list(lengths)
    n, R = len(lengths), num_ranks
    if n == 0:
        return [[] for _ in range(R)]
    part = PARTITIONS[balance]

    def load(b):
        return sum(lengths[i] for i in b)

    def fits(M):
        bins = part(lengths, R * M)
        return max(load(b) for b in bins) <= max_tokens, bins

    m_lo = max(1, _ceil_div(_ceil_div(sum(lengths), max_tokens), R))
    m_hi = _ceil_div(n, R)  # one sequence per bin at most: always fits
    M, best = smallest_fitting(fits, m_lo, m_hi)
    best.sort(key=lambda b: (-load(b), b[0] if b else n))
    rank_bins = _assign_ranks([load(b) for b in best], R, M, balance)
    return [[best[p] for p in rank_bins[r]] for r in range(R)]


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------
def pack_ref(offsets, indices, tokens=None, *, ignore_index: int = -100) -> dict:
    """Reference of ``pack``: a dict of lists with the PackedBatch field names. Lists are used as they
    are; arrays are converted (once per call)."""
    offsets, indices = _as_list(offsets), _as_list(indices)
    tokens = None if tokens is None else _as_list(tokens)
    cu, pos, index, target, labels = [0], [], [], [], []
    for i in indices:
        start, end = offsets[i], offsets[i + 1]
        for t in range(start, end):
            nxt = t + 1 if t + 1 < end else -1  # never the next sequence's first token
            pos.append(t - start)
            index.append(t)
            target.append(nxt)
            if tokens is not None:
                labels.append(tokens[nxt] if nxt >= 0 else ignore_index)
        cu.append(cu[-1] + end - start)
    max_seqlen = max((offsets[i + 1] - offsets[i] for i in indices), default=0)
    return {
        "cu_seqlens": cu, "position_ids": pos, "index": index, "target_index": target,
        "labels": labels if tokens is not None else None, "max_seqlen": max_seqlen,
    }  # fmt: skip


def unpack_ref(values, index, out) -> None:
    """out[index[t]] = values[t]."""
    for t, i in enumerate(_as_list(index)):
        out[i] = values[t]
