"""A rectified-flow base model for the toy world, trained on the cached world's frozen text encoder and cached beside it.

`load_or_pretrain_flow()` returns a `pipelines.FlowMatchPipeline` folder (unet/ velocity model,
text_encoder/, tokenizer/, scheduler/, model_index.json with genft_family "flow") plus
genft_toyworld_flow.json with the recipe and its held-out oracle accuracy. The text encoder and
tokenizer are copied unchanged from the diffusion world (`load_or_pretrain()`), so both bases read
prompts the same way.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import derived
from .data import render, train_combos
from .derived import DerivedKind
from .models import build_unet

logger = logging.getLogger(__name__)
FLOW_FORMAT_VERSION = 1
FLOW_META_FILE = "genft_toyworld_flow.json"
FLOW_REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
FLOW = DerivedKind("flow", FLOW_META_FILE, "flow_format_version", FLOW_FORMAT_VERSION, FLOW_REQUIRED_FILES,
                   "about 3-4 minutes on 2 CPU cores")
MIRROR = DerivedKind("mirror", FLOW_META_FILE, "flow_format_version", FLOW_FORMAT_VERSION, FLOW_REQUIRED_FILES,
                     "about 3-4 minutes on 2 CPU cores")


@dataclass
class FlowPretrainConfig:
    """Recipe of the toy flow base: v-prediction rectified flow x_σ = (1−σ)x0 + σε, target v = ε − x0.

    The UNet is the diffusion world's architecture; σ is drawn logit-normal (SD3) or uniform, captions
    are dropped to '' for classifier-free guidance, and the EMA weights are saved.
    """

    seed: int = field(default=0, metadata={"help": "Seed for weights, data and evaluation noise."})
    unet_channels: tuple[int, ...] = field(default=(32, 64), metadata={"help": "UNet block_out_channels per level (16x16, 8x8, ...)."})
    unet_layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per UNet block."})
    pooled_text: bool = field(default=True, metadata={"help": "FiLM the ResNets with attention-pooled text states (as the diffusion world)."})
    steps: int = field(default=1400, metadata={"help": "Flow-matching training steps (1400: 0.98 held-out oracle accuracy, about 3-4 minutes on 2 free cores)."})
    batch_size: int = field(default=16, metadata={"help": "Images per step."})
    lr: float = field(default=1.5e-3, metadata={"help": "Peak AdamW learning rate (linear warm-up, then constant)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear learning-rate warm-up steps."})
    sigma_sampling: Literal["logit_normal", "uniform"] = field(default="logit_normal", metadata={"help": "σ ~ sigmoid(N(mean, std)) (SD3) or U(0, 1)."})
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal σ distribution."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal σ distribution."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Probability of training on the '' caption (the CFG unconditional branch)."})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the saved weights; 0 saves the raw weights."})
    shift: float = field(default=1.0, metadata={"help": "FlowMatchEulerDiscreteScheduler shift of the sampling schedule."})
    eval_images_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt for the stored oracle accuracy; 0 skips it."})
    eval_inference_steps: int = field(default=20, metadata={"help": "Euler ODE steps of the evaluation sampler."})
    eval_guidance_scale: float = field(default=3.0, metadata={"help": "CFG scale of the evaluation sampler."})
    mirror: Literal["none", "box_regularized", "box_entropic"] = field(default="none", metadata={"help": "Train in the dual space of this pixel-box mirror map (Mirror Flow Matching); 'none' trains on pixels in [-1, 1]."})
    mirror_kappa: float = field(default=0.3, metadata={"help": "κ of the regularised box mirror map (the paper's 0.3); dual moments are finite below order 1/κ."})

    def __post_init__(self):
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        for name in ("steps", "batch_size", "unet_layers_per_block", "eval_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"FlowPretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_images_per_prompt < 0:
            raise ValueError(f"FlowPretrainConfig.warmup_steps ({self.warmup_steps}) and eval_images_per_prompt "
                             f"({self.eval_images_per_prompt}) must be >= 0")
        if self.sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"FlowPretrainConfig.sigma_sampling must be 'logit_normal' or 'uniform', got {self.sigma_sampling!r}")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"FlowPretrainConfig.caption_dropout ({self.caption_dropout}) and ema_decay ({self.ema_decay}) must be in [0, 1)")
        if self.mirror not in ("none", "box_regularized", "box_entropic"):
            raise ValueError(f"FlowPretrainConfig.mirror must be 'none', 'box_regularized' or 'box_entropic', got {self.mirror!r}")
        if not 0.0 < self.mirror_kappa < 1.0:
            raise ValueError(f"FlowPretrainConfig.mirror_kappa must lie in (0, 1), got {self.mirror_kappa}")
        if self.lr <= 0 or self.logit_std <= 0 or self.shift <= 0:
            raise ValueError(f"FlowPretrainConfig.lr ({self.lr}), logit_std ({self.logit_std}) and shift ({self.shift}) must be > 0")


def build_mirror_map(config: FlowPretrainConfig):
    """The recipe's pixel-box mirror map, or None for a plain pixel-space flow."""
    if config.mirror == "none":
        return None
    from pipelines import mirror_map

    return mirror_map(config.mirror, **({"kappa": config.mirror_kappa} if config.mirror == "box_regularized" else {}))


def training_targets(images: torch.Tensor, mirror) -> torch.Tensor:
    """What the velocity network learns to generate: pixels in [-1, 1], or their dual coordinates ∇Ψ(x) under `mirror`."""
    return images * 2 - 1 if mirror is None else mirror.to_dual(images)


def sample_sigmas(n: int, config: FlowPretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels σ ∈ (0, 1) [n] from the recipe's distribution."""
    if config.sigma_sampling == "uniform":
        return torch.rand(n, generator=generator).clamp(1e-4, 1 - 1e-4)
    return torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(n, generator=generator))


def flow_matching_loss(unet, x0: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                       num_train_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample mean-over-dims ‖v_θ(x_σ, σ) − (ε − x0)‖² at x_σ = (1−σ)x0 + σε (the network sees t = σ·1000)."""
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    v = unet(x, sigma * num_train_timesteps, encoder_hidden_states=cond).sample
    return (v.float() - (noise - x0)).pow(2).flatten(1).mean(1)


def train_flow_unet(unet, cond_table: torch.Tensor, uncond: torch.Tensor, combo_of_text: torch.Tensor,
                    config: FlowPretrainConfig, progress: bool = True):
    """Train `unet` as a velocity model on rendered training combinations; returns (saved unet, stats)."""
    from .pretrain import _progress

    gen = torch.Generator().manual_seed(config.seed + 3)
    combos = train_combos()
    mirror = build_mirror_map(config)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    ema = copy.deepcopy(unet).requires_grad_(False) if config.ema_decay > 0 else None
    unet.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = _progress(config.steps, "toyworld flow base (rectified flow)", progress)
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        pick = torch.randint(len(combo_of_text), (config.batch_size,), generator=gen)
        x0 = training_targets(render([combos[i] for i in combo_of_text[pick].tolist()], generator=gen), mirror)
        cond = cond_table[pick].clone()
        cond[torch.rand(config.batch_size, generator=gen) < config.caption_dropout] = uncond
        sigma = sample_sigmas(config.batch_size, config, gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_matching_loss(unet, x0, cond, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    tail = losses[-50:]
    stats = {"flow_seconds": round(time.perf_counter() - t0, 2), "flow_steps": config.steps,
             "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
             "final_loss_is": "velocity MSE (mean over dims), mean of the last 50 steps"}
    return (ema if ema is not None else unet.eval()).eval(), stats


def build_flow_scheduler(shift: float = 1.0):
    """The σ schedule of the flow base: diffusers' FlowMatchEulerDiscreteScheduler, 1000 train steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def pretrain_flow(out_dir: str | Path, world_dir: str | Path, config: FlowPretrainConfig | None = None,
                  progress: bool = True) -> Path:
    """Train the flow base on the frozen text encoder of the toy world at `world_dir`; written atomically to `out_dir`."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines import FlowMatchPipeline, MirrorFlowMatchPipeline

    from .cache import validate_world
    from .pretrain import _embedding_table, _train_captions, _versions, evaluate_heldout

    config = config or FlowPretrainConfig()
    world_dir = Path(world_dir)
    world_meta = validate_world(world_dir)
    t_start = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(str(world_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(world_dir / "text_encoder")).eval().requires_grad_(False)
    cond_table, uncond = _embedding_table(text_encoder, tokenizer)
    _, combo_of_text = _train_captions()
    torch.manual_seed(config.seed + 4)
    unet = build_unet(text_encoder.config.hidden_size, config.unet_channels, config.unet_layers_per_block, config.pooled_text)
    unet, stats = train_flow_unet(unet, cond_table, uncond, combo_of_text, config, progress)
    mirror = build_mirror_map(config)
    if mirror is None:
        pipe = FlowMatchPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=build_flow_scheduler(config.shift))
    else:
        pipe = MirrorFlowMatchPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=build_flow_scheduler(config.shift), mirror=mirror)
    train_seconds = time.perf_counter() - t_start
    heldout = None
    if config.eval_images_per_prompt:
        heldout = evaluate_heldout(pipe, config.eval_images_per_prompt, config.eval_inference_steps,
                                   config.eval_guidance_scale, eta=0.0, seed=config.seed)
        heldout["sampler"] = "euler ode"
    return derived.save(FLOW, pipe, out_dir, world_dir, world_meta, asdict(config), stats, t_start, train_seconds, heldout,
                        _versions())


def default_flow_cache_dir(world_dir: str | Path | None = None) -> Path:
    """`<world folder>-flow`, beside the diffusion world (default: `default_cache_dir()`)."""
    return derived.default_dir(FLOW, world_dir)


def validate_flow_world(path: str | Path) -> dict:
    """The folder's genft_toyworld_flow.json if it is a complete, current flow base; else a ValueError saying what is wrong."""
    return derived.validate(FLOW, path)


def load_or_pretrain_flow(cache_dir: str | Path | None = None, world_dir: str | Path | None = None, progress: bool = True,
                          config: FlowPretrainConfig | None = None) -> Path:
    """The flow base folder (default `<world>-flow`), trained first when absent or broken (the world too, if needed)."""
    return derived.load_or_build(FLOW, cache_dir, world_dir, progress,
                                 lambda path, world: pretrain_flow(path, world, config=config, progress=progress))


def default_mirror_cache_dir(world_dir: str | Path | None = None) -> Path:
    """`<world folder>-mirror`, beside the diffusion world (default: `default_cache_dir()`)."""
    return derived.default_dir(MIRROR, world_dir)


def validate_mirror_world(path: str | Path) -> dict:
    """`validate_flow_world` plus: the folder holds a mirror pipeline (mirror/mirror_config.json, recipe with a mirror)."""
    meta = validate_flow_world(path)
    if meta.get("config", {}).get("mirror", "none") == "none" or not (Path(path) / "mirror" / "mirror_config.json").is_file():
        raise ValueError(f"{path} is a flow base without a mirror map (missing mirror/mirror_config.json)")
    return meta


def load_or_pretrain_mirror(cache_dir: str | Path | None = None, world_dir: str | Path | None = None, progress: bool = True,
                            config: FlowPretrainConfig | None = None) -> Path:
    """The toy mirror-flow base (default `<world>-mirror`): the flow recipe trained in the dual space of the
    regularised box mirror map, so its samples never leave [0, 1]; trained first when absent or broken."""
    config = config or FlowPretrainConfig(mirror="box_regularized")

    def build(path: Path, world: Path) -> Path:
        if config.mirror == "none":
            raise ValueError("load_or_pretrain_mirror needs a config with mirror set, e.g. FlowPretrainConfig(mirror='box_regularized')")
        return pretrain_flow(path, world, config=config, progress=progress)

    return derived.load_or_build(MIRROR, cache_dir, world_dir, progress, build, check=validate_mirror_world)
