"""Latent consistency models (LCM) over diffusers' `LCMScheduler`, multistep sampling as a Gaussian policy.

One step (RLCM's formulation, arXiv 2404.03673): the consistency function f_θ(x_t, t) =
c_skip(t)·x_t + c_out(t)·x̂0 (boundary condition of `LCMScheduler`), then noise is injected back to
the next timestep: x_prev ~ N(√ᾱ_prev·f_θ, (1−ᾱ_prev) I). The final step returns f_θ itself (std 0,
no log-prob, excluded from training). `lcm_step` is written by hand because `LCMScheduler.step`
keeps a hidden step counter, returns no mean/std and cannot score a given sample.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Union

import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from ._ddim import _as_batch_timesteps
from ._diffusion import _unwrap
from ._gaussian import GaussianStep, Reduce, gaussian_log_prob
from ._text import token_ids
from ._policy import LatentPolicyPipeline, make_trajectory
from ._trajectory import Trajectory

GeneratorLike = Optional[Union[torch.Generator, List[torch.Generator]]]
TimestepLike = Union[int, torch.Tensor]
#: `prev_timestep` value of the last step: it returns the consistency output f_θ (ᾱ_prev = 1, std 0).
FINAL_STEP = -1


def lcm_alpha_prod(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample in float32; negative timesteps (FINAL_STEP) give 1, i.e. the clean output."""
    ac = scheduler.alphas_cumprod.to(torch.float32)
    t = torch.as_tensor(timestep, dtype=torch.long).cpu()
    return torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones((), dtype=torch.float32))


def lcm_prev_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """The timestep each step of a schedule lands on: the next entry, FINAL_STEP after the last."""
    t = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    return torch.cat([t[1:], torch.tensor([FINAL_STEP])])


def guidance_scale_embedding(guidance_scale: Union[float, torch.Tensor], dim: int, batch: int) -> torch.Tensor:
    """The w-embedding LCM UNets with `time_cond_proj_dim` read: sinusoidal features of (w − 1)·1000, [B, dim] float32.

    Same numbers as diffusers' `LatentConsistencyModelPipeline.get_guidance_scale_embedding` (w = guidance_scale − 1).
    """
    # Written out (not diffusers' get_timestep_embedding, equal up to float32 round-off) to reproduce the pipeline's numbers.
    w = torch.as_tensor(guidance_scale, dtype=torch.float32).reshape(-1) - 1.0
    w = (w.expand(batch) if w.numel() == 1 else w) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def consistency_output(model_output: torch.Tensor, timestep: TimestepLike, sample: torch.Tensor, scheduler) -> torch.Tensor:
    """f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0 in float32, with the scheduler's boundary scalings and x̂0 clipping.

    `timestep` is an int or a per-sample tensor [B]; at t = 0 the boundary condition gives f = x_t.
    """
    batch = sample.shape[0]
    device = sample.device
    t = _as_batch_timesteps(timestep, batch)
    view = (batch,) + (1,) * (sample.ndim - 1)
    a_t = lcm_alpha_prod(scheduler, t).to(device).view(view)
    b_t = 1 - a_t
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.float())
    c_skip, c_out = c_skip.float().to(device).view(view), c_out.float().to(device).view(view)
    x = sample.float()
    out = model_output.float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        x0 = (x - b_t.sqrt() * out) / a_t.sqrt()
    elif prediction_type == "sample":
        x0 = out
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - b_t.sqrt() * out
    else:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon, sample or v_prediction")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return c_skip * x + c_out * x0


def lcm_step(
    model_output: torch.Tensor,
    timestep: TimestepLike,
    sample: torch.Tensor,
    scheduler,
    prev_timestep: TimestepLike,
    eta: float = 1.0,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, list]] = None,
    *,
    variance_noise: Optional[torch.Tensor] = None,
    reduce: Reduce = "mean",
) -> GaussianStep:
    """One LCM multistep step x_t -> x_prev as N(mean, std² I) with an exact float32 log-prob (no scheduler state).

    mean = √ᾱ_prev·f + √(1−ᾱ_prev)·√(1−η²)·ε̂ and std = η·√(1−ᾱ_prev), with f = c_skip·x_t + c_out·x̂0
    and ε̂ the noise implied by f; η = 1 (default) is LCM's sampler, η = 0 a deterministic DDIM-like jump.
    `prev_timestep` may be FINAL_STEP (per sample): that step returns f with std 0.
    Given `prev_sample` it is scored; otherwise one is drawn (from `generator` or `variance_noise`),
    cast to `sample.dtype` and scored. `pred_original_sample` holds f. Gradients flow through
    `model_output`, `sample` and `variance_noise`.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] for the consistency sampler, got {eta}")
    if variance_noise is not None and generator is not None:
        raise ValueError("pass either generator or variance_noise, not both")
    batch = sample.shape[0]
    device = sample.device
    t = _as_batch_timesteps(timestep, batch)
    t_prev = _as_batch_timesteps(prev_timestep, batch)
    view = (batch,) + (1,) * (sample.ndim - 1)
    a_t = lcm_alpha_prod(scheduler, t).to(device).view(view)
    a_prev = lcm_alpha_prod(scheduler, t_prev).to(device).view(view)
    x = sample.float()
    b_t = 1 - a_t
    denoised = consistency_output(model_output, t, sample, scheduler)

    # The noise-direction coefficient is computed directly (not as √(1−ᾱ_prev−std²)) so that it is exactly 0 at η = 1.
    noise_scale = (1 - a_prev).clamp(min=0).sqrt()
    std = (eta * noise_scale).reshape(batch)
    mean = a_prev.sqrt() * denoised
    if eta < 1.0:
        eps = (x - a_t.sqrt() * denoised) / b_t.sqrt()
        mean = mean + noise_scale * (1.0 - eta**2) ** 0.5 * eps

    if prev_sample is None:
        if variance_noise is None:
            variance_noise = randn_tensor(sample.shape, generator=generator, device=device, dtype=torch.float32)
        prev_sample = (mean + std.view(view) * variance_noise.float()).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduce=reduce)
    return GaussianStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob, pred_original_sample=denoised)


class ConsistencyPipeline(LatentPolicyPipeline):
    """UNet + text encoder + tokenizer + `LCMScheduler` (+ optional VAE): an LCM as a multistep Gaussian policy.

    Guidance: a UNet with `time_cond_proj_dim` (LCM / distilled models) reads the guidance scale as an
    embedding and runs once per step; any other UNet (e.g. an LCM-LoRA'd SD) gets classifier-free
    guidance with the empty prompt when guidance_scale > 1. No sampling state is kept: every call
    derives its schedule from a fresh scheduler copy. Without a VAE the UNet works in pixels ([-1, 1]).
    """

    family = "consistency"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, storage_dtype: Optional[torch.dtype] = None):
        if not isinstance(scheduler, LCMScheduler):
            scheduler = LCMScheduler.from_config(scheduler.config)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = vae
        self.storage_dtype = storage_dtype

    # ----- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
    ) -> "ConsistencyPipeline":
        """Load a `LatentConsistencyModelPipeline` folder or hub id: unet/, text_encoder/, tokenizer/, scheduler/ (vae/ optional)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        path = str(path)
        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **({"dtype": torch_dtype} if torch_dtype else {}))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = LCMScheduler.from_pretrained(path, subfolder="scheduler")
        vae = None
        if _has_component(path, "vae"):
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        return cls(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae).to(device)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write the `LatentConsistencyModelPipeline` folder layout (safetensors) with a model_index.json naming the family."""
        import diffusers

        path = str(path)
        unet = _unwrap(self.unet)
        unet.save_pretrained(os.path.join(path, "unet"))
        self.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        self.scheduler.save_pretrained(os.path.join(path, "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(os.path.join(path, "vae"))
        index = {
            "_class_name": "LatentConsistencyModelPipeline", "_diffusers_version": diffusers.__version__,
            "genft_family": self.family,
            "unet": ["diffusers", type(unet).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "vae": ["diffusers", type(self.vae).__name__] if self.vae is not None else [None, None],
            "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    # ----- text and pixels ---------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[str], field_name: str = "prompt", allow_empty: bool = True) -> list:
        """Token ids padded to the encoder's length; raises for prompts it would truncate (and empty ones unless allowed)."""
        return token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length, field_name, allow_empty)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D]; refuses prompts the tokenizer would truncate."""
        ids = torch.tensor(self.check_prompts(prompts), dtype=torch.long, device=self.text_encoder.device)
        return self.text_encoder(ids)[0].to(next(self.unet.parameters()).dtype)

    @property
    def latent_shape(self) -> tuple:
        cfg = _unwrap(self.unet).config
        size = cfg.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, *hw)

    @property
    def embeds_guidance(self) -> bool:
        """True when the UNet reads the guidance scale as an embedding (`time_cond_proj_dim`), so no CFG pass is run."""
        return _unwrap(self.unet).config.get("time_cond_proj_dim") is not None

    # ----- model -------------------------------------------------------------------------------
    def model_output(
        self,
        x: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        guidance_scale: float,
        unet: Optional[torch.nn.Module] = None,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """The UNet output at (x, t) in float32 (guidance embedded, or CFG-combined); `unet` overrides the policy."""
        unet = unet if unet is not None else self.unet
        batch = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        dtype = next(unet.parameters()).dtype
        proj_dim = _unwrap(unet).config.get("time_cond_proj_dim")
        if proj_dim is not None:
            w_emb = guidance_scale_embedding(guidance_scale, proj_dim, batch).to(x.device, dtype)
            return unet(x.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype), timestep_cond=w_emb).sample.float()
        if guidance_scale > 1.0 and negative_prompt_embeds is not None:
            emb = torch.cat([negative_prompt_embeds, prompt_embeds]).to(dtype)
            out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]), encoder_hidden_states=emb).sample.float()
            uncond, cond = out.chunk(2)
            if detach_uncond:
                uncond = uncond.detach()
            return uncond + guidance_scale * (cond - uncond)
        return unet(x.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype)).sample.float()

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The LCM schedule for `num_inference_steps` (from `original_inference_steps`), from a fresh scheduler copy."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        sched = LCMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(num_inference_steps)
        return sched.timesteps.clone().cpu()

    def prev_timesteps(self, timesteps: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
        """Where each (per-sample) timestep of the n-step schedule lands; a timestep off the schedule is an error."""
        sched = self.timesteps(num_inference_steps)
        nxt = lcm_prev_timesteps(sched)
        t = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).cpu()
        hit = t[:, None] == sched[None, :]
        if not bool(hit.any(dim=1).all()):
            raise ValueError(f"timesteps {t.tolist()} are not on the {num_inference_steps}-step LCM schedule {sched.tolist()}")
        return nxt[hit.float().argmax(dim=1)]

    def _negative(self, guidance_scale: float, batch: int, negative_prompt: str = "") -> Optional[torch.Tensor]:
        if guidance_scale > 1.0 and not self.embeds_guidance:
            return self.encode_prompt([negative_prompt] * batch)
        return None

    # ----- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        generator: GeneratorLike = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 3.0,
        eta: float = 1.0,
        latents: Optional[torch.Tensor] = None,
        negative_prompt: str = "",
        reduce: Reduce = "mean",
    ) -> Trajectory:
        """Sample `prompts` with the multistep LCM sampler and record every latent and log-prob.

        latents[:, T] is the final consistency output (the image latents); the last step has std 0.
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        batch = len(prompts)
        prompt_embeds = self.encode_prompt(prompts)
        negative = self._negative(guidance_scale, batch, negative_prompt)
        timesteps = self.timesteps(num_inference_steps)
        prevs = lcm_prev_timesteps(timesteps)
        x = latents.to(self.device, self.latent_dtype) if latents is not None else self.initial_latents(batch, generator)
        all_latents, log_probs, stds = [x], [], []
        for t, t_prev in zip(timesteps, prevs):
            out = self.model_output(x, t, prompt_embeds, negative, guidance_scale)
            # The last step is deterministic: no noise is drawn, so the generator stream matches diffusers' LCM sampler.
            gen = generator if t_prev >= 0 else None
            noise = None if t_prev >= 0 else torch.zeros((), device=x.device).expand(x.shape)
            step = lcm_step(out, t, x, self.scheduler, t_prev, eta=eta, generator=gen, variance_noise=noise, reduce=reduce)
            x = step.prev_sample
            all_latents.append(x)
            log_probs.append(step.log_prob)
            stds.append(step.std[0])
        return make_trajectory(all_latents, log_probs, stds, timesteps, prompts, prompt_embeds, negative, self.decode(x),
                               guidance_scale, eta, num_inference_steps, {"reduce": reduce})

    def score_transition(
        self,
        sample: torch.Tensor,
        prev_sample: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        guidance_scale: float,
        eta: float,
        num_inference_steps: int,
        unet: Optional[torch.nn.Module] = None,
        detach_uncond: bool = False,
        reduce: Reduce = "mean",
    ) -> GaussianStep:
        """Score stored transitions sample -> prev_sample at per-sample `timesteps` [B] (positionally as DiffusionPipeline's)."""
        dev = self.device
        x = sample.to(dev)
        t = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).cpu()
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        t_prev = self.prev_timesteps(t, num_inference_steps)
        neg = None if negative_prompt_embeds is None else negative_prompt_embeds.to(dev)
        out = self.model_output(x, t.to(dev), prompt_embeds.to(dev), neg, guidance_scale, unet=unet, detach_uncond=detach_uncond)
        step = lcm_step(out, t, x, self.scheduler, t_prev, eta=eta, prev_sample=prev_sample.to(dev), reduce=reduce)
        step.model_output = out
        return step

    @torch.no_grad()
    def step_noises(self, trajectory: Trajectory) -> torch.Tensor:
        """The standard-normal draws z_k of each stored step, [B, T, ...] float32 (0 at deterministic steps).

        Recovered as (latents[:, k+1] − mean_k)/std_k under the current weights, so it is exact only
        while they are the rollout's weights (on-policy, before any update of the round).
        """
        zs = []
        for k in range(trajectory.num_steps):
            step = self.rescore(trajectory, k)
            view = (-1,) + (1,) * (step.mean.ndim - 1)
            safe = torch.where(step.std > 0, step.std, torch.ones_like(step.std)).view(view)
            z = (trajectory.latents[:, k + 1].to(step.mean.device).float() - step.mean) / safe
            zs.append(torch.where(step.std.view(view) > 0, z, torch.zeros_like(z)))
        return torch.stack(zs, dim=1)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        generator: GeneratorLike = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 3.0,
        eta: float = 1.0,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for `prompts` with the LCM multistep sampler (η = 1: noise injected as LCM does)."""
        return self.rollout(prompts, generator, num_inference_steps, guidance_scale, eta=eta).images


def _has_component(path: str, name: str) -> bool:
    """True when a local folder has the subfolder `name`, or a hub repo's model_index.json names it."""
    if os.path.exists(path):
        return os.path.isdir(os.path.join(path, name))
    from diffusers import DiffusionPipeline as _HFPipeline

    entry = _HFPipeline.load_config(path).get(name)
    return bool(entry) and entry[0] is not None
