"""Tiny diffusers/transformers components built from configs, as diffusers' own tests do."""
from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = ["a", "red", "blue", "green", "cat", "dog", "on", "the", "moon", "0", "1", "2", "3", "7"]


def tiny_tokenizer(max_length: int = 12) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is WORDS (each one token) plus the characters."""
    chars = sorted({c for w in WORDS for c in w})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in WORDS:
        cur = w[0] if len(w) > 1 else w[0] + "</w>"
        for i, c in enumerate(w[1:], start=1):
            nxt = c + "</w>" if i == len(w) - 1 else c
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=max_length)


def tiny_text_encoder(vocab_size: int, max_length: int = 12) -> CLIPTextModel:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_unet(sample_size: int = 8, in_channels: int = 3, cross_attention_dim: int = 16) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )


def tiny_scheduler(**kw) -> DDIMScheduler:
    cfg = dict(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-3, beta_end=0.05, clip_sample=False,
               set_alpha_to_one=False)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def tiny_diffusion_pipeline():
    from pipelines import DiffusionPipeline

    tok = tiny_tokenizer()
    return DiffusionPipeline(unet=tiny_unet(), text_encoder=tiny_text_encoder(len(tok.get_vocab())), tokenizer=tok,
                             scheduler=tiny_scheduler())


def tiny_flow_pipeline(shift: float = 1.0):
    """A tiny text-to-image flow-matching pipeline (UNet velocity model, FlowMatchEulerDiscreteScheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines import FlowMatchPipeline

    tok = tiny_tokenizer()
    return FlowMatchPipeline(unet=tiny_unet(), text_encoder=tiny_text_encoder(len(tok.get_vocab())), tokenizer=tok,
                             scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))
