"""Multi-turn rollouts: episodes/s and tokens/s of ``EpisodeRunner.run`` (the rollout phase of a PPOTrainer step
with an environment) per rollout backend, on the same model, rows and environment, measured alternately.

    python bench/bench_episodes.py                     # 16 prompts x 4 samples = 64 episodes x 3 turns, tiny-llama
    python bench/bench_episodes.py --preset small-llama --backends hf hf-paged --repeats 3
    python bench/bench_episodes.py --env-latency-ms 20    # a remote environment: each answer takes ~20 ms

Backends: hf and hf-paged, and vllm when importable (run it in .venv-vllm). hf-paged and vllm run twice: turn-
synchronous (readmit=False) and re-admitting (readmit=True: an episode's next turn starts as soon as its
environment answered, while the others decode; engine/episode_stream.py).

Writes bench/results/episodes-<device>.json. The environment answers every turn with a short observation for
``turns - 1`` turns, then ends the episode, so every episode has exactly ``turns`` policy turns (none is cut by a
limit at the default sizes); the policy's turns run to ``max_new_tokens`` or a stop token. With
``--env-latency-ms`` each answer first sleeps a latency drawn from an exponential distribution of that mean
(seeded by row and turn: the same for every backend), as a remote environment or a sandboxed tool would.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment  # noqa: E402


def make_env(turns: int, latency_ms: float = 0.0):
    class Echo:
        def reset(self, **row):
            self.turns = 0
            self.rng = random.Random(row["prompt"])

        def step(self, completion: str) -> str | None:
            if latency_ms:
                time.sleep(self.rng.expovariate(1000.0 / latency_ms))
            self.turns += 1
            return None if self.turns >= turns else " go on:"

        def get_reward(self) -> float:
            return float(self.turns)

    return Echo


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument("--backends", nargs="+", default=None, help="default: hf hf-paged, and vllm when importable")
    p.add_argument("--env-latency-ms", type=float, default=0.0, help="mean latency of an environment answer")
    p.add_argument("--environment-workers", type=int, default=None, help="default: PPOConfig's")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    from fusedrl.engine.rollout_backends import vllm_available

    if args.backends is None:
        args.backends = ["hf", "hf-paged"] + (["vllm"] if vllm_available() else [])

    from fusedrl.engine import PPOConfig, PPOTrainer
    from fusedrl.engine.models import build_causal_lm
    from fusedrl.engine.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    rows = [{"prompt": f"{i}+{i % 7}="} for i in range(args.prompts)]
    trainers = {}
    modes = [(b, r) for b in args.backends for r in ((False, True) if b != "hf" else (False,))]
    # vLLM's CPU attention has no head_dim 16 (tiny-llama's): then every backend runs the preset with 2 heads of 32.
    shape = {"num_attention_heads": 2, "num_key_value_heads": 1} if "vllm" in args.backends else {}
    workers = {} if args.environment_workers is None else {"environment_workers": args.environment_workers}
    for backend, readmit in modes:
        cfg = PPOConfig(prompts_per_step=args.prompts, samples_per_prompt=args.samples, max_turns=args.turns,
                        max_new_tokens=args.max_new_tokens, rollout_backend=backend, advantage_estimator="grpo",
                        progress=False, readmit=readmit, **workers)  # fmt: skip
        policy = build_causal_lm(args.preset, vocab_size=len(tok), seed=0, **shape).to(args.device)
        name = backend + ("+readmit" if readmit else "")
        trainers[name] = PPOTrainer(
            policy, tok, None, cfg, environment_factory=make_env(args.turns, args.env_latency_ms)
        )
    times = {name: [] for name in trainers}
    counts = {}
    for r in range(args.repeats + 1):  # the first round warms up every backend
        for name, tr in trainers.items():  # alternately: load from other processes hits every backend alike
            torch.manual_seed(r)
            t0 = time.perf_counter()
            ro = tr.episodes.run(tr, rows)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t0)
            masks = ro.output.loss_mask
            counts[name] = {"episodes": len(masks), "sampled_tokens": sum(map(sum, masks)),
                            "tokens": sum(map(len, masks)), "turns": statistics.mean(ro.stats["episode/turns"])}  # fmt: skip
    records = []
    for name, ts in times.items():
        s = statistics.median(ts)
        c = counts[name]
        records.append({"backend": name, **c, "median_s": s, "episodes_per_s": c["episodes"] / s,
                        "sampled_tokens_per_s": c["sampled_tokens"] / s, "tokens_per_s": c["tokens"] / s,
                        "times_s": ts})  # fmt: skip
    print(f"{'backend':16} {'episodes':>8} {'turns':>5} {'median_s':>9} {'episodes/s':>10} {'sampled tok/s':>13}")
    for rec in records:
        print(f"{rec['backend']:16} {rec['episodes']:>8} {rec['turns']:>5.2f} {rec['median_s']:>9.3f} "
              f"{rec['episodes_per_s']:>10.1f} {rec['sampled_tokens_per_s']:>13.1f}")  # fmt: skip
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        tag = "cuda" if args.device == "cuda" else "cpu"
        path = RESULTS / (f"episodes-{tag}.json" if not args.env_latency_ms else
                          f"episodes-{tag}-latency{args.env_latency_ms:g}ms.json")  # fmt: skip
        setting = {k: getattr(args, k) for k in ("preset", "prompts", "samples", "turns", "max_new_tokens", "repeats",
                                                 "env_latency_ms")}  # fmt: skip
        setting["model_overrides"] = shape
        setting["versions"] = {m: importlib.metadata.version(m) for m in ("transformers", "vllm")
                               if importlib.util.find_spec(m) is not None}  # fmt: skip
        setting["environment_workers"] = next(iter(trainers.values())).config.environment_workers
        path.write_text(json.dumps({**environment(args.device), "setting": setting, "records": records}, indent=2)
                        + "\n")  # fmt: skip
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
