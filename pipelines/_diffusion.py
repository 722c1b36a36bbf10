"""Text-to-image diffusion (DDIM/DDPM) over diffusers components, with exact trajectory log-probs."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ._ddim import ddim_step
from ._gaussian import GaussianStep, Reduce
from ._text import SDXL_TIME_IDS, encode_sdxl, sdxl_time_ids, sdxl_zero_negative, token_ids, unpack
from ._policy import LatentPolicyPipeline, make_trajectory
from ._trajectory import Trajectory

GeneratorLike = Optional[Union[torch.Generator, List[torch.Generator]]]


class DiffusionPipeline(LatentPolicyPipeline):
    """UNet + text encoder(s) + tokenizer(s) + DDIM scheduler (+ optional VAE) as a Gaussian policy.

    The pipeline keeps no sampling state: every call derives its timesteps from a fresh copy of the
    scheduler, so rollouts and re-scoring can interleave freely. Without a VAE the UNet works in
    pixel space ([-1, 1]).

    SDXL: pass `text_encoder_2`/`tokenizer_2` (CLIPTextModelWithProjection); the UNet then gets
    `added_cond_kwargs` (pooled text projection and the six size/crop time ids). Both travel packed
    as two extra rows of `prompt_embeds` (see `pipelines._text`), so trajectories and replay buffers
    carry them. `sample_size` overrides the UNet's latent size (resolution = sample_size · VAE factor);
    `source_class` names the diffusers pipeline class `save_pretrained` writes (None: genft's layout).
    """

    family = "diffusion"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, storage_dtype: Optional[torch.dtype] = None, *,
                 text_encoder_2=None, tokenizer_2=None, sample_size: Optional[int] = None,
                 source_class: Optional[str] = None, force_zeros_for_empty_prompt: bool = True):
        self.source_scheduler = scheduler  # what save_pretrained writes back in the diffusers layout (e.g. SDXL's Euler)
        if not isinstance(scheduler, DDIMScheduler):
            # Samplers without the notion (Euler, DPM-Solver, ...) never clip x̂0; DDIM's default would (clip_sample=True).
            scheduler = DDIMScheduler.from_config({**scheduler.config, "clip_sample": scheduler.config.get("clip_sample", False)})
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("pass text_encoder_2 and tokenizer_2 together (SDXL) or neither")
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.vae = vae
        self.storage_dtype = storage_dtype
        self.sample_size = sample_size
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.text_kind = "sdxl" if text_encoder_2 is not None else "clip"
        self.source_class = source_class or ("StableDiffusionXLPipeline" if self.text_kind == "sdxl" else None)
        self._check_added_conditioning()

    def _check_added_conditioning(self) -> None:
        """SDXL's UNet takes text_time added conditioning of width 6·addition_time_embed_dim + pooled dim."""
        cfg = _unwrap(self.unet).config
        wants = cfg.get("addition_embed_type") == "text_time"
        if wants != (self.text_kind == "sdxl"):
            raise ValueError(
                f"the UNet has addition_embed_type={cfg.get('addition_embed_type')!r} but text_encoder_2 is "
                f"{'set' if self.text_encoder_2 is not None else 'None'}: SDXL UNets (text_time) need both CLIP encoders, others one"
            )
        if wants:
            expected = cfg.addition_time_embed_dim * SDXL_TIME_IDS + self.text_encoder_2.config.projection_dim
            got = _unwrap(self.unet).add_embedding.linear_1.in_features
            if expected != got:
                raise ValueError(f"SDXL UNet add_embedding takes {got} features but 6·addition_time_embed_dim + "
                                 f"text_encoder_2 projection_dim = {expected}; the components do not belong together")

    # ----- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
    ) -> "DiffusionPipeline":
        """Load from a hub id or a local folder with unet/, text_encoder/, tokenizer/, scheduler/ (and optional vae/)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        path = str(path)
        if _registered_diffusers_class(path):  # e.g. a StableDiffusionXLPipeline folder: the registry's loader
            from ._registry import load

            return load(path, device=device, dtype=torch_dtype)
        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **({"dtype": torch_dtype} if torch_dtype else {}))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        vae = None
        if os.path.isdir(os.path.join(path, "vae")) or _hub_has_subfolder(path, "vae"):
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        pipe = cls(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
        return pipe.to(device)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write every component in the diffusers folder layout (safetensors weights)."""
        path = str(path)
        if self.source_class is not None:  # the diffusers layout of the class it was loaded from
            from ._registry import save_as_diffusers

            return save_as_diffusers(self, path)
        self.unet.save_pretrained(os.path.join(path, "unet"))
        self.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        self.scheduler.save_pretrained(os.path.join(path, "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(os.path.join(path, "vae"))

    # ----- text --------------------------------------------------------------------------------
    def text_inputs(self) -> list:
        """(tokenizer, max token count) for every text encoder, in order."""
        out = [(self.tokenizer, int(self.tokenizer.model_max_length))]
        if self.tokenizer_2 is not None:
            out.append((self.tokenizer_2, int(self.tokenizer_2.model_max_length)))
        return out

    def check_prompts(self, prompts: Sequence[str], field_name: str = "prompt", allow_empty: bool = True) -> list:
        """The first tokenizer's ids padded to its length; raises for prompts any tokenizer would truncate (and empty ones unless allowed).

        The empty prompt is the unconditional input of classifier-free guidance, hence allowed by default.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        ids = [token_ids(tok, prompts, n, field_name, allow_empty) for tok, n in self.text_inputs()]
        return ids[0]

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D] (SDXL: [B, L+2, D], pooled and time ids packed); refuses prompts the tokenizer would truncate."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        ids = self.check_prompts(prompts)
        dtype = next(self.unet.parameters()).dtype
        if self.text_kind == "sdxl":
            _, h, w = self.latent_shape
            f = self.vae_scale_factor
            time_ids = sdxl_time_ids(h * f, w * f, len(prompts))
            return encode_sdxl([self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2], prompts,
                               time_ids).to(dtype)
        ids = torch.tensor(ids, dtype=torch.long, device=self.text_encoder.device)
        return self.text_encoder(ids)[0].to(dtype)

    def encode_negative(self, negative_prompt: str, batch: int) -> torch.Tensor:
        """The CFG unconditional input; SDXL with force_zeros_for_empty_prompt uses zeros for the empty prompt, as diffusers."""
        emb = self.encode_prompt([negative_prompt] * batch)
        if self.text_kind == "sdxl" and self.force_zeros_for_empty_prompt and negative_prompt == "":
            return sdxl_zero_negative(emb)
        return emb

    @property
    def prompt_embed_dim(self) -> int:
        """Width D of `encode_prompt`'s [B, L, D] (SDXL: both CLIP widths joined)."""
        dims = [self.text_encoder.config.hidden_size]
        if self.text_encoder_2 is not None:
            dims.append(self.text_encoder_2.config.hidden_size)
        return sum(dims)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2^(VAE blocks − 1), 1 without a VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def _unet_kwargs(self, embeds: torch.Tensor) -> dict:
        """UNet keyword inputs from packed conditioning (SDXL: added_cond_kwargs unpacked from the extra rows)."""
        if self.text_kind != "sdxl":
            return {"encoder_hidden_states": embeds}
        hidden, (pooled, time_ids) = unpack(embeds, self.text_encoder_2.config.projection_dim, SDXL_TIME_IDS)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    # ----- model -------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple:
        cfg = _unwrap(self.unet).config
        size = self.sample_size or (cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size))
        hw = (size, size) if isinstance(size, int) else size
        return (cfg.in_channels, *hw)

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
        """The (CFG-combined) UNet output at (x, t) in float32; `unet` overrides the policy (e.g. a frozen reference)."""
        unet = unet if unet is not None else self.unet
        batch = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        dtype = next(unet.parameters()).dtype
        if guidance_scale > 1.0 and negative_prompt_embeds is not None:
            x_in = torch.cat([x, x]).to(dtype)
            emb = torch.cat([negative_prompt_embeds, prompt_embeds]).to(dtype)
            out = unet(x_in, torch.cat([t, t]), **self._unet_kwargs(emb)).sample.float()
            uncond, cond = out.chunk(2)
            if detach_uncond:
                uncond = uncond.detach()
            return uncond + guidance_scale * (cond - uncond)
        return unet(x.to(dtype), t, **self._unet_kwargs(prompt_embeds.to(dtype))).sample.float()

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The scheduler's timesteps for `num_inference_steps`, from a fresh copy (no shared state)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(num_inference_steps)
        return sched.timesteps.clone().cpu()

    # ----- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        generator: GeneratorLike = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        latents: Optional[torch.Tensor] = None,
        negative_prompt: str = "",
        reduce: Reduce = "mean",
    ) -> Trajectory:
        """Sample `prompts` and record every step's latent and log-prob (η > 0 for a stochastic policy)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        batch = len(prompts)
        prompt_embeds = self.encode_prompt(prompts)
        negative = self.encode_negative(negative_prompt, batch) if guidance_scale > 1.0 else None
        timesteps = self.timesteps(num_inference_steps)
        x = latents.to(self.device, self.latent_dtype) if latents is not None else self.initial_latents(batch, generator)
        all_latents, log_probs, stds = [x], [], []
        for t in timesteps:
            out = self.model_output(x, t, prompt_embeds, negative, guidance_scale)
            step = ddim_step(out, t, x, self.scheduler, eta=eta, generator=generator,
                             num_inference_steps=num_inference_steps, reduce=reduce)
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
        """Score stored transitions sample -> prev_sample at per-sample `timesteps` [B] (what replay buffers hold)."""
        dev = self.device
        x = sample.to(dev)
        neg = None if negative_prompt_embeds is None else negative_prompt_embeds.to(dev)
        out = self.model_output(x, timesteps.to(dev), prompt_embeds.to(dev), neg, guidance_scale,
                                unet=unet, detach_uncond=detach_uncond)
        step = ddim_step(out, timesteps.cpu(), x, self.scheduler, eta=eta, prev_sample=prev_sample.to(dev),
                         num_inference_steps=num_inference_steps, reduce=reduce)
        step.model_output = out
        return step

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        generator: GeneratorLike = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for `prompts` (η = 0 is the deterministic DDIM sampler)."""
        return self.rollout(prompts, generator, num_inference_steps, guidance_scale, eta=eta).images


def _hub_has_subfolder(path: str, name: str) -> bool:
    """True when a hub repo's model_index.json names the component `name` (local paths: False)."""
    if os.path.exists(path):
        return False
    from diffusers import DiffusionPipeline as _HFPipeline

    index = _HFPipeline.load_config(path)
    entry = index.get(name)
    return bool(entry) and entry[0] is not None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP/accelerate wrappers (which keep it in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _registered_diffusers_class(path: str) -> bool:
    """True when `path`'s model_index.json names a diffusers pipeline class that `pipelines.load` reads itself."""
    from ._registry import DIFFUSERS_ENTRIES, read_model_index

    index = read_model_index(path)
    return index is not None and index.get("_class_name") in DIFFUSERS_ENTRIES
