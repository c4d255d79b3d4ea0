"""check_rewards: what a reward callable may return, and the clear errors for everything else."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from fusedrl.engine.rewards import check_rewards
from helpers import assert_close

N = 3
EXPECTED = [1.0, -2.5, 0.0]


@pytest.mark.parametrize(
    "rewards",
    [
        [1, -2.5, 0],
        (1.0, -2.5, 0.0),
        [np.float32(1), np.float64(-2.5), np.int64(0)],
        [torch.tensor(1.0), torch.tensor(-2.5, dtype=torch.float64), np.array(0)],  # 0-d tensors / arrays
        [Fraction(1), Fraction(-5, 2), 0],
        np.array(EXPECTED, dtype=np.float64),
        np.array([1, -2.5, 0], dtype=np.float16),
        np.array(EXPECTED, dtype=object),
        torch.tensor(EXPECTED, dtype=torch.bfloat16),
        torch.tensor(EXPECTED, dtype=torch.float64, requires_grad=True),
        torch.tensor([[1.0, 9.0], [-2.5, 9.0], [0.0, 9.0]])[:, 0],  # a non-contiguous column
    ],
)
def test_accepted_forms_give_float32_of_shape_n(rewards):
    out = check_rewards(rewards, N)
    assert out.dtype == torch.float32 and out.shape == (N,) and out.device.type == "cpu" and not out.requires_grad
    assert_close(out, torch.tensor(EXPECTED), atol=0, name="rewards")


def test_bools_are_zero_and_one():
    # A pass/fail verifier's natural answer: accepted as 1.0 / 0.0 (bool is an int in Python).
    for r in ([True, False, True], np.array([True, False, True]), torch.tensor([True, False, True]),
              [np.bool_(True), False, 1]):  # fmt: skip
        assert check_rewards(r, N).tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "rewards, err, match",
    [
        ("1.0", TypeError, r"reward function must return a sequence of numbers .*3 real numbers.*got str '1.0'"),
        ("abc", TypeError, "got str 'abc'"),
        (b"abc", TypeError, "got bytes"),
        ({"a": 1.0, "b": 2.0, "c": 3.0}, TypeError, "got dict"),
        ({0: 5.0, 1: 6.0, 2: 7.0}, TypeError, "got dict"),  # once read as its keys [0, 1, 2]
        ({1.0, 2.0, 3.0}, TypeError, "got set"),
        ((x for x in EXPECTED), TypeError, "got generator"),
        (None, TypeError, "sequence of numbers.*got NoneType None"),
        (1.0, TypeError, "got float 1.0"),
        ([[1.0], [2.0], [3.0]], TypeError, r"completion 0 is list \[1.0\], not a real number"),
        ([1.0, None, 3.0], TypeError, "completion 1 is NoneType None, not a real number"),
        ([1.0, 2.0, "3.0"], TypeError, "completion 2 is str '3.0', not a real number"),
        ([1.0, 2 + 1j, 3.0], TypeError, r"completion 1 is complex \(2\+1j\)"),
        ([1.0, torch.ones(2), 3.0], TypeError, "completion 1 is Tensor"),
        (np.array(["1", "2", "3"]), TypeError, "<U1 array of shape"),
        (np.array([1, 2, 3], dtype=np.complex64), TypeError, "complex64 array"),
        (np.ones((3, 1)), ValueError, r"float64 array of shape \(3, 1\)"),
        (torch.ones(3, 1), ValueError, r"tensor of shape \(3, 1\)"),
        (torch.tensor(1.0), ValueError, r"tensor of shape \(\)"),
        (torch.ones(3, dtype=torch.complex64), ValueError, "complex64 tensor"),
        ([1.0, 2.0], ValueError, "returned 2 rewards for 3 completions"),
        (np.ones(4), ValueError, "returned 4 rewards for 3 completions"),
        ([1.0, math.nan, 0.0], ValueError, "non-finite reward nan for completion 1"),
        (torch.tensor([0.0, 0.0, -math.inf]), ValueError, "non-finite reward -inf for completion 2"),
    ],
)
def test_refused_forms_name_source_expected_and_given(rewards, err, match):
    with pytest.raises(err, match=match):
        check_rewards(rewards, N)


@pytest.mark.parametrize(
    "rewards",
    [[0.0, 1e39, 0.0], np.array([0.0, 1e39, 0.0]), torch.tensor([0.0, 1e39, 0.0], dtype=torch.float64),
     [0, 10**39, 0], [0.0, np.float64(-1e39), 0.0]],  # fmt: skip
)
def test_finite_in_float64_but_inf_in_float32_is_refused(rewards):
    # 1e39 is finite as a float64 but overflows float32: the loss would turn NaN and AdamW would write NaN weights.
    with pytest.raises(ValueError, match=r"reward function returned reward -?1e\+39 for completion 1 .*'bb'.*float32"):
        check_rewards(rewards, N, completions=["a", "bb", "c"])
    # The largest float32 itself is fine.
    big = float(torch.finfo(torch.float32).max)
    assert check_rewards([0.0, big, -big], N).tolist() == [0.0, big, -big]


def test_python_int_too_large_for_any_float():
    with pytest.raises(ValueError, match="my reward returned reward 1000.* for completion 0, which is too large"):
        check_rewards([10**400, 0, 0], N, source="my reward")
