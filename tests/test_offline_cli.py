"""fusedrl sft / fusedrl rm in process: records -> token ids and loss masks (every format, every mistake named),
the packed losses and gradients against per-sequence unpacked float32 references, prompt tokens without gradient,
the readers and the held-out split. The commands as a user runs them: tests/test_pipeline_cli.py."""

from __future__ import annotations

import copy
import math
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fusedrl.engine.attention import use_packed_attention
from fusedrl.engine.models import build_causal_lm, build_reward_model
from fusedrl.engine.offline import OfflineConfig, read_records, split_records, step_records
from fusedrl.engine.reward_model import bradley_terry_loss
from fusedrl.engine.rm_cli import PackedPairs, RMObjective, encode_pairs
from fusedrl.engine.sft_cli import PackedDemonstrations, SFTObjective, encode_demonstration, encode_demonstrations
from fusedrl.engine.tokenizer import build_char_tokenizer

# Renders "u: 12;a: 34;" (only characters of the char tokenizer); the generation prompt is "a: ".
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }};{% endfor %}"
                 "{% if add_generation_prompt %}a: {% endif %}")  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chat_tok():
    t = build_char_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def trained_text(tok, demo) -> str:
    return tok.decode([t for t, m in zip(demo.tokens, demo.mask) if m])


def test_prompt_completion_strings(tok):
    d = encode_demonstration(tok, {"prompt": "12:", "completion": "345"}, "f.jsonl:1")
    assert d.tokens == tok("12:345")["input_ids"] + [tok.eos_token_id]
    assert d.mask == [0, 0, 0, 1, 1, 1, 1]  # the completion and its eos


def test_messages_train_every_assistant_turn_only(chat_tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12"},
            {"role": "assistant", "content": "34"}, {"role": "user", "content": "5"},
            {"role": "assistant", "content": "6"}]  # fmt: skip
    d = encode_demonstration(chat_tok, {"messages": msgs}, "f.jsonl:1")
    assert chat_tok.decode(d.tokens) == "s: be brief;u: 12;a: 34;u: 5;a: 6;"
    spans = "".join("x" if m else "." for m in d.mask)
    assert spans == "." * len("s: be brief;u: 12;a: ") + "xxx" + "." * len("u: 5;a: ") + "xx"


def test_conversational_prompt_completion(chat_tok):
    prompt = [{"role": "user", "content": "12"}]
    a = encode_demonstration(chat_tok, {"prompt": prompt, "completion": [{"role": "assistant", "content": "34"}]}, "w")
    b = encode_demonstration(chat_tok, {"prompt": prompt, "completion": "34"}, "w")
    assert a == b
    assert chat_tok.decode(a.tokens) == "u: 12;a: 34;" and trained_text(chat_tok, a) == "34;"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "1", "chosen": "2"}, "expected 'prompt' and 'completion', or 'messages'"),
    ({"prompt": "", "completion": "2"}, "prompt encodes to zero tokens"),
    ({"prompt": "1", "completion": 2}, "'completion' must be a string"),
    ({"prompt": 5, "completion": "2"}, "'prompt' must be a string or a non-empty list"),
    ({"messages": [{"role": "user", "content": "1"}]}, "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "1"}]}, "needs a context before it"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ([1, 2], "expected an object"),
])  # fmt: skip
def test_bad_records_name_where(chat_tok, record, message):
    with pytest.raises(ValueError, match=message) as e:
        encode_demonstration(chat_tok, record, "data.jsonl:7")
    assert str(e.value).startswith("data.jsonl:7: ")


def test_chat_needs_a_template_and_a_prefix_consistent_one(tok):
    rec = {"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]}
    with pytest.raises(ValueError, match=r"^d.jsonl:3: .*no chat template"):
        encode_demonstration(tok, rec, "d.jsonl:3")
    last_only = build_char_tokenizer()
    last_only.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}a{% endif %}"
    with pytest.raises(ValueError, match="cannot be told apart"):
        encode_demonstration(last_only, rec, "d.jsonl:3")


def test_max_length_truncates_the_completion_and_refuses_a_prompt_that_fills_it(tok):
    d = encode_demonstration(tok, {"prompt": "12:", "completion": "34567"}, "w", max_length=5)
    assert d.tokens == tok("12:34")["input_ids"] and d.mask == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="leaves no room"):
        encode_demonstration(tok, {"prompt": "12:", "completion": "3"}, "w", max_length=3)
    with pytest.raises(ValueError, match="never split"):
        encode_demonstrations(tok, [("w", {"prompt": "12:", "completion": "3456"})], max_tokens=6)


def test_read_records_jsonl_parquet_and_datasets_dir(tmp_path):
    rows = [{"prompt": "1:", "completion": "2"}, {"prompt": "3:", "completion": "4"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert read_records(str(tmp_path / "d.jsonl")) == [(f"{tmp_path}/d.jsonl:1", rows[0]),
                                                       (f"{tmp_path}/d.jsonl:3", rows[1])]  # fmt: skip
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [r for _, r in read_records(str(tmp_path / "d.parquet"))] == rows
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = read_records(str(tmp_path / "ds"))
    assert [r for _, r in recs] == rows and recs[1][0] == f"{tmp_path / 'ds'} row 2"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(str(tmp_path / "bad.jsonl"))


def test_held_out_split_is_seeded_and_disjoint():
    records = [(f"w{i}", {"i": i}) for i in range(50)]
    train, held = split_records(records, OfflineConfig(data="x", eval_fraction=0.2, seed=3))
    assert len(held) == 10 and len(train) == 40
    assert sorted(r["i"] for _, r in train + held) == list(range(50))
    assert split_records(records, OfflineConfig(data="x", eval_fraction=0.2, seed=3)) == (train, held)
    assert split_records(records, OfflineConfig(data="x"))[1] == []
    with pytest.raises(ValueError, match="eval-fraction"):
        split_records(records[:2], OfflineConfig(data="x", eval_fraction=0.1))
    with pytest.raises(ValueError, match="--eval-fraction must be 0 when --eval-data"):
        OfflineConfig(data="x", eval_data="y", eval_fraction=0.1)


def test_step_records_cover_each_epoch_once():
    ids = np.concatenate([step_records(23, 5, 0, s) for s in range(5)])
    assert sorted(ids.tolist()) == list(range(23))
    assert not np.array_equal(ids, np.concatenate([step_records(23, 5, 0, s) for s in range(5, 10)]))


# ----------------------------------------------------------------------------------------------------
# The packed losses against unpacked per-sequence references
# ----------------------------------------------------------------------------------------------------
def _random_digits(rng, lo, hi) -> str:
    return "".join(rng.choice(list("0123456789")) for _ in range(rng.integers(lo, hi + 1)))


def _step_grads(model, objective, ids) -> tuple[float, dict]:
    """One step's loss and gradients as fit() accumulates them over the micro-batches."""
    model.zero_grad(set_to_none=True)
    den, total = objective.denominator(ids), 0.0
    for mb in objective.micro_batches(ids):
        loss, _ = objective.loss(mb)
        (loss / den).backward()
        total += float(loss.detach()) / den
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("max_tokens", [24, 4096])  # several micro-batches, and one
def test_sft_loss_and_gradient_match_unpacked_completion_only_nll(tok, max_tokens):
    rng = np.random.default_rng(0)
    recs = [(f"w{i}", {"prompt": _random_digits(rng, 2, 6) + ":", "completion": _random_digits(rng, 1, 7)})
            for i in range(12)]  # fmt: skip
    demos = encode_demonstrations(tok, recs)
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=1)
    ref = copy.deepcopy(model)
    use_packed_attention(model)
    objective = SFTObjective(model, PackedDemonstrations(demos, max_tokens, CPU), None)
    ids = np.asarray([7, 2, 9, 0, 11, 4])
    assert (len(objective.micro_batches(ids)) > 1) == (max_tokens == 24)
    loss, grads = _step_grads(model, objective, ids)

    nll, n_tok = 0.0, 0
    for i in ids:
        t = torch.tensor(demos[i].tokens)
        m = torch.tensor(demos[i].mask, dtype=torch.bool)
        logp = F.log_softmax(ref(input_ids=t[None]).logits[0, :-1].float(), -1)  # (T-1, V): position t predicts t+1
        nll = nll - logp.gather(1, t[1:, None])[:, 0][m[1:]].sum()
        n_tok += int(m.sum())
    (nll / n_tok).backward()
    assert_close(loss, float(nll.detach()) / n_tok, atol=1e-5, name="loss")
    for n, p in ref.named_parameters():
        assert_close(grads[n], p.grad, atol=2e-5, rtol=1e-4, name=n)


def test_sft_prompt_tokens_get_exactly_zero_gradient(tok):
    demos = encode_demonstrations(tok, [("a", {"prompt": "123:", "completion": "45"}),
                                        ("b", {"prompt": "67:", "completion": "890"})])  # fmt: skip
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=2)
    use_packed_attention(model)
    objective = SFTObjective(model, PackedDemonstrations(demos, 4096, CPU), None)
    (mb,) = objective.micro_batches(np.arange(2))
    seen = {}
    # The final norm's output feeds the lm_head position by position: its gradient at a position is the
    # gradient of the logits there (through the head), so a prompt target contributes nothing exactly when it is 0.

    def keep(module, args, out) -> None:
        out.retain_grad()
        seen["h"] = out

    hook = model.model.norm.register_forward_hook(keep)
    loss, _ = objective.loss(mb)
    loss.backward()
    hook.remove()
    g = seen["h"].grad[0].abs().sum(-1)  # (N,)
    packed_mask = [m for i in mb.seq_ids for m in demos[i].mask]
    ends = set(np.cumsum([len(demos[i].tokens) for i in mb.seq_ids]) - 1)
    predicts_completion = [t not in ends and packed_mask[t + 1] == 1 for t in range(len(packed_mask))]
    assert sum(predicts_completion) == 2 + 1 + 3 + 1  # the completions and their eos
    for t, trained in enumerate(predicts_completion):
        assert (g[t] > 0) == trained, f"position {t}: gradient {float(g[t])}, predicts a completion token: {trained}"


@pytest.mark.parametrize("max_tokens", [40, 4096])
def test_rm_loss_and_gradient_match_unpacked_bradley_terry(tok, max_tokens):
    rng = np.random.default_rng(1)
    recs = [(f"w{i}", {"prompt": _random_digits(rng, 2, 5) + ":", "chosen": _random_digits(rng, 1, 6),
                       "rejected": _random_digits(rng, 1, 6)}) for i in range(10)]  # fmt: skip
    pairs = encode_pairs(tok, recs, max_length=None, max_tokens=max_tokens)
    model = build_reward_model("tiny-llama", vocab_size=len(tok), seed=3, pad_token_id=tok.pad_token_id)
    ref = copy.deepcopy(model)
    use_packed_attention(model)
    objective = RMObjective(model, PackedPairs(pairs, max_tokens, CPU), None)
    ids = np.asarray([3, 8, 1, 5, 0])
    assert (len(objective.micro_batches(ids)) > 1) == (max_tokens == 40)
    loss, grads = _step_grads(model, objective, ids)

    r = lambda ids_: ref(input_ids=torch.tensor(ids_)[None]).logits[0, 0].float()  # noqa: E731
    rc = torch.stack([r(pairs[i].prompt + pairs[i].chosen) for i in ids])
    rr = torch.stack([r(pairs[i].prompt + pairs[i].rejected) for i in ids])
    ref_loss = bradley_terry_loss(rc, rr)
    ref_loss.backward()
    assert_close(loss, float(ref_loss.detach()), atol=1e-5, name="loss")
    for n, p in ref.named_parameters():
        assert_close(grads[n], p.grad, atol=2e-5, rtol=1e-4, name=n)


def test_rm_held_out_accuracy_counts_ties_half(tok):
    recs = [
        ("a", {"prompt": "1:", "chosen": "2", "rejected": "2"}),
        ("b", {"prompt": "1:", "chosen": "9", "rejected": "3"}),
    ]
    pairs = encode_pairs(tok, recs, max_length=None, max_tokens=4096)
    model = build_reward_model("tiny-llama", vocab_size=len(tok), seed=3, pad_token_id=tok.pad_token_id)
    use_packed_attention(model)
    packed = PackedPairs(pairs, 4096, CPU)
    m = RMObjective(model, packed, packed).evaluate()
    with torch.no_grad():
        (mb,) = packed.micro_batches(np.arange(2))
        from fusedrl.engine.rm_cli import pair_rewards

        rc, rr = pair_rewards(model, mb)
    assert float(rc[0]) == float(rr[0])  # the same sequence twice: an exact tie
    assert m["eval/accuracy"] == pytest.approx((0.5 + float(rc[1] > rr[1])) / 2)
    assert m["eval/loss"] == pytest.approx(float(bradley_terry_loss(rc, rr)), rel=1e-5)


def test_fit_skips_a_non_finite_step_and_saves_a_loadable_policy(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusedrl.engine.offline import fit

    recs = [(f"w{i}", {"prompt": f"{i}:", "completion": str(9 - i)}) for i in range(8)]
    model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=4)
    use_packed_attention(model)
    objective = SFTObjective(model, PackedDemonstrations(encode_demonstrations(tok, recs), 4096, CPU), None)
    clean_loss, calls = objective.loss, []

    def loss(mb):  # the second of the two steps meets a NaN
        calls.append(mb)
        value, metrics = clean_loss(mb)
        return (value * math.nan if len(calls) == 2 else value), metrics

    objective.loss = loss
    cfg = OfflineConfig(data="x", batch_size=4, epochs=1, learning_rate=1e-2, progress=False, save_every=1,
                        output_dir=str(tmp_path / "run"))  # fmt: skip
    with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
        rows = fit(model, tok, objective, cfg, final_name="policy")
    assert [r["train/skipped_steps"] for r in rows] == [0.0, 1.0]
    ckpt1 = torch.load(tmp_path / "run/ckpt-1/state.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():  # step 2 changed nothing: the final weights are step 1's
        assert torch.equal(v, ckpt1[k]), k
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run/policy")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())


def test_fit_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tok, tmp_path):
    """With dropout on, so the checkpoint's RNG state matters too."""
    import shutil

    from fusedrl.engine.offline import fit

    rng = np.random.default_rng(5)
    recs = [(f"w{i}", {"prompt": _random_digits(rng, 2, 4) + ":", "completion": _random_digits(rng, 1, 4)})
            for i in range(12)]  # fmt: skip
    demos = encode_demonstrations(tok, recs)

    def run(out: str, **kw):
        model = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=6, attention_dropout=0.2)
        use_packed_attention(model)
        objective = SFTObjective(model, PackedDemonstrations(demos, 4096, CPU), None)
        cfg = OfflineConfig(data="x", batch_size=4, epochs=2, learning_rate=1e-2, progress=False, save_every=3,
                            output_dir=str(tmp_path / out), **kw)  # fmt: skip
        torch.manual_seed(0)
        return fit(model, tok, objective, cfg, final_name="policy"), model

    rows, whole = run("whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut/ckpt-6")
    (tmp_path / "cut/latest").write_text("ckpt-3")
    resumed_rows, resumed = run("cut", resume=True)
    assert [r["step"] for r in resumed_rows] == [4, 5, 6]
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in rows[3:]]
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_offline_config_composes_the_shared_optimizer_and_run_parts():
    """fusedrl sft / rm keep their flags, and each optimizer / run setting has its one home in the parts every
    objective shares (validated there)."""
    from fusedrl.engine.compose import flat_dict
    from fusedrl.engine.config import OptimConfig, RunConfig
    from fusedrl.engine.offline import parse_args

    argv = ["--data", "d.jsonl", "--learning-rate", "0.01", "--warmup-steps", "3", "--weight-decay", "0.1",
            "--max-grad-norm", "2", "--backend", "torch", "--seed", "5", "--output-dir", "o", "--save-every", "4",
            "--keep-checkpoints", "1", "--no-progress", "--report-to", "none", "--log-every", "2"]  # fmt: skip
    cfg = parse_args(argv, prog="fusedrl sft", description="", data_help="")
    assert isinstance(cfg.optim, OptimConfig) and isinstance(cfg.run, RunConfig)
    assert (cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.max_grad_norm,
            cfg.optim.backend, cfg.optim.lr_schedule) == (0.01, 3, 0.1, 2.0, "torch", "cosine")  # fmt: skip
    assert (cfg.run.seed, cfg.run.output_dir, cfg.run.save_every, cfg.run.keep_checkpoints, cfg.run.progress,
            cfg.run.log_every) == (5, "o", 4, 1, False, 2)  # fmt: skip
    assert cfg.learning_rate == 0.01 and cfg.seed == 5  # flat names read the parts
    flat = flat_dict(cfg)
    assert flat["learning_rate"] == 0.01 and flat["output_dir"] == "o" and "optim" not in flat
    assert "lr_schedule" not in flat and "log_completions" not in flat  # set by the command, not the user
    with pytest.raises(ValueError, match="OptimConfig.learning_rate must be a number > 0"):
        OfflineConfig(data="x", learning_rate=0.0)
    with pytest.raises(ValueError, match="RunConfig.save_every must be an int >= 0"):
        OfflineConfig(data="x", save_every=-1)
