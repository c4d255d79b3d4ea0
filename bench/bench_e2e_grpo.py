"""End-to-end GRPO step: TRL's own GRPOTrainer, the same trainer with fusedrl's drop-in (FusedGRPOTrainer), and
fusedrl's engine (PPOTrainer with advantage_estimator="grpo"): same model, same prompts, same settings; tokens/s
and peak memory of one full step (generation, reference scoring, loss, backward, optimizer).

    python bench/bench_e2e_grpo.py            # CPU: tiny-llama with the char vocabulary and with V=32000
    python bench/bench_e2e_grpo.py --quick    # CPU smoke test: tiny-llama only, fewer steps
    python bench/bench_e2e_grpo.py --device cuda   # GPU: tiny-llama and qwen-0.5b-like (V=151936), bf16

Every provider runs a warm-up step, then ``--steps`` timed steps, ``--rounds`` times in turn with the others
(median / p20 / p80 of wall time over all of them, synchronised on GPU), then on CPU one more step under torch's
memory profiler (its peak: bytes allocated through torch during the step, above what was live before; GPU: the
caching allocator's peak during the timed steps). CPU runs use one thread unless ``--threads`` says otherwise.
Tokens are prompt + completion tokens of the step's sequences, so tokens/s counts the generation too. TRL runs
on-policy (num_iterations=1, its default), so the drop-in replaces its log-probs and TRL's loss math runs on them;
the engine scores old log-probs before its update, as PPO does.

Writes bench/results/e2e_grpo-<cpu|cuda>.json and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import device_name, git_commit, write_results  # noqa: E402

from fusedrl.engine.models import build_causal_lm  # noqa: E402
from fusedrl.engine.tokenizer import build_char_tokenizer  # noqa: E402

# fusedrl-engine samples with the hf rollout backend (plain generate, as before the backends existed);
# fusedrl-engine:hf-paged with transformers' continuous batching (the vllm backend: bench/bench_rollout.py, whose
# environment has no TRL).
PROVIDERS = ("trl", "trl+fusedrl", "fusedrl-engine", "fusedrl-engine:hf-paged")
ENGINE_PHASES = ("rollout", "score", "advantages", "update")  # PPOTrainer.step's laps, in order


@dataclass(frozen=True)
class Setting:
    """One benchmarked configuration; every provider runs it identically."""

    preset: str
    """fusedrl.engine.models preset (random weights)."""
    vocab_size: int | None
    """Vocabulary of the model (None: the char tokenizer's); ids above the tokenizer's decode to nothing."""
    prompts_per_step: int
    """Prompts per step."""
    group: int
    """Completions per prompt (GRPO's group size)."""
    max_new_tokens: int
    """Completion length cap (random weights rarely sample EOS, so most completions reach it)."""
    dtype: str
    """Model weights' dtype (bf16 on GPU also turns on TRL's bf16 autocast)."""
    beta: float = 0.04
    """KL coefficient: all providers score a reference model."""


CPU_SETTINGS = [
    Setting("tiny-llama", None, prompts_per_step=4, group=4, max_new_tokens=24, dtype="float32"),
    # The same body with a 32K vocabulary: the lm_head (2M of 2.2M parameters) dominates the step.
    Setting("tiny-llama", 32000, prompts_per_step=4, group=4, max_new_tokens=24, dtype="float32"),
    # Qwen2's vocabulary on the same body: the (B, V) sampling and the (N, V) logits are the step.
    Setting("tiny-llama", 151936, prompts_per_step=4, group=4, max_new_tokens=24, dtype="float32"),
]
GPU_SETTINGS = [
    Setting("tiny-llama", None, prompts_per_step=8, group=8, max_new_tokens=128, dtype="bfloat16"),
    Setting("qwen-0.5b-like", 151936, prompts_per_step=8, group=8, max_new_tokens=128, dtype="bfloat16"),
]


def make_prompts(n: int) -> list[str]:
    return [f"{a}+{b}=" for a, b in zip(range(10, 10 + n), range(37, 37 + 3 * n, 3))]


def digit_reward(prompts, completions) -> list[float]:
    """Fraction of digits in the completion: varies within a group from the first step (non-zero advantages)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory_profiler():
    """A CPU profiler that records every tensor's creation and destruction (what bench.common.peak_memory_gb
    runs a callable under; the TRL step is delimited by trainer callbacks, so it is entered by hand here)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)


def _live_bytes(prof) -> list[tuple[int, int]]:
    """(wall-clock ns, bytes live through torch above the profile's start) after each event of a finished
    profile: the memory timeline bench.common.peak_memory_gb reads, for every provider alike."""
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline  # private, torch >= 2.1

    live, out = 0, []
    for t, action, _, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        out.append((t, live))
    return out


def _peak_gb(timeline, start_ns: int = 0, end_ns: int | None = None) -> float:
    """Largest live bytes of ``_live_bytes`` between two wall-clock instants (ns), in GiB."""
    end_ns = end_ns if end_ns is not None else 2**63
    return max((b for t, b in timeline if start_ns <= t <= end_ns), default=0) / 2**30


def _summary(runs: list[dict]) -> dict:
    """Median / quantiles over the timed steps of all rounds; the largest peak."""
    times_s = [t for r in runs for t in r["times"]]
    tokens = [t for r in runs for t in r["tokens"]]
    rollout_s = [t for r in runs for t in r["rollout"]]
    peak_gb = max(r["peak"] for r in runs)
    ms = sorted(t * 1e3 for t in times_s)
    q = lambda f: ms[min(len(ms) - 1, int(f * (len(ms) - 1) + 0.5))]  # noqa: E731
    med = statistics.median(ms)
    tok = statistics.median(tokens)
    out = {
        "median_ms": med, "p20_ms": q(0.2), "p80_ms": q(0.8), "tokens_per_step": tok,
        "tokens_per_s": tok / (med / 1e3), "rollout_ms": statistics.median(rollout_s) * 1e3,
        "update_ms": med - statistics.median(rollout_s) * 1e3, "peak_mem_gb": peak_gb, "timed_steps": len(ms),
    }  # fmt: skip
    if "phase_peaks" in runs[0]:  # the engine: its own phases, timed and profiled
        for k in ENGINE_PHASES:
            out[f"{k}_phase_ms"] = statistics.median(p[k] for r in runs for p in r["phase_s"]) * 1e3
            out[f"peak_mem_{k}_gb"] = max(r["phase_peaks"][k] for r in runs)
    return out


# ----------------------------------------------------------------------------------------------------
# TRL (plain and with the drop-in)
# ----------------------------------------------------------------------------------------------------
def run_trl(provider: str, s: Setting, device: str, model_dir: Path, steps: int, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fusedrl.integrations.trl import FusedGRPOTrainer

    profile_step = 1 + steps if device == "cpu" else None  # after the warm-up and the timed steps

    class StepProbe(TrainerCallback):
        """Wall time (and on GPU the allocator's peak) of each optimizer step; a memory profile of one step."""

        def __init__(self):
            self.times, self.peaks, self.prof, self.cpu_peak = [], [], None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            if state.global_step == profile_step:
                self.prof = _memory_profiler()
                self.prof.__enter__()
            elif device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            elapsed = time.perf_counter() - self.t0
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                self.cpu_peak, self.prof = _peak_gb(_live_bytes(self.prof)), None
                return
            self.times.append(elapsed)
            if device == "cuda":
                self.peaks.append((torch.cuda.max_memory_allocated() - self.base) / 2**30)

    n = s.prompts_per_step * s.group
    args = GRPOConfig(
        output_dir=str(out_dir), report_to="none", use_cpu=device == "cpu", bf16=s.dtype == "bfloat16", seed=0,
        per_device_train_batch_size=n, num_generations=s.group, max_completion_length=s.max_new_tokens,
        max_steps=1 + steps + (profile_step is not None), beta=s.beta, learning_rate=1e-6, logging_steps=10**6,
        save_strategy="no", disable_dropout=True, model_init_kwargs={"dtype": s.dtype},
    )  # fmt: skip
    cls = FusedGRPOTrainer if provider == "trl+fusedrl" else GRPOTrainer
    probe = StepProbe()
    trainer = cls(
        model=str(model_dir), args=args, processing_class=build_char_tokenizer(), callbacks=[probe],
        reward_funcs=lambda completions, prompts, **kw: digit_reward(prompts, completions),
        train_dataset=Dataset.from_dict({"prompt": make_prompts(64)}),
    )  # fmt: skip
    rollout, tokens = [], []
    generate = trainer._generate_and_score_completions

    def timed_generate(batch):  # generation, rewards and reference scoring: the step's rollout phase
        _sync(device)
        t0 = time.perf_counter()
        out = generate(batch)
        _sync(device)
        rollout.append(time.perf_counter() - t0)
        tokens.append(int(out["prompt_mask"].sum() + out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = timed_generate
    trainer.train()
    timed = slice(1, 1 + steps)  # drop the warm-up step (and the profiled one)
    peak = probe.cpu_peak if device == "cpu" else max(probe.peaks[1:])
    return {"times": probe.times[1:], "tokens": tokens[timed], "rollout": rollout[timed], "peak": peak}


# ----------------------------------------------------------------------------------------------------
# fusedrl's engine
# ----------------------------------------------------------------------------------------------------
def run_engine(s: Setting, device: str, steps: int, rollout_backend: str = "hf") -> dict:
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer

    tok = build_char_tokenizer()
    policy = build_causal_lm(s.preset, vocab_size=s.vocab_size or len(tok), seed=0,
                             dtype=getattr(torch, s.dtype)).to(device)  # fmt: skip
    n = s.prompts_per_step * s.group
    cfg = PPOConfig(
        prompts_per_step=s.prompts_per_step, samples_per_prompt=s.group, max_new_tokens=s.max_new_tokens,
        advantage_estimator="grpo", kl_coef=s.beta, learning_rate=1e-6, generation_batch_size=n,
        max_tokens_per_microbatch=n * (16 + s.max_new_tokens), progress=False, rollout_backend=rollout_backend,
    )  # fmt: skip
    trainer = PPOTrainer(policy, tok, digit_reward, cfg)
    prompts = make_prompts(64)
    batches = [prompts[i * s.prompts_per_step : (i + 1) * s.prompts_per_step] for i in range(steps + 2)]
    times, tokens, rollout, peaks, phase_s = [], [], [], [], []
    for i, batch in enumerate(batches[: steps + 1]):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(device)
        t0 = time.perf_counter()
        m = trainer.step(batch)
        _sync(device)
        if i == 0:
            continue  # warm-up
        times.append(time.perf_counter() - t0)
        tokens.append(int(trainer.buffer.num_tokens))
        rollout.append(sum(m.get(f"perf/{k}_s", 0.0) for k in ("rollout", "score", "advantages")))
        phase_s.append({k: m[f"perf/{k}_s"] for k in ENGINE_PHASES})
        if device == "cuda":
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
            phase_peaks = {k: m[f"perf/peak_mem_{k}_gb"] - base / 2**30 for k in ENGINE_PHASES}
    if device == "cpu":
        # One more step under the memory profiler, split into the trainer's phases by its lap times.
        with _memory_profiler() as prof:
            start = time.time_ns()
            m = trainer.step(batches[-1])
        timeline, phase_peaks = _live_bytes(prof), {}
        for k in ENGINE_PHASES:
            end = start + int(m[f"perf/{k}_s"] * 1e9)
            phase_peaks[k] = _peak_gb(timeline, start, end)
            start = end
        peaks.append(_peak_gb(timeline))
    return {
        "times": times,
        "tokens": tokens,
        "rollout": rollout,
        "peak": max(peaks),
        "phase_peaks": phase_peaks,
        "phase_s": phase_s,
    }


# ----------------------------------------------------------------------------------------------------
def run_setting(s: Setting, device: str, steps: int, rounds: int, providers) -> list[dict]:
    """Every provider, ``rounds`` times in turn: on a shared machine the load drifts, and round-robin spreads
    the drift over all providers instead of charging it to whichever ran last."""
    tok = build_char_tokenizer()
    vocab = s.vocab_size or len(tok)
    runs = {p: [] for p in providers}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        # TRL loads the policy (and builds its reference) from a path; the engine builds the same weights in memory.
        build_causal_lm(s.preset, vocab_size=vocab, seed=0, dtype=getattr(torch, s.dtype)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        for rnd in range(rounds):
            for provider in providers:
                torch.manual_seed(0)
                t0 = time.perf_counter()
                if provider.startswith("fusedrl-engine"):
                    r = run_engine(s, device, steps, provider.partition(":")[2] or "hf")
                else:
                    r = run_trl(provider, s, device, model_dir, steps, Path(tmp) / provider)
                runs[provider].append(r)
                print(f"  round {rnd}: {provider}: {statistics.median(r['times']) * 1e3:.0f} ms/step, peak "
                      f"{r['peak']:.3f} GB ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    records = [{
        "op": "grpo-step", "shape": f"{s.preset} V={vocab} {s.prompts_per_step}x{s.group}x{s.max_new_tokens}",
        "dtype": s.dtype, "provider": p, **_summary(runs[p]), "setting": asdict(s),
    } for p in providers]  # fmt: skip
    base = next((r for r in records if r["provider"] == "trl"), None)
    for r in records:
        if base is not None:
            r["speedup"] = base["median_ms"] / r["median_ms"]
    return records


def readme_table(records: list[dict], device: str) -> str:
    lines = [
        (
            f"GRPO step on {device_name(device)} (torch {torch.__version__}, {torch.get_num_threads()} threads); "
            "prompts x group x max new tokens; speed-up vs TRL's own trainer."
        ),
        "",
        "| model | provider | ms / step | tokens / s | rollout ms | update ms | peak mem (GB) | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['shape']} | {r['provider']} | {r['median_ms']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{r['rollout_ms']:.0f} | {r['update_ms']:.0f} | {r['peak_mem_gb']:.3f} | {r.get('speedup', 1.0):.2f}x |"
        )
    engine = [r for r in records if f"peak_mem_{ENGINE_PHASES[0]}_gb" in r]
    if engine:
        lines += [
            "",
            "The engine's phases (median ms; torch-allocator peak in MiB above the step's start):",
            "",
            "| model | " + " | ".join(ENGINE_PHASES) + " |",
            "|---|" + "---:|" * len(ENGINE_PHASES),
        ]
        for r in engine:
            cells = [f"{r[f'{k}_phase_ms']:.0f} ms, {r[f'peak_mem_{k}_gb'] * 1024:.1f} MiB" for k in ENGINE_PHASES]
            lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: the first setting, one timed step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per provider and round (default 2 CPU, 5 GPU)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="round-robin repeats of all providers (default 2 CPU, 1 GPU)"
    )
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument(
        "--vocabs",
        nargs="+",
        type=int,
        default=None,
        help="run only the settings with these vocabulary sizes (the char vocabulary is 54)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (default 1: on a shared box extra threads mostly wait on each other)",
    )
    args = ap.parse_args(argv)
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    settings = GPU_SETTINGS if device == "cuda" else CPU_SETTINGS
    steps = args.steps or (1 if args.quick else 5 if device == "cuda" else 2)
    rounds = args.rounds or (1 if args.quick or device == "cuda" else 2)
    if args.quick:
        settings = settings[:1]
    if args.vocabs:
        settings = [s for s in settings if (s.vocab_size or len(build_char_tokenizer())) in args.vocabs]
    records, load, commit_at_start = [], [os.getloadavg()], git_commit()
    for s in settings:
        print(
            f"{s.preset}: {s.prompts_per_step} prompts x {s.group} completions x {s.max_new_tokens} tokens", flush=True
        )
        records += run_setting(s, device, steps, rounds, args.providers)
        load.append(os.getloadavg())
    # The machine may be shared: the 1/5/15-minute load averages before and after each setting; and the
    # tracked files that differed from the commit while it ran (others' work in progress shows up here).
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           check=False, cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")  # fmt: skip
    write_results(
        "e2e_grpo",
        device,
        records,
        extra={
            "steps": steps,
            "rounds": rounds,
            "loadavg": load,
            "commit_at_start": commit_at_start,
            "uncommitted": [d[3:] for d in dirty if d.strip()],
        },
    )
    print()
    print(readme_table(records, device))


if __name__ == "__main__":
    main()
