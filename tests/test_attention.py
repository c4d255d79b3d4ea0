"""fusedrl.engine.attention: packed (padding-free) forwards of tiny Llama / GPT-2 models equal running each
sequence alone (logits, logp and parameter gradients, three-way against float64), stock SDPA does not
isolate packed sequences, generate() and padded batches are unchanged, every backend on the device agrees
with a float64 per-sequence reference, and bad input is named."""

import copy

import pytest
import torch
from helpers import EPS, assert_close, assert_kernel_close

from fusedrl.engine.attention import (
    ATTN_IMPLEMENTATION,
    BACKENDS,
    _choose_backend,
    _flex_packed,
    _has_flash_attn,
    _has_flex,
    _Layout,
    _sdpa_blockdiag,
    _torch_varlen_params,
    cu_seqlens_from_position_ids,
    is_packed_attention,
    packed_attention_backend,
    packed_attention_ref,
    use_packed_attention,
)
from fusedrl.engine.models import build_causal_lm
from fusedrl.kernels import logprobs_ref

# Shapes and dtypes, declared once. Layouts mix lengths and put a length-1 sequence first, inside and last.
VOCAB = 97  # odd on purpose
LAYOUTS = [[1, 6, 1, 11, 3], [7, 2, 1]]
# (preset, config overrides): GPT-2 with per-layer attention scaling checks that `scaling` is honoured.
# A Qwen2 of tiny width (the qwen-0.5b-like preset's architecture: q/k/v biases, sliding window off) joins
# the cheaper checks.
MODELS = {
    "llama": ("tiny-llama", {}),
    "gpt2": ("tiny-gpt2", {"scale_attn_by_inverse_layer_idx": True}),
    "qwen2": (
        "qwen-0.5b-like",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    ),
}
MAIN_KINDS = ["llama", "gpt2"]
MODES = ["cu_kwargs", "cu_without_max", "position_ids_only"]


def make_model(kind, device, dtype=torch.float32, seed=0):
    preset, overrides = MODELS[kind]
    return build_causal_lm(preset, vocab_size=VOCAB, seed=seed, dtype=dtype, **overrides).to(device)


def make_packed(lengths, device):
    seqs = [torch.randint(1, VOCAB, (n,), device=device) for n in lengths]
    ids = torch.cat(seqs)[None]  # (1, N)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]  # (1, N)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return seqs, ids, pos, cu, max(lengths)


def packed_kwargs(mode, cu, max_len):
    if mode == "cu_kwargs":
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    if mode == "cu_without_max":
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    return {}


def forward_backward(model, logits_fn, labels, g_logits, g_logp):
    """Logits (N, V), logp (N,) and parameter gradients for random upstream gradients (never .sum())."""
    model.zero_grad(set_to_none=True)
    logits = logits_fn(model)
    logp = logprobs_ref(logits, labels)
    ((logits.double() * g_logits).sum() + (logp.double() * g_logp).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), logp.detach(), grads


def per_sequence(seqs):
    return lambda m: torch.cat([m(s[None]).logits[0] for s in seqs])


def packed(ids, pos, kw):
    return lambda m: m(ids, position_ids=pos, **kw).logits[0]


# ----------------------------------------------------------------------------------------------------
# Packed == per-sequence, forward and backward
# ----------------------------------------------------------------------------------------------------
# Every mode on the first layout in float32; the second layout and bfloat16 on a subset (time budget).
CASES = (
    [(torch.float32, mode, LAYOUTS[0]) for mode in MODES]
    + [(torch.float32, "position_ids_only", LAYOUTS[1])]
    + [(torch.bfloat16, "cu_kwargs", LAYOUTS[0]), (torch.bfloat16, "position_ids_only", LAYOUTS[1])]
)


@pytest.mark.parametrize("kind", MAIN_KINDS)
@pytest.mark.parametrize("dtype,mode,lengths", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_packed_matches_per_sequence(kind, dtype, mode, lengths, device):
    stock = make_model(kind, device, dtype)
    truth_model = make_model(kind, device, torch.float64)
    model = use_packed_attention(copy.deepcopy(stock))
    assert is_packed_attention(model) and not is_packed_attention(stock)
    seqs, ids, pos, cu, max_len = make_packed(lengths, device)
    n = ids.shape[1]
    labels = torch.randint(0, VOCAB, (n,), device=device)
    g_logits = torch.randn(n, VOCAB, device=device, dtype=torch.float64)
    g_logp = torch.randn(n, device=device, dtype=torch.float64)

    k_logits, k_logp, k_grads = forward_backward(model, packed(ids, pos, packed_kwargs(mode, cu, max_len)), labels,
                                                 g_logits, g_logp)  # fmt: skip
    r_logits, r_logp, r_grads = forward_backward(stock, per_sequence(seqs), labels, g_logits, g_logp)
    t_logits, t_logp, t_grads = forward_backward(truth_model, per_sequence(seqs), labels, g_logits, g_logp)

    assert_kernel_close(k_logits, r_logits, t_logits, name="logits")
    assert_kernel_close(k_logp, r_logp, t_logp, name="logp")
    assert k_grads.keys() == t_grads.keys() and len(k_grads) > 0
    for name in t_grads:
        scale = max(t_grads[name].abs().max().item(), 1.0)
        assert_kernel_close(k_grads[name], r_grads[name], t_grads[name], atol=10 * EPS[dtype] * scale,
                            name=f"grad {name}")  # fmt: skip


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_packed_is_exact_in_float64(kind, mode, device):
    """In float64 rounding cannot hide a leak: packed and per-sequence logits agree to ~1e-12."""
    stock = make_model(kind, device, torch.float64)
    model = use_packed_attention(copy.deepcopy(stock))
    seqs, ids, pos, cu, max_len = make_packed(LAYOUTS[0], device)
    with torch.no_grad():
        got = packed(ids, pos, packed_kwargs(mode, cu, max_len))(model)
        want = per_sequence(seqs)(stock)
    assert_close(got, want, atol=1e-10, name="float64 packed logits")


@pytest.mark.parametrize("kind", list(MODELS))
def test_stock_sdpa_does_not_isolate_packed_sequences(kind, device):
    """Without use_packed_attention, transformers' SDPA lets later sequences attend to earlier ones (it only
    detects packing when no KV cache is built, and config.use_cache defaults to True). The same check
    passes once the model is switched, so the comparison can fail."""
    stock = make_model(kind, device)
    seqs, ids, pos, _, _ = make_packed(LAYOUTS[0], device)
    with torch.no_grad():
        want = per_sequence(seqs)(stock)
        leaked = stock(ids, position_ids=pos).logits[0]
        fixed = use_packed_attention(copy.deepcopy(stock))(ids, position_ids=pos).logits[0]
    first = LAYOUTS[0][0]
    assert (leaked[first:] - want[first:]).abs().max().item() > 1e-2
    assert_close(fixed, want, atol=1e-5, name="packed logits after use_packed_attention")
    with pytest.raises(AssertionError):
        assert_close(leaked, want, atol=1e-5, name="stock sdpa packed logits")


def test_layout_not_stale_after_in_place_refill(device):
    """The per-forward memo of sequence boundaries is keyed on the tensor and its version: refilling a
    reused position_ids / cu_seqlens buffer in place must change the boundaries."""
    stock = make_model("llama", device)
    model = use_packed_attention(copy.deepcopy(stock))
    seqs_a, ids_a, pos_a, cu_a, _ = make_packed([4, 5, 3], device)
    seqs_b, ids_b, pos_b, cu_b, _ = make_packed([2, 8, 2], device)
    with torch.no_grad():
        want_a, want_b = per_sequence(seqs_a)(stock), per_sequence(seqs_b)(stock)
        for use_cu in (False, True):
            pos_buf, cu_buf = pos_a.clone(), cu_a.clone()
            kw = dict(cu_seq_lens_q=cu_buf, cu_seq_lens_k=cu_buf) if use_cu else {}
            assert_close(model(ids_a, position_ids=pos_buf, **kw).logits[0], want_a, atol=1e-5,
                         name=f"before refill (cu given: {use_cu})")  # fmt: skip
            pos_buf.copy_(pos_b)
            cu_buf.copy_(cu_b)
            assert_close(model(ids_b, position_ids=pos_buf, **kw).logits[0], want_b, atol=1e-5,
                         name=f"after refill (cu given: {use_cu})")  # fmt: skip


def test_inference_mode(device):
    stock = make_model("gpt2", device)
    model = use_packed_attention(copy.deepcopy(stock))
    seqs, ids, pos, _, _ = make_packed(LAYOUTS[1], device)
    with torch.inference_mode():
        got = model(ids, position_ids=pos).logits[0]
        want = per_sequence(seqs)(stock)
    assert_close(got, want, atol=1e-5, name="inference-mode packed logits")


# ----------------------------------------------------------------------------------------------------
# Unpacked inputs still behave like stock SDPA (HF generate runs through the same model)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_padded_batch_matches_stock_sdpa(kind, device):
    stock = make_model(kind, device)
    model = use_packed_attention(copy.deepcopy(stock))
    ids = torch.randint(1, VOCAB, (3, 9), device=device)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        want = stock(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert_close(got[keep], want[keep], atol=1e-6, name="padded-batch logits")


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_generate_unchanged(kind, device):
    stock = make_model(kind, device)
    model = use_packed_attention(copy.deepcopy(stock))
    one = torch.randint(3, VOCAB, (1, 5), device=device)
    two = torch.randint(3, VOCAB, (2, 6), device=device)
    mask = torch.ones_like(two)
    mask[0, :2] = 0  # left padded, as generate expects
    gen = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
               output_logits=True)  # fmt: skip
    for prompt, m in ((one, None), (two, mask)):
        a = stock.generate(prompt, attention_mask=m, **gen)
        b = model.generate(prompt, attention_mask=m, **gen)
        assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
        assert a.sequences.shape[1] == prompt.shape[1] + 7
        assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-5, name="generate logits")


# ----------------------------------------------------------------------------------------------------
# Backends, one by one, against a float64 per-sequence reference
# ----------------------------------------------------------------------------------------------------
def device_backends(device, dtype):
    """Every packed backend that can run here (CUDA-only ones only when a GPU is present)."""
    out = ["sdpa_blockdiag"]
    if device.type == "cuda":
        sm80 = torch.cuda.get_device_capability(device) >= (8, 0)
        if dtype in (torch.float16, torch.bfloat16) and sm80:
            if _has_flash_attn():
                out.append("flash_attn")
            if _torch_varlen_params() is not None:
                out.append("torch_varlen")
        if _has_flex():
            out.append("flex")
    else:
        out.append("flex_eager")  # uncompiled flex attention runs on CPU: checks the block mask itself
    return out


def run_backend(name, q, k, v, layout, scale):
    from fusedrl.engine import attention as A

    if name == "sdpa_blockdiag":
        return _sdpa_blockdiag(q, k, v, layout, scale, 0.0)
    if name in ("flex", "flex_eager"):
        layout.block_mask = None
        return _flex_packed(q, k, v, layout, scale, compiled=name == "flex")
    q3, k3, v3 = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    fn = A._flash_attn_varlen if name == "flash_attn" else A._torch_varlen
    out = fn(q3, k3, v3, layout, scale, 0.0) if name == "flash_attn" else fn(q3, k3, v3, layout, scale)
    return out.transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backends_match_float64_reference(dtype, device):
    import warnings

    lengths = [1, 37, 5, 1, 64, 20]  # odd total length (128), a length-1 sequence first and inside
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    n, hq, hkv, d, scale = bounds[-1], 4, 2, 32, 0.11
    q = torch.randn(1, hq, n, d, device=device).to(dtype)
    k = torch.randn(1, hkv, n, d, device=device).to(dtype)
    v = torch.randn(1, hkv, n, d, device=device).to(dtype)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    truth = packed_attention_ref(q.double(), k.double(), v.double(), cu, scale)
    ref_low = packed_attention_ref(q, k, v, cu, scale)
    for name in device_backends(device, dtype):
        layout = _Layout(cu=cu, max_len=max(lengths), bounds=bounds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uncompiled flex warns that it is unfused
            out = run_backend(name, q, k, v, layout, scale)
        assert out.shape == (1, hq, n, d), (name, out.shape)
        assert_kernel_close(out, ref_low, truth, atol=10 * EPS[dtype], name=f"{name} {dtype}")


def test_backend_selection(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = packed_attention_backend(device, dtype)
        assert got in BACKENDS
        if device.type == "cpu":
            assert got == "sdpa_blockdiag"
        else:
            # The first CUDA-only backend that runs here is the preferred one.
            assert got == (device_backends(device, dtype)[1:] or ["sdpa_blockdiag"])[0]
    assert packed_attention_backend("cpu") == "sdpa_blockdiag"


@pytest.mark.parametrize(
    "device_type,dtype,avail,expected",
    [
        ("cpu", torch.bfloat16, dict(sm80=True, flash_attn=True, varlen=True, flex=True), "sdpa_blockdiag"),
        ("cuda", torch.bfloat16, dict(sm80=True, flash_attn=True, varlen=True, flex=True), "flash_attn"),
        ("cuda", torch.float16, dict(sm80=True, flash_attn=False, varlen=True, flex=True), "torch_varlen"),
        ("cuda", torch.bfloat16, dict(sm80=True, flash_attn=False, varlen=False, flex=True), "flex"),
        ("cuda", torch.float32, dict(sm80=True, flash_attn=True, varlen=True, flex=True), "flex"),
        ("cuda", torch.bfloat16, dict(sm80=False, flash_attn=True, varlen=True, flex=True), "flex"),
        ("cuda", torch.float32, dict(sm80=True, flash_attn=True, varlen=True, flex=False), "sdpa_blockdiag"),
    ],
)
def test_backend_selection_rule(device_type, dtype, avail, expected):
    assert _choose_backend(device_type, dtype, **avail) == expected


# ----------------------------------------------------------------------------------------------------
# cu_seqlens_from_position_ids
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "positions,cu,max_len",
    [
        ([0, 1, 2, 0, 0, 1], [0, 3, 4, 6], 3),
        ([0], [0, 1], 1),
        ([0, 0, 0], [0, 1, 2, 3], 1),
        ([3, 4, 5, 0, 1], [0, 3, 5], 3),  # a first sequence continuing from position 3
        ([0, 1, 2, 3], [0, 4], 4),
        ([], [0], 0),
    ],
)
def test_cu_seqlens_from_position_ids(positions, cu, max_len, device):
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    for p in (pos, pos[None]):
        got, m = cu_seqlens_from_position_ids(p)
        assert got.dtype == torch.int32 and got.device == pos.device
        assert got.tolist() == cu and m == max_len


def test_cu_seqlens_from_position_ids_bad_input():
    with pytest.raises(ValueError, match=r"position_ids must have shape \(N,\) or \(1, N\).*\(2, 3\)"):
        cu_seqlens_from_position_ids(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor.*float32"):
        cu_seqlens_from_position_ids(torch.zeros(4))


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_bad_packed_input_is_named(device):
    model = use_packed_attention(make_model("llama", device))
    _, ids, pos, cu, _ = make_packed([3, 4], device)
    with torch.no_grad():
        with pytest.raises(ValueError, match="batch size 1, got query batch 2"):
            model(ids.expand(2, -1), position_ids=pos.expand(2, -1), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        with pytest.raises(ValueError, match="packed inputs take no attention_mask"):
            mask = torch.ones_like(ids)
            mask[0, -1] = 0
            model(ids, attention_mask=mask, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        with pytest.raises(ValueError, match="end at the number of packed tokens 7"):
            bad = torch.tensor([0, 3, 6], dtype=torch.int32, device=device)
            model(ids, position_ids=pos, cu_seq_lens_q=bad, cu_seq_lens_k=bad)
        with pytest.raises(ValueError, match="never decrease"):
            bad = torch.tensor([0, 5, 3, 7], dtype=torch.int32, device=device)
            model(ids, position_ids=pos, cu_seq_lens_q=bad, cu_seq_lens_k=bad)
        with pytest.raises(ValueError, match="max_length_q must be at least the longest packed sequence 4, got 3"):
            model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
        with pytest.raises(TypeError, match="cu_seq_lens_q must be an integer tensor"):
            model(ids, position_ids=pos, cu_seq_lens_q=cu.float(), cu_seq_lens_k=cu.float())
        with pytest.raises(ValueError, match="cu_seq_lens_k must equal cu_seq_lens_q"):
            other = torch.tensor([0, 2, 7], dtype=torch.int32, device=device)
            model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=other)


def test_use_packed_attention_refuses_unsupported_models():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=64, sliding_window=4)  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window=4"):
        use_packed_attention(MistralForCausalLM(cfg))
    with pytest.raises(TypeError, match="must be or contain a transformers PreTrainedModel, got Linear"):
        use_packed_attention(torch.nn.Linear(2, 2))


def test_use_packed_attention_is_idempotent_and_named():
    model = make_model("llama", torch.device("cpu"))
    assert use_packed_attention(use_packed_attention(model)) is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.model.config._attn_implementation == ATTN_IMPLEMENTATION
