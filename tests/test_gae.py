"""fusedrl.kernels.gae: the GAE Triton kernel (interpreter on CPU) and its PyTorch reference against a
textbook per-timestep Python loop on packed sequences, and the KL-shaped token rewards checked by hand."""

import pytest
import torch
from helpers import assert_close, assert_kernel_close
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedrl.kernels import gae, gae_ref, shape_token_rewards, validation
from fusedrl.kernels.gae import _BLOCK_T

# Packed layouts (sequence lengths) and dtypes, declared once. Lengths straddle the kernel's block size
# (one token, empty sequences, exactly one block, one past it, several blocks with a partial head).
LAYOUTS = [
    [1],
    [5, 1, 0, 17],
    [_BLOCK_T - 1, _BLOCK_T, _BLOCK_T + 1, 1, 0, 3],
    [2 * _BLOCK_T + 7, 1, 41, 5 * _BLOCK_T + 3],
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GAMMA_LAM = [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7)]
BACKENDS = ["triton", "torch"]


def cu_from_lengths(lengths, device, dtype=torch.int32):
    return torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=dtype, device=device)


def gae_textbook(rewards, values, cu_seqlens, gamma, lam):
    """One token at a time, backwards, in Python floats (float64): the definition of GAE."""
    r, v, cu = rewards.double().tolist(), values.double().tolist(), cu_seqlens.tolist()
    adv = [0.0] * len(r)
    for b in range(len(cu) - 1):
        next_adv, next_value = 0.0, 0.0  # terminal: nothing after the last token
        for t in range(cu[b + 1] - 1, cu[b] - 1, -1):
            delta = r[t] + gamma * next_value - v[t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v[t]
            adv[t] = next_adv
    adv = torch.tensor(adv, dtype=torch.float64)
    return adv, adv + values.double().cpu()


def make_inputs(lengths, dtype, device):
    n = sum(lengths)
    rewards = (torch.randn(n, device=device) * 0.5).to(dtype)
    values = (torch.randn(n, device=device) * 2.0).to(dtype)
    return rewards, values, cu_from_lengths(lengths, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("lengths", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
def test_gae_matches_textbook(lengths, gamma, lam, dtype, backend, device):
    rewards, values, cu = make_inputs(lengths, dtype, device)
    adv, ret = gae(rewards, values, cu, gamma=gamma, lam=lam, backend=backend)
    adv_r, ret_r = gae_ref(rewards, values, cu, gamma=gamma, lam=lam)
    adv_t, ret_t = gae_textbook(rewards, values, cu, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == rewards.shape
    assert adv_r.dtype == torch.float32
    assert_kernel_close(adv, adv_r, adv_t, name="advantages")
    assert_kernel_close(ret, ret_r, ret_t, name="returns")
    # The reference itself is float32-accurate (so the bound above is tight, also for backend="torch").
    assert_close(adv_r, adv_t, atol=1e-5 * max(1.0, adv_t.abs().max().item()), name="reference advantages")


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_reference_float64_is_the_textbook(gamma, lam, device):
    rewards, values, cu = make_inputs(LAYOUTS[3], torch.float64, device)
    adv, ret = gae_ref(rewards, values, cu, gamma=gamma, lam=lam)
    adv_t, ret_t = gae_textbook(rewards, values, cu, gamma, lam)
    assert adv.dtype == torch.float64
    assert_close(adv, adv_t, atol=1e-12, name="advantages")
    assert_close(ret, ret_t, atol=1e-12, name="returns")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend, device):
    """Two sequences, gamma 0.5, lam 0.5 (c = 0.25), worked out on paper.
    seq 0: r = [1, 2], V = [0.5, 1]: delta = [1 + 0.5 - 0.5, 2 - 1] = [1, 1]; A = [1 + 0.25, 1] = [1.25, 1].
    seq 1: r = [3], V = [2]: delta = A = [1]."""
    r = torch.tensor([1.0, 2.0, 3.0], device=device)
    v = torch.tensor([0.5, 1.0, 2.0], device=device)
    cu = torch.tensor([0, 2, 3], device=device)
    adv, ret = gae(r, v, cu, gamma=0.5, lam=0.5, backend=backend)
    assert_close(adv, [1.25, 1.0, 1.0], atol=1e-7, name="advantages")
    assert_close(ret, [1.75, 2.0, 3.0], atol=1e-7, name="returns")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_int64_offsets(backend, device):
    lengths = LAYOUTS[2]
    n = sum(lengths)
    base = torch.randn(n, 3, device=device, dtype=torch.bfloat16)
    rewards, values = base[:, 0], base[:, 2]  # stride 3
    assert not rewards.is_contiguous() and not values.is_contiguous()
    cu = cu_from_lengths(lengths, device, torch.int64)
    adv, ret = gae(rewards, values, cu, gamma=0.99, lam=0.95, backend=backend)
    adv_t, ret_t = gae_textbook(rewards, values, cu, 0.99, 0.95)
    adv_r, ret_r = gae_ref(rewards.contiguous(), values.contiguous(), cu, gamma=0.99, lam=0.95)
    assert_kernel_close(adv, adv_r, adv_t, name="advantages")
    assert_kernel_close(ret, ret_r, ret_t, name="returns")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0]], ids=str)
def test_no_tokens(lengths, backend, device):
    cu = cu_from_lengths(lengths, device)
    empty = torch.randn(0, device=device)
    adv, ret = gae(empty, empty, cu, backend=backend)
    assert adv.shape == ret.shape == (0,) and adv.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_detached_constants(backend, device):
    rewards, values, cu = make_inputs([7, 3], torch.float32, device)
    values.requires_grad_(True)
    adv, ret = gae(rewards, values, cu, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 2 * _BLOCK_T + 2), min_size=1, max_size=5),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
)
def test_kernel_any_layout(lengths, gamma, lam):
    torch.manual_seed(len(lengths) + sum(lengths))
    rewards, values, cu = make_inputs(lengths, torch.float32, torch.device("cpu"))
    adv, ret = gae(rewards, values, cu, gamma=gamma, lam=lam, backend="triton")
    adv_r, ret_r = gae_ref(rewards, values, cu, gamma=gamma, lam=lam)
    adv_t, ret_t = gae_textbook(rewards, values, cu, gamma, lam)
    assert_kernel_close(adv, adv_r, adv_t, name="advantages")
    assert_kernel_close(ret, ret_r, ret_t, name="returns")


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, device):
    r, v, cu = make_inputs([3, 2], torch.float32, device)
    call = lambda **kw: gae(**{"rewards": r, "values": v, "cu_seqlens": cu, "backend": backend, **kw})  # noqa: E731
    with pytest.raises(ValueError, match=r"values must have the same length as rewards \(N = 5.*got 4"):
        call(values=v[:4])
    with pytest.raises(ValueError, match=r"rewards must be a 1-D"):
        call(rewards=r.view(5, 1))
    with pytest.raises(TypeError, match=r"values must be a floating-point tensor.*int64"):
        call(values=torch.arange(5, device=device))
    with pytest.raises(TypeError, match=r"cu_seqlens must be an integer tensor.*float32"):
        call(cu_seqlens=cu.float())
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"):
        call(cu_seqlens=torch.tensor([1, 3, 5], device=device))
    with pytest.raises(ValueError, match=r"non-decreasing.*cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 2"):
        call(cu_seqlens=torch.tensor([0, 4, 2, 5], device=device))
    with pytest.raises(ValueError, match=r"must end at the number of tokens N = 5, got cu_seqlens\[-1\] = 4"):
        call(cu_seqlens=torch.tensor([0, 3, 4], device=device))
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D tensor of B\+1"):
        call(cu_seqlens=cu.view(1, 3))
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\], got 1.5"):
        call(gamma=1.5)
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\], got -0.1"):
        call(lam=-0.1)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        call(backend="cuda")


def test_value_checks_can_be_switched_off(device):
    """Under validation(False) a wrong last offset is not caught (no host sync), and the kernel clamps
    its reads to the N tokens instead of reading out of bounds."""
    r, v, _ = make_inputs([3, 2], torch.float32, device)
    bad = torch.tensor([0, 3, 9], device=device)
    with validation(False):
        adv, _ = gae(r, v, bad, backend="triton")
    adv_t, _ = gae_textbook(r, v, torch.tensor([0, 3, 5]), 1.0, 0.95)
    assert_close(adv, adv_t, atol=1e-5, name="advantages")
    with pytest.raises(ValueError, match="must end at"):
        gae(r, v, bad, backend="triton")


# ----------------------------------------------------------------------------------------------------
# shape_token_rewards
# ----------------------------------------------------------------------------------------------------
# Two sequences [0, 2) and [2, 5); d = logp - ref = [0.2, 0, -1, 0.3, 0].
LOGP = [-1.0, -0.5, -2.0, -0.1, -0.3]
REF = [-1.2, -0.5, -1.0, -0.4, -0.3]
SCORES = [1.0, -2.0]
# k1 = d; k2 = d^2 / 2; k3 = exp(-d) + d - 1 (e^-0.2 = 0.818730753, e^1 = 2.718281828, e^-0.3 = 0.740818221)
KL_BY_HAND = {
    "k1": [0.2, 0.0, -1.0, 0.3, 0.0],
    "k2": [0.02, 0.0, 0.5, 0.045, 0.0],
    "k3": [0.0187307531, 0.0, 0.7182818285, 0.0408182207, 0.0],
}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_shape_token_rewards_by_hand(estimator, device):
    logp = torch.tensor(LOGP, device=device)
    ref = torch.tensor(REF, device=device)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    rewards, kl = shape_token_rewards(torch.tensor(SCORES, device=device), logp, ref, cu, kl_coef=0.1,
                                      estimator=estimator)  # fmt: skip
    k = KL_BY_HAND[estimator]
    expected = [-0.1 * x for x in k]
    expected[1] += SCORES[0]  # last token of sequence 0
    expected[4] += SCORES[1]  # last token of sequence 1
    assert rewards.dtype == kl.dtype == torch.float32
    assert_close(kl, k, atol=1e-6, name="kl")
    assert_close(rewards, expected, atol=1e-6, name="token_rewards")


def test_shape_token_rewards_clip_and_empty_sequences(device):
    """Scores clipped to [-3, 3]; the empty sequences' scores (9 and 8) go nowhere."""
    cu = torch.tensor([0, 0, 2, 2, 3], device=device)
    scores = torch.tensor([9.0, 5.0, 8.0, -7.0], device=device, dtype=torch.bfloat16)
    logp = torch.tensor([-1.0, -2.0, -0.5], device=device)
    rewards, kl = shape_token_rewards(scores, logp, logp - 0.5, cu, kl_coef=0.2, clip_score=3.0)
    assert_close(kl, [0.5, 0.5, 0.5], atol=1e-7, name="kl")
    assert_close(rewards, [-0.1, 3.0 - 0.1, -3.0 - 0.1], atol=1e-6, name="token_rewards")


def test_k3_accurate_for_close_policies(device):
    """k3 ~ d^2/2 for tiny d: exp(-d) - 1 in float32 would cancel to noise; expm1 keeps it."""
    ref = torch.randn(64, device=device) * 3
    logp = ref + torch.randn(64, device=device) * 1e-3
    cu = torch.tensor([0, 64], device=device)
    _, kl = shape_token_rewards(torch.zeros(1, device=device), logp, ref, cu, kl_coef=1.0, estimator="k3")
    d = logp.double() - ref.double()
    truth = torch.exp(-d) + d - 1
    assert_close(kl, truth, atol=0.0, rtol=1e-3, name="k3")


def test_shape_token_rewards_bad_input(device):
    logp = torch.randn(5, device=device)
    cu = torch.tensor([0, 2, 5], device=device)
    s = torch.randn(2, device=device)
    with pytest.raises(ValueError, match=r"ref_logp must have the same length as logp \(N = 5.*got 4"):
        shape_token_rewards(s, logp, logp[:4], cu, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\).*needs scores \(2,\), got \(3,\)"):
        shape_token_rewards(torch.randn(3, device=device), logp, logp, cu, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"must end at the number of tokens N = 5"):
        shape_token_rewards(s, logp, logp, torch.tensor([0, 2, 6], device=device), kl_coef=0.1)
    with pytest.raises(ValueError, match=r"estimator must be one of \('k1', 'k2', 'k3', 'abs'\), got 'k4'"):
        shape_token_rewards(s, logp, logp, cu, kl_coef=0.1, estimator="k4")
    with pytest.raises(ValueError, match=r"kl_coef must be a number >= 0, got -1"):
        shape_token_rewards(s, logp, logp, cu, kl_coef=-1)
    with pytest.raises(ValueError, match=r"clip_score must be None or a number > 0, got 0"):
        shape_token_rewards(s, logp, logp, cu, kl_coef=0.1, clip_score=0)


def test_kl_estimators_match_their_definitions(device):
    """Random logp pairs: every estimator against its float64 formula (k2, k3 >= 0 by construction)."""
    logp = torch.randn(300, device=device) - 2
    ref = logp + torch.randn(300, device=device)
    cu = torch.tensor([0, 100, 300], device=device)
    d = (logp - ref).double()
    truth = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) + d - 1}
    for est, t in truth.items():
        _, kl = shape_token_rewards(torch.zeros(2, device=device), logp, ref, cu, kl_coef=0.0, estimator=est)
        assert_close(kl, t, atol=1e-5, rtol=1e-5, name=est)
        if est != "k1":
            assert (kl >= 0).all()
