"""Shared benchmark plumbing: timing, peak memory, environment facts and the JSON/table writers."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            text=True,
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


def write_report(out_dir: Path, stem: str, payload: dict, markdown) -> Path:
    """Write ``<out_dir>/<stem>.json`` (the payload) and ``.md`` (``markdown(payload)``), print the table; returns the
    stem path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / stem
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown(payload)
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path}.json / .md")
    return path


def print_table(records: list[dict]) -> None:
    if not records:
        return
    cols = [
        c
        for c in (
            "op",
            "shape",
            "dtype",
            "provider",
            "pass",
            "median_ms",
            "p20_ms",
            "p80_ms",
            "gbps",
            "tflops",
            "frac_of_peak",
            "peak_mem_gb",
            "speedup",
        )
        if any(c in r for r in records)
    ]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in records)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in records:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


# ----------------------------------------------------------------------------------------------------
# CPU side by side: one process per provider, providers interleaved, peak RSS above the inputs
# ----------------------------------------------------------------------------------------------------
# Why processes: a provider's allocations (glibc arenas, torch.compile caches) must not shape the next
# one's memory or time. Why interleaved: on a shared machine the load drifts; provider A's repeats all early
# and B's all late would turn the drift into a ratio. Times are reported as wall-clock and as this
# process's CPU time (which another process's load disturbs far less); memory is measured in its own child
# with MALLOC_MMAP_THRESHOLD_ pinned, so that freed blocks go back to the OS and RSS follows live memory.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def child_peak_rss(fn) -> int:
    """Bytes of peak RSS while ``fn()`` runs (and while what it returns is alive), above the RSS before it:
    the inputs, created before, are not counted; the gradients it returns are."""
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux >= 4.0)
        f.write("5")
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return (peak - before) * 1024


def child_times(fn, reps: int, warmup: int = 1) -> dict:
    """``warmup`` untimed calls, then ``reps`` timed calls: wall-clock and process CPU seconds of each."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": wall, "cpu_s": cpu}


def child_main(measure, argv) -> None:
    """Entry point of a child: ``measure(provider, case, mode, reps)`` -> dict, printed as one JSON line."""
    torch.set_num_threads(1)
    provider, case, mode, reps = argv[0], json.loads(argv[1]), argv[2], int(argv[3])
    print("RESULT " + json.dumps(measure(provider, case, mode, reps)), flush=True)


def child_result(cmd: list[str], *, env: dict, timeout: float | None = None, cwd=None, tail: int = 1) -> dict:
    """Run a benchmark's child process: the JSON of its last ``RESULT `` line, or ``{"error": ...}`` with the exit
    status and the last ``tail`` lines of its output when it failed or timed out."""
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        last = (out.stderr or out.stdout).strip().splitlines()[-tail:]
        return {"error": f"exit {out.returncode}: {' | '.join(last)[-200 * tail :]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def run_child(script: Path, provider: str, case: dict, mode: str, reps: int, timeout: float) -> dict:
    env = {**os.environ, **CHILD_ENV, **(MEM_ENV if mode == "mem" else {})}
    cmd = [sys.executable, str(script), "--child", provider, json.dumps(case), mode, str(reps)]
    return child_result(cmd, env=env, timeout=timeout, cwd=Path(__file__).resolve().parents[1])


def side_by_side(script: Path, cases: list[dict], providers: list[str], *, repeats: int, reps: int,
                 timeout: float = 1200) -> list[dict]:  # fmt: skip
    """For each case: ``repeats`` rounds, each running every provider once in its own process (order rotated
    round by round), then one memory child per provider. Returns one record per (case, provider) with the
    medians over all timed calls, the peak RSS above the inputs and the load averages seen."""
    records = []
    for case in cases:
        wall = {p: [] for p in providers}
        cpu = {p: [] for p in providers}
        errors = {}
        loads = [os.getloadavg()[0]]
        for r in range(repeats):
            order = providers[r % len(providers) :] + providers[: r % len(providers)]
            for p in order:
                if p in errors:
                    continue
                res = run_child(script, p, case, "time", reps, timeout)
                if "error" in res:
                    errors[p] = res["error"]
                    print(f"  {case} {p}: {res['error']}", flush=True)
                    continue
                wall[p] += res["wall_s"]
                cpu[p] += res["cpu_s"]
                loads.append(os.getloadavg()[0])
                print(f"  {case} {p}: wall {statistics.median(res['wall_s']):.3f} s, cpu "
                      f"{statistics.median(res['cpu_s']):.3f} s, load {loads[-1]:.1f}", flush=True)  # fmt: skip
        for p in providers:
            rec = {**case, "provider": p}
            if p in errors:
                rec["error"] = errors[p]
            else:
                mem = run_child(script, p, case, "mem", 1, timeout)
                rec.update({
                    "wall_median_s": statistics.median(wall[p]), "wall_min_s": min(wall[p]),
                    "cpu_median_s": statistics.median(cpu[p]), "n_timed": len(wall[p]),
                    "extra_rss_mb": mem.get("extra_rss", float("nan")) / 1e6, **({"mem_error": mem["error"]}
                                                                                  if "error" in mem else {}),
                })  # fmt: skip
            rec["load_avg_1min"] = [min(loads), statistics.median(loads), max(loads)]
            records.append(rec)
    return records


def side_by_side_markdown(records: list[dict], key_fields: list[str], base: str = "fusedrl") -> str:
    """The README table: per case, each provider's times and memory and fusedrl's ratios against it."""
    lines = ["| case | provider | wall median | CPU median | extra RSS | fusedrl speed-up (wall / CPU) | "
             "fusedrl memory ratio |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    cases = []
    for r in records:
        key = tuple(r[k] for k in key_fields)
        if key not in cases:
            cases.append(key)
    for key in cases:
        rows = [r for r in records if tuple(r[k] for k in key_fields) == key]
        ours = next((r for r in rows if r["provider"] == base and "error" not in r), None)
        name = ", ".join(f"{k}={v}" for k, v in zip(key_fields, key))
        for r in rows:
            if "error" in r:
                lines.append(f"| {name} | {r['provider']} | skipped: {r['error']} | | | | |")
                continue
            ratio = mem = ""
            if ours is not None and r is not ours:
                ratio = (f"{r['wall_median_s'] / ours['wall_median_s']:.2f}x / "
                         f"{r['cpu_median_s'] / ours['cpu_median_s']:.2f}x")  # fmt: skip
                mem = f"{ours['extra_rss_mb'] / r['extra_rss_mb']:.2f}x" if r["extra_rss_mb"] > 0 else ""
            lines.append(
                f"| {name} | {r['provider']} | {r['wall_median_s'] * 1e3:.0f} ms | "
                f"{r['cpu_median_s'] * 1e3:.0f} ms | +{r['extra_rss_mb']:.0f} MB | {ratio} | {mem} |"
            )
    return "\n".join(lines) + "\n"


def write_side_by_side(name: str, records: list[dict], key_fields: list[str], extra: dict | None = None) -> Path:
    """bench/results/<name>-<date>.json and .md (the markdown table, with device, versions and load)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**environment("cpu"), "threads": 1, "uname": platform.platform()}
    versions = {}
    for mod in ("trl", "liger_kernel", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            try:
                from importlib.metadata import version

                versions[mod] = version(mod.replace("_", "-"))
            except Exception:
                versions[mod] = None
    payload = {**env, "versions": versions, **(extra or {}), "records": records}
    stem = RESULTS / f"{name}-{env['date']}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    table = side_by_side_markdown(records, key_fields)
    loads = [x for r in records for x in r.get("load_avg_1min", [])]
    head = (f"{env['device']}, one thread per process, torch {env['torch']}, trl {versions['trl']}, liger-kernel "
            f"{versions['liger_kernel']}, commit {env['commit']}, {env['date']}; 1-min load average during the run "
            f"{min(loads):.1f}-{max(loads):.1f} (2 cores shared with other jobs)\n\n")  # fmt: skip
    stem.with_suffix(".md").write_text(head + table)
    print(head + table)
    return stem.with_suffix(".json")
