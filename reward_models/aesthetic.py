"""LAION aesthetic predictor v2: an MLP on unit-norm CLIP ViT-L/14 image embeddings, scoring roughly 1–10.

The head is the one published with LAION's improved-aesthetic-predictor (and used by DDPO/AlignProp);
the CLIP backbone is loaded through open_clip and is configurable.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ._base import DeviceLike, RewardModel
from ._preprocess import from_open_clip
from .clip_score import OpenCLIPEmbedder, freeze, load_open_clip

DEFAULT_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_HEAD_FILE = "aesthetic-model.pth"


class AestheticMLP(nn.Module):
    """The published layer layout (keys layers.0/2/4/6/7); dropout is inactive at scoring time."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch pickle (read with weights_only=True)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle holding objects other than tensors
            raise ValueError(f"cannot read {path!r} as a weights-only checkpoint ({e}); "
                             "convert it to .safetensors or a plain state dict") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors (or a dict with key 'state_dict')")
    return sd


def _resolve_head(head: str, filename: Optional[str], cache_dir: Optional[str]) -> str:
    expanded = os.path.expanduser(head)
    if os.path.isfile(expanded):
        return expanded
    if os.path.isdir(expanded):
        if not filename:
            raise ValueError(f"head={head!r} is a folder; pass head_filename= naming the weights file in it")
        return os.path.join(expanded, filename)
    if head.count("/") == 1 and not head.startswith((".", "/", "~")) and not head.endswith((".pth", ".pt", ".safetensors")):
        if not filename:
            raise ValueError(f"head={head!r} looks like a hub repo; pass head_filename= (e.g. {DEFAULT_HEAD_FILE!r})")
        from huggingface_hub import hf_hub_download
        return hf_hub_download(head, filename, cache_dir=cache_dir)
    raise FileNotFoundError(f"aesthetic head {head!r} is neither an existing .pth/.safetensors file nor a hub repo id "
                            "('org/repo' with head_filename=)")


def load_aesthetic_head(path: str) -> AestheticMLP:
    """Build an AestheticMLP whose input size comes from the checkpoint and load it strictly."""
    sd = load_state_dict_file(path)
    for prefix in ("module.", "mlp."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if "layers.0.weight" not in sd:
        raise ValueError(f"{path!r} is not an aesthetic-predictor head: expected keys layers.0.weight ... layers.7.bias, "
                         f"got {sorted(sd)[:6]}")
    mlp = AestheticMLP(input_dim=sd["layers.0.weight"].shape[1])
    try:
        mlp.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path!r} does not match the aesthetic MLP layout "
                         "Linear(D,1024)-Linear(1024,128)-Linear(128,64)-Linear(64,16)-Linear(16,1): " + str(e)) from e
    return mlp


class LaionAesthetic(RewardModel):
    """LAION aesthetic score of each image (the prompt is ignored); differentiable.

    - `head`: a local .pth/.safetensors file, or a hub repo id with `head_filename`
      (default trl-lib/ddpo-aesthetic-predictor, aesthetic-model.pth, the LAION v2 head DDPO uses).
    - `clip_model`/`clip_pretrained`: the open_clip backbone (default ViT-L-14 'openai', the one the head was
      trained on); any spec CLIPScore accepts, e.g. a local open_clip folder. Its embedding width must equal
      the head's input width.
    """

    name = "aesthetic"
    supports_grad = True

    def __init__(self, head: str = DEFAULT_HEAD_REPO, head_filename: Optional[str] = DEFAULT_HEAD_FILE, *,
                 clip_model: str = "ViT-L-14", clip_pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                 device: DeviceLike = None, dtype: Optional[torch.dtype] = None, batch_size: Optional[int] = None,
                 differentiable: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
        mlp = load_aesthetic_head(_resolve_head(head, head_filename, cache_dir))
        clip, tokenizer, pp = load_open_clip(clip_model, clip_pretrained, cache_dir=cache_dir)
        width = mlp.layers[0].in_features
        embed_dim = getattr(clip.visual, "output_dim", None)
        if embed_dim is not None and embed_dim != width:
            raise ValueError(f"aesthetic head expects {width}-d CLIP embeddings but clip_model={clip_model!r} gives "
                             f"{embed_dim}-d; use the backbone the head was trained on (ViT-L-14 for the LAION head)")
        self.embed = OpenCLIPEmbedder(clip, tokenizer, from_open_clip(pp))
        self.mlp = freeze(mlp)
        self.place()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        emb = self.embed.images(images)
        return self.mlp(emb.to(self.mlp.layers[0].weight.dtype))
