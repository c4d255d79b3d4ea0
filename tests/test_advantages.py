"""fusedrl.engine.advantages: GRPO / RLOO / REINFORCE++ / GAE advantages, whitening, KL controllers and
reward normalisation against small cases worked out by hand (the numbers are written here)."""

import pytest
import torch
from helpers import assert_close

from fusedrl.engine.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    broadcast_to_tokens,
    clip_rewards,
    compute_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from fusedrl.kernels import gae_ref

# Two prompts x three samples. Group 0: mean 3, deviations [-2, -1, 3], population var 14/3,
# std 2.160246899; group 1: all equal -> no signal.
SCORES = [1.0, 2.0, 6.0, 4.0, 4.0, 4.0]
GROUP = 3
STD0 = 2.1602468994692865


def t(x, device):
    return torch.tensor(x, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------
# GRPO / RLOO
# ----------------------------------------------------------------------------------------------------
def test_grpo_by_hand(device):
    adv = grpo_advantages(t(SCORES, device), GROUP)
    d = STD0 + 1e-6
    assert adv.dtype == torch.float32
    assert_close(adv, [-2 / d, -1 / d, 3 / d, 0.0, 0.0, 0.0], atol=1e-6, name="grpo")
    # -0.9258201, -0.4629100, 1.3887301: unit root-mean-square within the group (population std).
    assert_close(adv[:3], [-0.9258201, -0.4629100, 1.3887301], atol=1e-6, name="grpo numbers")
    assert_close(grpo_advantages(t(SCORES, device), GROUP, scale_by_std=False), [-2, -1, 3, 0, 0, 0], name="no std")


def test_grpo_group_of_two_is_plus_minus_one(device):
    adv = grpo_advantages(t([3.0, 1.0, -0.5, 0.5], device), 2, eps=0.0)
    assert_close(adv, [1.0, -1.0, -1.0, 1.0], atol=1e-7, name="grpo k=2")


def test_rloo_by_hand(device):
    # 1 - mean(2, 6) = -3; 2 - mean(1, 6) = -1.5; 6 - mean(1, 2) = 4.5; equal scores -> 0.
    adv = rloo_advantages(t(SCORES, device), GROUP)
    assert_close(adv, [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0], atol=1e-6, name="rloo")


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_size_errors(fn, device):
    s = t(SCORES, device)
    with pytest.raises(ValueError, match=r"group_size must be an int >= 2.*got 1"):
        fn(s, 1)
    with pytest.raises(ValueError, match=r"B = 6 must be a multiple of group_size = 4"):
        fn(s, 4)
    with pytest.raises(ValueError, match=r"scores must be a 1-D \(B,\) tensor.*\(2, 3\)"):
        fn(s.view(2, 3), 3)


# ----------------------------------------------------------------------------------------------------
# Whitening, broadcasting
# ----------------------------------------------------------------------------------------------------
def _loop_group_advantages(scores, ids, std):
    """Per-group loop: GRPO (population / unbiased std) and RLOO, float64."""
    grpo, rloo = [0.0] * len(scores), [0.0] * len(scores)
    for g in set(ids):
        members = [i for i, x in enumerate(ids) if x == g]
        vals = torch.tensor([scores[i] for i in members], dtype=torch.float64)
        k = len(members)
        sd = vals.std(unbiased=std == "unbiased") if k > 1 else torch.tensor(0.0, dtype=torch.float64)
        for j, i in enumerate(members):
            grpo[i] = float((vals[j] - vals.mean()) / (sd + 1e-6))
            rloo[i] = float(vals[j] - (vals.sum() - vals[j]) / (k - 1)) if k > 1 else 0.0
    return torch.tensor(grpo), torch.tensor(rloo)


@pytest.mark.parametrize("std", ["population", "unbiased"])
def test_group_index_any_group_sizes(std, device):
    """Groups from an arbitrary id array (ids not contiguous, members interleaved, sizes 1, 2 and 4): each group's
    advantages as a per-group loop computes them; a group of one gets 0."""
    scores = [1.0, 5.0, 2.0, 7.0, 3.0, -1.0, 4.0, 0.5]
    ids = [9, 2, 9, 4, 2, 9, 9, 2]  # group 9: four samples, group 2: three, group 4: one
    grpo_exp, rloo_exp = _loop_group_advantages(scores, ids, std)
    gi = torch.tensor(ids, device=device)
    assert_close(grpo_advantages(t(scores, device), group_index=gi, std=std), grpo_exp, atol=1e-5, name="grpo")
    assert_close(rloo_advantages(t(scores, device), group_index=gi), rloo_exp, atol=1e-5, name="rloo")
    assert float(grpo_advantages(t(scores, device), group_index=gi, std=std)[3]) == 0.0


def test_group_index_matches_consecutive_groups(device):
    s = t(SCORES, device)
    gi = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    assert_close(grpo_advantages(s, group_index=gi), grpo_advantages(s, GROUP), atol=1e-7, name="grpo")
    assert_close(rloo_advantages(s, group_index=gi), rloo_advantages(s, GROUP), atol=1e-7, name="rloo")
    unbiased = grpo_advantages(s, GROUP, std="unbiased")
    assert_close(unbiased[:3], torch.tensor([-2.0, -1.0, 3.0]) / (STD0 * 1.5**0.5 + 1e-6), atol=1e-5, name="unbiased")
    adv, _ = compute_advantages("grpo", scores=s, cu_seqlens=torch.tensor([0, 1, 2, 3, 4, 5, 6], device=device),
                                group_index=gi, group_std="unbiased")  # fmt: skip
    assert_close(adv, unbiased, atol=1e-7, name="compute_advantages")


def test_group_index_errors(device):
    s = t(SCORES, device)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        grpo_advantages(s)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        rloo_advantages(s, 3, group_index=torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="group_index must be an integer tensor"):
        grpo_advantages(s, group_index=torch.zeros(6))
    with pytest.raises(ValueError, match=r"group_index must have the shape of scores \(6,\), got \(5,\)"):
        grpo_advantages(s, group_index=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="std must be one of"):
        grpo_advantages(s, GROUP, std="sample")


def test_whiten_by_hand(device):
    x = t([1.0, 2.0, 3.0, 4.0], device)  # mean 2.5, population var 1.25
    assert_close(whiten(x), [-1.3416408, -0.4472136, 0.4472136, 1.3416408], atol=1e-6, name="whiten")
    assert_close(whiten(x, shift_mean=False), [1.1583592, 2.0527864, 2.9472136, 3.8416408], atol=1e-6, name="keep mean")
    # Masked: statistics over [1, 3] only (mean 2, var 1); the masked-out 100 comes back as 0.
    masked = whiten(t([1.0, 100.0, 3.0], device), torch.tensor([True, False, True], device=device))
    assert_close(masked, [-1.0, 0.0, 1.0], atol=1e-6, name="masked whiten")


def test_whiten_random_and_all_masked(device):
    x = torch.randn(1000, device=device) * 5 + 3
    w = whiten(x)
    assert abs(w.mean().item()) < 1e-5 and abs(w.std(unbiased=False).item() - 1) < 1e-5
    nothing = whiten(x, torch.zeros(1000, dtype=torch.bool, device=device))
    assert torch.equal(nothing, torch.zeros_like(nothing))
    with pytest.raises(ValueError, match=r"mask must have the shape of x \(1000,\), got \(999,\)"):
        whiten(x, torch.ones(999, device=device))


def test_broadcast_to_tokens(device):
    cu = torch.tensor([0, 2, 2, 5], device=device)
    out = broadcast_to_tokens(t([1.0, 2.0, 3.0], device), cu, n_tokens=5)
    assert_close(out, [1.0, 1.0, 3.0, 3.0, 3.0], name="broadcast")
    assert_close(broadcast_to_tokens(t([1.0, 2.0, 3.0], device), cu), out, name="broadcast, N read")
    with pytest.raises(ValueError, match=r"seq_values must have shape \(B,\) with B = .* = 3, got \(2,\)"):
        broadcast_to_tokens(t([1.0, 2.0], device), cu)


# ----------------------------------------------------------------------------------------------------
# REINFORCE++, compute_advantages
# ----------------------------------------------------------------------------------------------------
def test_reinforce_pp_by_hand(device):
    # gamma 0.5, sequences [1, 2] and [3]: returns-to-go [1 + 0.5 * 2, 2, 3] = [2, 2, 3];
    # mean 7/3, population std sqrt(2/9) = 0.4714045 -> [-1/sqrt(2), -1/sqrt(2), sqrt(2)].
    cu = torch.tensor([0, 2, 3], device=device)
    adv = reinforce_pp_advantages(t([1.0, 2.0, 3.0], device), cu, gamma=0.5)
    assert_close(adv, [-0.7071068, -0.7071068, 1.4142136], atol=1e-6, name="reinforce++")
    # gamma 1, sequences [1, 2] and [3, 4]: returns-to-go [3, 2, 7, 4]; the last token is masked out of
    # the statistics: mean 4, var 14/3 -> [-1, -2, 3] / 2.1602469 and 0.
    cu = torch.tensor([0, 2, 4], device=device)
    mask = torch.tensor([True, True, True, False], device=device)
    adv = reinforce_pp_advantages(t([1.0, 2.0, 3.0, 4.0], device), cu, mask, gamma=1.0)
    assert_close(adv, [-1 / STD0, -2 / STD0, 3 / STD0, 0.0], atol=1e-6, name="masked reinforce++")


def test_compute_advantages_gae(device):
    lengths = [5, 1, 9]
    cu = torch.tensor([0, 5, 6, 15], device=device)
    rewards = torch.randn(15, device=device)
    values = torch.randn(15, device=device)
    adv, ret = compute_advantages("gae", scores=None, cu_seqlens=cu, token_rewards=rewards, values=values,
                                  gamma=0.9, lam=0.8)  # fmt: skip
    raw, ret_ref = gae_ref(rewards.double(), values.double(), cu, gamma=0.9, lam=0.8)
    assert_close(ret, ret_ref, atol=1e-5, name="returns (not whitened)")
    assert_close(adv, (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-5, name="whitened advantages")
    plain, _ = compute_advantages("gae", scores=None, cu_seqlens=cu, token_rewards=rewards, values=values,
                                  gamma=0.9, lam=0.8, whiten_advantages=False)  # fmt: skip
    assert_close(plain, raw, atol=1e-5, name="raw advantages")
    assert sum(lengths) == adv.shape[0]


def test_compute_advantages_group_estimators(device):
    cu = torch.tensor([0, 2, 3, 3, 6, 7, 9], device=device)  # one empty response
    s = t(SCORES, device)
    lengths = cu.diff()
    for est, seq_adv in (("grpo", grpo_advantages(s, GROUP)), ("rloo", rloo_advantages(s, GROUP))):
        adv, ret = compute_advantages(est, scores=s, cu_seqlens=cu, group_size=GROUP)
        assert ret is None
        assert_close(adv, torch.repeat_interleave(seq_adv, lengths), name=est)
    # RLOO's hand numbers over tokens: [-3, -3 | -1.5 | (4.5 has no tokens) | 0, 0, 0 | 0 | 0, 0].
    adv, _ = compute_advantages("rloo", scores=s, cu_seqlens=cu, group_size=GROUP)
    assert_close(adv, [-3.0, -3.0, -1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], atol=1e-6, name="rloo tokens")


def test_compute_advantages_reinforce_pp_from_scores(device):
    """Without token_rewards the score sits at each sequence's last token: rewards [0, 2, 3] at gamma 1
    give returns-to-go [2, 2, 3], the first case of test_reinforce_pp_by_hand."""
    cu = torch.tensor([0, 2, 3], device=device)
    adv, ret = compute_advantages("reinforce++", scores=t([2.0, 3.0], device), cu_seqlens=cu)
    assert ret is None
    assert_close(adv, [-0.7071068, -0.7071068, 1.4142136], atol=1e-6, name="reinforce++ from scores")


def test_compute_advantages_errors(device):
    cu = torch.tensor([0, 2, 3], device=device)
    s = t([1.0, 2.0], device)
    assert ADVANTAGE_ESTIMATORS == ("gae", "grpo", "rloo", "reinforce++")
    with pytest.raises(ValueError, match=r"estimator must be one of .*got 'ppo'"):
        compute_advantages("ppo", scores=s, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"'gae' needs token_rewards \(N,\) and values \(N,\).*values=None"):
        compute_advantages("gae", scores=s, cu_seqlens=cu, token_rewards=torch.randn(3, device=device))
    with pytest.raises(ValueError, match=r"group_size must be an int >= 2"):
        compute_advantages("grpo", scores=s, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"B = 2 must be a multiple of group_size = 3"):
        compute_advantages("rloo", scores=s, cu_seqlens=cu, group_size=3)
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\) with B = .* = 2, got \(3,\)"):
        compute_advantages("grpo", scores=t([1.0, 2.0, 3.0], device), cu_seqlens=cu, group_size=3)
    with pytest.raises(ValueError, match=r"'reinforce\+\+' needs token_rewards \(N,\) or scores \(B,\)"):
        compute_advantages("reinforce++", scores=None, cu_seqlens=cu)


# ----------------------------------------------------------------------------------------------------
# KL controllers
# ----------------------------------------------------------------------------------------------------
def test_adaptive_kl_controller():
    # err = clip(kl / 6 - 1, -0.2, 0.2); value *= 1 + err * 256 / 10000.
    cases = [
        (12.0, 0.1 * (1 + 0.2 * 0.0256)),  # KL above target, error clipped at +0.2 -> 0.100512
        (6.6, 0.1 * (1 + 0.1 * 0.0256)),  # 10% above -> 0.100256
        (5.4, 0.1 * (1 - 0.1 * 0.0256)),  # 10% below -> 0.099744
        (0.0, 0.1 * (1 - 0.2 * 0.0256)),  # far below, clipped at -0.2 -> 0.099488
        (6.0, 0.1),  # on target: unchanged
    ]
    for kl, expected in cases:
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        ctl.update(kl, n_steps=256)
        assert abs(ctl.value - expected) < 1e-12, (kl, ctl.value, expected)

    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(torch.tensor(12.0), n_steps=256)  # a tensor KL works too
    ctl.update(20.0, n_steps=256)
    assert ctl.value > 0.1005
    other = AdaptiveKLController(1.0, target=1.0, horizon=1)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict() == {"value": ctl.value, "target": 6.0, "horizon": 10000.0}

    with pytest.raises(ValueError, match=r"target must be a number > 0, got 0"):
        AdaptiveKLController(0.1, target=0, horizon=10)
    with pytest.raises(ValueError, match=r"horizon must be a number > 0, got -5"):
        AdaptiveKLController(0.1, target=1.0, horizon=-5)
    with pytest.raises(ValueError, match=r"current_kl must be a finite number, got nan"):
        ctl.update(float("nan"), n_steps=1)
    with pytest.raises(ValueError, match=r"n_steps must be an int >= 0, got 1.5"):
        ctl.update(1.0, n_steps=1.5)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05 and ctl.state_dict() == {"value": 0.05}
    ctl.load_state_dict({"value": 0.2})
    assert ctl.value == 0.2
    with pytest.raises(ValueError, match=r"kl_coef must be a number >= 0, got -0.1"):
        FixedKLController(-0.1)


# ----------------------------------------------------------------------------------------------------
# Reward normalisation
# ----------------------------------------------------------------------------------------------------
def test_running_mean_std_by_hand(device):
    rms = RunningMeanStd(eps=0.0)
    rms.update(t([1.0, 2.0, 3.0], device))
    assert (rms.mean, rms.var, rms.count) == (2.0, 2.0 / 3.0, 3)
    rms.update(t([4.0, 5.0], device))  # 1..5: mean 3, population var 2
    assert abs(rms.mean - 3.0) < 1e-12 and abs(rms.var - 2.0) < 1e-12 and rms.count == 5
    rms.update(t([], device))
    assert rms.count == 5
    assert_close(rms.normalize(t([3.0, 5.0], device)), [0.0, 2 / 2**0.5], atol=1e-6, name="normalize")
    assert_close(rms.normalize(t([3.0], device), center=False), [3 / 2**0.5], atol=1e-6, name="scale only")

    fresh = RunningMeanStd()
    fresh.load_state_dict(rms.state_dict())
    assert fresh.state_dict() == rms.state_dict()


def test_running_mean_std_matches_concatenation(device):
    batches = [torch.randn(n, device=device) * 3 + 1 for n in (7, 1, 40, 13)]
    rms = RunningMeanStd()
    for b in batches:
        rms.update(b)
    all_x = torch.cat(batches).double()
    assert abs(rms.mean - all_x.mean().item()) < 1e-9
    assert abs(rms.var - all_x.var(unbiased=False).item()) < 1e-9
    assert rms.count == 61


def test_clip_rewards(device):
    x = t([-5.0, -1.0, 0.5, 7.0], device)
    assert_close(clip_rewards(x, 2.0), [-2.0, -1.0, 0.5, 2.0], name="clip")
    assert clip_rewards(x, None) is x
    with pytest.raises(ValueError, match=r"clip must be a number > 0, got 0"):
        clip_rewards(x, 0)
