"""DeepSpeed ZeRO stages 1 and 2 under `accelerate launch` (a DeepSpeed accelerate config, e.g.
scripts/recipes/accelerate/deepspeed_zero2.yaml): the optimiser state (and with stage 2 the gradients)
are partitioned over processes, the weights stay whole on each, so rollouts and evaluation use the bare
network unchanged.

genft keeps its own settings authoritative: the engine is configured here from the run's minibatch
accumulation and `max_grad_norm` (DeepSpeed clips inside its step); DeepSpeed's own fp16/bf16 and
offloading are refused, since genft autocasts only the generator's forward and keeps step math in
float32. Checkpoints hold each process's optimiser partition (`zero/rank_<r>.pt`, written by every
process into a staging folder that the main process moves into the atomic checkpoint).
Stage 3 partitions the weights themselves and is refused: use `fsdp: true` (genft.sharding) for that.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

import torch

from .config import ConfigError

ZERO_DIR = "zero"


def requested() -> bool:
    """True under `accelerate launch` with a DeepSpeed config (accelerate sets this variable for the processes)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(device: torch.device):
    """An Accelerator in DeepSpeed mode; on CPU with gloo (accelerate's `cpu=True` would silently fall back to DDP)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(backend="gloo")] if device.type == "cpu" else []
    return Accelerator(kwargs_handlers=handlers)


def is_deepspeed(accelerator) -> bool:
    return str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1] == "DEEPSPEED"


def check_config(accelerator) -> None:
    """ConfigError for DeepSpeed settings genft does not drive: stage 3, offloading, DeepSpeed's own fp16/bf16."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2):
        raise ConfigError(f"DeepSpeed zero_stage={stage} is not supported: genft drives ZeRO stages 1 and 2 (weights stay "
                          "whole on each process); for sharded weights set fsdp: true with scripts/recipes/accelerate/fsdp.yaml")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(f"DeepSpeed {key}.device={device!r} is not supported (genft's torch AdamW runs where the "
                              "weights are); set it to none in the accelerate config")
    for key in ("fp16", "bf16"):
        if str((ds.get(key) or {}).get("enabled", False)).lower() == "true":
            raise ConfigError(f"DeepSpeed {key} is enabled in the accelerate config; set mixed_precision: 'no' there and "
                              "use genft's own mixed_precision field (it autocasts the generator only)")


def configure(accelerator, accumulation: int, max_grad_norm: float) -> None:
    """Write genft's accumulation and clipping into the DeepSpeed config before `prepare` builds the engine.

    The engine's micro-batch size only feeds DeepSpeed's throughput timer: the loop slices its own minibatches.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    world = accelerator.num_processes
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=int(accumulation),
              train_batch_size=int(accumulation) * world, gradient_clipping=float(max_grad_norm))


def write_optimizer_partition(engine, folder: Path, process_index: int) -> None:
    """This process's ZeRO optimiser partition as `folder/rank_<r>.pt` (every process calls it)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(engine.optimizer.state_dict(), folder / f"rank_{process_index}.pt")


def load_optimizer_partitions(engine, folder: Path, num_processes: int) -> None:
    """Load the ZeRO optimiser state written by `write_optimizer_partition` (same process count).

    DeepSpeed reads its own partition from the list and, as with its own checkpoints, refreshes the
    float32 partitions from the network's (already loaded) weights.
    """
    files: List[Path] = [folder / f"rank_{r}.pt" for r in range(num_processes)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"DeepSpeed optimiser partitions missing: {missing}; resume with the process count the "
                         "checkpoint was written with")
    with torch.serialization.safe_globals(_partition_globals()):  # no arbitrary unpickling: only DeepSpeed's state types
        states: List[Dict[str, Any]] = [torch.load(f, weights_only=True) for f in files]
    engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=False)


def _partition_globals() -> list:
    """The DeepSpeed classes a ZeRO optimiser state pickles besides tensors, allow-listed for `weights_only` loading."""
    import importlib

    found = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: torch.load then names what is missing
            pass
    return found
