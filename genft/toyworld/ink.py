"""A deliberately mis-specified bonus: how much of the image is painted in the prompt's stroke colour.

It stands in for the biases real proxies carry (aesthetic predictors that prefer saturated, bold
images; a hand-added "colour match" term). On clean renders it agrees with the truth: a legible digit
in the right colour scores more than a wrong colour. A generator can raise it without bound by
thickening strokes into a blob, which destroys the digit and the background the oracle reads.
Added to `toy_proxy_clip` it makes the proxy hackable on the toy world's budget
(`scripts/gardo_toyworld.py --ink-weight`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from reward_models import RewardModel

from .data import COLORS, PALETTE, parse_prompt

#: Colour-match width: palette entries are ≥ 0.6 apart in RGB, so a pixel within ~0.15 is that colour.
INK_SIGMA = 0.15


def ink_coverage(images: torch.Tensor, stroke_rgb: torch.Tensor, sigma: float = INK_SIGMA) -> torch.Tensor:
    """Mean over pixels of exp(-‖pixel − stroke colour‖² / 2σ²): [B,3,H,W] images and [B,3] colours -> [B] in [0,1]."""
    d2 = ((images - stroke_rgb[:, :, None, None]) ** 2).sum(1)
    return torch.exp(-d2 / (2 * sigma**2)).flatten(1).mean(1)


class ToyInkReward(RewardModel):
    """Fraction of the image in the prompt's stroke colour (soft); differentiable. Hackable by design: see the module."""

    name = "toy_ink"
    supports_grad = True

    def __init__(self, sigma: float = INK_SIGMA, **kwargs):
        if not sigma > 0:
            raise ValueError(f"sigma={sigma} must be > 0 (the colour-match width in RGB units, e.g. {INK_SIGMA})")
        super().__init__(**kwargs)
        self.sigma = float(sigma)
        self.palette = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """One score per image in [0,1]; prompts must be captions of the toy world."""
        fg = torch.tensor([COLORS.index(parse_prompt(p).fg) for p in prompts], dtype=torch.long)
        stroke = self.palette[fg].to(device=images.device, dtype=images.dtype)
        return ink_coverage(images, stroke, self.sigma)
