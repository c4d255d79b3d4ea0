"""fusedrl.kernels.linear_preference_loss: DPO / IPO / SimPO / ORPO (+ RPO's NLL term) from the lm_head.

Three-way (op in the low-precision dtype, the eager reference in the same dtype, the reference in float64),
forward and backward with a random upstream gradient, for every loss variant, packed pairs (chosen and
rejected anywhere in the pack) and padded (B, T) input; parity of the loss formulas with TRL's DPO / CPO /
ORPO trainers and of the whole op with Liger's fused linear DPO; the bad-input errors."""

import importlib.util
import math
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import EPS, KERNEL_BACKENDS, assert_close, assert_kernel_close

from fusedrl.kernels.linear_preference_loss import _metrics as _metrics_of
from fusedrl.kernels import (
    PreferenceLossConfig,
    linear_logprobs_ref,
    linear_preference_loss,
    linear_preference_loss_ref,
    pair_losses,
)

# Shapes and dtypes, declared once. Packed: S sequences (prompt + response) of these lengths in one pack of
# N tokens with an odd vocabulary; padded: (B, T) rows, chosen then rejected; a > 64K vocabulary case.
PACKED_LENGTHS = (7, 4, 9, 3, 6, 5, 7)  # S = 7 sequences, N = 41; sequence 6 is an unpaired all-masked one
V, H = 1271, 32
CHUNK = 16  # leaves a ragged last chunk
PADDED = (4, 9)  # B, T
BIG_V = 128256
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = KERNEL_BACKENDS
VARIANTS = {
    "dpo": PreferenceLossConfig("dpo", beta=0.3),
    "cdpo": PreferenceLossConfig("dpo", beta=0.3, label_smoothing=0.15),
    "ipo": PreferenceLossConfig("ipo", beta=0.4),
    "simpo": PreferenceLossConfig("simpo", beta=2.0, simpo_gamma=0.7),
    "orpo": PreferenceLossConfig("orpo", beta=0.25),
    "rpo": PreferenceLossConfig("dpo", beta=0.3, rpo_alpha=0.6, temperature=0.8),
}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN on skipped rows


def packed_case(dtype, device, *, vocab=V, hidden=H, lengths=PACKED_LENGTHS, seed=0):
    """One pack: sequence s = a prompt (labels -100) then a response; pairs (chosen, rejected) drawn across
    the pack in shuffled order; the last sequence is all prompt and unpaired."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    h = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 2 / hidden**0.5).to(device=device, dtype=dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    for s, L in enumerate(lengths):
        prompt = L if s == len(lengths) - 1 else int(torch.randint(1, L - 1, (), generator=g))
        labels[cu[s] : cu[s] + prompt] = -100
    order = torch.randperm(len(lengths) - 1, generator=g)
    pairs = order.view(-1, 2)  # (3, 2): chosen and rejected anywhere in the pack
    ref = (torch.randn(pairs.shape[0], 2, generator=g) * 3 - 12).to(device)
    return h, w, b, labels.to(device), cu.to(device), pairs.to(device), ref


def padded_case(dtype, device, *, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T = PADDED
    h = torch.randn(B, T, H, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g) * 2 / H**0.5).to(device=device, dtype=dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    for i in range(B):  # prompt of 1-3 tokens, a right-padded tail of 0-3
        p, pad = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(0, 4, (), generator=g))
        labels[i, :p] = -100
        labels[i, T - pad :] = -100
    ref = (torch.randn(B // 2, 2, generator=g) * 3 - 12).to(device)
    return h, w, b, labels.to(device), ref


def run_loss(fn, h, w, b, g_out, **kw):
    """Fresh leaves; (loss, metrics, grads of h, w, b) with upstream gradient g_out on the scalar loss."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss, metrics = fn(leaves[0], leaves[1], bias=leaves[2], **kw)
    grads = torch.autograd.grad(loss * g_out, leaves)
    return loss.detach(), metrics, grads


def three_way(kernel, ref_low, truth, dtype):
    (l_k, m_k, g_k), (l_r, m_r, g_r), (l_t, m_t, g_t) = kernel, ref_low, truth
    assert l_k.dtype == torch.float32
    low = dtype != torch.float32
    atol = lambda t: (EPS[dtype] * max(t.abs().max().item(), 1.0) + 1e-6) if low else None  # noqa: E731
    assert_kernel_close(l_k, l_r, l_t, atol=atol(l_t), name="loss")
    for k in m_t:
        if k != "rewards/accuracies":  # a step function of the margins: compared below where they are clear
            assert_kernel_close(m_k[k], m_r[k], m_t[k], atol=atol(m_t[k]), name=k)
    for g, gr, gt, name in zip(g_k, g_r, g_t, ("d hidden", "d weight", "d bias")):
        assert g.dtype == dtype, name
        assert_kernel_close(g, gr, gt, atol=atol(gt), name=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_float64(backend, dtype, variant, device):
    cfg = VARIANTS[variant]
    h, w, b, labels, cu, pairs, ref = packed_case(dtype, device)
    ref = ref if cfg.needs_reference else None
    g_out = torch.randn(()).item()
    kw = dict(labels=labels, pair_index=pairs, cu_seqlens=cu, config=cfg)
    kernel = run_loss(
        linear_preference_loss, h, w, b, g_out, ref_logp_sums=ref, chunk_size=CHUNK, backend=backend, **kw
    )
    ref_low = run_loss(linear_preference_loss_ref, h, w, b, g_out, ref_logp_sums=ref, **kw)
    truth = run_loss(linear_preference_loss_ref, h.double(), w.double(), b.double(), g_out,
                     ref_logp_sums=None if ref is None else ref.double(), **kw)  # fmt: skip
    three_way(kernel, ref_low, truth, dtype)
    # The unpaired, all-prompt sequence contributes nothing: its hidden rows get no gradient.
    last = slice(int(cu[-2]), int(cu[-1]))
    assert kernel[2][0][last].abs().max().item() == 0.0


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_matches_float64(backend, dtype, variant, device):
    cfg = VARIANTS[variant]
    h, w, b, labels, ref = padded_case(dtype, device)
    ref = ref if cfg.needs_reference else None
    g_out = torch.randn(()).item()
    kw = dict(labels=labels, config=cfg)
    kernel = run_loss(
        linear_preference_loss, h, w, b, g_out, ref_logp_sums=ref, chunk_size=CHUNK, backend=backend, **kw
    )
    ref_low = run_loss(linear_preference_loss_ref, h, w, b, g_out, ref_logp_sums=ref, **kw)
    truth = run_loss(linear_preference_loss_ref, h.double(), w.double(), b.double(), g_out,
                     ref_logp_sums=None if ref is None else ref.double(), **kw)  # fmt: skip
    three_way(kernel, ref_low, truth, dtype)


def test_packed_equals_padded_and_micro_batches_add_up(device):
    """The same pairs packed (in a shuffled order) and padded give the same loss; two micro-batches with
    num_pairs = the whole batch's pair count add up to the one-call loss, gradients included."""
    cfg = VARIANTS["cdpo"]
    h, w, b, labels, ref = padded_case(torch.float32, device)
    B, T = labels.shape
    order = [2, 0, 3, 1]  # pack rows in this order: pair 0 = rows (0, 2), pair 1 = rows (1, 3)
    hp = torch.cat([h[i] for i in order])
    lp = torch.cat([labels[i] for i in order])
    cu = torch.arange(0, B * T + 1, T, device=device, dtype=torch.int32)
    pos = {r: k for k, r in enumerate(order)}
    pairs = torch.tensor([[pos[0], pos[2]], [pos[1], pos[3]]], device=device)
    padded, _ = linear_preference_loss(h, w, labels, ref_logp_sums=ref, bias=b, config=cfg)
    packed, _ = linear_preference_loss(hp, w, lp, pairs, cu, ref, bias=b, config=cfg)
    assert_close(packed, padded, atol=1e-5, name="packed vs padded")

    whole = run_loss(linear_preference_loss, h, w, b, 1.0, labels=labels, ref_logp_sums=ref, config=cfg)
    parts = []
    for p in range(2):
        rows = torch.tensor([p, p + 2], device=device)
        parts.append(run_loss(linear_preference_loss, h[rows], w, b, 1.0, labels=labels[rows],
                              ref_logp_sums=ref[p : p + 1], config=cfg, num_pairs=2))  # fmt: skip
    assert_close(parts[0][0] + parts[1][0], whole[0], atol=1e-5, name="micro-batch losses")
    assert_close(parts[0][2][1] + parts[1][2][1], whole[2][1], atol=1e-5, name="micro-batch d weight")


def test_large_vocab_and_non_contiguous_hidden(device):
    """V = 128256 (Llama 3) on both backends, hidden a strided view (every other row of a bigger tensor)."""
    lengths = (5, 4, 6, 3, 1)
    h, w, b, labels, cu, pairs, ref = packed_case(torch.float32, device, vocab=BIG_V, hidden=16, lengths=lengths)
    big = torch.zeros(2 * h.shape[0], 16, device=device)
    big[::2] = h
    view = big[::2]
    assert not view.is_contiguous()
    cfg = VARIANTS["simpo"]
    g_out = torch.randn(()).item()
    kw = dict(labels=labels, pair_index=pairs, cu_seqlens=cu, config=cfg)
    truth = run_loss(linear_preference_loss_ref, h.double(), w.double(), b.double(), g_out, **kw)
    ref_low = run_loss(linear_preference_loss_ref, h, w, b, g_out, **kw)
    for backend in ("triton", "torch"):
        kernel = run_loss(linear_preference_loss, view, w, b, g_out, chunk_size=7, backend=backend, **kw)
        three_way(kernel, ref_low, truth, torch.float32)


def test_metrics_hand_computed():
    """rewards/* with TRL's meaning on hand-made log-prob sums: r = beta * (log pi - log pi_ref)."""
    cfg = PreferenceLossConfig("dpo", beta=0.5)
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    n = torch.ones(2)
    loss, values = pair_losses(c, r, n, n, rc, rr, cfg)
    assert_close(values["rewards/chosen"], torch.tensor([0.25, -0.5]), name="rewards/chosen")
    assert_close(values["rewards/rejected"], torch.tensor([-0.5, 0.5]), name="rewards/rejected")
    assert_close(loss, -F.logsigmoid(torch.tensor([0.75, -1.0])), name="dpo loss")


def test_nan_in_nan_out(device):
    h, w, b, labels, cu, pairs, ref = packed_case(torch.float32, device)
    h[int(cu[int(pairs[0, 0]) + 1]) - 1] = math.nan  # the last token of pair 0's chosen response
    for backend in ("triton", "torch"):
        loss, m = linear_preference_loss(h, w, labels, pairs, cu, ref, bias=b, backend=backend)
        assert math.isnan(loss.item()) and math.isnan(m["rewards/margins"].item()), backend


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_bad_input_errors(device):
    h, w, b, labels, cu, pairs, ref = packed_case(torch.float32, device)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        PreferenceLossConfig("kto")
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        PreferenceLossConfig(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing applies to dpo and simpo only"):
        PreferenceLossConfig("ipo", label_smoothing=0.1)
    with pytest.raises(TypeError, match="config must be a PreferenceLossConfig"):
        linear_preference_loss(h, w, labels, pairs, cu, ref, config={"loss_type": "dpo"})
    with pytest.raises(ValueError, match="needs ref_logp_sums"):
        linear_preference_loss(h, w, labels, pairs, cu)
    with pytest.raises(ValueError, match="reference-free: ref_logp_sums must be None"):
        linear_preference_loss(h, w, labels, pairs, cu, ref, config=VARIANTS["orpo"])
    with pytest.raises(ValueError, match=r"ref_logp_sums must be \(3, 2\)"):
        linear_preference_loss(h, w, labels, pairs, cu, ref[:2])
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        linear_preference_loss(h, w, labels, pairs, None, ref)
    with pytest.raises(ValueError, match=r"pair_index must be \(P, 2\)"):
        linear_preference_loss(h, w, labels, pairs.reshape(-1), cu, ref)
    with pytest.raises(ValueError, match=r"sequence ids in \[0, 7\), got values in \[0, 9\]"):
        linear_preference_loss(h, w, labels, torch.where(pairs == pairs.max(), 9, pairs), cu, ref)
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of tokens"):
        linear_preference_loss(h, w, labels, pairs, cu[:-1], ref)
    with pytest.raises(ValueError, match="num_pairs must be None or an int >= 1"):
        linear_preference_loss(h, w, labels, pairs, cu, ref, num_pairs=0)
    # A pair whose response is empty (all labels -100): sequence 6 of the pack.
    empty = pairs.clone()
    empty[1, 1] = 6
    with pytest.raises(ValueError, match=r"pair 1: its rejected response \(sequence 6\) has no labelled token"):
        linear_preference_loss(h, w, labels, empty, cu, ref)
    hp, wp, bp, lp, refp = padded_case(torch.float32, device)
    with pytest.raises(ValueError, match="needs an even batch"):
        linear_preference_loss(hp[:3], wp, lp[:3], ref_logp_sums=refp[:1])
    with pytest.raises(ValueError, match="cu_seqlens is for packed"):
        linear_preference_loss(hp, wp, lp, None, cu, refp)


# ----------------------------------------------------------------------------------------------------
# Parity with TRL (loss formulas) and Liger (the whole fused op)
# ----------------------------------------------------------------------------------------------------
def _pair_inputs(seed=3, P=64):
    """Sequence log-prob sums, lengths and reference sums of P pairs, as a trainer would see them."""
    g = torch.Generator().manual_seed(seed)
    n_c = torch.randint(1, 30, (P,), generator=g).double()
    n_r = torch.randint(1, 30, (P,), generator=g).double()
    c = -n_c * torch.rand(P, generator=g, dtype=torch.float64) * 3
    r = -n_r * torch.rand(P, generator=g, dtype=torch.float64) * 3
    rc = c + torch.randn(P, generator=g, dtype=torch.float64)
    rr = r + torch.randn(P, generator=g, dtype=torch.float64)
    return c, r, n_c, n_r, rc, rr


def _trl_module(name):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed")
    try:
        return importlib.import_module(name)
    except Exception as e:  # an optional dependency of that trainer missing
        pytest.skip(f"cannot import {name}: {type(e).__name__}: {e}")


@pytest.mark.parametrize("loss_type, smoothing", [("simpo", 0.0), ("simpo", 0.2), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_trl_cpo_loss_parity(loss_type, smoothing):
    """TRL's CPOTrainer.cpo_loss on length-normalised log-probs (its average_log_prob for simpo / ipo) is
    SimPO exactly; with reference log-probs 0 it is also reference-free DPO / IPO on those log-probs."""
    cpo = _trl_module("trl.experimental.cpo.cpo_trainer")
    c, r, n_c, n_r, _, _ = _pair_inputs()
    beta, gamma = 1.7, 0.6
    fake = types.SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, simpo_gamma=gamma,
                                 label_smoothing=smoothing, accelerator=types.SimpleNamespace(device="cpu"))  # fmt: skip
    one = torch.ones_like(n_c)
    if loss_type == "simpo":
        trl_loss, trl_c, trl_r = cpo.CPOTrainer.cpo_loss(fake, c / n_c, r / n_r)
        ours, v = pair_losses(c, r, n_c, n_r, None, None, PreferenceLossConfig("simpo", beta, smoothing, gamma))
    elif loss_type == "sigmoid":
        trl_loss, trl_c, trl_r = cpo.CPOTrainer.cpo_loss(fake, c, r)
        zero = torch.zeros_like(c)
        ours, v = pair_losses(c, r, one, one, zero, zero, PreferenceLossConfig("dpo", beta, smoothing))
    else:  # ipo: TRL's CPO averages the log-probs for ipo, our ipo divides the log-ratios by the lengths
        trl_loss, trl_c, trl_r = cpo.CPOTrainer.cpo_loss(fake, c / n_c, r / n_r)
        zero = torch.zeros_like(c)
        ours, v = pair_losses(c, r, n_c, n_r, zero, zero, PreferenceLossConfig("ipo", beta))
        trl_c, trl_r = trl_c * n_c, trl_r * n_r  # its rewards are beta * the averaged log-probs
    assert_close(ours, trl_loss, atol=1e-12, name=f"cpo {loss_type} loss")
    assert_close(v["rewards/chosen"], trl_c, atol=1e-12, name="rewards/chosen")
    assert_close(v["rewards/rejected"], trl_r, atol=1e-12, name="rewards/rejected")


def test_trl_orpo_parity():
    """ORPO: TRL's odds_ratio_loss on the averaged log-probs gives the odds-ratio term (its loss is
    nll - mean(losses)); ours adds the per-pair length-normalised NLL of the chosen response."""
    orpo = _trl_module("trl.experimental.orpo.orpo_trainer")
    c, r, n_c, n_r, _, _ = _pair_inputs(seed=4)
    beta = 0.35
    fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_c, trl_r, _, trl_log_odds = orpo.ORPOTrainer.odds_ratio_loss(fake, c / n_c, r / n_r)
    ours, v = pair_losses(c, r, n_c, n_r, None, None, PreferenceLossConfig("orpo", beta))
    tol = 1e-6  # TRL computes the odds ratio in float32
    assert_close(ours, -(c / n_c) - trl_losses, atol=tol, name="orpo loss")
    assert_close(v["log_odds_ratio"].mean(), trl_log_odds, atol=tol, name="log odds ratio")
    assert_close(v["rewards/chosen"], trl_c, atol=tol, name="rewards/chosen")
    assert_close(v["rewards/rejected"], trl_r, atol=tol, name="rewards/rejected")


def _trl_dpo_compute_loss(loss_type, beta, c, r, rc, rr, completion_mask):
    """Run TRL's DPOTrainer._compute_loss (where its DPO losses live) on a stand-in self and a stand-in model
    whose outputs carry the given per-token log-probs, so that only its loss code runs."""
    dpo = _trl_module("trl.trainer.dpo_trainer")
    from collections import defaultdict

    B2, T = completion_mask.shape
    per_token = torch.zeros(B2, T - 1, dtype=torch.float64)
    # One token per response carries its whole log-prob sum (TRL sums over the sequence).
    first = completion_mask[:, 1:].float().argmax(1)
    per_token[torch.arange(B2), first] = torch.cat([c, r])
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(B2, T - 1), aux_loss=None,
                                    mean_logits=torch.zeros(B2, T - 1), log_sum_sq_probs=None,
                                    is_top1=torch.zeros(B2, T - 1, dtype=torch.bool))  # fmt: skip
    model = lambda **kw: outputs  # noqa: E731
    acc = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t,
                                unwrap_model=lambda m: m)  # fmt: skip
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"input_ids": torch.zeros(B2, T, dtype=torch.long), "attention_mask": torch.ones(B2, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}  # fmt: skip
    try:
        loss = dpo.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    except (AttributeError, TypeError, KeyError) as e:  # a TRL release whose trainer reads other attributes
        pytest.skip(f"TRL's DPOTrainer._compute_loss needs more than this stand-in: {type(e).__name__}: {e}")
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_trl_dpo_trainer_parity(loss_type):
    """The batch loss of TRL's DPOTrainer (sigmoid = DPO, ipo with its length normalisation) on the same
    log-prob sums, completion lengths and precomputed reference log-probs."""
    P, T = 16, 24
    g = torch.Generator().manual_seed(5)
    completion_mask = torch.zeros(2 * P, T, dtype=torch.long)
    for i in range(2 * P):
        start, n = int(torch.randint(1, 8, (), generator=g)), int(torch.randint(1, 14, (), generator=g))
        completion_mask[i, start : start + n] = 1
    n_all = completion_mask.sum(1).double()  # TRL's ipo divides by completion_mask (unshifted) sums
    c = -torch.rand(P, generator=g, dtype=torch.float64) * n_all[:P] * 2
    r = -torch.rand(P, generator=g, dtype=torch.float64) * n_all[P:] * 2
    rc, rr = c + torch.randn(P, generator=g, dtype=torch.float64), r + torch.randn(P, generator=g, dtype=torch.float64)
    beta = 0.3
    trl_loss, trl_metrics = _trl_dpo_compute_loss(loss_type, beta, c, r, rc, rr, completion_mask)
    cfg = PreferenceLossConfig("dpo" if loss_type == "sigmoid" else "ipo", beta)
    ours, values = pair_losses(c, r, n_all[:P], n_all[P:], rc, rr, cfg)
    assert_close(ours.mean(), trl_loss, atol=1e-10, name=f"TRL DPOTrainer {loss_type}")
    metrics = _metrics_of(ours.sum(), values, P)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):  # fmt: skip
        assert_close(metrics[k], trl_metrics[k], atol=1e-6, name=f"{k} vs TRL")


def test_liger_fused_linear_dpo_parity(device):
    """Liger's LigerFusedLinearDPOLoss (chunked, eager: compiled=False) on the same padded chosen / rejected
    batch, with its reference computed from a second lm_head: loss and gradients w.r.t. hidden and weight."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (pip install liger-kernel --no-deps)")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception as e:
        pytest.skip(f"liger_kernel.chunked_loss does not import here: {type(e).__name__}: {e}")
    h, w, b, labels, _ = padded_case(torch.float32, device, seed=6)
    ref_h, ref_w = h + 0.1 * torch.randn_like(h), w + 0.05 * torch.randn_like(w)
    ref_sums = linear_logprobs_ref(ref_h, ref_w, labels).sum(-1)  # (B,)
    P = labels.shape[0] // 2
    ref = torch.stack([ref_sums[:P], ref_sums[P:]], 1)
    beta = 0.2
    liger = LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True, chunk_size=1)
    hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    try:
        out = liger(wl, hl, labels, None, ref_h, ref_w, None)
    except Exception as e:  # Liger's CPU path is not what it is built for
        pytest.skip(f"Liger's fused linear DPO does not run here: {type(e).__name__}: {e}")
    liger_loss = out[0] if isinstance(out, tuple) else out
    g_out = torch.randn(()).item()
    gl = torch.autograd.grad(liger_loss * g_out, [hl, wl])
    ho, wo = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ours, _ = linear_preference_loss(ho, wo, labels, ref_logp_sums=ref, config=PreferenceLossConfig("dpo", beta=beta))
    go = torch.autograd.grad(ours * g_out, [ho, wo])
    assert_close(ours, liger_loss, atol=1e-5, name="loss vs Liger")
    assert_close(go[0], gl[0], atol=1e-5, name="d hidden vs Liger")
    assert_close(go[1], gl[1], atol=1e-5, name="d weight vs Liger")
