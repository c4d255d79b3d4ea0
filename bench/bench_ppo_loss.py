"""Benchmark fusedrl.kernels.ppo_loss (forward, backward, both) against the PyTorch reference in eager mode,
torch.compile of the same and Liger-Kernel's GRPO loss when installed; and linear_ppo_loss against an eager
lm_head followed by the reference.

    python bench/bench_ppo_loss.py                     # GPU if present: N=8192, V=128256 / 151936, H=4096, bf16
    python bench/bench_ppo_loss.py --quick             # small CPU shapes (N=512, V=32000, H=256, fp32)
    pytest bench/bench_ppo_loss.py --benchmark-enable  # the same providers through pytest-benchmark

Writes bench/results/ppo_loss-<cpu|cuda>.json: one record per (op, shape, provider, pass) with median/p20/p80
ms, achieved GB/s (logits path: the bytes the op must move at minimum, 1 read forward, 1 read + 1 write
backward) or TFLOP/s (lm_head path: the three N x H x V matmuls), and peak memory.

    python bench/bench_ppo_loss.py --side-by-side      # CPU, linear loss N=1024, H=896 / 2048, V=151936, fp32

runs fusedrl's torch path, the eager lm_head + reference and Liger's LigerFusedLinearGRPOLoss (its chunked torch
path, compiled=False, when installed) each in its own one-thread process, interleaved, and writes
bench/results/torch-path-linear-loss-cpu-<date>.json / .md with times, peak RSS above the inputs and ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import peak_memory_gb, time_fn, write_results  # noqa: E402

from fusedrl.kernels import (  # noqa: E402
    PPOLossConfig,
    linear_ppo_loss,
    linear_ppo_loss_ref,
    ppo_loss,
    ppo_loss_ref,
    set_validation,
)

# What a GRPO / DAPO run typically sets: clip-higher, a small k3 KL to the reference, token-mean.
CONFIG = PPOLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.04, kl_estimator="k3", temperature=1.0)


def make_inputs(N, V, dtype, device, H=None):
    """Per-token tensors for N tokens; logits (N, V) or, with H, hidden (N, H) and weight (V, H)."""
    torch.manual_seed(0)
    x = {
        "labels": torch.randint(0, V, (N,), device=device),
        "old_logp": -torch.rand(N, device=device) * 5,
        "ref_logp": -torch.rand(N, device=device) * 5,
        "advantages": torch.randn(N, device=device),
        "mask": torch.rand(N, device=device) > 0.1,
    }
    if H is None:
        x["logits"] = (torch.randn(N, V, device=device) * 2).to(dtype)
    else:
        x["hidden"] = torch.randn(N, H, device=device).to(dtype)
        x["weight"] = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
    return x


def logits_providers(device: str):
    """name -> fn(logits, inputs) returning the scalar loss."""

    def fused(inplace):
        return lambda x, d: ppo_loss(x, d["labels"], d["old_logp"], d["advantages"], d["mask"],
                                     ref_logp=d["ref_logp"], config=CONFIG, inplace_backward=inplace)[0]  # fmt: skip

    def reference(x, d):
        return ppo_loss_ref(x, d["labels"], d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"],
                            config=CONFIG)[0]  # fmt: skip

    ps = {"fusedrl": fused(False), "fusedrl-inplace": fused(True), "eager": reference,
          "compile": torch.compile(reference, dynamic=False)}  # fmt: skip
    try:  # Liger's logits-level GRPO loss: (B, L + 1, V) logits, per-sequence advantages
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        if device == "cuda":

            def liger(x, d):
                B = 8
                L = x.shape[0] // B
                logits = torch.nn.functional.pad(x.view(B, L, -1), (0, 0, 0, 1))  # the extra last position
                mask = d["mask"].view(B, L).float()
                out = triton_grpo_loss(logits, d["old_logp"].view(B, L), d["ref_logp"].view(B, L),
                                       d["labels"].view(B, L), d["advantages"].view(B, L)[:, 0], mask,
                                       CONFIG.temperature, CONFIG.kl_coef, CONFIG.clip_low, CONFIG.clip_high,
                                       True)  # fmt: skip
                out = out[0] if isinstance(out, tuple) else out
                return out if out.dim() == 0 else (out * mask).sum() / mask.sum()

            ps["liger"] = liger
    except ImportError:
        pass
    return ps


def linear_providers():
    def fused(h, w, d):
        return linear_ppo_loss(h, w, d["labels"], d["old_logp"], d["advantages"], d["mask"],
                               ref_logp=d["ref_logp"], config=CONFIG)[0]  # fmt: skip

    def eager(h, w, d):  # lm_head, then the reference on the full logits
        return linear_ppo_loss_ref(h, w, d["labels"], d["old_logp"], d["advantages"], d["mask"],
                                   ref_logp=d["ref_logp"], config=CONFIG)[0]  # fmt: skip

    def eager_head_fused_loss(h, w, d):  # lm_head materialised, then the fused logits-level loss
        logits = h @ w.t()
        return ppo_loss(logits, d["labels"], d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"],
                        config=CONFIG, inplace_backward=True)[0]  # fmt: skip

    return {"fusedrl": fused, "eager": eager, "eager-head+fused-loss": eager_head_fused_loss}


def _measure(records, device, common, passes):
    for pass_, call, work in passes:
        try:
            t = time_fn(call, device)
            mem = peak_memory_gb(call, device)
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            print(f"  {common['provider']} {pass_}: {type(e).__name__}: {str(e)[:160]}")
            continue
        rec = {**common, "pass": pass_, **t, "peak_mem_gb": mem}
        key, amount = work
        rec[key] = amount / (t["median_ms"] * 1e-3) / (1e9 if key == "gbps" else 1e12)
        records.append(rec)


def bench_logits(N, V, dtype, device):
    d = make_inputs(N, V, dtype, device)
    bytes_ = N * V * d["logits"].element_size()
    records = []
    for name, fn in logits_providers(device).items():
        x = d["logits"].clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return fn(x, d)

        def full():
            (g,) = torch.autograd.grad(fn(x, d), x)
            return g

        try:
            out = fn(x, d)
        except Exception as e:
            print(f"  {name}: {type(e).__name__}: {str(e)[:160]}")
            continue

        def bwd():
            return torch.autograd.grad(out, x, retain_graph=True)

        common = {"op": "ppo_loss", "shape": f"{N}x{V}", "dtype": str(dtype).replace("torch.", ""), "provider": name}
        _measure(records, device, common, [("fwd", fwd, ("gbps", bytes_)), ("bwd", bwd, ("gbps", 2 * bytes_)),
                                           ("full", full, ("gbps", 3 * bytes_))])  # fmt: skip
    return records


def bench_linear(N, V, H, dtype, device):
    d = make_inputs(N, V, dtype, device, H=H)
    flops = 2 * N * H * V
    records = []
    for name, fn in linear_providers().items():
        h = d["hidden"].clone().requires_grad_(True)
        w = d["weight"].clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return fn(h, w, d)

        def full():
            return torch.autograd.grad(fn(h, w, d), (h, w))

        common = {"op": "linear_ppo_loss", "shape": f"{N}x{H}x{V}", "dtype": str(dtype).replace("torch.", ""),
                  "provider": name}  # fmt: skip
        # fusedrl does its matmuls for the gradients in forward; count the full step for everyone.
        _measure(records, device, common, [("fwd", fwd, ("tflops", flops)), ("full", full, ("tflops", 3 * flops))])
    return records


# ----------------------------------------------------------------------------- CPU side by side (issue 16)
SIDE_PROVIDERS = ["fusedrl", "eager", "liger"]
SIDE_SEQS = 8  # Liger takes (B, T) sequences with one advantage each: N = 1024 tokens as 8 x 128


def _side_fn(provider, d):
    args = (d["labels"], d["old_logp"], d["advantages"], d["mask"])
    if provider == "fusedrl":
        return lambda h, w: linear_ppo_loss(h, w, *args, ref_logp=d["ref_logp"], config=CONFIG, backend="torch")[0]
    if provider == "eager":
        return lambda h, w: linear_ppo_loss_ref(h, w, *args, ref_logp=d["ref_logp"], config=CONFIG)[0]
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # loss_type="dapo" normalises by the batch's unmasked tokens: our token-mean.
        loss = LigerFusedLinearGRPOLoss(beta=CONFIG.kl_coef, compiled=False, epsilon_low=CONFIG.clip_low,
                                        epsilon_high=CONFIG.clip_high, loss_type="dapo", temperature=1.0)  # fmt: skip
        B = SIDE_SEQS
        bt = lambda t: t.view(B, -1)  # noqa: E731

        def liger(h, w):
            out = loss(h.view(B, -1, h.shape[-1]), w, bt(d["labels"]), bt(d["mask"]).long(),
                       bt(d["advantages"])[:, 0].contiguous(), ref_per_token_logps=bt(d["ref_logp"]),
                       old_per_token_logps=bt(d["old_logp"]))  # fmt: skip
            return out[0] if isinstance(out, tuple) else out

        return liger
    raise ValueError(f"unknown provider {provider!r}")


def side_measure(provider, case, mode, reps):
    """fwd + bwd of one provider: the loss's gradients w.r.t. hidden and weight, kept until measured."""
    from bench.common import child_peak_rss, child_times

    set_validation(False)
    d = make_inputs(case["N"], case["V"], getattr(torch, case["dtype"]), "cpu", H=case["H"])
    fn = _side_fn(provider, d)

    def call():
        h = d["hidden"].detach().requires_grad_(True)
        w = d["weight"].detach().requires_grad_(True)
        return torch.autograd.grad(fn(h, w), (h, w))

    # warmup=0 for these multi-second calls (nothing lazy to initialise; every provider alike).
    warmup = case.get("warmup", 1)
    if mode == "mem":
        for _ in range(warmup):
            call()
        return {"extra_rss": child_peak_rss(call)}
    return child_times(call, reps, warmup)


def side_by_side_main(args):
    from bench.common import side_by_side, write_side_by_side

    cases = [{"op": "linear_ppo_loss", "N": 1024, "H": int(H), "V": 151936, "dtype": "float32",
              "warmup": args.warmup} for H in args.H.split(",")]  # fmt: skip
    providers = args.providers.split(",") if args.providers else SIDE_PROVIDERS
    records = side_by_side(Path(__file__), cases, providers, repeats=args.repeats, reps=args.reps)
    tag = "-H" + "-".join(args.H.split(","))
    write_side_by_side("torch-path-linear-loss-cpu" + tag, records, ["op", "N", "H", "V", "dtype"],
                       extra={"pass": "fwd+bwd", "config": repr(CONFIG), "mask_fraction_scored": 0.9})  # fmt: skip


def add_speedups(records):
    base = {(r["op"], r["shape"], r["pass"]): r["median_ms"] for r in records if r["provider"] == "eager"}
    for r in records:
        key = (r["op"], r["shape"], r["pass"])
        if key in base:
            r["speedup"] = base[key] / r["median_ms"]


def check_correct(device):
    d = make_inputs(64, 1000, torch.float32, device)
    args = (d["labels"], d["old_logp"], d["advantages"], d["mask"])
    got = ppo_loss(d["logits"], *args, ref_logp=d["ref_logp"], config=CONFIG)[0]
    want = ppo_loss_ref(d["logits"].double(), *args, ref_logp=d["ref_logp"], config=CONFIG)[0]
    assert abs(float(got) - float(want)) < 1e-4, f"fusedrl ppo_loss disagrees with the reference: {got} vs {want}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU / smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--side-by-side", action="store_true", help="CPU: one process per provider (issue 16)")
    ap.add_argument("--providers", default="", help="comma-separated, for --side-by-side")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of --side-by-side (one process each)")
    ap.add_argument("--reps", type=int, default=1, help="timed calls per process")
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls per process before them")
    ap.add_argument("--H", default="896,2048", help="hidden sizes for --side-by-side")
    args = ap.parse_args(argv)
    if args.side_by_side:
        return side_by_side_main(args)
    device = args.device
    check_correct(device)
    set_validation(False)  # steady-state training loop: no label range check (a host sync on GPU)
    if device == "cuda" and not args.quick:
        logit_cases = [(8192, 128256, torch.bfloat16), (8192, 151936, torch.bfloat16)]
        linear_cases = [(8192, 128256, 4096, torch.bfloat16), (8192, 151936, 4096, torch.bfloat16)]
    else:
        logit_cases = [(512, 32000, torch.float32)]
        linear_cases = [(512, 32000, 256, torch.float32)]
    records = []
    for N, V, dt in logit_cases:
        print(f"ppo_loss N={N} V={V} {dt}")
        records += bench_logits(N, V, dt, device)
    for N, V, H, dt in linear_cases:
        print(f"linear_ppo_loss N={N} V={V} H={H} {dt}")
        records += bench_linear(N, V, H, dt, device)
    add_speedups(records)
    write_results("ppo_loss", device, records, extra={"config": repr(CONFIG)})


# ----------------------------------------------------------------------------- pytest-benchmark entry
def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _bench_logits(benchmark, provider):
    import pytest

    device = _device()
    N, V, dt = (8192, 128256, torch.bfloat16) if device == "cuda" else (256, 32000, torch.float32)
    fn = logits_providers(device).get(provider)
    if fn is None:
        pytest.skip(f"{provider} not available on {device}")
    d = make_inputs(N, V, dt, device)
    x = d["logits"].requires_grad_(True)

    def full():
        torch.autograd.grad(fn(x, d), x)
        _sync(device)

    benchmark(full)


def _bench_linear(benchmark, provider):
    device = _device()
    N, V, H, dt = (8192, 128256, 4096, torch.bfloat16) if device == "cuda" else (256, 32000, 256, torch.float32)
    fn = linear_providers()[provider]
    d = make_inputs(N, V, dt, device, H=H)
    h, w = d["hidden"].requires_grad_(True), d["weight"].requires_grad_(True)

    def full():
        torch.autograd.grad(fn(h, w, d), (h, w))
        _sync(device)

    benchmark(full)


def test_ppo_loss_full_fusedrl(benchmark):
    _bench_logits(benchmark, "fusedrl")


def test_ppo_loss_full_eager(benchmark):
    _bench_logits(benchmark, "eager")


def test_ppo_loss_full_liger(benchmark):
    _bench_logits(benchmark, "liger")


def test_linear_ppo_loss_full_fusedrl(benchmark):
    _bench_linear(benchmark, "fusedrl")


def test_linear_ppo_loss_full_eager(benchmark):
    _bench_linear(benchmark, "eager")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        from bench.common import child_main

        child_main(side_measure, sys.argv[2:])
    else:
        main()
