"""The oracle's hard verdict as an evaluation reward: 1 when digit, stroke and background colour all match the prompt."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from reward_models import RewardModel

from .oracle import OracleEvaluator


class ToyOracleAccuracy(RewardModel):
    """Per-image all-attributes correctness (0 or 1); its mean is the oracle accuracy. For evaluation, not training."""

    name = "toy_oracle_accuracy"
    differentiable = False

    def __init__(self, oracle: Optional[OracleEvaluator] = None, **kwargs):
        super().__init__(**kwargs)
        self.oracle = oracle if oracle is not None else OracleEvaluator()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.oracle.evaluate(images, prompts)["all_correct"].float().to(images.device)
