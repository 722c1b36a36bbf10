"""Mirror Flow Matching (Guan, Balasubramanian & Ma, arXiv 2510.08929) on small domains: training and a reward step.

`train_flow` fits a velocity network by dual-space flow matching (`pipelines.MirrorFlow`, Alg. 1 of the
paper); `dual_policy_gradient_step` fine-tunes it on a reward with a Flow-GRPO-style clipped policy
gradient whose log-probs are those of the SDE steps *in dual coordinates* (rewards are computed on the
primal samples ∇Ψ*(y0)). This is a standalone toy/benchmark path: it is not a `genft.methods.Method`,
because the Trainer's hooks assume prompt-conditioned image pipelines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipelines import MirrorFlow, gaussian_kl

from .advantages import normalize
from .losses import clipped_policy_loss

__all__ = ["DualPGConfig", "VelocityMLP", "corner_box_target", "dirichlet_mixture_target", "dual_policy_gradient_step",
           "edge_box_target", "mmd_rbf", "tail_log_quantile_error", "train_flow"]


class VelocityMLP(nn.Module):
    """v_θ(y, σ) for dual tensors of any shape [B, *shape]: an ELU MLP on (flattened y, σ Fourier features).

    The paper's synthetic experiments use 4 layers of width 128 with ELU; `depth` counts hidden layers.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 4, time_features: int = 4):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or time_features < 0:
            raise ValueError(f"dim, hidden, depth must be >= 1 and time_features >= 0, got {dim}, {hidden}, {depth}, {time_features}")
        self.dim = dim
        self.register_buffer("freqs", math.pi * torch.arange(1, time_features + 1, dtype=torch.float32), persistent=False)
        layers: List[nn.Module] = []
        width = dim + 1 + 2 * time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ELU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat = y.reshape(y.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"y has {flat.shape[1]} features per sample, the model was built for dim={self.dim}")
        s = sigma.reshape(-1, 1).to(flat.dtype)
        feats = torch.cat([flat, s, torch.sin(s * self.freqs), torch.cos(s * self.freqs)], dim=1)
        return self.net(feats).view_as(y)


def train_flow(model: nn.Module, flow: MirrorFlow, data: torch.Tensor, steps: int, batch_size: int = 256, lr: float = 1e-3,
               generator: Optional[torch.Generator] = None, grad_clip: Optional[float] = 1.0,
               cosine: bool = True) -> List[float]:
    """Fit `model` by dual-space flow matching on primal `data` [N, ...] with Adam; returns the per-step losses.

    The data are mapped to the dual once; each step draws a minibatch, σ ~ U(0,1) and z ~ flow.prior.
    `cosine` decays the learning rate to 0 over `steps` (less final-iterate noise than a constant rate).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got steps={steps}, batch_size={batch_size}, lr={lr}")
    dual = flow.mirror.to_dual(data).float()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cosine else None
    losses: List[float] = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, dual.shape[0], (batch_size,), generator=generator)
        loss = flow.loss(model, flow.dual_pair(dual[idx], generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5)) -> float:
    """sqrt(max(0, unbiased MMD²)) between sample sets [N, ...] and [M, ...] under a sum of RBF kernels exp(−‖a−b‖²/(2h²))."""
    a, b = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"x and y need >= 2 samples of equal dimension, got {tuple(x.shape)} and {tuple(y.shape)}")

    def k(p, q):
        d2 = torch.cdist(p, q).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = a.shape[0], b.shape[0]
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    mmd2 = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean())
    return math.sqrt(max(float(mmd2), 0.0))


def tail_log_quantile_error(y: torch.Tensor, y_ref: torch.Tensor, quantiles: Sequence[float] = (0.9, 0.99, 0.999)) -> float:
    """mean_q |log Q_q(|y|) − log Q_q(|y_ref|)| over all coordinates: how well the sample tails match (0 is exact)."""
    q = torch.tensor(list(quantiles), dtype=torch.float64)
    a, b = torch.quantile(y.abs().flatten().double(), q), torch.quantile(y_ref.abs().flatten().double(), q)
    return float((a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()).abs().mean())


# Synthetic convex-domain targets (numpy RNG, so a seed fixes them across torch versions).
def corner_box_target(n: int, seed: int) -> torch.Tensor:
    """[n, 2] in (0,1)²: independent Beta(0.7, 4) coordinates, a blob whose density diverges on two edges."""
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.beta(0.7, 4.0, size=(n, 2)), dtype=torch.float32)


def edge_box_target(n: int, seed: int) -> torch.Tensor:
    """[n, 2] in (0,1)²: a 3-component Beta mixture hugging the left edge, the top edge and a corner."""
    rng = np.random.default_rng(seed)
    comp = rng.choice(3, size=n, p=[0.4, 0.3, 0.3])
    a = np.array([[0.8, 6, 2, 2], [4, 4, 6, 0.8], [6, 0.8, 0.8, 6]])[comp]
    return torch.tensor(np.stack([rng.beta(a[:, 0], a[:, 1]), rng.beta(a[:, 2], a[:, 3])], 1), dtype=torch.float32)


def dirichlet_mixture_target(n: int, seed: int) -> torch.Tensor:
    """[n, 3] on the simplex: ½ Dir(0.6, 0.6, 3) + ½ Dir(4, 1, 0.7) (mass near two vertices and an edge)."""
    rng = np.random.default_rng(seed)
    comp = rng.random(n) < 0.5
    x = np.where(comp[:, None], rng.dirichlet([0.6, 0.6, 3.0], size=n), rng.dirichlet([4.0, 1.0, 0.7], size=n))
    return torch.tensor(x, dtype=torch.float32)


@dataclass
class DualPGConfig:
    """Settings of one dual-space policy-gradient round (defaults follow Flow-GRPO unless noted)."""

    batch_size: int = field(default=64, metadata={"help": "Chains per rollout."})
    num_steps: int = field(default=10, metadata={"help": "SDE steps per chain (Flow-GRPO: 10 for training)."})
    noise_level: float = field(default=0.7, metadata={"help": "a of the Flow-GRPO SDE σ_t = a·sqrt(σ/(1−σ)) (paper default 0.7)."})
    sampler: str = field(default="sde", metadata={"help": "'sde' (Flow-GRPO) or 'cps'."})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip ε (mean-over-dims log-probs)."})
    adv_clip: float = field(default=5.0, metadata={"help": "Advantages are clipped to ±this."})
    kl_weight: float = field(default=0.0, metadata={"help": "β of the per-step KL ‖μ_θ − μ_ref‖²/(2s²) to the reference (Flow-GRPO: 0.01–0.04)."})
    inner_epochs: int = field(default=1, metadata={"help": "Optimiser steps on each rollout (1 = on-policy)."})
    grad_clip: Optional[float] = field(default=1.0, metadata={"help": "Gradient-norm clip (None: off)."})

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_steps", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}: advantages need at least 2 chains")
        for name in ("noise_level", "clip_range", "adv_clip", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.noise_level == 0:
            raise ValueError("noise_level=0 makes the policy deterministic (no log-probs)")
        if self.sampler not in ("sde", "cps"):
            raise ValueError(f"sampler={self.sampler!r} must be 'sde' or 'cps'")


def dual_policy_gradient_step(model: nn.Module, flow: MirrorFlow, reward_fn: Callable[[torch.Tensor], torch.Tensor],
                              optimizer: torch.optim.Optimizer, sample_shape: Sequence[int], config: DualPGConfig = DualPGConfig(),
                              generator: Optional[torch.Generator] = None, reference: Optional[nn.Module] = None) -> Dict[str, float]:
    """One round: SDE rollout in dual space, rewards on the primal samples, clipped policy gradient on dual log-probs.

    Loss per step k: mean_B max(−A·r_k, −A·clip(r_k, 1±ε)) + β·KL_k, averaged over the T steps; r_k is the
    ratio of the re-scored dual step log-prob to the rollout's. `sample_shape` is one primal sample's shape.
    """
    if config.kl_weight > 0 and reference is None:
        raise ValueError("kl_weight > 0 needs a frozen `reference` model")
    traj = flow.rollout(model, (config.batch_size,) + tuple(sample_shape), config.num_steps, generator,
                        noise_level=config.noise_level, sampler=config.sampler)
    rewards = reward_fn(traj.images).float().reshape(-1)
    if rewards.shape[0] != config.batch_size or not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"reward_fn must return {config.batch_size} finite rewards, got shape {tuple(rewards.shape)}")
    adv = normalize(rewards).clamp(-config.adv_clip, config.adv_clip)
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False))}
    model.train()
    for _ in range(config.inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        pg_total = kl_total = 0.0
        for k in range(traj.num_steps):
            step = flow.step_log_prob(model, traj, k)
            loss = clipped_policy_loss(step.log_prob, traj.log_probs[:, k], adv, config.clip_range).mean()
            pg_total += float(loss.detach())
            if config.kl_weight > 0:
                with torch.no_grad():
                    ref_mean = flow.step_log_prob(reference, traj, k).mean
                kl = gaussian_kl(step.mean, ref_mean, step.std).mean()
                kl_total += float(kl.detach())
                loss = loss + config.kl_weight * kl
            (loss / traj.num_steps).backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    model.eval()
    stats.update(policy_loss=pg_total / traj.num_steps, kl=kl_total / traj.num_steps)
    return stats
