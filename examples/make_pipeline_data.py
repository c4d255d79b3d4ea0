"""Writes examples/pipeline/: the toy data of the README's SFT -> reward model -> PPO commands, in the formats
`fusedrl sft`, `fusedrl rm` and `fusedrl train` read (re-running it rewrites the same files).

The task: a prompt is a few digits ended by ":", a completion is 3-6 digits. The demonstrations are random
well-formed completions (they teach the form: digits, then stop). The comparisons prefer, of two random
completions of one prompt, the one whose digits are bigger on average: the preference the reward model has to
find, and that PPO then optimises.

    python examples/make_pipeline_data.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "pipeline"


def digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def mean_digit(s: str) -> float:
    return sum(map(int, s)) / len(s)


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(exist_ok=True)
    sft = [{"prompt": digits(rng, 3, 5) + ":", "completion": digits(rng, 3, 6)} for _ in range(200)]
    pairs = []
    while len(pairs) < 300:
        prompt, a, b = digits(rng, 3, 5) + ":", digits(rng, 3, 6), digits(rng, 3, 6)
        if mean_digit(a) != mean_digit(b):
            chosen, rejected = (a, b) if mean_digit(a) > mean_digit(b) else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    prompts = [{"prompt": digits(rng, 3, 5) + ":"} for _ in range(64)]
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs), ("prompts.jsonl", prompts)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
