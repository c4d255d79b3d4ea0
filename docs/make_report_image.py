"""Regenerates docs/report-reward.png, the report image in the README: two short GRPO runs of the README's letters
example (KL coefficient 0 and 0.05) through ``fusedrl report``, the reward plot of the two overlaid.

    python docs/make_report_image.py            # ~1 minute on 2 CPU cores; runs in a temporary directory
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--prompts", str(ROOT / "examples" / "letters.jsonl"), "--reward-fn", "count_token", "--reward-kwargs",
         '{"token": "a"}', "--advantage-estimator", "grpo", "--prompts-per-step", "4", "--samples-per-prompt", "8",
         "--max-new-tokens", "8", "--learning-rate", "1e-2", "--total-steps", "30", "--log-completions", "10",
         "--threads", "1", "--no-progress"]  # fmt: skip


def fusedrl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", *args], check=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"kl0": "0", "kl0.05": "0.05"}
        for name, kl in runs.items():
            fusedrl("train", *TRAIN, "--kl-coef", kl, "--output-dir", str(Path(tmp) / name))
        fusedrl("report", *(str(Path(tmp) / n) for n in runs), "--out", str(Path(tmp) / "report"))
        shutil.copy(Path(tmp) / "report" / "reward.png", ROOT / "docs" / "report-reward.png")
    print(f"wrote {ROOT / 'docs' / 'report-reward.png'}")


if __name__ == "__main__":
    main()
