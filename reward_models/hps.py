"""HPSv2 / HPSv2.1 (Wu et al., 2023): human-preference score = cosine of open_clip ViT-H-14 image and prompt
embeddings, with the CLIP weights replaced by the HPS checkpoint.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ._base import DeviceLike, RewardModel
from ._preprocess import from_open_clip
from .aesthetic import load_state_dict_file
from .clip_score import OpenCLIPEmbedder, _open_clip, freeze, resolve_open_clip_name

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def load_hps_weights(clip: torch.nn.Module, path: str, arch: str) -> None:
    """Load an HPS checkpoint (.pt with 'state_dict' or plain, or .safetensors) strictly into `clip`."""
    sd = load_state_dict_file(path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    # Non-persistent buffers (attention masks, position ids) that older open_clip forks saved are not weights.
    buffers = {n for n, _ in clip.named_buffers()} - set(clip.state_dict())
    sd = {k: v for k, v in sd.items() if k not in buffers}
    own = clip.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"HPS checkpoint {path!r} does not fit open_clip architecture {arch!r}: "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                         f"{len(wrong)} with other shapes {wrong[:3]}; HPSv2 checkpoints need arch='ViT-H-14'")
    clip.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


class HPSv2(RewardModel):
    """HPSv2 / v2.1 score (cosine of unit-norm image and prompt features, ~0.2–0.35 on real images); differentiable.

    - `checkpoint`: a local HPS file (.pt/.pth or .safetensors); None downloads `HPS_FILES[version]` from
      xswu/HPSv2 with huggingface_hub.
    - `arch`: the open_clip architecture the checkpoint fits: a built-in name (default 'ViT-H-14') or a folder
      with an open_clip_config.json (its weights, if any, are ignored).
    """

    name = "hpsv2"
    supports_grad = True

    def __init__(self, checkpoint: Optional[str] = None, *, version: str = "v2.1", arch: str = "ViT-H-14",
                 cache_dir: Optional[str] = None, device: DeviceLike = None, dtype: Optional[torch.dtype] = None,
                 batch_size: Optional[int] = None, differentiable: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
        if version not in HPS_FILES:
            raise ValueError(f"version must be one of {sorted(HPS_FILES)}, got {version!r}")
        if checkpoint is None:
            from huggingface_hub import hf_hub_download
            checkpoint = hf_hub_download(HPS_REPO, HPS_FILES[version], cache_dir=cache_dir)
        checkpoint = os.path.expanduser(checkpoint)
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"HPS checkpoint {checkpoint!r} does not exist; pass a local "
                                    f"{HPS_FILES[version]} (or .safetensors), or checkpoint=None to download it")
        oc = _open_clip()
        name, _, _ = resolve_open_clip_name(arch, None, need_weights=False)
        clip = oc.create_model(name, pretrained=None, load_weights=False, cache_dir=cache_dir)
        load_hps_weights(clip, checkpoint, arch)
        self.version = version
        self.embed = OpenCLIPEmbedder(freeze(clip), oc.get_tokenizer(name, cache_dir=cache_dir),
                                      from_open_clip(dict(clip.visual.preprocess_cfg)))
        self.place()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        img = self.embed.images(images)
        txt = self.embed.texts(prompts, img.device).to(img.dtype)
        return (img * txt).sum(-1)
