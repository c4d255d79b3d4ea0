"""A weak starting policy for the GSM8K-style example: the tiny preset, supervised for a few steps on the final
answers of examples/gsm8k_mini.jsonl (under-trained on purpose: about a fifth of its sampled answers are
right), saved with its tokenizer as a directory that `fusedrl train --policy` loads.

    python examples/gsm8k_mini_sft.py --out runs/gsm8k-sft          # ~10 s on a CPU
    fusedrl train --policy runs/gsm8k-sft --prompts examples/gsm8k_mini.jsonl --reward-fn math_answer ...
"""

import argparse
import json
from pathlib import Path

import torch

from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.sft import SFTConfig, train_sft
from fusedrl.engine.tokenizer import build_char_tokenizer

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gsm8k-sft", help="where the model and tokenizer are saved")
    parser.add_argument("--steps", type=int, default=40, help="SFT steps (80 already gets ~3/4 of answers right)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 0.1M-parameter model gains nothing from more
    rows = [json.loads(line) for line in (HERE / "gsm8k_mini.jsonl").read_text().splitlines()]
    questions = [r["question"] for r in rows]
    answers = [" " + r["answer"].rsplit("####", 1)[1].strip() for r in rows]  # the final answer, then eos
    tok = build_char_tokenizer()
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=args.seed)
    losses = train_sft(model, tok, questions, answers,
                       SFTConfig(steps=args.steps, batch_size=len(rows), lr=3e-3, warmup_steps=5, seed=args.seed),
                       progress=False)  # fmt: skip
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"SFT loss {losses[0]:.2f} -> {losses[-1]:.2f}; policy saved to {args.out}/ "
          f"(fusedrl train --policy {args.out} ...)")  # fmt: skip


if __name__ == "__main__":
    main()
