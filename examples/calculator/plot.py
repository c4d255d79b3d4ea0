"""The README's calculator figure from bench/results/readme-numbers.json (its ``calculator`` case): the success
rate of the GRPO run's sampled episodes per step, one line per seed, and the held-out success of the policy before
SFT, after SFT and after GRPO.

    python examples/calculator/plot.py          # writes docs/calculator-success.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def plot(case: dict, machine: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.2), dpi=110)
    for i, run in enumerate(case["runs"]):
        color = f"C{i}"
        curve = run["reward_per_step"]
        last = len(curve)
        ax.plot(range(1, last + 1), curve, color=color, lw=1.2, label=f"seed {run['seed']}: training episodes (T = 1)")
        ev = run["eval"]
        ax.plot([0, last], [ev["sft"]["sampled"], ev["grpo"]["sampled"]], "o--", color=color, ms=5, lw=0.8)
        ax.plot([0, last], [ev["sft"]["greedy"], ev["grpo"]["greedy"]], "s:", color=color, ms=5, lw=0.8)
    ax.plot([], [], "o--", color="gray", label="held-out, sampled (T = 1): SFT -> GRPO")
    ax.plot([], [], "s:", color="gray", label="held-out, greedy: SFT -> GRPO")
    ax.set_xlabel("GRPO step (0: the SFT policy; before SFT every success rate is 0)")
    ax.set_ylabel("success rate (the product submitted)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"calculator tool, tiny-llama (0.1M parameters), {machine['cores']} CPU cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "readme-numbers.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "calculator-success.png"))
    args = ap.parse_args(argv)
    res = json.loads(Path(args.results).read_text())
    plot(res["cases"]["calculator"], res["machine"], Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
