"""Differentiable, torch-only image preprocessing for CLIP-style reward models.

Reward models were trained on images that went through a PIL/torchvision pipeline (resize the shorter side,
center crop, normalise). `ImagePreprocess` reproduces that pipeline on float tensors in [0, 1] so gradients
flow back to the generator's pixels; tests/test_reward_zoo.py measures how closely it matches the models'
own PIL-based transforms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

_INTERPOLATIONS = ("bicubic", "bilinear")
# PIL.Image.Resampling values, as stored in transformers' image-processor configs.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _pair(size: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{what} must be an int or a (height, width) pair of ints, got {size!r}")


def _triple(values: Union[float, Sequence[float]], what: str) -> Tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{what} must have one value per RGB channel, got {values!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model's own transform does: resize, then center crop, then (x - mean) / std.

    - `resize`: the shorter side is resized to this many pixels, keeping the aspect ratio (None: no resize).
    - `squash`: if set, resize straight to this (height, width) instead, ignoring the aspect ratio.
    - `crop`: (height, width) of the center crop (None: no crop).
    - `crop_rounding`: "round" as torchvision's CenterCrop (open_clip), "floor" as transformers' processors.
    """

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: Optional[int] = None
    squash: Optional[Tuple[int, int]] = None
    crop: Optional[Tuple[int, int]] = None
    interpolation: str = "bicubic"
    crop_rounding: str = "round"

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(f"crop_rounding must be 'round' or 'floor', got {self.crop_rounding!r}")
        if self.resize is not None and self.squash is not None:
            raise ValueError("give either resize (shorter side) or squash (height, width), not both")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")


def shortest_side_size(height: int, width: int, target: int) -> Tuple[int, int]:
    """Output (height, width) when the shorter side becomes `target`, as torchvision and transformers compute it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)  # truncation, not rounding, as both libraries do
    return (new_long, target) if width <= height else (target, new_long)


class ImagePreprocess(torch.nn.Module):
    """Resize → center crop → normalise on [B,3,H,W] images in [0,1]; differentiable w.r.t. the pixels.

    Resizing uses antialiased interpolation (`F.interpolate(..., antialias=True)`), whose kernel follows PIL's,
    in two passes (width, then height). With `clamp=True` each pass is clipped to [0, 1], as PIL's uint8
    buffers are; the clip has zero gradient only on pixels that bicubic overshoot pushed outside that range.
    Low-precision inputs (bf16/fp16) are resized in float32 and cast back.
    """

    def __init__(self, config: PreprocessConfig, clamp: bool = True):
        super().__init__()
        if not isinstance(config, PreprocessConfig):
            raise TypeError(f"config must be a PreprocessConfig, got {type(config).__name__}")
        self.config = config
        self.clamp = bool(clamp)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(height, width) of the tensor the model will see for an input of this size."""
        cfg = self.config
        if cfg.crop is not None:
            return cfg.crop
        if cfg.squash is not None:
            return cfg.squash
        if cfg.resize is not None:
            return shortest_side_size(height, width, cfg.resize)
        return height, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B,3,H,W], got {tuple(images.shape)}")
        out_dtype = images.dtype
        x = images if images.dtype in (torch.float32, torch.float64) else images.float()
        h, w = x.shape[-2:]
        new = cfg.squash if cfg.squash is not None else (
            shortest_side_size(h, w, cfg.resize) if cfg.resize is not None else (h, w))
        # Two separable passes, width then height, clipped in between: PIL resamples this way through a uint8
        # intermediate, so clipping the first pass's bicubic overshoot is needed to match it on sharp edges.
        for size in ((h, new[1]), (new[0], new[1])):
            if tuple(size) != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode=cfg.interpolation, align_corners=False, antialias=True)
                if self.clamp:
                    x = x.clamp(0.0, 1.0)
        if cfg.crop is not None:
            x = _center_crop(x, cfg.crop, cfg.crop_rounding)
        mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(out_dtype)

    def extra_repr(self) -> str:
        return f"{self.config}, clamp={self.clamp}"


def _center_crop(x: torch.Tensor, size: Tuple[int, int], rounding: str) -> torch.Tensor:
    ch, cw = size
    h, w = x.shape[-2:]
    if ch > h or cw > w:  # zero-pad first, as both torchvision and transformers do
        pl, pr = max(cw - w, 0) // 2, (max(cw - w, 0) + 1) // 2
        pt, pb = max(ch - h, 0) // 2, (max(ch - h, 0) + 1) // 2
        x = F.pad(x, (pl, pr, pt, pb))
        h, w = x.shape[-2:]
    if rounding == "round":
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    else:
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return x[..., top:top + ch, left:left + cw]


def from_open_clip(preprocess_cfg: Mapping[str, Any], clamp: bool = True) -> ImagePreprocess:
    """Preprocessing equal to open_clip's inference transform, from `model.visual.preprocess_cfg`."""
    cfg = dict(preprocess_cfg)
    size = _pair(cfg.get("size", 224), "open_clip preprocess size")
    mode = cfg.get("resize_mode", "shortest") or "shortest"
    interp = cfg.get("interpolation", "bicubic") or "bicubic"
    if interp not in _INTERPOLATIONS:
        raise ValueError(f"open_clip interpolation {interp!r} is not supported; use one of {_INTERPOLATIONS}")
    mean, std = _triple(cfg["mean"], "mean"), _triple(cfg["std"], "std")
    if mode == "squash":
        pc = PreprocessConfig(mean=mean, std=std, squash=size, interpolation=interp)
    elif mode == "shortest":
        if size[0] != size[1]:
            raise ValueError(f"non-square open_clip image size {size} with resize_mode='shortest' is not supported; "
                             "use a square model or resize_mode='squash'")
        pc = PreprocessConfig(mean=mean, std=std, resize=size[0], crop=size, interpolation=interp, crop_rounding="round")
    else:
        raise ValueError(f"open_clip resize_mode {mode!r} is not supported; use 'shortest' or 'squash'")
    return ImagePreprocess(pc, clamp=clamp)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def from_hf_image_processor(processor: Any, clamp: bool = True) -> ImagePreprocess:
    """Preprocessing equal to a transformers CLIP-style image processor (its attributes, or its config dict)."""
    if _get(processor, "do_rescale", True) and abs(float(_get(processor, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError("image processor rescale_factor must be 1/255 (images are taken in [0,1])")
    resample = _get(processor, "resample", 3)
    resample = int(getattr(resample, "value", resample))
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"image processor resample={resample} is not supported; use 2 (bilinear) or 3 (bicubic)")
    if _get(processor, "do_normalize", True):
        mean, std = _triple(_get(processor, "image_mean"), "image_mean"), _triple(_get(processor, "image_std"), "image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resize = squash = crop = None
    if _get(processor, "do_resize", True):
        size = _get(processor, "size")
        if _get(size, "shortest_edge") is not None:
            if _get(size, "longest_edge") is not None:
                raise ValueError("image processor size with both shortest_edge and longest_edge is not supported")
            resize = int(_get(size, "shortest_edge"))
        elif _get(size, "height") is not None and _get(size, "width") is not None:
            squash = (int(_get(size, "height")), int(_get(size, "width")))
        else:
            raise ValueError(f"image processor size {size!r} is not supported; use shortest_edge or height/width")
    if _get(processor, "do_center_crop", False):
        cs = _get(processor, "crop_size")
        crop = (int(_get(cs, "height")), int(_get(cs, "width")))
    pc = PreprocessConfig(mean=mean, std=std, resize=resize, squash=squash, crop=crop,
                          interpolation=_PIL_RESAMPLE[resample], crop_rounding="floor")
    return ImagePreprocess(pc, clamp=clamp)
