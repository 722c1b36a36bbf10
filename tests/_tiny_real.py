"""Tiny components of the exact classes the real model families ship, saved with the real diffusers pipeline class.

As diffusers' own pipeline tests do: one-layer, width-16/32 configs, seeded before each component.
`save_family(name, path)` writes the folder a user downloads (StableDiffusionPipeline(...).save_pretrained
and so on); `LOAD_KW[name]` is what that user passes to `pipelines.load`.
The T5 tokenizer is a real `T5Tokenizer` built offline from a tiny Unigram vocabulary (transformers 5
builds it from (piece, score) pairs, no sentencepiece file needed).
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, LCMScheduler, LatentConsistencyModelPipeline, PNDMScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from _tiny import WORDS, tiny_tokenizer

CLIP_LEN = 12  # CLIP context of the tiny tokenizers/encoders (77 in the real ones)
T5_LEN = 16  # max_sequence_length passed for the T5 families (256 / 512 in diffusers)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5Tokenizer whose Unigram vocabulary is WORDS (each one piece) plus single characters."""
    chars = sorted({c for w in WORDS for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5(vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def tiny_clip(vocab_size: int, hidden: int = 16, projection_dim=None):
    """CLIPTextModel, or CLIPTextModelWithProjection when `projection_dim` is given."""
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_LEN, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         projection_dim=projection_dim or hidden)
    return (CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)).eval()


def tiny_vae(latent_channels: int = 4, blocks: int = 2, **kw) -> AutoencoderKL:
    """AutoencoderKL with 2^(blocks−1)× downsampling."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * blocks, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **kw)


def _unet(cross_attention_dim: int, **kw) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8, **kw)


def sd_pipeline(v_prediction: bool = False) -> StableDiffusionPipeline:
    """SD 1.5 (PNDM, ε) or, with v_prediction, SD 2.1 (DDIM, v)."""
    tok = tiny_tokenizer(CLIP_LEN)
    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False)
    sched = (DDIMScheduler(**sched_kw, clip_sample=False, prediction_type="v_prediction") if v_prediction
             else PNDMScheduler(**sched_kw, skip_prk_steps=True))
    return StableDiffusionPipeline(vae=tiny_vae(scaling_factor=0.18215), text_encoder=tiny_clip(len(tok)), tokenizer=tok,
                                   unet=_unet(16), scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    tok, tok2 = tiny_tokenizer(CLIP_LEN), tiny_tokenizer(CLIP_LEN)
    enc, enc2 = tiny_clip(len(tok)), tiny_clip(len(tok2), projection_dim=16)
    unet = _unet(32, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=tiny_vae(scaling_factor=0.13025), text_encoder=enc, text_encoder_2=enc2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched)


def sd3_pipeline(t5: bool = True) -> StableDiffusion3Pipeline:
    """SD3 with CLIP-L, CLIP-G and T5, or (t5=False) without T5, which diffusers replaces by zeros."""
    tok, tok2, tok3 = tiny_tokenizer(CLIP_LEN), tiny_tokenizer(CLIP_LEN), tiny_t5_tokenizer()
    enc, enc2 = tiny_clip(len(tok), projection_dim=16), tiny_clip(len(tok2), projection_dim=16)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(blocks=1, scaling_factor=1.5305, shift_factor=0.0609), text_encoder=enc, tokenizer=tok,
        text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=tiny_t5(len(tok3)) if t5 else None, tokenizer_3=tok3 if t5 else None)


def flux_pipeline(guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX.1-dev (guidance-distilled) or, with guidance_embeds=False, FLUX.1-schnell-like."""
    tok, tok2 = tiny_tokenizer(CLIP_LEN), tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=tiny_vae(blocks=1, scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=tiny_clip(len(tok)), tokenizer=tok, text_encoder_2=tiny_t5(len(tok2)), tokenizer_2=tok2,
                        transformer=transformer)


def lcm_pipeline() -> LatentConsistencyModelPipeline:
    tok = tiny_tokenizer(CLIP_LEN)
    sched = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=True, steps_offset=1, original_inference_steps=50)
    return LatentConsistencyModelPipeline(vae=tiny_vae(scaling_factor=0.18215), text_encoder=tiny_clip(len(tok)), tokenizer=tok,
                                          unet=_unet(16, time_cond_proj_dim=8), scheduler=sched, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)


BUILDERS = {
    "sd15": sd_pipeline,
    "sd21": lambda: sd_pipeline(v_prediction=True),
    "sdxl": sdxl_pipeline,
    "sd3": sd3_pipeline,
    "sd3-no-t5": lambda: sd3_pipeline(t5=False),
    "flux": flux_pipeline,
    "flux-schnell": lambda: flux_pipeline(guidance_embeds=False),
    "lcm": lcm_pipeline,
}
# What a user passes to pipelines.load for these folders (the tiny models' resolution and T5 length).
LOAD_KW = {
    "sd15": {}, "sd21": {}, "sdxl": {}, "lcm": {},
    "sd3": {"max_sequence_length": T5_LEN},
    "sd3-no-t5": {"max_sequence_length": T5_LEN},
    "flux": {"max_sequence_length": T5_LEN, "resolution": 8},
    "flux-schnell": {"max_sequence_length": T5_LEN, "resolution": 8},
}


def save_family(name: str, path) -> None:
    """Write the tiny `name` model with its real diffusers pipeline class's save_pretrained."""
    BUILDERS[name]().save_pretrained(str(path))
