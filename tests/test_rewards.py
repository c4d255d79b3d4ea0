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
    [
        [0.0, 1e39, 0.0],
        np.array([0.0, 1e39, 0.0]),
        torch.tensor([0.0, 1e39, 0.0], dtype=torch.float64),
        [0, 10**39, 0],
        [0.0, np.float64(-1e39), 0.0],
    ],  # fmt: skip
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


# ----------------------------------------------------------------------------------------------------
# Verifiable rewards on real-looking completions
# ----------------------------------------------------------------------------------------------------
from fusedrl.engine.rewards import (  # noqa: E402
    BUILTIN_REWARDS,
    answers_match,
    combine,
    extract_answer,
    format_reward,
    length_penalty,
    load_reward_fn,
    math_answer,
    parse_number,
)

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72")  # fmt: skip


@pytest.mark.parametrize(
    "text, answer",
    [
        (GSM8K_SOLUTION, "72"),
        ("Let me think. 3 apples plus 4 apples is 7 apples.\n#### 7\n\nHope that helps!", "7"),
        (r"We get $x = \frac{1}{2}$, so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"First \boxed{3}, no wait: \boxed{\sqrt{x^{2}+1}}", r"\sqrt{x^{2}+1}"),  # the last, nested braces
        ("She pays 3 * $12 = $36, then gets $4 back, so she spent $32.", "32"),
        ("The total is 1,234.50 dollars.", "1,234.50"),
        ("The temperature dropped to -3.", "-3"),
        ("About 2.5e3 people came.", "2.5e3"),
        ("I am not sure how to solve this.", None),
        (r"unclosed \boxed{12", "12"),  # an unclosed box falls through to the last number
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "a, b, same",
    [("72", "72.0", True), ("$1,234.50", "1234.5", True), ("0.5", r"\frac{1}{2}", True), ("3/4", "0.75", True),
     ("25%", "25", True), ("72.", "72", True), ("71", "72", False), ("-3", "3", False),
     (r"\text{Tuesday}", "tuesday", True), ("x+1", "x + 1", False), (None, "1", False), ("1", None, False)],
)  # fmt: skip
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same


def test_parse_number_refuses_non_numbers():
    for s in ["", "abc", "1,2,3", "1/0", "--1", "e5", "."]:
        assert parse_number(s) is None, s
    assert parse_number("1e-3") == Fraction(1, 1000)


def test_math_answer_against_a_gsm8k_column():
    completions = [
        "48 / 2 = 24 in May, 48 + 24 = 72 total.\n#### 72",
        r"So she sold \boxed{72} clips.",
        "She sold 70 clips.",
        "I don't know.",
    ]
    assert math_answer([""] * 4, completions, answer=[GSM8K_SOLUTION] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert math_answer(["", ""], ["#### 3", "#### 3"], answer=[3, "3"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"one reference per completion \(2\), got 1"):
        math_answer(["", ""], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="answer must be a list"):
        math_answer([""], ["1"], answer="1")


def test_format_reward():
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"
    completions = [
        "<think>24 + 48 = 72\nso 72</think>\n<answer>72</answer>",  # spans lines
        "  <think>short</think><answer>1</answer>\n",  # surrounding space is ignored
        "<answer>72</answer>",
        "<think>x</think><answer>1</answer> and some trailing chatter",
    ]
    assert format_reward([""] * 4, completions, pattern=pattern) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward([""] * 4, completions, pattern=r"<answer>\d+</answer>", full_match=False) == [1.0] * 4
    with pytest.raises(ValueError, match="not a valid regular expression"):
        format_reward([""], ["x"], pattern="(")


def test_length_penalty():
    completions = ["a" * n for n in (0, 60, 75, 90, 100, 250)]
    assert length_penalty([""] * 6, completions, max_length=100, buffer=40, penalty=0.5) == \
        [0.0, 0.0, -0.5 * 15 / 40, -0.5 * 30 / 40, -0.5, -0.5]  # fmt: skip
    assert length_penalty([""] * 2, ["a" * 75, "a" * 76], max_length=100) == [0.0, -1 / 25]  # buffer = 25
    assert length_penalty([""] * 2, ["a" * 100, "a" * 101], max_length=100, buffer=0) == [0.0, -1.0]
    for kw, match in [(dict(max_length=0), "max_length"), (dict(max_length=10, buffer=11), "buffer"),
                      (dict(max_length=10, penalty=-1.0), "penalty")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            length_penalty([""], ["a"], **kw)


def test_builtins_load_by_name_and_combine():
    assert {"math_answer", "format_reward", "length_penalty"} <= set(BUILTIN_REWARDS)
    fmt = load_reward_fn("format_reward", pattern=r".*#### \d+")
    total = combine(math_answer, (0.5, fmt), (2.0, load_reward_fn("length_penalty", max_length=12, buffer=0)))
    out = total(["", "", ""], ["so #### 72", "so #### 71", "a long answer, #### 72"], answer=["72", "72", "72"])
    assert out == [1.5, 0.5, 1.5 - 2.0]
