"""fusedrl.kernels.linear_ppo_loss: lm_head fused with token log-probs and with the PPO loss, against the
eager reference in float64 (outputs and gradients w.r.t. hidden, weight and bias), against the logits path,
and a peak-memory check that the (N, V) logits are never materialised."""

import importlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import EPS, KERNEL_BACKENDS, assert_close, assert_kernel_close

from fusedrl.kernels import (
    PPOLossConfig,
    linear_logprobs,
    linear_logprobs_ref,
    linear_ppo_loss,
    linear_ppo_loss_ref,
    logprobs_ref,
    ppo_loss,
)

lin_mod = importlib.import_module("fusedrl.kernels.linear_ppo_loss")

# Shapes and dtypes, declared once. (N, V, H) with an odd vocabulary and a chunk size that leaves a
# ragged last chunk; a padded (B, T, H) case; the peak-memory case.
PACKED = (41, 1271, 32)
CHUNK = 16
PADDED = (3, 9, 1000, 24)  # B, T, V, H
MEMORY = (2048, 65536, 64)
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = KERNEL_BACKENDS

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN on skipped rows


def make_lm_head(lead, V, H, dtype, device, *, bias=True):
    hidden = torch.randn(*lead, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, lead, device=device)
    labels = torch.where(torch.rand(lead, device=device) < 0.1, torch.full_like(labels, -100), labels)
    return hidden, weight, b, labels


def grads_of(fn, tensors, dtype64=False):
    """Run fn on fresh leaves (float64 copies for the truth); returns (outputs, grads of the leaves)."""
    leaves = [None if t is None else t.detach().clone().to(torch.float64 if dtype64 else t.dtype).requires_grad_(True)
              for t in tensors]  # fmt: skip
    outs, objective = fn(*leaves)
    grads = torch.autograd.grad(objective, [t for t in leaves if t is not None])
    return outs, grads


def check_grads(kernel, ref_low, truth, dtype, names):
    for g, g_r, g_t, name in zip(kernel, ref_low, truth, names):
        assert g.dtype == dtype, name
        atol = None if dtype == torch.float32 else EPS[dtype] * g_t.abs().max().item() + 1e-7
        assert_kernel_close(g, g_r, g_t, atol=atol, name=name)


# ----------------------------------------------------------------------------------------------------
# linear_logprobs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_matches_float64(backend, dtype, bias, device):
    N, V, H = PACKED
    hidden, weight, b, labels = make_lm_head((N,), V, H, dtype, device, bias=bias)
    g_lp, g_h = torch.randn(N, device=device), torch.randn(N, device=device)

    def make(fn):
        def run(h, w, bb):
            lp, ent = fn(h, w, labels, bias=bb, temperature=0.8, return_entropy=True)
            return (lp.detach(), ent.detach()), (lp * g_lp).sum() + (ent * g_h).sum()

        return run

    fused = make(lambda *a, **k: linear_logprobs(*a, chunk_size=CHUNK, backend=backend, **k))
    (lp, ent), grads = grads_of(fused, (hidden, weight, b))
    (lp_r, ent_r), grads_r = grads_of(make(linear_logprobs_ref), (hidden, weight, b))
    (lp_t, ent_t), grads_t = grads_of(make(linear_logprobs_ref), (hidden, weight, b), dtype64=True)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    assert_kernel_close(lp, lp_r, lp_t, name="logp")
    assert_kernel_close(ent, ent_r, ent_t, name="entropy")
    check_grads(grads, grads_r, grads_t, dtype, ["dhidden", "dweight", "dbias"])
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_padded_hidden_without_entropy(backend, device):
    B, T, V, H = PADDED
    hidden, weight, _, labels = make_lm_head((B, T), V, H, torch.float32, device, bias=False)
    g_lp = torch.randn(B, T, device=device)

    def make(fn):
        def run(h, w):
            lp = fn(h, w, labels)
            return lp.detach(), (lp * g_lp).sum()

        return run

    lp, grads = grads_of(make(lambda *a: linear_logprobs(*a, chunk_size=7, backend=backend)), (hidden, weight))
    lp_r, grads_r = grads_of(make(linear_logprobs_ref), (hidden, weight))
    lp_t, grads_t = grads_of(make(linear_logprobs_ref), (hidden, weight), dtype64=True)
    assert lp.shape == (B, T) and grads[0].shape == hidden.shape
    assert_kernel_close(lp, lp_r, lp_t, name="logp")
    check_grads(grads, grads_r, grads_t, torch.float32, ["dhidden", "dweight"])


# ----------------------------------------------------------------------------------------------------
# linear_ppo_loss
# ----------------------------------------------------------------------------------------------------
def make_ppo_inputs(hidden, weight, b, labels, temperature):
    logp = logprobs_ref(F.linear(hidden.double(), weight.double(), None if b is None else b.double()), labels,
                        temperature=temperature)  # fmt: skip
    lead = labels.shape
    dev = labels.device
    mask = torch.rand(lead, device=dev) > 0.15
    old = (logp + 0.3 * torch.randn(lead, device=dev, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(lead, device=dev, dtype=torch.float64)).float()
    return old, torch.randn(lead, device=dev), mask, ref


CONFIGS = [  # estimator x aggregation x dual clip spread over a few cases
    dict(kl_estimator="k3", agg="token-mean", dual_clip=1.4),
    dict(kl_estimator="k3+", agg="seq-mean-token-mean", dual_clip=None),
    dict(kl_estimator="k2", agg="seq-mean-token-sum", dual_clip=2.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['kl_estimator']}-{c['agg']}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ppo_loss_matches_float64(backend, dtype, cfg, device):
    N, V, H = PACKED
    hidden, weight, b, labels = make_lm_head((N,), V, H, dtype, device)
    config = PPOLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, entropy_coef=0.01, temperature=0.7, **cfg)
    old, adv, mask, ref = make_ppo_inputs(hidden, weight, b, labels, config.temperature)
    cu = torch.tensor([0, 9, 9, 23, 29, 41], device=device)
    g = torch.randn((), device=device)

    def make(fn):
        def run(h, w, bb):
            loss, metrics = fn(h, w, labels, old, adv, mask, bias=bb, ref_logp=ref, config=config, cu_seqlens=cu)
            return (loss.detach(), metrics), loss * g

        return run

    fused = make(lambda *a, **k: linear_ppo_loss(*a, chunk_size=CHUNK, backend=backend, **k))
    (loss, m), grads = grads_of(fused, (hidden, weight, b))
    (loss_r, m_r), grads_r = grads_of(make(linear_ppo_loss_ref), (hidden, weight, b))
    (loss_t, m_t), grads_t = grads_of(make(linear_ppo_loss_ref), (hidden, weight, b), dtype64=True)
    assert_kernel_close(loss, loss_r, loss_t, name="loss")
    for k in m_t:
        assert_kernel_close(m[k], m_r[k], m_t[k], name=k)
    check_grads(grads, grads_r, grads_t, dtype, ["dhidden", "dweight", "dbias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ppo_loss_equals_the_logits_path(backend, device):
    """Same loss, metrics and gradients as ppo_loss on eager logits (float32: only summation order differs)."""
    B, T, V, H = PADDED
    hidden, weight, b, labels = make_lm_head((B, T), V, H, torch.float32, device)
    config = PPOLossConfig(dual_clip=3.0, kl_coef=0.2, kl_estimator="k1", entropy_coef=0.05,
                           agg="seq-mean-token-sum")  # fmt: skip
    old, adv, mask, ref = make_ppo_inputs(hidden, weight, b, labels, config.temperature)
    kw = dict(ref_logp=ref, config=config, backend=backend)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, b)]
        loss, metrics = fn(*leaves)
        return loss, metrics, torch.autograd.grad(loss, leaves)

    fused = run(lambda h, w, bb: linear_ppo_loss(h, w, labels, old, adv, mask, bias=bb, chunk_size=5, **kw))
    eager = run(lambda h, w, bb: ppo_loss(F.linear(h, w, bb), labels, old, adv, mask, **kw))
    assert_close(fused[0], eager[0], atol=1e-6, rtol=1e-5, name="loss")
    for k in eager[1]:
        assert_close(fused[1][k], eager[1][k], atol=1e-6, rtol=1e-5, name=k)
    for g_f, g_e, name in zip(fused[2], eager[2], ["dhidden", "dweight", "dbias"]):
        assert_close(g_f, g_e, atol=1e-6 * g_e.abs().max().item() + 1e-9, name=name)


def test_default_chunking_and_frozen_weight(device):
    """chunk_size=None picks its own chunks; a weight without requires_grad gets no gradient work."""
    N, V, H = PACKED
    hidden, weight, _, labels = make_lm_head((N,), V, H, torch.float32, device, bias=False)
    h = hidden.clone().requires_grad_(True)
    lp = linear_logprobs(h, weight, labels, backend="triton")
    g = torch.randn(N, device=device)
    (dh,) = torch.autograd.grad((lp * g).sum(), h)
    h64 = hidden.double().requires_grad_(True)
    lp64 = linear_logprobs_ref(h64, weight.double(), labels)
    (dh64,) = torch.autograd.grad((lp64 * g).sum(), h64)
    assert_close(lp, lp64, atol=1e-5, name="logp")
    assert_close(dh, dh64, atol=1e-5, name="dhidden")


# ----------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------
_RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from fusedrl.kernels import linear_logprobs, linear_logprobs_ref
    N, V, H = {shape}
    h = torch.randn(N, H, requires_grad=True)
    W = (torch.randn(V, H) / 8).requires_grad_(True)
    labels = torch.randint(0, V, (N,))
    g = torch.randn(N)
    fn = {{"fused": lambda: linear_logprobs(h, W, labels, backend="torch"),
          "naive": lambda: linear_logprobs_ref(h, W, labels)}}[sys.argv[1]]
    def status_kb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    try:  # reset the peak-RSS mark so that start-up peaks (imports, input creation) do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status_kb("VmRSS")
    lp = fn()
    torch.autograd.grad((lp * g).sum(), (h, W))
    # peak RSS since the reset minus the RSS before the call: an upper bound on the call's extra memory.
    print((status_kb("VmHWM") - before) * 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss (Linux)")
def test_linear_logprobs_peak_memory_cpu(tmp_path):
    """N=2048, V=65536: one (N, V) float32 tensor is 512 MiB. Measured here (MALLOC_MMAP_THRESHOLD_ pinned
    so that freed chunks go back to the OS and RSS tracks live memory): fused 59 MiB, eager lm_head +
    reference ("naive") 1546 MiB. The bound is a quarter of one (N, V) float32 tensor."""
    N, V, H = MEMORY
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    script = _RSS_SCRIPT.format(shape=(N, V, H))
    # cwd outside the repository: nothing of the checkout but the installed package is on sys.path.
    out = subprocess.run([sys.executable, "-c", script, "fused"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    one_logits = N * V * 4
    assert extra < one_logits / 4, f"linear_logprobs used {extra / 2**20:.0f} MiB; one (N, V) fp32 is 512 MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_logprobs_peak_memory_cuda():
    N, V, H = MEMORY
    dev = torch.device("cuda")
    hidden, weight, _, labels = make_lm_head((N,), V, H, torch.bfloat16, dev, bias=False)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    g = torch.randn(N, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp = linear_logprobs(h, w, labels, chunk_size=256, backend="triton")
    torch.autograd.grad((lp * g).sum(), (h, w))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # dW in float32 (V x H x 4 = 16 MiB) plus a few chunks of 256 x V bf16 logits (32 MiB each).
    assert extra < N * V * 4 / 4, f"{extra / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    N, V, H = PACKED
    hidden, weight, b, labels = make_lm_head((N,), V, H, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="weight dtype"):
        linear_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs(hidden, weight, labels, bias=b[:-1])
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(hidden[None, None], weight, labels[None, None])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, labels, temperature=0.0)
    bad = labels.clone()
    bad[0] = V
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(hidden, weight, bad)
    old = torch.zeros(N)
    with pytest.raises(ValueError, match="ref_logp"):
        linear_ppo_loss(hidden, weight, labels, old, old, config=PPOLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="advantages"):
        linear_ppo_loss(hidden, weight, labels, old, old[:-1])
    assert lin_mod._chunk_rows(10, V, 64, torch.float32, torch.device("cpu"), None) == 10


# ----------------------------------------------------------------------------------------------------
# Chunking and the CPU torch path's shortcuts (issue 16)
# ----------------------------------------------------------------------------------------------------
def test_chunk_rule_is_hundreds_of_rows_balanced_and_within_budget():
    """The old CPU rule (2M elements / V) gave 13 rows at V=151936: three skinny GEMMs per chunk, each
    streaming the whole weight. The rule now targets 512 rows, caps the float32 chunk at 512 MiB and
    balances the chunks; the GPU rule is 256 MiB of logits in the input dtype, whole 16-row tiles."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    rows = lin_mod._chunk_rows(1024, 151936, 896, torch.float32, cpu, None)
    assert rows == 512
    assert lin_mod._chunk_rows(1000, 151936, 896, torch.float32, cpu, None) == 500  # 2 x 500, not 512 + 488
    assert lin_mod._chunk_rows(1100, 151936, 896, torch.bfloat16, cpu, None) == 367  # 3 x <= 367
    big_v = 1 << 20  # a 1M vocabulary: the memory budget wins
    assert lin_mod._chunk_rows(4096, big_v, 896, torch.float32, cpu, None) * big_v * 4 <= 512 << 20
    assert lin_mod._chunk_rows(7, 151936, 896, torch.float32, cpu, None) == 7
    assert lin_mod._chunk_rows(65536, 151936, 896, torch.bfloat16, cuda, None) == 880
    assert lin_mod._chunk_rows(5, 151936, 896, torch.float32, cpu, 3) == 3  # an explicit chunk_size is kept
    # A small hidden size caps the CPU chunk at H rows (the (c, V) float32 chunk <= the (V, H) head gradient).
    assert lin_mod._chunk_rows(1024, 151936, 64, torch.float32, cpu, None) == 64
    assert lin_mod._chunk_rows(65536, 151936, 64, torch.bfloat16, cuda, None) == 880  # not on GPU


def test_torch_path_default_chunks_match_float64():
    """Several default-size chunks (one logits buffer reused by all, a ragged tail) on the torch path."""
    N, V, H = 600, 1271, 256  # 3 balanced chunks of 200 rows
    assert lin_mod._chunk_rows(N, V, H, torch.float32, torch.device("cpu"), None) == 200
    hidden, weight, b, labels = make_lm_head((N,), V, H, torch.float32, "cpu")
    config = PPOLossConfig(kl_coef=0.1, entropy_coef=0.01, temperature=0.7)
    old, adv, mask, ref = make_ppo_inputs(hidden, weight, b, labels, config.temperature)
    g = torch.randn(())

    def make(fn):
        def run(h, w, bb):
            loss, _ = fn(h, w, labels, old, adv, mask, bias=bb, ref_logp=ref, config=config)
            return loss.detach(), loss * g

        return run

    loss, grads = grads_of(make(lambda *a, **k: linear_ppo_loss(*a, backend="torch", **k)), (hidden, weight, b))
    loss_r, grads_r = grads_of(make(linear_ppo_loss_ref), (hidden, weight, b))
    loss_t, grads_t = grads_of(make(linear_ppo_loss_ref), (hidden, weight, b), dtype64=True)
    assert_kernel_close(loss, loss_r, loss_t, name="loss")
    check_grads(grads, grads_r, grads_t, torch.float32, ["dhidden", "dweight", "dbias"])


def test_masked_rows_add_nothing_not_even_nan():
    """A masked token contributes nothing, whatever its hidden state holds: on the CPU torch path its row
    is skipped before the GEMMs, so a NaN there no longer reaches dW through 0 * NaN (it did before)."""
    N, V, H = PACKED
    hidden, weight, _, labels = make_lm_head((N,), V, H, torch.float32, "cpu", bias=False)
    old, adv = -torch.rand(N) * 5, torch.randn(N)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[2, 7]] = False
    bad = hidden.clone()
    bad[2] = float("nan")
    h, w = bad.requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = linear_ppo_loss(h, w, labels, old, adv, mask, backend="torch")
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert torch.isfinite(loss) and torch.isfinite(dw).all() and torch.isfinite(dh).all()
    assert (dh[[2, 7]] == 0).all()
    # The same as the eager reference on the clean inputs (the masked rows' content is irrelevant).
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss64, metrics64 = linear_ppo_loss_ref(h64, w64, labels, old, adv, mask)
    dh64, dw64 = torch.autograd.grad(loss64, (h64, w64))
    assert_close(loss, loss64, atol=1e-6, name="loss")
    assert_close(dh, dh64, atol=1e-6, name="dhidden")
    assert_close(dw, dw64, atol=1e-6, name="dweight")
    for k in ("clipfrac", "approx_kl", "entropy"):
        assert_close(metrics[k], metrics64[k], atol=1e-6, name=k)


@pytest.mark.parametrize("grad_out", [1.0, 2.5])
def test_linear_ppo_loss_backward_scales_by_grad_out(grad_out):
    """grad_out = 1 hands the stored gradients over as they are (CPU); any other value scales them."""
    N, V, H = PACKED
    hidden, weight, b, labels = make_lm_head((N,), V, H, torch.float32, "cpu")
    old, adv = -torch.rand(N) * 5, torch.randn(N)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    loss, _ = linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, bias=leaves[2], backend="torch")
    grads = torch.autograd.grad(loss, leaves, torch.tensor(grad_out), retain_graph=True)
    again = torch.autograd.grad(loss, leaves, torch.tensor(grad_out))  # the stored gradients are not consumed
    ref = [t.double().requires_grad_(True) for t in (hidden, weight, b)]
    loss64, _ = linear_ppo_loss_ref(ref[0], ref[1], labels, old, adv, bias=ref[2])
    grads64 = torch.autograd.grad(loss64 * grad_out, ref)
    for g, g2, g64, name in zip(grads, again, grads64, ["dhidden", "dweight", "dbias"]):
        assert_close(g, g64, atol=1e-6 * grad_out, name=name)
        assert torch.equal(g, g2), name


def test_dw_accumulation_out_dtype_path_and_its_fallback_warning(monkeypatch):
    """dW += dlogits^T h with bf16 operands: torch.addmm(out_dtype=float32) where the device has it (faked here by
    a recording addmm: CPU torch has no such kernel); where it fails, one warning and the fp32 fallback, same sums."""
    lin = importlib.import_module("fusedrl.kernels.linear_ppo_loss")
    a, b = torch.randn(5, 7).bfloat16(), torch.randn(7, 3).bfloat16()
    want = a.double() @ b.double()
    calls, real = [], torch.addmm

    def fake_addmm(acc, x, y, *, out_dtype=None, out=None):
        calls.append(out_dtype)
        return out.addmm_(x.to(out_dtype), y.to(out_dtype))

    monkeypatch.setattr(lin, "_ADDMM_OUT_DTYPE_DEVICES", ("cpu",))
    monkeypatch.setattr(lin, "_addmm_out_dtype", True)
    monkeypatch.setattr(torch, "addmm", fake_addmm)
    acc = torch.zeros(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin._addmm_acc(acc, a, b)
    assert calls == [torch.float32] and lin._addmm_out_dtype
    assert_close(acc, want, atol=1e-5, name="out_dtype path")

    monkeypatch.setattr(torch, "addmm", real)  # CPU torch: addmm.dtype_out is not implemented
    acc = torch.zeros(5, 3)
    with pytest.warns(RuntimeWarning, match="out_dtype=torch.float32.*unavailable.*several times slower") as rec:
        lin._addmm_acc(acc, a, b)
        lin._addmm_acc(acc, a, b)
    assert len([w for w in rec if "out_dtype" in str(w.message)]) == 1, "warned more than once"
    assert not lin._addmm_out_dtype
    assert_close(acc, 2 * want, atol=1e-5, name="fp32 fallback")
