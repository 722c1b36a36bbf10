"""The reward protocol: images in [0,1] and prompts in, a float32 score per image out."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

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
    if not all(isinstance(p, str) for p in prompts):
        bad = next(type(p).__name__ for p in prompts if not isinstance(p, str))
        raise TypeError(f"every prompt must be a str, got a {bad}")


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
        raise RewardError(f"reward {name!r} returned non-finite values at batch indices {idx}: {rewards.detach()[bad].tolist()}")
    return rewards


DeviceLike = Union[str, torch.device, None]


class RewardModel(torch.nn.Module):
    """Base class for rewards: subclasses implement `score(images, prompts) -> Tensor[B]`.

    Calling the model validates inputs, moves images to the reward's device and dtype, scores them in
    chunks of at most `batch_size`, and returns float32 [B] on the caller's device.

    - `differentiable=True` keeps the autograd graph so gradients reach the input images (first-order
      methods need it); only classes with `supports_grad = True` accept it.
    - `device`/`dtype`: where and in what precision the reward runs (None: follow the images / float32).
    - `batch_size`: largest chunk scored at once (None: the whole batch), to bound reward memory.
    """

    name: str = "reward"
    supports_grad: bool = False
    differentiable: bool = False

    def __init__(self, *, device: DeviceLike = None, dtype: Optional[torch.dtype] = None,
                 batch_size: Optional[int] = None, differentiable: bool = False):
        super().__init__()
        if differentiable and not self.supports_grad:
            raise ValueError(f"reward {self.name!r} has no differentiable mode (differentiable=True); "
                             "use a policy-gradient method (e.g. DPOK) with it, or pick a differentiable reward")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.differentiable = bool(differentiable)
        self.reward_device = torch.device(device) if device is not None else None
        self.reward_dtype = dtype
        self.batch_size = batch_size

    def place(self) -> "RewardModel":
        """Move this reward's parameters to its configured device/dtype (subclasses call it after building)."""
        if self.reward_device is not None:
            self.to(self.reward_device)
        if self.reward_dtype is not None:
            self.to(self.reward_dtype)
        return self

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def _score_chunk(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        dev = self.reward_device or images.device
        x = images.to(device=dev, dtype=self.reward_dtype or torch.float32)
        out = self.score(x, prompts)
        if not isinstance(out, torch.Tensor):
            return out  # check_rewards names the problem
        return out.to(images.device)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # type: ignore[override]
        check_images(images, prompts)
        prompts = list(prompts)
        n = images.shape[0]
        step = self.batch_size or max(n, 1)
        grad = self.differentiable and torch.is_grad_enabled()
        chunks = []
        with torch.set_grad_enabled(grad):
            src = images if grad else images.detach()
            for i in range(0, n, step):
                out = self._score_chunk(src[i:i + step], prompts[i:i + step])
                chunks.append(check_rewards(out, min(step, n - i), self.name))
        if not chunks:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
