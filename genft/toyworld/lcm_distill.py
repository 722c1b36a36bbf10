"""A latent-consistency (LCM) model of the toy world, distilled from the cached diffusion base and cached beside it.

Consistency distillation as in LCM (Luo et al. 2023, arXiv 2310.04378): data x0 is noised to a
timestep s of the skipping-step schedule, the frozen teacher takes one guided DDIM step s -> s−k
(guidance w drawn per sample), and the student's consistency output f_θ(x_s, s, w) is pulled
towards that of an EMA target network at the teacher's landing point. The guidance scale is baked
in as the UNet's `time_cond_proj_dim` embedding, so sampling needs one UNet call per step.
`load_or_distill_lcm()` returns a `pipelines.ConsistencyPipeline` folder (LatentConsistencyModelPipeline
layout, `LCMScheduler`) plus genft_toyworld_lcm.json with the recipe and held-out oracle accuracies.
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

logger = logging.getLogger(__name__)
LCM_FORMAT_VERSION = 1
LCM_META_FILE = "genft_toyworld_lcm.json"
LCM_REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
LCM = DerivedKind("lcm", LCM_META_FILE, "lcm_format_version", LCM_FORMAT_VERSION, LCM_REQUIRED_FILES,
                  "distilled from the toy world, a few CPU minutes")


@dataclass
class LCMDistillConfig:
    """Recipe of the toy LCM: consistency distillation of the toy diffusion base with a DDIM teacher solver."""

    seed: int = field(default=0, metadata={"help": "Seed for data, timesteps, guidance scales and evaluation noise."})
    steps: int = field(default=500, metadata={"help": "Distillation steps (each: 2 teacher, 1 target and 1 student UNet pass)."})
    batch_size: int = field(default=16, metadata={"help": "Images per step."})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate of the student (linear warm-up, then constant)."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear learning-rate warm-up steps."})
    original_inference_steps: int = field(default=48, metadata={"help": "N of the skipping-step schedule: k = 1000 // N and the student learns on timesteps k−1, 2k−1, ..., N·k−1 (48: k = 20, top timestep 959, where the cosine schedule's ᾱ is still 0.004, as the base's own DDIM sampler starts at 951)."})
    skipping_step: int = field(default=120, metadata={"help": "Timesteps the teacher's DDIM step jumps (s -> s − skipping_step, at least to 0); a multiple of k = 1000 // original_inference_steps so targets land on the student's grid. LCM jumps k; larger jumps propagate the boundary condition in fewer hops (500 steps, held-out 1/2/4-step oracle accuracy: jump 20 with EMA 0.95: 0.06/0.28/0.69; jump 60: 0.84/0.90/0.93; jump 120: 0.94/0.95/0.95)."})
    guidance_min: float = field(default=1.0, metadata={"help": "Smallest classifier-free guidance scale w distilled (uniform in [guidance_min, guidance_max]); 1 is no guidance."})
    guidance_max: float = field(default=4.0, metadata={"help": "Largest guidance scale distilled."})
    time_cond_proj_dim: int = field(default=32, metadata={"help": "Width of the guidance-scale embedding the student UNet reads (diffusers time_cond_proj_dim; its projection starts at zero, so the student starts as the teacher)."})
    target_ema_decay: float = field(default=0.9, metadata={"help": "EMA decay of the target network θ⁻ (LCM: 0.95; a faster target suits the short toy run)."})
    loss: Literal["huber", "l2"] = field(default="huber", metadata={"help": "Distance between student and target outputs: LCM's pseudo-Huber sqrt(d²+c²)−c, or squared error."})
    huber_c: float = field(default=1e-3, metadata={"help": "c of the pseudo-Huber loss (LCM: 0.001)."})
    eval_images_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt for the stored oracle accuracies; 0 skips them."})
    eval_steps: tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "LCM sampler step counts evaluated (one accuracy each)."})
    eval_guidance_scale: float = field(default=3.0, metadata={"help": "Guidance scale of the evaluation sampler (embedded, one UNet pass per step)."})

    def __post_init__(self):
        self.eval_steps = tuple(int(s) for s in self.eval_steps)
        for name in ("steps", "batch_size", "original_inference_steps", "time_cond_proj_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"LCMDistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_images_per_prompt < 0:
            raise ValueError(f"LCMDistillConfig.warmup_steps ({self.warmup_steps}) and eval_images_per_prompt "
                             f"({self.eval_images_per_prompt}) must be >= 0")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"LCMDistillConfig needs 1 <= guidance_min ({self.guidance_min}) <= guidance_max ({self.guidance_max})")
        if not 0.0 <= self.target_ema_decay < 1.0:
            raise ValueError(f"LCMDistillConfig.target_ema_decay must be in [0, 1), got {self.target_ema_decay}")
        if self.lr <= 0 or self.huber_c <= 0:
            raise ValueError(f"LCMDistillConfig.lr ({self.lr}) and huber_c ({self.huber_c}) must be > 0")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"LCMDistillConfig.loss must be 'huber' or 'l2', got {self.loss!r}")
        k = 1000 // self.original_inference_steps
        if self.skipping_step < k or self.skipping_step % k:
            raise ValueError(f"LCMDistillConfig.skipping_step ({self.skipping_step}) must be a positive multiple of "
                             f"k = 1000 // original_inference_steps = {k}")
        if any(s < 1 or s > self.original_inference_steps for s in self.eval_steps):
            raise ValueError(f"LCMDistillConfig.eval_steps {self.eval_steps} must lie in 1..original_inference_steps "
                             f"({self.original_inference_steps})")


def build_lcm_scheduler(original_inference_steps: int = 48):
    """The student's `LCMScheduler`: the toy base's cosine betas, ε-prediction and x̂0 clipping, LCM boundary scalings."""
    from diffusers import LCMScheduler

    return LCMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        clip_sample=True, set_alpha_to_one=False, original_inference_steps=original_inference_steps,
                        timestep_scaling=10.0)


def student_from_teacher(teacher, time_cond_proj_dim: int):
    """A copy of the teacher UNet that also reads a guidance embedding (`time_cond_proj_dim`), zero-initialised."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": time_cond_proj_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"student/teacher UNet mismatch: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def skipping_schedule(original_inference_steps: int, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, int]:
    """(LCM's training timesteps k−1, 2k−1, ..., N·k−1 [N], k), as `LCMScheduler.set_timesteps` derives them."""
    k = num_train_timesteps // original_inference_steps
    return torch.arange(1, original_inference_steps + 1) * k - 1, k


def distillation_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", c: float = 1e-3) -> torch.Tensor:
    """Per-sample mean-over-dims distance: pseudo-Huber sqrt((p−t)² + c²) − c (LCM) or squared error."""
    d = (pred.float() - target.float())
    per = (d.pow(2) + c * c).sqrt() - c if kind == "huber" else d.pow(2)
    return per.flatten(1).mean(1)


def distill_unet(teacher, teacher_scheduler, cond_table: torch.Tensor, uncond: torch.Tensor, combo_of_text: torch.Tensor,
                 config: LCMDistillConfig, progress: bool = True):
    """Consistency-distil `teacher` on rendered training combinations; returns (student unet, stats)."""
    from pipelines import consistency_output, ddim_step, guidance_scale_embedding

    from .pretrain import _progress

    gen = torch.Generator().manual_seed(config.seed + 5)
    torch.manual_seed(config.seed + 6)
    combos = train_combos()
    teacher = teacher.eval().requires_grad_(False)
    student = student_from_teacher(teacher, config.time_cond_proj_dim).train()
    target = copy.deepcopy(student).requires_grad_(False).eval()
    lcm = build_lcm_scheduler(config.original_inference_steps)
    origins, _ = skipping_schedule(config.original_inference_steps)
    alphas = teacher_scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = _progress(config.steps, "toyworld lcm (consistency distillation)", progress)
    b = config.batch_size
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        pick = torch.randint(len(combo_of_text), (b,), generator=gen)
        x0 = render([combos[i] for i in combo_of_text[pick].tolist()], generator=gen) * 2 - 1
        cond = cond_table[pick]
        w = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(b, generator=gen)
        w_emb = guidance_scale_embedding(w, config.time_cond_proj_dim, b)
        s = origins[torch.randint(len(origins), (b,), generator=gen)]
        t = (s - config.skipping_step).clamp(min=0)
        a = alphas[s].view(-1, 1, 1, 1)
        x_s = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            eps = teacher(torch.cat([x_s, x_s]), torch.cat([s, s]),
                          encoder_hidden_states=torch.cat([uncond.expand(b, -1, -1), cond])).sample
            eps_u, eps_c = eps.chunk(2)
            eps_w = eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)
            x_t = ddim_step(eps_w, s, x_s, teacher_scheduler, eta=0.0, prev_timestep=t).prev_sample
            tgt = consistency_output(target(x_t, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample, t, x_t, lcm)
        pred = consistency_output(student(x_s, s, encoder_hidden_states=cond, timestep_cond=w_emb).sample, s, x_s, lcm)
        loss = distillation_loss(pred, tgt, config.loss, config.huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 1 - config.target_ema_decay)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    tail = losses[-50:]
    stats = {"distill_seconds": round(time.perf_counter() - t0, 2), "distill_steps": config.steps,
             "final_loss": round(sum(tail) / len(tail), 6) if tail else None,
             "final_loss_is": f"{config.loss} consistency loss (mean over dims), mean of the last 50 steps"}
    return student.eval(), stats


def evaluate_lcm(pipe, config: LCMDistillConfig) -> list:
    """Held-out oracle accuracy of the LCM sampler at each of `config.eval_steps` (fixed seeds)."""
    from .pretrain import evaluate_heldout

    out = []
    for n in config.eval_steps:
        r = evaluate_heldout(pipe, config.eval_images_per_prompt, n, config.eval_guidance_scale, eta=1.0, seed=config.seed)
        r["sampler"] = "lcm multistep"
        out.append(r)
    return out


def distill_lcm(out_dir: str | Path, world_dir: str | Path, config: LCMDistillConfig | None = None, progress: bool = True) -> Path:
    """Distil the toy world at `world_dir` into an LCM written atomically to `out_dir` (text side copied unchanged)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines import ConsistencyPipeline

    from .cache import validate_world
    from .pretrain import _embedding_table, _train_captions, _versions

    config = config or LCMDistillConfig()
    world_dir = Path(world_dir)
    world_meta = validate_world(world_dir)
    t_start = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(str(world_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(world_dir / "text_encoder")).eval().requires_grad_(False)
    teacher = UNet2DConditionModel.from_pretrained(str(world_dir / "unet"))
    teacher_scheduler = DDIMScheduler.from_pretrained(str(world_dir / "scheduler"))
    cond_table, uncond = _embedding_table(text_encoder, tokenizer)
    _, combo_of_text = _train_captions()
    unet, stats = distill_unet(teacher, teacher_scheduler, cond_table, uncond, combo_of_text, config, progress)
    pipe = ConsistencyPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                               scheduler=build_lcm_scheduler(config.original_inference_steps))
    train_seconds = time.perf_counter() - t_start
    heldout = evaluate_lcm(pipe, config) if config.eval_images_per_prompt else []
    return derived.save(LCM, pipe, out_dir, world_dir, world_meta, asdict(config), stats, t_start, train_seconds, heldout,
                        _versions())


def default_lcm_cache_dir(world_dir: str | Path | None = None) -> Path:
    """`<world folder>-lcm`, beside the diffusion world (default: `default_cache_dir()`)."""
    return derived.default_dir(LCM, world_dir)


def validate_lcm_world(path: str | Path) -> dict:
    """The folder's genft_toyworld_lcm.json if it is a complete, current toy LCM; else a ValueError saying what is wrong."""
    return derived.validate(LCM, path)


def load_or_distill_lcm(cache_dir: str | Path | None = None, world_dir: str | Path | None = None, progress: bool = True,
                        config: LCMDistillConfig | None = None) -> Path:
    """The toy LCM folder (default `<world>-lcm`), distilled first when absent or broken (the world too, if needed)."""
    return derived.load_or_build(LCM, cache_dir, world_dir, progress,
                                 lambda path, world: distill_lcm(path, world, config=config, progress=progress))
