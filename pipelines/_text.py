"""Prompts to conditioning for one- to three-encoder text stacks (SD 1/2, SDXL, SD3, FLUX), packed into one tensor.

genft's methods pass `prompt_embeds` around as one per-sample tensor: replay buffers index it,
`Trajectory.select/cat` slice it, `repeat_interleave` expands it. The extra per-sample vectors that
SDXL, SD3 and FLUX need (the pooled text projection, SDXL's six size/crop "time ids") therefore
travel as extra rows appended after the token states, zero-padded to their width: `pack` builds
that tensor and `unpack` splits it again, so every method works on every family unchanged.

The encoding follows diffusers' pipelines (`StableDiffusionXLPipeline.encode_prompt`,
`StableDiffusion3Pipeline.encode_prompt`, `FluxPipeline.encode_prompt`): which layer, which pooled
output, how the encoders are joined. Unlike them, a prompt the tokenizer would truncate is refused.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SDXL_TIME_IDS = 6  # (original h, w, crop top, left, target h, w)


# ----- packing ----------------------------------------------------------------------------------
def pack(hidden: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    """Token states [B, L, D] plus vectors [B, d_i] (d_i <= D) -> [B, L + len(rows), D], rows zero-padded."""
    width = hidden.shape[-1]
    extra = []
    for r in rows:
        if r.ndim != 2 or r.shape[0] != hidden.shape[0] or r.shape[-1] > width:
            raise ValueError(f"cannot pack a row of shape {tuple(r.shape)} under token states {tuple(hidden.shape)}: "
                             f"rows must be [B, d] with d <= {width}")
        extra.append(F.pad(r.to(hidden.dtype), (0, width - r.shape[-1]))[:, None])
    return torch.cat([hidden, *extra], dim=1)


def unpack(embeds: torch.Tensor, *widths: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Undo `pack`: (token states [B, L, D], [rows [B, w_i]]) for the row widths used to pack."""
    n = len(widths)
    if embeds.ndim != 3 or embeds.shape[1] <= n:
        raise ValueError(f"packed prompt_embeds must be [B, L + {n}, D] with L >= 1, got {tuple(embeds.shape)}")
    length = embeds.shape[1] - n
    return embeds[:, :length], [embeds[:, length + i, :w] for i, w in enumerate(widths)]


# ----- tokens -----------------------------------------------------------------------------------
def token_ids(tokenizer, prompts: Sequence[str], max_length: int, field_name: str = "prompt",
              allow_empty: bool = True) -> List[List[int]]:
    """Token ids padded to `max_length`; raises for prompts it would truncate (and empty ones unless allowed)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=False,
                    return_tensors=None)["input_ids"]
    for p, seq in zip(prompts, ids):
        if not allow_empty and not p.strip():
            raise ValueError(f"{field_name} {p!r} is empty; every prompt needs text")
        if len(seq) > max_length:
            raise ValueError(
                f"{field_name} {p!r} is {len(seq)} tokens long but the text encoder takes at most {max_length}; shorten it"
            )
    return ids


def _ids(tokenizer, prompts: Sequence[str], max_length: int, device) -> torch.Tensor:
    return torch.tensor(token_ids(tokenizer, prompts, max_length), dtype=torch.long, device=device)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def clip_states(encoder, ids: torch.Tensor, layer: Optional[int] = -2) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hidden states of `layer` (None: the final, layer-normed output), pooled vector) of a CLIP text encoder.

    The pooled vector is the projection `text_embeds` for CLIPTextModelWithProjection, else `pooler_output`.
    """
    out = encoder(ids, output_hidden_states=layer is not None)
    hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return hidden, pooled


def clip_max_length(tokenizer) -> int:
    """CLIP's context length, as diffusers pipelines use it (the tokenizer's model_max_length)."""
    return int(tokenizer.model_max_length)


# ----- the families -----------------------------------------------------------------------------
def sdxl_time_ids(height: int, width: int, batch: int, crop: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL's micro-conditioning [B, 6] = (original size, crop top-left, target size), all in pixels."""
    return torch.tensor([[height, width, crop[0], crop[1], height, width]], dtype=torch.float32).expand(batch, -1)


def encode_sdxl(tokenizers: Sequence, encoders: Sequence, prompts: Sequence[str], time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL: penultimate states of both CLIPs joined on width, the second one's projection, time ids -> [B, L+2, D]."""
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, encoders):
        h, pooled = clip_states(enc, _ids(tok, prompts, clip_max_length(tok), _device(enc)), layer=-2)
        hidden.append(h)
    states = torch.cat(hidden, dim=-1)
    return pack(states, pooled.to(states.dtype), time_ids.to(states.device, states.dtype))


def sdxl_zero_negative(prompt_embeds: torch.Tensor, time_id_rows: int = 1) -> torch.Tensor:
    """SDXL's `force_zeros_for_empty_prompt` unconditional input: zero states and pooled, the same time ids."""
    zero = torch.zeros_like(prompt_embeds)
    zero[:, -time_id_rows:] = prompt_embeds[:, -time_id_rows:]
    return zero


def encode_sd3(tokenizers: Sequence, encoders: Sequence, prompts: Sequence[str], joint_dim: int,
               max_sequence_length: int) -> torch.Tensor:
    """SD3: two CLIPs' penultimate states (joined, padded to `joint_dim`) then T5's, pooled = both projections -> [B, L+1, D].

    `encoders[2]` may be None (SD3 run without T5): zeros of [B, max_sequence_length, joint_dim] take its place.
    """
    (tok_l, tok_g, tok_t5), (enc_l, enc_g, enc_t5) = tokenizers, encoders
    h_l, p_l = clip_states(enc_l, _ids(tok_l, prompts, clip_max_length(tok_l), _device(enc_l)))
    h_g, p_g = clip_states(enc_g, _ids(tok_g, prompts, clip_max_length(tok_g), _device(enc_g)))
    clip = torch.cat([h_l, h_g], dim=-1)
    if clip.shape[-1] > joint_dim:
        raise ValueError(f"the two CLIP encoders give {clip.shape[-1]} features, more than joint_attention_dim {joint_dim}")
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    if enc_t5 is None:
        t5 = torch.zeros(clip.shape[0], max_sequence_length, joint_dim, dtype=clip.dtype, device=clip.device)
    else:
        t5 = enc_t5(_ids(tok_t5, prompts, max_sequence_length, _device(enc_t5)))[0]
        if t5.shape[-1] != joint_dim:
            raise ValueError(f"T5 gives {t5.shape[-1]} features but the transformer's joint_attention_dim is {joint_dim}")
    states = torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=1)
    return pack(states, torch.cat([p_l, p_g], dim=-1).to(states.dtype))


def encode_flux(tokenizers: Sequence, encoders: Sequence, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
    """FLUX: T5 states for the tokens, CLIP's pooled output as the one extra row -> [B, L+1, D_t5]."""
    (tok_clip, tok_t5), (enc_clip, enc_t5) = tokenizers, encoders
    _, pooled = clip_states(enc_clip, _ids(tok_clip, prompts, clip_max_length(tok_clip), _device(enc_clip)), layer=None)
    states = enc_t5(_ids(tok_t5, prompts, max_sequence_length, _device(enc_t5)))[0]
    return pack(states, pooled.to(states.device, states.dtype))
