"""fusedrl.engine.data: prompts from every file format and from ``datasets`` directories, chat prompts through
the tokenizer's chat template (one BOS), extra columns reaching the reward as keyword arguments."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys

import pytest
from fusedrl.engine.data import PromptData, bind_columns, load_prompt_data, prompt_data_from_rows, render_prompt
from fusedrl.engine.rewards import math_answer
from fusedrl.engine.tokenizer import build_char_tokenizer

ROWS = [
    {"question": "what is 2+3?", "answer": "5", "level": 1},
    {"question": "what is 4*6?", "answer": "24", "level": 2},
    {"question": "what is 9-1?", "answer": "8", "level": 1},
]
# A chat template over the character tokenizer's alphabet (no newlines or angle brackets there).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}; {% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")  # fmt: skip


def chat_tokenizer(add_bos: bool = False):
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    if add_bos:
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
        )
    return tok


def write_formats(tmp_path):
    """The same three rows in every supported file format; returns {format: path}."""
    paths = {}
    paths["jsonl"] = tmp_path / "p.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    paths["json"] = tmp_path / "p.json"
    paths["json"].write_text(json.dumps(ROWS))
    paths["json-columns"] = tmp_path / "cols.json"
    paths["json-columns"].write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    paths["json-lines"] = tmp_path / "lines.json"  # JSON lines under a .json name
    paths["json-lines"].write_text(paths["jsonl"].read_text())
    paths["csv"] = tmp_path / "p.csv"
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths["parquet"] = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    return paths


def test_every_file_format_gives_the_same_prompts_and_columns(tmp_path):
    for fmt, path in write_formats(tmp_path).items():
        data = load_prompt_data(path)
        assert data.prompts == [r["question"] for r in ROWS], fmt
        assert data.columns["answer"] == ["5", "24", "8"], fmt
        level = [1, 2, 1] if fmt != "csv" else ["1", "2", "1"]  # CSV has no types
        assert data.columns["level"] == level, fmt
        assert "question" not in data.columns and len(data) == 3


def test_text_file_and_prompt_field(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    assert load_prompt_data(tmp_path / "p.txt").prompts == ["first prompt", "second"]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["answer"], "problem": r["question"]}) + "\n" for r in ROWS))
    data = load_prompt_data(path, prompt_field="problem")
    assert data.prompts == [r["question"] for r in ROWS] and data.columns == {"prompt": ["5", "24", "8"]}
    assert load_prompt_data(path).prompts == ["5", "24", "8"]  # "prompt" comes first by default


@pytest.mark.parametrize(
    "content, kwargs, err, match",
    [
        (None, {}, FileNotFoundError, "prompts file '.*missing.jsonl' does not exist"),
        ('{"q": 1}\n', {}, ValueError, r"none of the fields \['prompt', 'question', 'text'\].*--prompt-field"),
        ('{"q": 1}\n', {"prompt_field": "x"}, ValueError, r"no field 'x' in row 1 \(fields: \['q'\]\)"),
        ('{"prompt": "a"}\n{oops\n', {}, ValueError, r"bad.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n{"text": "b"}\n', {}, ValueError, "row 2: no 'prompt' field"),
        ('{"prompt": 3}\n', {}, TypeError, "field 'prompt' must be a string or a list of chat messages .*got int"),
        ('{"prompt": ""}\n', {}, ValueError, "row 1: the prompt is empty"),
        ("\n", {}, ValueError, "holds no prompts"),
        ('{"prompt": [{"role": "user", "content": "hi"}]}\n', {}, ValueError, "has no chat template"),
    ],
)
def test_bad_prompt_files_name_the_file_and_row(tmp_path, content, kwargs, err, match):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(err, match=match):
        load_prompt_data(path, tokenizer=build_char_tokenizer(), **kwargs)
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown format '.xlsx'"):
        load_prompt_data(tmp_path / "p.xlsx")


def test_datasets_directory_and_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    data = load_prompt_data(tmp_path / "one")
    assert data.prompts == [r["question"] for r in ROWS] and data.columns["answer"] == ["5", "24", "8"]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert load_prompt_data(tmp_path / "dict", split="test").prompts == ["what is 4*6?"]
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'dev'"):
        load_prompt_data(tmp_path / "dict", split="dev")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a data set written by datasets' save_to_disk"):
        load_prompt_data(tmp_path / "plain")


def test_hub_data_set_offline_is_one_line(tmp_path):
    code = ("from fusedrl.engine.data import load_prompt_data\n"
            "try:\n    load_prompt_data('openai/gsm8k', config='main')\n"
            "except FileNotFoundError as e:\n    print('ERROR', str(e).replace(chr(10), '|'))\n")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None), env.pop("HF_DATASETS_CACHE", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("ERROR"))
    assert "prompts 'openai/gsm8k' is not a local file or directory" in line and "HF_HUB_OFFLINE=1" in line, line
    assert "|" not in line


def test_chat_prompts_rendered_with_the_template():
    tok = chat_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+3?"}]
    expected = "<bos>system: be brief; user: what is 2+3?; assistant:"
    assert render_prompt(msgs, tok) == expected
    assert render_prompt("plain text stays", tok) == "plain text stays"
    data = prompt_data_from_rows([{"prompt": msgs, "answer": "5"}], tokenizer=tok)
    assert data.prompts == [expected] and data.columns == {"answer": ["5"]}
    # A tokenizer that adds BOS when encoding: the template's own BOS is dropped, so the ids hold exactly one.
    tok_bos = chat_tokenizer(add_bos=True)
    text = render_prompt(msgs, tok_bos)
    assert text == expected[len("<bos>") :]
    ids = tok_bos(text, add_special_tokens=True)["input_ids"]
    assert ids.count(tok_bos.bos_token_id) == 1 and ids[0] == tok_bos.bos_token_id
    with pytest.raises(TypeError, match="must be a string or a list of chat messages"):
        render_prompt([{"role": "user"}], tok)


def test_columns_reach_the_reward_as_keyword_arguments():
    data = prompt_data_from_rows(ROWS)
    reward = bind_columns(math_answer, data)
    assert reward.columns == ["answer", "level"]  # math_answer takes **_: every column, as TRL passes them
    prompts = [data.prompts[1], data.prompts[0], data.prompts[1]]
    assert reward(prompts, ["#### 24", "so 2+3 = 5", "#### 25"]) == [1.0, 1.0, 0.0]

    seen = {}

    def takes_all(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    bind_columns(takes_all, data)([data.prompts[2]], ["x"])
    assert seen == {"answer": ["8"], "level": [1]}

    def takes_level(prompts, completions, *, level, scale=1.0):
        return [scale * v for v in level]

    assert bind_columns(functools.partial(takes_level, scale=2.0), data)(data.prompts, ["", "", ""]) == [2.0, 4.0, 2.0]
    bound = functools.partial(takes_level, level=[7])  # a keyword the user bound wins over the column
    assert bind_columns(bound, data) is bound

    def no_columns(prompts, completions):
        return [1.0] * len(completions)

    assert bind_columns(no_columns, data) is no_columns
    with pytest.raises(ValueError, match="prompt 'not a prompt' is not in"):
        reward(["not a prompt"], ["5"])


def test_repeated_prompt_with_different_columns_warns():
    data = PromptData(["same", "same", "other"], {"answer": ["1", "2", "3"]}, "rows")
    with pytest.warns(UserWarning, match="1 rows of 'rows' repeat an earlier prompt"):
        reward = bind_columns(math_answer, data)
    assert reward(["same"], ["1"]) == [1.0]


def test_hub_data_set_name_goes_to_load_dataset(monkeypatch):
    """A name that is not a local path is a Hub data set: load_dataset(name, config, split=...) (the Hub cache
    and HF_HUB_OFFLINE are datasets' own business); a path-like name that does not exist is not sent there."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_prompt_data("openai/gsm8k", config="main", split="test", prompt_field="question")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert data.prompts == [r["question"] for r in ROWS] and data.columns["answer"] == ["5", "24", "8"]
    for name in ["./data/train.jsonl", "data/train.jsonl", "/no/such/dir"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_prompt_data(name)
    assert len(calls) == 1
