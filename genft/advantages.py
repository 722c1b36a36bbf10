"""Advantage normalisers: per-prompt statistics (DDPO's tracker), group and batch normalisation."""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Dict, List, Sequence

import numpy as np
import torch


def normalize(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r − mean)/(std + eps) over the whole batch."""
    r = rewards.float()
    return (r - r.mean()) / (r.std(unbiased=False) + eps)


def group_normalize(rewards: torch.Tensor, prompts: Sequence[str], eps: float = 1e-4, global_std: bool = False) -> torch.Tensor:
    """Per-prompt (r − mean_prompt)/(std + eps); with `global_std` the std is the whole batch's (Flow-GRPO)."""
    r = rewards.float()
    out = torch.empty_like(r)
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    batch_std = r.std(unbiased=False)
    for idx in groups.values():
        g = r[idx]
        std = batch_std if global_std else g.std(unbiased=False)
        out[idx] = (g - g.mean()) / (std + eps)
    return out


class PerPromptStatTracker:
    """DDPO's tracker: normalise each reward by its prompt's recent history (falls back to the batch).

    Keeps the last `buffer_size` rewards per prompt; while a prompt has fewer than `min_count`,
    the current batch's mean/std are used instead.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size={buffer_size} and min_count={min_count} must be >= 1")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.stats: Dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Record the batch and return its advantages (same shape as `rewards`)."""
        r = rewards.detach().float().cpu().numpy()
        out = np.empty_like(r)
        for prompt in set(prompts):
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            hist = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            hist.extend(r[idx].tolist())
            if len(hist) < self.min_count:
                mean, std = r.mean(), r.std() + self.eps
            else:
                mean, std = np.mean(hist), np.std(hist) + self.eps
            out[idx] = (r[idx] - mean) / std
        return torch.from_numpy(out).to(rewards.device)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}
