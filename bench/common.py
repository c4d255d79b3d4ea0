"""Shared benchmark plumbing: timing, peak memory, environment facts and the JSON/table writers."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment(device: str) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_v,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.date.today().isoformat(),
        "threads": torch.get_num_threads(),
    }


def time_fn(fn, device: str, *, warmup: int = 3, rep: int = 10) -> dict:
    """Median / p20 / p80 in milliseconds. On CUDA uses triton.testing.do_bench."""
    if device == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def peak_memory_gb(fn, device: str) -> float:
    """Peak GiB allocated while running fn once, above what was live before.

    CUDA: the caching allocator's peak counter. CPU: the profiler's memory timeline, which sees every
    tensor's creation and destruction wherever it happens (per-op accounting misplaces the frees made
    inside a Python autograd Function's forward/backward)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline  # private, torch >= 2.1

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak / 2**30


def write_results(name: str, device: str, records: list[dict], extra: dict | None = None) -> Path:
    """Write ``bench/results/<name>-<device>.json`` and print a fixed-width table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    payload = {**env, **(extra or {}), "records": records}
    tag = "cuda" if device == "cuda" else "cpu"
    path = RESULTS / f"{name}-{tag}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print_table(records)
    print(f"\nwrote {path} ({env['device']}, torch {env['torch']}, commit {env['commit']})")
    return path


def print_table(records: list[dict]) -> None:
    if not records:
        return
    cols = [c for c in ("op", "shape", "dtype", "provider", "pass", "median_ms", "p20_ms", "p80_ms", "gbps",
                        "tflops", "frac_of_peak", "peak_mem_gb", "speedup") if any(c in r for r in records)]
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in records)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in records:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))
