"""The one comparison helper every test uses: max / mean error and the first bad index on failure."""

from __future__ import annotations

import time

import pytest
import torch

# The kernel backends every op test runs: Triton (the interpreter on CPU), backend="torch" (on CPU float32 /
# bfloat16 logits the native loops of csrc/cpu_rows) and backend="torch" with those loops switched off, so that
# the chunked torch ops are checked too (conftest.py reads the marker).
TORCH_OPS = pytest.param("torch", marks=pytest.mark.torch_ops, id="torch-ops")
KERNEL_BACKENDS = ["triton", "torch", TORCH_OPS]

# Per-dtype scale for atol in three-way comparisons: about one rounding step of the dtype.
EPS = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 1e-12}


def _describe(diff: torch.Tensor, bad: torch.Tensor, actual, expected) -> str:
    flat_bad = bad.flatten().nonzero()
    first = int(flat_bad[0]) if flat_bad.numel() else -1
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), diff.shape)) if first >= 0 else ()
    finite = diff[torch.isfinite(diff)]
    return (
        f"max err {finite.max().item() if finite.numel() else float('nan'):.3e}, "
        f"mean err {finite.mean().item() if finite.numel() else float('nan'):.3e}, "
        f"{int(bad.sum())} of {diff.numel()} bad, first bad index {idx}: "
        f"actual {actual.flatten()[first].item() if first >= 0 else None!r} "
        f"expected {expected.flatten()[first].item() if first >= 0 else None!r}"
    )


def assert_close(actual, expected, *, atol=1e-6, rtol=0.0, name="tensor"):
    """|actual - expected| <= atol + rtol * |expected| everywhere, NaN/inf only where expected has them."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nonfinite_mismatch = (~torch.isfinite(actual) | ~torch.isfinite(expected)) & ~(
        (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    )
    diff = (actual - expected).abs()
    bad = nonfinite_mismatch | (diff > atol + rtol * expected.abs())
    bad &= ~((actual == expected) | (torch.isnan(actual) & torch.isnan(expected)))
    if bool(bad.any()):
        raise AssertionError(f"{name}: " + _describe(diff, bad, actual, expected))


def assert_kernel_close(kernel, ref_low, truth, *, atol=None, name="tensor", factor=2.0):
    """Three-way check: err(kernel) <= factor * err(same-dtype reference) + atol, errors against the
    float64 truth. The default atol is ~ten rounding steps of float32 times the truth's scale."""
    kernel = torch.as_tensor(kernel).detach().double().cpu()
    ref_low = torch.as_tensor(ref_low).detach().double().cpu()
    truth = torch.as_tensor(truth).detach().double().cpu()
    assert kernel.shape == truth.shape == ref_low.shape, (
        f"{name}: shapes kernel {tuple(kernel.shape)} ref {tuple(ref_low.shape)} truth {tuple(truth.shape)}"
    )
    scale = truth.abs().max().item() if truth.numel() else 1.0
    if atol is None:
        atol = 1e-5 * max(scale, 1.0)
    assert torch.isfinite(truth).all(), f"{name}: float64 truth has non-finite values"
    assert torch.isfinite(kernel).all(), f"{name}: kernel output has non-finite values"
    err_ref = (ref_low - truth).abs().max().item() if truth.numel() else 0.0
    bound = factor * err_ref + atol
    assert_close(kernel, truth, atol=bound, name=f"{name} (bound {factor}*err_ref {err_ref:.3e} + atol {atol:.1e})")


def distinct_chars(prompts, completions):
    """A reward that differs between samples of one prompt from the very first step (module-level: a producer
    process gets it by pickling)."""
    return [float(len(set(c))) for c in completions]


class Echo:
    """A text environment answering " ok " twice, then ending the episode at the third turn; its reward is the
    number of turns. A row's ``delay`` (seconds) is slept before the first answer (a remote environment), so that
    re-admitted turns reach the engine in a timing-dependent order."""

    def reset(self, **row):
        self.turns, self.delay = 0, row.get("delay", 0.0)

    def step(self, completion: str) -> str | None:
        if self.turns == 0 and self.delay:
            time.sleep(self.delay)
        self.turns += 1
        return None if self.turns >= 3 else " ok "

    def get_reward(self) -> float:
        return float(self.turns)


class OneTurn:
    """A text environment that ends every episode after the policy's first turn (and owns no reward)."""

    def reset(self, **row):
        return None

    def step(self, completion):
        return None
