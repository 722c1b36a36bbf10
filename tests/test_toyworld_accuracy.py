"""The oracle-accuracy evaluation reward: 1 for real composed images of the prompt, 0 for a mismatched prompt."""
import torch

import reward_models
from genft.toyworld import ToyOracleAccuracy, caption, render, train_combos


def test_accuracy_reward_on_real_images_and_mismatched_prompts():
    import genft  # noqa: F401 - registers the toy rewards by name

    combos = train_combos()[:40]
    images = render(combos, generator=torch.Generator().manual_seed(0))
    reward = reward_models.load("toy_oracle_accuracy")
    assert isinstance(reward, ToyOracleAccuracy)
    right = reward(images, [caption(*c) for c in combos])
    assert right.shape == (40,) and set(right.unique().tolist()) <= {0.0, 1.0}
    assert right.mean() >= 0.85
    wrong = reward(images, [caption((c.digit + 1) % 10, c.fg, c.bg) for c in combos])
    assert wrong.mean() <= 0.15
