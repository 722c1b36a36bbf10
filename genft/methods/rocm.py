"""ROCM: RLHF on consistency models by direct reward optimisation (Shekhar and Zhang, arXiv 2503.06171).

The multistep consistency sampler is a reparameterised map of its noises: x_{n+1} = √ᾱ_{n+1}·f_θ(x_n, t_n)
+ √(1−ᾱ_{n+1})·z_n, output f_θ(x_N, t_N). ROCM holds the initial noise and every z_n fixed (here: those of
the Trainer's rollout), re-runs the trajectory differentiably and maximises

    reward_weight · r(decode(x_out), c)  −  β · Σ_n D(π_θ(·|x_n) ‖ π_ref(·|x_n))

with first-order gradients through the whole trajectory, where D is an f-divergence between the
policy's and the frozen reference's Gaussian transitions (`genft.divergences`; both share the
schedule's variance). Gradients also reach x_n inside each divergence term. Each step runs under
`torch.utils.checkpoint`, so activation memory is one step's, not steps × activations.

No reference code was found (algorithms.md §5); the formulation is derived from the abstract and
RLCM's sampler, and the defaults marked [unverified] are ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Optional, Tuple, Union

import torch
from torch.utils.checkpoint import checkpoint

from pipelines import Trajectory, lcm_prev_timesteps, lcm_step

from ..config import ConfigError, option
from ..divergences import DIVERGENCES, gaussian_divergence, js_normals
from ..train_config import TrainConfig
from .base import Method


@dataclass
class ROCMConfig(TrainConfig):
    """ROCM settings (arXiv 2503.06171). Its sampler is RLCM's: LCM multistep with noise injection, 4–8 steps."""

    method: str = option("rocm", "Which finetuner runs: a name from genft.methods.")
    model: str = option("toyworld-lcm", "Base consistency model: 'toyworld-lcm' (the toy LCM, distilled on first use), or a "
                        "LatentConsistencyModelPipeline folder / hub id (LCMScheduler).")
    reward: Union[str, Dict[str, float]] = option("toy_proxy_clip", "Reward to maximise (as in TrainConfig). ROCM back-propagates through it, so it needs a differentiable mode: the default is the toy world's proxy CLIPScore (toy_oracle has none).")
    num_inference_steps: int = option(4, "LCM sampler steps per rollout; the gradient runs through all of them (RLCM/ROCM base: LCM-Dreamshaper-v7 at 4–8 steps).")
    eta: float = option(1.0, "Noise injection of the consistency sampler in [0, 1]: 1 is LCM's (x_prev ~ N(√ᾱ f, (1−ᾱ)I)); 0 a deterministic DDIM-like jump (no divergence term).")
    reward_weight: float = option(1.0, "Scale of the reward term of the loss. [unverified]")
    divergence: Literal["kl", "reverse_kl", "jeffreys", "hellinger", "tv", "chi2", "js"] = option(
        "kl", "f-divergence between the policy's and the reference's Gaussian transition at every stochastic step "
        "(closed forms; 'js' by Monte Carlo). The paper compares several; which one it prefers is unverified.")
    divergence_weight: float = option(1.0, "β: weight of the summed per-step divergence (0 turns the regulariser off). [unverified]")
    divergence_reduce: Literal["mean", "sum"] = option("mean", "'mean': divergence of the per-dimension mean squared gap (the published mean-over-dims convention; for KL, the per-dim mean KL); 'sum': the exact divergence of the full distributions (χ² and TV saturate in high dimension).")
    js_samples: int = option(64, "Antithetic Monte-Carlo samples per JS estimate (divergence='js' only).")
    train_batch_size: int = option(8, "Trajectories re-run per minibatch (each costs one UNet pass per step for the policy and the reference, plus the reward's backward).")
    gradient_accumulation: int = option(1, "Minibatches per optimiser step.")
    inner_epochs: int = option(1, "Passes over each round's trajectories (their noises stay fixed; the weights move between passes).")
    gradient_checkpointing: bool = option(True, "Recompute each sampler step in the backward pass (torch.utils.checkpoint), so memory does not grow with steps × activations.")

    def validate(self) -> None:
        super().validate()
        for name in ["train_batch_size", "gradient_accumulation", "inner_epochs"]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.reward_weight > 0:
            raise ConfigError(f"reward_weight={self.reward_weight} must be > 0")
        if self.divergence_weight < 0:
            raise ConfigError(f"divergence_weight={self.divergence_weight} must be >= 0 (0 turns the regulariser off)")
        if self.js_samples < 2 or self.js_samples % 2:
            raise ConfigError(f"js_samples={self.js_samples} must be an even number >= 2 (antithetic pairs), e.g. 64")
        for name in ["eta", "eval_eta"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1] for the consistency sampler (1: LCM's noise injection)")
        per_step = self.train_batch_size * self.gradient_accumulation
        if self.rollout_batch_size % per_step:
            raise ConfigError(f"prompts_per_round*samples_per_prompt={self.rollout_batch_size} must be a multiple of "
                              f"train_batch_size*gradient_accumulation={per_step}, so every trajectory is trained on and no "
                              "gradient is left over; change one of them")


class ROCM(Method):
    """ROCM as hooks for the Trainer (see module docstring)."""

    name = "rocm"
    config_class = ROCMConfig
    families = ("consistency",)
    needs_reward_gradient = True

    def __init__(self, config: ROCMConfig, pipeline, reference_unet: torch.nn.Module):
        super().__init__(config, pipeline, reference_unet)
        self.reward = None
        self.records: Optional[Dict[str, Any]] = None
        self.generator = torch.Generator().manual_seed(config.seed + 4099)  # JS Monte-Carlo normals
        self.gradient_queries = 0

    def attach(self, *, reward) -> None:
        """Give the method the differentiable reward it back-propagates through (the Trainer calls this)."""
        if not getattr(reward, "differentiable", False):
            raise ValueError(f"ROCM needs a differentiable reward; {getattr(reward, 'name', reward)!r} was built with "
                             "differentiable=False. Build it with differentiable=True")
        self.reward = reward

    def rollout_kwargs(self) -> Dict[str, Any]:
        return {"eta": self.config.eta}

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation

    def advantages(self, rewards: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """Unused by ROCM (the signal is ∇r); the raw rewards are passed through."""
        return rewards.float()

    # ----- collect: the round's fixed noises ---------------------------------------------------------
    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        """Keep the rollout and its per-step noises (recovered before any update, so they are the ones drawn)."""
        if self.reward is None:
            raise RuntimeError("ROCM has no reward model to differentiate: call method.attach(reward=...) "
                               "(genft.Trainer does this) before collect")
        if getattr(self.pipeline, "family", None) != "consistency":
            raise ValueError(f"ROCM drives consistency pipelines, got a {getattr(self.pipeline, 'family', type(self.pipeline).__name__)} one")
        self.records = {"trajectory": trajectory, "noises": self.pipeline.step_noises(trajectory)}

    def minibatches(self, generator: torch.Generator) -> Iterable[torch.Tensor]:
        if self.records is None:
            return
        n = self.records["trajectory"].batch_size
        for _ in range(self.config.inner_epochs):
            yield from torch.randperm(n, generator=generator).split(self.config.train_batch_size)

    # ----- the differentiable trajectory ---------------------------------------------------------------
    def unroll(self, traj: Trajectory, noises: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-run `traj`'s sampler from its initial latents with the fixed `noises` [b, T, ...] under the current weights.

        Returns (final latents [b, ...], per-step divergence to the reference [b, T] (0 at deterministic
        steps), per-step policy std [T]); differentiable in the UNet's parameters.
        """
        c = self.config
        pipe = self.pipeline
        dev = pipe.device
        emb = traj.prompt_embeds.to(dev)
        neg = None if traj.negative_prompt_embeds is None else traj.negative_prompt_embeds.to(dev)
        gs, eta, reduce = traj.guidance_scale, traj.eta, traj.extras.get("reduce", "mean")
        prevs = lcm_prev_timesteps(traj.timesteps)
        regularise = c.divergence_weight > 0

        def one_step(x: torch.Tensor, z: torch.Tensor, k: int, normals: Optional[torch.Tensor]):
            t, t_prev = traj.timesteps[k], prevs[k]
            out = pipe.model_output(x, t, emb, neg, gs)
            step = lcm_step(out, t, x, pipe.scheduler, t_prev, eta=eta, variance_noise=z, reduce=reduce)
            if not regularise or not bool((step.std > 0).any()):
                return step.prev_sample, torch.zeros(x.shape[0], device=x.device), step.std
            ref_out = pipe.model_output(x, t, emb, neg, gs, unet=self.reference_unet)
            ref = lcm_step(ref_out, t, x, pipe.scheduler, t_prev, eta=eta, variance_noise=z, reduce=reduce)
            div = gaussian_divergence(c.divergence, step.mean, ref.mean, step.std, c.divergence_reduce, normals=normals)
            return step.prev_sample, div, step.std

        x = traj.latents[:, 0].to(dev).float()
        divs, stds = [], []
        for k in range(traj.num_steps):
            normals = js_normals(c.js_samples, self.generator) if c.divergence == "js" and regularise else None
            z = noises[:, k].to(dev)
            if c.gradient_checkpointing and torch.is_grad_enabled():
                x, div, std = checkpoint(one_step, x, z, k, normals, use_reentrant=False)
            else:
                x, div, std = one_step(x, z, k, normals)
            divs.append(div)
            stds.append(std[0].detach())
        return x, torch.stack(divs, dim=1), torch.stack(stds).cpu()

    def loss(self, batch: torch.Tensor, round_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        c = self.config
        rec = self.records
        traj: Trajectory = rec["trajectory"].select(batch)
        x_out, divs, _ = self.unroll(traj, rec["noises"][batch.to(rec["noises"].device)])
        rewards = self.reward(self.pipeline.decode(x_out), traj.prompts)
        self.gradient_queries += rewards.shape[0]
        divergence = divs.sum(dim=1)
        loss = -c.reward_weight * rewards.mean() + c.divergence_weight * divergence.mean()
        metrics = {"reward_at_gradient": rewards.mean().item(), "divergence": divergence.mean().item()}
        metrics.update({f"divergence/step_{k}": divs[:, k].mean().item() for k in range(divs.shape[1])})
        return loss, metrics

    def extra_step(self, round_index: int) -> Dict[str, float]:
        """Reward evaluations made by the round's gradient passes (besides the Trainer's rollout scoring); frees the round."""
        out = {"gradient_reward_queries": float(self.gradient_queries)}
        self.gradient_queries = 0
        self.records = None
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
