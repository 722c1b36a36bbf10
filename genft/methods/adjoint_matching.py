"""Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen, ICLR 2025, arXiv 2409.08861).

Reward fine-tuning as memoryless stochastic optimal control: sample with the memoryless SDE
(flow: Flow-GRPO's SDE with noise_level √2; diffusion: DDIM η = 1), take ∇r at the sample
through the decoder and a differentiable reward, run the *lean adjoint* backward over the stored
trajectory with VJPs of the frozen base model, then regress the fine-tuned model's control onto
−σ·ã at a few steps per trajectory. Target law: p_base(x)·exp(λ r(x))/Z. No backprop through the
sampler, so memory does not grow with the number of steps. Math lives in `genft.adjoint`.

The method needs the reward model itself (not only the trainer's scores): `genft.Trainer` hands
it over with `attach(reward=...)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch

from pipelines import Trajectory

from ..adjoint import (MEMORYLESS_DDIM_ETA, MEMORYLESS_FLOW_NOISE_LEVEL, LossQuantileFilter, adjoint_matching_loss,
                       control_norm, lean_adjoint, reward_gradient, sample_train_steps)
from ..config import ConfigError, option
from ..train_config import TrainConfig
from .base import Method


@dataclass
class AdjointMatchingConfig(TrainConfig):
    """Adjoint Matching settings (defaults from the paper's SD-1.5 code, microsoft/soc-fine-tuning-sd, unless noted)."""

    method: str = option("adjoint_matching", "Which finetuner runs: a name from genft.methods.")
    reward: Union[str, Dict[str, float]] = option("toy_proxy_clip", "Reward to optimise (as in TrainConfig). Adjoint Matching differentiates it, so it needs a differentiable mode: the default is the toy world's proxy CLIPScore (toy_oracle has none).")
    reward_multiplier: float = option(100.0, "λ: the fine-tuned law is p_base·exp(λ·r)/Z. Paper: 100 with ImageReward; scale it with the reward's units.")
    timesteps_per_trajectory: int = option(4, "Sampler steps per trajectory the loss is evaluated on (half from the first `early_fraction` of the steps).")
    early_fraction: float = option(0.6, "Where the stratified step sampling splits the trajectory (fraction of steps from the noise end).")
    loss_quantile: float = option(0.9, "Drop (trajectory, step) loss entries whose √loss exceeds an EMA of this quantile of the batch's √loss; >= 1 disables. It stabilises image training but removes the rare large adjoints that carry mode-reweighting signal.")
    loss_quantile_decay: float = option(0.9, "EMA decay of the loss-quantile threshold.")
    cfg_in_training: bool = option(False, "False (paper's best): classifier-free guidance only when sampling; adjoint and control use the conditional model. True: use guidance_scale in the adjoint and the control too (principled, but the adjoint norm blows up).")
    prompt_dropout: float = option(0.2, "Probability that a minibatch's control is trained with the empty prompt (for both models), so the unconditional branch used by CFG is fine-tuned too. Ignored with cfg_in_training.")
    train_batch_size: int = option(4, "Trajectories per minibatch; each contributes `timesteps_per_trajectory` loss entries.")
    gradient_accumulation: int = option(1, "Minibatches per optimiser step.")
    inner_epochs: int = option(1, "Passes over each round's trajectories (the paper's code: 1; its buffer variant: 10).")
    adjoint_chunk_size: int = option(0, "Trajectories per reward-gradient + lean-adjoint pass in collect (0: the whole round at once); bounds collect's memory.")

    def validate(self) -> None:
        super().validate()
        for name in ["timesteps_per_trajectory", "train_batch_size", "gradient_accumulation", "inner_epochs"]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.adjoint_chunk_size < 0:
            raise ConfigError(f"adjoint_chunk_size={self.adjoint_chunk_size} must be >= 0 (0: whole round)")
        if not self.reward_multiplier > 0:
            raise ConfigError(f"reward_multiplier={self.reward_multiplier} must be > 0 (λ of the tilt p_base·exp(λr)); e.g. 100 for ImageReward")
        if self.timesteps_per_trajectory > self.num_inference_steps:
            raise ConfigError(f"timesteps_per_trajectory={self.timesteps_per_trajectory} exceeds num_inference_steps={self.num_inference_steps}; "
                              "lower it or sample with more steps")
        if not 0 < self.early_fraction < 1:
            raise ConfigError(f"early_fraction={self.early_fraction} must be in (0, 1)")
        if not self.loss_quantile > 0:
            raise ConfigError(f"loss_quantile={self.loss_quantile} must be > 0 (>= 1 disables the filter)")
        if not 0 <= self.loss_quantile_decay < 1:
            raise ConfigError(f"loss_quantile_decay={self.loss_quantile_decay} must be in [0, 1)")
        if not 0 <= self.prompt_dropout <= 1:
            raise ConfigError(f"prompt_dropout={self.prompt_dropout} must be in [0, 1]")
        if self.eta != MEMORYLESS_DDIM_ETA:
            raise ConfigError(f"eta={self.eta}: Adjoint Matching must sample with the memoryless schedule (DDIM eta=1; flow models use "
                              "noise_level=√2 automatically); any other schedule biases the target. Leave eta=1.0")
        if self.cfg_in_training and self.guidance_scale <= 1.0:
            raise ConfigError(f"cfg_in_training=True needs guidance_scale > 1, got {self.guidance_scale}; "
                              "set cfg_in_training=False for unguided training")
        per_step = self.train_batch_size * self.gradient_accumulation
        if self.rollout_batch_size % per_step:
            raise ConfigError(f"prompts_per_round*samples_per_prompt={self.rollout_batch_size} must be a multiple of "
                              f"train_batch_size*gradient_accumulation={per_step}, so every trajectory is trained on and no "
                              "gradient is left over; change one of them")


class AdjointMatching(Method):
    """Adjoint Matching as hooks for the Trainer (see module docstring)."""

    name = "adjoint_matching"
    config_class = AdjointMatchingConfig
    families = ("flow", "diffusion", "mirror")
    needs_reward_gradient = True

    def __init__(self, config: AdjointMatchingConfig, pipeline, reference_unet: torch.nn.Module):
        super().__init__(config, pipeline, reference_unet)
        self.reward = None
        self.records: Optional[Dict[str, Any]] = None
        self.filter = LossQuantileFilter(config.loss_quantile, config.loss_quantile_decay)
        self.generator = torch.Generator().manual_seed(config.seed + 7919)
        self._collect_metrics: Dict[str, float] = {}
        self._empty_embed: Optional[torch.Tensor] = None

    # ----- wiring ------------------------------------------------------------------------------
    def attach(self, *, reward) -> None:
        """Give the method the differentiable reward model it back-propagates through (the Trainer calls this)."""
        if not getattr(reward, "differentiable", False):
            raise ValueError(f"Adjoint Matching needs a differentiable reward; {getattr(reward, 'name', reward)!r} was built with "
                             "differentiable=False. Build it with differentiable=True")
        self.reward = reward
        prior = getattr(self.pipeline, "prior", None)
        if prior is not None and getattr(prior, "name", "gaussian") != "gaussian":
            raise ValueError(f"Adjoint Matching's memoryless SDE assumes Gaussian base noise, but the mirror pipeline's prior is "
                             f"{prior.name!r}; fine-tune it with dpok, or use a Gaussian-prior mirror model")

    @property
    def family(self) -> str:
        """'flow' or 'diffusion': a mirror pipeline is a flow in dual coordinates (its memoryless SDE is the flow one)."""
        family = getattr(self.pipeline, "family", "diffusion")
        return "flow" if family == "mirror" else family

    def rollout_kwargs(self) -> Dict[str, Any]:
        """The memoryless sampler: flow noise_level √2 ("sde"), diffusion DDIM η = 1."""
        if self.family == "flow":
            return {"noise_level": MEMORYLESS_FLOW_NOISE_LEVEL, "sampler": "sde"}
        return {"eta": MEMORYLESS_DDIM_ETA}

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation

    def advantages(self, rewards: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """Unused by Adjoint Matching (the signal is ∇r); the raw rewards are passed through."""
        return rewards.float()

    # ----- collect: reward gradient and lean adjoint ---------------------------------------------
    def _check_memoryless(self, traj: Trajectory) -> None:
        if self.family == "flow":
            ex = traj.extras
            ok = ex.get("sampler", "sde") == "sde" and ex.get("sde_window") is None and abs(traj.eta - MEMORYLESS_FLOW_NOISE_LEVEL) < 1e-6
            if not ok:
                raise ValueError(f"flow trajectory was sampled with sampler={ex.get('sampler')!r}, noise_level={traj.eta}, "
                                 f"sde_window={ex.get('sde_window')}; Adjoint Matching needs sampler='sde', noise_level=√2, no window")
        elif abs(traj.eta - MEMORYLESS_DDIM_ETA) > 1e-6:
            raise ValueError(f"diffusion trajectory was sampled with eta={traj.eta}; Adjoint Matching needs eta=1 (memoryless)")

    def _step(self, x: torch.Tensor, steps: torch.Tensor, traj: Trajectory, prompt_embeds: torch.Tensor,
              negative: Optional[torch.Tensor], guidance_scale: float, unet: Optional[torch.nn.Module]):
        """The Gaussian step of stored transition(s) `steps` [N] at x [N, ...] under `unet` (None: the policy)."""
        steps = steps.cpu()
        kwargs = {}
        if self.family == "flow":
            kwargs = {"sigma_next": traj.extras["sigmas"][steps + 1], "sampler": "sde"}
        return self.pipeline.score_transition(x, x.detach(), traj.timesteps[steps], prompt_embeds, negative, guidance_scale,
                                              traj.eta, traj.num_inference_steps, unet=unet, **kwargs)

    def _guidance(self, traj: Trajectory) -> Tuple[float, Optional[torch.Tensor]]:
        if self.config.cfg_in_training:
            return self.config.guidance_scale, traj.negative_prompt_embeds
        return 1.0, None

    def _collect_chunk(self, traj: Trajectory) -> Dict[str, Any]:
        c = self.config
        batch, num = traj.batch_size, traj.num_steps
        dev = self.pipeline.device
        lat = traj.latents.to(dev)
        prompts = traj.prompts

        def reward_fn(x: torch.Tensor) -> torch.Tensor:
            return self.reward(self.pipeline.decode(x), prompts)

        grad, rewards = reward_gradient(lat[:, -1], reward_fn)
        stochastic = (traj.stds > 0).nonzero().flatten()
        if stochastic.numel() < c.timesteps_per_trajectory:
            raise ValueError(f"only {stochastic.numel()} of {num} sampler steps are stochastic, fewer than "
                             f"timesteps_per_trajectory={c.timesteps_per_trajectory}")
        pick = sample_train_steps(stochastic.numel(), c.timesteps_per_trajectory, batch, self.generator, c.early_fraction)
        steps = stochastic[pick]
        gs, neg = self._guidance(traj)
        emb = traj.prompt_embeds.to(dev)
        neg = None if neg is None else neg.to(dev)

        def base_mean(x: torch.Tensor, k: int) -> torch.Tensor:
            return self._step(x, torch.full((batch,), k, dtype=torch.long), traj, emb, neg, gs, self.reference_unet).mean

        adj = lean_adjoint(lat, -c.reward_multiplier * grad, base_mean, steps)
        rows = torch.arange(batch, device=dev)[:, None]
        self._collect_metrics_accumulate(rewards, grad, adj.initial)
        return {
            "sample": lat[rows, steps.to(dev)].to(traj.latents.dtype), "step": steps, "adjoint": adj.adjoint,
            "base_mean": adj.base_mean, "prompt_embeds": traj.prompt_embeds,
            "negative_prompt_embeds": traj.negative_prompt_embeds,
        }

    def _collect_metrics_accumulate(self, rewards: torch.Tensor, grad: torch.Tensor, initial: torch.Tensor) -> None:
        m = self._collect_metrics
        m["reward_at_gradient"] = m.get("reward_at_gradient", 0.0) + rewards.sum().item()
        m["reward_grad_norm"] = m.get("reward_grad_norm", 0.0) + grad.flatten(1).norm(dim=1).sum().item()
        m["adjoint0_norm"] = m.get("adjoint0_norm", 0.0) + initial.flatten(1).norm(dim=1).sum().item()
        m["_count"] = m.get("_count", 0.0) + rewards.numel()

    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        """Reward gradient at the samples and the lean adjoint over each stored trajectory (this round only: on-policy)."""
        if self.reward is None:
            raise RuntimeError("Adjoint Matching has no reward model to differentiate: call method.attach(reward=...) "
                               "(genft.Trainer does this) before collect")
        self._check_memoryless(trajectory)
        size = self.config.adjoint_chunk_size or trajectory.batch_size
        self._collect_metrics = {}
        parts = [self._collect_chunk(trajectory.select(torch.arange(i, min(i + size, trajectory.batch_size))))
                 for i in range(0, trajectory.batch_size, size)]
        first = parts[0]
        self.records = {k: (None if first[k] is None else torch.cat([p[k] for p in parts])) for k in first}
        self.records["trajectory"] = trajectory

    # ----- updates -----------------------------------------------------------------------------
    def minibatches(self, generator: torch.Generator) -> Iterable[Dict[str, Any]]:
        if self.records is None:
            return
        c = self.config
        n = self.records["sample"].shape[0]
        for _ in range(c.inner_epochs):
            order = torch.randperm(n, generator=generator)
            for idx in order.split(c.train_batch_size):
                drop = c.prompt_dropout > 0 and not c.cfg_in_training and torch.rand(1, generator=generator).item() < c.prompt_dropout
                yield {"index": idx, "unconditional": drop}

    def _empty_prompt(self, batch: int) -> torch.Tensor:
        if self._empty_embed is None:
            encode_negative = getattr(self.pipeline, "encode_negative", None)  # SDXL: zeros, as its rollouts use
            self._empty_embed = encode_negative("", 1) if encode_negative else self.pipeline.encode_prompt([""])
        return self._empty_embed.expand(batch, *self._empty_embed.shape[1:])

    def loss(self, batch: Dict[str, Any], round_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        rec, idx = self.records, batch["index"]
        traj: Trajectory = rec["trajectory"]
        dev = self.pipeline.device
        n_slots = rec["step"].shape[1]
        flat = lambda t: t[idx.to(t.device)].flatten(0, 1).to(dev)  # noqa: E731 - [b, n, ...] -> [b*n, ...]
        x, base_mean, adjoint = flat(rec["sample"]), flat(rec["base_mean"]), flat(rec["adjoint"])
        steps = rec["step"][idx].flatten()
        emb = rec["prompt_embeds"][idx.to(rec["prompt_embeds"].device)].repeat_interleave(n_slots, dim=0).to(dev)
        gs, neg = self._guidance(traj)
        if neg is not None:
            neg = rec["negative_prompt_embeds"][idx.to(neg.device)].repeat_interleave(n_slots, dim=0).to(dev)
        if batch["unconditional"]:
            emb = self._empty_prompt(emb.shape[0]).to(dev)
            with torch.no_grad():
                base_mean = self._step(x, steps, traj, emb, None, 1.0, self.reference_unet).mean
        step = self._step(x, steps, traj, emb, neg, gs, None)
        per_entry = adjoint_matching_loss(step.mean, base_mean, step.std, adjoint)
        keep = self.filter(per_entry)
        loss = (per_entry * keep).mean()
        s = step.std.view(-1, *([1] * (adjoint.ndim - 1)))
        return loss, {
            "am_loss_unfiltered": per_entry.mean().item(),
            "kept_frac": keep.float().mean().item(),
            "control_norm": control_norm(step.mean, base_mean, step.std).mean().item(),
            "target_norm": (s * adjoint).pow(2).flatten(1).sum(1).mean().item(),
        }

    def extra_step(self, round_index: int) -> Dict[str, float]:
        """Collect-time diagnostics of the round (mean reward at the gradient pass, ‖∇r‖, ‖ã_0‖); frees the round's records."""
        m = self._collect_metrics
        count = m.pop("_count", 0.0)
        self.records = None
        return {k: v / count for k, v in m.items()} if count else {}

    def state_dict(self) -> Dict[str, Any]:
        return {"filter": self.filter.state_dict(), "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.filter.load_state_dict(state["filter"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
