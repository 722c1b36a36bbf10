"""Fixed feature extractors for set metrics (Fréchet distance, diversity): images [B,3,H,W] in [0,1] -> float32 [B,D].

- `toy_oracle`: the toy world's oracle read-out (digit, stroke and background probabilities + 8x8 stroke mask);
- `toy_strokes`: the 8x8 stroke mask alone, unit length (handwriting shape; the toy world's diversity features);
- `clip`: unit-norm open_clip image embeddings (the usual choice for real models; needs weights);
- `dino`: unit-norm DINOv2/DINOv3 image embeddings through transformers (self-supervised, so they see
  composition and style rather than caption agreement; GARDO's diversity features on real models);
- `pixels`: the image average-pooled to size x size (weight-free; for tests and quick checks only).

`load_features(name_or_instance, **options)` resolves a name, an instance or a 'module:Class' path.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FeatureExtractor:
    """Maps images to fixed features; subclasses implement `extract` on one batch and set `name`."""

    name = "features"

    def __init__(self, batch_size: int = 64, device: Union[str, torch.device, None] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features [B, D] (float32, CPU) of a float image batch [B,3,H,W] in [0,1], in chunks of `batch_size`."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a float tensor [B,3,H,W] in [0,1], got {getattr(images, 'shape', type(images))}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        chunks = [self.extract(images[i:i + self.batch_size].to(self.device)).float().cpu()
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks)


class PixelFeatures(FeatureExtractor):
    """Pixels average-pooled to `size` x `size` and flattened (3·size² dims); weight-free, a weak baseline."""

    name = "pixels"

    def __init__(self, size: int = 8, **kwargs: Any):
        super().__init__(**kwargs)
        if size < 1:
            raise ValueError(f"size={size} must be >= 1")
        self.size = size

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


class ToyOracleFeatures(FeatureExtractor):
    """The toy world's oracle read-out: p(digit) [10], p(stroke colour) [5], p(background colour) [5], 8x8 stroke mask / 16 [64]."""

    name = "toy_oracle"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        from .toyworld import OracleEvaluator

        self.oracle = OracleEvaluator()

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        p = self.oracle.predict(images)
        return torch.cat([p.digit_probs, p.fg_probs, p.bg_probs, p.masks8.flatten(1) / 16.0], dim=1)


class ToyStrokeFeatures(ToyOracleFeatures):
    """The oracle's 8x8 stroke mask scaled to unit length [64]: the shape of the handwriting, not how much ink it has.

    The toy world's diversity features. With `toy_oracle` features, thickening strokes into blobs *raises*
    the mean pairwise distance (bigger masks are further apart, and the oracle's class probabilities scatter
    on unreadable images); after the scaling, blobs that cover the same area read as alike.
    """

    name = "toy_strokes"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.oracle.predict(images).masks8.flatten(1), dim=1)


class CLIPFeatures(FeatureExtractor):
    """Unit-norm open_clip image embeddings; `model`/`pretrained` as in reward_models' CLIPScore (default ViT-B-32 'openai')."""

    name = "clip"

    def __init__(self, model: str = "ViT-B-32", pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        from reward_models._preprocess import from_open_clip
        from reward_models.clip_score import load_open_clip

        clip, _, pp = load_open_clip(model, pretrained, cache_dir=cache_dir)
        self.clip = clip.to(self.device)
        self.preprocess = from_open_clip(pp)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(self.preprocess(images.float()), normalize=True)


class DINOFeatures(FeatureExtractor):
    """Unit-norm pooled (CLS) embeddings of a transformers DINO backbone (`model`: a hub id or a saved folder with its
    image processor; default DINOv2-base, ungated; the GARDO paper uses DINOv3, e.g. facebook/dinov3-vitb16-pretrain-lvd1689m)."""

    name = "dino"

    def __init__(self, model: str = "facebook/dinov2-base", cache_dir: Optional[str] = None, **kwargs: Any):
        super().__init__(**kwargs)
        from transformers import AutoImageProcessor, AutoModel

        from reward_models._preprocess import from_hf_image_processor

        self.backbone = AutoModel.from_pretrained(model, cache_dir=cache_dir).eval().to(self.device)
        self.preprocess = from_hf_image_processor(AutoImageProcessor.from_pretrained(model, cache_dir=cache_dir))

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=self.preprocess(images.float()))
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return F.normalize(pooled.float(), dim=-1)


FEATURES: Dict[str, Callable[..., FeatureExtractor]] = {
    "toy_oracle": ToyOracleFeatures,
    "toy_strokes": ToyStrokeFeatures,
    "clip": CLIPFeatures,
    "dino": DINOFeatures,
    "pixels": PixelFeatures,
}


def load_features(spec: Union[str, FeatureExtractor], **options: Any) -> FeatureExtractor:
    """An extractor from a name in FEATURES, a 'module:Class' path, or an instance (returned as is, without options)."""
    if isinstance(spec, FeatureExtractor):
        if options:
            raise ValueError("options cannot be applied to a feature extractor instance; pass a name instead")
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"features must be a name, 'module:Class' or a FeatureExtractor, got {spec!r}")
    if spec in FEATURES:
        factory = FEATURES[spec]
    elif ":" in spec:
        module, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    else:
        raise ValueError(f"unknown features {spec!r}; valid: {', '.join(sorted(FEATURES))} (or 'module:Class')")
    try:
        extractor = factory(**options)
    except TypeError as e:
        raise ValueError(f"features {spec!r} do not take options {sorted(options)}: {e}") from e
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"features {spec!r} built a {type(extractor).__name__}, not a genft.features.FeatureExtractor")
    return extractor


def image_files(folder: Union[str, Path]) -> list:
    """Sorted image files (png/jpg/jpeg/webp/bmp) directly in `folder`; a ValueError if there are fewer than 2."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"reference image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ValueError(f"reference image folder {str(root)!r} holds {len(files)} images ({'/'.join(IMAGE_SUFFIXES)}); "
                         "a Fréchet distance needs at least 2")
    return files


def load_images(files, size: Tuple[int, int]) -> torch.Tensor:
    """Images as float [N,3,H,W] in [0,1], RGB, each resized (bicubic) to `size` = (H, W)."""
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            out.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size[0], size[1], 3))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0
