"""DPOK's optional value baseline V(x_t, t, c): an MLP whose layers are scaled per sampler step."""
from __future__ import annotations

import torch
from torch import nn


class StepConditionalLinear(nn.Module):
    """Linear layer whose output is multiplied by a learned per-step vector (DPOK's ConditionalLinear)."""

    def __init__(self, d_in: int, d_out: int, num_steps: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.step_scale = nn.Embedding(num_steps, d_out)
        nn.init.ones_(self.step_scale.weight)

    def forward(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.step_scale(step)


class ValueNet(nn.Module):
    """Predicts the (normalised) return of a trajectory from one of its states, its step and its prompt."""

    def __init__(self, latent_numel: int, text_dim: int, num_steps: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        dims = [latent_numel + text_dim] + [hidden] * layers
        self.layers = nn.ModuleList(StepConditionalLinear(a, b, num_steps) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, 1)

    def forward(self, latents: torch.Tensor, step: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        h = torch.cat([latents.float().flatten(1), prompt_embeds.float().mean(1)], dim=1)
        for layer in self.layers:
            h = torch.relu(layer(h, step))
        return self.out(h).squeeze(-1)
