"""`toy_ink`, the deliberately hackable bonus: its closed form, and that a blob beats a legible digit (the hack)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import reward_models
from genft.toyworld.data import PALETTE, caption, render, train_combos
from genft.toyworld.ink import INK_SIGMA, ToyInkReward, ink_coverage


def test_closed_form_per_pixel():
    red = torch.tensor(PALETTE["red"])
    img = red[:, None, None].expand(3, 4, 4).clone()
    img[:, 0, 0] = red + torch.tensor([0.1, 0.0, 0.0])  # one pixel 0.1 away from the stroke colour
    want = (15 + math.exp(-0.01 / (2 * INK_SIGMA**2))) / 16
    assert_close(ink_coverage(img[None], red[None]), torch.tensor([want]), rtol=1e-6, atol=1e-6)


def test_reads_the_stroke_colour_from_the_prompt_and_is_differentiable():
    reward = reward_models.load("toy_ink", differentiable=True)
    assert isinstance(reward, ToyInkReward)
    blue = torch.tensor(PALETTE["blue"])[:, None, None].expand(3, 16, 16)[None].clone().requires_grad_(True)
    scores = reward(torch.cat([blue, blue]), ["a blue 3 on a red background", "a red 3 on a blue background"])
    assert_close(scores.detach(), torch.tensor([1.0, math.exp(-((torch.tensor(PALETTE["blue"]) - torch.tensor(PALETTE["red"])) ** 2).sum().item() / (2 * INK_SIGMA**2))]))
    scores.sum().backward()
    assert blue.grad is not None and torch.isfinite(blue.grad).all()
    with pytest.raises(ValueError, match="sigma=0 must be > 0"):
        ToyInkReward(sigma=0)


def test_thickening_the_strokes_raises_it_while_the_oracle_loses_the_digit():
    """The hack the proxy invites: bolder, blob-like digits score more ink and less oracle accuracy."""
    combos = train_combos()[::5]
    images = render(combos, torch.Generator().manual_seed(0))
    prompts = [caption(*c) for c in combos]
    ink, acc = reward_models.load("toy_ink"), reward_models.load("toy_oracle_accuracy")
    fg = torch.tensor([PALETTE[c.fg] for c in combos])[:, :, None, None]
    mask = torch.exp(-((images - fg) ** 2).sum(1, keepdim=True) / (2 * INK_SIGMA**2))
    for _ in range(4):
        mask = F.max_pool2d(mask, 3, 1, 1)
    blobs = images * (1 - mask) + fg * mask
    assert ink(blobs, prompts).mean() > ink(images, prompts).mean() + 0.1
    assert acc(blobs, prompts).mean() < acc(images, prompts).mean() - 0.3
