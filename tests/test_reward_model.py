"""fusedrl.engine.reward_model: the Bradley-Terry loss against hand-computed values and a float64
reference (forward and backward with a random upstream gradient), its gradient signs, bad input, padded
scoring against the engine's packed scoring, and a tiny reward model learning a separable preference."""

import math
import random

import pytest
import torch
from helpers import EPS, assert_close

from fusedrl.engine.attention import use_packed_attention
from fusedrl.engine.heads import score_packed
from fusedrl.engine.models import build_reward_model
from fusedrl.engine.reward_model import (
    PreferencePair,
    RewardModelConfig,
    bradley_terry_loss,
    encode_sequences,
    pairwise_accuracy,
    score_sequences,
    train_reward_model,
)
from fusedrl.engine.tokenizer import build_char_tokenizer

# Shapes and dtypes, declared once.
LOSS_SHAPES = [(1,), (37,), (4, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHARS = "0123456789:"


def _bt_truth(r_c, r_r):
    """The textbook formula in float64: -log(sigmoid(r_c - r_r))."""
    return -torch.log(torch.sigmoid(r_c.double() - r_r.double()))


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(CHARS)


def test_bt_loss_hand_computed():
    r_c = torch.tensor([2.0, 0.0, -1.0, 3.5])
    r_r = torch.tensor([1.0, 0.0, 1.0, -0.5])
    # -log sigmoid(m) = log(1 + exp(-m)) for margins m = 1, 0, -2, 4
    expected = torch.tensor([math.log1p(math.exp(-m)) for m in (1.0, 0.0, -2.0, 4.0)])
    assert_close(bradley_terry_loss(r_c, r_r, reduction="none"), expected, atol=1e-6, name="loss none")
    assert_close(bradley_terry_loss(r_c, r_r), expected.mean(), atol=1e-6, name="loss mean")
    assert_close(bradley_terry_loss(r_c, r_r, reduction="sum"), expected.sum(), atol=1e-6, name="loss sum")
    # Only the margin matters: shifting both rewards changes nothing.
    assert_close(bradley_terry_loss(r_c + 7.0, r_r + 7.0, reduction="none"), expected, atol=1e-5, name="shift")


@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bt_loss_forward_backward_vs_float64(shape, dtype):
    r_c = (torch.randn(shape) * 3).to(dtype)
    r_r = (torch.randn(shape) * 3).to(dtype)
    g = torch.randn(shape)

    def run(fn, a, b):
        a = a.detach().requires_grad_(True)
        b = b.detach().requires_grad_(True)
        out = fn(a, b)
        (out * g.to(out.dtype)).sum().backward()
        return out.detach(), a.grad, b.grad

    got = run(lambda a, b: bradley_terry_loss(a, b, reduction="none"), r_c, r_r)
    truth = run(_bt_truth, r_c.double(), r_r.double())
    assert got[0].dtype == torch.float32, "the loss is computed in float32 at least"
    # The inputs are exactly representable in float64, so the loss differs by float32 arithmetic only; the
    # gradients are returned in the input dtype, so they carry one rounding to it (EPS: its unit roundoff).
    assert_close(got[0], truth[0], atol=1e-5 * max(1.0, truth[0].abs().max().item()), name="loss")
    for a, b, name in zip(got[1:], truth[1:], ("d r_chosen", "d r_rejected")):
        assert a.dtype == dtype, f"{name} must come back in the input dtype"
        assert_close(a, b, atol=1e-6, rtol=EPS[dtype] + 1e-6, name=name)


def test_bt_loss_gradient_signs():
    r_c = torch.randn(64, requires_grad=True)
    r_r = torch.randn(64, requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    # Descent raises the chosen reward and lowers the rejected one, by sigmoid(r_r - r_c) / B each.
    assert bool((r_c.grad < 0).all()) and bool((r_r.grad > 0).all())
    expected = torch.sigmoid(r_r.detach() - r_c.detach()) / 64
    assert_close(-r_c.grad, expected, atol=1e-7, name="grad chosen")
    assert_close(r_r.grad, expected, atol=1e-7, name="grad rejected")


def test_bt_loss_extreme_margins_are_finite():
    r_c = torch.tensor([200.0, -200.0], requires_grad=True)
    r_r = torch.tensor([-200.0, 200.0], requires_grad=True)
    loss = bradley_terry_loss(r_c, r_r, reduction="none")
    assert_close(loss.detach(), torch.tensor([0.0, 400.0]), atol=1e-4, name="extreme loss")
    loss.sum().backward()
    assert torch.isfinite(r_c.grad).all() and torch.isfinite(r_r.grad).all()
    assert_close(r_c.grad, torch.tensor([0.0, -1.0]), atol=1e-6, name="extreme grad")


def test_bt_loss_bad_input():
    with pytest.raises(ValueError, match="r_chosen and r_rejected must have the same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(TypeError, match="r_rejected must be a floating-point"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="r_chosen must be a floating-point"):
        bradley_terry_loss([1.0], torch.zeros(1))
    with pytest.raises(ValueError, match="reduction must be one of"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), reduction="max")


def _random_texts(rng, n, lo=1, hi=9, digits="0123456789"):
    return ["".join(rng.choices(digits, k=rng.randint(lo, hi))) for _ in range(n)]


def test_scores_padding_free_and_match_packed_scoring(tok):
    """Right-padded scoring (used to train the RM) equals the engine's packed scoring (used by PPO)."""
    rng = random.Random(0)
    rm = build_reward_model("tiny-llama", vocab_size=len(tok), seed=3, pad_token_id=tok.pad_token_id)
    prompts = [p + ":" for p in _random_texts(rng, 7, 1, 5)]
    comps = _random_texts(rng, 7, 0, 8)
    batched = score_sequences(rm, tok, prompts, comps, batch_size=3)
    alone = torch.cat([score_sequences(rm, tok, [p], [c]) for p, c in zip(prompts, comps)])
    assert_close(batched, alone, atol=1e-5, name="padded vs one at a time")

    ids, mask = encode_sequences(tok, prompts, comps)
    lens = mask.sum(1)
    assert bool((ids[torch.arange(len(ids)), lens - 1] == tok.eos_token_id).all()), "every sequence ends in eos"
    packed = torch.cat([ids[i, : lens[i]] for i in range(len(ids))])[None]
    pos = torch.cat([torch.arange(int(n)) for n in lens])[None]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    use_packed_attention(rm)
    with torch.no_grad():
        engine = score_packed(rm, packed, pos, cu)
    assert_close(batched, engine, atol=1e-5, name="padded vs packed")


def test_train_reward_model_learns_separable_preference(tok):
    """Chosen completions are made of high digits, rejected ones of low digits: a tiny RM must separate
    held-out pairs almost perfectly after training, and must not before it (the test can fail)."""
    rng = random.Random(1)

    def pairs(n):
        prompts = [p + ":" for p in _random_texts(rng, n, 2, 5)]
        return [PreferencePair(p, c, r) for p, c, r in
                zip(prompts, _random_texts(rng, n, 2, 6, "56789"), _random_texts(rng, n, 2, 6, "01234"))]  # fmt: skip

    train, held_out = pairs(256), pairs(128)
    rm = build_reward_model("tiny-llama", vocab_size=len(tok), seed=5, pad_token_id=tok.pad_token_id)
    before = pairwise_accuracy(rm, held_out, tokenizer=tok)
    losses = train_reward_model(rm, train, tokenizer=tok, config=RewardModelConfig(epochs=4, batch_size=32, lr=3e-3),
                                progress=False)  # fmt: skip
    after = pairwise_accuracy(rm, held_out, tokenizer=tok)
    assert len(losses) == 4 * 8
    assert before < 0.9, f"an untrained RM should not already separate the pairs, got {before}"
    assert after >= 0.95, f"held-out accuracy {after} after training (loss {losses[0]:.3f} -> {losses[-1]:.3f})"
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    # Swapping chosen and rejected flips every decision: accuracy becomes 1 - accuracy.
    swapped = [PreferencePair(p.prompt, p.rejected, p.chosen) for p in held_out]
    assert abs(pairwise_accuracy(rm, swapped, tokenizer=tok) - (1 - after)) < 1e-6


def test_pairwise_accuracy_counts_ties_half(tok):
    rm = build_reward_model("tiny-llama", vocab_size=len(tok), seed=2, pad_token_id=tok.pad_token_id)
    same = [PreferencePair("12:", "345", "345"), ("7:", "0", "0")]  # tuples are accepted too
    assert pairwise_accuracy(rm, same, tokenizer=tok) == 0.5


def test_reward_model_bad_input(tok):
    rm = build_reward_model("tiny-llama", vocab_size=len(tok), seed=2, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="pairs must not be empty"):
        train_reward_model(rm, [], tokenizer=tok, progress=False)
    with pytest.raises(TypeError, match=r"pairs\[1\] must be a PreferencePair"):
        pairwise_accuracy(rm, [("1:", "2", "3"), ("1:", "2")], tokenizer=tok)
    with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
        train_reward_model(rm, [("1:", "2", "3")], tokenizer=tok, config=RewardModelConfig(epochs=0), progress=False)
    other = build_reward_model("tiny-llama", vocab_size=len(tok), seed=2, pad_token_id=5)
    with pytest.raises(ValueError, match="pad_token_id must equal tokenizer.pad_token_id"):
        score_sequences(other, tok, ["1:"], ["2"])
    with pytest.raises(ValueError, match="prompts and completions must have the same length"):
        encode_sequences(tok, ["1:", "2:"], ["3"])


def test_sft_and_reward_model_configs_compose_the_shared_optimizer():
    """train_sft / train_reward_model keep their setting names (lr, grad_clip, seed, ...), which live in the
    optimizer and run parts every objective shares and are validated there; the configs stay frozen."""
    import dataclasses

    from fusedrl.engine.config import OptimConfig, RunConfig
    from fusedrl.engine.sft import SFTConfig

    s = SFTConfig(steps=7, lr=5e-3, grad_clip=0.5, warmup_steps=2, weight_decay=0.1, seed=3)
    assert isinstance(s.optim, OptimConfig) and isinstance(s.run, RunConfig)
    assert (s.optim.learning_rate, s.optim.max_grad_norm, s.optim.warmup_steps, s.optim.weight_decay,
            s.optim.lr_schedule, s.run.seed) == (5e-3, 0.5, 2, 0.1, "cosine", 3)  # fmt: skip
    assert (s.lr, s.grad_clip, s.warmup_steps, s.seed, s.steps) == (5e-3, 0.5, 2, 3, 7)
    assert (SFTConfig().lr, SFTConfig().warmup_steps, SFTConfig().grad_clip) == (3e-3, 20, 1.0)  # the defaults kept
    r = RewardModelConfig(epochs=3, lr=2e-3, weight_decay=0.0, seed=4)
    assert (r.optim.learning_rate, r.optim.weight_decay, r.run.seed, r.epochs) == (2e-3, 0.0, 4, 3)
    assert (RewardModelConfig().lr, RewardModelConfig().weight_decay, RewardModelConfig().grad_clip) == (
        1e-3,
        0.01,
        1.0,
    )
    with pytest.raises(ValueError, match="OptimConfig.learning_rate must be a number > 0"):
        SFTConfig(lr=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'warmup_steps'"):
        RewardModelConfig(warmup_steps=3)  # its warmup is 10% of the steps
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_dir'"):
        SFTConfig(output_dir="x")  # train_sft writes nothing
    for cfg in (s, r):
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.lr = 1.0
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.batch_size = 1
    assert dataclasses.replace(s, lr=1e-2).lr == 1e-2 and s.lr == 5e-3
