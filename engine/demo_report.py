"""The report of ``fusedrl demo``: the per-step metrics joined with the gold scores, the summary, the plot of
gold and proxy reward against KL (the axes of Gao et al. 2022's over-optimisation curve; whether the run
over-optimised is read off the numbers, not assumed), the console table, and ``--compare``'s PPO / GRPO /
DPO table and plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .distributed import resolve_device
from .metrics import read_metrics


def merge_metrics(trainer_metrics: Path, gold_log: Path, out_path: Path) -> list[dict]:
    """The trainer's rows with the gold rows of the same steps joined in (a step logged twice, by a run
    that crashed after it and the resumed run, keeps its last row); written to ``out_path`` as JSONL."""
    gold = {r["step"]: r for r in read_metrics(gold_log)}
    by_step = {r["step"]: r for r in read_metrics(trainer_metrics)}
    rows = []
    for step in sorted(by_step):
        row = dict(by_step[step])
        row.update({k: v for k, v in gold.get(step, {}).items() if k != "step"})
        rows.append(row)
    out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_summary(cfg, stages: dict, sft_eval: dict, final_eval: dict, rows: list[dict], timings: dict) -> dict:
    """summary.json (``cfg``: the run's DemoConfig): the stage results, SFT vs final policy on held-out prompts, and
    where the gold peaked."""
    window = 5  # rollout means of one step are noisy: peaks are read off a moving average
    gold = _smooth([r.get("gold/reward_mean", math.nan) for r in rows], window)
    proxy = _smooth([r.get("rollout/reward_mean", math.nan) for r in rows], window)
    peak = max(range(len(rows)), key=lambda i: gold[i]) if rows else None
    return {
        "rm_accuracy": stages["rm_accuracy"],
        "rm_accuracy_noisy_labels": stages["rm_accuracy_noisy_labels"],
        "rm_train_accuracy": stages["rm_train_accuracy"],
        "gold_reward_sft": sft_eval["gold"],
        "proxy_reward_sft": sft_eval["proxy"],
        "gold_reward_final": final_eval["gold"],
        "proxy_reward_final": final_eval["proxy"],
        "kl_final": final_eval["kl"],
        "well_formed_sft": sft_eval["well_formed"],
        "well_formed_final": final_eval["well_formed"],
        "completion_len_sft": sft_eval["length"],
        "completion_len_final": final_eval["length"],
        "gold_reward_peak": gold[peak] if rows else None,
        "gold_reward_peak_step": rows[peak]["step"] if rows else None,
        "kl_at_gold_peak": rows[peak].get("objective/kl") if rows else None,
        "gold_reward_last": gold[-1] if rows else None,
        "proxy_reward_at_gold_peak": proxy[peak] if rows else None,
        "proxy_reward_last": proxy[-1] if rows else None,
        "sft_loss_final": stages["sft_loss_final"],
        "rm_loss_final": stages["rm_loss_final"],
        "ppo_steps": len(rows),
        "kl_coef": cfg.kl_coef,
        "flip_rate": cfg.flip_rate,
        "examples_sft": sft_eval["examples"],
        "examples_final": final_eval["examples"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "device": str(resolve_device(cfg.device)),
    }


def _smooth(xs: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (per-step rollout means are noisy)."""
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def _kl_bins(kl: list[float], *series: list[float], n_bins: int) -> tuple[list[float], ...]:
    """Means of ``kl`` and of each series over ``n_bins`` equal-count bins of the steps sorted by KL."""
    order = sorted((i for i in range(len(kl)) if kl[i] == kl[i]), key=lambda i: kl[i])
    bins = [order[len(order) * b // n_bins : len(order) * (b + 1) // n_bins] for b in range(n_bins)]
    bins = [b for b in bins if b]
    mean = lambda xs, b: sum(xs[i] for i in b) / len(b)  # noqa: E731
    return tuple([mean(xs, b) for b in bins] for xs in (kl, *series))


def overoptimised(summary: dict) -> bool:
    """Did the gold reward peak and fall (by more than 0.05, smoothed) while the proxy kept rising?"""
    if not summary.get("ppo_steps"):
        return False
    return (summary["gold_reward_peak"] - summary["gold_reward_last"] > 0.05
            and summary["proxy_reward_last"] >= summary["proxy_reward_at_gold_peak"])  # fmt: skip


def plot_report(rows: list[dict], sft_eval: dict, final_eval: dict, path: Path, *, kl_coef: float,
                overoptimised: bool = False) -> None:  # fmt: skip
    """report.png: gold and proxy reward against KL to the SFT policy (the axes of the over-optimisation
    curve; the title says whether this run shows over-optimisation), both rewards against the PPO step, and
    the KL against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    kl = [r.get("objective/kl", math.nan) for r in rows]
    gold = [r.get("gold/reward_mean", math.nan) for r in rows]
    proxy = [r.get("rollout/reward_mean", math.nan) for r in rows]
    w = max(1, len(rows) // 20)
    fig, (ax, ax_t, ax_k) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.4, 1, 0.8]})

    # KL does not grow monotonically step by step: average the steps in KL bins for the curve, starting
    # from the SFT policy at KL 0, and show every step as a faint point.
    kl_b, gold_b, proxy_b = _kl_bins(kl, gold, proxy, n_bins=min(15, max(1, len(rows) // 4)))
    kl_b, gold_b, proxy_b = [0.0] + kl_b, [sft_eval["gold"]] + gold_b, [sft_eval["proxy"]] + proxy_b
    ax.scatter(kl, gold, s=8, color="tab:green", alpha=0.25)
    ax.plot(kl_b, gold_b, "-o", ms=3, color="tab:green", label="gold (hidden scorer)")
    ax.scatter([final_eval["kl"]], [final_eval["gold"]], marker="*", s=150, color="tab:green", zorder=3,
               label="final policy, held-out prompts")  # fmt: skip
    ax.axhline(sft_eval["gold"], color="tab:green", ls=":", lw=1)
    ax.set_xlabel("KL(policy || SFT reference) per sequence [nats]")
    ax.set_ylabel("gold reward", color="tab:green")
    ax2 = ax.twinx()
    ax2.scatter(kl, proxy, s=8, color="tab:blue", alpha=0.25)
    ax2.plot(kl_b, proxy_b, "-o", ms=3, color="tab:blue", label="proxy (learned reward model)")
    ax2.scatter([final_eval["kl"]], [final_eval["proxy"]], marker="*", s=150, color="tab:blue", zorder=3)
    ax2.set_ylabel("proxy reward (reward-model units)", color="tab:blue")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3,
              fontsize=8)  # fmt: skip
    verdict = ("over-optimisation: gold peaked, then fell" if overoptimised else
               "no over-optimisation: gold and proxy rise together")  # fmt: skip
    ax.set_title(f"Gold and proxy reward vs KL (beta = {kl_coef:g})\n{verdict} (dotted: SFT gold)", fontsize=10)

    ax_t.plot(steps, _smooth(gold, w), color="tab:green", label="gold")
    ax_t.axhline(sft_eval["gold"], color="tab:green", ls=":", lw=1)
    ax_t.set_xlabel("PPO step")
    ax_t.set_ylabel("gold reward", color="tab:green")
    ax_t2 = ax_t.twinx()
    ax_t2.plot(steps, _smooth(proxy, w), color="tab:blue", label="proxy")
    ax_t2.set_ylabel("proxy reward", color="tab:blue")
    lines = ax_t.get_legend_handles_labels()
    lines2 = ax_t2.get_legend_handles_labels()
    ax_t.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
                fontsize=8)  # fmt: skip
    ax_t.set_title(f"Rollout rewards per step (moving average of {w})")

    ax_k.plot(steps, kl, color="tab:red", lw=1)
    ax_k.set_xlabel("PPO step")
    ax_k.set_ylabel("KL per sequence [nats]")
    ax_k.set_title("KL to the SFT reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(summary: dict, rows: list[dict], *, n_rows: int = 10) -> str:
    """The console table: the per-stage results, then gold / proxy / KL at evenly spaced PPO steps."""
    lines = [
        "",
        "fusedrl demo: SFT -> reward model -> PPO",
        f"  reward model held-out accuracy   {summary['rm_accuracy']:.3f}  (vs the gold preference; chance 0.5)",
        f"  {'':32} {'gold':>8} {'proxy':>8} {'KL':>8} {'well-formed':>12}",
        f"  {'SFT policy (reference)':32} {summary['gold_reward_sft']:8.3f} {summary['proxy_reward_sft']:8.3f} "
        f"{0.0:8.3f} {summary['well_formed_sft']:12.2f}",
        f"  {'PPO policy (final)':32} {summary['gold_reward_final']:8.3f} {summary['proxy_reward_final']:8.3f} "
        f"{summary['kl_final']:8.3f} {summary['well_formed_final']:12.2f}",
        "",
        f"  {'step':>6} {'gold':>8} {'proxy':>8} {'KL':>8}   (rollout means)",
    ]
    picks = sorted({round(i * (len(rows) - 1) / max(1, n_rows - 1)) for i in range(n_rows)}) if rows else []
    for i in picks:
        r = rows[i]
        gold, proxy, kl = (r.get(k, math.nan) for k in ("gold/reward_mean", "rollout/reward_mean", "objective/kl"))
        lines.append(f"  {r['step']:6d} {gold:8.3f} {proxy:8.3f} {kl:8.3f}")
    lines.append("")
    if rows and overoptimised(summary):
        lines.append(f"  over-optimisation: the gold reward peaked at {summary['gold_reward_peak']:.3f} (step "
                     f"{summary['gold_reward_peak_step']}, KL {summary['kl_at_gold_peak']:.2f}) and fell to "
                     f"{summary['gold_reward_last']:.3f} while the proxy kept rising")  # fmt: skip
    else:
        lines.append(f"  no over-optimisation at beta = {summary['kl_coef']:g}: try --kl-coef 0.01 (a weaker KL leash)")
    lines.append(f"  samples before: {', '.join(summary['examples_sft'][:4])}")
    lines.append(f"  samples after:  {', '.join(summary['examples_final'][:4])}")
    t = summary["timings_s"]
    lines.append(f"  time: {t.get('total_s', math.nan):.0f} s on {summary['device']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# --compare: PPO vs GRPO vs DPO
# ----------------------------------------------------------------------------------------------------
METHODS = {"sft": "SFT policy (reference)", "ppo": "PPO vs reward model", "grpo": "GRPO vs reward model",
           "dpo": "DPO on the pairs"}  # fmt: skip


def make_compare(cfg, evals: dict[str, dict], gold_logs: dict[str, Path]) -> dict:
    """compare.json: per method the held-out gold, proxy, KL to the SFT reference, well-formed fraction and
    wall time, and the per-step rollout gold of the RL runs (``gold_logs``: method -> its gold.jsonl)."""
    out = {"kl_coef": cfg.kl_coef, "ppo_steps": cfg.ppo_steps, "dpo_beta": cfg.dpo_beta, "dpo_epochs": cfg.dpo_epochs,
           "methods": {}}  # fmt: skip
    for name, ev in evals.items():
        row = {k: ev[k] for k in ("gold", "proxy", "kl", "well_formed", "length")}
        row["wall_s"] = round(ev["wall_s"], 2)
        row["examples"] = ev["examples"][:4]
        if "pairs" in ev:
            row["pairs"] = ev["pairs"]
        if name in gold_logs and Path(gold_logs[name]).is_file():
            rows = read_metrics(gold_logs[name])
            row["gold_per_step"] = [r["gold/reward_mean"] for r in rows]
        out["methods"][name] = row
    return out


def format_compare(result: dict) -> str:
    lines = ["", "fusedrl demo --compare: the same SFT reference, task and preference pairs",
             f"  {'':26} {'gold':>7} {'proxy':>7} {'KL':>7} {'well-formed':>12} {'time [s]':>9}"]  # fmt: skip
    for name, r in result["methods"].items():
        lines.append(f"  {METHODS.get(name, name):26} {r['gold']:7.3f} {r['proxy']:7.3f} {r['kl']:7.3f} "
                     f"{r['well_formed']:12.2f} {r['wall_s']:9.1f}")  # fmt: skip
    lines.append("  (time: the method's own training; PPO and GRPO also need the reward model stage, DPO does not)")
    return "\n".join(lines)


def plot_compare(result: dict, path: Path) -> None:
    """compare.png: held-out gold reward against KL to the reference for each method (with the proxy beside
    it), and the rollout gold per step of the RL runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    colors = {"sft": "tab:gray", "ppo": "tab:blue", "grpo": "tab:orange", "dpo": "tab:green"}
    fig, (ax, ax_p, ax_t) = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, r in methods.items():
        c = colors.get(name, "black")
        label = METHODS.get(name, name) + (f" ({r['wall_s']:.0f} s)" if name != "sft" else "")
        ax.scatter([r["kl"]], [r["gold"]], s=90, color=c, label=label)
        ax_p.scatter([r["kl"]], [r["proxy"]], s=90, color=c)
        if "gold_per_step" in r:
            g = r["gold_per_step"]
            w = max(1, len(g) // 20)
            smooth = [sum(g[max(0, i - w + 1) : i + 1]) / len(g[max(0, i - w + 1) : i + 1]) for i in range(len(g))]
            ax_t.plot(range(1, len(g) + 1), smooth, color=c, label=METHODS.get(name, name))
    ax_t.axhline(methods["sft"]["gold"], color="tab:gray", ls=":", lw=1, label="SFT")
    ax.set_xlabel("KL(policy || SFT reference) per sequence [nats]")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(f"Gold reward vs KL (beta = {result['kl_coef']:g} for PPO/GRPO, {result['dpo_beta']:g} for DPO)",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="best")
    ax_p.set_xlabel("KL(policy || SFT reference) per sequence [nats]")
    ax_p.set_ylabel("proxy reward (learned reward model)")
    ax_p.set_title("Proxy reward vs KL: what PPO/GRPO optimise", fontsize=10)
    ax_t.set_xlabel("RL step")
    ax_t.set_ylabel("rollout gold reward")
    ax_t.set_title("Rollout gold per step (PPO, GRPO)", fontsize=10)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
