"""Launch-configuration sweep (issue 18): the logprobs forward and the PPO loss (its forward kernel and the
logprobs backward kernel it reuses) at N = 8192, V in {128256, 151936}, bf16, over a few candidate
(BLOCK_V, num_warps, rows per program BLOCK_M), each timed and checked against the launcher's own choice.

    python bench/gpu_sweep.py --out DIR              # on a GPU: ~1-2 minutes (compiles dominate)
    python bench/gpu_sweep.py --quick --out DIR      # CPU, interpreter, tiny shapes: exercises the same code

How: the public op runs once with every Triton launch recorded (kernel, arguments, constexprs); each candidate
replays the recorded launch with only BLOCK_V / BLOCK_M / num_warps changed (grid = cdiv(n_rows, BLOCK_M)),
so the sweep follows whatever argument list the kernels have today. Every candidate's outputs must match the
default launch's (rtol 1e-3) or it is recorded as wrong and never chosen. Vocabulary splitting for few rows
is not implemented in the kernels, so it is not a candidate here.

Writes <out>/sweep-<device>-<date>.json/.md: every candidate with median ms, GB/s and fraction of the
bandwidth floor (bench/gpu_static.py's bytes of the pass), and the best per kernel and shape.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import pkgutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, device_name, environment, time_fn, write_report  # noqa: E402
from bench.gpu_static import pass_bytes, peak_bandwidth  # noqa: E402

import fusedrl.kernels as K  # noqa: E402
from fusedrl.kernels import PPOLossConfig, logprobs, ppo_loss, set_validation  # noqa: E402

# (BLOCK_V, num_warps, BLOCK_M): 16-byte loads want 8 bf16 per thread, so 2048 x (warps / 8) elements per
# load wave; rows per program > 1 only where a tile stays <= 16K elements.
CANDIDATES = [(bv, w, bm) for bv in (2048, 4096, 8192, 16384) for w in (4, 8, 16) for bm in (1, 2, 4)
              if bv * bm <= 16384 and bv >= 256 * w]  # fmt: skip
QUICK_CANDIDATES = [(256, 1, 1), (512, 1, 2)]
CONFIG = PPOLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.04, kl_estimator="k3")  # as bench_ppo_loss


def _kernel_classes():
    """The classes of the @triton.jit objects in fusedrl.kernels (JITFunction, or InterpretedFunction under
    TRITON_INTERPRET=1): their ``run`` is what ``kernel[grid](...)`` calls."""
    classes = set()
    for info in pkgutil.iter_modules(K.__path__):
        mod = importlib.import_module(f"{K.__name__}.{info.name}")
        classes |= {type(v) for k, v in vars(mod).items() if k.endswith("_kernel") and hasattr(v, "run")}
    return classes


@contextlib.contextmanager
def recording():
    """Launches still run, and each is recorded as {"kernel", "args", "kwargs"}."""
    launches, saved = [], {}
    for cls in _kernel_classes():
        saved[cls] = cls.run

        def run(self, *args, grid, warmup, _orig=cls.run, **kwargs):
            launches.append({"kernel": self, "args": args, "kwargs": dict(kwargs)})
            return _orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        cls.run = run
    try:
        yield launches
    finally:
        for cls, fn in saved.items():
            cls.run = fn


def _name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def replay(la, bv, w, bm):
    """Launch a recorded kernel again with BLOCK_V / num_warps / BLOCK_M changed; returns the launch callable."""
    kernel, args = la["kernel"], list(la["args"])
    names = list(inspect.signature(kernel.fn).parameters)
    n_rows = args[names.index("n_rows")]
    kw = {**la["kwargs"], "BLOCK_V": bv, "num_warps": w, "BLOCK_M": bm}
    grid = (-(-n_rows // bm),)
    return lambda: kernel[grid](*args, **kw)


def _tensors(la):
    return [a for a in la["args"] if isinstance(a, torch.Tensor)]


def _outputs(la, tensors, saved) -> list[int]:
    """Indices of the float tensors the launch writes in full: poisoned with NaN one at a time, an output comes
    back NaN-free after the default launch, an input stays NaN. Every tensor is restored afterwards."""
    outs = []
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            continue
        t.fill_(float("nan"))
        replay(la, la["kwargs"]["BLOCK_V"], la["kwargs"]["num_warps"], la["kwargs"].get("BLOCK_M", 1))()
        if not torch.isnan(t).any():
            outs.append(i)
        for a, b in zip(tensors, saved):
            a.copy_(b)
    return outs


def sweep_case(op, N, V, dtype, device, candidates, peak_bps, deadline, reps):
    """Record the op's launches at (N, V), then time every candidate on every launched kernel."""
    torch.manual_seed(0)
    x = (torch.randn(N, V, device=device) * 2).to(dtype).requires_grad_(True)
    y = torch.randint(0, V, (N,), device=device)
    with recording() as launches:
        if op == "logprobs":
            logprobs(x, y, backend="triton").float().sum().backward()
        else:
            vec = lambda s: torch.randn(N, device=device) * s  # noqa: E731
            loss, _ = ppo_loss(x, y, -vec(1).abs(), vec(1), torch.ones(N, device=device), ref_logp=-vec(1).abs(),
                               config=CONFIG, backend="triton")  # fmt: skip
            loss.backward()
    records = []
    with torch.no_grad():  # the recorded buffers include the leaf logits; replays write in place
        for la in launches:
            kname = _name(la["kernel"])
            if op == "logprobs" and "bwd" in kname:
                continue  # the issue sweeps the logprobs forward; its backward is swept as PPO's backward
            pass_ = "bwd" if "bwd" in kname else "fwd"
            nbytes = pass_bytes(op, pass_, f"{N}x{V}", str(dtype)[6:], ref=True)["bytes"]
            default = (la["kwargs"]["BLOCK_V"], la["kwargs"]["num_warps"], la["kwargs"].get("BLOCK_M", 1))
            tensors = _tensors(la)
            saved = [t.detach().clone() for t in tensors]  # inputs, and the outputs of the op's own (default) launch
            outs = _outputs(la, tensors, saved)
            if not outs:
                raise RuntimeError(f"{kname}: found no output tensor among its arguments")
            for bv, w, bm in dict.fromkeys([default] + list(candidates)):
                rec = {"op": op, "kernel": kname, "pass": pass_, "shape": f"{N}x{V}", "dtype": str(dtype)[6:],
                       "BLOCK_V": bv, "num_warps": w, "BLOCK_M": bm, "default": (bv, w, bm) == default}  # fmt: skip
                if time.perf_counter() > deadline:
                    records.append({**rec, "error": "skipped: sweep time budget spent"})
                    continue
                try:
                    fn = replay(la, bv, w, bm)
                    for i in outs:  # a candidate that skips rows or columns must not inherit the default's results
                        tensors[i].fill_(float("nan"))
                    fn()
                    ok = all(torch.allclose(tensors[i].float(), saved[i].float(), rtol=1e-3, atol=1e-5, equal_nan=True)
                             for i in outs)  # fmt: skip
                    t = time_fn(fn, device, **reps)
                    floor_ms = nbytes / peak_bps * 1e3
                    records.append({**rec, **t, "correct": ok, "gbps": nbytes / (t["median_ms"] * 1e-3) / 1e9,
                                    "fraction_of_bw_floor": floor_ms / t["median_ms"]})  # fmt: skip
                except Exception as e:  # a config that does not compile or launch is a data point, not a crash
                    records.append({**rec, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            for a, b in zip(tensors, saved):  # leave the buffers as the default launch wrote them
                a.copy_(b)
            del saved
    return records


def best(records):
    out = {}
    for r in records:
        if "error" in r or not r["correct"]:
            continue
        k = (r["kernel"], r["shape"], r["dtype"])
        if k not in out or r["median_ms"] < out[k]["median_ms"]:
            out[k] = r
    table = []
    for (kernel, shape, dtype), r in out.items():
        d = next(x for x in records if x["default"] and (x["kernel"], x["shape"], x["dtype"]) == (kernel, shape, dtype))
        table.append({"kernel": kernel, "shape": shape, "dtype": dtype, "best": [r["BLOCK_V"], r["num_warps"],
                      r["BLOCK_M"]], "best_ms": r["median_ms"], "default": [d["BLOCK_V"], d["num_warps"], d["BLOCK_M"]],
                      "default_ms": d.get("median_ms"), "speedup_vs_default": d["median_ms"] / r["median_ms"]
                      if "median_ms" in d else None, "fraction_of_bw_floor": r["fraction_of_bw_floor"]})  # fmt: skip
    return table


def markdown(payload) -> str:
    lines = [f"# fusedrl launch sweep: {payload['device']}, {payload['date']}", "",
             f"torch {payload['torch']}, triton {payload['triton']}, commit {payload['commit']}; floor basis: "
             f"{payload['bw_floor_basis']}. Vocabulary splitting for few rows: not implemented, not swept.", "",
             "## Best per kernel (correct candidates only)", "",
             "| kernel | shape | dtype | best (BLOCK_V, warps, BLOCK_M) | ms | default | ms | speedup | frac of floor |",
             "|" + "---|" * 9]  # fmt: skip
    f = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    for b in payload["best"]:
        lines.append(f"| {b['kernel']} | {b['shape']} | {b['dtype']} | {tuple(b['best'])} | {f(b['best_ms'])} | "
                     f"{tuple(b['default'])} | {f(b['default_ms'])} | {f(b['speedup_vs_default'])} | "
                     f"{f(b['fraction_of_bw_floor'])} |")  # fmt: skip
    lines += ["", "## Every candidate", "", "| kernel | shape | BLOCK_V | warps | BLOCK_M | ms | GB/s | frac of floor | "
              "correct |", "|" + "---|" * 9]  # fmt: skip
    for r in payload["records"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['BLOCK_V']} | {r['num_warps']} | {r['BLOCK_M']} | "
                         f"{r['error'][:60]} | | | |")  # fmt: skip
        else:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['BLOCK_V']} | {r['num_warps']} | {r['BLOCK_M']} | "
                         f"{f(r['median_ms'])} | {f(r['gbps'])} | {f(r['fraction_of_bw_floor'])} | "
                         f"{'yes' if r['correct'] else 'NO'}{' (default)' if r['default'] else ''} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and candidates (CPU, interpreter)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting candidates after this long")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cpu" and not args.quick:
        ap.error("the full sweep needs --device cuda; use --quick on CPU")
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    set_validation(False)
    if args.quick:
        shapes, dtype, cands, reps = [(16, 1000)], torch.float32, QUICK_CANDIDATES, {"warmup": 1, "rep": 2}
    else:
        shapes, dtype, cands, reps = [(8192, 128256), (8192, 151936)], torch.bfloat16, CANDIDATES, {}
    peak_bps, basis = peak_bandwidth(device_name(device)) if device == "cuda" else (None, None)
    if peak_bps is None:
        from bench.bench_logprobs import copy_bandwidth_gbps

        gbps = copy_bandwidth_gbps(device)
        peak_bps, basis = gbps * 1e9, f"measured copy {gbps:.1f} GB/s"
    records = []
    for op in ("logprobs", "ppo_loss"):
        for N, V in shapes:
            print(f"== {op} {N}x{V} {dtype}", flush=True)
            records += sweep_case(op, N, V, dtype, device, cands, peak_bps, deadline, reps)
            if device == "cuda":
                torch.cuda.empty_cache()
    env = environment(device)
    slug = "cpu"
    if device == "cuda":
        from bench.gpu_suite import gpu_slug

        slug = gpu_slug(env["device"])
    payload = {"device": env["device"], "torch": env["torch"], "triton": env["triton"], "commit": env["commit"],
               "date": env["date"], "quick": args.quick, "bw_floor_basis": basis, "candidates": cands,
               "wall_s": time.perf_counter() - t0, "best": best(records), "records": records}  # fmt: skip
    write_report(args.out, f"sweep-{slug}-{env['date']}", payload, markdown)
    print(f"in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
