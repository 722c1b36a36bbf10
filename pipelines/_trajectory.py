"""The record of one batched rollout: every latent, timestep and log-prob the finetuners re-score."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import List, Optional, Sequence

import torch


@dataclass
class Trajectory:
    """A batch of B sampled chains of T stochastic steps.

    latents: [B, T+1, ...] from x_T (noise) to x_0, in the storage dtype the rollout used.
    timesteps: [T] scheduler timesteps, the step k goes latents[:, k] -> latents[:, k+1].
    log_probs: [B, T] float32 log-densities of each drawn step under the rollout policy.
    stds: [T] float32 per-step policy std (0 marks a deterministic step).
    prompt_embeds / negative_prompt_embeds: [B, L, D] text states used for conditioning / CFG.
    images: [B, 3, H, W] decoded final samples in [0, 1].
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    stds: torch.Tensor
    prompts: List[str]
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor]
    images: torch.Tensor
    guidance_scale: float
    eta: float
    num_inference_steps: int
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def select(self, indices: Sequence[int] | torch.Tensor) -> "Trajectory":
        """The sub-batch at `indices` (shared per-step fields are kept as they are)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        per_sample = {"latents", "log_probs", "prompt_embeds", "negative_prompt_embeds", "images"}
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in per_sample and v is not None:
                kwargs[f.name] = v[idx.to(v.device)]
            elif f.name == "prompts":
                kwargs[f.name] = [v[i] for i in idx.tolist()]
            else:
                kwargs[f.name] = v
        return replace(self, **kwargs)

    def to(self, device: torch.device | str) -> "Trajectory":
        """A copy with every tensor on `device`."""
        kwargs = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return replace(self, **kwargs)

    @classmethod
    def cat(cls, parts: Sequence["Trajectory"]) -> "Trajectory":
        """One trajectory from sub-batches rolled out with the same sampler settings (batch order kept)."""
        if not parts:
            raise ValueError("Trajectory.cat needs at least one trajectory")
        first = parts[0]
        for p in parts[1:]:
            same = (p.guidance_scale == first.guidance_scale and p.eta == first.eta
                    and p.num_inference_steps == first.num_inference_steps and torch.equal(p.timesteps, first.timesteps))
            if not same:
                raise ValueError("Trajectory.cat: parts differ in guidance_scale, eta or timesteps; roll them out with the same settings")
        per_sample = {"latents", "log_probs", "prompt_embeds", "negative_prompt_embeds", "images"}
        kwargs = {}
        for f in fields(first):
            v = getattr(first, f.name)
            if f.name in per_sample and v is not None:
                kwargs[f.name] = torch.cat([getattr(p, f.name) for p in parts])
            elif f.name == "prompts":
                kwargs[f.name] = [q for p in parts for q in p.prompts]
            else:
                kwargs[f.name] = v
        return replace(first, **kwargs)
