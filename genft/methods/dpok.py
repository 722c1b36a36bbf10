"""DPOK (Fan et al., NeurIPS 2023, arXiv 2305.16381): policy gradient over sampler steps with a KL to the base.

Objective: min_θ E[−α·r(x0, c)] + β·Σ_t KL(p_θ(x_{t−1}|x_t,c) ‖ p_pre(x_{t−1}|x_t,c)). Each round's rollout
is pushed into a replay buffer of single transitions; `p_step` policy updates then each draw
`p_batch_size × gradient_accumulation_steps` transitions, re-score them under the current weights,
and minimise −α·A·clip(r) + β·KL_t. Defaults follow the paper's code (ratio clamp 1e-4, per-prompt
advantage normalisation); the KL is the properly σ-weighted Gaussian one unless `kl_form="eps"`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Tuple

import torch

from pipelines import Trajectory, gaussian_kl

from ..advantages import PerPromptStatTracker, group_normalize, normalize
from ..config import ConfigError, option
from ..losses import clipped_policy_loss, eps_kl
from ..train_config import TrainConfig
from ._buffer import TransitionBuffer
from ._value import ValueNet
from .base import Method


@dataclass
class DPOKConfig(TrainConfig):
    """DPOK settings (defaults from the paper's released code unless noted)."""

    reward_weight: float = option(10.0, "α: weight of the policy-gradient (reward) term (paper: 10 single-prompt, 1000 multi-prompt).")
    kl_weight: float = option(0.01, "β: weight of the per-step KL to the frozen pretrained model (paper: 0.01 / 0.1).")
    kl_form: Literal["gaussian", "eps"] = option("gaussian", "'gaussian': ‖μ_θ−μ_ref‖²/(2σ_t²) (the paper's bound); 'eps': the code's unweighted ‖ε_θ−ε_ref‖².")
    kl_warmup: int = option(0, "Rounds before the KL term is switched on.")
    clip_range: float = option(1e-4, "ε of the importance-ratio clip (mean-over-dims log-probs, so ratios sit near 1).")
    ratio_clip: Literal["clamp", "ppo"] = option("clamp", "'clamp': DPOK code's −A·clamp(r) (no gradient outside 1±ε); 'ppo': PPO's pessimistic max.")
    advantage: Literal["per_prompt", "group", "batch", "none"] = option(
        "per_prompt", "'per_prompt': DDPO tracker over each prompt's history; 'group': this round's per-prompt mean/std; 'batch'; 'none' (raw reward)."
    )
    stat_buffer_size: int = option(32, "Per-prompt reward history length for advantage='per_prompt'.")
    stat_min_count: int = option(8, "History needed before a prompt's own statistics replace the batch's.")
    adv_clip_max: float = option(5.0, "Advantages are clipped to ±this.")
    buffer_size: int = option(1000, "Replay buffer capacity in transitions.")
    p_step: int = option(5, "Policy updates (optimiser steps) per round.")
    p_batch_size: int = option(4, "Transitions per minibatch.")
    gradient_accumulation: int = option(12, "Minibatches per optimiser step.")
    train_step_fraction: float = option(1.0, "Fraction of sampler steps (from the noisy end) whose transitions are trained on.")
    detach_uncond: bool = option(False, "Stop gradients through the unconditional CFG branch (Flow-GRPO does; DPOK does not).")
    value_baseline: bool = option(False, "Subtract a learned V(x_t, t, c) from the advantage (DPOK's v_flag).")
    value_lr: float = option(1e-4, "Value-network learning rate.")
    value_steps: int = option(5, "Value-network updates per round.")
    value_batch_size: int = option(256, "Transitions per value-network update.")

    def validate(self) -> None:
        super().validate()
        for name in ["p_step", "p_batch_size", "gradient_accumulation", "buffer_size", "stat_buffer_size", "stat_min_count",
                     "value_steps", "value_batch_size"]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ["reward_weight", "kl_weight", "clip_range", "adv_clip_max", "kl_warmup"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 < self.train_step_fraction <= 1:
            raise ConfigError(f"train_step_fraction={self.train_step_fraction} must be in (0, 1]")
        if self.eta <= 0:
            raise ConfigError(f"eta={self.eta}: DPOK needs a stochastic sampler (eta > 0, the paper uses 1.0)")
        if self.value_lr <= 0:
            raise ConfigError(f"value_lr={self.value_lr} must be > 0")
        if self.advantage == "per_prompt" and self.stat_min_count > self.stat_buffer_size:
            raise ConfigError(f"stat_min_count={self.stat_min_count} cannot exceed stat_buffer_size={self.stat_buffer_size}")


def train_step_indices(stds: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the stochastic steps within the first `fraction` of the trajectory."""
    num = stds.shape[0]
    keep = max(1, int(round(num * fraction)))
    idx = torch.arange(num)[:keep]
    return idx[stds[:keep] > 0]


class DPOK(Method):
    """DPOK as hooks for the Trainer (see module docstring)."""

    name = "dpok"
    families = ("diffusion", "flow", "mirror")  # on flow/mirror models the step is the Flow-GRPO SDE, η is its noise level a
    config_class = DPOKConfig

    def __init__(self, config: DPOKConfig, pipeline, reference_unet: torch.nn.Module):
        super().__init__(config, pipeline, reference_unet)
        self.buffer = TransitionBuffer(config.buffer_size)
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        self.value_net = None
        self.value_optimizer = None
        if config.value_baseline:
            # SDXL/SD3/FLUX embeddings are wider than one text encoder (joined widths, joint-attention dim)
            text_dim = getattr(pipeline, "prompt_embed_dim", None) or pipeline.text_encoder.config.hidden_size
            latent_numel = int(torch.tensor(pipeline.latent_shape).prod())
            self.value_net = ValueNet(latent_numel, text_dim, config.num_inference_steps).to(pipeline.device)
            self.value_optimizer = torch.optim.AdamW(self.value_net.parameters(), lr=config.value_lr)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation

    def advantages(self, rewards: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        c = self.config
        if c.advantage == "per_prompt":
            adv = self.tracker.update(prompts, rewards)
        elif c.advantage == "group":
            adv = group_normalize(rewards, prompts)
        elif c.advantage == "batch":
            adv = normalize(rewards)
        else:
            adv = rewards.float()
        return adv.clamp(-c.adv_clip_max, c.adv_clip_max)

    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        steps = train_step_indices(trajectory.stds, self.config.train_step_fraction)
        if steps.numel() == 0:
            raise ValueError("no stochastic sampler steps to train on: raise eta or train_step_fraction")
        b, s = trajectory.batch_size, steps.numel()
        rows = torch.arange(b).repeat_interleave(s)
        ks = steps.repeat(b)
        lat = trajectory.latents
        neg = trajectory.negative_prompt_embeds
        dev = lat.device
        self.buffer.add(
            sample=lat[rows, ks], prev_sample=lat[rows, ks + 1], timestep=trajectory.timesteps[ks].to(dev),
            step=ks.to(dev), prompt_embeds=trajectory.prompt_embeds[rows],
            negative_prompt_embeds=(neg if neg is not None else trajectory.prompt_embeds)[rows],
            old_log_prob=trajectory.log_probs[rows, ks], advantage=advantages.to(lat.device)[rows],
            **{k: v.to(dev)[rows] for k, v in self.sample_fields(trajectory, rewards).items()},
        )

    def sample_fields(self, trajectory: Trajectory, rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Hook: extra per-sample tensors [B] stored with each of the sample's transitions (GARDO's KL gate)."""
        return {}

    def kl_reduce(self, kl: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Hook: the KL loss term from per-transition KLs [N]: their mean (GARDO gates it)."""
        return kl.mean()

    def minibatches(self, generator: torch.Generator) -> Iterable[Dict[str, torch.Tensor]]:
        for _ in range(self.config.p_step * self.config.gradient_accumulation):
            yield self.buffer.sample(self.config.p_batch_size, generator)

    def _score(self, batch: Dict[str, torch.Tensor], unet=None):
        c = self.config
        neg = batch["negative_prompt_embeds"] if c.guidance_scale > 1.0 else None
        return self.pipeline.score_transition(
            batch["sample"], batch["prev_sample"], batch["timestep"], batch["prompt_embeds"], neg,
            c.guidance_scale, c.eta, c.num_inference_steps, unet=unet, detach_uncond=c.detach_uncond,
        )

    def loss(self, batch: Dict[str, torch.Tensor], round_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        c = self.config
        step = self._score(batch)
        adv = batch["advantage"].to(step.log_prob.device)
        old_log_prob = batch["old_log_prob"].to(step.log_prob.device)
        if self.value_net is not None:
            with torch.no_grad():
                adv = adv - self.value_net(batch["sample"], batch["step"], batch["prompt_embeds"])
        policy = clipped_policy_loss(step.log_prob, old_log_prob, adv, c.clip_range, c.ratio_clip)
        loss = c.reward_weight * policy.mean()
        metrics: Dict[str, float] = {}
        if c.kl_weight > 0 and round_index >= c.kl_warmup:
            with torch.no_grad():
                ref = self._score(batch, unet=self.reference_unet)
            if c.kl_form == "gaussian":
                kl = gaussian_kl(step.mean, ref.mean, step.std)
            else:
                kl = eps_kl(step.model_output, ref.model_output)
            loss = loss + c.kl_weight * self.kl_reduce(kl, batch)
            metrics["kl"] = kl.mean().item()
        ratio = torch.exp(step.log_prob.detach() - old_log_prob)
        metrics.update(
            policy_loss=policy.mean().item(),
            ratio_mean=ratio.mean().item(),
            clip_frac=((ratio - 1).abs() > c.clip_range).float().mean().item(),
        )
        return loss, metrics

    def extra_step(self, round_index: int) -> Dict[str, float]:
        if self.value_net is None:
            return {}
        losses = []
        for _ in range(self.config.value_steps):
            b = self.buffer.sample(self.config.value_batch_size)
            pred = self.value_net(b["sample"], b["step"], b["prompt_embeds"])
            loss = torch.nn.functional.mse_loss(pred, b["advantage"].float())
            self.value_optimizer.zero_grad()
            loss.backward()
            self.value_optimizer.step()
            losses.append(loss.item())
        return {"value_loss": sum(losses) / len(losses)}

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"buffer": self.buffer.state_dict(), "tracker": self.tracker.state_dict()}
        if self.value_net is not None:
            state["value_net"] = self.value_net.state_dict()
            state["value_optimizer"] = self.value_optimizer.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.tracker.load_state_dict(state["tracker"])
        if self.value_net is not None:
            self.value_net.load_state_dict(state["value_net"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])
