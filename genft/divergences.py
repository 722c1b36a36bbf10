"""f-divergences between two Gaussians with the same isotropic covariance, N(μ1, s²I) vs N(μ2, s²I), per sample.

Every such divergence is a function of δ = ‖μ1 − μ2‖²/s² alone (the likelihood ratio only varies
along μ1 − μ2), so each closed form below takes δ from `pipelines.gaussian_kl`:
  KL = reverse KL = δ/2, Jeffreys = δ, squared Hellinger = 1 − e^{−δ/8},
  total variation = erf(√δ / (2√2)), χ² = e^δ − 1;  Jensen–Shannon has no closed form (Monte Carlo).
`reduce="sum"` uses the exact δ of the full distributions. `reduce="mean"` (the default, matching
the mean-over-dims log-prob convention of every published sampler) uses δ/D, i.e. the divergence
between 1-D Gaussians whose squared mean gap is the per-dimension average; for KL this is exactly
the per-dimension mean KL. Entries whose std is 0 (deterministic steps) are 0. All math is float32
unless the means are float64.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Literal, Optional

import torch

from pipelines import gaussian_kl

Divergence = Literal["kl", "reverse_kl", "jeffreys", "hellinger", "tv", "chi2", "js"]
Reduce = Literal["mean", "sum"]


def mean_gap(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean") -> torch.Tensor:
    """δ = ‖μ_a − μ_b‖²/s² per sample ([B]); divided by the dimension D when `reduce="mean"`."""
    if mean_a.dtype == torch.float64:  # keep double precision for gradient checks (gaussian_kl works in float32)
        view = (-1,) + (1,) * (mean_a.ndim - 1)
        s = torch.as_tensor(std, dtype=torch.float64, device=mean_a.device)
        s = s.expand(mean_a.shape[0]) if s.ndim == 0 else s.reshape(-1)
        on = s > 0
        safe = torch.where(on, s, torch.ones_like(s)).view(view)
        per = ((mean_a - mean_b) / safe).pow(2).flatten(1)
        d = per.mean(1) if reduce == "mean" else per.sum(1)
        return torch.where(on, d, torch.zeros_like(d))
    return 2.0 * gaussian_kl(mean_a, mean_b, std, reduce=reduce)


def kl(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean") -> torch.Tensor:
    """KL(N(μ_a, s²I) ‖ N(μ_b, s²I)) = δ/2."""
    return 0.5 * mean_gap(mean_a, mean_b, std, reduce)


def reverse_kl(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean") -> torch.Tensor:
    """KL(N(μ_b, s²I) ‖ N(μ_a, s²I)) = δ/2 (equal to KL for equal covariances; kept as its own name for configs)."""
    return 0.5 * mean_gap(mean_b, mean_a, std, reduce)


def jeffreys(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean") -> torch.Tensor:
    """Jeffreys divergence KL(P‖Q) + KL(Q‖P) = δ."""
    return mean_gap(mean_a, mean_b, std, reduce)


def squared_hellinger(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean") -> torch.Tensor:
    """H²(P, Q) = 1 − ∫√(pq) = 1 − exp(−δ/8), in [0, 1)."""
    return -torch.expm1(-mean_gap(mean_a, mean_b, std, reduce) / 8.0)


def total_variation(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean") -> torch.Tensor:
    """TV(P, Q) = ½∫|p − q| = erf(√δ / (2√2)), in [0, 1).

    √δ is taken of δ clamped at 1e-30, whose gradient is 0 below it: at equal means the gradient is 0, not NaN.
    """
    d = mean_gap(mean_a, mean_b, std, reduce)
    return torch.erf(d.clamp(min=1e-30).sqrt() / (2.0 * math.sqrt(2.0))) * (d > 0)


def chi_squared(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean") -> torch.Tensor:
    """Pearson χ²(P ‖ Q) = ∫p²/q − 1 = e^δ − 1 (symmetric here; overflows to inf for δ ≳ 88 in float32)."""
    return torch.expm1(mean_gap(mean_a, mean_b, std, reduce))


def _js_of_gap(gap: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """JS between N(0,1) and N(g,1) per entry of `gap` [B] from standard normals `z` [N] (reparameterised)."""
    g = gap[:, None]
    x_p = z[None, :]  # samples of N(0, 1)
    x_q = g + z[None, :]  # samples of N(g, 1)
    llr_p = 0.5 * g * g - g * x_p  # log p − log q at x_p
    llr_q = g * x_q - 0.5 * g * g  # log q − log p at x_q
    # log p − log m = log 2 − softplus(log q − log p), m = (p + q)/2; likewise for q.
    kl_pm = math.log(2.0) - torch.nn.functional.softplus(-llr_p)
    kl_qm = math.log(2.0) - torch.nn.functional.softplus(-llr_q)
    return 0.5 * (kl_pm.mean(1) + kl_qm.mean(1))


def js_normals(num_samples: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`num_samples` antithetic standard normals (z and −z) on the CPU for `jensen_shannon`."""
    if num_samples < 2 or num_samples % 2:
        raise ValueError(f"num_samples must be an even number >= 2 (antithetic pairs), got {num_samples}")
    half = torch.randn(num_samples // 2, generator=generator, dtype=dtype)
    return torch.cat([half, -half])


def jensen_shannon(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor, reduce: Reduce = "mean", *,
                   generator: Optional[torch.Generator] = None, num_samples: int = 256,
                   normals: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Jensen–Shannon divergence ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2, in nats (≤ log 2), by Monte Carlo.

    The estimate runs in one dimension, along μ_a − μ_b (exact reduction: the other directions cancel),
    with `num_samples` antithetic standard normals from `generator` (or the given 1-D `normals`, e.g. to
    repeat an estimate exactly under gradient checkpointing); it is differentiable in the means
    (reparameterised) and unbiased for the divergence at √δ.
    """
    d = mean_gap(mean_a, mean_b, std, reduce)
    gap = d.clamp(min=1e-30).sqrt() * (d > 0)
    z = normals if normals is not None else js_normals(num_samples, generator, d.dtype)
    return _js_of_gap(gap, z.to(d.device, d.dtype))


CLOSED_FORMS: Dict[str, Callable[..., torch.Tensor]] = {
    "kl": kl, "reverse_kl": reverse_kl, "jeffreys": jeffreys, "hellinger": squared_hellinger,
    "tv": total_variation, "chi2": chi_squared,
}
DIVERGENCES = tuple(CLOSED_FORMS) + ("js",)


def gaussian_divergence(name: Divergence, mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor,
                        reduce: Reduce = "mean", *, generator: Optional[torch.Generator] = None,
                        num_samples: int = 256, normals: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The divergence `name` (one of DIVERGENCES) between N(μ_a, s²I) and N(μ_b, s²I), per sample [B].

    `generator`, `num_samples` and `normals` only matter for the Monte-Carlo "js".
    """
    if name == "js":
        return jensen_shannon(mean_a, mean_b, std, reduce, generator=generator, num_samples=num_samples, normals=normals)
    if name not in CLOSED_FORMS:
        raise ValueError(f"divergence {name!r} is unknown; choose one of {', '.join(DIVERGENCES)}")
    return CLOSED_FORMS[name](mean_a, mean_b, std, reduce)
