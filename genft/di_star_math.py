"""Diff-Instruct* math (Luo et al., arXiv 2410.20898; Score Implicit Matching, arXiv 2410.16794), as pure functions.

The regulariser is a score divergence between the generator's noised marginal p_t and the reference
diffusion's q_t,

    D(θ) = ∫ w(t) E_{x_t ~ π_t} [ d(s_{p_θ,t}(x_t) − s_{q,t}(x_t)) ] dt,   d(y) = √(‖y‖² + c²) − c (pseudo-Huber),

where the sampling law π_t is the generator's own marginal held fixed (stop-gradient), as SIM defines
it. Its gradient in θ is intractable (s_p has no closed form), but equals the gradient of the
tractable surrogate (SIM's theorem; derived again in `tests/test_di_star_math.py` on Gaussians)

    L(θ) = ∫ w(t) E_{z, ε} [ −d′(y_t)ᵀ ( s_p(x_t) − ∇_{x_t} log q_t(x_t | x0) ) ] dt,   y_t = s_p(x_t) − s_q(x_t),

with x0 = g_θ(z), x_t = α_t x0 + σ_t ε and ∇ log q_t(x_t|x0) = −ε/σ_t. The score *networks* are
frozen in L, but the gradient must flow through x_t into d′(y_t), s_p and s_q alike; detaching
d′(y_t) gives a different (wrong) gradient. In practice s_p is an online fake-score network.

Every function works in any consistent score units; genft's method passes ε-units (σ_t·score, i.e.
−ε̂), which is the same theory with d_t(y) = d(σ_t y) and w(t) = 1 (per-t choices SIM allows).
"""
from __future__ import annotations

from typing import Optional

import torch


def _flat_norm_sq(y: torch.Tensor) -> torch.Tensor:
    return y.float().flatten(1).pow(2).sum(dim=1)


def pseudo_huber(y: torch.Tensor, c: float) -> torch.Tensor:
    """d(y) = √(‖y‖² + c²) − c per sample (norm over all non-batch dims); ≈ ‖y‖²/(2c) for ‖y‖ ≪ c, ≈ ‖y‖ − c for ‖y‖ ≫ c."""
    if not c > 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    # Written as ‖y‖²/(√(‖y‖²+c²)+c): the same value without cancellation when ‖y‖ ≪ c.
    n2 = _flat_norm_sq(y)
    return n2 / ((n2 + c * c).sqrt() + c)


def pseudo_huber_grad(y: torch.Tensor, c: float) -> torch.Tensor:
    """d′(y) = y / √(‖y‖² + c²), shaped like y (float32); its norm is below 1."""
    if not c > 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    denom = (_flat_norm_sq(y) + c * c).sqrt()
    return y.float() / denom.view(-1, *([1] * (y.ndim - 1)))


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance uncond + scale·(cond − uncond): DI*-IN's reference score (same in ε- or score-units)."""
    return uncond + scale * (cond - uncond)


def eps_to_score(eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Score −ε̂/σ_t of a VP diffusion at noise std σ_t ([B] or scalar)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=eps.device)
    if s.ndim:
        s = s.view(-1, *([1] * (eps.ndim - 1)))
    return -eps.float() / s


def score_divergence(score_p: torch.Tensor, score_q: torch.Tensor, c: float) -> torch.Tensor:
    """The divergence integrand d(s_p − s_q) per sample (pseudo-Huber); a diagnostic, not a trainable loss."""
    return pseudo_huber(score_p - score_q, c)


def score_divergence_surrogate(score_p: torch.Tensor, score_q: torch.Tensor, cond_score: torch.Tensor, c: float,
                               weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DI*'s tractable generator loss per sample: −w·d′(s_p − s_q)ᵀ(s_p − ∇log q_t(x_t|x0)).

    `score_p` (fake score), `score_q` (reference score) and `cond_score` (∇_{x_t} log q_t(x_t|x0), i.e.
    −ε/σ_t) are evaluated at x_t = α_t g_θ(z) + σ_t ε with frozen networks; keep the graph through x_t
    into all three (do not detach) so that the θ-gradient equals that of the divergence.
    """
    y = score_p.float() - score_q.float()
    per = -(pseudo_huber_grad(y, c) * (score_p.float() - cond_score.float())).flatten(1).sum(dim=1)
    if weight is not None:
        per = per * torch.as_tensor(weight, dtype=per.dtype, device=per.device)
    return per


def denoising_score_matching_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The fake-score network's loss ‖ε̂_ψ(x_t) − ε‖² averaged over all elements (ε-parameterised DSM)."""
    return (eps_pred.float() - eps.float()).pow(2).mean()


def sample_timesteps(batch: int, t_min: int, t_max: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Integer diffusion timesteps uniform on [t_min, t_max] (inclusive), int64 [batch] on the CPU."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator)


def vp_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_prod: torch.Tensor):
    """(x_t, α_t, σ_t) with x_t = √ᾱ·x0 + √(1−ᾱ)·ε for per-sample ᾱ [B]; differentiable in x0."""
    a = alpha_prod.float().to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    return alpha * x0.float() + sigma * eps.float(), alpha.flatten(), sigma.flatten()
