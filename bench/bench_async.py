"""Synchronous vs asynchronous PPO on the README's letters task or the demo's task: tokens/s, wall time to a reward,
and the reward against wall clock, same model, prompts and settings for every mode.

    python bench/bench_async.py                 # 30 steps, 2 interleaved rounds, writes bench/results/async-cpu.*
    python bench/bench_async.py --steps 10 --rounds 1   # smoke run
    python bench/bench_async.py --backend vllm  # the vllm engine (in .venv-vllm): bench/results/async-vllm-cpu.*
    python bench/bench_async.py --task demo     # fusedrl demo's task: bench/results/async-demo-cpu.*

``--task letters``: GRPO from a random tiny Llama, reward the count of "a" (the README's letters command). ``--task
demo``: ``fusedrl demo``'s PPO stage (critic, GAE, KL 0.1 to the SFT policy) against its learned reward model, from
its SFT policy; stages 1-2 run once (``--quick`` settings) into bench/.cache and every mode starts from them; the
reward is the reward model's (the proxy). With ``--backend vllm`` every model is the tiny Llama with two heads of
64 (head_dim 32: vLLM's CPU attention has no head_dim 16), for the hf backend too when compared with it.

Modes: ``sync-1t`` (async_mode off, one torch thread), ``sync-1t+spin`` (the same beside a process spinning on a core:
what a second busy process costs the machine), ``sync-2t`` (off, two threads; not run by default), ``one-step-off``
and ``streaming`` (learner one thread + producer process one thread). Each run is a fresh process; the rounds
interleave the modes so that load from other processes falls on all of them alike. Wall time counts from the start
of ``train()`` (the producer process's start-up included) to the end of each step's update; tokens are the trained
sequences' tokens (prompt + response); steady tokens/s counts from the end of step 1 (async modes: over the steps the
producer fed, after the learner's synchronous steps while the producer started). Writes ``bench/results/async-cpu.json`` and ``async-cpu.png`` (mean reward
against wall clock, the first round of every mode).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "sync-1t": {"async_mode": "off", "threads": 1},
    "sync-2t": {"async_mode": "off", "threads": 2},
    # The synchronous run beside a process spinning on one core: what a second busy process costs on this machine.
    "sync-1t+spin": {"async_mode": "off", "threads": 1, "spin": True},
    "one-step-off": {"async_mode": "one-step-off", "max_staleness": 1, "threads": 1},
    "streaming": {"async_mode": "streaming", "max_staleness": 2, "stream_chunk_tokens": 4, "threads": 1},
}
TASKS = {
    "letters": {  # the README's letters command
        "advantage_estimator": "grpo", "prompts_per_step": 4, "samples_per_prompt": 8, "max_new_tokens": 8,
        "learning_rate": 1e-2, "kl_coef": 0.0, "progress": False,
    },
    "demo": {},  # fusedrl demo's PPO stage: its settings come from DemoConfig (demo_setup)
}  # fmt: skip
TARGETS = {"letters": 6.0, "demo": 0.5}  # the default --target per task
HEAD_DIM_32 = {"num_attention_heads": 2, "num_key_value_heads": 1}  # vLLM's CPU attention needs head_dim >= 32
DEMO_CACHE = ROOT / "bench" / ".cache"


def demo_setup(seed: int, model_kwargs: dict):
    """fusedrl demo's stages 1-2 (the --quick settings), run once into bench/.cache and loaded after; returns
    (PPOConfig settings of its PPO stage, tokenizer, SFT policy, reference policy, reward model, prompts)."""
    import random

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fusedrl.engine import demo, models
    from fusedrl.engine.demo_task import DIGITS, SEPARATOR
    from fusedrl.engine.tokenizer import build_char_tokenizer

    cfg = demo.DemoConfig(**demo.QUICK, seed=seed, progress=False, out="-")
    tok = build_char_tokenizer(DIGITS + SEPARATOR)
    task = demo.task_of(cfg)
    out = DEMO_CACHE / f"demo-seed{seed}-{'-'.join(f'{k}{v}' for k, v in sorted(model_kwargs.items())) or 'preset'}"
    if not (out / "reward_model").is_dir():
        build = models.build_causal_lm  # stage 1 builds its policy from the preset: the overrides go in here
        models.build_causal_lm = lambda *a, **kw: build(*a, **{**kw, **model_kwargs})
        try:
            (out / "tmp").mkdir(parents=True, exist_ok=True)
            rng = random.Random(cfg.seed)
            import torch

            torch.manual_seed(cfg.seed)
            policy, _ = demo.stage_sft(cfg, task, tok, rng, torch.device("cpu"), out / "tmp")
            demo.stage_reward_model(cfg, task, tok, policy, rng, torch.device("cpu"), out / "tmp")
        finally:
            models.build_causal_lm = build
        (out / "tmp").rename(out / "done") if False else None
        for name in ("sft", "reward_model"):
            (out / "tmp" / name).rename(out / name)
    load = lambda cls, name: cls.from_pretrained(out / name, local_files_only=True)  # noqa: E731
    settings = {
        "prompts_per_step": cfg.prompts_per_step, "samples_per_prompt": cfg.samples_per_prompt,
        "max_new_tokens": cfg.max_new_tokens, "advantage_estimator": "gae", "kl_coef": cfg.kl_coef,
        "learning_rate": cfg.ppo_lr, "critic_learning_rate": 2 * cfg.ppo_lr, "ppo_epochs": cfg.ppo_epochs,
        "progress": False,
    }  # fmt: skip
    prompts = task.prompts(max(4096, cfg.prompts_per_step), random.Random(cfg.seed + 2))
    return (settings, tok, load(AutoModelForCausalLM, "sft"), load(AutoModelForCausalLM, "sft"),
            load(AutoModelForSequenceClassification, "reward_model"), prompts)  # fmt: skip


def child(mode: str, steps: int, seed: int, task: str, backend: str, head_dim_32: bool) -> dict:
    """One run in this process; returns per-step (wall seconds, reward, tokens) and the async metrics."""
    import torch

    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.rewards import count_token
    from fusedrl.engine.tokenizer import build_char_tokenizer
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer

    settings = dict(MODES[mode])
    torch.set_num_threads(settings.pop("threads"))
    model_kwargs = HEAD_DIM_32 if head_dim_32 else {}
    ref = None
    if task == "demo":
        task_settings, tok, policy, ref, reward, prompts = demo_setup(seed, model_kwargs)
    else:
        task_settings = TASKS[task]
        prompts = [json.loads(x)["prompt"] for x in (ROOT / "examples" / "letters.jsonl").read_text().splitlines()]
        tok = build_char_tokenizer()
        policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=seed, **model_kwargs)
        reward = functools.partial(count_token, token="a")  # picklable: the producer process gets it
    # Spins until killed below or until this process dies (never left behind).
    spinner = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
    spin = settings.pop("spin", False) and subprocess.Popen([sys.executable, "-c", spinner])
    cfg = PPOConfig(**task_settings, **settings, rollout_backend=backend, total_steps=steps, seed=seed)
    tr = PPOTrainer(policy, tok, reward, cfg, ref_policy=ref)
    marks, learn = [], tr.learn

    def timed_learn(batch, timer=None):
        out = learn(batch, timer)
        marks.append((time.perf_counter(), tr._buffer.num_tokens))
        return out

    tr.learn = timed_learn
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        rows = tr.train(prompts)
    finally:
        if spin:
            spin.kill()
            spin.wait()
    keep = ("rollout/reward_mean", "async/staleness_mean", "async/staleness_max", "async/producer_busy_frac",
            "async/trainer_busy_frac", "perf/weight_sync_s", "async/dropped_trajectories", "async/synchronous_step")  # fmt: skip
    return {
        "load_avg_1min": [load_start, os.getloadavg()[0]],  # other processes on the machine, start and end
        "wall_s": [t - t0 for t, _ in marks],
        "tokens": [n for _, n in marks],
        "rows": [{k: r[k] for k in keep if k in r} for r in rows],
    }


def summarise(mode: str, run: dict, target: float) -> dict:
    wall, tokens, rewards = run["wall_s"], run["tokens"], [r["rollout/reward_mean"] for r in run["rows"]]
    hit = next((w for w, r in zip(wall, rewards) if r >= target), None)
    steady = sum(tokens[1:]) / max(wall[-1] - wall[0], 1e-9)  # from the end of step 1 on: start-up excluded
    # Async modes: the steps the producer fed (after the learner's synchronous steps while it started).
    fed = [i for i, r in enumerate(run["rows"]) if r.get("async/synchronous_step") == 0.0]
    if len(fed) >= 2:
        steady = sum(tokens[i] for i in fed[1:]) / max(wall[fed[-1]] - wall[fed[0]], 1e-9)
    out = {
        "mode": mode, "steps": len(wall), "wall_s": round(wall[-1], 2), "tokens_per_s": round(sum(tokens) / wall[-1], 1),
        "steady_tokens_per_s": round(steady, 1), "time_to_target_s": None if hit is None else round(hit, 2),
        "final_reward_5": round(statistics.mean(rewards[-5:]), 3), "load_avg_1min": run["load_avg_1min"],
        "synchronous_steps": sum(r.get("async/synchronous_step", 0.0) == 1.0 for r in run["rows"]),
    }  # fmt: skip
    for k in ("async/staleness_mean", "async/producer_busy_frac", "async/trainer_busy_frac", "perf/weight_sync_s"):
        vals = [r[k] for r in run["rows"] if k in r]
        if vals:
            out[k.split("/")[1]] = round(statistics.mean(vals), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--target", type=float, help="mean reward whose first step ends 'time to target' (default: "
                    + ", ".join(f"{t}: {v:g}" for t, v in TARGETS.items()) + ")")  # fmt: skip
    ap.add_argument("--task", choices=sorted(TASKS), default="letters")
    ap.add_argument(
        "--backend", default="hf", help="rollout backends, comma-separated (hf, vllm): each mode runs on each"
    )
    ap.add_argument("--head-dim-32", action="store_true", help="the two-head model vllm needs, with any backend")
    # sync-2t is left out by default: two threads on two shared cores oversubscribe them (the README's --threads).
    ap.add_argument("--modes", default="sync-1t,sync-1t+spin,one-step-off,streaming")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.steps, args.seed, args.task, args.backend, args.head_dim_32)
        print("RESULT " + json.dumps(result))
        return

    from bench.common import RESULTS, child_result, environment

    backends = args.backend.split(",")
    if not set(backends) <= {"hf", "vllm"}:
        raise SystemExit(f"--backend: hf, vllm or both comma-separated, got {args.backend!r}")
    if not set(args.modes.split(",")) <= MODES.keys():
        raise SystemExit(f"--modes: comma-separated from {', '.join(MODES)}, got {args.modes!r}")
    # One run per (backend, mode), labelled by the mode alone when there is one backend.
    label = {(b, m): m if len(backends) == 1 else f"{b} {m}" for b in backends for m in args.modes.split(",")}
    modes = list(label.values())
    args.head_dim_32 = args.head_dim_32 or "vllm" in backends
    target = TARGETS[args.task] if args.target is None else args.target
    name = (
        "async" + ("" if args.task == "letters" else f"-{args.task}") + "".join(f"-{b}" for b in backends if b != "hf")
    )
    name += "-hd32" if args.head_dim_32 and backends == ["hf"] else ""
    task_settings = TASKS[args.task]
    if args.task == "demo":  # stages 1-2 once, before the timed runs
        task_settings = demo_setup(args.seed, HEAD_DIM_32 if args.head_dim_32 else {})[0]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    for rnd in range(args.rounds):
        for (backend, m), mode in label.items():
            cmd = [sys.executable, __file__, "--child", m, "--steps", str(args.steps), "--seed", str(args.seed),
                   "--task", args.task, "--backend", backend, *(["--head-dim-32"] * args.head_dim_32)]  # fmt: skip
            result = child_result(cmd, env=env, timeout=1800, tail=15)
            if "error" in result:
                raise SystemExit(f"{mode} failed: {result['error']}")
            runs[mode].append(result)
            print(f"round {rnd} {mode}: {summarise(mode, runs[mode][-1], target)}", flush=True)

    records = []
    for mode in modes:
        per_round = [summarise(mode, run, target) for run in runs[mode]]
        backend, m = next(k for k, v in label.items() if v == mode)
        rec = {"mode": mode, "backend": backend, "rounds": per_round}
        for k in ("wall_s", "tokens_per_s", "steady_tokens_per_s", "final_reward_5"):
            rec[k] = statistics.median(p[k] for p in per_round)
        hits = [p["time_to_target_s"] for p in per_round if p["time_to_target_s"] is not None]
        rec["time_to_target_s"] = statistics.median(hits) if len(hits) == len(per_round) else None
        records.append(rec)
    for r in records:  # against the same backend's sync-1t
        base = next((b for b in records if b["mode"] == label.get((r["backend"], "sync-1t"))), records[0])
        r["x_sync_1t_tokens_per_s"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
        r["x_sync_1t_steady"] = round(r["steady_tokens_per_s"] / base["steady_tokens_per_s"], 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**environment("cpu"), "task": args.task, "task_settings": task_settings, "backends": backends,
               "model_overrides": HEAD_DIM_32 if args.head_dim_32 else {}, "modes": MODES, "steps": args.steps,
               "target": target, "records": records, "curves": {m: runs[m][0] for m in modes},
               "runs": runs}  # fmt: skip
    (RESULTS / f"{name}-cpu.json").write_text(json.dumps(payload, indent=1) + "\n")

    print(
        "\n| mode | wall s | tokens/s | x sync-1t | steady tokens/s | x sync-1t | time to reward "
        f"{target:g} s | reward (last 5) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        ttt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        print(
            f"| {r['mode']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r['x_sync_1t_tokens_per_s']:.2f} | "
            f"{r['steady_tokens_per_s']:.0f} | {r['x_sync_1t_steady']:.2f} | {ttt} | {r['final_reward_5']:.2f} |"
        )
    plot(runs, RESULTS / f"{name}-cpu.png", target, args.task)


def plot(runs: dict, path: Path, target: float, task: str) -> None:
    try:
        import matplotlib
    except ImportError:  # .venv-vllm has no matplotlib: the JSON holds the curves
        print(f"no matplotlib here: {path} not written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for mode, rs in runs.items():
        run = rs[0]
        ax.plot(run["wall_s"], [r["rollout/reward_mean"] for r in run["rows"]], marker=".", label=mode)
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("wall clock (s, from train() start)")
    ax.set_ylabel(f"mean reward ({task} task)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
