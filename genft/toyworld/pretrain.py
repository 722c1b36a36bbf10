"""Pretraining recipe for the toy world: contrastive text encoder, then a frozen-text DDPM UNet, saved atomically."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import COLORS, PALETTE, TEMPLATES, caption, heldout_prompts, render, train_combos
from .models import ImageEncoder, build_scheduler, build_text_encoder, build_unet
from .tokenizer import MODEL_MAX_LENGTH, build_tokenizer

FORMAT_VERSION = 2  # 2: cosine schedule, FiLM UNet, factorised contrastive encoder (v1 worlds did not learn digits)
META_FILE = "genft_toyworld.json"
COMPONENTS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


@dataclass
class PretrainConfig:
    """Settings of the toy-world pretraining recipe; the defaults take about 5-6 minutes on 2 CPU cores.

    Stage 1 trains the CLIP text encoder contrastively against a tiny CNN image encoder, then
    freezes it. Stage 2 trains the UNet as an epsilon-prediction DDPM on the frozen text states.
    Many small batches beat few large ones here: digit shapes must be learned under 20 colour
    pairs, and that is limited by the number of updates (batch 16 x 2400 steps reaches ~90% held-out
    digit accuracy where batch 64 x 1000 steps, about the same time, stays near 30%).
    """

    seed: int = field(default=0, metadata={"help": "Seed for weights, data and evaluation noise."})
    text_hidden_size: int = field(default=64, metadata={"help": "Width of the CLIP text encoder (and of the UNet's cross-attention)."})
    text_layers: int = field(default=2, metadata={"help": "Transformer layers in the text encoder."})
    contrastive_steps: int = field(default=800, metadata={"help": "Steps of CLIP-style InfoNCE training of the text encoder (joint + per-attribute terms) before it is frozen."})
    contrastive_batch_size: int = field(default=128, metadata={"help": "Image-caption pairs per contrastive step."})
    contrastive_lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate of the contrastive stage (cosine decay to 10%)."})
    unet_channels: tuple[int, ...] = field(default=(32, 64), metadata={"help": "UNet block_out_channels, one entry per resolution level (16x16, 8x8, ...); multiples of 8."})
    unet_layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per UNet block."})
    pooled_text: bool = field(default=True, metadata={"help": "Add attention-pooled text states to the time embedding (diffusers addition_embed_type='text'): a fast global conditioning path."})
    unet_steps: int = field(default=2400, metadata={"help": "DDPM (epsilon-prediction) training steps of the UNet."})
    batch_size: int = field(default=16, metadata={"help": "Images per UNet training step."})
    lr: float = field(default=1.5e-3, metadata={"help": "AdamW learning rate of the UNet (linear warm-up, then constant; the saved weights are the EMA)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear learning-rate warm-up steps of the UNet."})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR-gamma loss weight min(SNR, gamma)/SNR (Hang et al. 2023), which stops near-clean steps dominating; 0 disables."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Probability of replacing a caption by '' so classifier-free guidance works (the unconditional embedding is the encoding of '')."})
    ema_decay: float = field(default=0.99, metadata={"help": "Decay of the exponential moving average of UNet weights that is saved; 0 saves the raw weights."})
    eval_images_per_prompt: int = field(default=4, metadata={"help": "Samples per held-out prompt for the oracle evaluation stored with the model; 0 skips it."})
    eval_inference_steps: int = field(default=20, metadata={"help": "DDIM steps of the evaluation sampler."})
    eval_guidance_scale: float = field(default=3.0, metadata={"help": "Classifier-free guidance scale of the evaluation sampler."})
    eval_etas: tuple[float, ...] = field(default=(1.0, 0.0), metadata={"help": "DDIM etas to evaluate with (1 is DDPM-like and stochastic, 0 deterministic); one result each."})

    def __post_init__(self):
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.eval_etas = tuple(float(e) for e in self.eval_etas)
        positive = ("text_hidden_size", "text_layers", "contrastive_batch_size", "unet_layers_per_block", "batch_size", "eval_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("contrastive_steps", "unet_steps", "warmup_steps", "eval_images_per_prompt", "min_snr_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.text_hidden_size % 4:
            raise ValueError(f"PretrainConfig.text_hidden_size must be a multiple of 4 (attention heads), got {self.text_hidden_size}")
        if not 2 <= len(self.unet_channels) <= 4 or any(c < 8 or c % 8 for c in self.unet_channels):
            raise ValueError(f"PretrainConfig.unet_channels must be 2 to 4 multiples of 8 (group norm), got {self.unet_channels}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"PretrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"PretrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.contrastive_lr <= 0:
            raise ValueError(f"PretrainConfig learning rates must be > 0, got lr={self.lr}, contrastive_lr={self.contrastive_lr}")
        if any(e < 0 for e in self.eval_etas):
            raise ValueError(f"PretrainConfig.eval_etas must be >= 0, got {self.eval_etas}")


def _tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids [N, 16], padded exactly as pipelines.DiffusionPipeline.encode_prompt pads them."""
    enc = tokenizer(list(texts), padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=False, return_tensors="pt")
    if enc.input_ids.shape[1] != MODEL_MAX_LENGTH:
        raise RuntimeError(f"a caption is longer than {MODEL_MAX_LENGTH} tokens; the toy tokenizer is broken")
    return enc.input_ids


def _train_captions() -> tuple[list[str], torch.Tensor]:
    """Every caption (all templates) of every training combination, with the combination index of each."""
    combos = train_combos()
    texts = [caption(*c, template=t) for c in combos for t in range(len(TEMPLATES))]
    ids = torch.arange(len(combos)).repeat_interleave(len(TEMPLATES))
    return texts, ids


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar (disabled when `enabled` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak (contrastive stage)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _soft_infonce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with equal labels is a positive (soft, row-normalised targets)."""
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * ((-target * logits.log_softmax(1)).sum(1).mean() + (-target * logits.T.log_softmax(1)).sum(1).mean())


CONTRASTIVE_HEADS = ("joint", "digit", "fg", "bg")


def train_text_encoder(text_encoder, tokenizer, config: PretrainConfig, progress: bool = True) -> dict:
    """Stage 1: CLIP-style InfoNCE of the text encoder's pooled output vs a tiny CNN image encoder.

    Four InfoNCE terms share the two encoders, each through its own pair of linear heads: one on
    the whole (digit, fg, bg) combination and one per attribute. The per-attribute terms make the
    text states factorised (digit, stroke and background colour each linearly readable), which is
    what lets the UNet generalise to held-out combinations. Equal labels are positives (soft
    targets), so repeated combinations in a batch are not negatives. Returns stats and the proxy
    CLIP parts (image encoder and joint heads).
    """
    gen = torch.Generator().manual_seed(config.seed + 1)
    torch.manual_seed(config.seed + 2)
    dim = config.text_hidden_size
    image_encoder = ImageEncoder(dim)
    img_heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, dim, bias=False) for k in CONTRASTIVE_HEADS})
    txt_heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, dim, bias=False) for k in CONTRASTIVE_HEADS})
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    modules = (text_encoder, image_encoder, img_heads, txt_heads)
    params = [p for m in modules for p in m.parameters()] + [logit_scale]
    opt = torch.optim.AdamW(params, lr=config.contrastive_lr, weight_decay=0.01)
    combos = train_combos()
    texts, combo_of_text = _train_captions()
    all_ids = _tokenize(tokenizer, texts)
    attr = {
        "joint": torch.arange(len(combos)),
        "digit": torch.tensor([c.digit for c in combos]),
        "fg": torch.tensor([COLORS.index(c.fg) for c in combos]),
        "bg": torch.tensor([COLORS.index(c.bg) for c in combos]),
    }
    text_encoder.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = _progress(config.contrastive_steps, "toyworld 1/2 contrastive text encoder", progress)
    for step in range(config.contrastive_steps):
        for g in opt.param_groups:
            g["lr"] = config.contrastive_lr * _lr_factor(step, config.contrastive_steps, min(20, config.contrastive_steps))
        pick = torch.randint(len(texts), (config.contrastive_batch_size,), generator=gen)
        cid = combo_of_text[pick]
        images = render([combos[i] for i in cid.tolist()], generator=gen) * 2 - 1
        txt_feat = text_encoder(all_ids[pick]).pooler_output
        img_feat = image_encoder(images)
        scale = logit_scale.exp().clamp(max=100)
        loss = sum(
            _soft_infonce(scale * F.normalize(img_heads[k](img_feat), dim=-1) @ F.normalize(txt_heads[k](txt_feat), dim=-1).T, attr[k][cid])
            for k in CONTRASTIVE_HEADS
        ) / len(CONTRASTIVE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    text_encoder.eval().requires_grad_(False)
    tail = losses[-20:]
    return {
        "contrastive_seconds": round(time.perf_counter() - t0, 2),
        "contrastive_steps": config.contrastive_steps,
        "contrastive_final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "proxy_clip": {"image_encoder": image_encoder, "image_head": img_heads["joint"], "text_head": txt_heads["joint"],
                       "logit_scale": logit_scale.detach()},
    }


@torch.no_grad()
def _embedding_table(text_encoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text states of every training caption [N,16,D] plus that of '' [1,16,D] (the unconditional one)."""
    texts, _ = _train_captions()
    states = text_encoder(_tokenize(tokenizer, texts + [""]))[0]
    return states[:-1], states[-1:]


def train_unet(unet, text_encoder, tokenizer, scheduler, config: PretrainConfig, progress: bool = True):
    """Stage 2: epsilon-prediction DDPM on [-1,1] pixels, conditioned on the frozen text encoder's states.

    Returns (unet to save — the EMA copy when ema_decay > 0 — and stats).
    """
    import copy

    gen = torch.Generator().manual_seed(config.seed + 3)
    cond_table, uncond = _embedding_table(text_encoder, tokenizer)
    combos = train_combos()
    _, combo_of_text = _train_captions()
    alphas = scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    ema = copy.deepcopy(unet).requires_grad_(False) if config.ema_decay > 0 else None
    unet.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = _progress(config.unet_steps, "toyworld 2/2 unet (ddpm)", progress)
    for step in range(config.unet_steps):
        for g in opt.param_groups:
            g["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
        pick = torch.randint(len(combo_of_text), (config.batch_size,), generator=gen)
        x0 = render([combos[i] for i in combo_of_text[pick].tolist()], generator=gen) * 2 - 1
        cond = cond_table[pick].clone()
        drop = torch.rand(config.batch_size, generator=gen) < config.caption_dropout
        cond[drop] = uncond
        t = torch.randint(0, len(alphas), (config.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        per_sample = (unet(xt, t, encoder_hidden_states=cond).sample - noise).pow(2).mean((1, 2, 3))
        if config.min_snr_gamma > 0:
            snr = alphas[t] / (1 - alphas[t])
            per_sample = per_sample * snr.clamp(max=config.min_snr_gamma) / snr
        loss = per_sample.mean()
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
    unet.eval()
    tail = losses[-50:]
    stats = {
        "unet_seconds": round(time.perf_counter() - t0, 2),
        "unet_steps": config.unet_steps,
        "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
        "final_loss_is": "epsilon MSE with the min-SNR weight, mean of the last 50 steps",
    }
    return (ema if ema is not None else unet).eval(), stats


@torch.no_grad()
def evaluate_heldout(
    pipe,
    images_per_prompt: int = 4,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 120,
) -> dict:
    """Sample every held-out prompt with fixed seeds and score the images with the oracle."""
    from .oracle import OracleEvaluator

    prompts = [p for p in heldout_prompts() for _ in range(images_per_prompt)]
    images = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        images.append(pipe.sample(chunk, generator=gens, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta).cpu())
    result = OracleEvaluator().evaluate(torch.cat(images), prompts)
    out = {k: round(v, 4) for k, v in result.items() if k.endswith("_acc")}
    out.update(n=result["n"], seconds=round(time.perf_counter() - t0, 2), num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, eta=eta)
    return out


def _save_proxy_clip(directory: Path, parts: dict) -> None:
    """Save the contrastive stage's image encoder, text projection and logit scale (a proxy CLIP score)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in ("image_encoder", "image_head", "text_head"):
        tensors.update({f"{name}.{k}": v.detach().contiguous() for k, v in parts[name].state_dict().items()})
    tensors["logit_scale"] = parts["logit_scale"].reshape(1)
    save_file(tensors, str(directory / "model.safetensors"))
    dim = parts["text_head"].in_features
    (directory / "config.json").write_text(json.dumps({"dim": dim, "image_encoder_width": 32, "text_features": "pooler_output"}))


def pretrain(out_dir: str | Path, config: PretrainConfig | None = None, progress: bool = True) -> Path:
    """Pretrain the toy world into `out_dir` (written to a temporary sibling, then renamed into place).

    The folder holds unet/, text_encoder/, tokenizer/, scheduler/, model_index.json, proxy_clip/
    and genft_toyworld.json (palette, held-out prompts and the measured stats).
    """
    from genft._atomic import atomic_dir

    config = config or PretrainConfig()
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        torch.manual_seed(config.seed)
        tokenizer = build_tokenizer(tmp / "tokenizer")
        text_encoder = build_text_encoder(tokenizer, config.text_hidden_size, config.text_layers)
        stage1 = train_text_encoder(text_encoder, tokenizer, config, progress)
        torch.manual_seed(config.seed + 4)
        unet = build_unet(config.text_hidden_size, config.unet_channels, config.unet_layers_per_block, config.pooled_text)
        scheduler = build_scheduler()
        unet, stage2 = train_unet(unet, text_encoder, tokenizer, scheduler, config, progress)
        unet.save_pretrained(tmp / "unet")
        text_encoder.save_pretrained(tmp / "text_encoder")
        scheduler.save_pretrained(tmp / "scheduler")
        _save_proxy_clip(tmp / "proxy_clip", stage1.pop("proxy_clip"))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
        train_seconds = time.perf_counter() - t_start
        heldout = []
        if config.eval_images_per_prompt:
            from pipelines import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(tmp)
            for eta in config.eval_etas:
                heldout.append(evaluate_heldout(pipe, config.eval_images_per_prompt, config.eval_inference_steps,
                                                config.eval_guidance_scale, eta, seed=config.seed))
        meta = {
            "format_version": FORMAT_VERSION,
            "palette": PALETTE,
            "colors": list(COLORS),
            "templates": list(TEMPLATES),
            "heldout_prompts": heldout_prompts(),
            "config": asdict(config),
            "stats": {**stage1, **stage2, "train_seconds": round(train_seconds, 2),
                      "total_seconds": round(time.perf_counter() - t_start, 2), "heldout": heldout},
            "versions": _versions(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def _model_index() -> dict:
    """diffusers-style model_index.json naming the library and class of each component."""
    import diffusers

    return {"_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__, **COMPONENTS}


def _versions() -> dict:
    """Library versions the world was trained with (for the record)."""
    import diffusers
    import sklearn
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__}
