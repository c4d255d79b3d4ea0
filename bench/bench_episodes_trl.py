"""Multi-turn GRPO against TRL's GRPOTrainer: the same environment class (examples/calculator's ``Calculator``,
TRL's ``environment_factory`` contract), the same policy, rows, group size, turn limit, dtype and threads; tokens/s
of whole training steps (rollout + scoring + update) and the peak memory of the steps.

    python bench/bench_episodes_trl.py                          # SFT a tiny policy first (~1 min), then compare
    python bench/bench_episodes_trl.py --policy runs/calc-sft/policy --steps 4 --rounds 3

Each framework runs in its own process (one warm-up step, then ``--steps`` timed steps), the two alternating for
``--rounds`` rounds so that load from other processes hits both alike. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the process's peak resident set over the timed
steps (``VmHWM``, reset after the warm-up step), so library imports and the model weights count for both; the JSON
also has the memory in use when the timed steps start (``mib_before_steps``) and the peak over it.
Tokens/s counts the tokens the policy sampled (environment tokens excluded: fusedrl's loss mask, TRL's
``completions/mean_length``, which counts only model tokens) over the wall time of the steps.

The settings that differ, by design of the two trainers: TRL's ``max_completion_length`` bounds a whole episode
(the policy's turns and the tool results together) and each turn may use all of what is left; fusedrl bounds each
turn (``max_new_tokens``) and the episode (``max_episode_tokens``, set to TRL's ``max_completion_length``). TRL's
``max_tool_calling_iterations`` counts tool rounds, fusedrl's ``max_turns`` the policy's turns (one more). TRL's
gradient checkpointing (on by default in GRPOConfig) is turned off, as fusedrl recomputes nothing. A tool call the
parser cannot read ends a TRL episode (its turn is taken as the final answer) while fusedrl answers it with an error
message and the episode goes on, so with a policy that writes malformed calls fusedrl's episodes have more turns
(both counts are in the JSON: ``turns`` and ``tool_calls`` per episode, TRL's ``tools/call_frequency`` counting
only the calls it parsed). Writes
bench/results/episodes-trl-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CALC = ROOT / "examples" / "calculator"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(CALC))
from common import RESULTS, child_result, environment  # noqa: E402


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_reset(device: str) -> float:
    """Starts a new peak; returns the memory in use now (MiB): allocated on CUDA, the resident set on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _status_mib("VmRSS")


def peak_mib(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


def rows_of(args) -> list[dict]:
    rows = [json.loads(line) for line in (CALC / "train.jsonl").read_text().splitlines() if line.strip()]
    return rows[: args.prompts * (args.steps + 1)]


def run_fusedrl(args, policy, tok) -> dict:
    from calculator import Calculator
    from fusedrl.engine import PPOConfig, PPOTrainer

    cfg = PPOConfig(prompts_per_step=args.prompts, samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                    max_turns=args.turns, max_episode_tokens=args.max_episode_tokens, advantage_estimator="grpo",
                    kl_coef=0.0, ppo_epochs=1, num_minibatches=1, learning_rate=args.learning_rate,
                    rollout_backend="hf", progress=False, seed=0)  # fmt: skip
    tr = PPOTrainer(policy, tok, None, cfg, environment_factory=Calculator)
    rows = rows_of(args)
    times, sampled, turns, calls, before = [], [], [], [], [0.0]
    torch.manual_seed(0)
    for i in range(args.steps + 1):
        batch = rows[i * args.prompts : (i + 1) * args.prompts]
        if i == 1:
            before[0] = peak_reset(args.device)
        t0 = time.perf_counter()
        m = tr.step(batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
            sampled.append(int(np.asarray(tr.buffer.response_mask()).sum()))
            turns.append(m["episode/turns"])
            calls.append(m["tools/calls"])
    return {
        "step_s": times,
        "sampled_tokens": sampled,
        "turns": turns,
        "tool_calls": calls,
        "mib_before_steps": before[0],
        "peak_mib": peak_mib(args.device),
    }


def run_trl(args, policy, tok) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import trl
    from calculator import Calculator
    from transformers import TrainerCallback

    rows = rows_of(args)
    times, t0, before = [], [0.0], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 1:
                before[0] = peak_reset(args.device)
            t0[0] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            if state.global_step >= 2:  # global_step counts the step just ended
                times.append(time.perf_counter() - t0[0])

    with tempfile.TemporaryDirectory() as out:
        targs = trl.GRPOConfig(output_dir=out, report_to="none", use_cpu=args.device == "cpu", bf16=False,
                               per_device_train_batch_size=args.prompts * args.samples, num_generations=args.samples,
                               max_completion_length=args.max_episode_tokens, max_tool_calling_iterations=args.turns - 1,
                               max_steps=args.steps + 1, learning_rate=args.learning_rate, beta=0.0, num_iterations=1,
                               temperature=1.0, save_strategy="no", logging_steps=1, seed=0, shuffle_dataset=False,
                               gradient_checkpointing=False, dataloader_num_workers=0)  # fmt: skip
        data = datasets.Dataset.from_list(
            [{"prompt": [{"role": "user", "content": r["prompt"]}], "a": r["a"], "b": r["b"]} for r in rows]
        )
        trainer = trl.GRPOTrainer(model=policy, args=targs, train_dataset=data, processing_class=tok,
                                  environment_factory=Calculator, callbacks=[Clock()])  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    episodes = args.prompts * args.samples
    sampled = [round(h["completions/mean_length"] * episodes) for h in logs]
    return {"step_s": times, "sampled_tokens": sampled, "turns": [None] * len(times), "mib_before_steps": before[0],
            "peak_mib": peak_mib(args.device), "tool_calls": [h.get("tools/call_frequency") for h in logs]}  # fmt: skip


def worker(args) -> None:
    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.policy)
    policy = build_causal_lm(args.policy).to(args.device)
    res = (run_fusedrl if args.worker == "fusedrl" else run_trl)(args, policy, tok)
    print("RESULT " + json.dumps(res))


def sft_policy(out: Path) -> Path:
    """A policy that writes the task's tool calls (not yet the right numbers): multi-turn episodes to measure."""
    cmd = [sys.executable, "-m", "fusedrl.engine.cli", "sft", "--model", "tiny-llama", "--tokenizer",
           str(CALC / "tokenizer"), "--data", str(CALC / "sft.jsonl"), "--epochs", "6", "--batch-size", "16",
           "--learning-rate", "3e-3", "--threads", "1", "--no-progress", "--output-dir", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "policy"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=None, help="policy directory (default: a short SFT on the calculator demos)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-episode-tokens", type=int, default=192)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--worker", choices=["fusedrl", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy or str(sft_policy(Path(tmp) / "sft"))
        base = [sys.executable, __file__, "--policy", policy, *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))]
                for k in ("prompts", "samples", "turns", "max_new_tokens", "max_episode_tokens", "learning_rate",
                          "steps", "threads", "device")), [])]  # fmt: skip
        runs = {"fusedrl": [], "trl": []}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        for r in range(args.rounds):
            for name in runs:
                result = child_result([*base, "--worker", name], env=env, tail=15)
                if "error" in result:
                    raise SystemExit(f"bench_episodes_trl: the {name} worker failed: {result['error']}")
                runs[name].append(result)
                print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    records = []
    for name, rs in runs.items():
        steps = [s for r in rs for s in r["step_s"]]
        toks = [t for r in rs for t in r["sampled_tokens"]]
        records.append({"framework": name, "episodes_per_step": args.prompts * args.samples,
                        "median_step_s": statistics.median(steps), "sampled_tokens_per_step": statistics.mean(toks),
                        "sampled_tokens_per_s": sum(toks) / sum(steps), "peak_mib": max(r["peak_mib"] for r in rs),
                        "peak_over_start_mib": max(r["peak_mib"] - r["mib_before_steps"] for r in rs),
                        "runs": rs})  # fmt: skip
    f, t = records
    ratio = {"tokens_per_s": f["sampled_tokens_per_s"] / t["sampled_tokens_per_s"],
             "step_s": t["median_step_s"] / f["median_step_s"], "peak_mib": t["peak_mib"] / f["peak_mib"]}  # fmt: skip
    print(f"{'framework':10} {'step_s':>8} {'sampled tok/step':>16} {'sampled tok/s':>13} {'peak MiB':>9} "
          f"{'over start':>10}")  # fmt: skip
    for rec in records:
        print(f"{rec['framework']:10} {rec['median_step_s']:>8.2f} {rec['sampled_tokens_per_step']:>16.0f} "
              f"{rec['sampled_tokens_per_s']:>13.0f} {rec['peak_mib']:>9.0f} {rec['peak_over_start_mib']:>10.0f}")  # fmt: skip
    print(
        f"fusedrl / trl: tokens/s x{ratio['tokens_per_s']:.2f}, step time x{ratio['step_s']:.2f} faster, "
        f"peak memory x{ratio['peak_mib']:.2f} lower"
    )
    if not args.no_save:
        import transformers
        import trl

        setting = {k: getattr(args, k) for k in ("prompts", "samples", "turns", "max_new_tokens", "max_episode_tokens",
                                                  "learning_rate", "steps", "rounds", "threads")}  # fmt: skip
        setting["policy"] = args.policy or "tiny-llama after 6 epochs of fusedrl sft on examples/calculator/sft.jsonl"
        res = {**environment(args.device), "threads": args.threads, "trl": trl.__version__,
               "transformers": transformers.__version__, "dtype": "float32", "setting": setting,
               "load_average": round(max(load_before, os.getloadavg()[0]), 2),
               "ratio_fusedrl_over_trl": ratio, "records": records}  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"episodes-trl-{'cuda' if args.device == 'cuda' else 'cpu'}.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
