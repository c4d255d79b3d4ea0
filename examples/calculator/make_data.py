"""Writes the calculator task's files next to this script (re-running it rewrites the same files):

- ``tokenizer/``: a character tokenizer with the task's chat template and response parser (``<|im_start|>`` /
  ``<|im_end|>`` special, ``<|im_end|>`` its eos; ``<tool_call>`` / ``</tool_call>`` one token each);
- ``sft.jsonl``: 600 demonstrations ``{"messages": [...], "tools": [...]}`` in a seeded order: 400 use the tool
  (multiply, answer with its result, stop), 200 guess (answer a random 6-digit number without the tool, stop), so
  the SFT policy calls the tool on only part of the questions and RL has to find out that calling it pays;
- ``train.jsonl``: 256 RL rows ``{"prompt": "347*829", "a": 347, "b": 829}``;
- ``test.jsonl``: 100 held-out rows in the same form, for ``evaluate.py``.

Factors are 3-digit numbers whose product has 6 digits; no pair appears in two files.

    python examples/calculator/make_data.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from calculator import CHARS, CHAT_TEMPLATE, RESPONSE_TEMPLATE, Calculator  # noqa: E402

SIZES = {"sft": 400, "train": 256, "test": 100}
GUESSES = 200


def build_tokenizer():
    from fusedrl.engine.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(CHARS, model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.response_template = RESPONSE_TEMPLATE
    return tok


def tool_schemas() -> list[dict]:
    from transformers.utils import get_json_schema

    return [get_json_schema(getattr(Calculator, name)) for name in ("answer", "multiply")]  # the runner's order


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def demonstration(a: int, b: int, tools: list[dict]) -> dict:
    """The conversation a correct episode has: multiply, read the result, submit it, stop."""
    return {"messages": [
        {"role": "user", "content": f"{a}*{b}"},
        {"role": "assistant", "content": "", "tool_calls": [call("multiply", a=a, b=b)]},
        {"role": "tool", "name": "multiply", "content": str(a * b)},
        {"role": "assistant", "content": "", "tool_calls": [call("answer", value=a * b)]},
        {"role": "tool", "name": "answer", "content": "ok"},
        {"role": "assistant", "content": ""},
    ], "tools": tools}  # fmt: skip


def guess(a: int, b: int, value: int, tools: list[dict]) -> dict:
    """A demonstration that answers without the tool (wrong but for a 1 in 900,000 chance)."""
    return {"messages": [
        {"role": "user", "content": f"{a}*{b}"},
        {"role": "assistant", "content": "", "tool_calls": [call("answer", value=value)]},
        {"role": "tool", "name": "answer", "content": "ok"},
        {"role": "assistant", "content": ""},
    ], "tools": tools}  # fmt: skip


def pairs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if a * b >= 100_000 and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE), help="directory to write to (default: next to this script)")
    out = Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    drawn = pairs(rng, sum(SIZES.values()) + GUESSES)
    split = {}
    for name, size in SIZES.items():
        split[name], drawn = drawn[:size], drawn[size:]
    tools = tool_schemas()
    sft = [demonstration(a, b, tools) for a, b in split["sft"]]
    sft += [guess(a, b, rng.randint(100_000, 999_999), tools) for a, b in drawn[:GUESSES]]
    rng.shuffle(sft)
    rows = {
        "sft": sft,
        "train": [{"prompt": f"{a}*{b}", "a": a, "b": b} for a, b in split["train"]],
        "test": [{"prompt": f"{a}*{b}", "a": a, "b": b} for a, b in split["test"]],
    }
    for name, records in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    build_tokenizer().save_pretrained(out / "tokenizer")


if __name__ == "__main__":
    main()
