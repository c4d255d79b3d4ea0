"""Advantage estimators (GAE, GRPO, RLOO, REINFORCE++), whitening, KL-coefficient controllers and reward
normalisation: the "advantages" stage between scoring a rollout and updating the policy.

Token tensors are packed (N,) with ``cu_seqlens`` (B+1,) offsets; sequence tensors are (B,). For the
group estimators the B sequences come in consecutive groups of ``group_size`` samples of one prompt.
Everything returns float32 and runs without host syncs unless a docstring says otherwise.
"""

from __future__ import annotations

import math

import torch

from fusedrl.kernels import check_cu_seqlens, check_float, gae
from fusedrl.names import ADVANTAGE_ESTIMATORS, GROUP_STDS

from .distributed import Distributed


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _check_scores(scores: torch.Tensor, name: str = "scores") -> torch.Tensor:
    check_float(name, scores)
    if scores.dim() != 1:
        raise ValueError(f"{name} must be a 1-D (B,) tensor of per-sequence scores, got shape {tuple(scores.shape)}")
    return scores.detach().float()


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / group_size, group_size) view of consecutive groups, after checking the group size."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2 (samples per prompt; a group of one has no baseline), got {group_size!r}"
        )
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"the number of sequences B = {scores.shape[0]} must be a multiple of group_size = {group_size}"
        )
    return scores.view(-1, group_size)


def whiten(
    x: torch.Tensor,  # (...) any float dtype
    mask: torch.Tensor | None = None,  # (...) bool or 0/1, same shape as x; None = every element
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    dist=None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and the population variance (divide by the count)
    taken over the masked-in elements -- of every rank when ``dist`` (a ``fusedrl.engine.distributed.Distributed``)
    spans several. ``shift_mean=False`` keeps the original mean and only rescales the deviations from it.
    Masked-out elements come back as 0; an all-masked input gives all zeros. float32 result (float64 stays
    float64), no host sync."""
    check_float("x", x)
    if mask is not None and tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    return (dist if dist is not None else Distributed(x.device, single=True)).whiten(
        x, mask, shift_mean=shift_mean, eps=eps
    )


def broadcast_to_tokens(
    seq_values: torch.Tensor,  # (B,) one value per sequence
    cu_seqlens: torch.Tensor,  # (B+1,) int offsets, leading 0
    *,
    n_tokens: int | None = None,
) -> torch.Tensor:
    """Repeat each sequence's value over its tokens: (B,) -> (N,). Pass ``n_tokens`` (N) to avoid the one
    host sync that reading ``cu_seqlens[-1]`` costs on GPU."""
    if seq_values.dim() != 1 or cu_seqlens.dim() != 1 or seq_values.shape[0] != cu_seqlens.shape[0] - 1:
        raise ValueError(
            f"seq_values must have shape (B,) with B = len(cu_seqlens) - 1 = {cu_seqlens.shape[0] - 1}, "
            f"got {tuple(seq_values.shape)}"
        )
    if n_tokens is None:
        n_tokens = int(cu_seqlens[-1])  # host sync on GPU
    check_cu_seqlens(cu_seqlens, n_tokens)
    lengths = cu_seqlens.diff().long()
    return torch.repeat_interleave(seq_values, lengths, output_size=n_tokens)


def _last_token_rewards(scores: torch.Tensor, cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B,) scores -> (N,) token rewards holding each score at its sequence's last token (empty sequences
    drop theirs), without a host sync."""
    out = torch.zeros(n_tokens, dtype=torch.float32, device=scores.device)
    if n_tokens > 0 and scores.numel() > 0:
        cu = cu_seqlens.long()
        out.index_add_(0, (cu[1:] - 1).clamp(min=0), torch.where(cu[1:] > cu[:-1], scores.float(), 0.0))
    return out


# ----------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------
def _group_index(scores: torch.Tensor, group_size: int | None, group_index: torch.Tensor | None) -> torch.Tensor:
    """(B,) int64 group of each sequence in [0, G): consecutive groups of ``group_size``, or ``group_index`` (any
    integer ids, any group sizes; renumbered by ``torch.unique`` where they are: a host sync on a GPU, none for ids
    on the host, which then move to the scores' device)."""
    if (group_size is None) == (group_index is None):
        raise ValueError("pass exactly one of group_size (consecutive groups) and group_index (a (B,) group id array)")
    if group_index is None:
        _groups(scores, group_size)  # the checks
        return torch.arange(scores.shape[0], device=scores.device) // group_size
    if not isinstance(group_index, torch.Tensor) or group_index.is_floating_point() or group_index.is_complex():
        raise TypeError(f"group_index must be an integer tensor, got {type(group_index).__name__} "
                        f"{getattr(group_index, 'dtype', '')}".rstrip())  # fmt: skip
    if tuple(group_index.shape) != tuple(scores.shape):
        raise ValueError(
            f"group_index must have the shape of scores {tuple(scores.shape)}, got {tuple(group_index.shape)}"
        )
    return torch.unique(group_index, return_inverse=True)[1].to(scores.device)


def _group_sums(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of ``x`` over its group."""
    return x.new_zeros(x.shape[0] + 1).index_add(0, group, x)[group]


def grpo_advantages(
    scores: torch.Tensor,  # (B,)
    group_size: int | None = None,  # consecutive groups of this size (B = n_prompts * group_size) ...
    *,
    group_index: torch.Tensor | None = None,  # ... or (B,) integer group ids, any group sizes
    eps: float = 1e-6,
    scale_by_std: bool = True,
    std: str = "population",
) -> torch.Tensor:
    """Group-relative advantages: ``(s - mean_group) / (std_group + eps)`` per group of samples of one prompt;
    ``scale_by_std=False`` only subtracts the group mean (Dr. GRPO).

    ``std="population"`` (the default) divides by the group size: normalised advantages then have unit
    root-mean-square in every group whatever its size (a group of two gives exactly +-1). ``std="unbiased"``
    divides by size - 1, as DeepSeekMath, TRL and verl do, which makes advantages smaller by sqrt((k - 1) / k).
    A group whose scores are all equal, and a group of one, get 0. Returns (B,) float32."""
    if std not in GROUP_STDS:
        raise ValueError(f"std must be one of {GROUP_STDS}, got {std!r}")
    s = _check_scores(scores)
    group = _group_index(s, group_size, group_index)
    count = _group_sums(torch.ones_like(s), group)
    adv = s - _group_sums(s, group) / count
    if scale_by_std:
        dof = count if std == "population" else (count - 1.0).clamp(min=1.0)
        adv = adv / ((_group_sums(adv * adv, group) / dof).sqrt() + eps)
    return adv


def rloo_advantages(
    scores: torch.Tensor,  # (B,)
    group_size: int | None = None,
    *,
    group_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE leave-one-out: ``s_i - mean of the other scores of its group`` (= k / (k - 1) * (s_i -
    mean_group) in a group of k); groups as in ``grpo_advantages``; a group of one gets 0. Returns (B,) float32."""
    s = _check_scores(scores)
    group = _group_index(s, group_size, group_index)
    count = _group_sums(torch.ones_like(s), group)
    others = (count - 1.0).clamp(min=1.0)
    return torch.where(count > 1, s - (_group_sums(s, group) - s) / others, torch.zeros_like(s))


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,  # (N,) packed per-token rewards (KL-shaped, score at the last token)
    cu_seqlens: torch.Tensor,  # (B+1,) int offsets, leading 0, last N
    mask: torch.Tensor | None = None,  # (N,) bool: tokens that count in the normalisation; None = all
    *,
    gamma: float = 1.0,
    dist=None,
    backend: str = "auto",
) -> torch.Tensor:
    """REINFORCE++: the discounted return-to-go of every token, ``G_t = sum_{k >= t} gamma^(k-t) r_k``
    within its sequence, then whitened over all (masked-in) tokens of the batch (of every rank with ``dist``).
    The returns-to-go are GAE with values 0 and lam = 1 (``backend`` as in ``fusedrl.kernels.gae``).
    Masked-out tokens get 0. Returns (N,) float32."""
    check_float("token_rewards", token_rewards)
    if token_rewards.dim() != 1:
        raise ValueError(f"token_rewards must be a 1-D (N,) tensor, got shape {tuple(token_rewards.shape)}")
    zeros = torch.zeros(token_rewards.shape, dtype=torch.float32, device=token_rewards.device)
    returns_to_go, _ = gae(token_rewards, zeros, cu_seqlens, gamma=gamma, lam=1.0, backend=backend)
    return whiten(returns_to_go, mask, dist=dist)


def compute_advantages(
    estimator: str,
    *,
    scores: torch.Tensor | None,  # (B,) per-sequence scores (grpo, rloo; reinforce++ without token_rewards)
    cu_seqlens: torch.Tensor,  # (B+1,) int offsets, leading 0, last N
    token_rewards: torch.Tensor | None = None,  # (N,) KL-shaped rewards (gae; reinforce++)
    values: torch.Tensor | None = None,  # (N,) critic values (gae)
    group_size: int = 1,
    group_index: torch.Tensor | None = None,  # (B,) group ids (grpo, rloo), instead of consecutive group_size
    group_std: str = "population",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    dist=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (N,) for one of ``ADVANTAGE_ESTIMATORS``, and the critic's targets.

    - ``gae``: GAE(gamma, lam) over ``token_rewards`` and ``values``; returns = raw advantages + values;
      the advantages (not the returns) are whitened when ``whiten_advantages``.
    - ``grpo`` / ``rloo``: per-sequence group advantages of ``scores`` (consecutive groups of ``group_size`` >= 2,
      or ``group_index``; grpo's std by ``group_std``, see ``grpo_advantages``), repeated over each sequence's tokens. ``whiten_advantages`` does not apply: they are already baselined per
      group, and a batch-wide shift would give groups with all-equal scores a non-zero advantage.
    - ``reinforce++``: whitened discounted returns-to-go of ``token_rewards`` (or, if None, of ``scores``
      placed at each sequence's last token); whitening is part of the estimator and always on.

    Whitening runs over every rank's tokens when ``dist`` (a ``fusedrl.engine.distributed.Distributed``) spans
    several; ``backend`` picks the GAE implementation (``fusedrl.kernels.gae``: Triton on CUDA by default).
    Everything runs on the device of the inputs.

    Returns ``(advantages, returns)``; returns is None except for ``gae``. The number of tokens N comes
    from ``token_rewards`` / ``values``; for grpo / rloo without them it is read from ``cu_seqlens[-1]``
    (one host sync on GPU).
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    n_tokens = None
    for name, t in (("token_rewards", token_rewards), ("values", values)):
        if t is not None:
            check_float(name, t)
            if t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D (N,) tensor, got shape {tuple(t.shape)}")
            n_tokens = t.shape[0] if n_tokens is None else n_tokens
    if scores is not None:
        s = _check_scores(scores)
        if s.shape[0] != cu_seqlens.shape[0] - 1:
            raise ValueError(
                f"scores must have shape (B,) with B = len(cu_seqlens) - 1 = {cu_seqlens.shape[0] - 1}, "
                f"got {tuple(s.shape)}"
            )

    if estimator == "gae":
        if token_rewards is None or values is None:
            raise ValueError(
                "estimator 'gae' needs token_rewards (N,) and values (N,), got "
                f"token_rewards={'a tensor' if token_rewards is not None else None}, "
                f"values={'a tensor' if values is not None else None}"
            )
        adv, returns = gae(token_rewards, values, cu_seqlens, gamma=gamma, lam=lam, backend=backend)
        return (whiten(adv, dist=dist) if whiten_advantages else adv), returns

    if estimator == "reinforce++":
        if token_rewards is None:
            if scores is None:
                raise ValueError("estimator 'reinforce++' needs token_rewards (N,) or scores (B,), got neither")
            if n_tokens is None:
                n_tokens = int(cu_seqlens[-1])  # host sync on GPU
            check_cu_seqlens(cu_seqlens, n_tokens)
            token_rewards = _last_token_rewards(s, cu_seqlens, n_tokens)
        return reinforce_pp_advantages(token_rewards, cu_seqlens, gamma=gamma, dist=dist, backend=backend), None

    if scores is None:
        raise ValueError(f"estimator {estimator!r} needs scores (B,), got None")
    groups = dict(group_size=group_size) if group_index is None else dict(group_index=group_index)
    seq_adv = grpo_advantages(s, std=group_std, **groups) if estimator == "grpo" else rloo_advantages(s, **groups)
    return broadcast_to_tokens(seq_adv, cu_seqlens, n_tokens=n_tokens), None


# ----------------------------------------------------------------------------------------------------
# KL-coefficient controllers
# ----------------------------------------------------------------------------------------------------
def _check_number(name: str, x, *, positive: bool = False) -> float:
    ok = not isinstance(x, bool) and isinstance(x, (int, float)) and (x > 0 if positive else x >= 0)
    if not ok:
        raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, got {x!r}")
    return float(x)


class FixedKLController:
    """A constant KL coefficient with the adaptive controller's interface."""

    def __init__(self, kl_coef: float):
        self.value = _check_number("kl_coef", kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = _check_number("state['value']", state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019): steers the measured KL towards ``target``.

    ``err = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + err * n_steps / horizon``. The
    clip bounds the change per update, so one noisy KL reading cannot swing the coefficient."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _check_number("init_kl_coef", init_kl_coef)
        self.target = _check_number("target", target, positive=True)
        self.horizon = _check_number("horizon", horizon, positive=True)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl``: the measured KL per token of the last batch; ``n_steps``: samples (or steps)
        it covered. A tensor KL is read with ``float()`` (a host sync on GPU, once per update)."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be a finite number, got {current_kl!r}")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = _check_number("state['value']", state["value"])
        self.target = _check_number("state['target']", state["target"], positive=True)
        self.horizon = _check_number("state['horizon']", state["horizon"], positive=True)


# ----------------------------------------------------------------------------------------------------
# Reward normalisation
# ----------------------------------------------------------------------------------------------------
def clip_rewards(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clamp to ``[-clip, clip]``; ``clip=None`` returns ``x`` unchanged."""
    if clip is None:
        return x
    c = _check_number("clip", clip, positive=True)
    return x.clamp(-c, c)


class RunningMeanStd:
    """Running mean and population variance of a stream of batches (Chan et al.'s parallel update), for
    normalising rewards across training steps. Statistics are float64 Python numbers; ``update`` reads
    one batch's mean, variance and count from the device (one host sync per call)."""

    def __init__(self, eps: float = 1e-8):
        self.eps = _check_number("eps", eps)
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return (self.var + self.eps) ** 0.5

    def normalize_stream(self, raw: torch.Tensor, dist) -> torch.Tensor:
        """Fold this step's scores of every rank (``dist``, a ``Distributed``) into the statistics, then divide
        ``raw`` by the running std (the mean is kept: a reward's offset carries no advantage)."""
        self.update(dist.gather(raw))
        return self.normalize(raw, center=False)

    def update(self, x: torch.Tensor) -> None:
        """Fold every element of ``x`` into the running statistics."""
        check_float("x", x)
        n = x.numel()
        if n == 0:
            return
        xd = x.detach().double().reshape(-1)
        b_mean, b_var = torch.stack([xd.mean(), xd.var(unbiased=False)]).tolist()  # host sync
        if self.count == 0:
            self.mean, self.var, self.count = b_mean, b_var, n
            return
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: torch.Tensor, *, center: bool = True) -> torch.Tensor:
        """``(x - mean) / std`` with the running statistics; ``center=False`` only rescales: ``x / std``."""
        check_float("x", x)
        out = x.float() - self.mean if center else x.float()
        return out / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        self.mean = float(state["mean"])
        self.var = _check_number("state['var']", state["var"])
        self.count = int(state["count"])
        self.eps = _check_number("state['eps']", state.get("eps", self.eps))
