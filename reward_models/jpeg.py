"""JPEG (in)compressibility (DDPO's sanity-check rewards): the encoded file size in kilobytes."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ._base import RewardModel


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image [B,3,H,W] in [0,1] saved as JPEG at `quality` (float32 [B])."""
    arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(RewardModel):
    """Reward = −(JPEG size in kB): smaller files score higher. Not differentiable."""

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """Reward = +(JPEG size in kB): larger, more detailed files score higher. Not differentiable."""

    name = "jpeg_incompressibility"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_size_kb(images, self.quality)
