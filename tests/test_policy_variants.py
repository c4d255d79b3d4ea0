"""The policy-loss frontier of fusedrl.kernels' PPO-family ops: GSPO / GSPO-token, CISPO, SAPO, the two-sided clip,
rollout importance correction (TIS / MIS), the importance-weighted / abs / clamped KL and the new aggregations.

Every variant three-way (fused op in fp32 / bf16 on both backends, the reference in the same dtype, the float64
reference), forward, backward and metrics, packed and padded, on the logits op and the lm_head op (chunks smaller
than a sequence, so a sequence-level ratio spans chunks); hand-derived values and gradients; micro-batch invariance;
``ppo_loss_from_logprobs`` against the fused op; the peer implementation (Liger-Kernel's fused linear GRPO loss)
where it is installed; bad input."""

import importlib.util

import pytest
import torch
from helpers import EPS, KERNEL_BACKENDS, assert_close, assert_kernel_close
from test_ppo_loss import make_batch

from fusedrl.kernels import (
    PPOLossConfig,
    linear_ppo_loss,
    linear_ppo_loss_ref,
    logprobs_ref,
    ppo_loss,
    ppo_loss_from_logprobs,
    ppo_loss_ref,
    token_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN on skipped rows

BACKENDS = KERNEL_BACKENDS
BASE = dict(kl_coef=0.1, entropy_coef=0.01, temperature=0.7)
# Each variant with every other term on (KL, entropy, temperature); clip ranges wide enough that some tokens or
# sequences of the random batches sit on each bound.
VARIANTS = {
    "gspo": dict(importance_sampling_level="sequence", clip_low=0.05, clip_high=0.06),
    "gspo-token": dict(importance_sampling_level="sequence-token", clip_low=0.05, clip_high=0.06),
    "gspo-dual": dict(importance_sampling_level="sequence", clip_low=0.05, clip_high=0.06, dual_clip=1.05),
    "cispo": dict(policy_loss="cispo", clip_low=1.0, clip_high=0.2),
    "cispo-seq": dict(policy_loss="cispo", importance_sampling_level="sequence", clip_low=0.05, clip_high=0.05),
    "sapo": dict(policy_loss="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    "sapo-seq": dict(policy_loss="sapo", importance_sampling_level="sequence", sapo_temperature_neg=2.0),
    "delta": dict(clip_delta=1.25),
    "tis": dict(rollout_correction="tis", rollout_is_max=1.3),
    "mis-seq": dict(rollout_correction="mis", rollout_correction_level="sequence", rollout_is_max=2.0),
    "tis-geo": dict(
        rollout_correction="tis", rollout_correction_level="sequence-mean", rollout_is_max=1.1, rollout_is_min=0.95
    ),  # fmt: skip
    "kl-iw": dict(kl_importance_weighted=True, kl_estimator="k3"),
    "kl-iw-seq": dict(kl_importance_weighted=True, importance_sampling_level="sequence", kl_estimator="k2"),
    "kl-abs-clamp": dict(kl_estimator="abs", kl_clamp=0.2),
    "kl-iw-lr-clip": dict(kl_importance_weighted=True, kl_estimator="k1", kl_clamp=0.3, log_ratio_clip=0.25),
    "sapo-lr-clip": dict(policy_loss="sapo", log_ratio_clip=0.25),
    "cispo-lr-clip": dict(policy_loss="cispo", clip_low=0.1, clip_high=0.1, log_ratio_clip=0.25),
    "token-sum": dict(agg="token-sum"),
    "dr-grpo": dict(agg="seq-mean-token-sum-norm", agg_norm_length=16),
}
METRICS = ("clipfrac", "clipfrac_low", "clipfrac_high", "dualclip_frac", "approx_kl", "kl", "entropy", "ratio_max")
ROLLOUT_METRICS = ("rollout_k3", "rollout_ratio_max", "rollout_corrected_frac")


def with_rollout(batch):
    """The batch with rollout-engine log-probs: the old policy's plus a mismatch of ~0.3 nats."""
    g = torch.Generator(device="cpu").manual_seed(7)
    noise = 0.3 * torch.randn(batch["old_logp"].shape, generator=g).to(batch["old_logp"].device)
    return {**batch, "rollout_logp": batch["old_logp"] + noise}


def run(fn, logits, batch, grad_out, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss, metrics = fn(x, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"],
                       ref_logp=batch["ref_logp"], rollout_logp=batch.get("rollout_logp"), **kw)  # fmt: skip
    (g,) = torch.autograd.grad(loss, x, grad_out)
    return loss.detach(), metrics, g


def check_three_way(fn, ref_fn, x, batch, config, **kw):
    g = torch.randn((), device=x.device)
    kernel = run(fn, x, batch, g, config=config, **kw)
    ref_low = run(ref_fn, x, batch, g, config=config, **kw)
    truth = run(ref_fn, x.double(), batch, g, config=config, **kw)
    assert_kernel_close(kernel[0], ref_low[0], truth[0], name="loss")
    scale = truth[2].abs().max().item()
    atol = None if x.dtype == torch.float32 else EPS[x.dtype] * scale + 1e-7
    assert_kernel_close(kernel[2], ref_low[2], truth[2], atol=atol, name="gradient")
    keys = METRICS + (ROLLOUT_METRICS if "rollout_logp" in batch else ())
    for key in keys:
        assert kernel[1][key].shape == () and kernel[1][key].dtype == torch.float32, key
        assert_kernel_close(kernel[1][key], ref_low[1][key], truth[1][key], name=key)
    return kernel, truth


def batch_for(name, layout, dtype, device):
    batch = make_batch(layout, dtype, device, temperature=BASE["temperature"])
    return with_rollout(batch) if "rollout_correction" in VARIANTS[name] else batch


# ----------------------------------------------------------------------------------------------------
# Three-way, logits op and lm_head op
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_match_float64(name, backend, layout, device):
    batch = batch_for(name, layout, torch.float32, device)
    config = PPOLossConfig(**{**BASE, **VARIANTS[name]})
    fused = lambda *a, **k: ppo_loss(*a, backend=backend, **k)  # noqa: E731
    kernel, truth = check_three_way(fused, ppo_loss_ref, batch["logits"], batch, config,
                                    cu_seqlens=batch["cu_seqlens"])  # fmt: skip
    assert truth[2].abs().max() > 0  # the gradient is not trivially zero


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gspo", "cispo", "sapo", "mis-seq", "kl-iw-seq"])
def test_variants_bf16_match_float64(name, backend, device):
    batch = batch_for(name, "packed", torch.bfloat16, device)
    config = PPOLossConfig(**{**BASE, **VARIANTS[name]})
    fused = lambda *a, **k: ppo_loss(*a, backend=backend, **k)  # noqa: E731
    check_three_way(fused, ppo_loss_ref, batch["logits"], batch, config, cu_seqlens=batch["cu_seqlens"])


def _linear_batch(layout, dtype, device, rollout):
    torch.manual_seed(3)
    H, V = 24, 301
    batch = make_batch(layout, torch.float32, device, V=V)
    lead = batch["labels"].shape
    batch["hidden"] = torch.randn(*lead, H, device=device).to(dtype)
    batch["weight"] = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
    batch["bias"] = (0.1 * torch.randn(V, device=device)).to(dtype)
    logits = torch.nn.functional.linear(batch["hidden"].double(), batch["weight"].double(), batch["bias"].double())
    logp = logprobs_ref(logits, batch["labels"], temperature=BASE["temperature"])
    batch["old_logp"] = (logp + 0.2 * torch.randn_like(logp)).float()
    batch["ref_logp"] = (logp + 0.2 * torch.randn_like(logp)).float()
    return with_rollout(batch) if rollout else batch


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_linear_variants_match_float64(name, backend, layout, device):
    """The lm_head op with 5-token chunks: every sequence-level ratio couples tokens of several chunks."""
    batch = _linear_batch(layout, torch.float32, device, "rollout_correction" in VARIANTS[name])
    config = PPOLossConfig(**{**BASE, **VARIANTS[name]})
    g = torch.randn((), device=device)
    kw = dict(config=config, cu_seqlens=batch["cu_seqlens"], ref_logp=batch["ref_logp"],
              rollout_logp=batch.get("rollout_logp"))  # fmt: skip

    def go(fn, dtype, **extra):
        h = batch["hidden"].to(dtype).detach().requires_grad_(True)
        w = batch["weight"].to(dtype).detach().requires_grad_(True)
        b = batch["bias"].to(dtype).detach().requires_grad_(True)
        loss, m = fn(h, w, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"], bias=b, **kw,
                     **extra)  # fmt: skip
        return (loss, m, *torch.autograd.grad(loss * g, (h, w, b)))

    kernel = go(linear_ppo_loss, torch.float32, chunk_size=5, backend=backend)
    ref_low = go(linear_ppo_loss_ref, torch.float32)
    truth = go(linear_ppo_loss_ref, torch.float64)
    assert_kernel_close(kernel[0], ref_low[0], truth[0], name="loss")
    for i, what in ((2, "d hidden"), (3, "d weight"), (4, "d bias")):
        assert_kernel_close(kernel[i], ref_low[i], truth[i], name=what)
    for key in METRICS + (ROLLOUT_METRICS if "rollout_logp" in batch else ()):
        assert_kernel_close(kernel[1][key], ref_low[1][key], truth[1][key], name=key)


# ----------------------------------------------------------------------------------------------------
# Hand-derived values and gradients (through ppo_loss_from_logprobs: logp is the leaf)
# ----------------------------------------------------------------------------------------------------
def _leaf(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def test_gspo_one_ratio_per_sequence_and_its_gradient():
    """Two sequences of 3 and 2 tokens, one advantage each, no clip reached: r_i = exp(mean(logp - old)) per sequence,
    loss = sum_i sum_t w_t (-A_i r_i) and d loss / d logp_t = -sum_u w_u A_i r_i / |y_i| for GSPO, -w_t A_i r_i for
    GSPO-token (the same value)."""
    lp0 = [-1.0, -2.0, -0.5, -1.5, -0.7]
    old = torch.tensor([-1.1, -1.9, -0.6, -1.4, -0.75], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0], dtype=torch.float64)
    cu = torch.tensor([0, 3, 5])
    d = torch.tensor(lp0, dtype=torch.float64) - old
    r = torch.stack([d[:3].mean().exp(), d[3:].mean().exp()])
    w = 1.0 / 5  # token-mean over 5 tokens
    expected_loss = w * (-3 * 1.0 * r[0] - 2 * (-2.0) * r[1])
    results = {}
    for level in ("sequence", "sequence-token"):
        lp = _leaf(lp0)
        cfg = PPOLossConfig(importance_sampling_level=level, clip_low=0.5, clip_high=0.5)
        loss, m = ppo_loss_from_logprobs(lp, old, adv, cu_seqlens=cu, config=cfg, return_per_token=True)
        assert_close(loss, expected_loss, atol=1e-12, name=f"{level} loss")
        assert_close(m["per_token"]["ratio"], torch.stack([r[0]] * 3 + [r[1]] * 2), atol=1e-12, name="ratio")
        (results[level],) = torch.autograd.grad(loss, lp)
    seq_grad = torch.tensor([-3 * w * 1.0 * r[0] / 3] * 3 + [-2 * w * -2.0 * r[1] / 2] * 2, dtype=torch.float64)
    assert_close(results["sequence"], seq_grad, atol=1e-12, name="GSPO gradient")
    tok_grad = torch.tensor([-w * 1.0 * r[0]] * 3 + [-w * -2.0 * r[1]] * 2, dtype=torch.float64)
    assert_close(results["sequence-token"], tok_grad, atol=1e-12, name="GSPO-token gradient")


def test_gspo_clips_whole_sequences():
    """A positive-advantage sequence whose mean log-ratio exceeds log(1 + clip_high) is clipped as a whole: every one of
    its tokens gets zero gradient and the upper-clip flag, although some of its tokens have ratios below 1."""
    lp = _leaf([-1.0, -1.0, -1.0, -1.0])
    old = torch.tensor([-1.5, -1.5, -0.9, -1.0], dtype=torch.float64)  # seq 0: d = (0.5, 0.5, -0.1) -> r = e^0.3
    adv = torch.ones(4, dtype=torch.float64)
    cfg = PPOLossConfig(importance_sampling_level="sequence", clip_low=0.2, clip_high=0.2)
    loss, m = ppo_loss_from_logprobs(lp, old, adv, cu_seqlens=torch.tensor([0, 3, 4]), config=cfg,
                                     return_per_token=True)  # fmt: skip
    (g,) = torch.autograd.grad(loss, lp)
    assert_close(g[:3], torch.zeros(3, dtype=torch.float64), atol=0.0, name="clipped sequence")
    assert g[3] != 0
    assert m["per_token"]["clipped_high"].tolist() == [True, True, True, False]
    assert_close(m["clipfrac_high"], 0.75, atol=1e-7, name="clipfrac_high")
    assert_close(loss, torch.tensor(-4.6 / 4, dtype=torch.float64), atol=1e-12, name="loss")


def test_cispo_never_drops_a_gradient():
    """CISPO: l = -sg[clip(r, 1 - lo, 1 + hi)] A logp, so d l / d logp = -clip(r) A even where PPO's clip would zero it."""
    lp = _leaf([-1.0, -1.0, -1.0])
    old = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)  # r = e^0.5, 1, e^-0.5
    adv = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    cfg = PPOLossConfig(policy_loss="cispo", clip_low=0.2, clip_high=0.28, agg="token-sum")
    loss, m = ppo_loss_from_logprobs(lp, old, adv, config=cfg, return_per_token=True)
    (g,) = torch.autograd.grad(loss, lp)
    w = torch.tensor([1.28, 1.0, 0.8], dtype=torch.float64)
    assert_close(loss, (-w * adv * lp.detach()).sum(), atol=1e-12, name="loss")
    assert_close(g, -w * adv, atol=1e-12, name="gradient")
    assert m["per_token"]["clipped_high"].tolist() == [True, False, False]
    assert m["per_token"]["clipped_low"].tolist() == [False, False, True]
    # PPO drops the first and last tokens' gradients (the clipped branch is active there).
    ppo_loss_, _ = ppo_loss_from_logprobs(lp, old, adv, config=PPOLossConfig(clip_low=0.2, clip_high=0.28))
    (g_ppo,) = torch.autograd.grad(ppo_loss_, lp)
    assert g_ppo[0] == 0 and g_ppo[1] != 0 and g_ppo[2] == 0


def test_sapo_gate_value_and_slope():
    """SAPO at r = 1: l = -A (4 / tau) sigmoid(0) = -2 A / tau and d l / d logp = -A (the unclipped surrogate's slope);
    far above 1 the gate is flat: no gradient, and no NaN even when the ratio overflows."""
    lp = _leaf([-1.0, -1.0, 50.0, -1.0])
    old = torch.tensor([-1.0, -1.0, -100.0, -1.0], dtype=torch.float64)  # r = 1, 1, e^150 (overflows fp32), 1
    adv = torch.tensor([1.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    cfg = PPOLossConfig(policy_loss="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=2.0, agg="token-sum")
    loss, _ = ppo_loss_from_logprobs(lp, old, adv, config=cfg)
    (g,) = torch.autograd.grad(loss, lp)
    assert_close(loss, -2.0 * 1.0 / 1.0 + 2.0 * 1.0 / 2.0 - 4.0, atol=1e-9, name="loss")
    assert_close(g, torch.tensor([-1.0, 1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12, name="gradient")
    lp32 = _leaf([-1.0, 50.0], torch.float32)
    loss32, _ = ppo_loss_from_logprobs(lp32, torch.tensor([-1.0, -100.0]), torch.ones(2), config=cfg)
    (g32,) = torch.autograd.grad(loss32, lp32)
    assert torch.isfinite(loss32) and torch.isfinite(g32).all() and g32[1] == 0


def test_two_sided_clip_bounds_negative_advantages():
    """clip_delta: the unclipped ratio is clamped at delta; for A < 0 and r > delta, l = -delta A, no gradient,
    and the token is counted in dualclip_frac; it matches dual_clip=delta (the same bound)."""
    lp = _leaf([-1.0, -1.0, -1.0])
    old = torch.tensor([-2.0, -1.1, -2.0], dtype=torch.float64)  # r = e, e^0.1, e
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    cfg = PPOLossConfig(clip_delta=1.5, agg="token-sum")
    loss, m = ppo_loss_from_logprobs(lp, old, adv, config=cfg, return_per_token=True)
    (g,) = torch.autograd.grad(loss, lp)
    r1 = torch.tensor(0.1, dtype=torch.float64).exp()
    assert_close(loss, 1.5 + r1 - 1.2, atol=1e-12, name="loss")
    assert_close(g, torch.tensor([0.0, float(r1), 0.0], dtype=torch.float64), atol=1e-12, name="gradient")
    assert m["per_token"]["dual_clipped"].tolist() == [True, False, False]
    dual_loss, _ = ppo_loss_from_logprobs(lp, old, adv, config=PPOLossConfig(dual_clip=1.5, agg="token-sum"))
    assert_close(dual_loss, loss, atol=1e-12, name="delta == dual clip")


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_rollout_correction_weights(mode):
    """TIS multiplies the policy term by min(w, C), MIS by w inside [1/C, C] and 0 outside, w = exp(old - rollout);
    the KL term is not weighted. Metrics: mean k3(rollout || old), the largest w, the corrected fraction."""
    lp = _leaf([-1.0, -1.0, -1.0, -1.0])
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)  # on policy: r = 1
    rollout = torch.tensor([-1.0, -2.0, -0.2, -1.3], dtype=torch.float64)  # w = 1, e, e^-0.8, e^0.3
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    ref = torch.tensor([-1.2, -1.2, -1.2, -1.2], dtype=torch.float64)
    cfg = PPOLossConfig(rollout_correction=mode, rollout_is_max=2.0, kl_coef=0.5, kl_estimator="k1", agg="token-sum")
    loss, m = ppo_loss_from_logprobs(lp, old, adv, ref_logp=ref, rollout_logp=rollout, config=cfg)
    (g,) = torch.autograd.grad(loss, lp)
    w = (old - rollout).exp()
    weight = w.clamp(max=2.0) if mode == "tis" else torch.where((w < 0.5) | (w > 2.0), 0.0, w)
    assert_close(loss, (-weight).sum() + 0.5 * 0.2 * 4, atol=1e-12, name="loss")
    assert_close(g, -weight + 0.5, atol=1e-12, name="gradient")  # d(-A r w)/dlogp = -w at r = 1; k1' = 1
    k3 = (old - rollout).exp() - (old - rollout) - 1
    assert_close(m["rollout_k3"], k3.mean(), atol=1e-7, name="rollout_k3")
    assert_close(m["rollout_ratio_max"], w.max(), atol=1e-6, name="rollout_ratio_max")
    assert_close(m["rollout_corrected_frac"], 0.25 if mode == "tis" else 0.5, atol=1e-7, name="corrected")


def test_rollout_nan_propagates_through_mis():
    """A NaN rollout log-prob is never masked away into a finite loss (NaN in, NaN out)."""
    lp = _leaf([-1.0, -1.0])
    loss, _ = ppo_loss_from_logprobs(lp, torch.tensor([-1.0, -1.0]), torch.ones(2),
                                     rollout_logp=torch.tensor([-1.0, float("nan")]),
                                     config=PPOLossConfig(rollout_correction="mis"))  # fmt: skip
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cispo", "sapo", "delta", "tis", "gspo", "kl-abs-clamp"])
def test_nan_in_gives_nan_out(name, backend, device):
    """A NaN old log-prob on one scored token makes the loss NaN on every path (fused kernel and generic alike),
    and the gradient rows of the other tokens stay finite unless a sequence-level ratio couples them."""
    batch = batch_for(name, "packed", torch.float32, device)
    valid = batch["mask"] & (batch["labels"] != -100)
    i = int(valid.nonzero()[0])
    batch["old_logp"] = batch["old_logp"].clone()
    batch["old_logp"][i] = float("nan")
    config = PPOLossConfig(**{**BASE, **VARIANTS[name]})
    loss, _, g = run(lambda *a, **k: ppo_loss(*a, backend=backend, **k), batch["logits"], batch, torch.ones(()),
                     config=config, cu_seqlens=batch["cu_seqlens"])  # fmt: skip
    assert torch.isnan(loss)
    assert torch.isnan(g[i]).all()
    if "importance_sampling_level" not in VARIANTS[name]:
        others = torch.ones(g.shape[0], dtype=torch.bool, device=device)
        others[i] = False
        assert torch.isfinite(g[others]).all()


def test_importance_weighted_kl_is_kl_times_ratio():
    """kl_importance_weighted: the KL term is r * k with r differentiated (TRL's use_bias_correction_kl)."""
    lp = _leaf([-1.0, -0.5])
    old = torch.tensor([-1.2, -0.4], dtype=torch.float64)
    ref = torch.tensor([-0.8, -0.9], dtype=torch.float64)
    adv = torch.zeros(2, dtype=torch.float64)
    cfg = PPOLossConfig(kl_coef=1.0, kl_estimator="k3", kl_importance_weighted=True, agg="token-sum")
    loss, _ = ppo_loss_from_logprobs(lp, old, adv, ref_logp=ref, config=cfg)
    x = lp.detach().clone().requires_grad_(True)
    expected = ((x - old).exp() * ((ref - x).exp() - (ref - x) - 1)).sum()
    assert_close(loss, expected, atol=1e-12, name="loss")
    assert_close(torch.autograd.grad(loss, lp)[0], torch.autograd.grad(expected, x)[0], atol=1e-12, name="gradient")


def test_abs_and_clamped_kl():
    lp = _leaf([-1.0, -0.5, -3.0])
    ref = torch.tensor([-1.2, -0.4, -1.0], dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    cfg = PPOLossConfig(kl_coef=1.0, kl_estimator="abs", kl_clamp=0.5, agg="token-sum")
    loss, m = ppo_loss_from_logprobs(lp, lp.detach(), zeros, ref_logp=ref, config=cfg)
    assert_close(loss, torch.tensor(0.8, dtype=torch.float64), atol=1e-12, name="abs KL clamped at 0.5")
    assert_close(torch.autograd.grad(loss, lp)[0], torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64), atol=1e-12,
                 name="gradient")  # fmt: skip


def test_clip_fractions_by_direction():
    """clipfrac_low counts negative-advantage tokens below 1 - clip_low, clipfrac_high positive ones above
    1 + clip_high; clipfrac is their sum."""
    lp = _leaf([-1.0] * 5)
    old = torch.tensor([-1.5, -0.5, -1.5, -0.5, -1.0], dtype=torch.float64)  # r = e^.5, e^-.5, e^.5, e^-.5, 1
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    _, m = ppo_loss_from_logprobs(lp, old, adv, config=PPOLossConfig())
    assert_close(torch.stack([m["clipfrac_high"], m["clipfrac_low"], m["clipfrac"]]),
                 torch.tensor([0.2, 0.2, 0.4]), atol=1e-7, name="fractions")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Entry points agree; invariances
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gspo", "cispo", "sapo", "tis", "kl-iw", "dr-grpo"])
def test_from_logprobs_matches_the_fused_op(name, device):
    """ppo_loss_from_logprobs on log-probs (and entropies) of the logits gives ppo_loss's loss, metrics and, through
    the log-softmax, its gradient."""
    batch = batch_for(name, "packed", torch.float32, device)
    config = PPOLossConfig(**{**BASE, **VARIANTS[name]})
    g = torch.randn((), device=device)
    fused = run(lambda *a, **k: ppo_loss(*a, backend="torch", **k), batch["logits"], batch, g, config=config,
                cu_seqlens=batch["cu_seqlens"])  # fmt: skip
    x = batch["logits"].detach().clone().requires_grad_(True)
    lp, ent = logprobs_ref(x, batch["labels"], temperature=config.temperature, return_entropy=True)
    mask = batch["mask"] & (batch["labels"] != -100)
    loss, m = ppo_loss_from_logprobs(lp, batch["old_logp"], batch["advantages"], mask, entropy=ent,
                                     ref_logp=batch["ref_logp"], rollout_logp=batch.get("rollout_logp"),
                                     config=config, cu_seqlens=batch["cu_seqlens"])  # fmt: skip
    (gx,) = torch.autograd.grad(loss, x, g)
    assert_close(loss, fused[0], atol=1e-6, rtol=1e-5, name="loss")
    assert_close(gx, fused[2], atol=1e-6, name="gradient")
    for key in METRICS:
        assert_close(m[key], fused[1][key], atol=1e-6, rtol=1e-5, name=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gspo", "gspo-token", "mis-seq", "dr-grpo", "token-sum"])
def test_sequence_level_micro_batches_sum_to_the_full_batch(name, backend, device):
    """Whole sequences per micro-batch and the global denominators: micro-batch losses and gradients add up to the
    full batch's, for sequence-level ratios and weights too."""
    batch = batch_for(name, "padded", torch.float32, device)
    config = PPOLossConfig(**{**BASE, **VARIANTS[name]})
    valid = batch["mask"] & (batch["labels"] != -100)
    counts = dict(num_tokens=valid.sum(), num_sequences=int(valid.any(1).sum()))
    g = torch.randn((), device=device)
    fused = lambda *a, **k: ppo_loss(*a, backend=backend, **k)  # noqa: E731
    full = run(fused, batch["logits"], batch, g, config=config, **counts)
    parts = []
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        parts.append(run(fused, part["logits"], part, g, config=config, **counts))
    assert_close(parts[0][0] + parts[1][0], full[0], atol=1e-6, rtol=1e-6, name="losses")
    assert_close(torch.cat([parts[0][2], parts[1][2]]), full[2], atol=1e-7, name="gradients")


def test_new_aggregations_hand_checked():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert_close(token_weights(mask, "token-sum"), mask.float(), atol=0.0, name="token-sum")
    w = token_weights(mask, "seq-mean-token-sum-norm")  # 2 non-empty sequences, padded width 4
    assert_close(w, mask.float() / (2 * 4), atol=1e-8, name="dr-grpo default length")
    w = token_weights(mask, "seq-mean-token-sum-norm", norm_length=10, num_sequences=3)
    assert_close(w, mask.float() / 30, atol=1e-8, name="dr-grpo explicit")
    flat = mask.reshape(-1)
    with pytest.raises(ValueError, match="norm_length"):
        token_weights(flat, "seq-mean-token-sum-norm", cu_seqlens=torch.tensor([0, 4, 8, 12]))


# ----------------------------------------------------------------------------------------------------
# Peer: Liger-Kernel's fused linear GRPO loss
# ----------------------------------------------------------------------------------------------------
def _liger():
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (it is in the test extra: pip install -e '.[test]')")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as e:  # pragma: no cover - an incompatible build
        pytest.skip(f"liger_kernel.chunked_loss does not import here: {type(e).__name__}: {e}")
    return LigerFusedLinearGRPOLoss


# loss_type / Liger settings -> the PPOLossConfig and global denominators giving the same loss (B sequences,
# T positions, n the unmasked tokens): TRL's and Liger's GRPO normalisations.
LIGER_CASES = {
    "grpo": (dict(loss_type="grpo"), dict(agg="seq-mean-token-mean"), "B"),
    "bnpo": (dict(loss_type="bnpo"), dict(agg="token-mean"), "n"),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=16), dict(agg="seq-mean-token-sum-norm",
                                                                          agg_norm_length=16), "B"),  # fmt: skip
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28), dict(agg="token-mean", clip_high=0.28), "n"),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.3), dict(agg="token-mean", policy_loss="cispo", clip_low=1.0,
                                                             clip_high=0.3), "n"),  # fmt: skip
    "sapo": (dict(loss_type="sapo"), dict(agg="seq-mean-token-mean", policy_loss="sapo"), "B"),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.05),
             dict(agg="seq-mean-token-mean", importance_sampling_level="sequence", clip_low=0.05, clip_high=0.05), "B"),
    "delta": (dict(loss_type="dapo", delta=1.2), dict(agg="token-mean", clip_delta=1.2), "n"),
    "kl-iw": (dict(loss_type="bnpo", use_bias_correction_kl=True), dict(agg="token-mean", kl_importance_weighted=True),
              "n"),  # fmt: skip
    "is-ratio": (dict(loss_type="bnpo"), dict(agg="token-mean", rollout_correction="tis", rollout_is_max=1.5), "n"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LIGER_CASES))
def test_matches_liger_fused_linear_grpo(case):
    """Liger's LigerFusedLinearGRPOLoss (eager: compiled=False) on the same padded batch: loss and the gradients of
    hidden and weight. Its vllm_is_ratio is given the truncated weights TIS computes from rollout log-probs."""
    Liger = _liger()
    liger_kw, ours_kw, denom = LIGER_CASES[case]
    torch.manual_seed(11)
    B, T, H, V, beta, temp = 3, 7, 16, 97, 0.04, 0.9
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / H**0.5
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    lp = logprobs_ref(torch.nn.functional.linear(hidden, weight), ids, temperature=temp)
    old = lp + 0.2 * torch.randn(B, T, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(B, T, dtype=torch.float64)
    rollout = old + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    is_ratio = None
    if case == "is-ratio":
        is_ratio = (old - rollout).exp().clamp(max=1.5)
    liger = Liger(beta=beta, compiled=False, use_ref_model=True, chunk_size=1, temperature=temp, **liger_kw)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    try:
        out = liger(h1, w1, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old, vllm_is_ratio=is_ratio)
    except Exception as e:  # Liger's CPU path is not what it is built for
        pytest.skip(f"Liger's fused linear GRPO does not run here: {type(e).__name__}: {e}")
    liger_loss = out[0] if isinstance(out, tuple) else out
    gl = torch.autograd.grad(liger_loss, (h1, w1))

    labels = ids.masked_fill(mask == 0, -100)
    n = int(mask.sum())
    counts = dict(num_sequences=B) if denom == "B" else dict(num_tokens=n)
    config = PPOLossConfig(kl_coef=beta, kl_estimator="k3", temperature=temp, **ours_kw)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours, _ = linear_ppo_loss(h2, w2, labels, old, adv[:, None].expand(B, T), ref_logp=ref,
                              rollout_logp=rollout if case == "is-ratio" else None, config=config, chunk_size=4,
                              backend="torch", **counts)  # fmt: skip
    go = torch.autograd.grad(ours, (h2, w2))
    # Both round to float32 inside (per-token inputs and accumulators): float32 tolerances.
    assert_close(ours, liger_loss, atol=1e-6, rtol=1e-5, name="loss vs Liger")
    assert_close(go[0], gl[0], atol=1e-7, rtol=1e-5, name="d hidden vs Liger")
    assert_close(go[1], gl[1], atol=1e-7, rtol=1e-5, name="d weight vs Liger")


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy_loss="ppo"), "policy_loss"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(clip_delta=1.0), "clip_delta"),
        (dict(clip_delta=1.5, dual_clip=2.0), "set one"),
        (dict(policy_loss="cispo", dual_clip=2.0), "applies to policy_loss='clip' only"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(kl_clamp=-1.0), "kl_clamp"),
        (dict(kl_importance_weighted=1), "kl_importance_weighted"),
        (dict(rollout_correction="is"), "rollout_correction"),
        (dict(rollout_correction_level="seq"), "rollout_correction_level"),
        (dict(rollout_is_max=0.0), "rollout_is_max"),
        (dict(rollout_is_min=3.0, rollout_is_max=2.0), "rollout_is_min"),
        (dict(agg_norm_length=0), "agg_norm_length"),
        (dict(agg="sum"), "agg"),
    ],
)
def test_config_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOLossConfig(**kwargs)


def test_bad_inputs_raise_clear_errors():
    lp = torch.zeros(6)
    old, adv = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError, match="needs rollout_logp"):
        ppo_loss_from_logprobs(lp, old, adv, config=PPOLossConfig(rollout_correction="tis"))
    with pytest.raises(ValueError, match="rollout_logp must have shape"):
        ppo_loss_from_logprobs(lp, old, adv, rollout_logp=torch.zeros(5))
    with pytest.raises(ValueError, match="needs sequence boundaries"):
        ppo_loss_from_logprobs(lp, old, adv, config=PPOLossConfig(importance_sampling_level="sequence"))
    with pytest.raises(ValueError, match="binary"):
        ppo_loss_from_logprobs(lp, old, adv, torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="needs entropy"):
        ppo_loss_from_logprobs(lp, old, adv, config=PPOLossConfig(entropy_coef=0.1))
    logits = torch.randn(6, 11)
    with pytest.raises(ValueError, match="binary"):
        ppo_loss(logits, torch.zeros(6, dtype=torch.long), old, adv, torch.full((6,), 2))
