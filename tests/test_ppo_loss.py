"""fusedrl.kernels.ppo_loss: the fused kernel (interpreter on CPU) and the chunked PyTorch path against a
float64 reference, forward, backward and metrics; hand-computed cases; micro-batch and layout invariances;
no recompiles for new runtime scalars; CUDA-graph capture (GPU only); bad input."""

import importlib
import math

import pytest
import torch
from helpers import EPS, KERNEL_BACKENDS, assert_close, assert_kernel_close
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedrl.kernels import (
    PPOLossConfig,
    kl_penalty,
    logprobs_ref,
    ppo_loss,
    ppo_loss_ref,
    token_weights,
    validation,
)

# The package re-exports the function under the module's name; the module itself, for its kernel.
ppo_mod = importlib.import_module("fusedrl.kernels.ppo_loss")

# Shapes and dtypes, declared once. Packed: sequence lengths over an odd vocabulary (41 x 1271), with an
# empty sequence; padded: (B, T, V); large vocabulary: (N, V) with few rows.
PACKED_SEQLENS = (9, 0, 14, 6, 12)
PACKED_V = 1271
PADDED = (4, 11, 1000)
LARGE = (3, 131072)
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = KERNEL_BACKENDS
ESTIMATORS = ["k1", "k2", "k3", "k3+"]
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]

# A config with every term switched on: asymmetric clip, dual clip, KL, entropy, temperature != 1.
FULL = dict(clip_low=0.2, clip_high=0.28, dual_clip=1.4, kl_coef=0.1, entropy_coef=0.01, temperature=0.7)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN on skipped rows


def make_batch(layout, dtype, device, *, V=None, temperature=1.0, garbage_padding=False):
    """Random logits / labels / per-token tensors. Ratios spread around 1 so that every clip branch is
    hit; one sequence is entirely masked, some labels are -100."""
    if layout == "packed":
        n = sum(PACKED_SEQLENS)
        lead, V = (n,), V or PACKED_V
        cu = torch.tensor([0, *torch.tensor(PACKED_SEQLENS).cumsum(0).tolist()], dtype=torch.int32, device=device)
        seq = torch.bucketize(torch.arange(n, device=device), cu[1:].long(), right=True)
        all_masked = seq == 3
    elif layout == "padded":
        B, T, V0 = PADDED
        lead, V, cu = (B, T), V or V0, None
        all_masked = torch.zeros(lead, dtype=torch.bool, device=device)
        all_masked[2] = True
    else:  # "rows": (N, V) without sequence structure
        lead, V, cu = (layout[0],), layout[1], None
        all_masked = torch.zeros(lead, dtype=torch.bool, device=device)
    logits = (torch.randn(*lead, V, device=device) * 3).to(dtype)
    labels = torch.randint(0, V, lead, device=device)
    labels = torch.where(torch.rand(lead, device=device) < 0.1, torch.full_like(labels, -100), labels)
    mask = (torch.rand(lead, device=device) > 0.15) & ~all_masked
    logp = logprobs_ref(logits.double(), labels, temperature=temperature)
    old = (logp + 0.3 * torch.randn(lead, device=device, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(lead, device=device, dtype=torch.float64)).float()
    adv = torch.randn(lead, device=device)
    if garbage_padding:  # what padding may hold must not leak into loss, gradient or metrics
        nan = torch.tensor(float("nan"), device=device)
        old, ref, adv = (torch.where(mask, t, nan) for t in (old, ref, adv))
    return dict(logits=logits, labels=labels, old_logp=old, advantages=adv, mask=mask, ref_logp=ref,
                cu_seqlens=cu)  # fmt: skip


def run(fn, logits, batch, grad_out, **kw):
    """loss, metrics, d(grad_out * loss)/dlogits for one implementation."""
    x = logits.detach().clone().requires_grad_(True)
    loss, metrics = fn(x, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"],
                       ref_logp=batch["ref_logp"], **kw)  # fmt: skip
    (g,) = torch.autograd.grad(loss, x, grad_out)
    return loss.detach(), metrics, g


def check_three_way(batch, config, backend, *, cu_seqlens=None, **kw):
    """Kernel and same-dtype reference against the float64 reference: loss, gradient, every metric."""
    g = torch.randn((), device=batch["logits"].device)
    common = dict(config=config, cu_seqlens=cu_seqlens, **kw)
    kernel = run(lambda *a, **k: ppo_loss(*a, backend=backend, **k), batch["logits"], batch, g, **common)
    ref_low = run(ppo_loss_ref, batch["logits"], batch, g, **common)
    truth = run(ppo_loss_ref, batch["logits"].double(), batch, g, **common)
    assert_kernel_close(kernel[0], ref_low[0], truth[0], name="loss")
    # One rounding step of the gradient's dtype at its scale (the interpreter truncates fp32 -> bf16).
    scale = truth[2].abs().max().item()
    atol = None if batch["logits"].dtype == torch.float32 else EPS[batch["logits"].dtype] * scale + 1e-7
    assert_kernel_close(kernel[2], ref_low[2], truth[2], atol=atol, name="dlogits")
    assert kernel[2].dtype == batch["logits"].dtype
    for key in ("clipfrac", "approx_kl", "kl", "entropy", "ratio_max"):
        assert kernel[1][key].shape == () and kernel[1][key].dtype == torch.float32, key
        assert_kernel_close(kernel[1][key], ref_low[1][key], truth[1][key], name=key)
    return kernel, truth


# ----------------------------------------------------------------------------------------------------
# Against the float64 reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_and_aggregations_match_float64(estimator, agg, device):
    batch = make_batch("packed", torch.float32, device, temperature=FULL["temperature"])
    config = PPOLossConfig(kl_estimator=estimator, agg=agg, **FULL)
    kernel, truth = check_three_way(batch, config, "triton", cu_seqlens=batch["cu_seqlens"])
    # The batch exercises what it claims to: some clipped tokens, some dual-clipped, a nonzero KL.
    assert 0.05 < float(truth[1]["clipfrac"]) < 0.9
    assert float(truth[1]["kl"]) != 0.0


@pytest.mark.parametrize("dual_clip", [None, 1.4], ids=["no-dual", "dual"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_dtypes_backends_match_float64(backend, dtype, layout, dual_clip, device):
    batch = make_batch(layout, dtype, device, temperature=FULL["temperature"], garbage_padding=True)
    config = PPOLossConfig(**{**FULL, "dual_clip": dual_clip, "agg": "seq-mean-token-mean"})
    check_three_way(batch, config, backend, cu_seqlens=batch["cu_seqlens"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary(backend, device):
    batch = make_batch(LARGE, torch.bfloat16, device)
    config = PPOLossConfig(kl_coef=0.05, entropy_coef=0.02, dual_clip=2.0)
    check_three_way(batch, config, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend, device):
    B, T, V = PADDED
    batch = make_batch("padded", torch.float32, device)
    # (T, B, V) storage viewed as (B, T, V), and a vocabulary slice of a wider buffer: strides, no copy.
    wide = torch.randn(T, B, V + 24, device=device) * 3
    logits = wide.transpose(0, 1)[..., :V]
    assert not logits.is_contiguous()
    batch["logits"] = logits
    check_three_way(batch, PPOLossConfig(**FULL), backend)


@pytest.mark.parametrize("rows_per_program", [1, 16])
def test_rows_per_program(rows_per_program, monkeypatch):
    """The GPU's one row per program, and a ragged last program (41 rows in blocks of 16), on CPU, for the
    forward kernel and the logprobs backward kernel it shares."""
    fixed = lambda n, block_v, device: rows_per_program  # noqa: E731
    monkeypatch.setattr(importlib.import_module("fusedrl.kernels._rows"), "rows_per_program", fixed)  # both launchers
    batch = make_batch("packed", torch.float32, "cpu", temperature=FULL["temperature"])
    check_three_way(batch, PPOLossConfig(**FULL), "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_overwrites_logits_with_the_gradient(backend, device):
    batch = make_batch("packed", torch.bfloat16, device)
    config = PPOLossConfig(**FULL)
    g = torch.randn((), device=device)
    _, _, expected = run(lambda *a, **k: ppo_loss(*a, backend=backend, **k), batch["logits"], batch, g,
                         config=config)  # fmt: skip
    x = batch["logits"].clone().requires_grad_(True)
    loss, _ = ppo_loss(x, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"],
                       ref_logp=batch["ref_logp"], config=config, inplace_backward=True, backend=backend)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x, g)
    assert grad.data_ptr() == x.data_ptr()  # the logits buffer itself holds the gradient now
    assert_close(grad, expected, atol=0.0, name="in-place gradient")
    assert_close(x.detach(), expected, atol=0.0, name="overwritten logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_batch_gives_zero_loss_gradient_and_metrics(backend, device):
    batch = make_batch("packed", torch.float32, device, garbage_padding=True)
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch["old_logp"] = torch.full_like(batch["old_logp"], float("nan"))
    config = PPOLossConfig(**{**FULL, "agg": "seq-mean-token-mean"})
    loss, metrics, g = run(lambda *a, **k: ppo_loss(*a, backend=backend, **k), batch["logits"], batch,
                           torch.tensor(1.0, device=device), config=config, cu_seqlens=batch["cu_seqlens"])  # fmt: skip
    assert float(loss) == 0.0
    assert torch.count_nonzero(g) == 0
    assert all(float(v) == 0.0 for v in metrics.values()), metrics


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------------
def _uniform_batch(ratios, advantages, device):
    """V = 4 and zero logits: p = 1/4 everywhere, logp = -log 4, H = log 4; old_logp set for the given ratios."""
    n = len(ratios)
    logits = torch.zeros(n, 4, device=device)
    labels = torch.tensor([i % 4 for i in range(n)], device=device)
    logp = -math.log(4.0)
    old = torch.tensor([logp - math.log(r) for r in ratios], device=device)
    return logits, labels, old, torch.tensor(advantages, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_checked_clip_branches(backend, device):
    # clip 0.2 both sides, dual clip c = 3. Per token (r, A) -> pg, d pg / d logp:
    #   (1.1,  2) inside the range           pg = -2.2                      grad -A r = -2.2
    #   (1.5,  2) above 1 + eps, A > 0       pg = max(-3.0, -2.4) = -2.4    grad 0 (clipped)
    #   (0.5,  2) below 1 - eps, A > 0       pg = max(-1.0, -1.6) = -1.0    grad -A r = -1.0 (pessimistic)
    #   (0.5, -1) below 1 - eps, A < 0       pg = max(0.5, 0.8) = 0.8       grad 0 (clipped)
    #   (5.0, -1) dual clip active           pg = min(max(5, 1.2), 3) = 3   grad 0
    #   (2.0, -1) A < 0 under the dual bound pg = min(max(2, 1.2), 3) = 2   grad -A r = 2
    ratios, advs = [1.1, 1.5, 0.5, 0.5, 5.0, 2.0], [2.0, 2.0, 2.0, -1.0, -1.0, -1.0]
    pg = [-2.2, -2.4, -1.0, 0.8, 3.0, 2.0]
    dpg = [-2.2, 0.0, -1.0, 0.0, 0.0, 2.0]
    logits, labels, old, adv = _uniform_batch(ratios, advs, device)
    x = logits.requires_grad_(True)
    loss, m = ppo_loss(x, labels, old, adv, config=PPOLossConfig(dual_clip=3.0), backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    assert_close(loss, sum(pg) / 6, atol=1e-6, name="loss")  # = 0.2 / 6
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    expected = torch.tensor(dpg, device=device)[:, None] / 6 * (onehot - 0.25)  # dlogp/dx = onehot - p
    assert_close(g, expected, atol=1e-6, name="dlogits")
    assert_close(m["clipfrac"], 2 / 6, atol=1e-7, name="clipfrac")  # tokens 1 and 3
    assert_close(m["ratio_max"], 5.0, atol=1e-5, name="ratio_max")
    assert_close(m["entropy"], math.log(4.0), atol=1e-6, name="entropy")
    assert_close(m["approx_kl"], sum(r - 1 - math.log(r) for r in ratios) / 6, atol=1e-6, name="approx_kl")
    assert float(m["kl"]) == 0.0  # no ref_logp

    # Without the dual clip the (5.0, -1) token costs its full -A r = 5 and keeps its gradient.
    x = logits.detach().requires_grad_(True)
    loss, _ = ppo_loss(x, labels, old, adv, config=PPOLossConfig(), backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    assert_close(loss, (sum(pg) - 3.0 + 5.0) / 6, atol=1e-6, name="loss without dual clip")
    assert_close(g[4], 5.0 / 6 * (onehot[4] - 0.25), atol=1e-6, name="dlogits without dual clip")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_hand_checked_kl_and_entropy_terms(estimator, backend, device):
    # A = 0 and r = 1 leave only the KL and entropy terms. logp - ref = d = 0.5:
    d = 0.5
    value = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) + d - 1, "k3+": math.exp(-d) + d - 1}[estimator]
    slope = {"k1": 1.0, "k2": d, "k3": 1 - math.exp(-d), "k3+": d}[estimator]  # d KL / d logp
    logits, labels, old, adv = _uniform_batch([1.0, 1.0], [0.0, 0.0], device)
    ref = old - d
    x = logits.requires_grad_(True)
    config = PPOLossConfig(kl_coef=0.5, kl_estimator=estimator, entropy_coef=0.1)
    loss, m = ppo_loss(x, labels, old, adv, ref_logp=ref, config=config, backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    assert_close(loss, 0.5 * value - 0.1 * math.log(4.0), atol=1e-6, name="loss")
    assert_close(m["kl"], value, atol=1e-6, name="kl")
    # Uniform p: dH/dx = 0, so the gradient is the KL slope times dlogp/dx = onehot - 1/4, over 2 tokens.
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    assert_close(g, 0.5 * slope / 2 * (onehot - 0.25), atol=1e-6, name="dlogits")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_values_and_gradients(estimator):
    logp = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.3], dtype=torch.float64)
    d = [0.5, -1.0, 0.0]
    k3 = [math.exp(-x) + x - 1 for x in d]
    value = {"k1": d, "k2": [x * x / 2 for x in d], "k3": k3, "k3+": k3}[estimator]
    slope = {"k1": [1.0] * 3, "k2": d, "k3": [1 - math.exp(-x) for x in d], "k3+": d}[estimator]
    kl = kl_penalty(logp, ref, estimator)
    (g,) = torch.autograd.grad(kl.sum(), logp)
    assert_close(kl, torch.tensor(value, dtype=torch.float64), atol=1e-12, name="kl")
    assert_close(g, torch.tensor(slope, dtype=torch.float64), atol=1e-12, name="dkl/dlogp")


def test_token_weights_hand_checked():
    # Packed: sequences of 1, 3 (one masked token) and 2 (all masked) tokens -> 2 counted sequences.
    mask = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    cu = torch.tensor([0, 1, 4, 6])
    expect = {
        "token-mean": [1 / 3, 1 / 3, 0, 1 / 3, 0, 0],
        "seq-mean-token-sum": [1 / 2, 1 / 2, 0, 1 / 2, 0, 0],
        "seq-mean-token-mean": [1 / 2, 1 / 4, 0, 1 / 4, 0, 0],
    }
    for agg, w in expect.items():
        assert_close(token_weights(mask, agg, cu_seqlens=cu), torch.tensor(w), atol=1e-7, name=agg)
    # Global counts replace the local ones.
    assert_close(token_weights(mask, "token-mean", num_tokens=10), mask.float() / 10, atol=1e-7, name="num_tokens")
    w = token_weights(mask, "seq-mean-token-mean", cu_seqlens=cu, num_sequences=torch.tensor(8))
    assert_close(w, torch.tensor([1 / 8, 1 / 16, 0, 1 / 16, 0, 0]), atol=1e-7, name="num_sequences")
    # Padded rows are sequences.
    assert_close(token_weights(mask.view(2, 3), "seq-mean-token-mean"),
                 torch.tensor([[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]]), atol=1e-7, name="padded")  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(0, 6), min_size=1, max_size=6), data=st.data())
def test_token_weights_match_a_per_sequence_loop(lens, data):
    n = sum(lens)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    seqs = [mask[cu[i] : cu[i + 1]] for i in range(len(lens))]
    counted = [s for s in seqs if s.any()]
    w_sum = token_weights(mask, "seq-mean-token-sum", cu_seqlens=cu)
    w_mean = token_weights(mask, "seq-mean-token-mean", cu_seqlens=cu)
    for i, s in enumerate(seqs):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        k, S = int(s.sum()), max(len(counted), 1)
        assert_close(w_sum[rows], s.float() / S, atol=1e-7, name="seq-mean-token-sum")
        assert_close(w_mean[rows], s.float() / (max(k, 1) * S), atol=1e-7, name="seq-mean-token-mean")
    total = token_weights(mask, "token-mean").sum()
    assert_close(total, 1.0 if mask.any() else 0.0, atol=1e-6, name="token-mean sums to 1")


# ----------------------------------------------------------------------------------------------------
# Invariances
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_sum_to_the_full_batch(backend, agg, device):
    batch = make_batch("padded", torch.float32, device)
    batch["mask"][0, 3:] = False  # unequal token counts in the two halves: local means would differ
    config = PPOLossConfig(**{**FULL, "agg": agg})
    valid = batch["mask"] & (batch["labels"] != -100)
    n_tok = valid.sum()  # a 0-dim tensor: allowed, no sync
    n_seq = int(valid.any(1).sum())
    g = torch.randn((), device=device)
    fused = lambda *a, **k: ppo_loss(*a, backend=backend, **k)  # noqa: E731
    full = run(fused, batch["logits"], batch, g, config=config)

    def micro(rows, **counts):
        part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return run(fused, part["logits"], part, g, config=config, **counts)

    halves = [micro(slice(0, 2), num_tokens=n_tok, num_sequences=n_seq),
              micro(slice(2, 4), num_tokens=n_tok, num_sequences=n_seq)]  # fmt: skip
    assert_close(
        halves[0][0] + halves[1][0], full[0], atol=1e-6, rtol=1e-6, name="sum of micro-batch losses"
    )  # a loss ~16: one fp32 step
    assert_close(torch.cat([halves[0][2], halves[1][2]]), full[2], atol=1e-7, name="micro-batch gradients")
    # Without the global counts the sum is wrong: the check above can fail.
    local = [micro(slice(0, 2)), micro(slice(2, 4))]
    assert abs(float(local[0][0] + local[1][0] - full[0])) > 1e-3


@pytest.mark.parametrize("agg", AGGS)
def test_packed_and_padded_layouts_agree(agg, device):
    packed = make_batch("packed", torch.float32, device)
    lens, cu = PACKED_SEQLENS, packed["cu_seqlens"].tolist()
    B, T, V = len(lens), max(lens), PACKED_V
    padded = {
        "logits": torch.randn(B, T, V, device=device) * 3,  # tails are junk: masked below
        "labels": torch.full((B, T), -100, dtype=torch.long, device=device),
        **{k: torch.zeros(B, T, device=device) for k in ("old_logp", "advantages", "ref_logp")},
        "mask": torch.zeros(B, T, dtype=torch.bool, device=device),
    }
    for b, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        for k in ("logits", "labels", "old_logp", "advantages", "ref_logp", "mask"):
            padded[k][b, : e - s] = packed[k][s:e]
    config = PPOLossConfig(**{**FULL, "agg": agg})
    g = torch.randn((), device=device)
    fused = lambda *a, **k: ppo_loss(*a, backend="triton", **k)  # noqa: E731
    lp, mp, gp = run(fused, packed["logits"], packed, g, config=config, cu_seqlens=packed["cu_seqlens"])
    ld, md, gd = run(fused, padded["logits"], padded, g, config=config)
    assert_close(lp, ld, atol=1e-6, rtol=1e-6, name="loss")
    for k in mp:
        assert_close(mp[k], md[k], atol=1e-6, rtol=1e-6, name=k)
    rows = torch.cat([gd[b, : e - s] for b, (s, e) in enumerate(zip(cu[:-1], cu[1:]))])
    assert_close(gp, rows, atol=1e-7, name="gradients")
    tails = torch.arange(T, device=device)[None, :] >= torch.tensor(lens, device=device)[:, None]
    assert torch.count_nonzero(gd[tails]) == 0  # padding gets no gradient


# ----------------------------------------------------------------------------------------------------
# Runtime scalars, CUDA graphs
# ----------------------------------------------------------------------------------------------------
def _compiled_kernels():
    """Compiled variants of the forward and backward kernels, or None when Triton interprets them."""
    from fusedrl.kernels.logprobs import _logprobs_bwd_kernel

    count = 0
    for k in (ppo_mod._ppo_fwd_kernel, _logprobs_bwd_kernel):
        caches = getattr(k, "device_caches", None)
        if caches is None:
            return None
        count += sum(len(c[0]) for c in caches.values())
    return count


def test_new_clip_coefficients_and_temperature_do_not_recompile(device):
    configs = [
        PPOLossConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, temperature=1.0),
        PPOLossConfig(clip_low=0.1, clip_high=0.3, dual_clip=1.5, kl_coef=0.3, entropy_coef=0.05, temperature=0.6),
    ]
    batch = make_batch("packed", torch.float32, device)
    counts = []
    for config in configs:  # both configs give the right answer...
        check_three_way(batch, config, "triton")
        counts.append(_compiled_kernels())
    if device.type == "cuda" and counts[0] is not None:  # ...and on GPU the second compiled nothing new
        assert counts[1] == counts[0], f"kernel variants grew from {counts[0]} to {counts[1]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_replays_without_sync():
    if _compiled_kernels() is None:
        pytest.skip("Triton kernels are interpreted (TRITON_INTERPRET=1): run with TRITON_INTERPRET=0")
    dev = torch.device("cuda")
    batch = make_batch("packed", torch.bfloat16, dev)
    config = PPOLossConfig(**{**FULL, "agg": "seq-mean-token-mean"})
    x = batch["logits"].clone().requires_grad_(True)
    n_tok = (batch["mask"] & (batch["labels"] != -100)).sum()

    def step():
        loss, metrics = ppo_loss(x, batch["labels"], batch["old_logp"], batch["advantages"], batch["mask"],
                                 ref_logp=batch["ref_logp"], config=config, cu_seqlens=batch["cu_seqlens"],
                                 num_tokens=n_tok, backend="triton")  # fmt: skip
        (g,) = torch.autograd.grad(loss, x)
        return loss, metrics, g

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, metrics, g = step()

    fresh = make_batch("packed", torch.bfloat16, dev)
    with torch.no_grad():
        x.copy_(fresh["logits"])
        batch["advantages"].copy_(fresh["advantages"])
        batch["old_logp"].copy_(fresh["old_logp"])
    graph.replay()
    torch.cuda.synchronize()
    with validation(False):
        torch.cuda.set_sync_debug_mode("error")  # eager steady state: no host sync either
        try:
            e_loss, e_metrics, e_g = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_close(loss, e_loss, atol=1e-7, name="replayed loss")
    assert_close(g, e_g, atol=0.0, name="replayed gradient")
    for k in metrics:
        assert_close(metrics[k], e_metrics[k], atol=1e-7, name=k)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(clip_low=-0.1), "clip_low"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(clip_high=-0.2), "clip_high"),
        (dict(clip_high=float("nan")), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(kl_coef=-0.1), "kl_coef"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(entropy_coef="0.1"), "entropy_coef"),
        (dict(temperature=0.0), "temperature"),
        (dict(agg="mean"), "agg"),
    ],
)
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PPOLossConfig(**kwargs)


def test_bad_arguments_raise_clear_errors():
    b = make_batch("packed", torch.float32, "cpu")
    args = (b["logits"], b["labels"], b["old_logp"], b["advantages"])
    with pytest.raises(ValueError, match="ref_logp"):
        ppo_loss(*args, config=PPOLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="old_logp"):
        ppo_loss(b["logits"], b["labels"], b["old_logp"][:-1], b["advantages"])
    with pytest.raises(TypeError, match="advantages"):
        ppo_loss(b["logits"], b["labels"], b["old_logp"], b["labels"])
    with pytest.raises(ValueError, match="mask"):
        ppo_loss(*args, b["mask"][None])
    with pytest.raises(ValueError, match="cu_seqlens"):
        ppo_loss(*args, config=PPOLossConfig(agg="seq-mean-token-sum"))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ppo_loss(*args, cu_seqlens=torch.tensor([0, 5, 40]))  # ends short of the 41 tokens
    with pytest.raises(ValueError, match="cu_seqlens"):
        ppo_loss(*args, cu_seqlens=torch.tensor([0, 30, 20, 41]))  # decreasing
    with pytest.raises(TypeError, match="cu_seqlens"):
        ppo_loss(*args, cu_seqlens=torch.tensor([0.0, 41.0]))
    with pytest.raises(ValueError, match="num_tokens"):
        ppo_loss(*args, num_tokens=0)
    with pytest.raises(TypeError, match="num_sequences"):
        ppo_loss(*args, cu_seqlens=b["cu_seqlens"], num_sequences=[3],
                 config=PPOLossConfig(agg="seq-mean-token-sum"))  # fmt: skip
    with pytest.raises(TypeError, match="config"):
        ppo_loss(*args, config={"clip_low": 0.2})
    with pytest.raises(ValueError, match="backend"):
        ppo_loss(*args, backend="cuda")
    bad = b["labels"].clone()
    bad[5] = PACKED_V
    with pytest.raises(ValueError, match="labels"):
        ppo_loss(b["logits"], bad, b["old_logp"], b["advantages"])
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(b["old_logp"], b["ref_logp"], "k5")


@pytest.mark.parametrize("estimator", ["k3", "k3+"])
def test_k3_float64_is_float64_accurate(estimator):
    """float64 inputs get float64 accuracy: the value against a 12-term series / the closed form, the gradient
    against -expm1(-d) (accurate to a rounding step for every d), over |d| from 1e-6 to 3 on both sides."""
    mag = torch.logspace(-6, math.log10(3.0), 400, dtype=torch.float64)
    d = torch.cat([mag, -mag])
    ref = -torch.rand(d.shape, dtype=torch.float64) * 4
    logp = (ref + d).requires_grad_(True)
    d = logp.detach() - ref  # the difference the estimator sees, after rounding logp
    kl = kl_penalty(logp, ref, estimator)
    (g,) = torch.autograd.grad(kl.sum(), logp)
    series = sum((-d) ** k / math.factorial(k) for k in range(2, 14))
    truth = torch.where(d.abs() < 0.05, series, torch.expm1(-d) + d)
    assert_close(kl, truth, atol=0.0, rtol=1e-12, name="k3 value")
    slope = -torch.expm1(-d) if estimator == "k3" else d
    assert_close(g, slope, atol=1e-15, rtol=1e-14, name="dk3/dlogp")
