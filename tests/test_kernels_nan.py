"""Issue 12, kernels: NaN and Inf are never hidden, and loose inputs are refused.

Both backends (Triton under the interpreter on CPU, and torch) must agree: a NaN or +inf input gives NaN
in what it feeds (logprobs, ppo_loss, linear_*, value_loss, gae) and leaves everything else untouched; the
torch path's gradient stays finite where the kernel's is (log-ratio past float32's exp range); k3 is
accurate for tiny differences everywhere; V = 0, non-finite temperatures and bad global counts are
rejected; an out-of-range label without validation gives NaN on both paths; inplace_backward refuses or
flags what it cannot do safely."""

import pytest
import torch
from helpers import KERNEL_BACKENDS, assert_close

from fusedrl.kernels import (
    PPOLossConfig,
    gae,
    gae_ref,
    kl_penalty,
    linear_logprobs,
    linear_ppo_loss,
    logprobs,
    logprobs_ref,
    ppo_loss,
    ppo_loss_ref,
    shape_token_rewards,
    validation,
    value_loss,
)

# Shapes declared once: a few rows over an odd vocabulary; a small lm_head; two packed sequences.
N, V, H = 7, 37, 16
SEQLENS = (5, 70)  # the second spans two 64-token GAE blocks
BACKENDS = KERNEL_BACKENDS

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN arithmetic


def _rows(device):
    logits = torch.randn(N, V, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    return logits, labels


def _nan_rows_of(logits, labels):
    """Row 1: a NaN logit; row 2: +inf off the label; row 4: +inf at the label. -inf (masked vocabulary)
    stays legal: row 5 has one."""
    x = logits.clone()
    x[1, 3] = float("nan")
    x[2, (int(labels[2]) + 1) % V] = float("inf")
    x[4, int(labels[4])] = float("inf")
    x[5, (int(labels[5]) + 2) % V] = float("-inf")
    return x, torch.tensor([1, 2, 4], device=x.device)


def _isnan_at(t, idx, n):
    expect = torch.zeros(n, dtype=torch.bool)
    expect[idx.cpu()] = True
    return torch.equal(torch.isnan(t).cpu(), expect)


# ----------------------------------------------------------------------------------------------------
# NaN / +inf in -> NaN out, both backends alike
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_nan_and_inf_logits_give_nan(backend, device):
    logits, labels = _rows(device)
    x, bad = _nan_rows_of(logits, labels)
    x.requires_grad_(True)
    logp, ent = logprobs(x, labels, return_entropy=True, backend=backend)
    assert _isnan_at(logp, bad, N), logp
    assert _isnan_at(ent, bad, N), ent
    ok = torch.ones(N, dtype=torch.bool)
    ok[bad.cpu()] = False
    ref_lp, ref_ent = logprobs_ref(x.detach().double(), labels, return_entropy=True)
    assert_close(logp[ok], ref_lp[ok], atol=1e-5, name="logp of the clean rows")
    assert_close(ent[ok], ref_ent[ok], atol=1e-5, name="entropy of the clean rows")
    (g,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    assert torch.isnan(g[bad]).all() and torch.isfinite(g[ok]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_nan_hidden_or_weight_gives_nan(backend, device):
    h = torch.randn(N, H, device=device)
    w = torch.randn(V, H, device=device) / H**0.5
    labels = torch.randint(0, V, (N,), device=device)
    h_bad = h.clone()
    h_bad[3, 5] = float("nan")
    logp = linear_logprobs(h_bad, w, labels, backend=backend)
    assert _isnan_at(logp, torch.tensor([3]), N), logp
    w_bad = w.clone()
    w_bad[11, 0] = float("nan")  # one vocabulary row: every token's normaliser
    assert torch.isnan(linear_logprobs(h, w_bad, labels, backend=backend)).all()
    w_inf = w.clone()
    w_inf[11, 0] = float("inf")
    h[:, 0] = h[:, 0].abs() + 0.1  # every token's logit 11 is +inf
    assert torch.isnan(linear_logprobs(h, w_inf, labels, backend=backend)).all()


def _ppo_inputs(device, n=N):
    logits = torch.randn(n, V, device=device)
    labels = torch.randint(0, V, (n,), device=device)
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(n, device=device)
    adv = torch.randn(n, device=device)
    ref = logp + 0.1 * torch.randn(n, device=device)
    return logits, labels, old, adv, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["logit_nan", "logit_inf", "old_logp", "advantages", "ref_logp"])
def test_ppo_loss_nan_input_gives_nan_loss(backend, where, device):
    logits, labels, old, adv, ref = _ppo_inputs(device)
    if where == "logit_nan":
        logits[2, 4] = float("nan")
    elif where == "logit_inf":
        logits[2, 4] = float("inf")
    else:
        {"old_logp": old, "advantages": adv, "ref_logp": ref}[where][2] = float("nan")
    config = PPOLossConfig(dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    x = logits.requires_grad_(True)
    loss, metrics = ppo_loss(x, labels, old, adv, ref_logp=ref, config=config, backend=backend)
    assert torch.isnan(loss), (where, loss)
    ref_loss, _ = ppo_loss_ref(x.detach().double(), labels, old.double(), adv.double(), ref_logp=ref.double(),
                               config=config)  # fmt: skip
    assert torch.isnan(ref_loss)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isnan(g[2]).any() and torch.isfinite(g[[0, 1, 3, 4, 5, 6]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "weight", "old_logp"])
def test_linear_ppo_loss_nan_input_gives_nan_loss(backend, where, device):
    h = torch.randn(N, H, device=device)
    w = torch.randn(V, H, device=device) / H**0.5
    labels = torch.randint(0, V, (N,), device=device)
    old = torch.full((N,), -3.6, device=device)
    adv = torch.randn(N, device=device)
    {"hidden": h[1], "weight": w[2], "old_logp": old[1:2]}[where][0] = float("nan")
    loss, _ = linear_ppo_loss(h, w, labels, old, adv, backend=backend)
    assert torch.isnan(loss), where


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["values", "old_values", "returns"])
def test_value_loss_nan_input_gives_nan_loss(backend, where, device):
    v, old, ret = (torch.randn(3, 9, device=device) for _ in range(3))
    {"values": v, "old_values": old, "returns": ret}[where][1, 4] = float("nan")
    loss, _ = value_loss(v, old, ret, clip=0.2, backend=backend)
    assert torch.isnan(loss), where
    mask = torch.ones(3, 9, device=device)
    mask[1, 4] = 0  # a masked NaN is padding: it contributes nothing
    loss, _ = value_loss(v, old, ret, mask, clip=0.2, backend=backend)
    assert torch.isfinite(loss)


def _gae_inputs(device):
    n = sum(SEQLENS)
    cu = torch.tensor([0, SEQLENS[0], n], dtype=torch.int32, device=device)
    return torch.randn(n, device=device), torch.randn(n, device=device), cu


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("pos", [2, 40, 66])  # first sequence; mid-block and near a block edge of the second
def test_gae_nonfinite_reward_reaches_only_earlier_tokens(bad, pos, device):
    r, v, cu = _gae_inputs(device)
    r[pos] = bad
    adv_t, ret_t = gae(r, v, cu, gamma=0.99, lam=0.95, backend="triton")
    adv_c, ret_c = gae(r, v, cu, gamma=0.99, lam=0.95, backend="torch")
    adv_64, ret_64 = gae_ref(r.double(), v.double(), cu, gamma=0.99, lam=0.95)
    for name, a, b in (("adv triton", adv_t, adv_64), ("adv torch", adv_c, adv_64), ("ret triton", ret_t, ret_64)):
        assert_close(a, b, atol=1e-4, rtol=1e-4, name=name)
    seq_end = SEQLENS[0] if pos < SEQLENS[0] else len(r)
    assert torch.isfinite(adv_t[pos + 1 :]).all() and not torch.isfinite(adv_t[pos]).any()
    assert torch.isfinite(adv_t[seq_end:]).all()


def test_gae_nan_value_gives_nan_on_both_backends(device):
    r, v, cu = _gae_inputs(device)
    v[30] = float("nan")
    adv_t, _ = gae(r, v, cu, gamma=1.0, lam=0.9, backend="triton")
    adv_c, _ = gae(r, v, cu, gamma=1.0, lam=0.9, backend="torch")
    assert_close(adv_t, adv_c, atol=1e-4, rtol=1e-4, name="advantages")
    assert torch.isnan(adv_t[30]) and torch.isfinite(adv_t[31:]).all()


# ----------------------------------------------------------------------------------------------------
# Far off-policy tokens: finite gradients on the torch path, and the optional log-ratio clamp
# ----------------------------------------------------------------------------------------------------
def _far_off_policy(device):
    """Token 0 clipped high (A > 0, log-ratio 100), token 1 dual-bounded (A < 0, log-ratio 95): both have
    d loss / d logp = 0, but exp(log-ratio) overflows float32."""
    logits, labels, old, adv, ref = _ppo_inputs(device)
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    old[0], adv[0] = logp[0] - 100.0, 1.0
    old[1], adv[1] = logp[1] - 95.0, -1.0
    return logits, labels, old, adv, ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_ratio_past_exp_range_gives_finite_gradient(backend, device):
    logits, labels, old, adv, ref = _far_off_policy(device)
    config = PPOLossConfig(dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    g_out = torch.rand((), device=device) + 0.5
    x = logits.clone().requires_grad_(True)
    loss, _ = ppo_loss(x, labels, old, adv, ref_logp=ref, config=config, backend=backend)
    (g,) = torch.autograd.grad(loss, x, g_out)
    assert torch.isfinite(loss) and torch.isfinite(g).all(), g
    x64 = logits.double().requires_grad_(True)
    loss64, _ = ppo_loss_ref(x64, labels, old.double(), adv.double(), ref_logp=ref.double(), config=config)
    (g64,) = torch.autograd.grad(loss64, x64, g_out.double())
    assert torch.isfinite(g64).all()
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(g, g64, atol=1e-6, name="dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_ratio_clip_clamps_before_the_exponential(backend, device):
    logits, labels, old, adv, ref = _far_off_policy(device)
    adv[1] = 1.0  # no dual clip: the clamp alone bounds the ratio
    old[3] = old[3] + 30.0  # log-ratio about -30: clamped from below
    config = PPOLossConfig(clip_high=1e6, log_ratio_clip=20.0)  # clip_high so large that only the clamp acts
    g_out = torch.rand((), device=device) + 0.5
    x = logits.clone().requires_grad_(True)
    loss, metrics = ppo_loss(x, labels, old, adv, config=config, backend=backend)
    (g,) = torch.autograd.grad(loss, x, g_out)
    x64 = logits.double().requires_grad_(True)
    loss64, m64 = ppo_loss_ref(x64, labels, old.double(), adv.double(), config=config)
    (g64,) = torch.autograd.grad(loss64, x64, g_out.double())
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert_close(metrics["ratio_max"], torch.tensor(20.0).exp(), rtol=1e-6, name="ratio_max = e^20")
    assert_close(m64["ratio_max"], torch.tensor(20.0, dtype=torch.float64).exp(), rtol=1e-12, name="ref ratio_max")
    assert_close(loss, loss64, rtol=1e-5, name="loss")
    assert_close(g, g64, atol=1e-5, name="dlogits")
    assert g[[0, 1, 3]].abs().max() <= 1e-2 * g.abs().max()  # clamped tokens: only the tiny entropy-free rest
    assert PPOLossConfig().log_ratio_clip is None
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="log_ratio_clip"):
            PPOLossConfig(log_ratio_clip=bad)


# ----------------------------------------------------------------------------------------------------
# k3 for tiny differences, everywhere k3 is computed
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-5, 1e-4, 3e-3, 0.05, 0.3, 3.0])
def test_k3_is_accurate_against_float64(scale, device):
    n = 64
    ref = -torch.rand(n, device=device) * 5 - 0.1
    logp = ref + scale * torch.randn(n, device=device)
    d64 = logp.double() - ref.double()
    truth = torch.expm1(-d64) + d64  # (float32 inputs, exact in float64)
    k3 = kl_penalty(logp, ref, "k3")
    assert_close(k3, truth, rtol=2e-6, atol=0.0, name="kl_penalty k3")
    assert_close(kl_penalty(logp, ref, "k3+"), truth, rtol=2e-6, atol=0.0, name="kl_penalty k3+")
    # its gradient, 1 - exp(-d)
    lp = logp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_penalty(lp, ref, "k3").sum(), lp)
    assert_close(g, -torch.expm1(-d64), rtol=3e-5, atol=0.0, name="dk3/dlogp")
    cu = torch.tensor([0, n], device=device)
    _, kl = shape_token_rewards(torch.zeros(1, device=device), logp, ref, cu, kl_coef=0.1, estimator="k3")
    assert_close(kl, truth, rtol=2e-6, atol=0.0, name="shape_token_rewards k3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_k3_metric_accurate_for_tiny_differences(backend, device):
    logits, labels, old, adv, _ = _ppo_inputs(device, n=32)
    with torch.no_grad():
        logp = logprobs(logits, labels, backend=backend)
    ref = logp + 1e-4 * torch.randn_like(logp)
    d64 = logp.double() - ref.double()
    truth = (torch.expm1(-d64) + d64).mean()
    _, metrics = ppo_loss(logits, labels, old, adv, ref_logp=ref, config=PPOLossConfig(kl_coef=0.1),
                          backend=backend)  # fmt: skip
    assert_close(metrics["kl"], truth, rtol=1e-4, atol=0.0, name="kl metric")


# ----------------------------------------------------------------------------------------------------
# Loose inputs are refused
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_vocabulary_is_rejected(backend, device):
    labels = torch.zeros(3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"logits must have a vocabulary dim V >= 1.*\(3, 0\)"):
        logprobs(torch.empty(3, 0, device=device), labels, backend=backend)
    z = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match=r"V >= 1"):
        ppo_loss(torch.empty(3, 0, device=device), labels, z, z, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have V >= 1 rows"):
        linear_logprobs(torch.randn(3, H, device=device), torch.empty(0, H, device=device), labels, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have V >= 1 rows"):
        linear_ppo_loss(torch.randn(3, H, device=device), torch.empty(0, H, device=device), labels, z, z,
                        backend=backend)  # fmt: skip


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0, True])
def test_bad_temperature_is_rejected(temperature, device):
    logits, labels = _rows(device)
    with pytest.raises(ValueError, match="temperature"):
        logprobs(logits, labels, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(torch.randn(N, H, device=device), torch.randn(V, H, device=device), labels,
                        temperature=temperature)  # fmt: skip
    with pytest.raises(ValueError, match="temperature"):
        ppo_loss(logits, labels, torch.zeros(N, device=device), torch.zeros(N, device=device),
                 config=PPOLossConfig(temperature=temperature))  # fmt: skip


@pytest.mark.parametrize("count", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_global_count_tensor_is_rejected(count, device):
    logits, labels, old, adv, _ = _ppo_inputs(device)
    c = torch.tensor(count, device=device)
    with pytest.raises(ValueError, match=r"num_tokens must be > 0 and finite"):
        ppo_loss(logits, labels, old, adv, num_tokens=c)
    cu = torch.tensor([0, 3, N], device=device)
    with pytest.raises(ValueError, match=r"num_sequences must be > 0 and finite"):
        ppo_loss(logits, labels, old, adv, cu_seqlens=cu, num_sequences=c,
                 config=PPOLossConfig(agg="seq-mean-token-sum"))  # fmt: skip
    with pytest.raises(ValueError, match=r"num_tokens must be > 0 and finite"):
        value_loss(old, old, adv, num_tokens=c)
    with pytest.raises(ValueError, match=r"num_tokens must be > 0 and finite"):
        value_loss(old, old, adv, num_tokens=count)
    with validation(False):  # a data check (a host sync on GPU): off with the others
        loss, _ = value_loss(old, old, adv, num_tokens=torch.tensor(2.0, device=device))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_without_validation_gives_nan_row(backend, device):
    logits, labels = _rows(device)
    bad = labels.clone()
    bad[2], bad[5] = V, -7
    x = logits.clone().requires_grad_(True)
    with validation(False):
        logp = logprobs(x, bad, backend=backend)
        lp_lin = linear_logprobs(torch.randn(N, H, device=device), torch.randn(V, H, device=device), bad,
                                 backend=backend)  # fmt: skip
        loss, _ = ppo_loss(logits, bad, torch.zeros(N, device=device), torch.ones(N, device=device),
                           backend=backend)  # fmt: skip
    nan_rows = torch.tensor([2, 5])
    assert _isnan_at(logp, nan_rows, N), logp
    assert _isnan_at(lp_lin, nan_rows, N), lp_lin
    assert torch.isnan(loss)
    ok = torch.tensor([0, 1, 3, 4, 6])
    assert_close(logp[ok], logprobs_ref(logits.double(), labels)[ok], atol=1e-5, name="clean rows")
    g_out = torch.randn(N, device=device)
    g_out[nan_rows] = 0.0
    (g,) = torch.autograd.grad(logp, x, g_out)
    x64 = logits.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(logprobs_ref(x64, labels), x64, g_out.double())
    assert_close(g, g64, atol=1e-6, name="gradient (zero upstream on the bad rows)")


# ----------------------------------------------------------------------------------------------------
# inplace_backward: what cannot be overwritten safely
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_rejects_an_expanded_view(backend, device):
    _, labels, old, adv, _ = _ppo_inputs(device)
    row = torch.randn(1, V, device=device, requires_grad=True)
    x = row.expand(N, V)  # every row is the same memory
    with pytest.raises(ValueError, match=r"inplace_backward=True needs logits whose elements do not share memory"):
        ppo_loss(x, labels, old, adv, inplace_backward=True, backend=backend)
    loss, _ = ppo_loss(x, labels, old, adv, backend=backend)  # fine without in place
    assert torch.isfinite(torch.autograd.grad(loss, row)[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("who", ["producer", "consumer"])
def test_inplace_backward_flags_logits_another_node_needs(backend, who, device):
    base = torch.randn(N, V, device=device, requires_grad=True)
    _, labels, old, adv, _ = _ppo_inputs(device)
    if who == "producer":
        logits = base.exp()  # exp saves its output for its own backward
        other = torch.zeros((), device=device)
    else:
        logits = base * 1.5
        other = logits.pow(2).sum()  # pow saves logits; created first, its backward runs after ppo_loss's
    loss, _ = ppo_loss(logits, labels, old, adv, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss + other, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_flags_logits_modified_after_forward(backend, device):
    base = torch.randn(N, V, device=device, requires_grad=True)
    _, labels, old, adv, _ = _ppo_inputs(device)
    logits = base * 1.5
    loss, _ = ppo_loss(logits, labels, old, adv, inplace_backward=True, backend=backend)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, base)
