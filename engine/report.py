"""``fusedrl report``: plots of one run or several overlaid, as PNGs and one self-contained HTML page.

    fusedrl report runs/a                        # -> runs/a/report/report.html + one PNG per plot
    fusedrl report runs/a runs/b --out cmp       # both runs on the same axes, in cmp/

A run is a directory holding ``metrics.jsonl`` (what ``fusedrl train``, ``dpo`` and ``demo`` write); its
``completions.jsonl`` (``--log-completions``), when present, gives the page the table of the last logged step.
Each plot groups related metrics, one panel per metric key, every run in its own colour; a plot appears only
when one of the runs has a metric of its group, and metrics that fit no group land in "Other metrics". The page
embeds its images as ``data:`` URIs and loads nothing else: it opens offline, from anywhere.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import COMPLETIONS_FILE, read_metrics

METRICS_FILE = "metrics.jsonl"
# (file name, title, key patterns): a metric goes to the first plot one of whose patterns matches it whole.
PLOTS = (
    ("reward", "Reward", (r"rollout/reward_mean", r"rollout/reward_std", r"rollout/score_mean",
                                                 r"rollout/reward/.+", r"gold/.+", r"proxy/.+",
                                                 r"rewards/(chosen|rejected|margins|accuracies)")),
    ("kl", "KL to the reference", (r"objective/kl", r"objective/kl_coef", r"policy/kl", r"policy/approx_kl")),
    ("entropy", "Entropy", (r"policy/entropy",)),
    ("clipping", "Clip fractions and ratios", (r"policy/clipfrac.*", r"policy/dualclip_frac", r"policy/ratio_max",
                                               r"value/clipfrac")),
    ("length", "Response length and truncation", (r"rollout/response_len", r"rollout/eos_frac",
                                                  r"rollout/truncat.*")),
    ("advantages", "Advantage and value statistics", (r"objective/advantage.*", r"value/(?!grad_norm).+")),
    ("losses", "Losses, gradient norms, learning rate", (r"loss/.+", r"loss", r"nll_loss", r"log_odds_ratio",
                                                         r".*grad_norm", r"lr", r"train/.+", r"logps/.+")),
    ("throughput", "Throughput", (r"perf/.*tokens_per_s",)),
    ("phase_times", "Phase times", (r"perf/.+_s",)),
    ("memory", "Peak memory", (r"perf/peak_mem.*",)),
    ("rollout", "Rollout mismatch and staleness", (r"rollout/logp_mismatch.*", r"rollout/ratio_max",
                                                   r"rollout/corrected_frac", r".*stale.*")),
)  # fmt: skip
OTHER = ("other", "Other metrics")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


class ReportError(ValueError):
    """A run directory or metrics file the report cannot use; the message names it (and the line)."""


@dataclass
class Run:
    """One run directory: its metric rows in step order and the completions of its last logged step."""

    path: Path
    label: str
    rows: list[dict]
    completions_step: int | None = None
    completions: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was dropped while reading, shown on the page

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.rows for k, v in r.items() if k != "step" and _is_number(v)))

    def series(self, key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], float(r[key])) for r in self.rows if key in r and _is_number(r[key])]
        return [s for s, _ in pts], [v for _, v in pts]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """``read_metrics``, with its torn-last-line warning turned into a note and any other bad line into a
    ReportError naming the file and line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rows = read_metrics(path)
        except (ValueError, OSError) as e:
            raise ReportError(str(e)) from None
    notes += [str(w.message) for w in caught]
    for i, row in enumerate(rows, 1):
        step = row.get("step")
        if not _is_number(step) or step != int(step):
            raise ReportError(f"metrics file {str(path)!r}: JSON row {i} has no integer 'step' (got {step!r})")
    return rows


def load_run(path: str | Path, label: str | None = None) -> Run:
    """The run in directory ``path``; ReportError when it is missing, not a run, or its metrics file is damaged."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{str(path)!r} does not exist")
    if not path.is_dir() or not (path / METRICS_FILE).is_file():
        raise ReportError(f"{str(path)!r} is not a run directory (no {METRICS_FILE} in it)")
    notes: list[str] = []
    rows = _read_jsonl(path / METRICS_FILE, notes)
    if not rows:
        raise ReportError(f"{str(path / METRICS_FILE)!r} holds no metrics rows yet")
    # A step logged twice (a resumed run before it truncated the file) keeps its last row.
    by_step = {int(r["step"]): {**r, "step": int(r["step"])} for r in rows}
    run = Run(path, label or path.resolve().name, [by_step[s] for s in sorted(by_step)], notes=notes)
    if (path / COMPLETIONS_FILE).is_file():
        completions = _read_jsonl(path / COMPLETIONS_FILE, notes)
        if completions:
            run.completions_step = max(int(r["step"]) for r in completions)
            run.completions = [r for r in completions if int(r["step"]) == run.completions_step]
    return run


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short distinct names: the directory names, with parents added while two are alike."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def group_metrics(keys: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """``[(file name, title, keys)]`` for the plots that have at least one of ``keys``, in ``PLOTS`` order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        name = next((n for n, _, pats in PLOTS if any(re.fullmatch(p, key) for p in pats)), OTHER[0])
        groups.setdefault(name, []).append(key)
    titles = dict(((n, t) for n, t, _ in PLOTS), **{OTHER[0]: OTHER[1]})
    order = [n for n, _, _ in PLOTS] + [OTHER[0]]
    return [(n, titles[n], groups[n]) for n in order if n in groups]


def plot_group(runs: Sequence[Run], title: str, keys: Sequence[str]):
    """One matplotlib figure: a panel per key, each run a line in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.0 * nrows + 0.5), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, color=_COLORS[i % len(_COLORS)], label=run.label, linewidth=1.4,
                        marker="o" if len(steps) <= 40 else None, markersize=3)  # fmt: skip
        ax.set_title(key, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="upper right", fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px}img{max-width:100%;height:auto;border:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.text{font-family:monospace;white-space:pre-wrap;
max-width:520px;overflow-wrap:anywhere}.note{color:#a15c00}nav a{margin-right:12px}"""


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(v if isinstance(v, str) else json.dumps(v))


def render_html(runs: Sequence[Run], plots: Sequence[tuple[str, str, bytes]]) -> str:
    """The page: the runs, every plot as an embedded PNG, the completions table of each run's last logged step."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>fusedrl report: {e(', '.join(r.label for r in runs))}</title><style>{_CSS}</style></head><body>",
           f"<h1>fusedrl report: {e(', '.join(r.label for r in runs))}</h1>",
           "<table><tr><th>run</th><th>directory</th><th>steps</th><th>last step</th></tr>"]  # fmt: skip
    for i, r in enumerate(runs):
        swatch = f'<span style="color:{_COLORS[i % len(_COLORS)]}">&#9632;</span> '
        out.append(f"<tr><td>{swatch}{e(r.label)}</td><td>{e(str(r.path))}</td><td>{len(r.rows)}</td>"
                   f"<td>{r.rows[-1]['step']}</td></tr>")  # fmt: skip
    out.append("</table>")
    out += [f'<p class="note">{e(r.label)}: {e(n)}</p>' for r in runs for n in r.notes]
    out.append("<nav>" + "".join(f'<a href="#{n}">{e(t)}</a>' for n, t, _ in plots) +
               ('<a href="#completions">Completions</a>' if any(r.completions for r in runs) else "") + "</nav>")  # fmt: skip
    for name, title, png in plots:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<h2 id="{name}">{e(title)}</h2><img src="data:image/png;base64,{data}" alt="{e(title)}">')
    if any(r.completions for r in runs):
        out.append('<h2 id="completions">Completions</h2>')
        for r in runs:
            if not r.completions:
                continue
            cols = [c for c in dict.fromkeys(k for row in r.completions for k in row) if c != "step"]
            out.append(f"<h3>{e(r.label)}: step {r.completions_step}</h3><table><tr>" +
                       "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")  # fmt: skip
            for row in r.completions:
                cells = "".join(f'<td class="{"text" if isinstance(row.get(c), str) else "num"}">'
                                f"{_cell(row.get(c, ''))}</td>" for c in cols)  # fmt: skip
                out.append(f"<tr>{cells}</tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Read the runs, write ``<out_dir>/<plot>.png`` for each plot and ``<out_dir>/report.html``; returns the
    page's path. ReportError (naming the directory, file and line) for input it cannot use."""
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ReportError("give at least one run directory")
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths))]
    keys = list(dict.fromkeys(k for r in runs for k in r.keys))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, title, group in group_metrics(keys):
        png = _png(plot_group(runs, title, group))
        (out / f"{name}.png").write_bytes(png)
        plots.append((name, title, png))
    for name in ({n for n, _, _ in PLOTS} | {OTHER[0]}) - {n for n, _, _ in plots}:
        (out / f"{name}.png").unlink(missing_ok=True)  # a plot an earlier report of other runs left here
    page = out / "report.html"
    page.write_text(render_html(runs, plots), encoding="utf-8")
    return page


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fusedrl report",
        description="Plots of one or several runs (reward, KL, entropy, clip fractions, length and truncation, "
        "advantages and values, losses, throughput, phase times, memory, rollout mismatch) as PNGs and one "
        "self-contained HTML page with the completions table of each run's last logged step.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where the PNGs and report.html go (default: RUN_DIR/report for one run, "
                        "./fusedrl-report for several)")  # fmt: skip
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "fusedrl-report")
    try:
        page = make_report(args.runs, out)
    except ReportError as e:
        raise SystemExit(f"fusedrl report: {e}") from None
    names = [n for n, _, _ in PLOTS] + [OTHER[0]]
    pngs = [f"{n}.png" for n in names if (page.parent / f"{n}.png").is_file()]
    print(f"fusedrl report: {page} ({len(pngs)} plots beside it: {', '.join(pngs)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
