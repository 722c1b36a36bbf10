"""Flow-GRPO-style group-relative policy gradient (Liu et al., arXiv 2505.05470; `yifan123/flow_grpo`).

Each round samples `samples_per_prompt` images per prompt (a group). The advantage of an image is
its reward minus its group's mean, divided by the group's std (or the whole batch's std, as
Flow-GRPO does), clipped to ±`adv_clip_max`. Every stored step k of the first `timestep_fraction`
of the trajectory is re-scored under the current weights and trained with PPO's clipped surrogate
max(−A·r, −A·clip(r, 1±ε)) plus β·KL, where KL = mean_dims(μ_θ − μ_ref)²/(2σ_k²) is the Gaussian
KL of one step to the frozen reference (Flow-GRPO's form, without Δt). The policy is the Flow-GRPO
SDE on flow models (`noise_level` a, default 0.7) and DDIM with `eta` on diffusion models.

One optimiser step sums the gradients of `gradient_accumulation` sample minibatches × every trained
step, as in Flow-GRPO; with `inner_epochs` = 1 the first minibatch is exactly on-policy (ratio 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Optional, Tuple

import torch

from pipelines import Trajectory, gaussian_kl

from ..advantages import group_normalize
from ..config import ConfigError, option
from ..losses import clipped_policy_loss
from ..train_config import TrainConfig
from .base import Method


@dataclass
class GRPOConfig(TrainConfig):
    """Flow-GRPO settings (defaults from `flow_grpo/config/grpo.py` unless noted)."""

    method: str = option("grpo", "Which finetuner runs: a name from genft.methods.")
    kl_weight: float = option(0.04, "β: weight of the per-step Gaussian KL to the frozen reference (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore; 0 disables).")
    clip_range: float = option(1e-4, "ε of PPO's ratio clip (mean-over-dims log-probs keep ratios within ~1e-4 of 1).")
    adv_clip_max: float = option(5.0, "Advantages are clipped to ±this.")
    global_std: bool = option(True, "Divide group-centred rewards by the whole batch's std (Flow-GRPO) instead of each group's own std.")
    timestep_fraction: float = option(0.99, "Train on the first int(num_inference_steps × this) sampler steps (Flow-GRPO: 0.99, i.e. 9 of 10).")
    train_batch_size: int = option(8, "Samples per minibatch; each minibatch is trained at every trained step.")
    gradient_accumulation: int = option(1, "Sample minibatches per optimiser step (each already sums over the trained steps).")
    inner_epochs: int = option(1, "Passes over each round's samples (Flow-GRPO: 1).")
    noise_level: float = option(0.7, "Flow models only: a of the Flow-GRPO SDE σ_t = a·√(t/(1−t)) (0.7 published; √2 is memoryless). Diffusion models use `eta`.")
    sampler: Literal["sde", "cps"] = option("sde", "Flow models only: 'sde' (Flow-GRPO) or 'cps' (coefficients-preserving sampling, arXiv 2509.05952).")
    detach_uncond: bool = option(True, "Stop gradients through the unconditional CFG branch (Flow-GRPO does).")
    shuffle_timesteps: bool = option(False, "Visit the trained steps of a minibatch in random order (Flow-GRPO: in order).")

    def validate(self) -> None:
        super().validate()
        for name in ["train_batch_size", "gradient_accumulation", "inner_epochs"]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ["kl_weight", "clip_range", "adv_clip_max"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"timestep_fraction={self.timestep_fraction} must be in (0, 1]")
        if self.eta <= 0:
            raise ConfigError(f"eta={self.eta}: GRPO needs a stochastic DDIM policy on diffusion models (eta > 0; 1.0 is DDPM-like)")
        if not self.noise_level > 0:
            raise ConfigError(f"noise_level={self.noise_level}: GRPO needs a stochastic flow SDE (noise_level > 0; Flow-GRPO uses 0.7)")
        if self.sampler == "cps" and self.noise_level > 1:
            raise ConfigError(f"noise_level={self.noise_level} must lie in (0, 1] with sampler='cps' (the noise angle is a·π/2); e.g. 0.8")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt={self.samples_per_prompt}: group-relative advantages need >= 2 samples per prompt")
        per_step = self.train_batch_size * self.gradient_accumulation
        if self.rollout_batch_size % per_step:
            raise ConfigError(f"prompts_per_round*samples_per_prompt={self.rollout_batch_size} must be a multiple of "
                              f"train_batch_size*gradient_accumulation={per_step}, so no gradient is left over; change one of them")

    @property
    def num_train_steps(self) -> int:
        """How many sampler steps (from the noise end) are trained."""
        return max(1, int(self.num_inference_steps * self.timestep_fraction))


def group_advantages(rewards: torch.Tensor, prompts: List[str], global_std: bool, clip: float) -> torch.Tensor:
    """Flow-GRPO's advantage: (r − mean_group)/(std + 1e-4), std of the group or of the batch, clipped to ±clip."""
    return group_normalize(rewards, prompts, eps=1e-4, global_std=global_std).clamp(-clip, clip)


class GRPO(Method):
    """Flow-GRPO as hooks for the Trainer (see module docstring).

    Subclasses (GARDO) may override `kl_reduce` (how per-sample KLs become the loss term) and
    `sample_fields` (extra per-sample tensors that travel with each minibatch).
    """

    name = "grpo"
    families = ("diffusion", "flow")
    config_class = GRPOConfig

    def __init__(self, config: GRPOConfig, pipeline, reference_unet: torch.nn.Module):
        super().__init__(config, pipeline, reference_unet)
        self.trajectory: Optional[Trajectory] = None
        self.fields: Dict[str, torch.Tensor] = {}
        self.train_steps: Optional[torch.Tensor] = None

    @property
    def family(self) -> str:
        return getattr(self.pipeline, "family", "diffusion")

    def rollout_kwargs(self) -> Dict[str, Any]:
        if self.family == "flow":
            return {"noise_level": self.config.noise_level, "sampler": self.config.sampler}
        return {"eta": self.config.eta}

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation * self.config.num_train_steps

    def advantages(self, rewards: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        c = self.config
        return group_advantages(rewards, prompts, c.global_std, c.adv_clip_max)

    def sample_fields(self, trajectory: Trajectory, rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Extra per-sample tensors [B] stored with the round (none for plain GRPO)."""
        return {}

    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        n = self.config.num_train_steps
        if n > trajectory.num_steps:
            raise ValueError(f"timestep_fraction selects {n} steps but the rollout has {trajectory.num_steps}")
        if not bool((trajectory.stds[:n] > 0).all()):
            raise ValueError(f"steps {(trajectory.stds[:n] <= 0).nonzero().flatten().tolist()} of the rollout are deterministic; "
                             "GRPO trains only stochastic steps: raise eta/noise_level or lower timestep_fraction")
        self.trajectory = trajectory
        self.train_steps = torch.arange(n)
        self.fields = {"advantage": advantages.float().cpu(), **{k: v.cpu() for k, v in self.sample_fields(trajectory, rewards).items()}}

    def minibatches(self, generator: torch.Generator) -> Iterable[Dict[str, Any]]:
        if self.trajectory is None:
            raise ValueError("no rollout collected yet; call collect first")
        c = self.config
        b = self.trajectory.batch_size
        for _ in range(c.inner_epochs):
            perm = torch.randperm(b, generator=generator)
            for start in range(0, b, c.train_batch_size):
                idx = perm[start:start + c.train_batch_size]
                steps = self.train_steps[torch.randperm(len(self.train_steps), generator=generator)] if c.shuffle_timesteps else self.train_steps
                for k in steps.tolist():
                    yield {"index": idx, "step": k, **{name: v[idx] for name, v in self.fields.items()}}

    def kl_reduce(self, kl: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        """The KL loss term from per-sample KLs [B]: their mean (GARDO gates it)."""
        return kl.mean()

    def _kl(self, step, sub: Trajectory, k: int) -> torch.Tensor:
        with torch.no_grad():
            ref = self.pipeline.rescore(sub, k, unet=self.reference_unet)
        return gaussian_kl(step.mean, ref.mean, step.std)

    def loss(self, batch: Dict[str, Any], round_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        c = self.config
        sub = self.trajectory.select(batch["index"])
        k = int(batch["step"])
        step = self.pipeline.rescore(sub, k, detach_uncond=c.detach_uncond)
        old_log_prob = sub.log_probs[:, k].to(step.log_prob.device)
        adv = batch["advantage"].to(step.log_prob.device)
        policy = clipped_policy_loss(step.log_prob, old_log_prob, adv, c.clip_range, "ppo")
        loss = policy.mean()
        metrics: Dict[str, float] = {}
        if c.kl_weight > 0:
            kl = self._kl(step, sub, k)
            kl_term = self.kl_reduce(kl, batch)
            loss = loss + c.kl_weight * kl_term
            metrics.update(kl=kl.mean().item(), kl_term=kl_term.item())
        log_ratio = step.log_prob.detach() - old_log_prob
        ratio = torch.exp(log_ratio)
        metrics.update(policy_loss=policy.mean().item(), ratio_mean=ratio.mean().item(),
                       clip_frac=((ratio - 1).abs() > c.clip_range).float().mean().item(),
                       approx_kl=0.5 * log_ratio.pow(2).mean().item())
        return loss, metrics

    def state_dict(self) -> Dict[str, Any]:
        return {}  # on-policy: nothing outlives a round

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass
