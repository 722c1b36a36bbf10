"""Mixed precision: the network's forward runs under autocast (bf16/fp16); sampler step math and log-probs stay float32.

Only the network's `forward` is autocast (as accelerate does for prepared models), so everything the
pipelines compute from its output (means, stds, Gaussian log-probs, KLs) runs outside autocast in
float32. Trajectory latents are stored in the storage dtype (`storage_dtype`): the pipelines cast
each sampled latent to it *before* scoring, so re-scoring the stored latent reproduces the rollout's
log-prob exactly and the importance ratio of the first update is 1.

Written here rather than taken from `Accelerator(mixed_precision=...)` because accelerate keeps the
precision in its process-wide `AcceleratorState` (a caller's accelerator decides it, and asking for
another one in the same process raises), and its loss scaler skips steps without telling the
trainer's non-finite-update accounting.
"""
from __future__ import annotations

import contextlib
import types
from typing import Literal, Optional

import torch

MixedPrecision = Literal["no", "bf16", "fp16"]
TrajectoryDtype = Literal["auto", "float32", "bfloat16", "float16"]

_COMPUTE = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(mixed_precision: MixedPrecision) -> Optional[torch.dtype]:
    """The autocast dtype for `mixed_precision` (None for 'no')."""
    if mixed_precision not in _COMPUTE:
        raise ValueError(f"mixed_precision={mixed_precision!r} must be one of {sorted(_COMPUTE)}")
    return _COMPUTE[mixed_precision]


def storage_dtype(mixed_precision: MixedPrecision, trajectory_dtype: TrajectoryDtype = "auto") -> Optional[torch.dtype]:
    """The dtype trajectories store latents in: `trajectory_dtype`, or under 'auto' the compute dtype (None: the network's)."""
    if trajectory_dtype == "auto":
        return compute_dtype(mixed_precision)
    if trajectory_dtype not in _STORAGE:
        raise ValueError(f"trajectory_dtype={trajectory_dtype!r} must be 'auto' or one of {sorted(_STORAGE)}")
    return _STORAGE[trajectory_dtype]


def autocast(mixed_precision: MixedPrecision, device: torch.device):
    """An autocast context for `mixed_precision` on `device` (a no-op context for 'no')."""
    dtype = compute_dtype(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def autocast_forward(module: torch.nn.Module, mixed_precision: MixedPrecision, device: torch.device) -> torch.nn.Module:
    """Run `module.forward` under autocast from now on (weights stay float32); undo with `remove_autocast_forward`.

    The wrapper is bound to the module (not a closure over its forward), so a `copy.deepcopy` of the
    module runs its own weights, still autocast.
    """
    if compute_dtype(mixed_precision) is None:
        return module
    if "forward" in module.__dict__:
        raise ValueError("autocast_forward: this module's forward is already wrapped (by autocast_forward or another tool)")
    module._genft_autocast = (mixed_precision, torch.device(device).type)
    module.forward = types.MethodType(_autocast_forward, module)
    return module


def _autocast_forward(self: torch.nn.Module, *args, **kwargs):
    mixed_precision, device_type = self._genft_autocast
    with autocast(mixed_precision, torch.device(device_type)):
        return type(self).forward(self, *args, **kwargs)


def remove_autocast_forward(module: torch.nn.Module) -> torch.nn.Module:
    """Restore the forward that `autocast_forward` wrapped."""
    if module.__dict__.pop("_genft_autocast", None) is not None:
        del module.forward
    return module


class LossScaler:
    """fp16 loss scaling (torch.amp.GradScaler) behind one interface that is a no-op for 'no' and 'bf16'.

    Use: `backward(scale(loss))`; at the step: `unscale(opt)` before checking/clipping gradients,
    `step(opt)` (skipped by the scaler on overflow), then `update()` once per window.
    """

    def __init__(self, mixed_precision: MixedPrecision, device: torch.device):
        self.enabled = mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=self.enabled)
        self._unscaled = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        """Lower the scale after an overflow, raise it after a run of good steps (only after `unscale`)."""
        if self.enabled and self._unscaled:
            self.scaler.update()
        self._unscaled = False

    @property
    def scale_value(self) -> float:
        return float(self.scaler.get_scale()) if self.enabled else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)

