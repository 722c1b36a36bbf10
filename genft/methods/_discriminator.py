"""FAIL's discriminator: a pluggable image backbone (features [B, D]) under a spectral-norm head giving logits [B], optionally prompt-conditioned.

Backbones by name: "cnn" (a small trainable CNN, any image size; the toy world's choice) and
"clip" (a frozen open_clip image tower, as FAIL uses frozen vision features of a VLM); any
'module:Class' whose instances are `nn.Module`s with an `out_dim` attribute mapping images in
[0, 1] to [B, out_dim] works too. The head follows FAIL's code: spectral norm, weights N(0, 0.01²), bias 0.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict

import torch
from torch import nn

from ..config import ConfigError


class CNNBackbone(nn.Module):
    """Four 3x3 convolutions (two strided) with LeakyReLU and global average pooling: [B,3,H,W] -> [B, 4·width]."""

    def __init__(self, width: int = 32, spectral_norm: bool = True):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.net = nn.Sequential(
            sn(nn.Conv2d(3, width, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 2 * width, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 4 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() * 2 - 1)


class CLIPBackbone(nn.Module):
    """Frozen, unit-norm open_clip image embeddings with differentiable preprocessing (gradients reach the images)."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, cache_dir: str | None = None):
        super().__init__()
        from reward_models._preprocess import from_open_clip
        from reward_models.clip_score import load_open_clip

        clip, _, pp = load_open_clip(model, pretrained, cache_dir=cache_dir)
        self.clip = clip
        self.preprocess = from_open_clip(pp)
        self.out_dim = int(clip.visual.output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(self.preprocess(images.float()), normalize=True).float()

    def train(self, mode: bool = True) -> "CLIPBackbone":  # the frozen tower stays in eval mode
        super().train(mode)
        self.clip.eval()
        return self


BACKBONES: Dict[str, Callable[..., nn.Module]] = {"cnn": CNNBackbone, "clip": CLIPBackbone}


def check_backbone_name(spec: str, field: str = "discriminator") -> None:
    """ConfigError unless `spec` is a registered backbone name or a 'module:Class' path (not imported here)."""
    if not isinstance(spec, str) or not (spec in BACKBONES or (":" in spec and all(spec.partition(":")[::2]))):
        raise ConfigError(f"{field}={spec!r} is not a discriminator backbone; choose one of {', '.join(sorted(BACKBONES))} "
                          "or give 'module:Class' (an nn.Module with `out_dim` mapping images in [0,1] to features)")


class Discriminator(nn.Module):
    """logit(x, c) = head(φ(x)) [+ ⟨φ(x), W·e(c)⟩]; D = sigmoid(logit) is the probability that x is an expert image.

    With `text_dim` > 0 it is a projection discriminator (Miyato & Koyama 2018) conditioned on a
    prompt feature e(c) [B, text_dim], as FAIL's discriminators read the prompt with the image.
    """

    def __init__(self, backbone: nn.Module, hidden: int = 0, text_dim: int = 0):
        super().__init__()
        dim = getattr(backbone, "out_dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise TypeError(f"discriminator backbone {type(backbone).__name__} needs an int attribute out_dim >= 1")
        self.backbone = backbone
        sn = nn.utils.parametrizations.spectral_norm
        self.hidden = nn.Sequential(sn(nn.Linear(dim, hidden)), nn.LeakyReLU(0.2)) if hidden else nn.Identity()
        dim = hidden or dim
        last = nn.Linear(dim, 1)
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)
        self.head = sn(last)
        self.text_dim = text_dim
        self.project = sn(nn.Linear(text_dim, dim, bias=False)) if text_dim else None

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] for images [B,3,H,W] in [0,1] (and prompt features [B, text_dim] when conditional)."""
        h = self.hidden(self.backbone(images))
        logits = self.head(h).squeeze(-1)
        if self.project is not None:
            if text is None:
                raise ValueError("this discriminator is prompt-conditioned: pass the prompt features `text`")
            logits = logits + (self.project(text.to(h.dtype)) * h).sum(-1)
        return logits.float()


def build_discriminator(spec: str, options: Dict[str, Any] | None = None, hidden: int = 0, text_dim: int = 0) -> Discriminator:
    """A Discriminator on the backbone named `spec` (a BACKBONES name or 'module:Class'), built with `options`."""
    check_backbone_name(spec)
    if spec in BACKBONES:
        factory = BACKBONES[spec]
    else:
        module, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    try:
        backbone = factory(**dict(options or {}))
    except TypeError as e:
        raise ConfigError(f"discriminator={spec!r} does not take discriminator_options {sorted(options or {})}: {e}") from e
    return Discriminator(backbone, hidden, text_dim)
