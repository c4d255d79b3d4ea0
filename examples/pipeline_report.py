"""The numbers the README states for its SFT -> reward model -> PPO commands, read from their output directories:
the SFT held-out loss, the reward model's held-out pairwise accuracy, the PPO run's reward-model score over its
first and last steps, and what the comparisons asked for: the mean digit of sampled completions, SFT policy
against PPO policy (random demonstrations average 4.5).

    python examples/pipeline_report.py --runs runs
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mean_digit(policy: Path, prompts: list[str], samples: int) -> float:
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    torch.manual_seed(0)
    digits = []
    for p in prompts:
        x = torch.tensor([tok(p)["input_ids"]] * samples)
        y = model.generate(x, max_new_tokens=8, do_sample=True, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)[:, x.shape[1] :]  # fmt: skip
        digits += [int(c) for text in tok.batch_decode(y, skip_special_tokens=True) for c in text if c.isdigit()]
    return sum(digits) / max(1, len(digits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="the folder holding sft/, rm/ and ppo/")
    parser.add_argument("--samples", type=int, default=8, help="completions sampled per prompt")
    args = parser.parse_args()
    runs = Path(args.runs)
    prompts = [json.loads(line)["prompt"] for line in (HERE / "pipeline" / "prompts.jsonl").read_text().splitlines()]
    sft, rm, ppo = rows(runs / "sft/metrics.jsonl"), rows(runs / "rm/metrics.jsonl"), rows(runs / "ppo/metrics.jsonl")
    score = lambda part: sum(r["rollout/reward_mean"] for r in part) / len(part)  # noqa: E731
    report = {
        "sft_eval_loss": sft[-1].get("eval/loss"),
        "rm_eval_accuracy": rm[-1].get("eval/accuracy"),
        "ppo_reward_first_3_steps": score(ppo[:3]),
        "ppo_reward_last_3_steps": score(ppo[-3:]),
        "ppo_kl_last_step": ppo[-1].get("objective/kl"),
        "mean_digit_sft": mean_digit(runs / "sft/policy", prompts, args.samples),
        "mean_digit_ppo": mean_digit(runs / "ppo/policy", prompts, args.samples),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
