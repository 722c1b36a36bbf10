"""CLIPScore (Hessel et al., 2021): w · max(cos(image, prompt), 0) with an open_clip model.

Also home of the open_clip loading helpers that the aesthetic and HPS rewards share.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ._base import DeviceLike, RewardModel
from ._preprocess import ImagePreprocess, from_open_clip

_LOCAL = "local-dir:"
_HUB = "hf-hub:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip_torch is a dependency
        raise ImportError("this reward needs open_clip: pip install open_clip_torch") from e
    return open_clip


def resolve_open_clip_name(model: str, pretrained: Optional[str], *, need_weights: bool = True
                           ) -> Tuple[str, Optional[str], bool]:
    """Turn a user's `model`/`pretrained` into open_clip's (model_name, pretrained, force_quick_gelu).

    `model` is a built-in architecture name (then `pretrained` is a tag or a checkpoint file; None: 'openai'),
    'hf-hub:org/repo', 'local-dir:/path', or a plain path to a folder holding open_clip_config.json and weights.
    """
    oc = _open_clip()
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be an open_clip name, 'hf-hub:org/repo' or a folder path, got {model!r}")
    path = model[len(_LOCAL):] if model.startswith(_LOCAL) else model
    looks_like_path = os.sep in model or model.startswith((".", "~")) or os.path.isdir(os.path.expanduser(model))
    if model.startswith(_LOCAL) or (looks_like_path and not model.startswith(_HUB)):
        folder = Path(os.path.expanduser(path))
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {str(folder)!r} does not exist; pass an existing folder with "
                                    "open_clip_config.json, an open_clip name such as 'ViT-B-32', or 'hf-hub:org/repo'")
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"model folder {str(folder)!r} has no open_clip_config.json; an open_clip folder "
                                    "holds open_clip_config.json and open_clip_model.safetensors")
        if need_weights and not any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir()):
            raise FileNotFoundError(f"model folder {str(folder)!r} has no weights (open_clip_model.safetensors or "
                                    "open_clip_pytorch_model.bin); refusing to score with random weights")
        if pretrained is not None:
            raise ValueError(f"pretrained={pretrained!r} cannot be combined with a model folder; the folder's weights are used")
        return _LOCAL + str(folder), None, False
    if model.startswith(_HUB):
        if pretrained is not None:
            raise ValueError(f"pretrained={pretrained!r} cannot be combined with {model!r}; the hub repo's weights are used")
        return model, None, False
    if model not in oc.list_models():
        raise ValueError(f"unknown open_clip architecture {model!r}; use one of open_clip.list_models() "
                         "(e.g. 'ViT-B-32', 'ViT-L-14', 'ViT-H-14'), 'hf-hub:org/repo', or a local folder")
    if not need_weights:
        return model, None, False
    if pretrained is None:
        if "openai" in oc.list_pretrained_tags_by_model(model):
            pretrained = "openai"
        else:
            raise ValueError(f"pretrained is required with model={model!r}: a tag from "
                             f"{oc.list_pretrained_tags_by_model(model)} or a checkpoint file path")
    if os.path.isfile(os.path.expanduser(pretrained)):
        return model, os.path.expanduser(pretrained), False
    tags = oc.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ValueError(f"pretrained={pretrained!r} is neither a file nor a known tag for {model!r}; tags: {tags}")
    # open_clip >= 3 no longer switches to QuickGELU for tags trained with it (e.g. 'openai'); do it here.
    quick_gelu = bool(oc.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    return model, pretrained, quick_gelu


def load_open_clip(model: str, pretrained: Optional[str] = None, *, cache_dir: Optional[str] = None
                   ) -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """(model in eval mode with frozen weights, tokenizer, preprocess_cfg) for an open_clip model spec."""
    oc = _open_clip()
    name, pre, quick_gelu = resolve_open_clip_name(model, pretrained)
    clip = oc.create_model(name, pretrained=pre, force_quick_gelu=quick_gelu, require_pretrained=True,
                           weights_only=True, cache_dir=cache_dir)
    return freeze(clip), oc.get_tokenizer(name, cache_dir=cache_dir), dict(clip.visual.preprocess_cfg)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no parameter gradients: rewards are judges, only images get gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class OpenCLIPEmbedder(torch.nn.Module):
    """Unit-norm image and text embeddings from an open_clip model, with differentiable preprocessing."""

    def __init__(self, clip: torch.nn.Module, tokenizer: Any, preprocess: ImagePreprocess):
        super().__init__()
        self.clip, self.tokenizer, self.preprocess = clip, tokenizer, preprocess

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(self.preprocess(images), normalize=True)

    def texts(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(device)
        return self.clip.encode_text(tokens, normalize=True)


_MODES = ("clipscore", "cosine", "logit_scale")


class CLIPScore(RewardModel):
    """Image–prompt agreement from an open_clip model; differentiable.

    - mode="clipscore" (default): `scale * max(cos, 0)`, scale 2.5 as in the CLIPScore paper (range [0, 2.5]).
    - mode="cosine": the raw cosine in [-1, 1].
    - mode="logit_scale": `logit_scale.exp() * cos`, the model's own contrastive logit.

    `model`: an open_clip architecture with `pretrained` (tag or checkpoint file), 'hf-hub:org/repo', or a
    local open_clip folder (open_clip_config.json + open_clip_model.safetensors), with or without 'local-dir:'.
    With a built-in name, `pretrained=None` means the 'openai' weights; the default ViT-B-32 'openai' is the
    paper's model.
    """

    name = "clip_score"
    supports_grad = True

    def __init__(self, model: str = "ViT-B-32", pretrained: Optional[str] = None, *, mode: str = "clipscore",
                 scale: Optional[float] = None, cache_dir: Optional[str] = None, device: DeviceLike = None,
                 dtype: Optional[torch.dtype] = None, batch_size: Optional[int] = None, differentiable: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if scale is not None and mode != "clipscore":
            raise ValueError(f"scale applies only to mode='clipscore'; drop scale={scale!r} or use that mode")
        self.mode = mode
        self.scale = 2.5 if scale is None else float(scale)
        if not (self.scale > 0):
            raise ValueError(f"scale must be positive, got {scale!r}")
        clip, tokenizer, pp = load_open_clip(model, pretrained, cache_dir=cache_dir)
        self.embed = OpenCLIPEmbedder(clip, tokenizer, from_open_clip(pp))
        self.place()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        img = self.embed.images(images)
        txt = self.embed.texts(prompts, img.device).to(img.dtype)
        cos = (img * txt).sum(-1)
        if self.mode == "cosine":
            return cos
        if self.mode == "logit_scale":
            return self.embed.clip.logit_scale.exp().to(cos.dtype) * cos
        return self.scale * cos.clamp(min=0)
