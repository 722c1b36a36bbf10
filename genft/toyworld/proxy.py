"""The toy world's learned proxy reward: a tiny open_clip CLIP trained contrastively on clean composed images.

The proxy is deliberately only a proxy. It sees clean renders of the training prompts (real sklearn
digits from a fixed training split of the digit images), never generator samples, so it is accurate
in distribution yet exploitable by a generator that drifts off it; `ToyOracleReward` is the truth it
is judged against. The trained model is saved in open_clip's `local-dir:` hub format
(`open_clip_config.json` + `open_clip_model.safetensors`) and cached beside the toy world.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from reward_models.clip_score import CLIPScore

from .data import (COLORS, IMAGE_SIZE, PALETTE, TEMPLATES, Combo, _digits, all_combos, caption, heldout_combos,
                   heldout_prompts, render, train_combos)
from .pretrain import _lr_factor, _progress  # the schedule and bar of the world's own contrastive stage

logger = logging.getLogger(__name__)

PROXY_FORMAT_VERSION = 1
PROXY_META_FILE = "genft_toy_proxy.json"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# Images in [0,1] are mapped to [-1,1] before the vision tower; recorded in preprocess_cfg for loaders.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
DIGIT_SPLIT_SEED = 20240607  # fixed, so the held-out digit images never depend on the proxy's own seed


@dataclass
class ProxyConfig:
    """Settings of the proxy-CLIP recipe; the defaults train in about 70 s on one idle CPU core.

    A 3-layer ViT (16x16 images, 4x4 patches) and a 1-layer open_clip text transformer, width 64,
    trained with CLIP's symmetric InfoNCE (Radford et al. 2021) and a learnable logit scale, on every
    caption template of the training combinations only.
    """

    seed: int = field(default=0, metadata={"help": "Seed for weights, batches and the evaluation renders."})
    embed_dim: int = field(default=64, metadata={"help": "Width of the joint image-text embedding space."})
    vision_width: int = field(default=64, metadata={"help": "Width of the ViT image tower."})
    vision_layers: int = field(default=3, metadata={"help": "Transformer layers of the ViT image tower."})
    vision_head_width: int = field(default=16, metadata={"help": "Width of one ViT attention head (heads = vision_width / vision_head_width)."})
    patch_size: int = field(default=4, metadata={"help": "ViT patch size in pixels; must divide the 16-pixel toy image size."})
    text_width: int = field(default=64, metadata={"help": "Width of the text transformer."})
    text_layers: int = field(default=1, metadata={"help": "Layers of the text transformer."})
    text_heads: int = field(default=4, metadata={"help": "Attention heads of the text transformer."})
    context_length: int = field(default=16, metadata={"help": "Tokens per caption for open_clip's SimpleTokenizer (the longest toy caption needs 12)."})
    steps: int = field(default=700, metadata={"help": "Contrastive training steps."})
    batch_size: int = field(default=128, metadata={"help": "Image-caption pairs per step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (linear warm-up, then cosine decay to 10%)."})
    warmup_steps: int = field(default=40, metadata={"help": "Linear learning-rate warm-up steps."})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay of matrices (not of gains, biases, position embeddings or the logit scale)."})
    false_negatives: str = field(default="combo", metadata={
        "help": "Off-diagonal pairs masked out of the InfoNCE denominators: 'combo' (same digit and colours, any "
                "template, so identical captions too) or 'caption' (identical caption text only)."})
    digit_holdout_fraction: float = field(default=0.2, metadata={
        "help": "Fraction of the sklearn digit images (per class, fixed split) never shown in training; evaluation renders use them."})
    eval_images_per_combo: int = field(default=8, metadata={
        "help": "Clean renders per combination for the retrieval accuracy stored with the model; 0 skips it."})

    def __post_init__(self):
        for name in ("embed_dim", "vision_width", "vision_layers", "vision_head_width", "patch_size", "text_width",
                     "text_layers", "text_heads", "context_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProxyConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "eval_images_per_combo"):
            if getattr(self, name) < 0:
                raise ValueError(f"ProxyConfig.{name} must be >= 0, got {getattr(self, name)}")
        if IMAGE_SIZE % self.patch_size:
            raise ValueError(f"ProxyConfig.patch_size must divide the image size {IMAGE_SIZE}, got {self.patch_size}")
        if self.vision_width % self.vision_head_width:
            raise ValueError(f"ProxyConfig.vision_width ({self.vision_width}) must be a multiple of vision_head_width ({self.vision_head_width})")
        if self.text_width % self.text_heads:
            raise ValueError(f"ProxyConfig.text_width ({self.text_width}) must be a multiple of text_heads ({self.text_heads})")
        if self.context_length < 12:
            raise ValueError(f"ProxyConfig.context_length must be >= 12 (the longest toy caption), got {self.context_length}")
        if self.false_negatives not in ("combo", "caption"):
            raise ValueError(f"ProxyConfig.false_negatives must be 'combo' or 'caption', got {self.false_negatives!r}")
        if not 0.0 < self.digit_holdout_fraction < 1.0:
            raise ValueError(f"ProxyConfig.digit_holdout_fraction must be in (0, 1), got {self.digit_holdout_fraction}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"ProxyConfig needs lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")

    def model_cfg(self) -> dict:
        """The open_clip `model_cfg` (keyword arguments of `open_clip.CLIP`) this config describes."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": self.patch_size, "width": self.vision_width,
                           "layers": self.vision_layers, "head_width": self.vision_head_width},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


def preprocess_cfg() -> dict:
    """open_clip `preprocess_cfg` of the proxy: native 16x16 input, [0,1] mapped to [-1,1]."""
    return {"size": IMAGE_SIZE, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "interpolation": "bilinear", "resize_mode": "squash"}


def build_proxy_model(model_cfg: dict) -> torch.nn.Module:
    """An untrained `open_clip.CLIP` from a model_cfg dict (as stored in open_clip_config.json)."""
    import open_clip

    kwargs = dict(model_cfg)
    kwargs["vision_cfg"] = open_clip.CLIPVisionCfg(**model_cfg["vision_cfg"])
    kwargs["text_cfg"] = open_clip.CLIPTextCfg(**model_cfg["text_cfg"])
    model = open_clip.CLIP(**kwargs)
    model.genft_model_cfg = json.loads(json.dumps(model_cfg))  # a plain copy, saved as open_clip_config.json
    model.visual.preprocess_cfg = preprocess_cfg()  # what open_clip's factory attaches on load
    return model


def build_tokenizer(context_length: int) -> Callable:
    """open_clip's bundled BPE tokenizer (no download) with the proxy's context length."""
    import open_clip

    return open_clip.SimpleTokenizer(context_length=context_length)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Map images in [0,1] to the vision tower's input scale (mean/std of preprocess_cfg)."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def masked_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP InfoNCE in which off-diagonal pairs of the same group are dropped from the denominators.

    Row i's positive is column i. When `groups[i] == groups[j]` (i != j), caption j also describes
    image i, so that pair is a false negative: it is masked to -inf rather than pushed apart.
    Features are L2-normalised here; `logit_scale` is the log of the inverse temperature.
    """
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    n = logits.shape[0]
    if groups is not None:
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape [{n}], got {tuple(groups.shape)}")
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def digit_split(holdout_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed per-class split of the 1,797 sklearn digit indices into (train, held-out) index tensors."""
    _, labels = _digits()
    gen = torch.Generator().manual_seed(DIGIT_SPLIT_SEED)
    train, held = [], []
    for d in range(10):
        idx = (labels == d).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, round(holdout_fraction * len(idx)))
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def render_from(combos: Sequence[Combo], pool: torch.Tensor, generator: torch.Generator, augment: bool = True) -> torch.Tensor:
    """Render combos [N,3,16,16] using only the sklearn digit images whose indices are in `pool`."""
    _, labels = _digits()
    pool_labels = labels[pool]
    wanted = torch.tensor([c.digit for c in combos], dtype=torch.long)
    indices = torch.empty(len(combos), dtype=torch.long)
    for d in wanted.unique().tolist():
        cands = pool[pool_labels == d]
        sel = (wanted == d).nonzero().flatten()
        indices[sel] = cands[torch.randint(len(cands), (len(sel),), generator=generator)]
    return render(combos, generator=generator, augment=augment, indices=indices)


@torch.no_grad()
def cosine_scores(model, tokenizer, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Cosine similarity [B] between each image in [0,1] and its prompt under the proxy CLIP."""
    img = F.normalize(model.encode_image(normalize_images(images.float())), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(list(prompts))), dim=-1)
    return (img * txt).sum(-1)


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, combos: Sequence[Combo], images: torch.Tensor,
                       candidates: Sequence[Combo] | None = None) -> float:
    """Top-1 accuracy of picking each image's canonical caption among those of `candidates` (default: all 200 combinations)."""
    candidates = [Combo(*c) for c in (candidates if candidates is not None else all_combos())]
    txt = F.normalize(model.encode_text(tokenizer([caption(*c) for c in candidates])), dim=-1)
    img = F.normalize(model.encode_image(normalize_images(images)), dim=-1)
    pred = (img @ txt.T).argmax(-1)
    truth = torch.tensor([candidates.index(Combo(*c)) for c in combos])
    return (pred == truth).float().mean().item()


def _param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only (not gains, biases, embeddings of position, logit scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "positional_embedding" in name or "class_embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_proxy_clip(config: ProxyConfig | None = None, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the proxy CLIP by the recipe in `config`; return (model in eval mode, stats dict).

    Batches draw random (training combination, template) captions and render them from the
    training split of the digit images with the world's colour/stroke jitter. Stats include the
    training time and top-1 caption retrieval on clean renders of train and held-out combinations
    from held-out digit images.
    """
    config = config or ProxyConfig()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    model = build_proxy_model(config.model_cfg())
    tokenizer = build_tokenizer(config.context_length)
    train_digits, held_digits = digit_split(config.digit_holdout_fraction)
    combos = train_combos()
    texts = [caption(*c, template=t) for c in combos for t in range(len(TEMPLATES))]
    combo_of_text = torch.arange(len(combos)).repeat_interleave(len(TEMPLATES))
    all_ids = tokenizer(texts)
    group_of_text = combo_of_text if config.false_negatives == "combo" else torch.arange(len(texts))
    opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = _progress(config.steps, "toyworld proxy clip", progress)
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = config.lr * _lr_factor(step, config.steps, min(config.warmup_steps, config.steps))
        pick = torch.randint(len(texts), (config.batch_size,), generator=gen)
        images = render_from([combos[i] for i in combo_of_text[pick].tolist()], train_digits, gen)
        img_feat = model.encode_image(normalize_images(images))
        txt_feat = model.encode_text(all_ids[pick])
        loss = masked_clip_loss(img_feat, txt_feat, model.logit_scale, group_of_text[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the inverse temperature
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval().requires_grad_(False)
    tail = losses[-20:]
    stats: dict = {
        "train_seconds": round(time.perf_counter() - t0, 2),
        "steps": config.steps,
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "logit_scale": round(model.logit_scale.exp().item(), 2),
    }
    if config.eval_images_per_combo:
        eval_gen = torch.Generator().manual_seed(config.seed + 2)
        for split, pool in (("train", train_combos()), ("heldout", heldout_combos())):
            cs = [c for c in pool for _ in range(config.eval_images_per_combo)]
            images = render_from(cs, held_digits, eval_gen, augment=False)
            stats[f"retrieval_top1_{split}"] = round(retrieval_accuracy(model, tokenizer, cs, images), 4)
            if split == "heldout":
                stats["retrieval_top1_heldout_among_heldout"] = round(retrieval_accuracy(model, tokenizer, cs, images, pool), 4)
        stats["retrieval_is"] = ("top-1 canonical caption of clean renders (held-out digit images) among all 200 "
                                 "captions, or among the 30 held-out ones (_among_heldout)")
    return model, stats


def save_proxy(model: torch.nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write `model` to the folder `path` in open_clip's local-dir format, atomically (temp sibling, then rename)."""
    from safetensors.torch import save_file

    from genft._atomic import atomic_dir

    path = Path(path)
    cfg = {"model_cfg": _model_cfg_of(model), "preprocess_cfg": preprocess_cfg()}
    with atomic_dir(path) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        (tmp / PROXY_META_FILE).write_text(json.dumps({**_world_identity(), **(meta or {})}, indent=2))
    return path


def _model_cfg_of(model) -> dict:
    """The model_cfg a proxy was built from (kept on the model by `train_proxy_clip`/`load_proxy`)."""
    cfg = getattr(model, "genft_model_cfg", None)
    if cfg is None:
        raise ValueError("this model has no genft_model_cfg; build it with build_proxy_model/train_proxy_clip")
    return cfg


def _world_identity() -> dict:
    """What ties a proxy to this world definition and this proxy format."""
    return {"format_version": PROXY_FORMAT_VERSION, "palette": {k: list(v) for k, v in PALETTE.items()},
            "heldout_prompts": heldout_prompts(), "colors": list(COLORS)}


def default_proxy_dir() -> Path:
    """Where the proxy is cached: beside the toy world, `<default_cache_dir()>-proxy` (e.g. $GENFT_HOME/toyworld-v2-proxy)."""
    from .cache import default_cache_dir

    world = default_cache_dir()
    return world.with_name(f"{world.name}-proxy")


def validate_proxy(path: str | Path) -> dict:
    """Return the folder's genft_toy_proxy.json if it holds a complete, current proxy; else raise ValueError saying what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist or is not a folder")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, PROXY_META_FILE) if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path} is not a complete toy proxy CLIP: missing {', '.join(missing)}")
    try:
        meta = json.loads((path / PROXY_META_FILE).read_text(encoding="utf-8"))
        cfg = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable proxy metadata ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ValueError(f"{path / CONFIG_FILE} has no 'model_cfg' object; it is not an open_clip local-dir config")
    if not isinstance(meta, dict) or meta.get("format_version") != PROXY_FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: proxy format_version {found!r}, this genft expects {PROXY_FORMAT_VERSION}")
    if {k: meta.get(k) for k in ("palette", "heldout_prompts", "colors")} != {k: v for k, v in _world_identity().items() if k != "format_version"}:
        raise ValueError(f"{path} was trained for a different world definition (palette or held-out prompts differ)")
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise ValueError(f"{path / WEIGHTS_FILE} is corrupt ({type(e).__name__}: {e})") from e
    return meta


def load_proxy(path: str | Path) -> tuple[torch.nn.Module, Callable]:
    """Load a validated proxy folder through open_clip's `local-dir:` loader; returns (model in eval mode, tokenizer)."""
    import open_clip

    path = Path(path)
    validate_proxy(path)
    model = open_clip.create_model_from_pretrained(f"local-dir:{path}", return_transform=False)
    model.genft_model_cfg = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(f"local-dir:{path}")


def load_or_train_proxy(cache_dir: str | Path | None = None, progress: bool = True, config: ProxyConfig | None = None) -> Path:
    """Return the proxy folder `cache_dir` (default: default_proxy_dir()), training it first if absent or broken.

    `config` only matters when the proxy has to be (re)trained; an existing valid folder is returned as is.
    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_proxy_dir()
    try:
        validate_proxy(path)
        return path
    except ValueError as e:
        if path.exists():
            logger.warning("toy proxy CLIP at %s is unusable (%s); retraining it", path, e)
        else:
            logger.warning("no toy proxy CLIP at %s yet; training it (about 70 s of CPU)", path)
    config = config or ProxyConfig()
    model, stats = train_proxy_clip(config, progress=progress)
    return save_proxy(model, path, meta={"config": asdict(config), "stats": stats, "versions": _versions()})


def _versions() -> dict:
    """Library versions the proxy was trained with (for the record)."""
    import open_clip

    return {"torch": torch.__version__, "open_clip": open_clip.__version__}


class ToyProxyCLIPScore(CLIPScore):
    """CLIPScore (2.5 * max(cos, 0) by default) under the toy world's proxy CLIP: the hackable proxy reward.

    `path` is a proxy folder; None uses the cached one (`load_or_train_proxy()`, trained on first use,
    about a minute). Every other argument is CLIPScore's. Judge what it rewards with `ToyOracleReward`.
    """

    name = "toy_proxy_clip"

    def __init__(self, path: str | Path | None = None, *, mode: str = "clipscore", scale: float | None = None,
                 device=None, dtype: torch.dtype | None = None, batch_size: int | None = None,
                 differentiable: bool = False, progress: bool = False):
        folder = Path(path).expanduser() if path is not None else load_or_train_proxy(progress=progress)
        validate_proxy(folder)
        super().__init__(str(folder), mode=mode, scale=scale, device=device, dtype=dtype, batch_size=batch_size,
                         differentiable=differentiable)
        self.path = folder
