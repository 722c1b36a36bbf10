"""One-step text-to-image generators x0 = g_θ(z, c): a diffusion UNet read once at a fixed timestep t*.

The generator is a diffusers `UNet2DConditionModel` fed pure noise z ~ N(0, I) as if it were x_{t*};
its prediction is turned into x̂0 with the base schedule's ᾱ_{t*} (the DDIM x̂0 formula, without
clipping so that gradients reach every pixel; `decode` clamps the images to [0, 1]). This is how
one-step students (DMD2, Diff-Instruct*, SIM) are initialised from their diffusion teacher.

As a policy the single step is deterministic given z: a `Trajectory` with T = 1, latents [B, 2, ...]
= (z, x0), std 0 and log_prob 0 (it carries no policy-gradient signal; methods for this family use
the reward's gradient). The folder layout is a diffusers pipeline folder whose model_index.json
records `genft_family: one_step`, the timestep and the diffusion base the generator came from.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import diffusers
import torch
from diffusers import DDIMScheduler

from ._diffusion import DiffusionPipeline, GeneratorLike
from ._gaussian import GaussianStep, Reduce
from ._trajectory import Trajectory

INDEX_TIMESTEP = "genft_one_step_timestep"
INDEX_BASE = "genft_base_model"


def one_step_x0(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x̂0 from a model output at noise level ᾱ (float32, no clipping), the x̂0 of DDIM's step for each prediction type."""
    x, out = sample.float(), model_output.float()
    a = alpha_prod.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "sample":
        return out
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out
    raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon, sample or v_prediction")


class OneStepPipeline(DiffusionPipeline):
    """A one-step generator with DiffusionPipeline's public surface (text, decode, rollout, rescore, sample).

    `timestep` is t*, the fixed timestep the UNet is read at; `base_model` is the diffusion folder or
    hub id it was built from (recorded on save; Diff-Instruct* loads its frozen teacher from it).
    The scheduler only supplies ᾱ_{t*} and the prediction type.
    """

    family = "one_step"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, timestep: int, vae=None,
                 storage_dtype: Optional[torch.dtype] = None, base_model: Optional[str] = None):
        super().__init__(unet, text_encoder, tokenizer, scheduler, vae=vae, storage_dtype=storage_dtype)
        n = self.scheduler.config.num_train_timesteps
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < n:
            raise ValueError(f"timestep={timestep!r} must be an integer in [0, {n - 1}] (the scheduler's training timesteps)")
        self.timestep = timestep
        self.base_model = None if base_model is None else str(base_model)

    # ----- building and loading ----------------------------------------------------------------
    @classmethod
    def from_diffusion(cls, pipeline: DiffusionPipeline, timestep: int, base_model: Optional[Union[str, os.PathLike]] = None,
                       ) -> "OneStepPipeline":
        """A one-step generator initialised from `pipeline`'s UNet (deep-copied) read at `timestep`.

        Text encoder, tokenizer and VAE are shared (they stay frozen). `base_model` is the folder or
        hub id of `pipeline`, recorded so that the teacher can be found again after a save.
        """
        import copy

        if getattr(pipeline, "family", "diffusion") != "diffusion":
            raise ValueError(f"from_diffusion needs a diffusion pipeline, got a {pipeline.family} one")
        if getattr(pipeline, "text_encoder_2", None) is not None:
            raise ValueError("one-step generators from two-encoder (SDXL) pipelines are not supported yet; use a one-encoder base")
        return cls(copy.deepcopy(pipeline.unet), pipeline.text_encoder, pipeline.tokenizer,
                   DDIMScheduler.from_config(pipeline.scheduler.config), timestep=timestep, vae=pipeline.vae,
                   storage_dtype=pipeline.storage_dtype, base_model=None if base_model is None else str(base_model))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu") -> "OneStepPipeline":
        """Load a folder written by `save_pretrained` (its model_index.json names the timestep)."""
        path = str(path)
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            raise ValueError(f"{path} has no model_index.json; a one-step folder records its timestep there")
        index = json.loads(open(index_file, encoding="utf-8").read())
        if index.get("genft_family") != "one_step" or INDEX_TIMESTEP not in index:
            raise ValueError(f"{path} is not a one-step generator folder (model_index.json needs genft_family='one_step' "
                             f"and {INDEX_TIMESTEP}); build one with OneStepPipeline.from_diffusion(...).save_pretrained(...)")
        parts = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype, device=device)
        return cls(parts.unet, parts.text_encoder, parts.tokenizer, parts.scheduler, timestep=int(index[INDEX_TIMESTEP]),
                   vae=parts.vae, base_model=index.get(INDEX_BASE))

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Every component in the diffusers layout plus model_index.json (family, timestep, base model)."""
        super().save_pretrained(path)
        index = {
            "_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__, "genft_family": self.family,
            INDEX_TIMESTEP: self.timestep, INDEX_BASE: self.base_model,
            "unet": ["diffusers", type(self.unet).__name__], "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__], "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        if self.vae is not None:
            index["vae"] = ["diffusers", type(self.vae).__name__]
        with open(os.path.join(str(path), "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)

    # ----- the generator -----------------------------------------------------------------------
    @property
    def alpha_prod(self) -> torch.Tensor:
        """ᾱ_{t*} of the base schedule (float32 scalar)."""
        return self.scheduler.alphas_cumprod[self.timestep].float()

    def timesteps(self, num_inference_steps: int = 1) -> torch.Tensor:
        """[t*]: the single step (any other number of steps is refused)."""
        _check_one_step(num_inference_steps, 0.0)
        return torch.tensor([self.timestep], dtype=torch.long)

    def generate(self, noise: torch.Tensor, prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor] = None,
                 guidance_scale: float = 1.0, unet: Optional[torch.nn.Module] = None, detach_uncond: bool = False) -> torch.Tensor:
        """x0 = g_θ(z, c) in float32; differentiable w.r.t. the UNet unless called under `torch.no_grad()`."""
        out = self.model_output(noise, self.timestep, prompt_embeds, negative_prompt_embeds, guidance_scale, unet=unet,
                                detach_uncond=detach_uncond)
        return one_step_x0(out, noise, self.alpha_prod.to(noise.device), self.scheduler.config.prediction_type)

    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        generator: GeneratorLike = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        latents: Optional[torch.Tensor] = None,
        negative_prompt: str = "",
        reduce: Reduce = "mean",
    ) -> Trajectory:
        """One deterministic step z -> x0 as a Trajectory (T = 1, std 0, log_prob 0); only 1 step and η = 0 are accepted."""
        _check_one_step(num_inference_steps, eta)
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        batch = len(prompts)
        prompt_embeds = self.encode_prompt(prompts)
        negative = self.encode_prompt([negative_prompt] * batch) if guidance_scale > 1.0 else None
        z = latents.to(self.device, self.latent_dtype) if latents is not None else self.initial_latents(batch, generator)
        x0 = self.generate(z, prompt_embeds, negative, guidance_scale).to(self.latent_dtype)
        return Trajectory(
            latents=torch.stack([z, x0], dim=1),
            timesteps=self.timesteps(1),
            log_probs=torch.zeros(batch, 1),
            stds=torch.zeros(1),
            prompts=prompts,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            images=self.decode(x0),
            guidance_scale=float(guidance_scale),
            eta=0.0,
            num_inference_steps=1,
            extras={"reduce": reduce, "one_step_timestep": self.timestep},
        )

    def rescore(self, trajectory: Trajectory, steps: Union[int, torch.Tensor] = 0, unet: Optional[torch.nn.Module] = None,
                detach_uncond: bool = False) -> GaussianStep:
        """The stored step under the current weights: mean = g_θ(z, c) (with gradients), std 0, log_prob 0."""
        k = torch.as_tensor(steps, dtype=torch.long)
        if (k != 0).any():
            raise ValueError(f"a one-step trajectory has only step 0, got steps={k.tolist()}")
        lat = trajectory.latents
        return self.score_transition(lat[:, 0], lat[:, 1], trajectory.timesteps.expand(trajectory.batch_size),
                                     trajectory.prompt_embeds, trajectory.negative_prompt_embeds, trajectory.guidance_scale,
                                     trajectory.eta, trajectory.num_inference_steps, unet=unet, detach_uncond=detach_uncond)

    def score_transition(self, sample: torch.Tensor, prev_sample: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                         negative_prompt_embeds: Optional[torch.Tensor], guidance_scale: float, eta: float, num_inference_steps: int,
                         unet: Optional[torch.nn.Module] = None, detach_uncond: bool = False, reduce: Reduce = "mean") -> GaussianStep:
        """Score stored z -> x0 pairs: the deterministic step's mean g_θ(z, c), std 0 and log_prob 0 (no density)."""
        _check_one_step(num_inference_steps, eta)
        if (torch.as_tensor(timesteps) != self.timestep).any():
            raise ValueError(f"timesteps {torch.as_tensor(timesteps).tolist()} differ from this generator's t*={self.timestep}")
        dev = self.device
        neg = None if negative_prompt_embeds is None else negative_prompt_embeds.to(dev)
        z = sample.to(dev)
        out = self.model_output(z, self.timestep, prompt_embeds.to(dev), neg, guidance_scale, unet=unet, detach_uncond=detach_uncond)
        x0 = one_step_x0(out, z, self.alpha_prod.to(dev), self.scheduler.config.prediction_type)
        batch = z.shape[0]
        zeros = torch.zeros(batch, device=dev)
        return GaussianStep(prev_sample=prev_sample.to(dev), mean=x0, std=zeros, log_prob=zeros, pred_original_sample=x0,
                            model_output=out)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generator: GeneratorLike = None, num_inference_steps: int = 1,
               guidance_scale: float = 1.0, eta: float = 0.0) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from one generator call per sample."""
        return self.rollout(prompts, generator, num_inference_steps, guidance_scale, eta=eta).images


def _check_one_step(num_inference_steps: int, eta: float) -> None:
    if num_inference_steps != 1:
        raise ValueError(f"num_inference_steps={num_inference_steps}: a one-step generator samples in exactly 1 step")
    if eta != 0:
        raise ValueError(f"eta={eta}: a one-step generator is deterministic given its noise; use eta=0")
