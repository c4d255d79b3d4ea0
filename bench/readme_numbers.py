"""The README's measured outputs of commands, regenerated: the demo table, the letters example, the pipeline and the
calculator tool.

    python bench/readme_numbers.py             # run every case for seeds 0, 1, 2, write the JSON, rewrite the README
    python bench/readme_numbers.py --render    # only rewrite the README from the committed JSON
    python bench/readme_numbers.py --only pipeline   # measure one case again, keep the others from the JSON
    python bench/readme_numbers.py --only calculator # (also redraws docs/calculator-success.png)
    make readme-numbers                        # the same as the first line, in the project's venv

Each case is the README's command, run as a user runs it (a subprocess of the `fusedrl` CLI in a scratch directory),
once per seed. The runs are deterministic on one machine (one torch thread), not across CPUs (BLAS summation order),
so every number is stated with the CPU it was measured on and its spread over the seeds. Results:
bench/results/readme-numbers.json; the README's blocks between `<!-- readme-numbers:NAME -->` and
`<!-- /readme-numbers -->` are rendered from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results" / "readme-numbers.json"
SEEDS = (0, 1, 2)
# name -> the demo's flags (the README's rows). `--compare` runs the default demo first, unchanged (its summary.json
# is the default run's; its wall time is the summary's total before the comparison), then GRPO and DPO beside it.
DEMO_CASES = {
    "demo": ["--compare"],
    "demo-quick": ["--quick"],
    "demo-kl-0.01": ["--kl-coef", "0.01"],
}
DEMO_KEYS = ("rm_accuracy", "gold_reward_sft", "gold_reward_final", "proxy_reward_sft", "proxy_reward_final",
             "kl_final", "gold_reward_peak", "gold_reward_peak_step", "kl_at_gold_peak")  # fmt: skip
COMPARE_KEYS = ("gold", "proxy", "kl", "well_formed", "wall_s")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_command() -> list[str]:
    """The README's first `fusedrl train --prompts examples/...` command, as argv after `fusedrl`."""
    text = README.read_text()
    m = re.search(r"^fusedrl train --prompts examples/.*?(?<!\\)$", text, flags=re.M | re.S)
    if m is None:
        raise SystemExit("readme_numbers: no `fusedrl train --prompts examples/...` command in the README")
    argv = shlex.split(m.group(0).replace("\\\n", " "))
    return [str(ROOT / a) if a.startswith("examples/") else a for a in argv[1:]]


def pipeline_commands() -> dict[str, list[str]]:
    """The README's `fusedrl sft` / `fusedrl rm` / `fusedrl train --reward-model` commands (its "SFT -> reward model
    -> PPO on your data" section) as argv after `fusedrl`, the example data named by absolute path."""
    text = README.read_text()
    section = text[text.index("## SFT -> reward model -> PPO on your data") :]
    start = section.index("```bash") + len("```bash")
    commands = {}
    for line in section[start : section.index("```", start)].replace("\\\n", " ").splitlines():
        argv = shlex.split(line.split("#")[0])
        if argv[:1] == ["fusedrl"]:
            commands[argv[1]] = [str(ROOT / a) if a.startswith("examples/") else a for a in argv[1:]]
    if sorted(commands) != ["rm", "sft", "train"] or "--reward-model" not in commands["train"]:
        raise SystemExit(f"readme_numbers: the README's pipeline section has commands {sorted(commands)}")
    return commands


def measure_pipeline(tmp: Path, seeds=SEEDS) -> dict:
    """The README's three pipeline commands per seed (in ``tmp/pipeline-<seed>``), then examples/pipeline_report.py."""
    load_before = os.getloadavg()[0]
    runs = []
    for seed in seeds:
        work = tmp / f"pipeline-{seed}"
        work.mkdir()
        walls = [_run([*argv, "--seed", str(seed), "--no-progress"], work) for argv in pipeline_commands().values()]
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "pipeline_report.py"), "--runs", "runs"], cwd=work,
                           capture_output=True, text=True, check=True)  # fmt: skip
        runs.append({"seed": seed, "wall_s": round(sum(walls), 1), **json.loads(r.stdout)})
        print(f"pipeline seed {seed}: {runs[-1]}", flush=True)
    return {"commit": _commit(), "date": time.strftime("%Y-%m-%d"),
            "load_average": round(max(load_before, os.getloadavg()[0]), 2), "runs": runs}  # fmt: skip


def readme_commands(heading: str) -> list[list[str]]:
    """The commands of the first ```bash block after ``heading`` as argv lists (``fusedrl ...`` or ``python ...``),
    the repository's files named by absolute path."""
    text = README.read_text()
    section = text[text.index(heading) :]
    start = section.index("```bash") + len("```bash")
    out = []
    for line in section[start : section.index("```", start)].replace("\\\n", " ").splitlines():
        argv = shlex.split(line.split("#")[0])
        if argv:
            out.append([str(ROOT / a) if a.startswith("examples/") else a for a in argv])
    return out


CALCULATOR = "### Multi-turn on a CPU: a calculator tool"


def measure_calculator(tmp: Path, seeds=SEEDS) -> dict:
    """The README's calculator commands per seed (in ``tmp/calculator-<seed>``): SFT, GRPO, then evaluate.py on the
    random-weight, SFT and GRPO policies; the GRPO run's per-step success rate."""
    commands = readme_commands(CALCULATOR)
    kinds = [c[1] if c[0] == "fusedrl" else Path(c[1]).name for c in commands]
    if kinds != ["sft", "train", "evaluate.py"]:
        raise SystemExit(f"readme_numbers: the README's calculator section has commands {kinds}")
    load_before = os.getloadavg()[0]
    runs = []
    for seed in seeds:
        work = tmp / f"calculator-{seed}"
        work.mkdir()
        walls = [_run([*argv[1:], "--seed", str(seed), "--no-progress"], work) for argv in commands[:2]]
        argv = commands[2]
        r = subprocess.run([sys.executable, *argv[1:], "--seed", str(seed)], cwd=work, capture_output=True, text=True,
                           check=True)  # fmt: skip
        evals = list(json.loads(r.stdout.splitlines()[-1]).values())
        out = work / commands[1][commands[1].index("--output-dir") + 1]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append({"seed": seed, "sft_s": round(walls[0], 1), "grpo_s": round(walls[1], 1),
                     "eval": dict(zip(("before", "sft", "grpo"), evals)),
                     "reward_per_step": [m["rollout/reward_mean"] for m in metrics],
                     "turns_per_step": [m["episode/turns"] for m in metrics]})  # fmt: skip
        print(f"calculator seed {seed}: {runs[-1]}", flush=True)
    return {"commit": _commit(), "date": time.strftime("%Y-%m-%d"),
            "load_average": round(max(load_before, os.getloadavg()[0]), 2), "runs": runs}  # fmt: skip


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def _run(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", *argv], cwd=cwd, env=env, capture_output=True,
                       text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"readme_numbers: `fusedrl {shlex.join(argv)}` failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure(seeds=SEEDS) -> dict:
    load_before = os.getloadavg()[0]
    cases: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, flags in DEMO_CASES.items():
            for seed in seeds:
                out = tmp / f"{name}-{seed}"
                wall = _run(["demo", *flags, "--seed", str(seed), "--out", str(out), "--no-progress"], tmp)
                summary = json.loads((out / "summary.json").read_text())
                run = {"seed": seed, "wall_s": round(wall, 1), **{k: summary[k] for k in DEMO_KEYS}}
                if "--compare" in flags:
                    run["wall_s"] = round(summary["timings_s"]["total_s"], 1)
                    methods = json.loads((out / "compare.json").read_text())["methods"]
                    run["compare"] = {k: {f: v[f] for f in COMPARE_KEYS} for k, v in methods.items()}
                cases.setdefault(name, []).append(run)
                print(f"{name} seed {seed}: {cases[name][-1]}", flush=True)
        argv = train_command()
        out_flag = argv.index("--output-dir") + 1
        for seed in seeds:
            run_argv = [*argv, "--seed", str(seed), "--no-progress"]
            run_argv[out_flag] = str(tmp / f"letters-{seed}")
            wall = _run(run_argv, tmp)
            rows = [json.loads(line) for line in (tmp / f"letters-{seed}" / "metrics.jsonl").read_text().splitlines()]
            rewards = [r["rollout/reward_mean"] for r in rows]
            cases.setdefault("letters", []).append({"seed": seed, "wall_s": round(wall, 1), "steps": len(rows),
                                                    "reward_first5": sum(rewards[:5]) / 5,
                                                    "reward_last5": sum(rewards[-5:]) / 5})  # fmt: skip
            print(f"letters seed {seed}: {cases['letters'][-1]}", flush=True)
        cases["pipeline"] = measure_pipeline(tmp, seeds)
        cases["calculator"] = measure_calculator(tmp, seeds)
    import torch

    return {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": 1,
            "load_average": round(max(load_before, os.getloadavg()[0]), 2),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": list(seeds),
        "cases": cases,
    }


def _spread(runs: list[dict], key: str, fmt: str = "{:.3f}") -> str:
    """The seed-0 value (what the README's command prints), then the range over all seeds."""
    vals = [r[key] for r in runs]
    lo, hi = min(vals), max(vals)
    return f"{fmt.format(runs[0][key])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _wall(runs: list[dict]) -> str:
    vals = [r["wall_s"] for r in runs]
    return f"{min(vals):.0f}-{max(vals):.0f} s"


def render(res: dict) -> dict[str, str]:
    """README block name -> its text."""
    c, m = res["cases"], res["machine"]
    seeds = ", ".join(map(str, res["seeds"]))
    busy = m["load_average"] > 0.5 * m["cores"]
    wall_note = f" Wall times were taken with other jobs running (load average {m['load_average']})." if busy else ""
    head = (f"Measured by `make readme-numbers` on {m['cpu']} ({m['cores']} cores, one torch thread; torch "
            f"{res['versions']['torch']}, commit {res['commit']}, {res['date']}): each cell is seed 0's value (what "
            f"the command prints) and, in brackets, the range [min, max] over seeds {seeds}. Other CPUs give other digits "
            "(BLAS summation order); what holds everywhere (the reward model above chance, the gold reward rising "
            "over the SFT policy) is what `tests/test_demo.py` asserts." + wall_note + "\n\n")  # fmt: skip
    rows = [
        "| run | wall time | RM held-out accuracy | gold reward SFT -> final | proxy reward SFT -> final | "
        "KL at end (nats/seq) |",
        "|---|---|---|---|---|---|",
    ]
    titles = {"demo": "`fusedrl demo` (beta = 0.1, 120 PPO steps)", "demo-quick": "`fusedrl demo --quick` (CI)",
              "demo-kl-0.01": "`fusedrl demo --kl-coef 0.01`"}  # fmt: skip
    for name, title in titles.items():
        runs = c[name]
        gold = f"{_spread(runs, 'gold_reward_sft')} -> **{_spread(runs, 'gold_reward_final')}**"
        if name == "demo-kl-0.01":
            peak = runs[0]
            gold = (f"peaks at {_spread(runs, 'gold_reward_peak')} (seed 0: step {peak['gold_reward_peak_step']}, "
                    f"KL {peak['kl_at_gold_peak']:.1f}), ends at **{_spread(runs, 'gold_reward_final')}**")  # fmt: skip
        proxy = f"{_spread(runs, 'proxy_reward_sft')} -> {_spread(runs, 'proxy_reward_final')}"
        rows.append(f"| {title} | {_wall(runs)} | {_spread(runs, 'rm_accuracy')} | {gold} | {proxy} | "
                    f"{_spread(runs, 'kl_final', '{:.2f}')} |")  # fmt: skip
    compare = ["| | gold | proxy | KL | well-formed | time |", "|---|---|---|---|---|---|"]
    for method in c["demo"][0]["compare"]:
        runs = [{f: r["compare"][method][f] for f in COMPARE_KEYS} for r in c["demo"]]
        cells = [_spread(runs, "gold"), _spread(runs, "proxy"), _spread(runs, "kl", "{:.2f}"),
                 _spread(runs, "well_formed", "{:.2f}"), "-" if method == "sft" else _wall(runs)]  # fmt: skip
        compare.append(f"| {method.upper()} | " + " | ".join(cells) + " |")
    compare_text = (f"`fusedrl demo --compare`, measured by `make readme-numbers` on {m['cpu']} ({m['cores']} cores): "
                    f"seed 0's value and, in brackets, the range [min, max] over seeds {seeds}; times are each method's own "
                    f"training.{wall_note}\n\n" + "\n".join(compare))  # fmt: skip
    letters = c["letters"]
    letters_text = (f"measured by `make readme-numbers` on {m['cpu']} ({m['cores']} cores): {letters[0]['steps']} "
                    f"steps in {_wall(letters)}, the mean reward of the first five steps "
                    f"{_spread(letters, 'reward_first5', '{:.2f}')}, of the last five "
                    f"{_spread(letters, 'reward_last5', '{:.2f}')} (seed 0, and in brackets the range [min, max] over seeds "
                    f"{seeds})")  # fmt: skip
    blocks = {"demo-table": head + "\n".join(rows), "compare-table": compare_text, "letters": letters_text}
    if "pipeline" in c:
        blocks["pipeline"] = render_pipeline(c["pipeline"], m, seeds)
    if "calculator" in c:
        blocks["calculator"] = render_calculator(c["calculator"], m, seeds)
    return blocks


def render_calculator(case: dict, m: dict, seeds: str) -> str:
    runs = case["runs"]
    busy = case["load_average"] > 0.5 * m["cores"]
    load = f", with other jobs running (load average {case['load_average']})" if busy else ""
    steps = len(runs[0]["reward_per_step"])
    rows = ["| seed | SFT, GRPO time | held-out greedy: random -> SFT -> GRPO | held-out sampled: random -> SFT -> GRPO | "
            f"training episodes: steps 1-5 -> {steps - 4}-{steps} | tool calls per episode: SFT -> GRPO |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        ev, curve = r["eval"], r["reward_per_step"]
        stages = lambda how: " -> ".join(f"{ev[s][how]:.2f}" for s in ("before", "sft", "grpo"))  # noqa: E731
        rows.append(f"| {r['seed']} | {r['sft_s']:.0f} s, {r['grpo_s']:.0f} s | {stages('greedy')} | "
                    f"**{stages('sampled')}** | {sum(curve[:5]) / 5:.2f} -> {sum(curve[-5:]) / 5:.2f} | "
                    f"{ev['sft']['tool_calls']:.2f} -> {ev['grpo']['tool_calls']:.2f} |")  # fmt: skip
    return (f"Measured by `make readme-numbers` on {m['cpu']} ({m['cores']} cores, one torch thread; commit "
            f"{case['commit']}, {case['date']}{load}), seeds {seeds}: the share of episodes that submit the product, "
            "held out (the 100 rows of `test.jsonl`; sampled: 4 episodes per row at temperature 1) and during GRPO (its "
            "training episodes, mean over 5 steps).\n\n" + "\n".join(rows))  # fmt: skip


def render_pipeline(case: dict, m: dict, seeds: str) -> str:
    runs = case["runs"]
    busy = case["load_average"] > 0.5 * m["cores"]
    load = f", with other jobs running (load average {case['load_average']})" if busy else ""
    return (f"Measured by `make readme-numbers` on {m['cpu']} ({m['cores']} cores, one torch thread; commit "
            f"{case['commit']}, {case['date']}{load}): seed 0's value and, in brackets, the range [min, max] over seeds "
            f"{seeds}. The three commands take {_wall(runs)} together. The SFT policy's held-out loss is "
            f"{_spread(runs, 'sft_eval_loss', '{:.2f}')} nats per token (random digits and the eos that ends them: "
            f"about 2.14 is the floor); the reward model ranks {_spread(runs, 'rm_eval_accuracy')} of the 60 held-out "
            "pairs right (chance: 0.5); PPO against it raises the reward model's score of the sampled completions from "
            f"{_spread(runs, 'ppo_reward_first_3_steps', '{:.2f}')} (mean over steps 1-3) to "
            f"{_spread(runs, 'ppo_reward_last_3_steps', '{:.2f}')} (the last 3 steps), ending "
            f"{_spread(runs, 'ppo_kl_last_step', '{:.1f}')} nats per sequence from the SFT policy (`objective/kl`). "
            "What the comparisons asked for: the mean digit of sampled completions goes from "
            f"{_spread(runs, 'mean_digit_sft', '{:.2f}')} (SFT policy) to {_spread(runs, 'mean_digit_ppo', '{:.2f}')} "
            "(PPO).")  # fmt: skip


def rewrite_readme(blocks: dict[str, str], text: str) -> str:
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- readme-numbers:{re.escape(name)} -->)(.*?)(<!-- /readme-numbers -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"readme_numbers: README.md has no `<!-- readme-numbers:{name} -->` block")
        text = pattern.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(3), text, count=1)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="only rewrite the README from the committed JSON")
    ap.add_argument("--only", choices=["pipeline", "calculator"],
                    help="measure this case again, keep the others from the JSON")  # fmt: skip
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(RESULTS.read_text())
    elif args.only:
        res = json.loads(RESULTS.read_text())
        measure_case = {"pipeline": measure_pipeline, "calculator": measure_calculator}[args.only]
        with tempfile.TemporaryDirectory() as tmp:
            res["cases"][args.only] = measure_case(Path(tmp), res["seeds"])
        RESULTS.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    else:
        res = measure()
        RESULTS.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    if not args.render and args.only in (None, "calculator"):
        subprocess.run([sys.executable, str(ROOT / "examples" / "calculator" / "plot.py")], check=True)
    README.write_text(rewrite_readme(render(res), README.read_text()))
    print("rewrote README.md's readme-numbers blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
