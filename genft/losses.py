"""Pure loss math for the policy-gradient finetuners (no models, no loops): tested against closed forms."""
from __future__ import annotations

from typing import Literal

import torch

RatioClip = Literal["clamp", "ppo"]


def importance_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """π_θ/π_old per transition from float32 log-probs."""
    return torch.exp(log_prob.float() - old_log_prob.float())


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    mode: RatioClip = "ppo",
) -> torch.Tensor:
    """Per-transition surrogate loss to minimise.

    mode="ppo": max(−A·r, −A·clip(r, 1±ε)) (DDPO, Flow-GRPO).
    mode="clamp": −A·clamp(r, 1±ε), DPOK's released code: no gradient once r leaves the band.
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    ratio = importance_ratio(log_prob, old_log_prob)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    adv = advantages.float()
    if mode == "ppo":
        return torch.maximum(-adv * ratio, -adv * clipped)
    if mode == "clamp":
        return -adv * clipped
    raise ValueError(f"mode must be 'ppo' or 'clamp', got {mode!r}")


def eps_kl(model_output: torch.Tensor, ref_output: torch.Tensor) -> torch.Tensor:
    """DPOK code's unweighted per-step regulariser mean_dims (ε_θ − ε_ref)² per sample."""
    diff = model_output.float() - ref_output.float()
    return diff.pow(2).flatten(1).mean(1)
