"""FLUX's model call: 2×2 latent packing into tokens, positional ids, the guidance embedding.

genft stores FLUX latents unpacked ([B, C, H, W], as the VAE sees them) so that the shared flow
step, trajectories and decoding treat FLUX like any other flow model; only the transformer call packs
and unpacks. The packing and the ids follow `FluxPipeline._pack_latents`, `_unpack_latents` and
`_prepare_latent_image_ids` in diffusers (re-written for tensors of any (H, W); the tests compare them).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._text import unpack


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2×2 patch becomes one token."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latents of `height` × `width`."""
    b, _, d = tokens.shape
    return tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] rotary position ids of the packed latent tokens: (0, row, column)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def call_flux(model, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, guidance: Optional[float]) -> torch.Tensor:
    """The velocity [B, C, H, W] of a FluxTransformer2DModel at noise level σ [B] from packed conditioning [B, L+1, D].

    `guidance` feeds the guidance embedding of guidance-distilled models (FLUX.1-dev); None for models without one.
    """
    cfg = getattr(model, "module", model).config
    hidden, (pooled,) = unpack(embeds, cfg.pooled_projection_dim)
    _, _, h, w = x.shape
    g = None
    if cfg.guidance_embeds:
        if guidance is None:
            raise ValueError("this FLUX transformer has a guidance embedding; pass a guidance scale")
        g = torch.full((x.shape[0],), float(guidance), device=x.device, dtype=torch.float32)
    out = model(
        hidden_states=pack_latents(x), timestep=sigma, guidance=g, pooled_projections=pooled, encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype), img_ids=image_ids(h, w, x.device, x.dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)
