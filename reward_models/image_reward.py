"""ImageReward (Xu et al., 2023) rebuilt on transformers' BLIP classes, so the `image-reward` package is not needed.

ImageReward = BLIP ViT image tokens → BLIP text encoder (BERT with cross-attention to the image) → MLP on the
[CLS] state → (r − 0.16717) / 1.03334. The `image-reward` package pins timm 0.6.13 (we use timm 1.x), so this
module loads its checkpoint (ImageReward.pt + med_config.json) into transformers' BlipVisionModel/BlipTextModel,
which mirror BLIP's modules one to one; only the ViT's parameter names differ and are mapped below.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import torch

from ._base import DeviceLike, RewardModel
from ._preprocess import ImagePreprocess, PreprocessConfig
from .aesthetic import AestheticMLP, load_state_dict_file
from .clip_score import freeze
from .pickscore import resolve_pretrained

HUB_REPO = "THUDM/ImageReward"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's published normalisation
MAX_PROMPT_TOKENS = 35  # ImageReward pads/truncates prompts to 35 tokens
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP ViT names (timm style) → transformers BlipVisionModel names.
_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def split_image_reward_state_dict(sd: Dict[str, torch.Tensor]
                                  ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(vision, text, mlp) state dicts in transformers/AestheticMLP names from an ImageReward.pt state dict."""
    vision, text, mlp = {}, {}, {}
    for key, value in sd.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, repl in _VIT_RENAMES:
                if re.match(pattern, name):
                    vision[re.sub(pattern, repl, name)] = value
                    break
            else:
                raise ValueError(f"unexpected BLIP vision key {key!r} in the ImageReward checkpoint")
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder."):]
            if name != "embeddings.position_ids":  # a buffer, not a weight
                text[name] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
        # other BLIP parts (vision_proj, text_proj, ...) are not used to score
    if not vision or not text or not mlp:
        raise ValueError("not an ImageReward checkpoint: expected keys under blip.visual_encoder., blip.text_encoder. "
                         f"and mlp., got {len(vision)}/{len(text)}/{len(mlp)} of them")
    return vision, text, mlp


def _vision_config(vision: Dict[str, torch.Tensor], num_heads: Optional[int]):
    """BlipVisionConfig read off the checkpoint's shapes (BLIP's ViT: GELU, LayerNorm eps 1e-6, MLP ratio 4)."""
    from transformers import BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    n_patches = vision["embeddings.position_embedding"].shape[1] - 1
    side = int(round(n_patches ** 0.5))
    if side * side != n_patches:
        raise ValueError(f"ImageReward checkpoint has {n_patches} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    heads = num_heads or max(width // 64, 1)  # BLIP ViT-B/L use 64-wide heads
    return BlipVisionConfig(hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=heads, image_size=side * patch, patch_size=patch,
                            hidden_act="gelu", layer_norm_eps=1e-6)


def _text_config(med_config: str, encoder_width: int, tokenizer):
    """BlipTextConfig from BLIP's med_config.json (a BERT config with cross-attention to the image tokens)."""
    from transformers import BlipTextConfig

    with open(med_config) as f:
        med = json.load(f)
    ids = {k: getattr(tokenizer, k, None) for k in ("cls_token_id", "sep_token_id", "pad_token_id")}
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", ids["pad_token_id"]), bos_token_id=ids["cls_token_id"],
        sep_token_id=ids["sep_token_id"], is_decoder=True)


def _load_strict(module: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"ImageReward {what} weights do not fit the config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shapes {wrong[:3]}; check med_config matches the checkpoint")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _hub_file(repo: str, filename: str, cache_dir: Optional[str]) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, cache_dir=cache_dir)


class ImageReward(RewardModel):
    """ImageReward human-preference score (roughly −2…2, 0 = average); differentiable.

    - `checkpoint`: ImageReward.pt (or a .safetensors of the same state dict); None downloads it from THUDM/ImageReward.
    - `med_config`: BLIP's med_config.json (text-encoder config); None downloads it from the same repo.
    - `tokenizer`: hub id or folder of the BERT tokenizer ImageReward uses (bert-base-uncased).
    - `vision_heads`: attention heads of the ViT (default width / 64, right for BLIP ViT-B and ViT-L).
    """

    name = "image_reward"
    supports_grad = True

    def __init__(self, checkpoint: Optional[str] = None, *, med_config: Optional[str] = None,
                 tokenizer: str = "bert-base-uncased", vision_heads: Optional[int] = None,
                 cache_dir: Optional[str] = None, device: DeviceLike = None, dtype: Optional[torch.dtype] = None,
                 batch_size: Optional[int] = None, differentiable: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

        checkpoint = _hub_file(HUB_REPO, "ImageReward.pt", cache_dir) if checkpoint is None else os.path.expanduser(checkpoint)
        med_config = _hub_file(HUB_REPO, "med_config.json", cache_dir) if med_config is None else os.path.expanduser(med_config)
        for arg, path in (("checkpoint", checkpoint), ("med_config", med_config)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ImageReward {arg} {path!r} does not exist; pass a local file or None to download "
                                        f"it from {HUB_REPO}")
        vision_sd, text_sd, mlp_sd = split_image_reward_state_dict(load_state_dict_file(checkpoint))
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer, "tokenizer"), cache_dir=cache_dir)
        vcfg = _vision_config(vision_sd, vision_heads)
        self.vision = BlipVisionModel(vcfg)
        _load_strict(self.vision, vision_sd, "vision")
        self.text = BlipTextModel(_text_config(med_config, vcfg.hidden_size, self.tokenizer), add_pooling_layer=False)
        _load_strict(self.text, text_sd, "text")
        self.mlp = AestheticMLP(input_dim=mlp_sd["layers.0.weight"].shape[1])
        _load_strict(self.mlp, mlp_sd, "MLP head")
        freeze(self.vision), freeze(self.text), freeze(self.mlp)
        # ImageReward's transform: Resize(224, bicubic) → CenterCrop(224) → CLIP normalisation (torchvision on PIL).
        size = vcfg.image_size
        self.preprocess = ImagePreprocess(PreprocessConfig(mean=CLIP_MEAN, std=CLIP_STD, resize=size, crop=(size, size),
                                                           interpolation="bicubic", crop_rounding="round"))
        self.place()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=self.preprocess(images)).last_hidden_state
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                             return_tensors="pt").to(images.device)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=images.device)
        hidden = self.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask).last_hidden_state
        return (self.mlp(hidden[:, 0]) - REWARD_MEAN) / REWARD_STD
