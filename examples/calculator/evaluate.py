"""Success rate of policies on the calculator task's held-out rows (test.jsonl): the share of episodes whose
submitted answer is the product, greedy and sampled at temperature 1 (what GRPO trains), through the same episode
runner ``fusedrl train --environment`` uses. Prints one JSON object.

    python examples/calculator/evaluate.py runs/calc-sft/policy runs/calc-grpo/policy
    python examples/calculator/evaluate.py tiny-llama --tokenizer examples/calculator/tokenizer   # random weights
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from calculator import Calculator  # noqa: E402

MAX_NEW_TOKENS = 64  # the longest turn: a tool call is 56 tokens, its end of turn included
MAX_TURNS = 3


def episode_trainer(policy, tokenizer, *, greedy: bool, samples: int, rows: int):
    """A trainer that is only used to run episodes: the task's turn limits, the hf engine (greedy or sampled)."""
    from fusedrl.engine.rollout_backends import HFBackend
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer

    class Greedy(HFBackend):
        def generate(self, policy, prompt_ids, *, n, spec, **kw):
            return super().generate(policy, prompt_ids, n=n, spec=dataclasses.replace(spec, greedy=True), **kw)

    # No step is taken: the estimator only has to accept one sample per row (greedy), which reinforce++ does.
    cfg = PPOConfig(prompts_per_step=rows, samples_per_prompt=samples, max_new_tokens=MAX_NEW_TOKENS,
                    max_turns=MAX_TURNS, advantage_estimator="reinforce++", rollout_backend="hf", progress=False)  # fmt: skip
    return PPOTrainer(
        policy, tokenizer, None, cfg, environment_factory=Calculator, rollout=Greedy() if greedy else None
    )


def success_rates(policy, tokenizer, rows: list[dict], *, samples: int = 4, seed: int = 0) -> dict[str, float]:
    """{"greedy": share solved by the argmax policy, "sampled": share of ``samples`` episodes per row solved at
    temperature 1, "tool_calls": mean tool calls per sampled episode}."""
    out = {}
    for greedy in (True, False):
        tr = episode_trainer(policy, tokenizer, greedy=greedy, samples=1 if greedy else samples, rows=len(rows))
        torch.manual_seed(seed)
        with torch.no_grad():
            r = tr.episodes.run(tr, rows)
        out["greedy" if greedy else "sampled"] = float(r.env_scores.mean())
        if not greedy:
            out["tool_calls"] = sum(r.stats["tools/calls"]) / len(r.stats["tools/calls"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policies", nargs="+", help="policy directories, or a preset name (random weights)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the policy's)")
    ap.add_argument("--rows", default=str(HERE / "test.jsonl"), help="held-out rows")
    ap.add_argument("--samples", type=int, default=4, help="sampled episodes per row")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling (and of a preset's random weights)")
    args = ap.parse_args(argv)
    from fusedrl.engine.models import PRESETS, build_causal_lm
    from fusedrl.engine.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    results = {}
    for name in args.policies:
        tok = load_tokenizer(args.tokenizer or name)
        policy = build_causal_lm(name, vocab_size=len(tok) if name in PRESETS else None, seed=args.seed)
        results[name] = success_rates(policy, tok, rows, samples=args.samples, seed=args.seed)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
