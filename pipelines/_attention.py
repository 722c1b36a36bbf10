"""The attention backend of a diffusers network, chosen in one place: 'auto', 'xformers', 'sdpa' or 'math'.

- 'sdpa': PyTorch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels where available);
- 'math': the explicit softmax(QKᵀ/√d)V (diffusers' `AttnProcessor`), the reference the fused kernels must match;
- 'xformers': xFormers' memory-efficient attention (CUDA and the `xformers` package needed);
- 'auto': xformers on CUDA when it is installed, else sdpa.

Classic attention layers (UNets) get their processors replaced; layers on diffusers' attention
dispatcher (e.g. FLUX) get the dispatcher backend set on each processor, without touching the
process-wide active backend. Errors name the config field `attention_backend` and the fix.
"""
from __future__ import annotations

import importlib.util
from typing import Literal, Union

import torch

AttentionBackend = Literal["auto", "xformers", "sdpa", "math"]
BACKENDS = ("auto", "xformers", "sdpa", "math")

# Our name -> diffusers' attention-dispatch backend name, for processors that dispatch.
_DISPATCH = {"sdpa": "native", "math": "_native_math", "xformers": "xformers"}


def xformers_available() -> bool:
    """True when the xformers package can be imported."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # a broken build (e.g. compiled for another torch) is as good as absent
        return False
    return True


def resolve_attention_backend(name: str, device: Union[str, torch.device]) -> str:
    """The concrete backend for `name` on `device` ('auto' resolved); raises ValueError when it cannot run there."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of {list(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "xformers" if on_cuda and xformers_available() else "sdpa"
    if name == "xformers":
        if not on_cuda:
            raise ValueError(f"attention_backend='xformers' needs a CUDA device, but the model runs on {torch.device(device).type!r}; "
                             "use attention_backend=sdpa (or auto)")
        if not xformers_available():
            raise ValueError("attention_backend='xformers' but the xformers package is not importable; "
                             "`pip install xformers` (a build matching this torch) or use attention_backend=sdpa (or auto)")
    return name


def set_attention_backend(model: torch.nn.Module, name: str) -> str:
    """Switch every attention layer of the diffusers `model` to backend `name` (resolved on the model's device).

    Returns the concrete backend. Raises ValueError when a layer cannot use it.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    device = next(model.parameters()).device
    backend = resolve_attention_backend(name, device)
    processors = getattr(model, "attn_processors", {})
    if not processors:
        return backend  # no attention layers to switch
    classic = (AttnProcessor, AttnProcessor2_0)
    if hasattr(model, "enable_xformers_memory_efficient_attention") and backend == "xformers" and not _dispatching(processors):
        model.enable_xformers_memory_efficient_attention()
        return backend
    if all(isinstance(p, classic) or type(p).__name__.startswith("XFormersAttnProcessor") for p in processors.values()):
        model.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
        return backend
    if _dispatching(processors):
        for p in processors.values():
            p._attention_backend = _DISPATCH[backend]
        return backend
    kinds = sorted({type(p).__name__ for p in processors.values()})
    if backend == "sdpa" and all(k.endswith("2_0") for k in kinds):
        return backend  # these processors (e.g. SD3's JointAttnProcessor2_0) already call scaled_dot_product_attention
    raise ValueError(f"attention_backend={name!r} is not available for {type(model).__name__} (attention processors {kinds}); "
                     "use attention_backend=sdpa")


def _dispatching(processors: dict) -> bool:
    """True when every processor routes through diffusers' attention dispatcher (has `_attention_backend`)."""
    return bool(processors) and all(hasattr(p, "_attention_backend") for p in processors.values())
