"""The reward protocol: images in [0,1] and prompts in, a float32 score per image out."""
from __future__ import annotations

from typing import Sequence

import torch


class RewardError(ValueError):
    """A reward model returned something the trainer cannot use (wrong shape, non-finite)."""


def check_images(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Refuse inputs that are not a float [B,3,H,W] batch in [0,1] with one prompt per image."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B,3,H,W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor in [0,1], got dtype {images.dtype}; divide uint8 by 255")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, one per image, not a single string")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")


def check_rewards(rewards: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """Return `rewards` as float32 [B], or raise naming the reward and what was wrong."""
    if not isinstance(rewards, torch.Tensor):
        raise RewardError(f"reward {name!r} returned {type(rewards).__name__}; it must return a tensor of shape [{batch_size}]")
    if rewards.shape != (batch_size,):
        raise RewardError(f"reward {name!r} returned shape {tuple(rewards.shape)}; expected [{batch_size}] (one score per image)")
    rewards = rewards.float()
    bad = ~torch.isfinite(rewards)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise RewardError(f"reward {name!r} returned non-finite values at batch indices {idx}: {rewards[bad].tolist()}")
    return rewards


class RewardModel(torch.nn.Module):
    """Base class for rewards: subclasses implement `score(images, prompts) -> Tensor[B]`.

    Calling the model validates inputs and outputs. `differentiable` says whether gradients
    w.r.t. the input images are meaningful (first-order methods require it).
    """

    name: str = "reward"
    differentiable: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # type: ignore[override]
        check_images(images, prompts)
        if self.differentiable and images.requires_grad:
            out = self.score(images, list(prompts))
        else:
            with torch.no_grad():
                out = self.score(images.detach(), list(prompts))
        return check_rewards(out, images.shape[0], self.name)
