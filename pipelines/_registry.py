"""`pipelines.load`: a hub id or a local folder in, the genft pipeline of its family out.

A model is a registry entry, not a script: the folder's `model_index.json` names its diffusers
pipeline class (`StableDiffusionXLPipeline`, `FluxPipeline`, ...), the entry says which genft
pipeline drives it and which components it takes. Diffusers' own `from_pretrained` reads the folder
or hub repo (variants, shards, caching) and `save_pretrained` writes it back in the same layout, so
a fine-tuned model loads in diffusers too. genft's own single-encoder layout (the toy worlds) has
entries that call the genft class's `from_pretrained`. Everything is imported on first use.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ._family import detect_family


@dataclass(frozen=True)
class Entry:
    """How one pipeline class is loaded.

    family: the genft family the trainer checks methods against.
    target: "module:Class" of the genft pipeline, imported on first use.
    components: diffusers component names handed to the genft pipeline ("transformer" becomes `unet`);
        empty for genft's own layouts, which the target's `from_pretrained` reads.
    options: pipeline-config keys (model_index.json) passed through to the genft pipeline and back on save.
    save_kwargs: constructor arguments of the diffusers class for parts genft does not use.
    """

    family: str
    target: str
    components: Tuple[str, ...] = ()
    options: Tuple[str, ...] = ()
    save_kwargs: Dict[str, Any] = field(default_factory=dict)


_SD = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
REGISTRY: Dict[str, Entry] = {
    # diffusers pipeline classes (the folders users download)
    "StableDiffusionPipeline": Entry(
        "diffusion", "pipelines._diffusion:DiffusionPipeline", _SD,
        save_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}),
    "StableDiffusionXLPipeline": Entry(
        "diffusion", "pipelines._diffusion:DiffusionPipeline", _SD + ("text_encoder_2", "tokenizer_2"),
        options=("force_zeros_for_empty_prompt",)),
    "StableDiffusion3Pipeline": Entry(
        "flow", "pipelines._flow:FlowMatchPipeline",
        ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
         "text_encoder_3", "tokenizer_3")),
    "FluxPipeline": Entry(
        "flow", "pipelines._flow:FlowMatchPipeline",
        ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")),
    # LCMs: ConsistencyPipeline reads and writes the LatentConsistencyModelPipeline layout itself.
    "LatentConsistencyModelPipeline": Entry("consistency", "pipelines._consistency:ConsistencyPipeline"),
    # genft's own layouts (model_index.json written by genft, or none at all)
    "DiffusionPipeline": Entry("diffusion", "pipelines._diffusion:DiffusionPipeline"),
    "FlowMatchPipeline": Entry("flow", "pipelines._flow:FlowMatchPipeline"),
    "MirrorFlowMatchPipeline": Entry("mirror", "pipelines._mirror_pipeline:MirrorFlowMatchPipeline"),
    "OneStepPipeline": Entry("one_step", "pipelines._one_step:OneStepPipeline"),
}
DIFFUSERS_ENTRIES = frozenset(name for name, e in REGISTRY.items() if e.components)
# A genft folder without model_index.json: its scheduler's family picks the entry.
_FAMILY_ENTRY = {"diffusion": "DiffusionPipeline", "flow": "FlowMatchPipeline"}


def _valid() -> str:
    return ", ".join(sorted(REGISTRY))


def _import(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def read_model_index(path: Union[str, os.PathLike]) -> Optional[dict]:
    """The folder's or hub repo's model_index.json (None for a local folder without one); a missing local path raises."""
    path = str(path)
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            return None
        with open(index) as f:
            return json.load(f)
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"model {path!r} is neither a folder nor a hub id (owner/name); point it at a diffusers pipeline folder")
    from diffusers import DiffusionPipeline as _HFPipeline

    return _HFPipeline.load_config(path)


def entry_for(path: Union[str, os.PathLike], index: Optional[dict] = None) -> Tuple[str, Entry]:
    """(registry name, entry) of a folder or hub id, from model_index.json or, failing that, its scheduler; unknown raises."""
    index = read_model_index(path) if index is None else index
    if index is None:
        family = detect_family(str(path))
        if family not in _FAMILY_ENTRY:
            raise ValueError(
                f"{path} has no model_index.json and no scheduler/ genft recognises: point it at a diffusers pipeline "
                f"folder or hub id of a registered class ({_valid()})"
            )
        name = _FAMILY_ENTRY[family]
    else:
        name = index.get("_class_name")
    if name not in REGISTRY:
        raise ValueError(f"{path} holds a {name!r}, which genft cannot load; registered pipeline classes: {_valid()}")
    return name, REGISTRY[name]


def load(
    path_or_hub_id: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    *,
    storage_dtype: Optional[torch.dtype] = None,
    resolution: Optional[int] = None,
    max_sequence_length: Optional[int] = None,
):
    """The genft pipeline for a hub id or local folder: SD 1.x/2.x, SDXL, SD3, FLUX or a genft toy-world folder.

    dtype: the weights' dtype (None: as saved); storage_dtype: the trajectory latents' dtype (None: the
    network's). resolution: image height = width in pixels (None: the model's default).
    max_sequence_length: T5 token count for SD3/FLUX (None: diffusers' default, 256/512).
    Unknown pipeline classes raise a ValueError listing the registered ones.

    Example::

        pipe = pipelines.load("black-forest-labs/FLUX.1-dev", device="cuda", dtype=torch.bfloat16, resolution=512)
        traj = pipe.rollout(["a red cat"], generator=torch.Generator("cuda").manual_seed(0), num_inference_steps=28,
                            guidance_scale=3.5, noise_level=0.7)
        pipe.save_pretrained("flux-tuned")  # a FluxPipeline folder again
    """
    index = read_model_index(path_or_hub_id)
    name, entry = entry_for(path_or_hub_id, index)
    cls = _import(entry.target)
    if not entry.components:
        if max_sequence_length is not None:
            raise ValueError(f"max_sequence_length applies to SD3/FLUX (T5) models; {path_or_hub_id} is a {name}")
        pipe = cls.from_pretrained(str(path_or_hub_id), torch_dtype=dtype, device=device)
        pipe.storage_dtype = storage_dtype
        if resolution is not None:
            if not hasattr(pipe, "sample_size"):
                raise ValueError(f"resolution cannot be changed for a {name}; leave it unset (the UNet's sample_size is used)")
            pipe.sample_size = _latent_size(resolution, pipe.vae)
        return pipe
    hf = _load_diffusers(name, entry, str(path_or_hub_id), index, dtype)
    parts = {k: hf.components[k] for k in entry.components}
    if "transformer" in parts:
        parts["unet"] = parts.pop("transformer")
    kwargs = {k: hf.config[k] for k in entry.options if k in hf.config}
    if max_sequence_length is not None:
        if entry.family != "flow":
            raise ValueError(f"max_sequence_length applies to SD3/FLUX (T5) models; {path_or_hub_id} is a {name}")
        kwargs["max_sequence_length"] = max_sequence_length
    if resolution is not None:
        kwargs["sample_size"] = _latent_size(resolution, parts.get("vae"))
    pipe = cls(**parts, storage_dtype=storage_dtype, source_class=name, **kwargs)
    return pipe.to(device)


def _latent_size(resolution: int, vae) -> int:
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution must be a positive multiple of the VAE's downsampling factor {factor}, got {resolution}")
    return resolution // factor


def _load_diffusers(name: str, entry: Entry, path: str, index: dict, dtype: Optional[torch.dtype]):
    """The diffusers pipeline object, skipping optional parts genft does not use (safety checker, image encoder)
    and parts saved as None (e.g. SD3 without T5), which diffusers otherwise refuses to load."""
    import diffusers

    hf_cls = getattr(diffusers, name)
    unused = {k for k in index if not k.startswith("_") and k not in entry.components
              and k in getattr(hf_cls, "_optional_components", [])}
    saved_as_none = {k for k in entry.components if k in index and (index[k] is None or index[k][0] is None)}
    skip = {k: None for k in unused | saved_as_none}
    kw = {"dtype": dtype} if dtype is not None else {}  # diffusers >= 0.36 name; torch_dtype is deprecated
    return hf_cls.from_pretrained(path, **skip, **kw)


def save_as_diffusers(pipe, path: Union[str, os.PathLike]) -> None:
    """Write `pipe` in the layout of its diffusers class (`pipe.source_class`), loadable by diffusers and `load`."""
    import diffusers

    from ._diffusion import _unwrap

    name = pipe.source_class
    if name not in DIFFUSERS_ENTRIES:
        raise ValueError(f"source_class {name!r} is not a registered diffusers pipeline class ({', '.join(sorted(DIFFUSERS_ENTRIES))})")
    entry = REGISTRY[name]
    parts = {k: _unwrap(getattr(pipe, "unet" if k == "transformer" else k)) for k in entry.components}
    parts["scheduler"] = getattr(pipe, "source_scheduler", pipe.scheduler)  # the loaded sampler, not genft's DDIM copy
    parts.update({k: getattr(pipe, k) for k in entry.options})
    getattr(diffusers, name)(**parts, **entry.save_kwargs).save_pretrained(str(path), safe_serialization=True)
