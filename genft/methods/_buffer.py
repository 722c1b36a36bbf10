"""A fixed-capacity ring buffer of single sampler transitions, sampled uniformly (DPOK's replay buffer)."""
from __future__ import annotations

from typing import Dict, Optional

import torch


class TransitionBuffer:
    """Stores named per-transition tensors; the oldest transitions are overwritten when full."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.data: Dict[str, torch.Tensor] = {}
        self.size = 0
        self.pos = 0

    def __len__(self) -> int:
        return self.size

    def add(self, **items: torch.Tensor) -> None:
        """Append a batch of transitions; every tensor's first dim is the number of transitions."""
        n = {v.shape[0] for v in items.values()}
        if len(n) != 1:
            raise ValueError(f"all transition fields need the same first dimension, got {n}")
        (count,) = n
        if not self.data:
            self.data = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in items.items()}
        elif set(items) != set(self.data):
            raise ValueError(f"transition fields {sorted(items)} differ from the buffer's {sorted(self.data)}")
        idx = (self.pos + torch.arange(count)) % self.capacity
        for k, v in items.items():
            self.data[k][idx] = v.detach().to(self.data[k].dtype)
        self.pos = int((self.pos + count) % self.capacity)
        self.size = min(self.capacity, self.size + count)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """`batch_size` transitions drawn uniformly with replacement."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer; collect a rollout first")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> Dict:
        return {"capacity": self.capacity, "size": self.size, "pos": self.pos, "data": dict(self.data)}

    def load_state_dict(self, state: Dict) -> None:
        self.capacity, self.size, self.pos = state["capacity"], state["size"], state["pos"]
        self.data = dict(state["data"])
