"""LoRA through peft: target modules per network family, apply, and save/load adapters in diffusers' format.

The adapters are injected with diffusers' `add_adapter` (peft under the hood), so the network stays a
diffusers model; they are saved with the matching diffusers pipeline's `save_lora_weights`, so
`StableDiffusionPipeline.load_lora_weights(dir)` (or `SD3Pipeline`/`FluxPipeline`) reads them.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

#: The network's class name -> (LoRA family, the diffusers pipeline class that saves/loads it, its prefix).
_FAMILIES = {
    "UNet2DConditionModel": ("unet", "StableDiffusionPipeline", "unet"),
    "SD3Transformer2DModel": ("sd3", "StableDiffusion3Pipeline", "transformer"),
    "FluxTransformer2DModel": ("flux", "FluxPipeline", "transformer"),
}

#: Default target modules (attention projections; the feed-forward layers are optional for the UNet).
TARGETS: Dict[str, List[str]] = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    "flux": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}
_UNET_FF = ["ff.net.0.proj", "ff.net.2"]

ADAPTER_NAME = "default"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _base_class_name(model: torch.nn.Module) -> str:
    """The supported diffusers class `model` is (or subclasses); raises for a network LoRA has no targets for."""
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return cls.__name__
    raise ValueError(f"finetune='lora' has no target modules for a {type(model).__name__}; supported: {sorted(_FAMILIES)}; "
                     "use finetune=full")


def lora_family(model: torch.nn.Module) -> str:
    """'unet', 'sd3' or 'flux' from the network's class."""
    return _FAMILIES[_base_class_name(model)][0]


def default_targets(model: torch.nn.Module, include_ff: bool = False) -> List[str]:
    """The family's default target modules (`include_ff` adds the UNet's feed-forward layers)."""
    family = lora_family(model)
    return TARGETS[family] + (_UNET_FF if include_ff and family == "unet" else [])


def lora_config(model: torch.nn.Module, rank: int, alpha: float, targets: Optional[Sequence[str]] = None):
    """A peft LoraConfig for `model` (Gaussian init of A, zero B: the adapted model starts equal to the base)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora_rank={rank} must be >= 1")
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                      target_modules=list(targets) if targets else default_targets(model))


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, targets: Optional[Sequence[str]] = None) -> List[torch.nn.Parameter]:
    """Freeze `model`, inject LoRA adapters, and return the trainable (adapter) parameters.

    Raises if no module matches the targets (peft's own error names them).
    """
    model.requires_grad_(False)
    model.add_adapter(lora_config(model, rank, alpha, targets), adapter_name=ADAPTER_NAME)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def has_lora(model: torch.nn.Module) -> bool:
    """True when peft adapters are injected into `model`."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def _pipeline_class(model: torch.nn.Module):
    import diffusers

    _, cls_name, prefix = _FAMILIES[_base_class_name(model)]
    return getattr(diffusers, cls_name), prefix


def adapter_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights in the key layout the family's `save_lora_weights` expects, on the CPU.

    UNet adapters are converted to diffusers' LoRA naming (as its SD training scripts do); the
    transformer families' loaders read peft's own names, so those are kept as they are.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    if lora_family(model) == "unet":
        state = convert_state_dict_to_diffusers(state)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_lora(model: torch.nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write `model`'s adapters as `<directory>/pytorch_lora_weights.safetensors` via the pipeline class's `save_lora_weights`."""
    lora_family(model)
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save (finetune is not 'lora')")
    cls, prefix = _pipeline_class(model)
    layers = adapter_state_dict(model)
    kwargs = {f"{prefix}_lora_layers": layers}
    config = model.peft_config[ADAPTER_NAME]
    # Recording the LoraConfig lets diffusers rebuild rank/alpha/targets exactly when it loads the file.
    meta_name = f"{prefix}_lora_adapter_metadata"
    if meta_name in inspect.signature(cls.save_lora_weights).parameters:
        kwargs[meta_name] = config.to_dict()
    cls.save_lora_weights(str(directory), safe_serialization=True, weight_name=WEIGHT_NAME, **kwargs)
    return Path(directory)


def load_lora(model: torch.nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Load adapters saved by `save_lora` into a base `model` (adds them; the model must have none yet)."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; load into a fresh base model")
    _, prefix = _pipeline_class(model)
    model.load_lora_adapter(str(directory), prefix=prefix, adapter_name=ADAPTER_NAME, weight_name=WEIGHT_NAME)
