"""Micro-batch planning + packing: the C++ extension against the pure-Python reference (tests/packing_ref.py).

    python bench/bench_packing.py [--sizes 1000 10000 100000]   # table + bench/results/packing-cpu.json
    python bench/bench_packing.py --plan-sizes 1000 10000 100000 1000000   # planner alone, 1k -> 1M sequences
                                                                # (bench/results/packing-plan-cpu.json)
    pytest bench/bench_packing.py --benchmark-enable            # the same work under pytest-benchmark

One step of the trainer's data path for N rollouts with long-tailed lengths: plan token-budget
micro-batches for 8 data-parallel ranks (Karmarkar-Karp), then pack every micro-batch (cu_seqlens,
position ids, gather index, next-token labels). Rows: plan alone, pack alone (all micro-batches of the
same plan) and both; "speedup" is over the pure-Python reference of the same row. Pack also runs against
a NumPy-vectorised version (np.repeat / cumsum), the fastest thing one would write without C++.

The planner alone (``--plan-sizes``) is timed for both balancing methods against two same-algorithm Python
planners: the reference (tests/packing_ref.py, written for clarity) for "kk" and "lpt", and ``plan_lpt_py``
below, LPT written for speed in plain Python (heapq.heapreplace, one bin number per sequence), for "lpt".
Both give the C++ plans exactly (checked here before timing).
"""

from __future__ import annotations

import argparse
import heapq
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from fusedrl.engine.packing import pack, plan_microbatches

if __package__:  # pytest, or python -m bench.bench_packing
    from .common import time_fn, write_results
else:  # python bench/bench_packing.py: bench/ itself is on sys.path (the repo root is not: see Makefile)
    from common import time_fn, write_results

# The reference lives with the tests so that tests and benchmark can never compare against different code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from packing_ref import pack_ref, plan_microbatches_ref, smallest_fitting  # noqa: E402

SIZES = (1_000, 10_000, 100_000)
MAX_TOKENS = 16384  # per micro-batch
NUM_RANKS = 8
MEDIAN_LEN, SIGMA, MAX_LEN = 256, 1.0, 8192  # lognormal prompt + response lengths, clipped
VOCAB = 151_936


def make_rollout(n: int, seed: int = 0):
    """Long-tailed lengths (n,), buffer offsets (n+1,) and flat token ids, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(MEDIAN_LEN), SIGMA, n)).astype(np.int64), 1, MAX_LEN)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(0, VOCAB, int(offsets[-1]), dtype=np.int64)
    return lengths, offsets, tokens


def make_lengths(n: int, seed: int = 0) -> np.ndarray:
    """The lengths of make_rollout without the tokens (the planner rows go to 1M sequences)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(np.log(MEDIAN_LEN), SIGMA, n)).astype(np.int64), 1, MAX_LEN)


def plan_lpt_py(lengths: list, max_tokens: int, num_ranks: int) -> list:
    """plan_microbatches(balance="lpt") written for speed in plain Python: the same LPT bins, the same search
    over the number of micro-batches and the same rank assignment (and so the same plan) as the C++ one."""
    n, R = len(lengths), num_ranks
    if n == 0:
        return [[] for _ in range(R)]
    order = sorted(range(n), key=lengths.__getitem__, reverse=True)  # stable: ties by index
    replace = heapq.heapreplace

    def fits(M):
        heap = [(0, b) for b in range(R * M)]
        bin_of = [0] * n
        for i in order:
            load, b = heap[0]
            replace(heap, (load + lengths[i], b))
            bin_of[i] = b
        return max(heap)[0] <= max_tokens, bin_of

    m_lo = max(1, -(-(-(-sum(lengths) // max_tokens)) // R))
    m_hi = -(-n // R)
    M, best = smallest_fitting(fits, m_lo, m_hi)
    S = R * M
    bins, loads = [[] for _ in range(S)], [0] * S
    for i, b in enumerate(best):
        bins[b].append(i)
        loads[b] += lengths[i]
    pos = sorted(range(S), key=lambda b: (-loads[b], bins[b][0] if bins[b] else n))
    plan, total = [[None] * M for _ in range(R)], [0] * R
    for c in range(M):
        for j, r in enumerate(sorted(range(R), key=total.__getitem__)):  # stable: ties by rank
            b = pos[c * R + j]
            plan[r][c] = bins[b]
            total[r] += loads[b]
    return plan


def time_interleaved(fns: dict, *, rounds: int, inner: dict, warmup: int = 1) -> dict:
    """name -> median / p20 / p80 ms, the providers taking turns round after round (inner[name] calls each
    per round), so that the load of other processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(inner.get(name, 1)):
                t0 = time.perf_counter()
                fn()
                ts[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, t in ts.items():
        t.sort()
        q = lambda f: t[min(len(t) - 1, int(f * (len(t) - 1) + 0.5))]  # noqa: E731
        out[name] = {"median_ms": statistics.median(t), "p20_ms": q(0.2), "p80_ms": q(0.8), "samples": len(t)}
    return out


def run_plan(sizes) -> list[dict]:
    """Planner alone, C++ against the same-algorithm Python planners, from 1k to 1M sequences, timed
    interleaved (the C++ planner and its Python baselines take turns)."""
    records = []
    for n in sizes:
        lengths = make_lengths(n)
        as_list = lengths.tolist()
        shape = f"{n} seqs, {lengths.sum() / 1e6:.1f}M tok"
        rounds = 15 if n <= 10_000 else 5 if n <= 100_000 else 3
        for balance in ("kk", "lpt"):
            cpp = lambda: plan_microbatches(lengths, MAX_TOKENS, num_ranks=NUM_RANKS, balance=balance)  # noqa: E731
            plan = [[mb.tolist() for mb in rank] for rank in cpp()]
            fns = {"fusedrl": cpp}
            baselines = []
            if balance == "lpt":
                assert plan_lpt_py(as_list, MAX_TOKENS, NUM_RANKS) == plan, "plan_lpt_py disagrees with the C++ plan"
                fns["python-lpt-fast"] = lambda: plan_lpt_py(as_list, MAX_TOKENS, NUM_RANKS)
                baselines.append("python-lpt-fast")
            if n <= 100_000:  # the reference takes minutes beyond
                if n <= 10_000:
                    ref = plan_microbatches_ref(as_list, MAX_TOKENS, num_ranks=NUM_RANKS, balance=balance)
                    assert ref == plan, "the reference disagrees with the C++ plan"
                fns["python-ref"] = lambda: plan_microbatches_ref(
                    as_list, MAX_TOKENS, num_ranks=NUM_RANKS, balance=balance
                )
                baselines.append("python-ref")
            rows = time_interleaved(fns, rounds=rounds, inner={"fusedrl": 5}, warmup=1 if n <= 100_000 else 0)
            mbs = len(plan[0])
            for name, t in rows.items():
                rec = {
                    "op": f"plan balance={balance}",
                    "shape": f"{shape}, {mbs}x{NUM_RANKS} mb",
                    "provider": name,
                    **t,
                }
                for base in baselines:
                    rec[f"speedup_vs_{base}"] = rows[base]["median_ms"] / t["median_ms"]
                records.append(rec)
    return records


def pack_numpy(offsets, indices, tokens, ignore_index=-100):
    """Vectorised NumPy packing: the same outputs as ``pack``."""
    starts = offsets[indices]
    lens = offsets[indices + 1] - starts
    cu = np.zeros(len(indices) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    pos = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lens)
    index = np.repeat(starts, lens) + pos
    last = cu[1:].astype(np.int64) - 1
    target = index + 1
    target[last] = -1
    labels = tokens[np.minimum(target, len(tokens) - 1)]
    labels[last] = ignore_index
    return cu, pos, index, target, labels, int(lens.max(initial=0))


def providers(n: int):
    """The rollout (lengths, offsets, tokens) of n sequences and name -> (plan fn, pack-all fn taking
    the plan) on it."""
    lengths, offsets, tokens = make_rollout(n)
    lists = lengths.tolist(), offsets.tolist(), tokens.tolist()  # the reference works on Python lists

    def pack_all(fn, off, tok):
        # Each packed micro-batch is dropped before the next is packed, as in the training loop (pack,
        # copy to the GPU, run). Keeping all of them alive would make every provider pay first-touch page
        # faults on fresh memory, which then dominates the C++ time.
        def run(plan):
            for rank in plan:
                for mb in rank:
                    fn(off, mb, tok)

        return run

    cpp_plan = lambda: plan_microbatches(lengths, MAX_TOKENS, num_ranks=NUM_RANKS)  # noqa: E731
    return (lengths, offsets, tokens), {
        "fusedrl": (cpp_plan, pack_all(pack, offsets, tokens)),
        "numpy": (cpp_plan, pack_all(pack_numpy, offsets, tokens)),
        "python-ref": (
            lambda: plan_microbatches_ref(lists[0], MAX_TOKENS, num_ranks=NUM_RANKS),
            pack_all(pack_ref, lists[1], lists[2]),
        ),
    }


def run(sizes) -> list[dict]:
    records = []
    for n in sizes:
        (lengths, _, _), provs = providers(n)
        plan = provs["fusedrl"][0]()
        shape = f"{n} seqs, {lengths.sum() / 1e6:.1f}M tok, {len(plan[0])}x{NUM_RANKS} mb"
        # The pure-Python reference takes tens of seconds at 100k sequences: time it once there.
        slow = dict(warmup=0, rep=1) if n >= 50_000 else dict(warmup=1, rep=3)
        case = {}
        for name, (plan_fn, pack_fn) in provs.items():
            reps = slow if name == "python-ref" else dict(warmup=2, rep=7 if n >= 50_000 else 15)
            if name != "numpy":
                case[(name, "plan")] = time_fn(plan_fn, "cpu", **reps)
            case[(name, "pack")] = time_fn(lambda: pack_fn(plan), "cpu", **reps)
        for name in ("fusedrl", "python-ref"):
            both = {k: case[(name, "plan")][k] + case[(name, "pack")][k] for k in ("median_ms", "p20_ms", "p80_ms")}
            case[(name, "plan+pack")] = both
        for op in ("plan", "pack", "plan+pack"):
            ref = case[("python-ref", op)]["median_ms"]
            for name in provs:
                if (name, op) in case:
                    t = case[(name, op)]
                    records.append({"op": op, "shape": shape, "provider": name, **t, "speedup": ref / t["median_ms"]})
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="numbers of sequences")
    p.add_argument(
        "--plan-sizes",
        type=int,
        nargs="*",
        default=None,
        help="time the planner alone at these numbers of sequences instead (e.g. 1000 ... 1000000)",
    )
    args = p.parse_args(argv)
    if args.plan_sizes:
        load_before = [round(x, 2) for x in os.getloadavg()]
        records = run_plan(args.plan_sizes)
        extra = {
            "workload": f"plan_microbatches(num_ranks={NUM_RANKS}, max_tokens={MAX_TOKENS}); lengths lognormal(median "
            f"{MEDIAN_LEN}, sigma {SIGMA}) clipped to [1, {MAX_LEN}]; speedup_vs_X = X's median / this row's median",
            "target_speedup_100000": 30.0,
            "timing": "interleaved rounds (C++ 5 calls per round), medians over all calls of a provider",
            "load_average_1_5_15_min_before": load_before,  # other engineers share this machine
            "load_average_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()],
        }
        write_results("packing-plan", "cpu", records, extra=extra)
        return
    records = run(args.sizes)
    largest = max(args.sizes)
    at_largest = [
        r["speedup"] for r in records
        if r["op"] == "plan+pack" and r["provider"] == "fusedrl" and r["shape"].startswith(f"{largest} ")
    ]  # fmt: skip
    extra = {
        "workload": f"plan_microbatches(num_ranks={NUM_RANKS}, max_tokens={MAX_TOKENS}, balance='kk') + pack of "
        f"every micro-batch with labels; lengths lognormal(median {MEDIAN_LEN}, sigma {SIGMA}) clipped to "
        f"[1, {MAX_LEN}]",
        f"speedup_plan_pack_{largest}": at_largest[0],
        "target_speedup_100000": 30.0,
    }
    write_results("packing", "cpu", records, extra=extra)
    print(f"plan+pack speedup over the Python reference at {largest} sequences: {at_largest[0]:.1f}x")


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ----------------------------------------------------------------------------------------------------
def _plan_and_pack(plan_fn, pack_fn):
    plan = plan_fn()
    pack_fn(plan)
    return plan


def test_plan_pack_fusedrl(benchmark):
    (_, offsets, tokens), provs = providers(10_000)
    plan = benchmark(_plan_and_pack, *provs["fusedrl"])
    # What was timed computes the reference's result: the same plan, the same packed micro-batches.
    assert [[mb.tolist() for mb in rank] for rank in plan] == provs["python-ref"][0]()
    mbs = [mb for rank in plan for mb in rank]
    for mb in (mbs[0], mbs[len(mbs) // 2], mbs[-1]):
        got, want = pack(offsets, mb, tokens), pack_ref(offsets, mb, tokens)
        assert got.index.tolist() == want["index"] and got.labels.tolist() == want["labels"]
        assert got.cu_seqlens.tolist() == want["cu_seqlens"] and got.position_ids.tolist() == want["position_ids"]


def test_plan_pack_numpy(benchmark):
    (_, offsets, tokens), provs = providers(10_000)
    plan = benchmark(_plan_and_pack, *provs["numpy"])
    for mb in (plan[0][0], plan[-1][-1]):
        got, want = pack_numpy(offsets, mb, tokens), pack(offsets, mb, tokens)
        for a, b in zip(got, want):
            assert np.array_equal(a, b)


def test_plan_lpt_py_matches_cpp():
    for n, ranks, budget in [(0, 3, 10), (1, 1, 8192), (7, 8, 8192), (3000, 8, 16384), (5000, 3, 9000)]:
        lengths = make_lengths(n, seed=n)
        want = [[mb.tolist() for mb in r] for r in plan_microbatches(lengths, budget, num_ranks=ranks, balance="lpt")]
        assert plan_lpt_py(lengths.tolist(), budget, ranks) == want
    lengths = np.full(64, 51)  # one per micro-batch: found by the galloping search
    assert plan_lpt_py(lengths.tolist(), 100, 4) == [
        [mb.tolist() for mb in r] for r in plan_microbatches(lengths, 100, num_ranks=4, balance="lpt")
    ]


def test_plan_pack_python_ref(benchmark):
    _, provs = providers(10_000)
    benchmark.pedantic(_plan_and_pack, args=provs["python-ref"], rounds=1, iterations=1)


if __name__ == "__main__":
    main()
