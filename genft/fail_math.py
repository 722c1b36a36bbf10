"""Pure loss math of FAIL (Ma et al., arXiv 2602.12155): GAIL discriminator and rewards, FPO ratios, one-step reconstruction.

Conventions: D(x) = sigmoid(logit) is the probability that x is an expert image; flow matching as in
`pipelines._flow_step` (x_σ = (1−σ)x0 + σε, v = ε − x0, σ = 1 is noise). No models, no loops.
"""
from __future__ import annotations

from typing import Dict, List, Literal, Sequence, Tuple

import torch
import torch.nn.functional as F

from .losses import clipped_policy_loss

RewardForm = Literal["gail", "airl", "log_d"]
REWARD_FORMS = ("gail", "airl", "log_d")


def discriminator_loss(expert_logits: torch.Tensor, generated_logits: torch.Tensor) -> torch.Tensor:
    """GAIL's BCE with logits: mean −log D(expert) + mean −log(1 − D(generated)) (scalar)."""
    return F.softplus(-expert_logits.float()).mean() + F.softplus(generated_logits.float()).mean()


def gradient_penalty(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """R1 penalty mean ‖∇_x logit(x)‖² over the batch; `images` must require grad and `logits` come from them."""
    (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss per sample, −log D(x) = softplus(−logit) (FAIL-PD's BCE(D(x̂), 1))."""
    return F.softplus(-logits.float())


def gail_reward(logits: torch.Tensor, form: RewardForm = "gail") -> torch.Tensor:
    """Per-sample imitation reward from discriminator logits.

    "gail": −log(1 − D) = softplus(logit), FAIL's released code (R = −log D_gen with D_gen = 1 − D).
    "airl": log D − log(1 − D) = logit. "log_d": log D = −softplus(−logit).
    """
    x = logits.float()
    if form == "gail":
        return F.softplus(x)
    if form == "airl":
        return x
    if form == "log_d":
        return -F.softplus(-x)
    raise ValueError(f"reward form must be one of {REWARD_FORMS}, got {form!r}")


def prompt_groups(prompts: Sequence[str]) -> Tuple[List[str], torch.Tensor]:
    """(distinct prompts in first-seen order, group index of each sample [B] int64)."""
    order: Dict[str, int] = {}
    for p in prompts:
        order.setdefault(p, len(order))
    return list(order), torch.tensor([order[p] for p in prompts], dtype=torch.long)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, expert_rewards: torch.Tensor | None = None,
                     eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor | None]:
    """Group-normalised advantages (r − mean_g)/(std_g + eps), the expert of each group counted in its statistics.

    `rewards` [B] of generated samples, `groups` [B] in 0..G−1, `expert_rewards` [G] (one expert
    sample per group, or None). Population std as FAIL's code. Returns (advantages [B], expert
    advantages [G] or None).
    """
    r = rewards.float()
    num_groups = int(groups.max().item()) + 1 if groups.numel() else 0
    if expert_rewards is not None and expert_rewards.shape != (num_groups,):
        raise ValueError(f"expert_rewards must hold one reward per group ({num_groups}), got shape {tuple(expert_rewards.shape)}")
    adv = torch.empty_like(r)
    expert_adv = torch.empty(num_groups, dtype=torch.float32, device=r.device) if expert_rewards is not None else None
    for g in range(num_groups):
        idx = (groups == g).nonzero().flatten().to(r.device)
        members = r[idx]
        if expert_rewards is not None:
            members = torch.cat([members, expert_rewards[g : g + 1].float().to(r.device)])
        mean, std = members.mean(), members.std(unbiased=False)
        adv[idx] = (r[idx] - mean) / (std + eps)
        if expert_adv is not None:
            expert_adv[g] = (expert_rewards[g].float() - mean) / (std + eps)
    return adv, expert_adv


def cfm_losses(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Conditional flow-matching loss per (sample, pair): mean over dims ‖v − (ε − x0)‖²; shapes [N, ...] -> [N]."""
    return (velocity.float() - (noise.float() - x0.float())).pow(2).flatten(1).mean(1)


def fpo_log_ratio(loss_old: torch.Tensor, loss_new: torch.Tensor, clamp: float = 3.0) -> torch.Tensor:
    """FPO's log π_θ/π_old surrogate L_old − L_new, clamped to ±`clamp` (FAIL's code uses 3)."""
    return (loss_old.float() - loss_new.float()).clamp(-clamp, clamp)


def fpo_policy_loss(loss_old: torch.Tensor, loss_new: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                    clamp: float = 3.0) -> torch.Tensor:
    """PPO's clipped surrogate max(−A·ρ, −A·clip(ρ, 1±ε)) per sample with the FPO ratio ρ = exp(L_old − L_new)."""
    log_ratio = fpo_log_ratio(loss_old, loss_new, clamp)
    return clipped_policy_loss(log_ratio, torch.zeros_like(log_ratio), advantages, clip_range, "ppo")


def one_step_reconstruction(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                            velocity: torch.Tensor) -> torch.Tensor:
    """FAIL-PD's released-code estimate of x0 from one Euler step of the re-noised sample.

    x_σ = (1−σ)x0 + σε, x_σ' = x_σ + (σ' − σ)·v, x̂0 = (x_σ' − σ'ε)/(1 − σ'); equal to
    x0 + (σ' − σ)/(1 − σ')·(v − (ε − x0)), so the gradient reaches θ only through v. σ, σ' are [B].
    """
    view = (-1,) + (1,) * (x0.ndim - 1)
    s, sn = sigma.float().view(view), sigma_next.float().view(view)
    x_t = (1 - s) * x0.float() + s * noise.float()
    x_next = x_t + (sn - s) * velocity.float()
    return (x_next - sn * noise.float()) / (1 - sn)


def velocity_kl(velocity: torch.Tensor, reference_velocity: torch.Tensor) -> torch.Tensor:
    """FAIL's KL surrogate to the reference: mean over dims (v_θ − v_ref)² per sample."""
    return (velocity.float() - reference_velocity.float()).pow(2).flatten(1).mean(1)
