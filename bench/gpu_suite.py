"""One-command GPU benchmark suite (issue 8): device peaks, the fused ops against PyTorch eager, torch.compile
of the reference and Liger-Kernel when installed, and one engine PPO step, in a single process.

    python bench/gpu_suite.py                 # full shapes; estimated 6-8 minutes on an H100 (unmeasured)
    python bench/gpu_suite.py --quick         # tiny shapes, CPU-friendly smoke run (what the test runs)
    python bench/gpu_suite.py --out DIR       # default bench/results
    python bench/gpu_suite.py --cases logprobs,gae   # a subset, merged into the same day's file
    python bench/gpu_suite.py --compile skip         # every baseline but torch.compile (no compile time)
    python bench/gpu_suite.py --compile only         # the torch.compile baselines alone, merged likewise

Writes <out>/<gpu>-<yyyy-mm-dd>.json (top level: device, torch, triton, commit, date, copy_gbps,
matmul_tflops, targets, records) and the headline table as .md after every case, so a killed run keeps every
case it finished; the bar plot (.png) and the printed table at the end. Each case reuses the per-op benchmark
modules; a case that fails is recorded as {"op", "error"} and the run goes on. A run of some cases (or of some
baselines, ``--compile``) replaces only those records of the same day's file. Baselines: no torch.compile for GAE
(gae_ref loops over time steps with host-read bounds) nor for the engine step (a whole trainer step).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bench_gae, bench_logprobs, bench_ppo_loss  # noqa: E402
from bench.common import RESULTS, device_name, environment, peak_memory_gb, print_table, time_fn  # noqa: E402
from bench.gpu_static import pass_bytes, peak_bandwidth  # noqa: E402

from fusedrl.kernels import gae, gae_ref, set_validation  # noqa: E402

# Every record that is not an error carries these; a metric that does not apply to the op is null.
FIELDS = ("op", "shape", "dtype", "provider", "pass", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
          "frac_of_peak", "peak_mem_gb", "bw_floor_ms", "fraction_of_bw_floor")  # fmt: skip
CASES = ("logprobs", "ppo_loss", "linear_ppo_loss", "gae", "ppo_step")
COMPILE_MODES = ("all", "skip", "only")
LINEAR_TARGET_MS = 40.0
# The fused linear loss's memory target, from its floor: what any chunked lm_head loss with float32 dW accumulation
# holds beyond its inputs at once (linear_memory_floor); the allowance covers the allocator's rounding and the
# (N,)-sized per-token vectors.
LINEAR_TARGET_OVER_FLOOR = 1.25
LOGPROBS_TARGET_FRAC = 0.90


def shapes(quick: bool) -> dict:
    """The cases of issue 8; ``quick`` shrinks every one so the whole suite runs on CPU in seconds."""
    if quick:
        return {"logprobs": [(64, 1000), (32, 4099)], "ppo_loss": (64, 1000), "linear": (64, 64, 1000),
                "gae": (8, 64), "engine": dict(preset="tiny-llama", prompts_per_step=2, samples=2, prompt_len=8,
                                               new_tokens=8, steps=2)}  # fmt: skip
    return {"logprobs": [(8192, 128256), (8192, 151936)], "ppo_loss": (8192, 151936),
            "linear": (8192, 4096, 131072), "gae": (256, 2048),
            "engine": dict(preset="qwen-0.5b-like", prompts_per_step=8, samples=4, prompt_len=32, new_tokens=128,
                           steps=3)}  # fmt: skip


def linear_memory_floor(N: int, H: int, V: int, dtype: str, device: str) -> dict:
    """``{"bytes", "formula"}``: the memory a fused lm_head loss's forward + backward must hold beyond its inputs
    (hidden (N, H), weight (V, H)): the float32 dW accumulator, dW in the weight's dtype, dh, and one chunk of
    logits at the chunk size linear_ppo_loss picks on ``device``."""
    from fusedrl.kernels.linear_ppo_loss import _chunk_rows

    e = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    chunk = _chunk_rows(N, V, H, getattr(torch, dtype), torch.device(device), None)
    dw_cast = V * H * e if e != 4 else 0
    total = V * H * 4 + dw_cast + N * H * e + chunk * V * e
    return {"bytes": total, "formula": f"V*H*4 (fp32 dW) + {'V*H*%d (dW cast) + ' % e if dw_cast else ''}N*H*{e} "
                                       f"(dh) + {chunk}*V*{e} (one chunk of logits)"}  # fmt: skip


def gpu_slug(name: str) -> str:
    """Short file-name tag from a CUDA device name: h100 / h200 / a100 ... when known, else the name sanitised."""
    name = name.lower()
    known = re.search(r"\b(h100|h200|h800|h20|gh200|b200|b100|gb200|a100|a800|a10g|a10|l40s|l40|l4|v100|t4)\b", name)
    return known.group(1) if known else re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "gpu"


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """Measured dense matmul rate, the compute ceiling the lm_head cases are compared with."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_fn(lambda: a @ b, device)["median_ms"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


@contextlib.contextmanager
def swapped(module, name: str, value):
    """Temporarily replace a module-level provider table: the per-op benchmarks take no provider argument."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def case_logprobs(N, V, dtype, device, copy_gbps):
    try:
        return bench_logprobs.bench_shape(N, V, dtype, device, copy_gbps, include_loop=False)
    except Exception as e:  # bench_shape runs every provider once outside its own guard: retry without compile
        err = {"op": "logprobs", "shape": f"{N}x{V}", "provider": "all (retried without compile)", "error": _err(e)}
        _free(device)
        full = bench_logprobs.providers
        with swapped(bench_logprobs, "providers", lambda d: {k: f for k, f in full(d).items() if k != "compile"}):
            return [err] + bench_logprobs.bench_shape(N, V, dtype, device, copy_gbps, include_loop=False)


_LINEAR_PROVIDERS = bench_ppo_loss.linear_providers  # unfiltered: the eager provider the compile baseline compiles


def case_ppo_loss(N, V, dtype, device):
    return bench_ppo_loss.bench_logits(N, V, dtype, device)


def case_linear(N, H, V, dtype, device, compile_mode="all"):
    """bench_ppo_loss's linear providers (as ``--compile`` filters them) and torch.compile of the eager one."""
    ps = dict(bench_ppo_loss.linear_providers())
    if compile_mode != "skip":
        ps["compile"] = torch.compile(_LINEAR_PROVIDERS()["eager"], dynamic=False)
    with swapped(bench_ppo_loss, "linear_providers", lambda: ps):
        records = bench_ppo_loss.bench_linear(N, V, H, dtype, device)
    if compile_mode != "skip" and not any(r["provider"] == "compile" for r in records):
        records.append({"op": "linear_ppo_loss", "shape": f"{N}x{H}x{V}", "provider": "compile",
                        "error": "torch.compile of linear_ppo_loss_ref failed (the log has the exception)"})  # fmt: skip
    return records


def case_gae(n_seq, seq_len, device, copy_gbps):
    """fusedrl's gae (Triton on CUDA) against the reference in eager mode. No compile baseline: gae_ref reads
    the lengths on the host and loops over time steps, so dynamo would unroll thousands of steps."""
    records = []
    for dtype in (torch.float32, torch.bfloat16):
        r, v, cu = bench_gae.make_batch(n_seq, seq_len, dtype, device, ragged=True)
        # Bytes the op must move: read reward and value, write advantage and return (float32), cu_seqlens.
        nbytes = r.numel() * (2 * dtype.itemsize + 2 * 4) + cu.numel() * cu.element_size()
        want = gae_ref(r.double(), v.double(), cu, gamma=bench_gae.GAMMA, lam=bench_gae.LAM)[0]
        got = gae(r, v, cu, gamma=bench_gae.GAMMA, lam=bench_gae.LAM)[0]
        err = (got.double() - want).abs().max().item()
        if err > 1e-3 * max(1.0, want.abs().max().item()):
            raise AssertionError(f"gae disagrees with the float64 reference by {err:.3e} ({dtype})")
        providers = {"fusedrl": lambda r=r, v=v, cu=cu: gae(r, v, cu, gamma=bench_gae.GAMMA, lam=bench_gae.LAM),
                     "eager": lambda r=r, v=v, cu=cu: gae_ref(r, v, cu, gamma=bench_gae.GAMMA, lam=bench_gae.LAM)}  # fmt: skip
        for name, fn in providers.items():
            t = time_fn(fn, device)
            gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
            records.append({"op": "gae", "shape": f"{n_seq}x{seq_len} ragged", "dtype": str(dtype)[6:],
                            "n_tokens": r.numel(), "provider": name, "pass": "fwd", **t, "gbps": gbps,
                            "frac_of_peak": gbps / copy_gbps,
                            "peak_mem_gb": peak_memory_gb(fn, device)})  # fmt: skip
    return records


def case_engine(device, cfg):
    from bench import bench_engine  # transformers import: only when this case runs

    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    records = []
    for backend in ("triton", "torch") if gpu else ("torch",):
        try:
            records += bench_engine.run_case(cfg["preset"], device, dtype, backend, prompts_per_step=cfg[
                "prompts_per_step"], samples=cfg["samples"], prompt_len=cfg["prompt_len"], new_tokens=cfg[
                "new_tokens"], steps=cfg["steps"])  # fmt: skip
        except Exception as e:
            records.append({"op": "ppo_step", "shape": cfg["preset"], "provider": f"fusedrl[{backend}]",
                            "error": _err(e)})  # fmt: skip
            _free(device)
    for r in records:  # the phases map onto the suite's passes: the whole step is the "full" pass
        if "error" not in r and r["pass"] == "step":
            r["pass"] = "full"
    return records


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:400]}"


def normalise(records, copy_gbps, peak_tflops):
    """Give every measured record the full field set; fraction of peak against the measured device ceilings."""
    for r in records:
        if "error" in r:
            continue
        for k in FIELDS:
            r.setdefault(k, None)
        if r["frac_of_peak"] is None and r["gbps"] is not None:
            r["frac_of_peak"] = r["gbps"] / copy_gbps
        elif r["frac_of_peak"] is None and r["tflops"] is not None:
            r["frac_of_peak"] = r["tflops"] / peak_tflops
    return records


def add_bw_floor(records, peak_bps: float):
    """Each memory-bound record's time floor (bench/gpu_static.py's bytes for the pass / peak bandwidth) and the
    fraction of it reached, floor / median (1.0 = at the floor). The same floor for every provider of a case."""
    bench_ppo = bench_ppo_loss.CONFIG
    for r in records:
        if "error" in r or r["op"] not in ("logprobs", "ppo_loss", "gae"):
            continue
        try:
            kw = {"ref": True, "entropy": bench_ppo.entropy_coef != 0} if r["op"] == "ppo_loss" else {}
            if r["op"] == "gae":  # the ragged batch: its real token count, not B x T
                b = pass_bytes("gae", r["pass"], r["shape"], r["dtype"], n_tokens=r["n_tokens"])
            else:
                b = pass_bytes(r["op"], r["pass"], r["shape"], r["dtype"], **kw)
        except ValueError:  # a pass the model does not cover
            continue
        r["bw_floor_ms"] = b["bytes"] / peak_bps * 1e3
        r["fraction_of_bw_floor"] = r["bw_floor_ms"] / r["median_ms"]


def add_speedups(records):
    """Eager time over each provider's time, same op, shape, dtype and pass (the per-op helpers key no dtype)."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["pass"])  # noqa: E731
    ok = [r for r in records if "error" not in r]
    base = {key(r): r["median_ms"] for r in ok if r["provider"] == "eager"}
    for r in ok:
        if key(r) in base:
            r["speedup"] = base[key(r)] / r["median_ms"]


def targets(records, copy_gbps, device="cuda"):
    """The issue's targets, each as the measured figure, the goal and whether it is met (null if unmeasured)."""
    ok = [r for r in records if "error" not in r and r["provider"] in ("fusedrl", "fusedrl-inplace")]
    out = {"logprobs_fwd": [], "ppo_loss_full": [], "linear_ppo_loss_full": []}
    for r in ok:
        if r["op"] == "logprobs" and r["pass"] == "fwd" and r["provider"] == "fusedrl":
            out["logprobs_fwd"].append({"shape": r["shape"], "frac_of_copy": r["frac_of_peak"],
                                        "target": LOGPROBS_TARGET_FRAC,
                                        "met": r["frac_of_peak"] >= LOGPROBS_TARGET_FRAC})  # fmt: skip
        if r["op"] == "ppo_loss" and r["pass"] == "full":
            N, V = (int(s) for s in r["shape"].split("x"))
            item = torch.empty(0, dtype=getattr(torch, r["dtype"])).element_size()
            floor_ms = 3 * N * V * item / (copy_gbps * 1e9) * 1e3  # 2 reads + 1 write of the logits
            out["ppo_loss_full"].append({"shape": r["shape"], "provider": r["provider"], "median_ms": r["median_ms"],
                                         "floor_ms": floor_ms, "ratio": r["median_ms"] / floor_ms})  # fmt: skip
        if r["op"] == "linear_ppo_loss" and r["pass"] == "full" and r["provider"] == "fusedrl":
            N, H, V = (int(s) for s in r["shape"].split("x"))
            floor = linear_memory_floor(N, H, V, r["dtype"], device)
            floor_gb = floor["bytes"] / 2**30
            out["linear_ppo_loss_full"].append({
                "shape": r["shape"], "median_ms": r["median_ms"], "target_ms": LINEAR_TARGET_MS,
                "peak_mem_gb": r["peak_mem_gb"], "mem_floor_gb": floor_gb, "mem_floor": floor["formula"],
                "mem_over_floor": r["peak_mem_gb"] / floor_gb, "target_mem_over_floor": LINEAR_TARGET_OVER_FLOOR,
                "target_mem_gb": LINEAR_TARGET_OVER_FLOOR * floor_gb,
                "met": r["median_ms"] < LINEAR_TARGET_MS and r["peak_mem_gb"] <= LINEAR_TARGET_OVER_FLOOR * floor_gb,
            })  # fmt: skip
    return out


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def headline_markdown(payload) -> str:
    """Forward and full passes of the kernels, the whole engine step, the targets and the errors."""
    rows = [r for r in payload["records"] if "error" not in r and r["pass"] in ("fwd", "full")]
    cols = ("op", "shape", "dtype", "provider", "pass", "median_ms", "gbps", "tflops", "frac_of_peak",
            "fraction_of_bw_floor", "peak_mem_gb", "speedup")  # fmt: skip
    lines = [f"# fusedrl GPU suite: {payload['device']}, {payload['date']}", "",
             f"torch {payload['torch']}, triton {payload['triton']}, commit {payload['commit']}; measured copy "
             f"{payload['copy_gbps']:.1f} GB/s, matmul {payload['matmul_tflops']:.1f} TFLOP/s; fraction_of_bw_floor: "
             f"bytes of the pass (bench/gpu_static.py) / {payload['bw_floor_basis']} / median", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    t = payload["targets"]
    lines += ["", "## Targets", ""] + ([] if any(t.values()) else ["(no target case measured in this run)"])
    for x in t["logprobs_fwd"]:
        lines.append(f"- logprobs fwd {x['shape']}: {x['frac_of_copy']:.1%} of copy bandwidth "
                     f"(target >= {x['target']:.0%}: {'met' if x['met'] else 'missed'})")  # fmt: skip
    for x in t["ppo_loss_full"]:
        lines.append(f"- ppo_loss fwd+bwd {x['shape']} {x['provider']}: {x['median_ms']:.3f} ms vs floor {x['floor_ms']:.3f} ms "
                     f"(2 reads + 1 write of the logits): ratio {x['ratio']:.2f}")  # fmt: skip
    for x in t["linear_ppo_loss_full"]:
        lines.append(f"- linear_ppo_loss fwd+bwd {x['shape']}: {x['median_ms']:.2f} ms (target < {x['target_ms']:g}),"
                     f" peak extra memory {x['peak_mem_gb']:.3f} GiB = {x['mem_over_floor']:.2f} x its floor "
                     f"{x['mem_floor_gb']:.3f} GiB ({x['mem_floor']}; target <= {x['target_mem_over_floor']:g} x): "
                     f"{'met' if x['met'] else 'missed'}")  # fmt: skip
    errors = [r for r in payload["records"] if "error" in r]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['op']} {r.get('shape', '')} {r.get('provider', '')}: {r['error']}"
                                          for r in errors]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(payload, path: Path) -> None:
    """Median time of every (case, pass) per provider, log scale: one glance shows who wins where."""
    import matplotlib
    import matplotlib.patches

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["records"] if "error" not in r and r["pass"] in ("fwd", "full")]
    label = lambda r: f"{r['op']}\n{r['shape'].split(' (')[0]} {r['dtype']}\n{r['pass']}"  # noqa: E731
    cases = list(dict.fromkeys(label(r) for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in rows))}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 5))
    for j, case in enumerate(cases):  # each case's bars centred on its tick, whatever providers it has
        present = [r for r in rows if label(r) == case]
        width = 0.8 / len(present)
        for k, r in enumerate(present):
            ax.bar(j - 0.4 + (k + 0.5) * width, r["median_ms"], width, color=colors[r["provider"]])
    ax.set_xticks(range(len(cases)), cases, fontsize=7)
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=p) for p, c in colors.items()], fontsize=7, ncol=2)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (lower is better)")
    ax.set_title(f"fusedrl on {payload['device']} ({payload['date']}, {payload['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_subset(wanted, mode):
    """Whether an earlier record is one this run measures again (same op, a baseline this ``--compile`` mode runs)."""

    def again(r) -> bool:
        compiled = r.get("provider") == "compile"
        return r["op"] in wanted and (mode == "all" or compiled == (mode == "only"))

    return again


@contextlib.contextmanager
def baselines(mode: str):
    """The per-op provider tables, filtered to the torch.compile baselines (``only``), to everything else
    (``skip``) or left whole (``all``)."""
    keep = {"all": lambda name: True, "skip": lambda name: name != "compile", "only": lambda name: name == "compile"}[
        mode
    ]
    tables = [(bench_logprobs, "providers"), (bench_ppo_loss, "logits_providers"), (bench_ppo_loss, "linear_providers")]
    with contextlib.ExitStack() as stack:
        for module, name in tables:
            full = getattr(module, name)
            stack.enter_context(swapped(module, name, lambda *a, full=full: {k: f for k, f in full(*a).items()
                                                                              if keep(k)}))  # fmt: skip
        yield keep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run, under 2 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of {','.join(CASES)} (to split a run across short leases)",
    )
    ap.add_argument("--compile", default="all", choices=COMPILE_MODES,
                    help="torch.compile baselines: all (with the others), skip (the others only), only (just them)")  # fmt: skip
    args = ap.parse_args(argv)
    wanted = args.cases.split(",")
    if unknown := sorted(set(wanted) - set(CASES)):
        ap.error(f"--cases: unknown {unknown}, expected names from {list(CASES)}")
    if args.compile == "only":  # GAE and the engine step have no compile baseline
        wanted = [c for c in wanted if c not in ("gae", "ppo_step")]
    device, S = args.device, shapes(args.quick)
    # bf16 on GPU (what trainers run); float32 on CPU, where bf16 matmuls are emulated and tell nothing.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t_start = time.perf_counter()

    copy_gbps = bench_logprobs.copy_bandwidth_gbps(device)
    peak_tflops = matmul_tflops(device, dtype)
    print(f"{device_name(device)}: copy {copy_gbps:.1f} GB/s, {dtype} matmul {peak_tflops:.2f} TFLOP/s", flush=True)

    bench_logprobs.check_correct(device)
    bench_ppo_loss.check_correct(device)

    # The floor's bandwidth: the data sheet's HBM peak for a known GPU, else (CPU, unknown GPU) the measured copy.
    peak_bps, bw_basis = peak_bandwidth(device_name(device)) if device == "cuda" else (None, None)
    if peak_bps is None:
        peak_bps, bw_basis = copy_gbps * 1e9, f"measured copy {copy_gbps:.1f} GB/s"
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{gpu_slug(device_name(device)) if device == 'cuda' else 'cpu'}-{_dt.date.today().isoformat()}"
    earlier = []
    if stem.with_suffix(".json").exists():
        # A run split across leases or steps: keep the records of what this run does not measure again.
        again = _run_subset(wanted, args.compile)
        old = json.loads(stem.with_suffix(".json").read_text())["records"]
        earlier = [r for r in old if not again(r)]  # their fractions use their own peaks
        print(f"keeping {len(earlier)} of the {len(old)} records of {stem}.json (what this run does not measure)")

    def write(records, final=False):
        """The whole file as it stands: derived fields and targets recomputed over every record kept so far."""
        records = earlier + records
        add_bw_floor(records, peak_bps)
        normalise(records, copy_gbps, peak_tflops)
        add_speedups(records)
        payload = {"device": env["device"], "torch": env["torch"], "triton": env["triton"], "commit": env["commit"],
                   "date": stem.name[-10:], "python": env["python"], "copy_gbps": copy_gbps,
                   "matmul_tflops": peak_tflops, "matmul_dtype": str(dtype)[6:], "bw_floor_basis": bw_basis,
                   "bw_floor_bps": peak_bps, "quick": args.quick, "cases": wanted, "compile": args.compile,
                   "complete": final, "wall_s": time.perf_counter() - t_start,
                   "targets": targets(records, copy_gbps, device), "records": records}  # fmt: skip
        tmp = stem.with_suffix(".json.tmp")  # a kill mid-write leaves the previous file whole
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(stem.with_suffix(".json"))
        stem.with_suffix(".md").write_text(headline_markdown(payload))
        return payload

    cases = [(f"logprobs {N}x{V}", "logprobs", lambda N=N, V=V: case_logprobs(N, V, dtype, device, copy_gbps))
             for N, V in S["logprobs"]]  # fmt: skip
    cases += [
        ("ppo_loss {}x{}".format(*S["ppo_loss"]), "ppo_loss", lambda: case_ppo_loss(*S["ppo_loss"], dtype, device)),
        ("linear_ppo_loss {}x{}x{}".format(*S["linear"]), "linear_ppo_loss",
         lambda: case_linear(*S["linear"], dtype, device, args.compile)),
        ("gae {}x{}".format(*S["gae"]), "gae", lambda: case_gae(*S["gae"], device, copy_gbps)),
        (f"ppo_step {S['engine']['preset']}", "ppo_step", lambda: case_engine(device, S["engine"])),
    ]  # fmt: skip
    records = []
    threads = torch.get_num_threads()
    set_validation(False)  # steady-state loop: no label range check (a host sync per call on GPU)
    with baselines(args.compile):
        for label, op, run in cases:
            if op not in wanted:
                continue
            t0 = time.perf_counter()
            print(f"== {label}", flush=True)
            try:
                records += run()
            except Exception as e:  # one broken case must not cost the rest of the lease
                traceback.print_exc()
                records.append({"op": op, "shape": label.split(" ", 1)[1], "error": _err(e)})
            torch.set_num_threads(threads)  # the engine and GAE benchmarks may change it
            _free(device)
            write(records)
            print(f"   {time.perf_counter() - t0:.1f} s; {stem}.json written", flush=True)
    set_validation(True)

    payload = write(records, final=True)
    try:
        plot(payload, stem.with_suffix(".png"))
    except Exception as e:  # the numbers are already on disk; a plotting problem must not hide them
        print(f"plot failed: {_err(e)}")
    print_table([r for r in payload["records"] if "error" not in r])
    print("\n" + headline_markdown(payload))
    print(f"wrote {stem}.json/.md/.png in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
