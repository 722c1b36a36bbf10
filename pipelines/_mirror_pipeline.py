"""A prompt-conditioned flow pipeline that lives in the dual space of a mirror map of the pixel box.

`MirrorFlowMatchPipeline` is a `FlowMatchPipeline` whose latents are dual coordinates y = ∇Ψ(x) of
pixels x ∈ (0, 1) (Mirror Flow Matching, arXiv 2510.08929). Every SDE step, log-prob and replay
buffer is therefore in dual coordinates, and `decode` maps back with ∇Ψ*, so every sample lies
strictly inside the box: no clipping, no out-of-range pixels for a reward to exploit. Any finetuner
that drives a flow pipeline drives this one unchanged ("reward fine-tuning in dual space").
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Union

import torch

from ._flow import FlowMatchPipeline
from ._mirror import MIRRORS, GaussianPrior, MirrorMap, StudentTPrior, _BoxMap, mirror_map

MIRROR_CONFIG_DIR = "mirror"
MIRROR_CONFIG_FILE = "mirror_config.json"


def mirror_config(mirror: MirrorMap, prior) -> Dict[str, Any]:
    """The JSON-able record of a box mirror map and prior (what `save_pretrained` writes)."""
    entry: Dict[str, Any] = {"mirror": mirror.name, "eps": mirror.eps}
    if hasattr(mirror, "kappa"):
        entry["kappa"] = mirror.kappa
    entry["prior"] = prior.name
    if isinstance(prior, StudentTPrior):
        entry.update(nu=prior.nu, multivariate=prior.multivariate)
    return entry


def build_mirror(config: Dict[str, Any]):
    """(mirror map, prior) from a `mirror_config` record; unknown or non-box maps are refused."""
    name = config.get("mirror")
    if name not in MIRRORS or not issubclass(MIRRORS[name], _BoxMap):
        boxes = sorted(k for k, v in MIRRORS.items() if isinstance(v, type) and issubclass(v, _BoxMap))
        raise ValueError(f"mirror={name!r} is not a pixel-box mirror map; choose one of {', '.join(boxes)}")
    kwargs = {"eps": float(config.get("eps", 1e-6))}
    if "kappa" in config:
        kwargs["kappa"] = float(config["kappa"])
    prior_name = config.get("prior", "gaussian")
    if prior_name == "gaussian":
        prior = GaussianPrior()
    elif prior_name == "student_t":
        prior = StudentTPrior(nu=float(config.get("nu", 10.0)), multivariate=bool(config.get("multivariate", True)))
    else:
        raise ValueError(f"prior={prior_name!r} is unknown; choose 'gaussian' or 'student_t'")
    return mirror_map(name, **kwargs), prior


class MirrorFlowMatchPipeline(FlowMatchPipeline):
    """Flow matching in the dual space of a box mirror map; images are ∇Ψ*(y0), strictly inside [0, 1].

    Pixel space only (no VAE): the constraint is the pixel box. The prior of x at σ = 1 is Gaussian
    by default or Student-t (the paper's heavy-tailed prior); the Flow-GRPO SDE keeps the ODE's
    marginals only with the Gaussian prior (see `pipelines.MirrorFlow`).
    """

    family = "mirror"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, storage_dtype: Optional[torch.dtype] = None,
                 mirror: Optional[MirrorMap] = None, prior=None, **kwargs):
        if vae is not None:
            raise ValueError("MirrorFlowMatchPipeline works in pixel space (the box is the pixel range); pass vae=None")
        super().__init__(unet, text_encoder, tokenizer, scheduler, vae=None, storage_dtype=storage_dtype, **kwargs)
        self.mirror = mirror if mirror is not None else mirror_map("box_regularized")
        if not isinstance(self.mirror, _BoxMap):
            raise TypeError(f"mirror must be a pixel-box mirror map, got {type(self.mirror).__name__}")
        self.prior = prior if prior is not None else GaussianPrior()

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu") -> "MirrorFlowMatchPipeline":
        """Load a folder written by `save_pretrained`: a flow pipeline plus mirror/mirror_config.json."""
        cfg_path = os.path.join(str(path), MIRROR_CONFIG_DIR, MIRROR_CONFIG_FILE)
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path} has no {MIRROR_CONFIG_DIR}/{MIRROR_CONFIG_FILE}: it is not a mirror flow pipeline")
        with open(cfg_path) as f:
            mirror, prior = build_mirror(json.load(f))
        pipe = super().from_pretrained(path, torch_dtype=torch_dtype, device=device)
        pipe.mirror, pipe.prior = mirror, prior
        return pipe

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """The flow pipeline's folder plus the mirror map and prior, so loading restores the same sampler."""
        super().save_pretrained(path)
        os.makedirs(os.path.join(str(path), MIRROR_CONFIG_DIR), exist_ok=True)
        with open(os.path.join(str(path), MIRROR_CONFIG_DIR, MIRROR_CONFIG_FILE), "w") as f:
            json.dump(mirror_config(self.mirror, self.prior), f, indent=2)

    def to_dual(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] → dual latents (what the velocity network is trained on)."""
        return self.mirror.to_dual(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Dual latents → float32 images strictly inside (0, 1), with the exact gradient 1/Ψ''(x) when grad is on.

        The regularised map's inverse is a bisection (no autograd path), so the gradient is put back by
        the implicit-function rule dx/dy = 1/Ψ''(x): first-order methods (Adjoint Matching) can
        back-propagate a reward through it.
        """
        y = latents.float()
        x = self.mirror.to_primal(y.detach())
        if torch.is_grad_enabled() and y.requires_grad:
            inv_hessian = torch.exp(-self.mirror._log_derivative(self.mirror._clamped(x))).float()
            x = x + (y - y.detach()) * inv_hessian
        return x

    def initial_latents(self, batch: int, generator=None) -> torch.Tensor:
        """y at σ = 1 from the prior (Gaussian or Student-t), one generator per sample for batch-independent noise."""
        if isinstance(self.prior, GaussianPrior):
            return super().initial_latents(batch, generator)
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
            y = torch.cat([self.prior.sample((1, *self.latent_shape), g, device=self.device) for g in generator])
        else:
            y = self.prior.sample((batch, *self.latent_shape), generator, device=self.device)
        return y.to(self.latent_dtype)
