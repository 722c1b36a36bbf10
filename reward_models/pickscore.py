"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences, loaded with transformers.

Score = logit_scale.exp() · cos(image, prompt), as in the PickScore repository (about 18–24 on real images).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ._base import DeviceLike, RewardModel
from ._preprocess import from_hf_image_processor
from .clip_score import freeze

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def resolve_pretrained(spec: str, what: str) -> str:
    """A local folder (checked to exist with a config) or a hub id 'org/repo', for transformers' from_pretrained."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"{what} must be a hub id 'org/repo' or a local folder, got {spec!r}")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "preprocessor_config.json",
                                                                  "processor_config.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"{what} folder {spec!r} holds no transformers files (config.json, "
                                    "preprocessor_config.json, tokenizer_config.json); save one with save_pretrained")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec
    raise FileNotFoundError(f"{what} {spec!r} is neither an existing folder nor a hub id 'org/repo'")


def _projected(out) -> torch.Tensor:
    """transformers >= 5 returns an output object whose pooler_output holds the projected features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PickScore(RewardModel):
    """PickScore preference reward (transformers CLIPModel + its processor); differentiable.

    - `model`: hub id or local folder of a CLIPModel (default yuvalkirstain/PickScore_v1).
    - `processor`: hub id or local folder of its processor (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as
      the PickScore repo uses). Its tokenizer encodes prompts; its image settings define the differentiable
      torch preprocessing.
    """

    name = "pickscore"
    supports_grad = True

    def __init__(self, model: str = DEFAULT_MODEL, processor: str = DEFAULT_PROCESSOR, *,
                 cache_dir: Optional[str] = None, device: DeviceLike = None, dtype: Optional[torch.dtype] = None,
                 batch_size: Optional[int] = None, differentiable: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
        from transformers import AutoProcessor, CLIPModel

        self.clip = freeze(CLIPModel.from_pretrained(resolve_pretrained(model, "model"), cache_dir=cache_dir))
        proc = AutoProcessor.from_pretrained(resolve_pretrained(processor, "processor"), cache_dir=cache_dir)
        if not hasattr(proc, "tokenizer") or not hasattr(proc, "image_processor"):
            raise ValueError(f"processor {processor!r} must be a CLIP-style processor with a tokenizer and an "
                             f"image_processor, got {type(proc).__name__}")
        self.tokenizer = proc.tokenizer
        self.preprocess = from_hf_image_processor(proc.image_processor)
        self.max_length = min(77, int(self.clip.config.text_config.max_position_embeddings))
        self.place()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.preprocess(images)
        img = _projected(self.clip.get_image_features(pixel_values=pixels))
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(img.device)
        txt = _projected(self.clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = (txt / txt.norm(dim=-1, keepdim=True)).to(img.dtype)
        return self.clip.logit_scale.exp().to(img.dtype) * (img * txt).sum(-1)
