"""fusedrl.integrations.hf.logprobs_from_model on tiny transformers models built in code: log-probs, entropies and
the gradient of every parameter (random upstream gradients) against the model's own full logits, three ways
(fused in float32, the model's logits in float32, the model in float64); untied, tied and biased heads, logit
scales, left padding, ignored positions; the lm_head module itself is never called; bad input and heads the
fused op cannot reproduce raise."""

import pytest
import torch
import transformers
from helpers import assert_close, assert_kernel_close

from fusedrl.engine.models import build_causal_lm
from fusedrl.integrations.hf import logit_scale_of, logprobs_from_model, output_head
from fusedrl.kernels import logprobs_ref

# Shapes, declared once: B sequences of T positions, an odd vocabulary, a small body.
B, T, V = 3, 11, 301
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64)  # fmt: skip
TEMPERATURE = 0.7

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN on skipped rows

# name -> a float32 model in eval mode. Llama (untied head), Llama with tied embeddings, GPT-2 (tied, another
# body attribute), Phi (a head with a bias), Cohere (logits * logit_scale), Granite (logits / logits_scaling).
MODELS = {
    "llama": lambda: build_causal_lm("tiny-llama", vocab_size=V, seed=1),
    "llama-tied": lambda: build_causal_lm("tiny-llama", vocab_size=V, seed=1, tie_word_embeddings=True),
    "gpt2": lambda: build_causal_lm("tiny-gpt2", vocab_size=V, seed=1),
    "phi-bias": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL)).eval(),
    "cohere-scale": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.25)).eval(),
    "granite-scaling": lambda: transformers.GraniteForCausalLM(
        transformers.GraniteConfig(**SMALL, logits_scaling=4.0)
    ).eval(),
}


def make_batch(device):
    """Left-padded rows (row 0 by 4, row 2 by 1), labels = the next token, -100 on padding, on the first two
    real positions of row 1 (a prompt) and on every last position (nothing follows)."""
    input_ids = torch.randint(0, V, (B, T), device=device)
    attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    attention_mask[0, :4] = 0
    attention_mask[2, :1] = 0
    labels = torch.full((B, T), -100, device=device)
    labels[:, :-1] = input_ids[:, 1:]
    labels = labels.masked_fill(attention_mask == 0, -100)
    labels[1, :2] = -100
    return input_ids, attention_mask, labels


def run(model, fn, batch, upstream):
    """(logp, entropy) and the gradient of sum(g_logp logp + g_ent entropy) w.r.t. every parameter."""
    model.zero_grad()
    logp, ent = fn(model, *batch)
    (logp * upstream[0].to(logp.dtype) + ent * upstream[1].to(ent.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def fused(backend):
    def fn(model, input_ids, attention_mask, labels):
        return logprobs_from_model(model, input_ids, labels, attention_mask=attention_mask, temperature=TEMPERATURE,
                                   return_entropy=True, backend=backend)  # fmt: skip

    return fn


def from_logits(model, input_ids, attention_mask, labels):
    """The plain way: the model's own forward (full logits, its scale applied), then the reference."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logprobs_ref(logits, labels, temperature=TEMPERATURE, return_entropy=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_model_logits(name, backend, device):
    model = MODELS[name]().to(device)
    batch = make_batch(device)
    upstream = (torch.randn(B, T, device=device), torch.randn(B, T, device=device))
    ours = run(model, fused(backend), batch, upstream)
    ref32 = run(model, from_logits, batch, upstream)
    truth = run(model.double(), from_logits, batch, upstream)
    valid = batch[2] != -100
    for i, what in enumerate(("logp", "entropy")):
        assert (ours[i][~valid] == 0).all(), f"{what} must be exactly 0 where the label is -100"
        assert_kernel_close(ours[i][valid], ref32[i][valid], truth[i][valid], name=what)
    assert ours[2].keys() == truth[2].keys()
    for p, g in truth[2].items():
        assert_kernel_close(ours[2][p], ref32[2][p], g, atol=1e-5 * g.abs().max().item() + 1e-12, name=p)
    head = model.get_output_embeddings()
    assert head.weight.grad is not None and head.weight.grad.abs().max() > 0
    if head.bias is not None:
        assert head.bias.grad.abs().max() > 0


def test_lm_head_module_is_never_called(device, monkeypatch):
    """The head's weight is read, its forward never runs: that forward would build the (B, T, V) logits."""
    model = MODELS["llama"]().to(device)

    def boom(*args, **kwargs):
        raise AssertionError("lm_head.forward ran: the logits were materialised")

    monkeypatch.setattr(model.get_output_embeddings(), "forward", boom)
    input_ids, attention_mask, labels = make_batch(device)
    logp = logprobs_from_model(model, input_ids, labels, attention_mask=attention_mask)
    assert logp.shape == (B, T) and logp.dtype == torch.float32 and (logp[labels != -100] < 0).all()


def test_without_entropy_and_temperature_one(device):
    model = MODELS["llama-tied"]().to(device)
    input_ids, attention_mask, labels = make_batch(device)
    logp = logprobs_from_model(model, input_ids, labels, attention_mask=attention_mask)
    with torch.no_grad():
        expected = logprobs_ref(model(input_ids=input_ids, attention_mask=attention_mask).logits.double(), labels)
    assert isinstance(logp, torch.Tensor)
    assert_close(logp, expected, atol=1e-5, name="logp")


def test_position_ids_are_passed_to_the_body(device):
    """Extra keyword arguments reach the body: position ids that restart mid-row (two packed sequences per row,
    transformers' padding-free convention) change the result exactly as in the model's own forward."""
    model = MODELS["llama"]().to(device)
    input_ids, _, labels = make_batch(device)
    position_ids = torch.cat([torch.arange(5), torch.arange(T - 5)]).to(device).expand(B, T)
    logp = logprobs_from_model(model, input_ids, labels, position_ids=position_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        plain = logprobs_from_model(model, input_ids, labels)
    assert_close(logp, logprobs_ref(logits.double(), labels), atol=1e-5, name="logp with position_ids")
    assert (logp - plain).abs().max() > 1e-3  # the second sequence no longer sees the first


def test_no_label_at_all(device):
    """Every position ignored: zeros, and a backward that reaches the parameters with zero gradients."""
    model = MODELS["llama"]().to(device)
    input_ids, attention_mask, _ = make_batch(device)
    labels = torch.full((B, T), -100, device=device)
    logp, ent = logprobs_from_model(model, input_ids, labels, attention_mask=attention_mask, return_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert model.get_output_embeddings().weight.grad.abs().max() == 0


def test_logit_scales_are_read_from_the_config():
    assert logit_scale_of(MODELS["llama"]()) == 1.0
    assert logit_scale_of(MODELS["cohere-scale"]()) == 0.25
    assert logit_scale_of(MODELS["granite-scaling"]()) == 0.25
    weight, bias, scale = output_head(MODELS["phi-bias"]())
    assert weight.shape == (V, SMALL["hidden_size"]) and bias.shape == (V,) and scale == 1.0


# ----------------------------------------------------------------------------------------------------
# Heads the fused op cannot reproduce, and bad input
# ----------------------------------------------------------------------------------------------------
def test_softcapping_is_refused():
    cfg = transformers.Gemma2Config(**{**SMALL, "num_key_value_heads": 1}, head_dim=16, final_logit_softcapping=30.0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    input_ids, attention_mask, labels = make_batch("cpu")
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        logprobs_from_model(model, input_ids, labels, attention_mask=attention_mask)


def test_non_linear_head_is_refused():
    model = MODELS["llama"]()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    input_ids, _, labels = make_batch("cpu")
    with pytest.raises(TypeError, match="plain nn.Linear"):
        logprobs_from_model(model, input_ids, labels)


def test_negative_logit_scale_is_refused():
    model = transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=-1.0))
    with pytest.raises(ValueError, match="positive finite"):
        logit_scale_of(model)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda ids, m, y: (ids, m, y[:, :-1]), ValueError, r"labels must have the shape of input_ids \(3, 11\)"),
        (lambda ids, m, y: (ids, m, y.float()), TypeError, "labels must be an integer tensor"),
        (lambda ids, m, y: (ids.float(), m, y), TypeError, "input_ids must be an integer tensor"),
        (lambda ids, m, y: (ids[0], m, y[0]), ValueError, r"input_ids must be \(B, T\)"),
        (lambda ids, m, y: (ids, m[:, 1:], y), ValueError, "attention_mask must have the shape of input_ids"),
        (lambda ids, m, y: (ids, m, y.masked_fill(y == y[0, 5], V)), ValueError, r"labels must be in \[0, 301\)"),
    ],
    ids=["labels-shape", "labels-float", "ids-float", "ids-1d", "mask-shape", "label-range"],
)
def test_bad_input(change, error, match):
    model = MODELS["llama"]()
    input_ids, attention_mask, labels = change(*make_batch("cpu"))
    with pytest.raises(error, match=match):
        logprobs_from_model(model, input_ids, labels, attention_mask=attention_mask)


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=0.0), "temperature must be a positive number"),
                                          (dict(backend="cuda"), "backend must be one of")])  # fmt: skip
def test_bad_options(kwargs, match):
    input_ids, attention_mask, labels = make_batch("cpu")
    with pytest.raises(ValueError, match=match):
        logprobs_from_model(MODELS["llama"](), input_ids, labels, attention_mask=attention_mask, **kwargs)
