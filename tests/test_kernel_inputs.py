"""What every fused op must do with the layout of its inputs, on every backend, forward and backward:

- every per-token input (labels, mask, old / ref / rollout log-probs, advantages, values, returns, entropies,
  cu_seqlens) given as a strided view (a column of a wider tensor, whose neighbours hold garbage) gives exactly
  what its contiguous copy gives;
- ``inplace_backward=True`` on logits whose leading dims cannot be merged into rows (a transposed 4-D view)
  leaves the gradient in the caller's buffer; overlapping views are refused;
- every Triton launch runs under the tensors' CUDA device guard (a spy on the guard: no GPU needed)."""

import importlib

import pytest
import torch
from helpers import KERNEL_BACKENDS, assert_close

from fusedrl.kernels import (
    PPOLossConfig,
    PreferenceLossConfig,
    gae,
    linear_logprobs,
    linear_ppo_loss,
    linear_preference_loss,
    logprobs,
    ppo_loss,
    ppo_loss_from_logprobs,
    shape_token_rewards,
    value_loss,
)

utils = importlib.import_module("fusedrl.kernels._utils")

# Shapes, declared once: N packed tokens in the sequences of SEQLENS (one empty), an odd vocabulary, a small H.
SEQLENS = (5, 0, 7, 3, 6)
N, V, H = sum(SEQLENS), 37, 8
BACKENDS = KERNEL_BACKENDS
# Every setting that reads a per-token input: KL (ref), rollout correction (rollout), per-sequence weights
# (cu_seqlens), entropy; the token level runs the fused PPO kernel, the sequence level the generic path.
CONFIGS = {
    "token": PPOLossConfig(kl_coef=0.1, entropy_coef=0.01, rollout_correction="tis", agg="seq-mean-token-mean",
                           temperature=0.7),
    "sequence": PPOLossConfig(kl_coef=0.1, importance_sampling_level="sequence", rollout_correction="mis",
                              rollout_correction_level="sequence-mean", agg="seq-mean-token-sum"),
}  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN on skipped rows


def strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` as column 1 of a (..., 3) tensor whose other columns hold garbage a kernel must never read: NaN for
    floats, out-of-range values for integers (a wrong read shows as NaN or a wrong sum)."""
    junk = torch.full_like(t, float("nan")) if t.is_floating_point() else torch.full_like(t, 10_000)
    if t.dtype == torch.bool:
        junk = ~t
    view = torch.stack([junk, t, junk], -1)[..., 1]
    assert view.dim() == 0 or view.stride(-1) == 3
    return view


def cu_seqlens(device, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(SEQLENS).cumsum(0).tolist()], dtype=dtype, device=device)


def ppo_batch(device):
    labels = torch.randint(0, V, (N,), device=device)
    labels[::5] = -100
    logp0 = -torch.rand(N, device=device) * 3
    return dict(labels=labels, old_logp=logp0 + 0.2 * torch.randn(N, device=device),
                advantages=torch.randn(N, device=device), mask=torch.rand(N, device=device) > 0.2,
                ref_logp=logp0 + 0.2 * torch.randn(N, device=device),
                rollout_logp=logp0 + 0.2 * torch.randn(N, device=device), cu_seqlens=cu_seqlens(device))  # fmt: skip


def same_results(fn, inputs: dict, names, *, grad_of):
    """``fn(**inputs)`` with the named inputs strided (each alone, then all at once) equals ``fn(**inputs)``:
    every output and the gradient w.r.t. ``grad_of``, exactly."""

    def outputs(kw):
        x = kw[grad_of].detach().clone().requires_grad_(True)
        out = fn(**{**kw, grad_of: x})
        flat = _tensors(out)
        g = [torch.randn(t.shape, generator=torch.Generator().manual_seed(7)).to(t) for t in flat if t.requires_grad]
        (dx,) = torch.autograd.grad([t for t in flat if t.requires_grad], x, g)
        return [t.detach() for t in flat] + [dx]

    want = outputs(inputs)
    for pick in [[n] for n in names] + [list(names)]:
        got = outputs({**inputs, **{n: strided(inputs[n]) for n in pick}})
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, atol=0.0, name=f"output {i} with {pick} strided")


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for k, v in sorted(out.items()) if isinstance(v, torch.Tensor)]
    return [t for o in out for t in _tensors(o)]


# ----------------------------------------------------------------------------------------------------
# Strided per-token inputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_strided_labels(backend, entropy, device):
    logits = torch.randn(N, V, device=device) * 2
    labels = torch.randint(0, V, (N,), device=device)
    labels[3] = -100
    fn = lambda logits, labels: logprobs(logits, labels, return_entropy=entropy, temperature=0.9, backend=backend)  # noqa: E731
    same_results(fn, dict(logits=logits, labels=labels), ["labels"], grad_of="logits")
    # 2-D labels whose strided dims merge into one (a column of (B, T, 3) input ids).
    same_results(fn, dict(logits=logits.view(3, 7, V), labels=labels.view(3, 7)), ["labels"], grad_of="logits")


@pytest.mark.parametrize("level", sorted(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_strided_per_token_inputs(backend, level, device):
    batch = ppo_batch(device)
    logits = torch.randn(N, V, device=device) * 2

    def fn(logits, labels, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens):
        return ppo_loss(logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, rollout_logp=rollout_logp,
                        cu_seqlens=cu_seqlens, config=CONFIGS[level], backend=backend)  # fmt: skip

    same_results(fn, dict(logits=logits, **batch), list(batch), grad_of="logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ops_strided_per_token_inputs(backend, device):
    batch = ppo_batch(device)
    hidden, weight = torch.randn(N, H, device=device), torch.randn(V, H, device=device)

    def ppo(hidden, labels, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens):
        return linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, ref_logp=ref_logp,
                               rollout_logp=rollout_logp, cu_seqlens=cu_seqlens, config=CONFIGS["token"], chunk_size=8,
                               backend=backend)  # fmt: skip

    same_results(ppo, dict(hidden=hidden, **batch), list(batch), grad_of="hidden")

    def lp(hidden, labels):
        return linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=8, backend=backend)

    same_results(lp, dict(hidden=hidden, labels=batch["labels"]), ["labels"], grad_of="hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_preference_loss_strided_inputs(backend, device):
    cu = cu_seqlens(device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[cu[:-1]] = -100  # a prompt token at the head of every sequence
    hidden, weight = torch.randn(N, H, device=device), torch.randn(V, H, device=device)
    pairs = torch.tensor([[0, 2], [4, 3]], device=device)  # sequence 1 is empty and unpaired

    def fn(hidden, labels, cu_seqlens, ref_logp_sums):
        loss, metrics = linear_preference_loss(hidden, weight, labels, pairs, cu_seqlens, ref_logp_sums,
                                               config=PreferenceLossConfig("dpo"), chunk_size=8, backend=backend)  # fmt: skip
        return loss, metrics

    inputs = dict(hidden=hidden, labels=labels, cu_seqlens=cu, ref_logp_sums=torch.randn(2, 2, device=device) - 9)
    same_results(fn, inputs, ["labels", "cu_seqlens", "ref_logp_sums"], grad_of="hidden")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_value_loss_strided_inputs(backend, device):
    old = torch.randn(N, device=device)
    inputs = dict(values=old + 0.3 * torch.randn(N, device=device), old_values=old,
                  returns=old + torch.randn(N, device=device), mask=torch.rand(N, device=device) > 0.2,
                  cu_seqlens=cu_seqlens(device))  # fmt: skip

    def fn(values, old_values, returns, mask, cu_seqlens):
        return value_loss(values, old_values, returns, mask, agg="seq-mean-token-mean", cu_seqlens=cu_seqlens,
                          backend=backend)  # fmt: skip

    same_results(fn, inputs, list(inputs), grad_of="values")


def test_ppo_loss_from_logprobs_strided_inputs(device):
    batch = ppo_batch(device)
    del batch["labels"]
    lp = -torch.rand(N, device=device) * 3
    inputs = dict(logp=lp, entropy=torch.rand(N, device=device), **batch)

    def fn(logp, entropy, old_logp, advantages, mask, ref_logp, rollout_logp, cu_seqlens):
        return ppo_loss_from_logprobs(logp, old_logp, advantages, mask, entropy=entropy, ref_logp=ref_logp,
                                      rollout_logp=rollout_logp, cu_seqlens=cu_seqlens, config=CONFIGS["sequence"])  # fmt: skip

    same_results(fn, inputs, [k for k in inputs if k != "logp"], grad_of="logp")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gae_and_reward_shaping_strided_inputs(backend, device):
    cu = cu_seqlens(device)
    rewards, values = torch.randn(N, device=device), torch.randn(N, device=device)
    for offsets in (cu, strided(cu)):
        want = gae(rewards, values, cu, gamma=0.99, lam=0.9, backend=backend)
        for r, v in ((strided(rewards), values), (rewards, strided(values)), (strided(rewards), strided(values))):
            for a, b in zip(gae(r, v, offsets, gamma=0.99, lam=0.9, backend=backend), want):
                assert_close(a, b, atol=0.0, name="gae")
    scores, lp, ref = (
        torch.randn(len(SEQLENS), device=device),
        -torch.rand(N, device=device),
        -torch.rand(N, device=device),
    )
    want = shape_token_rewards(scores, lp, ref, cu, kl_coef=0.1, estimator="k3")
    got = shape_token_rewards(strided(scores), strided(lp), strided(ref), strided(cu), kl_coef=0.1, estimator="k3")
    for a, b in zip(got, want):
        assert_close(a, b, atol=0.0, name="shape_token_rewards")


# ----------------------------------------------------------------------------------------------------
# inplace_backward on logits that are not rows of one buffer
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_on_unmergeable_leading_dims(backend, device):
    """A (4, 3, 2, V) transpose of a (2, 3, 4, V) tensor: its leading dims merge into no fewer than three."""
    base = torch.randn(2, 3, 4, V, device=device) * 2
    logits = base.transpose(0, 2)
    lead = logits.shape[:-1]
    labels = torch.randint(0, V, lead, device=device)
    old, adv = -torch.rand(lead, device=device) * 3, torch.randn(lead, device=device)
    config = PPOLossConfig(entropy_coef=0.01, temperature=0.8)
    g = torch.randn((), device=device)
    x = logits.detach().clone().requires_grad_(True)
    loss, _ = ppo_loss(x, labels, old, adv, config=config, backend=backend)
    (want,) = torch.autograd.grad(loss, x, g)

    buf = base.clone()
    x = buf.transpose(0, 2).requires_grad_(True)
    loss, _ = ppo_loss(x, labels, old, adv, config=config, inplace_backward=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, x, g)
    assert_close(grad, want, atol=1e-7, name="gradient")
    assert_close(buf.transpose(0, 2), want, atol=1e-7, name="the caller's buffer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_overlapping_logits(backend):
    storage = torch.randn(N + V)
    logits = storage.as_strided((N, V), (1, 1))  # row i starts one element after row i - 1
    labels = torch.randint(0, V, (N,))
    with pytest.raises(ValueError, match="inplace_backward=True.*overlap"):
        ppo_loss(logits, labels, torch.zeros(N), torch.ones(N), inplace_backward=True, backend=backend)
    # Sliced (non-dense, not overlapping) logits are fine.
    wide = torch.randn(N, V + 5)
    ppo_loss(wide[:, :V], labels, torch.zeros(N), torch.ones(N), inplace_backward=True, backend=backend)


# ----------------------------------------------------------------------------------------------------
# The device guard
# ----------------------------------------------------------------------------------------------------
class _FakeKernel:
    """Records the device that was current (per the spy) when it was launched."""

    rewrite = None  # the interpreter's marker: ``launch`` accepts it on any device

    def __init__(self, current):
        self.current, self.seen = current, []

    def __getitem__(self, grid):
        return lambda *a, **k: self.seen.append(self.current[-1])


def test_launch_runs_under_the_tensors_device_guard(monkeypatch):
    current = ["cuda:0"]

    class Guard:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(str(self.device))

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", Guard)
    k = _FakeKernel(current)
    utils.launch(k, (1,), torch.device("cuda", 1))
    utils.launch(k, (1,), torch.device("cpu"))
    assert k.seen == ["cuda:1", "cuda:0"]


def test_every_kernel_launch_goes_through_launch():
    """``launch`` is where the guard is: no op file may index a kernel with its grid itself."""
    import re
    from pathlib import Path

    for path in sorted((Path(utils.__file__).parent).glob("*.py")):
        src = path.read_text()
        direct = [m.group(0) for m in re.finditer(r"_kernel\[[^\]]*\]\(", src)]
        assert not direct, f"{path.name} launches {direct} without launch()"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while cuda:0 is current: every Triton op gives what it gives on CPU's torch path."""
    logits = torch.randn(N, V) * 2
    labels = torch.randint(0, V, (N,))
    old, adv = -torch.rand(N) * 3, torch.randn(N)
    want_lp = logprobs(logits, labels, backend="torch")
    want_loss, _ = ppo_loss(logits, labels, old, adv, backend="torch")
    with torch.cuda.device(0):
        on1 = [t.to("cuda:1") for t in (logits, labels, old, adv)]
        lp = logprobs(on1[0], on1[1], backend="triton")
        loss, _ = ppo_loss(*on1, backend="triton")
    assert lp.device == torch.device("cuda:1")
    assert_close(lp.cpu(), want_lp, atol=1e-5, name="logprobs on cuda:1")
    assert_close(loss.cpu(), want_loss, atol=1e-6, name="ppo_loss on cuda:1")
