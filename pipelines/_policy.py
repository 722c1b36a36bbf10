"""What every genft pipeline shares around its own step function: device and dtype bookkeeping, pixels from
latents, the stored transitions a re-score reads, and the Trajectory a rollout returns.

Each family (DDIM diffusion, LCM consistency, flow matching) keeps only its sampler step, its schedule
and its network call; `LatentPolicyPipeline` holds the rest once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._trajectory import Trajectory

#: Attribute names of the modules a pipeline may hold; `to` moves the ones that are set.
_MODULES = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def step_indices(trajectory: Trajectory, steps: Union[int, torch.Tensor]) -> torch.Tensor:
    """Per-sample step indices [B] on the CPU from one index or a LongTensor; raises for any out of range."""
    batch = trajectory.batch_size
    k = torch.as_tensor(steps, dtype=torch.long).cpu()
    k = k.expand(batch) if k.ndim == 0 else k
    if k.shape != (batch,) or (k < 0).any() or (k >= trajectory.num_steps).any():
        raise ValueError(f"steps must index 0..{trajectory.num_steps - 1} for each of {batch} samples, got {k.tolist()}")
    return k


def stored_transitions(trajectory: Trajectory, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(latents[:, k], latents[:, k+1]) per sample: the transitions a rollout recorded."""
    rows = torch.arange(trajectory.batch_size)
    return trajectory.latents[rows, k], trajectory.latents[rows, k + 1]


def make_trajectory(latents: List[torch.Tensor], log_probs: List[torch.Tensor], stds: List[torch.Tensor],
                    timesteps: torch.Tensor, prompts: Sequence[str], prompt_embeds: torch.Tensor,
                    negative_prompt_embeds: Optional[torch.Tensor], images: torch.Tensor, guidance_scale: float, eta: float,
                    num_inference_steps: int, extras: Dict[str, Any]) -> Trajectory:
    """A rollout's record: latents [B, T+1, ...], log-probs [B, T], one std per step, and what re-scoring needs."""
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        timesteps=timesteps,
        log_probs=torch.stack(log_probs, dim=1),
        stds=torch.stack(stds).float().cpu(),
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        images=images,
        guidance_scale=float(guidance_scale),
        eta=float(eta),
        num_inference_steps=num_inference_steps,
        extras=extras,
    )


class LatentPolicyPipeline:
    """Device, dtypes and VAE decoding shared by the genft pipelines (each sets `unet`, `vae`, `storage_dtype`)."""

    unet: torch.nn.Module
    vae: Optional[torch.nn.Module]
    storage_dtype: Optional[torch.dtype]
    latent_shape: tuple
    scheduler: Any

    def to(self, device: Union[str, torch.device]):
        """Move every module the pipeline holds to `device`; returns the pipeline."""
        for name in _MODULES:
            m = getattr(self, name, None)
            if m is not None:
                m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype latents are stored in (the network's, unless `storage_dtype` overrides it)."""
        return self.storage_dtype or next(self.unet.parameters()).dtype

    def initial_latents(self, batch: int, generator=None) -> torch.Tensor:
        """x_T ~ N(0, σ_init² I) drawn in float32 from `generator` (one per sample for batch-independent noise)."""
        from diffusers.utils.torch_utils import randn_tensor

        x = randn_tensor((batch, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)
        return (x * self.scheduler.init_noise_sigma).to(self.latent_dtype)

    def rescore(self, trajectory: Trajectory, steps: Union[int, torch.Tensor], unet: Optional[torch.nn.Module] = None,
                detach_uncond: bool = False):
        """Score the stored transitions latents[:, k] -> latents[:, k+1] under the current weights (or `unet`).

        `steps` is one step index for the whole batch or a LongTensor [B] of per-sample indices. Gradients
        flow to the network unless called under `torch.no_grad()`. Families whose steps need more than the
        timestep (flow matching's σ pairs) override this.
        """
        k = step_indices(trajectory, steps)
        return self.score_transition(
            *stored_transitions(trajectory, k), trajectory.timesteps[k], trajectory.prompt_embeds,
            trajectory.negative_prompt_embeds, trajectory.guidance_scale, trajectory.eta, trajectory.num_inference_steps,
            unet=unet, detach_uncond=detach_uncond, reduce=trajectory.extras.get("reduce", "mean"),
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels in [-1, 1] without a VAE) to float32 images in [0, 1]; differentiable."""
        x = latents
        if self.vae is not None:
            cfg = self.vae.config
            z = latents.to(self.vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
            x = self.vae.decode(z).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)
