"""Fully sharded data parallelism (`fsdp: true`): the generator's weights, gradients and optimiser state split over processes.

genft shards with PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`) instead of passing the
network to `accelerate.prepare`: accelerate turns FSDP on only for accelerator devices, while
`fully_shard` runs the same code on CUDA (NCCL) and on CPU processes (gloo), so the 2-process CPU test
exercises what a GPU user runs. Each transformer/ResNet block is one FSDP unit (its weights are
all-gathered for its forward and freed after), then the root holds the rest.

What this asks of the loop (genft.trainer):
- every process runs the same number of forwards (rollouts and minibatches split evenly; evaluation
  runs on every process, only the main one writes);
- checkpoints gather the full weights and the optimiser state keyed by parameter name on every
  process, and the main one writes them; resume loads them back into the shards;
- no DDP wrapper: FSDP's reduce-scatter averages the gradients itself.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch

#: diffusers block classes that become one FSDP unit each (UNet, SD3 and FLUX transformers).
BLOCK_CLASSES: Tuple[str, ...] = (
    "BasicTransformerBlock", "ResnetBlock2D", "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
)


def is_sharded(module: torch.nn.Module) -> bool:
    """True when `module` was sharded by `shard_network` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_network(net: torch.nn.Module, block_classes: Iterable[str] = BLOCK_CLASSES, reshard_after_forward: bool = True) -> int:
    """Shard `net` in place over all processes: each block of `block_classes` is one unit, the root the rest.

    Needs an initialised process group. Returns the number of block units. Parameters are replaced by
    DTensor parameters: build optimisers (and any list of parameters) after this call.
    """
    from torch.distributed.fsdp import fully_shard

    names = set(block_classes)
    blocks = [m for m in net.modules() if type(m).__name__ in names and m is not net]
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(net, reshard_after_forward=reshard_after_forward)
    return len(blocks)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise), for checks that need no collective."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every process must call it); the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The full weights of a sharded `net` on the CPU, keyed as `net.state_dict()` (collective; empty off rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net, options=_options())


def full_optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimiser state keyed by parameter name, gathered to rank 0 on the CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, optimizer, options=_options())


def load_full_state(net: torch.nn.Module, model_state: Dict[str, torch.Tensor],
                    optimizer: Optional[torch.optim.Optimizer] = None, optimizer_state: Optional[Dict[str, Any]] = None) -> None:
    """Load full weights (and a name-keyed optimiser state) into a sharded `net`; every process passes the full state."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(net, model_state, options=_options())
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(net, optimizer, optimizer_state, options=_options())
