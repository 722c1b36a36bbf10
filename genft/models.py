"""Resolve a config's `model` to a pipeline: the cached toy world, a hub id, or a local folder."""
from __future__ import annotations

from typing import Optional

import torch

from pipelines import DiffusionPipeline, FlowMatchPipeline, detect_family

from .config import ConfigError


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(device)


def load_pipeline(model: str, device: torch.device, progress: bool = True, resolution: Optional[int] = None,
                  max_sequence_length: Optional[int] = None):
    """The pipeline for `model`, by family (diffusion or flow); 'toyworld'/'toyworld-flow' pretrain on first use.

    `resolution` and `max_sequence_length` go to `pipelines.load` for hub ids and folders (the toy worlds are fixed).
    """
    if model.startswith("toyworld") and (resolution is not None or max_sequence_length is not None):
        raise ValueError(f"resolution/max_sequence_length apply to hub/folder models; {model!r} is fixed: leave them unset")
    if model == "toyworld-one-step":
        from .toyworld.one_step_init import build_toy_one_step

        return build_toy_one_step(device, progress=progress)
    if model == "toyworld":
        from .toyworld import load_or_pretrain

        path = load_or_pretrain(progress=progress)
    elif model == "toyworld-flow":
        from .toyworld.flow_pretrain import load_or_pretrain_flow

        path = load_or_pretrain_flow(progress=progress)
    elif model == "toyworld-lcm":
        from .toyworld.lcm_distill import load_or_distill_lcm

        path = load_or_distill_lcm(progress=progress)
    elif model == "toyworld-mirror":
        from .toyworld.flow_pretrain import load_or_pretrain_mirror

        path = load_or_pretrain_mirror(progress=progress)
    else:  # hub ids and folders: one registry entry per pipeline class (SD 1/2, SDXL, SD3, FLUX, LCM, genft's own)
        import pipelines

        return pipelines.load(model, device=device, resolution=resolution, max_sequence_length=max_sequence_length)
    family = detect_family(str(path))
    if family == "flow":
        return FlowMatchPipeline.from_pretrained(path, device=device)
    if family == "mirror":
        from pipelines import MirrorFlowMatchPipeline

        return MirrorFlowMatchPipeline.from_pretrained(path, device=device)
    if family == "consistency":
        from pipelines import ConsistencyPipeline

        return ConsistencyPipeline.from_pretrained(path, device=device)
    if family == "one_step":
        from pipelines import OneStepPipeline

        return OneStepPipeline.from_pretrained(path, device=device)
    if family not in (None, "diffusion"):
        raise ValueError(f"model={model!r} is a {family} model, which genft cannot load yet; use a diffusion or flow model")
    return DiffusionPipeline.from_pretrained(path, device=device)


def check_method_fits_model(method_cls, model: str) -> None:
    """Refuse, before loading anything, a method that cannot drive the model's generator family."""
    family = {"toyworld": "diffusion", "toyworld-flow": "flow", "toyworld-mirror": "mirror", "toyworld-one-step": "one_step",
              "toyworld-lcm": "consistency"}.get(model) or detect_family(model)
    if family is not None and family not in method_cls.families:
        raise ConfigError(
            f"method={method_cls.name!r} works on {'/'.join(method_cls.families)} generators, but model={model!r} is a "
            f"{family} model; pick a method for {family} models or a {method_cls.families[0]} model"
        )
