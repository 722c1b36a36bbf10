"""Data parallelism for the one loop: shard a round's rollouts over processes, gather what must be global.

How N processes train exactly like one process with the same config (the same *global* batch):

1. Rollout is sharded. Process r rolls out the contiguous slice `shard_span(n, r, N)` of the round's
   samples with the per-sample generators a single process would use, so the round is the same images.
2. Rewards, prompts and the trajectory are gathered in rank order (`accelerator.gather` /
   `gather_object`), so every process holds the same global round. Advantages and per-prompt statistics
   (groups may span processes) are computed on it, identically everywhere; so is the method's replay data.
3. Minibatches are drawn from the shared, identically seeded trainer generator, so they are the same on
   every process; each process trains on its equal slice (`shard_minibatch`). DDP averages gradients,
   and for a loss that is a mean over the minibatch the average of N slice-means is the full mean.

Library code only: the caller's `accelerate.Accelerator` is passed in, nothing here reads the environment.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from pipelines import Trajectory

from .config import ConfigError

#: Trajectory fields with one row per sample (the rest are per-step and shared by the whole batch).
PER_SAMPLE_FIELDS = ("latents", "log_probs", "prompt_embeds", "negative_prompt_embeds", "images")


def check_data_parallel(accelerator) -> None:
    """ConfigError for accelerate modes the loop does not drive: it runs one process, DDP, DeepSpeed ZeRO 1/2
    (genft.zero checks its settings) or its own FSDP.

    genft shards with FSDP2 itself (`fsdp: true`, genft.sharding) on a plain multi-process launch, since
    accelerate's FSDP mode exists only on accelerator devices; Megatron is not driven.
    """
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind == "FSDP":
        raise ConfigError("accelerate's distributed_type=FSDP is not how genft shards: launch with the multi-process config "
                          "scripts/recipes/accelerate/fsdp.yaml and set fsdp: true in the genft recipe (genft applies FSDP2 itself)")
    if kind == "MEGATRON_LM":
        raise ConfigError(f"accelerate distributed_type={kind} is not supported by genft's training loop; use DDP "
                          "(scripts/recipes/accelerate/ddp.yaml), DeepSpeed ZeRO (deepspeed_zero2.yaml) or FSDP "
                          "(fsdp: true with scripts/recipes/accelerate/fsdp.yaml)")


def check_divisible(name: str, value: int, num_processes: int) -> None:
    """ConfigError unless `value` splits evenly over `num_processes` (uneven shards would skew DDP's average)."""
    if num_processes > 1 and value % num_processes:
        lower = value - value % num_processes
        raise ConfigError(f"{name}={value} does not split evenly over {num_processes} processes; "
                          f"use a multiple of {num_processes} (e.g. {lower or num_processes})")


def shard_span(n: int, process_index: int, num_processes: int) -> Tuple[int, int]:
    """[start, stop) of process `process_index`'s contiguous, equal share of n items."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must be in [0, {num_processes})")
    if n % num_processes:
        raise ValueError(f"{n} items do not split evenly over {num_processes} processes")
    size = n // num_processes
    return process_index * size, (process_index + 1) * size


def gather_tensor(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0 in rank order (itself with one process)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.gather(tensor.contiguous())


def gather_strings(accelerator, items: Sequence[str]) -> List[str]:
    """Every process's list concatenated in rank order."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def gather_trajectory(accelerator, trajectory: Trajectory) -> Trajectory:
    """The global round: per-sample fields gathered in rank order, per-step fields kept (they are identical)."""
    if accelerator.num_processes == 1:
        return trajectory
    fields = {name: gather_tensor(accelerator, getattr(trajectory, name))
              for name in PER_SAMPLE_FIELDS if getattr(trajectory, name) is not None}
    from dataclasses import replace

    return replace(trajectory, prompts=gather_strings(accelerator, trajectory.prompts), **fields)


def mean_over_processes(accelerator, values: Mapping[str, float]) -> Dict[str, float]:
    """The mean of each scalar over processes (equal shards: the global mean); keys must match on every process."""
    if accelerator.num_processes == 1 or not values:
        return dict(values)
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
    return dict(zip(keys, total.tolist()))


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on at least one (e.g. a stop request, a non-finite loss)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def shard_minibatch(batch: Mapping[str, Any], process_index: int, num_processes: int) -> Dict[str, Any]:
    """This process's equal slice of a minibatch dict: tensors (dim ≥ 1) and lists of the batch length are cut.

    Everything else (flags, None, 0-d tensors) is passed through. Raises ValueError when the per-sample
    entries disagree on the batch length or it does not split evenly, naming the fix.
    """
    if num_processes == 1:
        return dict(batch)
    if not isinstance(batch, Mapping):
        raise TypeError(f"multi-process training needs minibatches that are dicts, got {type(batch).__name__}")
    lengths = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim >= 1}
    if not lengths:
        raise ValueError(f"minibatch fields {sorted(batch)} hold no per-sample tensor to split over processes")
    sizes = set(lengths.values())
    if len(sizes) != 1:
        raise ValueError(f"cannot split a minibatch whose tensors disagree on the batch length: {lengths}")
    (n,) = sizes
    if n % num_processes:
        raise ValueError(f"a minibatch of {n} samples does not split evenly over {num_processes} processes; "
                         f"make the method's minibatch size (e.g. p_batch_size / train_batch_size) a multiple of {num_processes}")
    a, b = shard_span(n, process_index, num_processes)
    out: Dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            out[k] = v[a:b]
        elif isinstance(v, list) and len(v) == n:
            out[k] = v[a:b]
        else:
            out[k] = v
    return out


class SilentLog:
    """Stands in for `RunLog` on processes other than the main one: records are dropped (main writes them)."""

    def log(self, record: Dict) -> None:
        pass

    def close(self) -> None:
        pass

    def records(self) -> List[Dict]:
        return []

    def to_csv(self):
        return None
