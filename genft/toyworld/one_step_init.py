"""`model: toyworld-one-step`: a one-step generator built (in memory, no training) from the cached toy diffusion base.

The toy base's UNet is read once at t* = 900 of its 1000-step cosine schedule (ᾱ ≈ 0.024). Reading it
at t* = 999 (ᾱ ≈ 2e-6) divides the ε error by √ᾱ ≈ 0.002 and gives noise; from t* = 800 to 900 the
one-step samples already follow held-out prompts (oracle accuracy about 0.8-0.9 without guidance,
measured with the held-out prompts, 2 seeds each), blurrier than the 20-step sampler's.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

TOY_ONE_STEP_TIMESTEP = 900


def build_toy_one_step(device: Union[str, torch.device] = "cpu", progress: bool = True,
                       timestep: int = TOY_ONE_STEP_TIMESTEP, base_path: Optional[str] = None):
    """A OneStepPipeline from the toy diffusion base (pretrained on first use) that records the base's folder."""
    from pipelines import DiffusionPipeline, OneStepPipeline

    from .cache import load_or_pretrain

    path = str(base_path) if base_path is not None else str(load_or_pretrain(progress=progress))
    base = DiffusionPipeline.from_pretrained(path, device=device)
    return OneStepPipeline.from_diffusion(base, timestep, base_model=path).to(device)
