"""GAE over packed sequences: the Triton kernel against the PyTorch reference (GPU), and the reference
against a per-timestep Python loop (CPU).

    python bench/bench_gae.py [--device auto|cuda|cpu]        # table + bench/results/gae-<device>.json
    pytest bench/bench_gae.py --benchmark-enable              # the same op under pytest-benchmark

GAE is memory-bound: each token reads a reward and a value (the value twice, once as V_{t+1}, which the
cache absorbs) and writes an advantage and a return, so GB/s is counted on those bytes and compared with
a measured device-to-device copy.
"""

from __future__ import annotations

import argparse

import torch

from fusedrl.kernels import gae, gae_ref

if __package__:  # pytest, or python -m bench.bench_gae
    from .common import peak_memory_gb, time_fn, write_results
else:  # python bench/bench_gae.py: bench/ itself is on sys.path (the repo root is not: see Makefile)
    from common import peak_memory_gb, time_fn, write_results

GPU_SHAPE = (256, 2048)  # sequences x tokens per sequence
CPU_SHAPE = (64, 512)
GAMMA, LAM = 1.0, 0.95


def gae_python_loop(rewards, values, cu_seqlens, gamma, lam):
    """The per-timestep textbook loop in Python floats: the baseline a reader would write first."""
    r, v, cu = rewards.tolist(), values.tolist(), cu_seqlens.tolist()
    adv = [0.0] * len(r)
    for b in range(len(cu) - 1):
        next_adv, next_value = 0.0, 0.0
        for t in range(cu[b + 1] - 1, cu[b] - 1, -1):
            next_adv = r[t] + gamma * next_value - v[t] + gamma * lam * next_adv
            next_value = v[t]
            adv[t] = next_adv
    adv_t = torch.tensor(adv)
    return adv_t, adv_t + values


def make_batch(n_seq, seq_len, dtype, device, *, ragged=False):
    """Packed rewards / values / cu_seqlens; ``ragged`` draws lengths in [1, 2 * seq_len) instead."""
    g = torch.Generator().manual_seed(0)
    if ragged:
        lengths = torch.randint(1, 2 * seq_len, (n_seq,), generator=g)
    else:
        lengths = torch.full((n_seq,), seq_len)
    cu = torch.zeros(n_seq + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    n = int(cu[-1])
    rewards = torch.randn(n, generator=g).to(dtype)
    values = (torch.randn(n, generator=g) * 2).to(dtype)
    return rewards.to(device), values.to(device), cu.to(device)


def copy_bandwidth_gbps(device) -> float:
    """Measured device-to-device copy rate (bytes read + written), the ceiling for a memory-bound op."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_fn(lambda: y.copy_(x), device)["median_ms"]
    return 2 * x.numel() / ms / 1e6


def run(device: str) -> list[dict]:
    records = []
    if device == "cuda":
        peak = copy_bandwidth_gbps(device)
        for ragged in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                r, v, cu = make_batch(*GPU_SHAPE, dtype, device, ragged=ragged)
                n = r.numel()
                nbytes = n * (2 * dtype.itemsize + 2 * 4) + cu.numel() * cu.element_size()
                shape = f"{GPU_SHAPE[0]}x{GPU_SHAPE[1]}" + (" ragged" if ragged else "")
                providers = {
                    "triton": lambda: gae(r, v, cu, gamma=GAMMA, lam=LAM, backend="triton"),
                    "torch-ref": lambda: gae_ref(r, v, cu, gamma=GAMMA, lam=LAM),
                }
                case = []
                for name, fn in providers.items():
                    t = time_fn(fn, device)
                    gbps = nbytes / t["median_ms"] / 1e6
                    case.append({
                        "op": "gae", "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                        "provider": name, "pass": "forward", **t, "gbps": gbps, "frac_of_peak": gbps / peak,
                        "peak_mem_gb": peak_memory_gb(fn, device),
                    })  # fmt: skip
                ref_ms = case[-1]["median_ms"]  # speedup over the torch reference of the same case
                for rec in case:
                    rec["speedup"] = ref_ms / rec["median_ms"]
                records += case
        return records

    # Both providers single-threaded: the Python loop is, and on a small shared machine OpenMP wake-ups
    # for tensors of a few thousand elements cost more than the work.
    torch.set_num_threads(1)
    r, v, cu = make_batch(*CPU_SHAPE, torch.float32, device)
    providers = {
        "torch-ref": lambda: gae_ref(r, v, cu, gamma=GAMMA, lam=LAM),
        "python-loop": lambda: gae_python_loop(r, v, cu, GAMMA, LAM),
    }
    for name, fn in providers.items():
        t = time_fn(fn, device, warmup=1, rep=5)
        records.append({
            "op": "gae", "shape": f"{CPU_SHAPE[0]}x{CPU_SHAPE[1]}", "dtype": "float32", "provider": name,
            "pass": "forward", **t,
        })  # fmt: skip
    loop_ms = records[-1]["median_ms"]
    for rec in records:
        rec["speedup"] = loop_ms / rec["median_ms"]
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    records = run(device)
    write_results("gae", device, records, extra={"gamma": GAMMA, "lam": LAM})


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark entry point
# ----------------------------------------------------------------------------------------------------
def test_gae_benchmark(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    r, v, cu = make_batch(*shape, torch.float32, device)
    backend = "triton" if device == "cuda" else "torch"

    def step():
        out = gae(r, v, cu, gamma=GAMMA, lam=LAM, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    adv, ret = benchmark(step)
    adv_ref, _ = gae_ref(r, v, cu, gamma=GAMMA, lam=LAM)
    err = (adv - adv_ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, adv_ref.abs().max().item()), f"GAE max error {err:.3e} against gae_ref"


if __name__ == "__main__":
    main()
