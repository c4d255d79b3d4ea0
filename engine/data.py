"""Prompts in: rows from a file (JSONL, JSON, Parquet, CSV, plain text), a ``datasets`` data set saved to disk
(``load_from_disk``) or named on the Hub (``load_dataset``, cached), turned into the prompt texts the policy
sees and the extra columns a reward function may take.

    data = load_prompt_data("gsm8k.jsonl", tokenizer=tok)      # rows like {"prompt": [...messages], "answer": "72"}
    reward = bind_columns(math_answer, data)                     # math_answer(prompts, completions, answer=[...])
    PPOTrainer(policy, tok, reward, cfg).train(data.prompts)

A prompt is a string, or a list of chat messages (``{"role": ..., "content": ...}``) rendered with the
tokenizer's chat template and the generation prompt (``apply_chat_template(add_generation_prompt=True)``), so
the response the policy samples is the assistant's turn. The template's leading BOS is dropped when the
tokenizer adds one itself on encoding (one BOS, not two). Every other column travels with the prompt: a reward
function that takes it as a keyword argument (``answer=``, or ``**kwargs`` for all of them) receives one value
per completion, as TRL's reward functions do.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields tried, in order, when no prompt field is named.
PROMPT_FIELDS = ("prompt", "question", "text")
_TEXT_SUFFIXES = (".txt", ".text", "")


@dataclass
class PromptData:
    """Prompt texts (chat prompts already rendered) and the data set's other columns, row for row."""

    prompts: list[str]
    """What the policy is prompted with, one per row."""
    columns: dict[str, list[Any]] = field(default_factory=dict)
    """Every other column: name -> one value per row (None where a row lacks it)."""
    source: str = ""
    """Where the rows came from, for messages."""

    def __len__(self) -> int:
        return len(self.prompts)


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------
def _rows_from_json_lines(path: Path) -> list:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _rows_from_file(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _rows_from_json_lines(path)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _rows_from_json_lines(path)  # JSON lines named .json (what datasets' "json" loader reads too)
        if isinstance(data, dict):  # {"data": [rows]} or column-oriented {"prompt": [...], "answer": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(data) == 1 and lists:
                return lists[0]
            if len(lists) == len(data) and len({len(v) for v in lists}) == 1:
                return [dict(zip(data, values)) for values in zip(*lists)]
            raise ValueError(f"{path}: a JSON object must hold one list of rows or equal-length column lists")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'fusedrl[data]'") from None
        return pq.read_table(path).to_pylist()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in _TEXT_SUFFIXES:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"prompts file {str(path)!r}: unknown format {suffix!r} (expected .jsonl, .json, .parquet, "
                     ".csv, .tsv or .txt; or a datasets directory or Hub data set name)")  # fmt: skip


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("loading a datasets data set needs the datasets package: pip install 'fusedrl[data]'") \
            from None  # fmt: skip
    return datasets


def _pick_split(ds, split: str, source: str):
    if isinstance(ds, dict):  # a DatasetDict: one data set per split
        if split not in ds:
            raise ValueError(f"data set {source!r} has splits {sorted(ds)}, not {split!r} (--dataset-split)")
        ds = ds[split]
    return ds


def _rows_from_hub(name: str, config: str | None, split: str) -> list:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "not found, or no connection"
        raise FileNotFoundError(
            f"prompts {name!r} is not a local file or directory, and as a Hub data set it could not be loaded "
            f"({why}; {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): download it first or "
            "pass a local file"
        ) from None
    return list(ds)


def load_rows(source: str | os.PathLike, *, split: str = "train", config: str | None = None) -> list:
    """The rows of ``source``: a file, a directory written by ``datasets``' ``save_to_disk``, or a Hub data
    set name (``openai/gsm8k`` with ``config="main"``). Rows are dicts (or strings for text files)."""
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        return _rows_from_file(path)
    if path.is_dir():
        datasets = _datasets()
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(f"prompts directory {name!r} is not a data set written by datasets' save_to_disk "
                             "(no dataset_info.json / dataset_dict.json)") from None  # fmt: skip
        return list(_pick_split(ds, split, name))
    from .models import is_hub_id

    if name.startswith((".", "/", "~")) or Path(name).suffix or not is_hub_id(name.split(":")[0]):
        raise FileNotFoundError(f"prompts file {name!r} does not exist")
    return _rows_from_hub(name, config, split)


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------
def is_conversation(value) -> bool:
    """A list of chat messages: dicts with a "role" and a "content"."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))  # fmt: skip


def render_prompt(value, tokenizer, where: str = "prompt") -> str:
    """The text the policy is prompted with: a string as it is, chat messages through the tokenizer's chat
    template with the generation prompt (without the template's BOS when encoding adds one)."""
    if isinstance(value, str):
        return value
    if not is_conversation(value):
        raise TypeError(f"{where} must be a string or a list of chat messages ({{'role': ..., 'content': ...}}), "
                        f"got {type(value).__name__} {str(value)[:80]!r}")  # fmt: skip
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where} is a list of chat messages but the tokenizer has no chat template: use a chat "
                         "model's tokenizer (--tokenizer) or plain-text prompts")  # fmt: skip
    text = tokenizer.apply_chat_template(list(value), tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:  # encoding adds its own BOS: keep one
            text = text[len(bos) :]
    return text


def _prompt_field(rows: list, prompt_field: str | None, source: str) -> str | None:
    first = rows[0]
    if isinstance(first, str):
        if prompt_field is not None:
            raise ValueError(f"prompts {source!r} holds plain strings; --prompt-field {prompt_field!r} applies to rows "
                             "with fields")  # fmt: skip
        return None
    if not isinstance(first, dict):
        raise ValueError(f"prompts {source!r}: row 1 must be an object (or a string), got {type(first).__name__}")
    if prompt_field is not None:
        if prompt_field not in first:
            raise ValueError(f"prompts {source!r}: no field {prompt_field!r} in row 1 (fields: {sorted(first)})")
        return prompt_field
    for name in PROMPT_FIELDS:
        if name in first:
            return name
    raise ValueError(f"prompts {source!r}: row 1 has none of the fields {list(PROMPT_FIELDS)} (fields: "
                     f"{sorted(first)}); name the prompt field with --prompt-field")  # fmt: skip


def prompt_data_from_rows(rows: Sequence, *, prompt_field: str | None = None, tokenizer=None,
                          source: str = "rows") -> PromptData:  # fmt: skip
    """``PromptData`` from in-memory rows (dicts, or strings)."""
    rows = list(rows)
    if not rows:
        raise ValueError(f"prompts {source!r} holds no prompts")
    key = _prompt_field(rows, prompt_field, source)
    names: dict[str, None] = {}
    if key is not None:
        for row in rows:
            if isinstance(row, dict):
                names.update(dict.fromkeys(k for k in row if k != key))
    prompts, columns = [], {n: [] for n in names}
    for i, row in enumerate(rows, 1):
        where = f"{source} row {i}"
        if key is None:
            if not isinstance(row, str):
                raise ValueError(f"{where}: expected a string like the rows before it, got {type(row).__name__}")
            value = row
        else:
            if not isinstance(row, dict) or key not in row:
                raise ValueError(f"{where}: no {key!r} field")
            value = row[key]
            for n in names:
                columns[n].append(row.get(n))
        text = render_prompt(value, tokenizer, f"{where} field {key!r}" if key else where)
        if not text:
            raise ValueError(f"{where}: the prompt is empty")
        prompts.append(text)
    return PromptData(prompts, columns, source)


def load_prompt_data(source: str | os.PathLike, *, prompt_field: str | None = None, tokenizer=None,
                     split: str = "train", config: str | None = None) -> PromptData:  # fmt: skip
    """Prompts and extra columns from a file, a saved ``datasets`` directory or a Hub data set (see the module
    docstring). ``prompt_field`` names the prompt column (default: the first of ``PROMPT_FIELDS`` present)."""
    rows = load_rows(source, split=split, config=config)
    return prompt_data_from_rows(rows, prompt_field=prompt_field, tokenizer=tokenizer, source=os.fspath(source))


def load_environment_rows(source: str | os.PathLike, *, prompt_field: str | None = None, split: str = "train",
                          config: str | None = None) -> list[dict]:  # fmt: skip
    """The rows an environment's ``reset(**row)`` receives: every column, the prompt (a string or chat messages,
    not rendered: the episode renders it with the environment's tools) under ``prompt``."""
    source = os.fspath(source)
    rows = load_rows(source, split=split, config=config)
    if not rows:
        raise ValueError(f"prompts {source!r} holds no prompts")
    key = _prompt_field(rows, prompt_field, source)
    out = []
    for i, row in enumerate(rows, 1):
        if key is None:
            row = {"prompt": row}
        elif not isinstance(row, dict) or key not in row:
            raise ValueError(f"{source} row {i}: no {key!r} field")
        else:
            row = {**{k: v for k, v in row.items() if k != key}, "prompt": row[key]}
        if not isinstance(row["prompt"], str) and not is_conversation(row["prompt"]):
            raise TypeError(f"{source} row {i}: the prompt must be a string or a list of chat messages, got "
                            f"{type(row['prompt']).__name__}")  # fmt: skip
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------
# Extra columns -> reward keyword arguments
# ----------------------------------------------------------------------------------------------------
def reward_columns(fn: Callable, columns: Sequence[str]) -> list[str]:
    """The columns ``fn`` takes as keyword arguments: those it names (after prompts and completions), or all
    of them when it has ``**kwargs``; never one already bound (``functools.partial``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    bound = set(getattr(fn, "keywords", None) or {})
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return [c for c in columns if c not in bound]
    named = {p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [c for c in columns if c in named and c not in bound]


def bind_columns(fn: Callable, data: PromptData) -> Callable:
    """``fn`` as a ``(prompts, completions)`` reward that also receives the data set columns it takes, one value
    per completion, looked up by prompt text (the trainer passes prompts as text). ``fn`` itself when it takes
    none. Rows with the same prompt but different column values cannot be told apart: the first one is used,
    with a warning."""
    names = reward_columns(fn, list(data.columns))
    if not names:
        return fn
    index: dict[str, int] = {}
    clashes = 0
    for i, p in enumerate(data.prompts):
        j = index.setdefault(p, i)
        if j != i and any(data.columns[n][i] != data.columns[n][j] for n in names):
            clashes += 1
    if clashes:
        warnings.warn(f"{clashes} rows of {data.source!r} repeat an earlier prompt with different {names} values; "
                      "the reward gets the first row's", stacklevel=2)  # fmt: skip

    def reward(prompts: Sequence[str], completions: Sequence[str]):
        rows = []
        for p in prompts:
            if p not in index:
                raise ValueError(f"reward columns {names}: prompt {p[:80]!r} is not in {data.source!r}")
            rows.append(index[p])
        out = fn(prompts, completions, **{n: [data.columns[n][i] for i in rows] for n in names})
        reward.last_parts = getattr(fn, "last_parts", None)  # a combined reward's parts (rewards.combine)
        return out

    reward.__name__ = getattr(fn, "__name__", "reward")
    reward.columns = names
    return reward


# ----------------------------------------------------------------------------------------------------
# Prompts -> token ids
# ----------------------------------------------------------------------------------------------------
def context_length(model) -> int | None:
    """The longest sequence the model's positions support, from its config (None when it has no limit)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_new_tokens: int, context: int | None) -> list[list[int]]:
    """Token ids of each prompt; a clear error for an empty list, an empty prompt or one that leaves no
    room for ``max_new_tokens`` in the model's context."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single str (wrap it in a list)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        toks = tokenizer(p, add_special_tokens=True)["input_ids"]
        if len(toks) == 0:
            raise ValueError(f"prompts[{i}] = {p!r} encodes to zero tokens: generation needs at least one")
        if context is not None and len(toks) + max_new_tokens > context:
            raise ValueError(
                f"prompts[{i}] is {len(toks)} tokens long; with max_new_tokens={max_new_tokens} that needs "
                f"{len(toks) + max_new_tokens} positions but the model's context is {context}"
            )
        ids.append(list(toks))
    return ids
