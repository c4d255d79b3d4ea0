"""Benchmark fusedrl.kernels.logprobs (forward, backward, both) against PyTorch eager, torch.compile of the
same, TRL's per-row loop (selective_log_softmax style) and Liger-Kernel when installed.

    python bench/bench_logprobs.py                 # GPU if present: N=8192, V=128256 / 151936, bf16
    python bench/bench_logprobs.py --quick         # small CPU shapes
    pytest bench/bench_logprobs.py --benchmark-enable   # the same providers through pytest-benchmark

Writes bench/results/logprobs-<cpu|cuda>.json: one record per (shape, provider, pass) with median/p20/p80 ms,
achieved GB/s (bytes the op must move at minimum), fraction of the measured copy bandwidth and peak memory.

    python bench/bench_logprobs.py --side-by-side      # CPU, N=1024, V=151936, bf16 and fp32, fwd+bwd

runs fusedrl's torch path (native CPU loops; ``fusedrl-ops``: its chunked torch ops), TRL's
selective_log_softmax, eager log_softmax(x.float()).gather (and, with --providers ...,compile, torch.compile
of it) each in its own one-thread process, interleaved, and writes
bench/results/torch-path-logprobs-cpu-<date>.json / .md with times, peak RSS above the inputs and ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import peak_memory_gb, time_fn, write_results  # noqa: E402

from fusedrl.kernels import logprobs, logprobs_ref, set_validation  # noqa: E402


def eager(logits, labels):
    """What most trainers write: a full float32 log-softmax, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def row_loop(logits, labels):
    """TRL's selective_log_softmax for half precision: one row at a time to bound memory."""
    out = []
    for row_logits, row_labels in zip(logits, labels):
        lp = torch.log_softmax(row_logits.float(), dim=-1)
        out.append(lp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def providers(device: str):
    ps = {
        "fusedrl": lambda x, y: logprobs(x, y),
        "eager": eager,
        "compile": torch.compile(eager, dynamic=False),
        "loop": row_loop,
    }
    try:  # Liger has no log-prob op of its own; its fused cross-entropy returns -logp per token
        from liger_kernel.transformers.functional import liger_cross_entropy

        if device == "cuda":
            ps["liger"] = lambda x, y: -liger_cross_entropy(x, y, reduction="none")
    except ImportError:
        pass
    return ps


def copy_bandwidth_gbps(device: str) -> float:
    """Measured device copy bandwidth (read + write bytes per second) of a 1 GiB (GPU) / 256 MiB (CPU) copy."""
    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * n * 4 / (t * 1e-3) / 1e9


def bench_shape(N, V, dtype, device, copy_gbps, *, include_loop=True):
    records = []
    logits = (torch.randn(N, V, device=device) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    item = logits.element_size()
    # Minimum traffic: forward reads the logits once; backward reads them and writes the gradient.
    bytes_per_pass = {"fwd": N * V * item, "bwd": 2 * N * V * item, "full": 3 * N * V * item}
    for name, fn in providers(device).items():
        if name == "loop" and not include_loop:
            continue
        x = logits.detach().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return fn(x, labels)

        def full():
            x.grad = None
            (fn(x, labels) * g).sum().backward()

        out = fn(x, labels)

        def bwd():
            x.grad = None
            out.backward(g, retain_graph=True)

        for pass_, call in (("fwd", fwd), ("bwd", bwd), ("full", full)):
            try:
                t = time_fn(call, device)
                mem = peak_memory_gb(call, device)
            except Exception as e:  # a provider that cannot run this case is reported, not fatal
                print(f"  {name} {pass_}: {type(e).__name__}: {str(e)[:120]}")
                continue
            gbps = bytes_per_pass[pass_] / (t["median_ms"] * 1e-3) / 1e9
            records.append({
                "op": "logprobs", "shape": f"{N}x{V}", "dtype": str(dtype).replace("torch.", ""),
                "provider": name, "pass": pass_, **t, "gbps": gbps,
                "frac_of_peak": gbps / copy_gbps, "peak_mem_gb": mem,
            })  # fmt: skip

    # Speed-ups against eager, measured side by side in this run.
    base = {(r["shape"], r["pass"]): r["median_ms"] for r in records if r["provider"] == "eager"}
    for r in records:
        if (r["shape"], r["pass"]) in base:
            r["speedup"] = base[(r["shape"], r["pass"])] / r["median_ms"]
    return records


# ----------------------------------------------------------------------------- CPU side by side (issue 16)
SIDE_PROVIDERS = ["fusedrl", "fusedrl-ops", "trl", "eager"]


def _side_fn(provider):
    if provider == "fusedrl":
        return lambda x, y: logprobs(x, y, backend="torch")
    if provider == "fusedrl-ops":  # the torch path without its native CPU loops: the chunked torch ops
        from fusedrl.kernels import _rows

        _rows.native_cpu = False
        return lambda x, y: logprobs(x, y, backend="torch")
    if provider == "trl":
        from trl.trainer.utils import selective_log_softmax  # CPU tensors: its per-row torch path

        return selective_log_softmax
    if provider == "compile":
        return torch.compile(eager, dynamic=False)
    return {"eager": eager, "loop": row_loop}[provider]


def side_measure(provider, case, mode, reps):
    """fwd + bwd of one provider: d(sum g * logp)/dlogits, the (N, V) gradient kept until measured."""
    from bench.common import child_peak_rss, child_times

    set_validation(False)
    torch.manual_seed(0)
    N, V, dtype = case["N"], case["V"], getattr(torch, case["dtype"])
    logits = (torch.randn(N, V) * 2).to(dtype)
    labels = torch.randint(0, V, (N,))
    g = torch.randn(N)
    fn = _side_fn(provider)

    def call():
        x = logits.detach().requires_grad_(True)
        return torch.autograd.grad((fn(x, labels) * g).sum(), x)

    if mode == "mem":
        call()  # warm-up (lazy initialisation, compilation) outside the measurement
        return {"extra_rss": child_peak_rss(call)}
    return child_times(call, reps)


def side_by_side_main(args):
    from bench.common import side_by_side, write_side_by_side

    cases = [{"op": "logprobs", "N": 1024, "V": 151936, "dtype": dt} for dt in ("bfloat16", "float32")]
    providers = args.providers.split(",") if args.providers else SIDE_PROVIDERS
    records = side_by_side(Path(__file__), cases, providers, repeats=args.repeats, reps=args.reps)
    write_side_by_side("torch-path-logprobs-cpu", records, ["op", "N", "V", "dtype"],
                       extra={"pass": "fwd+bwd", "threads_per_provider": 1})  # fmt: skip


def check_correct(device):
    x = torch.randn(64, 1000, device=device)
    y = torch.randint(0, 1000, (64,), device=device)
    err = (logprobs(x, y) - logprobs_ref(x.double(), y)).abs().max().item()
    assert err < 1e-4, f"fusedrl logprobs disagrees with the reference by {err}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU / smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--side-by-side", action="store_true", help="CPU: one process per provider (issue 16)")
    ap.add_argument("--providers", default="", help="comma-separated, for --side-by-side")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of --side-by-side (one process each)")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per process, after one warm-up")
    args = ap.parse_args(argv)
    if args.side_by_side:
        return side_by_side_main(args)
    device = args.device
    check_correct(device)
    set_validation(False)  # steady-state training loop: no label range check (a host sync on GPU)
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"measured copy bandwidth: {copy_gbps:.1f} GB/s on {device}")
    if device == "cuda" and not args.quick:
        cases = [(8192, 128256, torch.bfloat16), (8192, 151936, torch.bfloat16), (8192, 32000, torch.float32)]
    else:
        cases = [(512, 32000, torch.float32), (256, 128256, torch.bfloat16)]
    records = []
    for N, V, dt in cases:
        print(f"N={N} V={V} {dt}")
        records += bench_shape(N, V, dt, device, copy_gbps, include_loop=(device == "cpu" or N <= 8192))
    write_results("logprobs", device, records, extra={"copy_gbps": copy_gbps})


# ----------------------------------------------------------------------------- pytest-benchmark entry
def _bench_case(benchmark, provider):
    import pytest

    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, V, dt = (8192, 128256, torch.bfloat16) if device == "cuda" else (256, 32000, torch.float32)
    fn = providers(device).get(provider)
    if fn is None:
        pytest.skip(f"{provider} not available on {device}")
    x = (torch.randn(N, V, device=device) * 2).to(dt).requires_grad_(True)
    y = torch.randint(0, V, (N,), device=device)

    def full():
        x.grad = None
        fn(x, y).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(full)


def test_logprobs_full_fusedrl(benchmark):
    _bench_case(benchmark, "fusedrl")


def test_logprobs_full_eager(benchmark):
    _bench_case(benchmark, "eager")


def test_logprobs_full_loop(benchmark):
    _bench_case(benchmark, "loop")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        from bench.common import child_main

        child_main(side_measure, sys.argv[2:])
    else:
        main()
