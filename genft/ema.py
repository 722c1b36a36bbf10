"""An exponential moving average of the trained parameters, on diffusers' `EMAModel`.

`EMAModel` fits as is: it averages a list of parameters (so LoRA adapters alone, or the whole
network), has `store`/`copy_to`/`restore` to evaluate with the averaged weights, and a
`state_dict` for checkpoints. Its decay at optimiser step k (counted from 1) is

    d_1 = 0,  d_k = min(decay, (1 + (k−1)) / (10 + (k−1)))  for k ≥ 2,

the warm-up diffusers' and Flow-GRPO's training scripts use, so early averages are not pinned
to the initial weights; `shadow ← d_k·shadow + (1 − d_k)·param`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """The decay `EMAModel` applies at optimiser step `step` (1-based), in closed form."""
    s = step - 1
    return 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))


def make_ema(params: Sequence[torch.nn.Parameter], decay: float):
    """An `EMAModel` over `params` (a shadow copy on their device), or None when `decay` is 0 (off)."""
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"ema_decay={decay} must be in [0, 1) (0 turns the EMA off)")
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params), decay=decay, foreach=False)


@contextlib.contextmanager
def ema_weights(ema, params: List[torch.nn.Parameter]) -> Iterator[None]:
    """Inside, `params` hold the EMA weights; the trained weights come back on exit (a no-op when `ema` is None)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)

