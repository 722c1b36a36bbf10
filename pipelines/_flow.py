"""Text-to-image flow matching (rectified flow) over diffusers components, with exact trajectory log-probs.

The velocity network may be a `UNet2DConditionModel` (the toy world), an `SD3Transformer2DModel`
(one CLIP, or SD3's two CLIPs + T5) or a `FluxTransformer2DModel` (CLIP pooled + T5); the
model-specific call sits in the small adapter functions below, text encoding in `pipelines._text`,
FLUX's latent packing in `pipelines._flux`.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ._diffusion import DiffusionPipeline, _hub_has_subfolder, _registered_diffusers_class, _unwrap
from ._flow_step import SAMPLERS, LogProbForm, Sampler, flow_sde_step
from ._flux import call_flux
from ._gaussian import GaussianStep, Reduce
from ._text import clip_max_length, encode_flux, encode_sd3, unpack
from ._policy import LatentPolicyPipeline, make_trajectory, step_indices, stored_transitions
from ._trajectory import Trajectory

GeneratorLike = Optional[Union[torch.Generator, List[torch.Generator]]]

# diffusers' defaults for the T5 token count (StableDiffusion3Pipeline / FluxPipeline `max_sequence_length`).
DEFAULT_T5_LENGTH = {"sd3": 256, "flux": 512}
DEFAULT_FLUX_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px with the 8× VAE


# ----- model adapters: the only model-specific code ---------------------------------------------
def model_kind(model: torch.nn.Module) -> str:
    """'unet', 'sd3' or 'flux' from the velocity network's class (subclasses included); other classes raise."""
    names = {c.__name__ for c in type(_unwrap(model)).__mro__}
    if "UNet2DConditionModel" in names:
        return "unet"
    if "SD3Transformer2DModel" in names:
        return "sd3"
    if "FluxTransformer2DModel" in names:
        return "flux"
    raise TypeError(
        "velocity model must be a UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel, "
        f"got {type(_unwrap(model)).__name__}"
    )


def _call_unet(model, x, t, embeds):
    return model(x, t, encoder_hidden_states=embeds).sample


def _call_sd3(model, x, t, embeds):
    hidden, pooled = _split_sd3(embeds, _unwrap(model).config.pooled_projection_dim)
    return model(hidden_states=x, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]


def _call_flux(model, x, t, embeds):
    """FLUX without a guidance embedding (e.g. FLUX.1-schnell) on the CFG path: t is already t / 1000."""
    return call_flux(model, x, t, embeds, None)


_CALLS = {"unet": _call_unet, "sd3": _call_sd3, "flux": _call_flux}


def _split_sd3(embeds: torch.Tensor, pooled_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed SD3 conditioning [B, L+1, D] -> (token states [B, L, D], pooled [B, pooled_dim])."""
    return embeds[:, :-1], embeds[:, -1, :pooled_dim]


def _encode_unet(text_encoder, ids, model):
    return text_encoder(ids)[0]


def _encode_sd3(text_encoder, ids, model):
    """Penultimate CLIP states (as diffusers' SD3 pipeline), zero-padded to the joint dim, plus the pooled row."""
    cfg = _unwrap(model).config
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-2]
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    joint, pdim = cfg.joint_attention_dim, cfg.pooled_projection_dim
    if hidden.shape[-1] > joint or pooled.shape[-1] != pdim or pdim > joint:
        raise ValueError(
            f"text encoder gives hidden size {hidden.shape[-1]} and pooled size {pooled.shape[-1]}, but the transformer "
            f"expects joint_attention_dim >= hidden ({joint}) and pooled_projection_dim == pooled ({pdim}) <= joint"
        )
    pad = lambda t: torch.nn.functional.pad(t, (0, joint - t.shape[-1]))  # noqa: E731
    return torch.cat([pad(hidden), pad(pooled)[:, None]], dim=1)


_ENCODES = {"unet": _encode_unet, "sd3": _encode_sd3}


class FlowMatchPipeline(LatentPolicyPipeline):
    """Velocity network + text encoder(s) + flow-match scheduler (+ optional VAE) as a Gaussian policy.

    Same surface as `DiffusionPipeline`, so the trainer drives either. Conventions:
      - `unet` is the velocity network whatever its class (named so the trainer finds it).
      - The flow family's "timesteps" are noise levels σ ∈ (0, 1] (1 = noise); the network is called
        at σ·num_train_timesteps. The scheduler supplies only the σ schedule (incl. `shift`); its
        step counter is never used.
      - For SD3 and FLUX transformers, `prompt_embeds` packs the pooled text projection as one extra
        last token row (zero-padded): [B, L+1, joint_attention_dim]. It then travels through
        `Trajectory.select/cat` and replay buffers like any prompt embedding.
      - SD3 with `text_encoder_2` (CLIP-G) and `text_encoder_3` (T5, may be None) encodes as
        diffusers' StableDiffusion3Pipeline; FLUX takes `text_encoder` (CLIP, pooled) and
        `text_encoder_2` (T5). `max_sequence_length` is the T5 token count (diffusers' defaults).
      - FLUX.1-dev is guidance-distilled: `guidance_scale` feeds its guidance embedding and no
        unconditional pass runs (`uses_cfg` is False). FLUX latents are stored unpacked [B, C, H, W].
      - `sample_size` overrides the latent size (FLUX has none in its config: 128 by default);
        `source_class` names the diffusers pipeline class `save_pretrained` writes (None: genft's layout).
    Without a VAE the network works in pixel space ([-1, 1]).
    """

    family = "flow"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, storage_dtype: Optional[torch.dtype] = None, *,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                 sample_size: Optional[int] = None, max_sequence_length: Optional[int] = None,
                 source_class: Optional[str] = None):
        if not type(scheduler).__name__.startswith("FlowMatch"):
            raise TypeError(f"scheduler must be a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if scheduler.config.get("invert_sigmas", False):
            raise ValueError("scheduler has invert_sigmas=True (Mochi-style); FlowMatchPipeline needs σ = 1 at noise")
        self.kind = model_kind(unet)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.scheduler = scheduler
        self.vae = vae
        self.storage_dtype = storage_dtype
        self.sample_size = sample_size
        self.text_kind = _text_kind(self.kind, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3)
        self.max_sequence_length = max_sequence_length or DEFAULT_T5_LENGTH.get(self.kind)
        default_source = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}.get(self.text_kind)
        self.source_class = source_class or default_source
        if self.kind == "flux" and (self.sample_size or DEFAULT_FLUX_SAMPLE_SIZE) % 2:
            raise ValueError(f"FLUX latents are packed 2×2: the latent sample_size must be even, got {self.sample_size} "
                             "(pick a resolution that is an even multiple of the VAE factor)")

    # ----- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
    ) -> "FlowMatchPipeline":
        """Load from a hub id or a local folder with unet/ or transformer/, text_encoder/, tokenizer/, scheduler/ (and optional vae/)."""
        import diffusers
        from transformers import AutoConfig, CLIPTokenizer
        import transformers

        path = str(path)
        if _registered_diffusers_class(path):  # StableDiffusion3Pipeline / FluxPipeline folders: the registry's loader
            from ._registry import load

            return load(path, device=device, dtype=torch_dtype)
        for extra in ("text_encoder_2", "text_encoder_3"):
            if _has_component(path, extra):
                raise NotImplementedError(
                    f"{path} has {extra}/ but is in genft's single-encoder layout (model_index.json names no diffusers "
                    "pipeline class): genft reads multi-encoder models only from diffusers' StableDiffusion3Pipeline or "
                    "FluxPipeline folders; load those with pipelines.load(path)"
                )
        sub = "transformer" if _has_component(path, "transformer") else "unet"
        class_name = _read_class_name(path, sub)
        if class_name not in ("UNet2DConditionModel", "SD3Transformer2DModel"):
            raise TypeError(f"{path}/{sub} holds a {class_name}; expected UNet2DConditionModel or SD3Transformer2DModel")
        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        model = getattr(diffusers, class_name).from_pretrained(path, subfolder=sub, **kw)
        arch = (AutoConfig.from_pretrained(path, subfolder="text_encoder").architectures or ["CLIPTextModel"])[0]
        if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise TypeError(f"{path}/text_encoder is a {arch}; expected CLIPTextModel or CLIPTextModelWithProjection")
        text_encoder = getattr(transformers, arch).from_pretrained(
            path, subfolder="text_encoder", **({"dtype": torch_dtype} if torch_dtype else {}))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        vae = None
        if _has_component(path, "vae"):
            vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        pipe = cls(unet=model, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
        return pipe.to(device)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write every component in the diffusers folder layout plus a model_index.json naming the genft family."""
        import diffusers

        path = str(path)
        if self.source_class is not None:  # the diffusers layout of the class it was loaded from
            from ._registry import save_as_diffusers

            return save_as_diffusers(self, path)
        model = _unwrap(self.unet)
        sub = "unet" if self.kind == "unet" else "transformer"
        model.save_pretrained(os.path.join(path, sub))
        self.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        self.scheduler.save_pretrained(os.path.join(path, "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(os.path.join(path, "vae"))
        index = {
            "_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__, "genft_family": self.family,
            sub: ["diffusers", type(model).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "vae": ["diffusers", type(self.vae).__name__] if self.vae is not None else [None, None],
        }
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    @property
    def transformer(self) -> torch.nn.Module:
        """The velocity network under its diffusers name for transformer models (same object as `unet`)."""
        return self.unet

    # ----- text --------------------------------------------------------------------------------
    # Shared with DiffusionPipeline: it reads only self.text_inputs().
    check_prompts = DiffusionPipeline.check_prompts

    def text_inputs(self) -> list:
        """(tokenizer, max token count) for every text encoder, in order (T5: `max_sequence_length`)."""
        out = [(self.tokenizer, clip_max_length(self.tokenizer))]
        if self.text_kind == "sd3":
            out.append((self.tokenizer_2, clip_max_length(self.tokenizer_2)))
            if self.text_encoder_3 is not None:
                out.append((self.tokenizer_3, self.max_sequence_length))
        elif self.text_kind == "flux":
            out.append((self.tokenizer_2, self.max_sequence_length))
        return out

    vae_scale_factor = DiffusionPipeline.vae_scale_factor

    @property
    def prompt_embed_dim(self) -> int:
        """Width D of `encode_prompt`'s [B, L, D]: the transformer's joint_attention_dim for SD3/FLUX, else the CLIP width."""
        if self.kind in ("sd3", "flux"):
            return int(_unwrap(self.unet).config.joint_attention_dim)
        return int(self.text_encoder.config.hidden_size)

    @property
    def uses_cfg(self) -> bool:
        """False for guidance-distilled FLUX (guidance_scale goes to its embedding); True for every other model."""
        return not (self.kind == "flux" and _unwrap(self.unet).config.guidance_embeds)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Conditioning [B, L, D] for the velocity network (SD3/FLUX: pooled row appended); refuses prompts the tokenizer would truncate."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        ids = self.check_prompts(prompts)
        dtype = next(self.unet.parameters()).dtype
        if self.text_kind == "sd3":
            return encode_sd3([self.tokenizer, self.tokenizer_2, self.tokenizer_3],
                              [self.text_encoder, self.text_encoder_2, self.text_encoder_3], prompts,
                              _unwrap(self.unet).config.joint_attention_dim, self.max_sequence_length).to(dtype)
        if self.text_kind == "flux":
            return encode_flux([self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2], prompts,
                               self.max_sequence_length).to(dtype)
        ids = torch.tensor(ids, dtype=torch.long, device=self.text_encoder.device)
        return _ENCODES[self.kind](self.text_encoder, ids, self.unet).to(dtype)

    def split_prompt_embeds(self, prompt_embeds: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(token states, pooled projection or None): undoes the SD3/FLUX packing of `encode_prompt`."""
        if self.kind in ("sd3", "flux"):
            hidden, (pooled,) = unpack(prompt_embeds, _unwrap(self.unet).config.pooled_projection_dim)
            return hidden, pooled
        return prompt_embeds, None

    # ----- model -------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple:
        cfg = _unwrap(self.unet).config
        if self.kind == "flux":  # the transformer sees 2×2 patches of C = in_channels / 4 latent channels
            size = self.sample_size or DEFAULT_FLUX_SAMPLE_SIZE
            return (cfg.in_channels // 4, size, size)
        size = self.sample_size or cfg.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, *hw)

    def model_output(
        self,
        x: torch.Tensor,
        sigma: Union[float, torch.Tensor],
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        guidance_scale: float,
        unet: Optional[torch.nn.Module] = None,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """The (CFG-combined) velocity v ≈ ε − x0 at (x, σ) in float32; `unet` overrides the policy (e.g. a frozen reference).

        `detach_uncond` stops gradients through the unconditional branch, as Flow-GRPO trains.
        """
        model = unet if unet is not None else self.unet
        kind = model_kind(model)
        call = _CALLS[kind]
        batch = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        s = s.expand(batch) if s.ndim == 0 else s
        t = s * self.scheduler.config.num_train_timesteps
        dtype = next(model.parameters()).dtype
        if kind == "flux":  # FluxPipeline calls the transformer at t / 1000; distilled guidance, CFG only without it
            t = t / 1000
            if not self.uses_cfg:
                return call_flux(model, x.to(dtype), t.to(dtype), prompt_embeds.to(dtype), guidance_scale).float()
        if guidance_scale > 1.0 and negative_prompt_embeds is not None:
            emb = torch.cat([negative_prompt_embeds, prompt_embeds]).to(dtype)
            out = call(model, torch.cat([x, x]).to(dtype), torch.cat([t, t]).to(dtype), emb).float()
            uncond, cond = out.chunk(2)
            if detach_uncond:
                uncond = uncond.detach()
            return uncond + guidance_scale * (cond - uncond)
        return call(model, x.to(dtype), t.to(dtype), prompt_embeds.to(dtype)).float()

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The σ schedule [n+1] (from ≈1 down to the appended 0) of a fresh scheduler copy, float32 on CPU."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        mu = None
        if sched.config.use_dynamic_shifting:  # diffusers' calculate_shift on the image token count
            c, shape = sched.config, self.latent_shape
            patch = 2 if self.kind == "flux" else (getattr(_unwrap(self.unet).config, "patch_size", 1) or 1)
            seq = (shape[1] // patch) * (shape[2] // patch)
            m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
            mu = seq * m + c.base_shift - m * c.base_image_seq_len
        if self.kind == "flux" and not sched.config.get("use_flow_sigmas", False):
            # FluxPipeline's schedule: σ = linspace(1, 1/n, n) before the (dynamic) shift.
            import numpy as np

            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu)
        else:
            sched.set_timesteps(num_inference_steps, mu=mu)
        return sched.sigmas.clone().float().cpu()

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The σ at which each of the n steps starts ([n], = sigmas(n)[:-1]); what `Trajectory.timesteps` stores."""
        return self.sigmas(num_inference_steps)[:-1]

    def initial_latents(self, batch: int, generator: GeneratorLike = None) -> torch.Tensor:
        """x at σ = 1: standard normal, drawn in float32 from `generator` (one per sample for batch-independent noise)."""
        x = randn_tensor((batch, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)
        return x.to(self.latent_dtype)

    # ----- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        generator: GeneratorLike = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        noise_level: Optional[float] = None,
        sampler: Sampler = "sde",
        sde_window: Optional[Tuple[int, int]] = None,
        latents: Optional[torch.Tensor] = None,
        negative_prompt: str = "",
        reduce: Reduce = "mean",
        log_prob_form: LogProbForm = "gaussian",
        eta: Optional[float] = None,
    ) -> Trajectory:
        """Sample `prompts` and record every step's latent, σ, std and log-prob.

        `sampler` is "sde" (Flow-GRPO; noise_level 0.7 by default, √2 memoryless), "cps" or "ode".
        `sde_window=(start, end)` makes only steps start..end-1 stochastic and the rest Euler ODE steps
        (Flow-GRPO-Fast / MixGRPO). `eta` is an alias of `noise_level` for code written for
        DiffusionPipeline. The returned Trajectory stores σ_k in `timesteps` [T], the noise level in
        `eta`, and in `extras`: "sigmas" [T+1] (σ_next of step k is sigmas[k+1]), "noise_levels" [T]
        (0 outside the window), "sampler", "sde_window", "reduce", "log_prob_form".
        """
        noise_level = _resolve_noise_level(noise_level, eta, default=0.7)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "cps" and noise_level > 1:
            raise ValueError(f"noise_level for sampler='cps' must lie in [0, 1] (the noise angle is a·π/2), got {noise_level}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        batch = len(prompts)
        sigmas = self.sigmas(num_inference_steps)
        levels = torch.full((num_inference_steps,), 0.0 if sampler == "ode" else float(noise_level))
        if sde_window is not None:
            start, end = sde_window
            if not (0 <= start < end <= num_inference_steps):
                raise ValueError(f"sde_window must be (start, end) with 0 <= start < end <= {num_inference_steps}, got {sde_window}")
            inside = torch.zeros(num_inference_steps, dtype=torch.bool)
            inside[start:end] = True
            levels = torch.where(inside, levels, torch.zeros_like(levels))
        prompt_embeds = self.encode_prompt(prompts)
        negative = self.encode_prompt([negative_prompt] * batch) if guidance_scale > 1.0 and self.uses_cfg else None
        x = latents.to(self.device, self.latent_dtype) if latents is not None else self.initial_latents(batch, generator)
        all_latents, log_probs, stds = [x], [], []
        for k in range(num_inference_steps):
            v = self.model_output(x, sigmas[k], prompt_embeds, negative, guidance_scale)
            step = flow_sde_step(v, sigmas[k], sigmas[k + 1], x, float(levels[k]), generator=generator,
                                 sampler=sampler, reduce=reduce, log_prob_form=log_prob_form)
            x = step.prev_sample
            all_latents.append(x)
            log_probs.append(step.log_prob)
            stds.append(step.std[0])
        return make_trajectory(all_latents, log_probs, stds, sigmas[:-1].clone(), prompts, prompt_embeds, negative,
                               self.decode(x), guidance_scale, 0.0 if sampler == "ode" else float(noise_level),
                               num_inference_steps, {"reduce": reduce, "sampler": sampler, "sigmas": sigmas,
                                                     "noise_levels": levels, "sde_window": sde_window,
                                                     "log_prob_form": log_prob_form})

    def rescore(
        self,
        trajectory: Trajectory,
        steps: Union[int, torch.Tensor],
        unet: Optional[torch.nn.Module] = None,
        detach_uncond: bool = False,
    ) -> GaussianStep:
        """Score the stored transitions latents[:, k] -> latents[:, k+1] under the current weights.

        `steps` is one step index for the whole batch or a LongTensor [B] of per-sample indices.
        Gradients flow to the network unless called under `torch.no_grad()`.
        """
        k = step_indices(trajectory, steps)
        ex = trajectory.extras
        if "sigmas" not in ex or "noise_levels" not in ex:
            raise ValueError("trajectory has no 'sigmas'/'noise_levels' extras: it was not rolled out by a FlowMatchPipeline")
        return self.score_transition(
            *stored_transitions(trajectory, k), ex["sigmas"][k], trajectory.prompt_embeds, trajectory.negative_prompt_embeds,
            trajectory.guidance_scale, ex["noise_levels"][k], trajectory.num_inference_steps, unet=unet,
            detach_uncond=detach_uncond, reduce=ex.get("reduce", "mean"), sigma_next=ex["sigmas"][k + 1],
            sampler=ex.get("sampler", "sde"), log_prob_form=ex.get("log_prob_form", "gaussian"),
        )

    def score_transition(
        self,
        sample: torch.Tensor,
        prev_sample: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        guidance_scale: float,
        noise_level: Union[float, torch.Tensor],
        num_inference_steps: int,
        unet: Optional[torch.nn.Module] = None,
        detach_uncond: bool = False,
        reduce: Reduce = "mean",
        *,
        sigma_next: Optional[torch.Tensor] = None,
        sampler: Sampler = "sde",
        log_prob_form: LogProbForm = "gaussian",
    ) -> GaussianStep:
        """Score stored transitions sample -> prev_sample starting at per-sample σ `timesteps` [B] (what replay buffers hold).

        Positionally compatible with `DiffusionPipeline.score_transition` (`noise_level` sits where
        `eta` does). σ_next is looked up in the `num_inference_steps` schedule unless given.
        """
        dev = self.device
        x = sample.to(dev)
        sig = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).cpu()
        if sig.numel() == 1:
            sig = sig.expand(x.shape[0])
        if sigma_next is None:
            sigma_next = self._next_sigma(sig, num_inference_steps)
        neg = None if negative_prompt_embeds is None else negative_prompt_embeds.to(dev)
        v = self.model_output(x, sig.to(dev), prompt_embeds.to(dev), neg, guidance_scale, unet=unet, detach_uncond=detach_uncond)
        if isinstance(noise_level, torch.Tensor):
            noise_level = noise_level.to(dev)
        return flow_sde_step(v, sig.to(dev), torch.as_tensor(sigma_next).to(dev), x, noise_level, prev_sample=prev_sample.to(dev),
                             sampler=sampler, reduce=reduce, log_prob_form=log_prob_form)

    def _next_sigma(self, sigma: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
        """σ_next for each σ of the n-step schedule; a σ not on the schedule is an error."""
        sched = self.sigmas(num_inference_steps)
        dist = (sigma[:, None] - sched[None, :-1]).abs()
        err, idx = dist.min(dim=1)
        if bool((err > 1e-6).any()):
            raise ValueError(
                f"timesteps {sigma.tolist()} are not on the {num_inference_steps}-step sigma schedule {sched.tolist()}; "
                "pass sigma_next explicitly"
            )
        return sched[idx + 1]

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        generator: GeneratorLike = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        noise_level: Optional[float] = None,
        sampler: Sampler = "sde",
        eta: Optional[float] = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for `prompts`; noise_level 0 (default) is the deterministic Euler ODE."""
        noise_level = _resolve_noise_level(noise_level, eta, default=0.0)
        return self.rollout(prompts, generator, num_inference_steps, guidance_scale, noise_level=noise_level, sampler=sampler).images


def _text_kind(kind: str, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3) -> str:
    """'clip' (UNet), 'sd3-clip' (SD3 with one CLIP), 'sd3' (two CLIPs + optional T5) or 'flux'; bad combinations raise."""
    if (text_encoder_2 is None) != (tokenizer_2 is None) or (text_encoder_3 is None) != (tokenizer_3 is None):
        raise ValueError("pass each text_encoder_N together with its tokenizer_N")
    if kind == "flux":
        if text_encoder_2 is None or text_encoder_3 is not None:
            raise ValueError("FLUX takes text_encoder (CLIP) and text_encoder_2 (T5), and no text_encoder_3")
        return "flux"
    if kind == "sd3" and text_encoder_2 is not None:
        return "sd3"
    if text_encoder_2 is not None or text_encoder_3 is not None:
        raise ValueError(f"a {kind} velocity network takes one text encoder; SD3 takes text_encoder_2 (and _3), FLUX text_encoder_2")
    return "sd3-clip" if kind == "sd3" else "clip"


def _resolve_noise_level(noise_level: Optional[float], eta: Optional[float], default: float) -> float:
    if noise_level is not None and eta is not None:
        raise ValueError(f"pass noise_level or its alias eta, not both (got noise_level={noise_level}, eta={eta})")
    value = noise_level if noise_level is not None else (eta if eta is not None else default)
    if value < 0:
        raise ValueError(f"noise_level must be >= 0, got {value}")
    return float(value)


def _has_component(path: str, name: str) -> bool:
    """True when a local folder has the subfolder `name`, or a hub repo's model_index.json names it."""
    if os.path.exists(path):
        return os.path.isdir(os.path.join(path, name))
    return _hub_has_subfolder(path, name)


def _read_class_name(path: str, sub: str) -> str:
    """`_class_name` of the component config in `sub` (local file or hub)."""
    from diffusers import ConfigMixin

    class _Reader(ConfigMixin):
        config_name = "config.json"

    return _Reader.load_config(path, subfolder=sub).get("_class_name", "UNet2DConditionModel")
