"""Tiny configs for the toy world's components: CLIP text encoder, pixel-space UNet, DDIM scheduler, contrastive image encoder."""
from __future__ import annotations

import torch
from torch import nn

from .data import IMAGE_SIZE
from .tokenizer import BOS, EOS, MODEL_MAX_LENGTH


def build_text_encoder(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4):
    """A tiny transformers CLIPTextModel sized to the tokenizer's vocabulary (randomly initialised)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if hidden_size % num_heads:
        raise ValueError(f"text hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    return CLIPTextModel(config)


def build_unet(
    cross_attention_dim: int,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    pooled_text: bool = True,
):
    """A tiny pixel-space diffusers UNet2DConditionModel (3 in/out channels, 16x16) with cross-attention on text.

    The full-resolution level has no attention (it would double the step time); every lower level
    and the mid block cross-attend to the text states. `pooled_text` adds `addition_embed_type="text"`:
    attention-pooled text states join the time embedding, which modulates every ResNet by scale and
    shift (FiLM, `resnet_time_scale_shift="scale_shift"`); this global path learns colours fast.
    """
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    if not 2 <= n <= 4:
        raise ValueError(f"block_out_channels needs 2 to 4 levels for {IMAGE_SIZE}x{IMAGE_SIZE} images, got {len(block_out_channels)}")
    heads = 4
    extra = dict(addition_embed_type="text", addition_embed_type_num_heads=heads) if pooled_text else {}
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers reads this as the number of heads
        resnet_time_scale_shift="scale_shift",
        **extra,
    )


def build_scheduler():
    """The DDPM/DDIM noise schedule: 1000 cosine-beta train steps, epsilon prediction, leading spacing.

    The cosine schedule (Nichol & Dhariwal 2021) keeps more steps at the mid noise levels where a
    16x16 digit's identity is decided; the linear one spends ~40% of them on near-pure noise.
    Leading spacing with steps_offset=1 starts sampling at t=951 for 20 steps, not at t=999 where
    the cosine SNR is ~2e-9 and the epsilon-to-x0 conversion is ill-conditioned; x0 is clipped.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


class ImageEncoder(nn.Module):
    """Tiny CNN mapping [B,3,16,16] images in [-1,1] to feature vectors [B,dim]; trains the text encoder contrastively."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(4 * width * (IMAGE_SIZE // 4) ** 2, dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
