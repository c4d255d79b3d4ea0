"""Benchmark the fused lm_head policy loss for each policy-loss variant of issue 13 against eager PyTorch and
Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss`` with the matching settings: forward + backward (the gradients
of hidden and weight), time and peak memory above the inputs, all providers in one process.

    python bench/bench_policy_variants.py           # CPU: B=8 x T=64 tokens, H=512, V=32000, fp32, one thread
    python bench/bench_policy_variants.py --gpu     # CUDA: B=16 x T=512 tokens, H=4096, V=151936, bf16

Providers: ``fused`` (``linear_ppo_loss``; backend torch on CPU, triton on CUDA), ``eager`` (``F.linear`` to the full
logits, then ``ppo_loss_ref``: ``linear_ppo_loss_ref``) and ``liger`` (compiled=False on CPU, compiled on CUDA; no
GSPO-token there). Each round runs every provider once, in an order rotated round by round, so that the load of
a shared machine drifts over all of them alike; times are medians over the rounds (wall-clock and, on CPU, this
process's CPU time). Peak memory is measured once per provider: the CUDA allocator's peak counter, or on CPU the
torch profiler's memory timeline (tensors only), above what was live before the call. The untimed warm-up call
also checks each provider's loss and gradients against eager's. Writes
bench/results/policy-variants-<cpu|cuda>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, environment, peak_memory_gb, write_report  # noqa: E402

from fusedrl.kernels import PPOLossConfig, linear_logprobs_ref, linear_ppo_loss, linear_ppo_loss_ref  # noqa: E402
from fusedrl.kernels import set_validation  # noqa: E402

PROVIDERS = ["fused", "eager", "liger"]
SHAPES = {
    "cpu": dict(B=8, T=64, H=512, V=32000, dtype="float32"),
    "gpu": dict(B=16, T=512, H=4096, V=151936, dtype="bfloat16"),
}
# Every variant shares a GRPO-style base: a k3 KL to the reference (TRL's / Liger's beta = 0.04), temperature 1.
BASE = dict(kl_coef=0.04, kl_estimator="k3", temperature=1.0)
DAPO = dict(clip_low=0.2, clip_high=0.28, agg="token-mean")
LIGER_DAPO = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
RHO_MAX = 2.0  # the rollout weight bound C of TIS and MIS
# name -> (PPOLossConfig fields, LigerFusedLinearGRPOLoss arguments or None where Liger has no equivalent, the
# rollout weights Liger is given as vllm_is_ratio: None, "tis" or "mis-sequence"). The mappings are those of
# tests/test_policy_variants.py::LIGER_CASES (token-mean = Liger's dapo normaliser, seq-mean-token-mean = grpo's).
VARIANTS = {
    "dapo": (DAPO, LIGER_DAPO, None),
    "gspo": (
        dict(importance_sampling_level="sequence", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"),
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
        None,
    ),
    "gspo-token": (
        dict(importance_sampling_level="sequence-token", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"),
        None,
        None,
    ),
    "cispo": (
        dict(policy_loss="cispo", clip_low=1.0, clip_high=4.0, agg="token-mean"),
        dict(loss_type="cispo", epsilon_high=5.0),
        None,
    ),
    "sapo": (dict(policy_loss="sapo", agg="seq-mean-token-mean"), dict(loss_type="sapo"), None),
    "delta": ({**DAPO, "clip_delta": 1.5}, {**LIGER_DAPO, "delta": 1.5}, None),
    "tis": ({**DAPO, "rollout_correction": "tis", "rollout_is_max": RHO_MAX}, LIGER_DAPO, "tis"),
    "mis-sequence": (
        {**DAPO, "rollout_correction": "mis", "rollout_correction_level": "sequence", "rollout_is_max": RHO_MAX},
        LIGER_DAPO,
        "mis-sequence",
    ),
    "kl-iw": ({**DAPO, "kl_importance_weighted": True}, {**LIGER_DAPO, "use_bias_correction_kl": True}, None),
}


def make_batch(B, T, H, V, dtype, device, seed=0, noise=1.0):
    """Padded (B, T) sequences of 3/4 T to T scored tokens, one advantage per sequence; the old, reference and
    rollout log-probs are the current policy's plus small noise (``noise`` times 0.02 / 0.05 / 0.02 nats), so that
    ratios, clips and rollout weights sit where a training step finds them."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: the GPU weight is 0.6 G values
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    hidden = rnd(B, T, H).to(dtype)
    weight = (rnd(V, H) / H**0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g, device=device)
    lengths = torch.randint(3 * T // 4, T + 1, (B,), generator=g, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (B, T) bool
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        logp = linear_logprobs_ref(hidden, weight, labels).float()  # (B, T); 0 where ignored
    old = logp + 0.02 * noise * rnd(B, T)
    return {"hidden": hidden, "weight": weight, "ids": ids, "labels": labels, "mask": mask,
            "advantages": rnd(B), "old_logp": old, "ref_logp": logp + 0.05 * noise * rnd(B, T),
            "rollout_logp": old + 0.02 * noise * rnd(B, T)}  # fmt: skip


def liger_is_ratio(batch, kind):
    """What Liger's vllm_is_ratio must be to apply fusedrl's rollout correction: TIS's truncated token weights
    (B, T), or MIS-sequence's per-sequence weight (B, 1), zero outside [1 / C, C]."""
    if kind is None:
        return None
    d = torch.where(batch["mask"], batch["old_logp"] - batch["rollout_logp"], 0.0)
    if kind == "tis":
        return d.exp().clamp(max=RHO_MAX)
    w = d.sum(1, keepdim=True).exp()
    return torch.where((w < 1 / RHO_MAX) | (w > RHO_MAX), 0.0, w)


def loss_fn(provider, variant, batch, device):
    """fn(hidden, weight) -> the scalar loss of ``provider`` under ``variant``; None where it has no equivalent."""
    ours_kw, liger_kw, is_kind = VARIANTS[variant]
    if provider in ("fused", "eager"):
        config = PPOLossConfig(**BASE, **ours_kw)
        B, T = batch["labels"].shape
        args = (batch["labels"], batch["old_logp"], batch["advantages"][:, None].expand(B, T), batch["mask"])
        kw = dict(ref_logp=batch["ref_logp"], config=config,
                  rollout_logp=batch["rollout_logp"] if is_kind else None)  # fmt: skip
        if provider == "eager":
            return lambda h, w: linear_ppo_loss_ref(h, w, *args, **kw)[0]
        backend = "triton" if device == "cuda" else "torch"
        return lambda h, w: linear_ppo_loss(h, w, *args, **kw, backend=backend)[0]
    if provider != "liger":
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if liger_kw is None:
        return None
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=BASE["kl_coef"], compiled=device == "cuda", use_ref_model=True,
                                    temperature=BASE["temperature"], **liger_kw)  # fmt: skip
    is_ratio = liger_is_ratio(batch, is_kind)
    mask = batch["mask"].long()

    def liger(h, w):
        out = loss(h, w, batch["ids"], mask, batch["advantages"], ref_per_token_logps=batch["ref_logp"],
                   old_per_token_logps=batch["old_logp"], vllm_is_ratio=is_ratio)  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    return liger


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step(fn, batch):
    """One forward + backward from fresh leaves: (loss, d hidden, d weight)."""
    h = batch["hidden"].detach().requires_grad_(True)
    w = batch["weight"].detach().requires_grad_(True)
    loss = fn(h, w)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def _rel_err(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30))


def bench_variant(variant, batch, device, rounds, warmup):
    """Records of every provider for one variant: timed in interleaved rounds, then each one's peak memory."""
    fns, errors, checks = {}, {}, {}
    for p in PROVIDERS:
        try:
            fn = loss_fn(p, variant, batch, device)
        except ImportError as e:
            errors[p] = f"not installed: {e}"
            continue
        if fn is None:
            errors[p] = "no equivalent setting"
            continue
        fns[p] = fn
    outs = {}
    for p, fn in list(fns.items()):  # warm-up, and the agreement check against eager on its first call
        try:
            for i in range(warmup):
                out = step(fn, batch)
                if i == 0:
                    outs[p] = out  # on the device: freed before the timed rounds
                del out
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            errors[p] = f"{type(e).__name__}: {str(e)[:200]}"
            del fns[p]
    if "eager" in outs:
        for p, (loss, dh, dw) in outs.items():
            ref = outs["eager"]
            checks[p] = {"loss": float(loss), "loss_rel_err": _rel_err(loss, ref[0]),
                         "dh_rel_err": _rel_err(dh, ref[1]), "dw_rel_err": _rel_err(dw, ref[2])}  # fmt: skip
    del outs
    wall = {p: [] for p in fns}
    cpu = {p: [] for p in fns}
    loads = [os.getloadavg()[0]]
    names = list(fns)
    for r in range(rounds):
        for p in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            out = step(fns[p], batch)
            _sync(device)
            wall[p].append(time.perf_counter() - w0)
            cpu[p].append(time.process_time() - c0)
            del out
        loads.append(os.getloadavg()[0])
    mem = {p: peak_memory_gb(lambda: step(fns[p], batch), device) for p in names}
    B, T, H = batch["hidden"].shape
    V = batch["weight"].shape[0]
    records = []
    for p in PROVIDERS:
        rec = {"variant": variant, "provider": p}
        if p in errors:
            records.append({**rec, "error": errors[p]})
            continue
        med = statistics.median(wall[p])
        rec.update({"median_ms": med * 1e3, "min_ms": min(wall[p]) * 1e3, "max_ms": max(wall[p]) * 1e3,
                    "cpu_median_ms": statistics.median(cpu[p]) * 1e3, "rounds": len(wall[p]),
                    "tflops": 6 * B * T * H * V / med / 1e12, "peak_mem_mb": mem[p] * 2**30 / 1e6,
                    **checks.get(p, {}), "load_avg_1min": [min(loads), max(loads)]})  # fmt: skip
        records.append(rec)
    add_ratios(records)
    return records


def add_ratios(records):
    """On each variant's fused row: fused / eager and fused / Liger, for wall time, CPU time and peak memory
    (below 1 = fused is faster / smaller)."""
    by = {(r["variant"], r["provider"]): r for r in records if "error" not in r}
    for (variant, p), ours in by.items():
        if p != "fused":
            continue
        for other in ("eager", "liger"):
            base = by.get((variant, other))
            if base is None:
                continue
            ours[f"time_vs_{other}"] = ours["median_ms"] / base["median_ms"]
            ours[f"cpu_time_vs_{other}"] = ours["cpu_median_ms"] / base["cpu_median_ms"]
            if base["peak_mem_mb"] > 0:
                ours[f"mem_vs_{other}"] = ours["peak_mem_mb"] / base["peak_mem_mb"]


def markdown(payload):
    """The .md report of a run, from its JSON payload alone (``--render`` redoes it from a saved file)."""
    s, v, records = payload["shape"], payload["versions"], payload["records"]
    cuda = not payload["device"].startswith("cpu")
    loads = [x for r in records for x in r.get("load_avg_1min", [])]
    head = (f"Fused lm_head policy loss per variant, forward + backward (d hidden, d weight): B={s['B']} x T={s['T']} "
            f"(N={s['N']}, {payload['scored_tokens']} scored), H={s['H']}, V={s['V']}, {s['dtype']}. "
            f"{payload['device']}, {payload['threads']} thread(s), torch {payload['torch']}, triton {payload['triton']}, "
            f"liger-kernel {v['liger-kernel']}, commit {payload['commit']}, {payload['date']}. Median of "
            f"{payload['rounds']} rounds; each round runs every provider once in one process, the order rotated round "
            f"by round, so that the load of the shared machine (1-min load average {min(loads, default=0):.1f}-"
            f"{max(loads, default=0):.1f}) falls on all alike; CPU time is this process's, which other processes' "
            f"load disturbs less than wall time. Peak memory: "
            f"{'the CUDA allocator peak' if cuda else 'the torch profiler memory timeline (tensors)'} above the inputs, "
            f"gradients included. Ratios are fused / other: below 1 favours fused.")  # fmt: skip
    lines = [head, "", "| variant | provider | time (median) | CPU time | peak mem | max rel. err vs eager (loss / dW) "
             "| fused / eager (time, CPU time, mem) | fused / Liger (time, CPU time, mem) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def ratios(r, other):
        if f"time_vs_{other}" not in r:
            return ""
        mem = r.get(f"mem_vs_{other}", float("nan"))
        return f"{r[f'time_vs_{other}']:.2f}x, {r[f'cpu_time_vs_{other}']:.2f}x, {mem:.2f}x"

    for r in records:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['provider']} | n/a: {r['error']} | | | | | |")
            continue
        err = f"{r['loss_rel_err']:.1e} / {r['dw_rel_err']:.1e}" if "loss_rel_err" in r else ""
        lines.append(f"| {r['variant']} | {r['provider']} | {r['median_ms']:.0f} ms | {r['cpu_median_ms']:.0f} ms | "
                     f"{r['peak_mem_mb']:.0f} MB | {err} | {ratios(r, 'eager')} | {ratios(r, 'liger')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _versions():
    out = {}
    for dist in ("liger-kernel", "trl", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", "--full", dest="gpu", action="store_true", help="the CUDA shape (H100 / H200)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--shape", default="", help="override, e.g. B=2,T=8,H=16,V=64,dtype=float32")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 on CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per provider (default 1 / 3)")
    ap.add_argument("--noise", type=float, default=1.0, help="scale of the log-prob noise (tests: bounds bind)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the .md")
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the .md of this saved JSON")
    args = ap.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(payload))
        return payload
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; none is visible")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected a subset of {list(VARIANTS)}")
    shape = dict(SHAPES["gpu" if args.gpu else "cpu"])
    for item in filter(None, args.shape.split(",")):
        key, _, value = item.partition("=")
        if key not in shape:
            raise SystemExit(f"--shape: unknown field {key!r}; expected some of {list(shape)}")
        shape[key] = value if key == "dtype" else int(value)
    rounds = args.rounds or (10 if args.gpu else 5)
    warmup = max(1, args.warmup or (3 if args.gpu else 1))
    if device == "cpu":
        torch.set_num_threads(args.threads)
    set_validation(False)  # steady-state training step: no label range check
    batch = make_batch(shape["B"], shape["T"], shape["H"], shape["V"], getattr(torch, shape["dtype"]), device,
                       noise=args.noise)  # fmt: skip
    records = []
    for v in variants:
        t0 = time.perf_counter()
        rows = bench_variant(v, batch, device, rounds, warmup)
        records += rows
        summary = ", ".join(f"{r['provider']} {r['median_ms']:.0f} ms / {r['peak_mem_mb']:.0f} MB"
                            for r in rows if "error" not in r)  # fmt: skip
        print(f"{v}: {summary} ({time.perf_counter() - t0:.0f} s)", flush=True)
    env = environment(device)
    payload = {**env, "versions": _versions(), "shape": {**shape, "N": shape["B"] * shape["T"]},
               "scored_tokens": int(batch["mask"].sum()), "noise": args.noise, "rounds": rounds, "warmup": warmup,
               "base_config": BASE, "variants": {k: {"fusedrl": a, "liger": b, "liger_is_ratio": c}
                                                 for k, (a, b, c) in VARIANTS.items() if k in variants},
               "records": records}  # fmt: skip
    write_report(args.out, f"policy-variants-{device}-{env['date']}", payload, markdown)
    return payload


if __name__ == "__main__":
    main()
