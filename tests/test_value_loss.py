"""fusedrl.kernels.value_loss: the clipped value loss kernel (interpreter on CPU) and the PyTorch path
against a float64 reference, a hand-computed case, micro-batch invariance and bad input."""

import pytest
import torch
from helpers import EPS, assert_close, assert_kernel_close

from fusedrl.kernels import value_loss, value_loss_ref

# Shapes and dtypes, declared once: padded (B, T) with an all-masked row, packed lengths with an empty one.
PADDED = (5, 37)
PACKED_SEQLENS = (9, 0, 14, 6, 12)
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["triton", "torch"]
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def make_values(layout, dtype, device):
    """Values near their old predictions (half inside, half outside clip = 0.2), NaN padding."""
    if layout == "padded":
        lead, cu = PADDED, None
        all_masked = torch.zeros(lead, dtype=torch.bool, device=device)
        all_masked[2] = True
    else:
        lead = (sum(PACKED_SEQLENS),)
        cu = torch.tensor([0, *torch.tensor(PACKED_SEQLENS).cumsum(0).tolist()], device=device)
        all_masked = torch.bucketize(torch.arange(lead[0], device=device), cu[1:], right=True) == 3
    old = torch.randn(lead, device=device)
    values = (old + 0.3 * torch.randn(lead, device=device)).to(dtype)
    returns = old + torch.randn(lead, device=device)
    mask = (torch.rand(lead, device=device) > 0.2) & ~all_masked
    nan = torch.tensor(float("nan"), device=device)
    old, returns = torch.where(mask, old, nan), torch.where(mask, returns, nan)
    return dict(values=values, old_values=old, returns=returns, mask=mask), cu


def run(fn, values, batch, grad_out, **kw):
    v = values.detach().clone().requires_grad_(True)
    loss, metrics = fn(v, batch["old_values"], batch["returns"], batch["mask"], **kw)
    (g,) = torch.autograd.grad(loss, v, grad_out)
    return loss.detach(), metrics, g


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_matches_float64(backend, dtype, layout, agg, device):
    batch, cu = make_values(layout, dtype, device)
    g = torch.randn((), device=device)
    kw = dict(clip=0.2, agg=agg, cu_seqlens=cu)
    loss, m, grad = run(lambda *a, **k: value_loss(*a, backend=backend, **k), batch["values"], batch, g, **kw)
    loss_r, m_r, grad_r = run(value_loss_ref, batch["values"], batch, g, **kw)
    loss_t, m_t, grad_t = run(value_loss_ref, batch["values"].double(), batch, g, **kw)
    assert loss.shape == () and loss.dtype == torch.float32 and grad.dtype == dtype
    assert_kernel_close(loss, loss_r, loss_t, name="loss")
    atol = None if dtype == torch.float32 else EPS[dtype] * grad_t.abs().max().item() + 1e-7
    assert_kernel_close(grad, grad_r, grad_t, atol=atol, name="dvalues")
    for k in ("clipfrac", "vpred_mean"):
        assert m[k].shape == () and m[k].dtype == torch.float32
        assert_kernel_close(m[k], m_r[k], m_t[k], name=k)
    assert 0.1 < float(m_t["clipfrac"]) < 0.9  # both branches are exercised
    assert (grad[~batch["mask"]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_checked_value_loss(backend, device):
    # clip 0.2; per token (v, old, R) -> v_clip, squares, 0.5 max, d/dv, clipped?
    #   (1.0, 0.5, 0.0)  v_clip 0.7   1.00 vs 0.49 -> 0.50   grad v - R = 1.0    no
    #   (0.0, 0.5, 1.0)  v_clip 0.3   1.00 vs 0.49 -> 0.50   grad v - R = -1.0   no
    #   (0.9, 0.5, 1.5)  v_clip 0.7   0.36 vs 0.64 -> 0.32   grad 0 (clamped)    yes
    #   (0.6, 0.5, 0.0)  inside: v_clip = v, 0.36 both -> 0.18, grad 0.6      no
    v = torch.tensor([1.0, 0.0, 0.9, 0.6], device=device, requires_grad=True)
    old = torch.tensor([0.5, 0.5, 0.5, 0.5], device=device)
    ret = torch.tensor([0.0, 1.0, 1.5, 0.0], device=device)
    loss, m = value_loss(v, old, ret, clip=0.2, backend=backend)
    (g,) = torch.autograd.grad(loss, v)
    assert_close(loss, (0.5 + 0.5 + 0.32 + 0.18) / 4, atol=1e-6, name="loss")
    assert_close(g, torch.tensor([1.0, -1.0, 0.0, 0.6]) / 4, atol=1e-6, name="dvalues")
    assert_close(m["clipfrac"], 0.25, atol=1e-7, name="clipfrac")
    assert_close(m["vpred_mean"], 2.5 / 4, atol=1e-6, name="vpred_mean")
    # seq-mean-token-sum over sequences [0, 1] and [2, 3]: (1.0 + 0.5) / 2.
    loss, _ = value_loss(v, old, ret, clip=0.2, agg="seq-mean-token-sum", cu_seqlens=torch.tensor([0, 2, 4]),
                         backend=backend)  # fmt: skip
    assert_close(loss, (1.0 + 0.5) / 2, atol=1e-6, name="seq-mean-token-sum loss")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_sum_to_the_full_batch(backend, agg, device):
    batch, _ = make_values("padded", torch.float32, device)
    n_tok = int(batch["mask"].sum())
    n_seq = torch.tensor(int(batch["mask"].any(1).sum()), device=device)
    g = torch.randn((), device=device)
    fused = lambda *a, **k: value_loss(*a, agg=agg, backend=backend, **k)  # noqa: E731
    full = run(fused, batch["values"], batch, g)
    parts = []
    for rows in (slice(0, 2), slice(2, 5)):
        part = {k: v[rows] for k, v in batch.items()}
        parts.append(run(fused, part["values"], part, g, num_tokens=n_tok, num_sequences=n_seq))
    assert_close(parts[0][0] + parts[1][0], full[0], atol=1e-6, name="sum of micro-batch losses")
    assert_close(torch.cat([parts[0][2], parts[1][2]]), full[2], atol=1e-7, name="micro-batch gradients")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_none_is_the_unclipped_loss(backend, device):
    """clip=None (OpenRLHF's clip_eps=None): 0.5 (v - R)^2 with gradient (v - R) per token, nothing clipped, whatever
    the distance to the old values; and a finite clip that never binds gives the same (no rounding ties)."""
    batch, _ = make_values("padded", torch.float32, device)
    keep = batch["mask"]
    g = torch.randn((), device=device)
    fused = lambda *a, **k: value_loss(*a, backend=backend, **k)  # noqa: E731
    loss, m, grad = run(fused, batch["values"], batch, g, clip=None)
    v, ret = batch["values"].double(), batch["returns"].double()
    err = torch.where(keep, v - ret, 0.0)
    n = keep.sum()
    assert_close(loss, (0.5 * err**2).sum() / n, atol=1e-6, rtol=1e-6, name="unclipped loss")
    assert_close(grad, g.double() * err / n, atol=1e-7, name="unclipped gradient")
    assert float(m["clipfrac"]) == 0.0
    wide = run(fused, batch["values"], batch, g, clip=1e6)
    assert_close(wide[0], loss, atol=0.0, name="clip that never binds")
    assert float(wide[1]["clipfrac"]) == 0.0
    ref = run(value_loss_ref, batch["values"], batch, g, clip=None)
    assert_close(ref[0], loss, atol=1e-6, rtol=1e-6, name="reference")


def test_bad_arguments_raise_clear_errors():
    batch, _ = make_values("padded", torch.float32, "cpu")
    v, old, ret, mask = batch["values"], batch["old_values"], batch["returns"], batch["mask"]
    with pytest.raises(ValueError, match="clip"):
        value_loss(v, old, ret, clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        value_loss(v, old, ret, clip=float("inf"))
    with pytest.raises(ValueError, match="agg"):
        value_loss(v, old, ret, agg="sum")
    with pytest.raises(ValueError, match="binary"):
        value_loss(v, old, ret, mask.float() * 0.5)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(v, old[:, :-1], ret)
    with pytest.raises(TypeError, match="returns"):
        value_loss(v, old, ret.long())
    with pytest.raises(ValueError, match="mask"):
        value_loss(v, old, ret, mask[0])
    with pytest.raises(ValueError, match="cu_seqlens"):
        value_loss(v.flatten(), old.flatten(), ret.flatten(), agg="seq-mean-token-mean")
    with pytest.raises(ValueError, match="num_tokens"):
        value_loss(v, old, ret, num_tokens=-3)
