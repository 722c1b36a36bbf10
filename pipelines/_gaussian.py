"""Gaussian policy steps: the one log-density helper and KL that every sampler shares."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

Reduce = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class GaussianStep:
    """One stochastic sampler step x_prev ~ N(mean, std² I).

    `prev_sample` is the sample (drawn or given), `mean` the policy mean, `std` the per-sample
    standard deviation (shape [B], broadcastable), `log_prob` the float32 log-density of
    `prev_sample` (shape [B]); `log_prob` is zero where `std` is zero (a deterministic step that
    carries no policy-gradient signal; see `stochastic`).
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None
    model_output: Optional[torch.Tensor] = None

    @property
    def stochastic(self) -> torch.Tensor:
        """Bool [B]: which samples took a genuinely random step (std > 0)."""
        return self.std.reshape(self.std.shape[0], -1)[:, 0] > 0


def _per_sample(std: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a scalar or [B] std to shape [B] in float32."""
    std = torch.as_tensor(std, dtype=torch.float32)
    if std.ndim == 0:
        std = std.expand(batch)
    return std.reshape(batch, -1)[:, 0] if std.numel() != batch else std.reshape(batch)


def _broadcast_std(std: torch.Tensor, like: torch.Tensor):
    """(safe std viewed for broadcasting against `like`, bool [B] mask of std > 0); zero stds become 1."""
    batch = like.shape[0]
    std_b = _per_sample(std, batch).to(like.device)
    stochastic = std_b > 0
    safe = torch.where(stochastic, std_b, torch.ones_like(std_b))
    return safe.view((batch,) + (1,) * (like.ndim - 1)), stochastic


def _reduce(per_elem: torch.Tensor, reduce: Reduce, stochastic: torch.Tensor) -> torch.Tensor:
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    dims = tuple(range(1, per_elem.ndim))
    out = per_elem.mean(dim=dims) if reduce == "mean" else per_elem.sum(dim=dims)
    return torch.where(stochastic, out, torch.zeros_like(out))


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean"
) -> torch.Tensor:
    """Float32 log N(x; mean, std² I) per sample, averaged (default, as published) or summed over non-batch dims.

    `std` is a scalar or a per-sample tensor [B]. Entries with std == 0 return 0 (deterministic step).
    """
    x32 = x.float()
    s, stochastic = _broadcast_std(std, x32)
    per_elem = -0.5 * ((x32 - mean.float()) / s) ** 2 - torch.log(s) - _LOG_SQRT_2PI
    return _reduce(per_elem, reduce, stochastic)


def gaussian_kl(
    mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean"
) -> torch.Tensor:
    """KL(N(mean_a, s²I) ‖ N(mean_b, s²I)) = ‖mean_a − mean_b‖²/(2s²) per sample, in float32.

    `reduce="mean"` averages the per-dimension KL (matching the mean-over-dims log-prob convention).
    Entries with std == 0 return 0.
    """
    a = mean_a.float()
    s, stochastic = _broadcast_std(std, a)
    return _reduce((a - mean_b.float()) ** 2 / (2 * s**2), reduce, stochastic)
