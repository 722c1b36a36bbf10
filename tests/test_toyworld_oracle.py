"""The toy world's oracle evaluator and the soft ToyOracleReward, on real composed images."""
import random

import pytest
import torch

from genft.toyworld import OracleEvaluator, ToyOracleReward
from genft.toyworld.data import COLORS, Combo, caption, real_digits, render, sample_batch
from reward_models._base import RewardModel


@pytest.fixture(scope="module")
def oracle():
    return OracleEvaluator()


@pytest.fixture(scope="module")
def heldout_digit_split():
    """An oracle fitted on a random 2/3 of the real digits, plus the other third as test images."""
    images, labels = real_digits()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    fit, test = perm[:1200], perm[1200:]
    return OracleEvaluator(fit_indices=fit.tolist()), test, images, labels


def test_oracle_matches_classifier_on_real_digits(heldout_digit_split):
    oracle, test, images, labels = heldout_digit_split
    raw = torch.from_numpy(oracle.classifier.predict(images[test].reshape(len(test), -1).numpy() * 16.0))
    raw_acc = (raw == labels[test]).float().mean().item()
    rng = random.Random(0)
    combos = [Combo(int(d), *rng.sample(COLORS, 2)) for d in labels[test]]
    x = render(combos, generator=torch.Generator().manual_seed(1), augment=True, indices=test)
    result = oracle.evaluate(x, [caption(*c) for c in combos])
    assert result["fg_acc"] == 1.0 and result["bg_acc"] == 1.0
    assert result["digit_acc"] >= 0.95
    assert abs(result["digit_acc"] - raw_acc) <= 0.02  # composing and reading back loses (almost) nothing


def test_evaluate_reports_per_attribute_and_per_sample(oracle):
    x, combos = sample_batch(64, torch.Generator().manual_seed(2), split="all")
    prompts = [caption(*c) for c in combos]
    r = oracle.evaluate(x, prompts)
    assert r["n"] == 64
    for name in ("digit", "fg", "bg", "all"):
        assert 0.0 <= r[f"{name}_acc"] <= 1.0
        assert r[f"{name}_correct"].shape == (64,) and r[f"{name}_correct"].dtype == torch.bool
    assert torch.equal(r["all_correct"], r["digit_correct"] & r["fg_correct"] & r["bg_correct"])
    assert r["all_acc"] >= 0.9
    # swapping the colours in the prompts makes both colour attributes wrong everywhere
    swapped = oracle.evaluate(x, [caption(c.digit, c.bg, c.fg) for c in combos])
    assert swapped["fg_acc"] == 0.0 and swapped["bg_acc"] == 0.0
    assert torch.equal(swapped["digit_correct"], r["digit_correct"])


def test_predict_reads_uniform_images_as_background(oracle):
    x = torch.tensor([0.15, 0.25, 0.95]).view(1, 3, 1, 1).expand(2, 3, 16, 16).clone()
    pred = oracle.predict(x)
    assert pred.bg == ["blue", "blue"]
    assert pred.digit_probs.shape == (2, 10) and torch.allclose(pred.digit_probs.sum(-1), torch.ones(2))


def test_oracle_rejects_bad_input(oracle):
    with pytest.raises(ValueError, match=r"\[B,3,16,16\]"):
        oracle.predict(torch.rand(2, 3, 32, 32))
    with pytest.raises(TypeError):
        oracle.predict(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a caption"):
        oracle.evaluate(torch.rand(1, 3, 16, 16), ["a cat"])
    with pytest.raises(ValueError, match="prompts"):
        oracle.evaluate(torch.rand(2, 3, 16, 16), ["a red 1 on a blue background"])


def test_reward_shape_range_and_determinism(oracle):
    reward = ToyOracleReward(oracle)
    assert isinstance(reward, RewardModel) and reward.name == "toy_oracle" and not reward.differentiable
    x, combos = sample_batch(32, torch.Generator().manual_seed(4), split="heldout")
    prompts = [caption(*c) for c in combos]
    r = reward(x, prompts)
    assert r.shape == (32,) and r.dtype == torch.float32
    assert (r >= 0).all() and (r <= 1).all()
    assert torch.equal(r, reward(x, prompts))
    assert torch.equal(r, ToyOracleReward()(x, prompts))  # a fresh instance scores identically
    assert r.mean() > 0.85


def test_reward_prefers_matching_prompts(oracle):
    reward = ToyOracleReward(oracle)
    x, combos = sample_batch(32, torch.Generator().manual_seed(5), split="all", augment=False)
    right = reward(x, [caption(*c) for c in combos])
    wrong_digit = reward(x, [caption((c.digit + 1) % 10, c.fg, c.bg) for c in combos])
    wrong_colours = reward(x, [caption(c.digit, c.bg, c.fg) for c in combos])
    assert (right > wrong_digit).float().mean() >= 0.9
    assert (right > wrong_colours).all()
    assert wrong_colours.max() < 0.4  # only the digit term can still score
