"""fusedrl.engine.models: presets (shapes and parameter counts on the meta device), build_causal_lm from a
preset or a directory, lm_head_of / backbone_of, the ValueModel critic and packed reward scoring, each
packed result against the same model run per sequence (three-way against float64), save/load round trips."""

import copy
import os

import numpy as np
import pytest
import torch
from fusedrl.engine.attention import cu_seqlens_from_position_ids, use_packed_attention
from fusedrl.engine.heads import ValueModel, score_packed
from fusedrl.engine.models import PRESETS, backbone_of, build_causal_lm, build_reward_model, lm_head_of
from helpers import EPS, assert_close, assert_kernel_close

# Shapes, declared once: an odd vocabulary, mixed lengths with length-1 sequences first and inside.
VOCAB = 97
LENGTHS = [1, 6, 1, 11, 3]
KINDS = ["tiny-llama", "tiny-gpt2"]
# Parameter-count windows (millions) for the named presets at their default vocabularies.
PARAMS_M = {"tiny-llama": (0.05, 0.2), "tiny-gpt2": (0.05, 0.2), "small-llama": (10, 20),
            "llama-100m": (90, 110), "qwen-0.5b-like": (450, 520)}  # fmt: skip


def make_packed(lengths, device, low=1):
    """Tokens from [low, VOCAB): reward-model tests keep 0 (the pad id) out of the data."""
    seqs = [torch.randint(low, VOCAB, (n,), device=device) for n in lengths]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    cu, max_len = cu_seqlens_from_position_ids(pos)
    return seqs, ids, pos, cu, max_len


def packed_kwargs(cu, max_len):
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)


# ----------------------------------------------------------------------------------------------------
# Presets and building
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_shapes_and_sizes(name):
    from transformers import AutoModelForCausalLM

    cfg = PRESETS[name].config()
    with torch.device("meta"):  # no memory, no init: the 0.5B preset is counted, not built
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    lo, hi = PARAMS_M[name]
    assert lo <= n <= hi, f"{name}: {n:.2f}M parameters, expected [{lo}, {hi}]M"
    if name == "qwen-0.5b-like":
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.intermediate_size, cfg.vocab_size) == (896, 24, 14, 2, 4864, 151936)  # fmt: skip
        assert cfg.tie_word_embeddings and cfg.sliding_window is None
    if name == "tiny-llama":
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.intermediate_size) == (64, 2, 4, 2, 128)  # fmt: skip
    if name == "tiny-gpt2":
        assert (cfg.n_embd, cfg.n_layer) == (64, 2)


def test_preset_configs_are_fresh():
    a = PRESETS["tiny-llama"].config()
    a.hidden_size = 8
    assert PRESETS["tiny-llama"].config().hidden_size == 64


@pytest.mark.parametrize("kind", KINDS)
def test_build_causal_lm_seed_vocab_dtype_overrides(kind):
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    a = build_causal_lm(kind, vocab_size=VOCAB, seed=3)
    after = torch.rand(3)
    assert torch.equal(before, after), "build_causal_lm must not disturb the caller's RNG stream"
    b = build_causal_lm(kind, vocab_size=VOCAB, seed=3)
    c = build_causal_lm(kind, vocab_size=VOCAB, seed=4)
    w = lambda m: lm_head_of(m)[0]  # noqa: E731
    assert w(a).shape == (VOCAB, 64)
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))
    assert not a.training
    half = build_causal_lm(kind, vocab_size=VOCAB, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    layers_field = "num_hidden_layers" if kind == "tiny-llama" else "n_layer"
    deep = build_causal_lm(kind, vocab_size=VOCAB, **{layers_field: 3})
    assert deep.config.num_hidden_layers == 3
    assert a.config.eos_token_id == 2  # in the vocabulary; a preset id beyond a small vocabulary is dropped
    assert build_causal_lm(kind, vocab_size=2).config.eos_token_id is None


def test_build_causal_lm_from_directory(tmp_path):
    model = build_causal_lm("tiny-llama", vocab_size=VOCAB, seed=5)
    model.save_pretrained(tmp_path)
    loaded = build_causal_lm(str(tmp_path))
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits, atol=0.0, name="reloaded logits")
    with pytest.raises(ValueError, match="vocab_size applies to presets only"):
        build_causal_lm(str(tmp_path), vocab_size=10)


def test_build_causal_lm_bad_input(tmp_path):
    # A path that does not exist says so, not "Repo id must be in the form ..." (what from_pretrained says).
    for name in ["./nope", str(tmp_path / "missing"), "a/b/c", "not a hub id"]:
        with pytest.raises(FileNotFoundError, match=f"model {name!r} does not exist") as e:
            build_causal_lm(name)
        assert "\n" not in str(e.value)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        build_causal_lm(str(tmp_path / "f.txt"))
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        build_causal_lm("tiny-llama", vocab_size=0)
    with pytest.raises(TypeError, match="preset_or_path must be a preset name, a directory or a Hub id, got int"):
        build_causal_lm(3)


# The Hub cache as huggingface_hub lays it out; the child process sees only it, offline.
_HUB_CHILD = r"""
import sys
from fusedrl.engine.models import build_causal_lm, build_reward_model
from fusedrl.engine.tokenizer import load_tokenizer
from transformers import GenerationConfig
m = build_causal_lm("fusedrl-test/tiny")
tok = load_tokenizer("fusedrl-test/tiny")
gen = GenerationConfig.from_pretrained("fusedrl-test/tiny")
rm = build_reward_model("fusedrl-test/tiny")
print("LOADED", m.config.vocab_size, len(tok), gen.eos_token_id, rm.config.num_labels)
for what, fn in [("model", build_causal_lm), ("tokenizer", load_tokenizer)]:
    try:
        fn("Qwen/Qwen2.5-0.5B-Instruct")
    except OSError as e:
        print("ERROR", what, str(e).replace(chr(10), "|"))
"""


@pytest.mark.slow
def test_hub_id_from_cache_offline_and_one_line_error(tmp_path):
    """A Hub id resolves through the Hub cache with HF_HUB_OFFLINE=1 (the way a user pre-downloads), and an id
    that is not cached fails with one line that says what to do."""
    import json
    import shutil
    import subprocess
    import sys

    from fusedrl.engine.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    src = tmp_path / "src"
    build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0).save_pretrained(src)
    tok.save_pretrained(src)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fusedrl-test--tiny"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert json.loads((src / "generation_config.json").read_text())["eos_token_id"] == 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    r = subprocess.run([sys.executable, "-c", _HUB_CHILD], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"LOADED {len(tok)} {len(tok)} 2 1" in r.stdout, r.stdout
    errors = [line for line in r.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, r.stdout
    for line in errors:
        assert (
            "'Qwen/Qwen2.5-0.5B-Instruct' is not a local directory, and as a Hub id it is not in the local cache"
            in line
            and "HF_HUB_OFFLINE=1" in line
            and "hf download Qwen/Qwen2.5-0.5B-Instruct" in line
        ), line
        assert str(tmp_path / "hub") in line


# ----------------------------------------------------------------------------------------------------
# lm_head_of / backbone_of
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lm_head_and_backbone_reproduce_logits(kind, device):
    model = build_causal_lm(kind, vocab_size=VOCAB).to(device)
    weight, bias = lm_head_of(model)
    body = backbone_of(model)
    assert body is (model.model if kind == "tiny-llama" else model.transformer)
    if kind == "tiny-gpt2":  # tied: the output weight is the input embedding matrix itself
        assert weight is model.get_input_embeddings().weight
    ids = torch.randint(0, VOCAB, (2, 9), device=device)
    with torch.no_grad():
        h = body(ids).last_hidden_state
        logits = h @ weight.T + (bias if bias is not None else 0.0)
        assert_close(logits, model(ids).logits, atol=1e-5, name="hidden @ W^T")


def test_lm_head_of_and_backbone_of_bad_input():
    model = build_causal_lm("tiny-llama", vocab_size=VOCAB)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(64, VOCAB))
    with pytest.raises(TypeError, match="plain nn.Linear; LlamaForCausalLM has Sequential"):
        lm_head_of(model)
    with pytest.raises(TypeError, match="plain nn.Linear; Linear has none"):
        lm_head_of(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="backbone_of needs a transformers model with a body.*got Linear"):
        backbone_of(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------
# ValueModel
# ----------------------------------------------------------------------------------------------------
def value_three_way(kind, device, dtype):
    """(packed critic in dtype, per-sequence critic in dtype, per-sequence critic in float64): values (N,) and
    parameter gradients for a random upstream gradient."""
    policy = build_causal_lm(kind, vocab_size=VOCAB, dtype=dtype).to(device)
    critic = ValueModel.from_causal_lm(policy, seed=1)
    truth = copy.deepcopy(critic).double()
    packed = use_packed_attention(copy.deepcopy(critic))
    seqs, ids, pos, cu, max_len = make_packed(LENGTHS, device)
    g = torch.randn(ids.shape[1], device=device, dtype=torch.float64)

    def run(model, fn):
        model.zero_grad(set_to_none=True)
        values = fn(model)
        (values.double() * g).sum().backward()
        return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    per_seq = lambda m: torch.cat([m(s[None])[0] for s in seqs])  # noqa: E731
    k = run(packed, lambda m: m(ids, position_ids=pos, **packed_kwargs(cu, max_len))[0])
    return k, run(critic, per_seq), run(truth, per_seq)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_value_model_packed_matches_per_sequence(kind, dtype, device):
    (kv, kg), (rv, rg), (tv, tg) = value_three_way(kind, device, dtype)
    assert kv.dtype == torch.float32 and kv.shape == (sum(LENGTHS),)
    assert_kernel_close(kv, rv, tv, name="values")
    assert kg.keys() == tg.keys() and "value_head.weight" in kg
    for name in tg:
        scale = max(tg[name].abs().max().item(), 1.0)
        assert_kernel_close(kg[name], rg[name], tg[name], atol=10 * EPS[dtype] * scale, name=f"grad {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_value_model_init_and_independence(kind):
    policy = build_causal_lm(kind, vocab_size=VOCAB)
    critic = ValueModel.from_causal_lm(policy)
    assert torch.count_nonzero(critic.value_head.bias) == 0
    assert 0 < critic.value_head.weight.abs().max().item() < 0.2  # small, not zero
    body_params = {p.data_ptr() for p in backbone_of(policy).parameters()}
    assert not body_params & {p.data_ptr() for p in critic.backbone.parameters()}, "critic must own its body"
    ids = torch.randint(0, VOCAB, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    values = critic(ids, attention_mask=mask)
    assert values.shape == (3, 8) and values.dtype == torch.float32
    # The body starts as the policy's: the critic's hidden states are the policy's.
    with torch.no_grad():
        h_policy = backbone_of(policy)(ids, attention_mask=mask).last_hidden_state
        want = h_policy @ critic.value_head.weight[0] + critic.value_head.bias[0]
    assert_close(values.detach()[mask.bool()], want[mask.bool()], atol=1e-6, name="values from policy body")


def test_value_model_save_load_round_trip(tmp_path, device):
    critic = ValueModel.from_causal_lm(build_causal_lm("tiny-llama", vocab_size=VOCAB), seed=2)
    with torch.no_grad():
        critic.value_head.bias.fill_(0.25)  # trained-looking head: the bias must survive the round trip
    critic.save_pretrained(tmp_path / "critic")
    assert sorted(os.listdir(tmp_path / "critic")) == ["backbone", "value_head.pt"]  # no temporary left behind
    loaded = ValueModel.from_pretrained(tmp_path / "critic").to(device)
    critic = critic.to(device)
    use_packed_attention(loaded)
    seqs, ids, pos, cu, max_len = make_packed(LENGTHS, device)
    with torch.no_grad():
        got = loaded(ids, position_ids=pos, **packed_kwargs(cu, max_len))
        want = torch.cat([critic(s[None]) for s in seqs], dim=1)
    assert_close(got, want, atol=1e-5, name="reloaded packed values")
    with pytest.raises(FileNotFoundError, match="value_head.pt does not exist"):
        os.remove(tmp_path / "critic" / "value_head.pt")
        ValueModel.from_pretrained(tmp_path / "critic")


def test_value_model_refuses_packed_input_without_packed_attention():
    critic = ValueModel.from_causal_lm(build_causal_lm("tiny-llama", vocab_size=VOCAB))
    _, ids, pos, cu, max_len = make_packed(LENGTHS, torch.device("cpu"))
    with pytest.raises(ValueError, match="call fusedrl.engine.attention.use_packed_attention"):
        critic(ids, position_ids=pos, **packed_kwargs(cu, max_len))


# ----------------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_score_packed_matches_hf_per_sequence(kind, dtype, device):
    rm = build_reward_model(kind, vocab_size=VOCAB, seed=3, dtype=dtype).to(device)
    truth = copy.deepcopy(rm).double()
    packed = use_packed_attention(copy.deepcopy(rm))
    seqs, ids, pos, cu, max_len = make_packed(LENGTHS, device)
    with torch.no_grad():
        got = score_packed(packed, ids, pos, cu)
        # transformers' own scoring of each sequence alone (its head reads the last non-pad token)
        ref_low = torch.stack([rm(s[None]).logits[0, 0] for s in seqs])
        want = torch.stack([truth(s[None]).logits[0, 0] for s in seqs])
        # and of the same sequences as one right-padded batch
        batch = torch.zeros(len(seqs), max_len, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = s
        padded = rm(batch, attention_mask=(batch != 0).long()).logits[:, 0]
    assert got.shape == (len(LENGTHS),) and got.dtype == torch.float32
    assert_kernel_close(got, ref_low, want, name="packed reward")
    assert_kernel_close(got, padded, want, name="packed reward vs padded batch")
    assert_close(score_packed(packed, ids, pos, cu, max_length=max_len), got, atol=0.0, name="explicit max_length")


def test_score_packed_gradient_matches_per_sequence(device):
    rm = build_reward_model("tiny-llama", vocab_size=VOCAB, seed=4).to(device)
    packed = use_packed_attention(copy.deepcopy(rm))
    truth = copy.deepcopy(rm).double()
    seqs, ids, pos, cu, _ = make_packed(LENGTHS, device)
    g = torch.randn(len(seqs), device=device, dtype=torch.float64)

    def grads(model, scores_fn):
        model.zero_grad(set_to_none=True)
        (scores_fn(model).double() * g).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    per_seq = lambda m: torch.stack([m(s[None]).logits[0, 0] for s in seqs])  # noqa: E731
    kg = grads(packed, lambda m: score_packed(m, ids, pos, cu))
    rg, tg = grads(rm, per_seq), grads(truth, per_seq)
    assert kg.keys() == tg.keys() and "score.weight" in kg
    for name in tg:
        assert_kernel_close(kg[name], rg[name], tg[name], name=f"grad {name}")


def test_build_reward_model_from_causal_lm_directory(tmp_path):
    """A causal-LM checkpoint becomes a reward model: same body, a fresh score head drawn from `seed`."""
    lm = build_causal_lm("tiny-llama", vocab_size=VOCAB, seed=6)
    lm.save_pretrained(tmp_path)
    a, b, c = (build_reward_model(str(tmp_path), seed=s) for s in (5, 5, 6))
    assert type(a).__name__ == "LlamaForSequenceClassification" and a.config.num_labels == 1
    assert a.config.pad_token_id == 0
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    assert torch.equal(a.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_score_packed_bad_input():
    rm = build_reward_model("tiny-gpt2", vocab_size=VOCAB)
    _, ids, pos, cu, _ = make_packed(LENGTHS, torch.device("cpu"))
    with pytest.raises(ValueError, match="call fusedrl.engine.attention.use_packed_attention"):
        score_packed(rm, ids, pos, cu)
    use_packed_attention(rm)
    with pytest.raises(ValueError, match=r"input_ids must be one packed row of shape \(1, N\), got \(2, 22\)"):
        score_packed(rm, ids.expand(2, -1), pos.expand(2, -1), cu)
    with pytest.raises(ValueError, match="at least one token"):
        empty = torch.tensor([0, 1, 1, 22], dtype=torch.int32)
        score_packed(rm, ids, pos, empty)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D tensor \(B\+1,\)"):
        score_packed(rm, ids, pos, cu[None])
    assert build_reward_model("tiny-llama", vocab_size=VOCAB).config.pad_token_id == 0


# ----------------------------------------------------------------------------------------------------
# LoRA (peft)
# ----------------------------------------------------------------------------------------------------
def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft probing transformers 5
@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_lora_policy_trains_adapters_and_is_its_own_reference(tmp_path, estimator):
    """A peft policy: only the adapters move, the reference is the same module with its adapters disabled (no
    copy of the weights) and equals the untouched base model, the fused head reads the wrapped model, and the
    saved result is the adapter (or, merged, a plain model with the same logits)."""
    pytest.importorskip("peft")
    from fusedrl.engine.models import adapter_disabled, apply_lora, save_model
    from fusedrl.engine.scoring import score_logprobs
    from fusedrl.engine.tokenizer import build_char_tokenizer
    from fusedrl.engine.trainer import PPOConfig, PPOTrainer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer()
    base = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, r=4, target_modules="q_proj,v_proj")
    cfg = PPOConfig(advantage_estimator=estimator, prompts_per_step=2, samples_per_prompt=3, max_new_tokens=6,
                    learning_rate=5e-2, kl_coef=0.1, progress=False, output_dir=str(tmp_path / "run"))  # fmt: skip
    reward = lambda prompts, completions: [float(len(set(c))) for c in completions]  # noqa: E731
    with torch.random.fork_rng(devices=[]):
        tr = PPOTrainer(policy, tok, reward, cfg)
    assert tr.ref_policy is tr.policy  # held once: the memory a deepcopy reference would take is saved
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    tr.train(["ab", "hello", "x", "1+1="])
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable, sorted(moved - trainable)[:3]
    # The reference scores: the policy with adapters off == the base model as it was, and != the trained policy.
    micro = tr._micro_batches(np.arange(len(tr.buffer)))
    with adapter_disabled(policy):
        ref = score_logprobs(policy, micro, tr.layout, temperature=1.0)
    use_packed_attention(frozen)
    want = score_logprobs(frozen, micro, tr.layout, temperature=1.0)
    assert_close(ref, want, atol=1e-5, name="reference = base model")
    assert (score_logprobs(policy, micro, tr.layout, temperature=1.0) - want).abs().max() > 1e-4
    # Saved: the adapter, loadable onto the base; with merging a plain model with the same logits.
    out = tmp_path / "run" / "policy"
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    ids = torch.randint(4, len(tok), (2, 9))
    policy.eval()
    with torch.no_grad():
        want_logits = policy(ids).logits
        loaded = PeftModel.from_pretrained(copy.deepcopy(frozen), out).eval()
        assert_close(loaded(ids).logits, want_logits, atol=1e-5, name="adapter reloaded")
        save_model(policy, tmp_path / "merged", tokenizer=tok, merge_lora=True)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert_close(merged(ids).logits, want_logits, atol=1e-5, name="merged")
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    if estimator == "gae":  # the critic is a plain body (no adapters), fully trained
        assert not any("lora" in n for n, _ in tr.critic.named_parameters())
        assert (tmp_path / "run" / "critic" / "backbone" / "config.json").is_file()
    print(f"reference copy avoided: {_param_bytes(frozen) / 2**20:.2f} MiB (tiny-llama)")


def test_apply_lora_bad_input():
    pytest.importorskip("peft")
    from fusedrl.engine.models import apply_lora

    for kw, match in [(dict(r=0), "rank r must be an int >= 1"),
                      (dict(r=2, target_modules="lm_head"), "include the output head 'lm_head'"),
                      (dict(r=2, target_modules="no_such_layer"), "target_modules 'no_such_layer'|no_such_layer"),
                      (dict(r=2, target_modules=" , "), "at least one module")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            apply_lora(build_causal_lm("tiny-llama", vocab_size=VOCAB), **kw)
