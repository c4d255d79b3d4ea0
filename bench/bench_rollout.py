"""Rollout backends side by side: generated tokens/s and peak memory of hf (plain generate), hf-paged
(transformers continuous batching) and vllm (colocated vLLM), same model, same prompts, same sampling.

    python bench/bench_rollout.py                  # CPU, 3 interleaved rounds, both workloads
    python bench/bench_rollout.py --quick          # 1 round, a smaller batch (smoke test)
    python bench/bench_rollout.py --vllm-python .venv-vllm/bin/python   # where vllm is installed (default: that)
    python bench/bench_rollout.py --e2e            # whole GRPO steps of the trainer per backend (16 x 4 x 64)
    python bench/bench_rollout.py --e2e --backends vllm,vllm-lora-adapter,vllm-lora-merged,vllm-ddp2,vllm-fsdp2
                                                   # the vllm backend with LoRA (r = 16, every linear layer; the
                                                   # adapter alone pushed or merged weights) and on 2 torchrun
                                                   # ranks (DDP / FSDP2, 1 thread each, the same 16 x 4 prompts)

Model: a random ~6M-parameter Llama (V=8192, 4 layers, hidden 256, head_dim 64) in fp32 (``--dtype bfloat16``
too). Workload: 16 prompts of 16-64 tokens x 4 samples each (a GRPO step's 64 sequences, each prompt sent once
with n = 4), up to 128 new tokens at temperature 1:
- ``long-tail``: 1 token in 48 is a stop id, so lengths are geometric (mean ~40, a tail up to 128): where
  left-padded generate wastes most;
- ``fixed``: no stop id, every response is 128 tokens.

Each (round, backend) runs in its own process (vllm's with the interpreter of the environment it is installed
in), backends rotated round by round so that load drift on a shared machine does not become a ratio. In its
process a backend makes one untimed call (engine construction, vLLM's sampler compile), then ``--reps`` timed
calls per workload. Memory: the process's peak RSS (VmHWM) above its RSS after building the model, so vLLM's
preallocated KV cache counts. Writes bench/results/rollout-cpu.json (--e2e: rollout_e2e_grpo-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("hf", "hf-paged", "vllm")
# The vllm backend's configurations (--e2e only): a LoRA policy by either weight sync, several ranks.
VLLM_VARIANTS = {"vllm-lora-adapter": {"lora": "adapter"}, "vllm-lora-merged": {"lora": "merged"},
                 "vllm-ddp2": {"ranks": 2}, "vllm-fsdp2": {"ranks": 2, "fsdp": True}}  # fmt: skip
WORKLOADS = ("long-tail", "fixed")


def _rss_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def child(backend: str, setting: dict) -> dict:
    """One backend in this process: build, warm up, time each workload."""
    import torch

    torch.set_num_threads(setting["threads"])
    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.rollout_backends import SamplingSpec, make_rollout_backend

    if setting.get("e2e"):
        return child_e2e(backend, setting)
    vocab = setting["vocab"]
    model = build_causal_lm("small-llama", vocab_size=vocab, seed=0, hidden_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=704,
                            dtype=getattr(torch, setting["dtype"]))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(15, 64, (setting["prompts"],), generator=g)]  # fmt: skip
    stops = {"long-tail": list(range(3, 3 + vocab // 48)), "fixed": []}
    spec = SamplingSpec(max_new_tokens=setting["max_new_tokens"], temperature=1.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    rb = make_rollout_backend(backend, model, kv_cache_gb=setting.get("kv_cache_gb"))
    kw = dict(n=setting["samples"], spec=spec, pad_token_id=0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rb.generate(model, prompts, stop_ids=stops["long-tail"], **kw)
    out = {"backend": backend, "warmup_s": time.perf_counter() - t0, "runs": {}}
    for w in WORKLOADS:
        runs = []
        for _ in range(setting["reps"]):
            t0 = time.perf_counter()
            res = rb.generate(model, prompts, stop_ids=stops[w], **kw)
            dt = time.perf_counter() - t0
            tokens = sum(len(r) for r in res.responses)
            runs.append({"s": dt, "tokens": tokens, "tokens_per_s": tokens / dt})
        out["runs"][w] = runs
    out["peak_extra_rss_gb"] = (_rss_kb("VmHWM") - base) / 2**20
    rb.close()
    return out


def child_e2e(backend: str, setting: dict) -> dict:
    """Whole GRPO steps of fusedrl's trainer with this rollout backend: one warm-up step, then timed ones."""
    import torch
    from fusedrl.engine.distributed import init_distributed
    from fusedrl.engine.models import apply_lora, build_causal_lm
    from fusedrl.engine.tokenizer import build_char_tokenizer
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer

    init_distributed()  # under torchrun (the 2-rank variants); nothing in one process
    variant = VLLM_VARIANTS.get(backend, {})
    tok = build_char_tokenizer()
    model = build_causal_lm("small-llama", vocab_size=setting["vocab"], seed=0, hidden_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=704,
                            dtype=getattr(torch, setting["dtype"]))  # fmt: skip
    n = setting["prompts"] * setting["samples"]
    cfg = PPOConfig(prompts_per_step=setting["prompts"], samples_per_prompt=setting["samples"],
                    max_new_tokens=setting["max_new_tokens"], advantage_estimator="grpo", kl_coef=0.04,
                    learning_rate=1e-6, generation_batch_size=n, max_tokens_per_microbatch=n * (16 + setting[
                        "max_new_tokens"]), progress=False, rollout_backend=backend.split("-")[0], vllm_kv_cache_gb=1,
                    vllm_lora_sync=variant.get("lora", "auto"), fsdp=variant.get("fsdp", False))  # fmt: skip
    if variant.get("lora"):
        model = apply_lora(model, r=16)
    prompts = [f"{a}+{b}=" for a, b in zip(range(10, 10 + 4 * n), range(37, 37 + 12 * n, 3))]
    digits = lambda p, c: [sum(ch.isdigit() for ch in x) / max(len(x), 1) for x in c]  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    trainer = PPOTrainer(model, tok, digits, cfg)
    torch.manual_seed(0)
    steps = []
    for i in range(setting["steps"] + 1):
        t0 = time.perf_counter()
        m = trainer.step(trainer.sample_prompts(prompts, i))
        if i:  # step 0 builds the engine (vLLM: its sampler compile)
            steps.append(
                {
                    "s": time.perf_counter() - t0,
                    "rollout_s": m["perf/rollout_s"],
                    "tokens": int(trainer.buffer.num_tokens),
                    "mismatch_k3": m.get("rollout/logp_mismatch_k3"),
                    "weight_sync_s": m.get("perf/weight_sync_s"),
                    "rollout_tokens_per_s": m["perf/rollout_tokens_per_s"],
                }
            )
    peak = [(_rss_kb("VmHWM") - base) / 2**20]  # per rank: every rank holds its own engine
    if torch.distributed.is_initialized():
        peak = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peak, (_rss_kb("VmHWM") - base) / 2**20)
    trainer.rollout.close()
    return {"backend": backend, "steps": steps, "peak_extra_rss_gb": max(peak), "ranks": len(peak)}


def run_child(python: str, backend: str, setting: dict, timeout: float) -> dict:
    from bench.common import child_result

    env = {**os.environ, "OMP_NUM_THREADS": str(setting["threads"]), "MKL_NUM_THREADS": str(setting["threads"])}
    # vLLM compiles its sampler once per cache: every vllm child of this run shares one (warm-up stays honest: the
    # first child pays it).
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / "runs" / "bench-rollout-inductor"))
    cmd = [python, str(Path(__file__).resolve()), "--child", backend, json.dumps(setting)]
    if VLLM_VARIANTS.get(backend, {}).get("ranks"):  # rank 0 prints the result
        launch = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(VLLM_VARIANTS[backend]["ranks"]),
        ]
        cmd = [python, *launch, *cmd[1:]]
    return child_result(cmd, env=env, timeout=timeout, cwd=ROOT, tail=3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="timed calls per workload in each process")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--out", default=None, help="results file (default bench/results/rollout-cpu[-bf16].json)")
    ap.add_argument("--e2e", action="store_true", help="whole GRPO steps of the trainer per backend instead")
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.e2e and any(b in VLLM_VARIANTS for b in args.backends.split(",")):
        ap.error(f"the vllm configurations {sorted(VLLM_VARIANTS)} are measured with --e2e (whole trainer steps)")
    if args.child:
        result = child(args.child[0], json.loads(args.child[1]))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from bench.common import environment

    setting = {"vocab": 8192, "prompts": 16, "samples": 4, "max_new_tokens": 128, "dtype": args.dtype,
               "threads": args.threads, "reps": args.reps, "kv_cache_gb": 1}  # fmt: skip
    rounds = args.rounds
    if args.e2e:
        setting.update(e2e=True, vocab=8192, max_new_tokens=64, steps=2)
    if args.quick:
        setting.update(prompts=4, max_new_tokens=32, reps=1, steps=1)
        rounds = 1
    backends = args.backends.split(",")
    python = {b: sys.executable for b in backends}
    for b in backends:
        if b.startswith("vllm"):
            python[b] = args.vllm_python if Path(args.vllm_python).exists() else sys.executable
    results = {b: [] for b in backends}
    errors, loads = {}, [os.getloadavg()[0]]
    for r in range(rounds):
        for b in backends[r % len(backends) :] + backends[: r % len(backends)]:
            if b in errors:
                continue
            res = run_child(python[b], b, setting, timeout=900)
            loads.append(os.getloadavg()[0])
            if "error" in res:
                errors[b] = res["error"]
                print(f"round {r} {b}: {res['error']}", flush=True)
                continue
            results[b].append(res)
            if args.e2e:
                print(f"round {r} {b}: " + ", ".join(f"{x['s']:.2f} s (rollout {x['rollout_s']:.2f} s)"
                                                     for x in res["steps"]), flush=True)  # fmt: skip
                continue
            tps = {w: statistics.median(x["tokens_per_s"] for x in res["runs"][w]) for w in WORKLOADS}
            print(
                f"round {r} {b}: "
                + ", ".join(f"{w} {v:,.0f} tok/s" for w, v in tps.items())
                + f", peak +{res['peak_extra_rss_gb']:.2f} GiB, warm-up {res['warmup_s']:.1f} s",
                flush=True,
            )
    if args.e2e:
        return _write_e2e(args, setting, rounds, backends, results, errors, loads)
    records = []
    for w in WORKLOADS:
        base = None
        for b in backends:
            rec = {
                "op": "rollout",
                "workload": w,
                "provider": b,
                "dtype": args.dtype,
                "shape": f"{setting['prompts']}x{setting['samples']} prompts x <= {setting['max_new_tokens']} new",
            }
            if b in errors:
                records.append({**rec, "error": errors[b]})
                continue
            runs = [x for res in results[b] for x in res["runs"][w]]
            rec.update(
                tokens_per_s=statistics.median(x["tokens_per_s"] for x in runs),
                median_s=statistics.median(x["s"] for x in runs), tokens=statistics.median(x["tokens"] for x in runs),
                peak_mem_gb=max(res["peak_extra_rss_gb"] for res in results[b]),
                warmup_s=statistics.median(res["warmup_s"] for res in results[b]), n_timed=len(runs),
            )  # fmt: skip
            if b == "hf":
                base = rec["tokens_per_s"]
            if base:
                rec["speedup"] = rec["tokens_per_s"] / base
            records.append(rec)
    env = environment("cpu")
    try:
        vllm_v = subprocess.run([python.get("vllm", sys.executable), "-c", "import vllm; print(vllm.__version__)"],
                                capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1:]  # fmt: skip
    except Exception:  # noqa: BLE001 - only for the record
        vllm_v = []
    import transformers

    payload = {**env, "threads": args.threads, "rounds": rounds, "setting": setting, "load_avg_1min": loads,
               "transformers": transformers.__version__, "vllm": vllm_v[0] if vllm_v else None,
               "records": records}  # fmt: skip
    suffix = "" if args.dtype == "float32" else "-bf16"
    rows = [
        f"| {r['workload']} | {r['provider']} | error: {r['error'][:80]} | | | |" if "error" in r else
        f"| {r['workload']} | {r['provider']} | {r['tokens_per_s']:,.0f} | {r.get('speedup', 1):.2f} | "
        f"{r['median_s']:.2f} s | {r['peak_mem_gb']:.2f} GiB |"
        for r in records
    ]  # fmt: skip
    _save_and_print(args, payload, f"rollout-cpu{suffix}.json",
                    "| workload | backend | tokens/s | x hf | time per call | peak extra RSS |", rows)  # fmt: skip


def _save_and_print(args, payload: dict, name: str, header: str, rows: list[str]) -> None:
    """Write the payload to ``--out`` or bench/results/<name> (not for a plain --quick run) and print the table."""
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / name
    if not args.quick or args.out:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
    print("\n" + header)
    print("|" + " --- |" * header.count(" | ") + " --- |")
    for row in rows:
        print(row)


def _write_e2e(args, setting, rounds, backends, results, errors, loads) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.common import environment

    records, base = [], None
    for b in backends:
        rec = {
            "op": "grpo-step",
            "provider": b,
            "dtype": args.dtype,
            "shape": f"{setting['prompts']}x{setting['samples']} prompts x <= {setting['max_new_tokens']} new",
        }
        if b in errors:
            records.append({**rec, "error": errors[b]})
            continue
        steps = [x for res in results[b] for x in res["steps"]]
        rec.update(
            median_s=statistics.median(x["s"] for x in steps),
            rollout_median_s=statistics.median(x["rollout_s"] for x in steps),
            tokens_per_s=statistics.median(x["tokens"] / x["s"] for x in steps),
            peak_mem_gb=max(res["peak_extra_rss_gb"] for res in results[b]), n_timed=len(steps),
            logp_mismatch_k3=max((x["mismatch_k3"] for x in steps if x["mismatch_k3"] is not None), default=None),
            rollout_tokens_per_s=statistics.median(x["rollout_tokens_per_s"] for x in steps),
            weight_sync_median_s=statistics.median(x["weight_sync_s"] or 0.0 for x in steps),
            ranks=results[b][0]["ranks"],
        )  # fmt: skip
        if base is None:  # the first backend listed is the baseline
            base = rec["median_s"]
        rec["speedup"] = base / rec["median_s"]
        records.append(rec)
    payload = {**environment("cpu"), "threads": args.threads, "rounds": rounds, "setting": setting,
               "load_avg_1min": loads, "records": records}  # fmt: skip
    mismatch = lambda mm: "-" if mm is None else f"{mm:.1e}"  # noqa: E731
    rows = [
        f"| {r['provider']} | error: {r['error'][:80]} | | | | | | |" if "error" in r else
        f"| {r['provider']} | {r['median_s']:.2f} | {r['rollout_median_s']:.2f} | {r['rollout_tokens_per_s']:,.0f} | "
        f"{r['weight_sync_median_s']:.3f} | {r.get('speedup', 1):.2f} | {r['peak_mem_gb']:.2f} GiB | "
        f"{mismatch(r['logp_mismatch_k3'])} |"
        for r in records
    ]  # fmt: skip
    variants = any(b in VLLM_VARIANTS for b in backends)
    _save_and_print(args, payload, "rollout_e2e_vllm-cpu.json" if variants else "rollout_e2e_grpo-cpu.json",
                    f"| backend | s / GRPO step | rollout s | rollout tokens/s | weight sync s | x {backends[0]} (step) "
                    "| peak extra RSS (per rank) | max logp mismatch k3 |", rows)  # fmt: skip


if __name__ == "__main__":
    main()
