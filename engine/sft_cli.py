"""``fusedrl sft``: supervised fine-tuning on your demonstrations, the first stage of SFT -> reward model -> PPO.

    fusedrl sft --model Qwen/Qwen2.5-0.5B --data demos.jsonl --eval-fraction 0.05 --output-dir runs/sft
    fusedrl train --policy runs/sft/policy --reward-model runs/rm/reward_model --prompts prompts.jsonl ...

Records (a .jsonl/.json/.parquet file, a datasets directory or a Hub data set), one of:
- ``{"prompt": "...", "completion": "..."}``: the prompt is tokenized as ``fusedrl train`` tokenizes prompts
  (with the tokenizer's special tokens), the completion after it, ended by the tokenizer's eos;
- ``{"messages": [{"role", "content"}, ...]}``: a conversation rendered with the tokenizer's chat template;
  every assistant turn is trained on (the tokens the template renders for it, its end-of-turn included);
- ``{"prompt": [messages], "completion": [messages]}`` (TRL's conversational prompt-completion form; the
  completion may also be a string, the assistant's content): the completion as the template renders it.
A chat record may carry ``"tools"``: a list of JSON schemas of the functions the conversation could call (TRL's
``tools`` column), given to the chat template so that the demonstrations see the tool list the policy will see.
A character tokenizer or any other without a chat template cannot render messages: such a record stops the
run with one line naming it.

The loss is the mean negative log-likelihood of the completion (assistant) tokens of each step's records;
prompt, system, user and tool tokens condition the model and get no gradient. Records are packed
padding-free into token-budget micro-batches (``--max-tokens-per-microbatch``), the log-probs computed from
the last hidden states through the fused lm_head op (no (tokens x vocab) logits kept). Output directory:
``metrics.jsonl`` (``loss``, and ``eval/loss`` on the held-out records), ``config.yaml``, checkpoints and the
final ``policy/``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import is_conversation
from .offline import OfflineConfig


@dataclass(frozen=True)
class Demonstration:
    """One record as token ids and the per-token loss mask (1 = a completion token the loss trains on)."""

    tokens: list[int]
    mask: list[int]
    where: str
    """``file:line`` (or ``source row i``) of the record."""


def _chat_segments(tokenizer, messages: list, spans: list[tuple[int, int]], where: str,
                   tools: list | None = None) -> list[tuple[str, int]]:  # fmt: skip
    """``(text, trained)`` pieces of ``messages`` through the chat template: ``messages[a:b]`` of each span is
    trained on, as the template renders it after the generation prompt of ``messages[:a]``; the rest is context.
    Each rendering must extend the one before it, or the trained tokens cannot be told apart."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the record holds chat messages but the tokenizer has no chat template (give "
                         "prompt / completion strings, or --tokenizer with a chat_template)")  # fmt: skip
    out, done = [], ""
    for a, b in spans:
        head = tokenizer.apply_chat_template(messages[:a], tools=tools, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[:b], tools=tools, tokenize=False)
        if not head.startswith(done) or not full.startswith(head):
            raise ValueError(f"{where}: the chat template renders the conversation up to message {b} with a "
                             f"different prefix than up to message {a}, so the trained tokens cannot be told "
                             "apart")  # fmt: skip
        out += [(head[len(done) :], 0), (full[len(head) :], 1)]
        done = full
    return out


def encode_demonstration(tokenizer, row, where: str, *, max_length: int | None = None) -> Demonstration:
    """Token ids and loss mask of one record (formats: the module docstring); ValueError naming ``where``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' and 'completion', or 'messages'; got "
                         f"{type(row).__name__}")  # fmt: skip
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: 'tools' must be a list of JSON schema objects, got {type(tools).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not is_conversation(msgs):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not turns:
            raise ValueError(f"{where}: 'messages' has no assistant message to train on")
        if turns[0] == 0:
            raise ValueError(f"{where}: the first message is the assistant's; a trained turn needs a context before it")
        pieces = _chat_segments(tokenizer, msgs, [(i, i + 1) for i in turns], where, tools)
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            if not isinstance(completion, str):
                raise ValueError(f"{where}: 'completion' must be a string when 'prompt' is one, got "
                                 f"{type(completion).__name__}")  # fmt: skip
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            tokens, mask, pieces = p + c, [0] * len(p) + [1] * len(c), None
        elif is_conversation(prompt):
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            if not is_conversation(completion):
                raise ValueError(f"{where}: 'completion' must be a string or a list of {{'role', 'content'}} "
                                 "messages when 'prompt' is a list of messages")  # fmt: skip
            msgs = list(prompt) + list(completion)
            pieces = _chat_segments(tokenizer, msgs, [(len(prompt), len(msgs))], where, tools)
        else:
            raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages, got "
                             f"{type(prompt).__name__}")  # fmt: skip
    else:
        raise ValueError(f"{where}: expected 'prompt' and 'completion', or 'messages'; the record has "
                         f"{sorted(row)}")  # fmt: skip
    if pieces is not None:  # each piece tokenized alone, so no token straddles a prompt / completion border
        tokens, mask = [], []
        for text, trained in pieces:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            tokens += ids
            mask += [trained] * len(ids)
    first = mask.index(1) if 1 in mask else len(mask)
    if first == 0:
        raise ValueError(f"{where}: the prompt encodes to zero tokens (the first completion token needs a context)")
    if first == len(mask):
        raise ValueError(f"{where}: the completion encodes to zero tokens")
    if max_length is not None and len(tokens) > max_length:
        if first >= max_length:
            raise ValueError(f"{where}: the prompt is {first} tokens, which leaves no room for a completion within "
                             f"max_length={max_length}")  # fmt: skip
        tokens, mask = tokens[:max_length], mask[:max_length]
    return Demonstration(list(tokens), list(mask), where)


def encode_demonstrations(tokenizer, records: Sequence[tuple[str, object]], *, max_length: int | None = None,
                          max_tokens: int | None = None) -> list[Demonstration]:  # fmt: skip
    """Every ``(where, row)`` record encoded; a record longer than the micro-batch budget is an error (never split)."""
    out = []
    for where, row in records:
        d = encode_demonstration(tokenizer, row, where, max_length=max_length)
        if max_tokens is not None and len(d.tokens) > max_tokens:
            raise ValueError(f"{where}: the record is {len(d.tokens)} tokens, more than max_tokens_per_microbatch="
                             f"{max_tokens}: a record is never split, raise the budget or set --max-length")  # fmt: skip
        out.append(d)
    return out


class PackedDemonstrations:
    """Demonstrations in a ``RolloutBuffer`` (the loss mask as its response mask), planned into micro-batches."""

    def __init__(self, demos: Sequence[Demonstration], max_tokens: int, device: torch.device):
        from .packing import RolloutBuffer

        self.buf = RolloutBuffer(fields=())
        self.buf.append_many([np.asarray(d.tokens, dtype=np.int64) for d in demos],
                             [np.asarray(d.mask, dtype=np.uint8) for d in demos])  # fmt: skip
        self.lengths = np.asarray([len(d.tokens) for d in demos], dtype=np.int64)
        # A record's first token is prompt (checked when encoding), so every masked token is some row's target.
        self.loss_tokens = np.asarray([sum(d.mask) for d in demos], dtype=np.int64)
        self.max_tokens, self.device = max_tokens, device

    def __len__(self) -> int:
        return len(self.lengths)

    def micro_batches(self, ids: np.ndarray) -> list:
        from .packing import plan_microbatches
        from .scoring import MicroBatch

        return [MicroBatch(self.buf, ids[idx], self.device)
                for idx in plan_microbatches(self.lengths[ids], self.max_tokens)[0] if len(idx)]  # fmt: skip


class SFTObjective:
    """Summed negative log-likelihood of the completion tokens; the step's mean is over its completion tokens."""

    def __init__(self, model, train: PackedDemonstrations, held_out: PackedDemonstrations | None, *,
                 backend: str = "auto"):  # fmt: skip
        self.model, self.train, self.held_out, self.backend = model, train, held_out, backend
        self.num_records = len(train)

    def micro_batches(self, ids: np.ndarray) -> list:
        return self.train.micro_batches(ids)

    def denominator(self, ids: np.ndarray) -> float:
        return float(self.train.loss_tokens[ids].sum())

    def loss(self, mb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .scoring import token_logprobs

        nll = -token_logprobs(self.model, mb, temperature=1.0, backend=self.backend).sum()
        return nll, {"loss": nll.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.held_out is None:
            return {}
        from .scoring import token_logprobs

        total = torch.zeros((), dtype=torch.float64)
        for mb in self.held_out.micro_batches(np.arange(len(self.held_out))):
            total += token_logprobs(self.model, mb, temperature=1.0, backend=self.backend).double().sum().cpu()
        return {"eval/loss": -float(total) / float(self.held_out.loss_tokens.sum())}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
DATA_HELP = (
    "records {prompt, completion} or {messages}: a .jsonl/.json/.parquet file, a datasets directory or a Hub data set"
)


def setup(cfg: OfflineConfig):
    """Everything before the first step: ``(model, tokenizer, objective)``. The user's mistakes (a missing file,
    a bad record, a bad model id, an existing run directory) surface here."""
    from .attention import use_packed_attention
    from .checkpoint import prepare_run_dir
    from .models import PRESETS, build_causal_lm
    from .offline import load_tokenizer_for, max_length_of, read_records, setup_device, split_records

    device = setup_device(cfg)
    prepare_run_dir(Path(cfg.output_dir), resume=cfg.resume, overwrite=cfg.overwrite, extra_files=("policy",))
    tokenizer = load_tokenizer_for(cfg)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {cfg.tokenizer or cfg.model!r} has no eos token to end completions with")
    train, held = split_records(read_records(cfg.data, split=cfg.dataset_split, config=cfg.dataset_config), cfg)
    model = build_causal_lm(cfg.model, vocab_size=len(tokenizer) if cfg.model in PRESETS else None, seed=cfg.seed,
                            dtype=getattr(torch, cfg.dtype)).to(device)  # fmt: skip
    max_length = max_length_of(cfg, model)
    encode = lambda recs: encode_demonstrations(tokenizer, recs, max_length=max_length,
                                                max_tokens=cfg.max_tokens_per_microbatch)  # fmt: skip
    pack = lambda demos: PackedDemonstrations(demos, cfg.max_tokens_per_microbatch, device)
    use_packed_attention(model)
    objective = SFTObjective(model, pack(encode(train)), pack(encode(held)) if held else None, backend=cfg.backend)
    return model, tokenizer, objective


def main(argv: Sequence[str] | None = None) -> int:
    import dataclasses

    from .offline import USER_ERRORS, fit, parse_args, report, run_config_of

    cfg = parse_args(sys.argv[1:] if argv is None else argv, prog="fusedrl sft", data_help=DATA_HELP,
                     description="Supervised fine-tuning on prompt / completion or chat-message records, the loss on "
                     "completion tokens only, packed. Writes metrics.jsonl, config.yaml, checkpoints and the final "
                     "policy/ to --output-dir (runs/sft when not given).")  # fmt: skip
    if cfg.output_dir is None:
        cfg = dataclasses.replace(cfg, output_dir="runs/sft")
    started = time.monotonic()
    try:
        model, tokenizer, objective = setup(cfg)
    except USER_ERRORS as e:
        raise SystemExit(f"fusedrl sft: {' '.join(str(e).split())}") from None
    print(f"fusedrl sft: {objective.num_records} demonstrations ({int(objective.train.loss_tokens.sum())} completion "
          f"tokens) from {cfg.data}" + (f", {len(objective.held_out)} held out" if objective.held_out else "")
          + f"; model {cfg.model}", file=sys.stderr)  # fmt: skip
    # An error once training runs is a bug or a numerical failure: it keeps its traceback.
    rows = fit(model, tokenizer, objective, cfg, final_name="policy", run_config=run_config_of(cfg))
    last = rows[-1] if rows else {}
    summary = f"last loss {last.get('loss', math.nan):.4f}"
    if "eval/loss" in last:
        summary += f", held-out loss {last['eval/loss']:.4f}"
    out = Path(cfg.output_dir)
    report("fusedrl sft", out, rows, summary, [
        ("metrics.jsonl", "one JSON object of metrics per step (loss, eval/loss)"),
        ("config.yaml", "the run's settings"),
        ("policy", f"the fine-tuned model + tokenizer: fusedrl train --policy {out / 'policy'}, fusedrl rm --model "
                   f"{out / 'policy'}, AutoModelForCausalLM.from_pretrained"),
    ], time.monotonic() - started)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
