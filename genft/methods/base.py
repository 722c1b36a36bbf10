"""The hooks a finetuner supplies to the one training loop (`genft.trainer.Trainer`)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch

from pipelines import Trajectory

from ..train_config import TrainConfig


class Method:
    """Base class: the Trainer owns sampling, rewards, optimiser steps, evaluation and checkpoints.

    A method turns scored rollouts into minibatches and a differentiable loss. Override:
    `advantages` (optional), `collect`, `minibatches`, `loss`; and `extra_step`/`state_dict` for
    auxiliary networks (value baselines, discriminators, fake-score nets).

    Under several processes `collect` sees the whole round, gathered in rank order; minibatches are
    drawn from the shared seeded generator and each process trains on its slice of each one, so the
    loss must be a mean over the minibatch for DDP's gradient average to equal the 1-process step.
    """

    name = "base"
    config_class = TrainConfig
    #: generator families (pipelines.FAMILIES) this method can drive; checked before a model loads.
    families: Tuple[str, ...] = ("diffusion",)
    #: first-order methods back-propagate through the reward and need `differentiable=True` rewards.
    needs_reward_gradient: bool = False
    #: False for methods with no KL/divergence to the starting model: the Trainer then makes no reference network.
    uses_reference: bool = True

    def __init__(self, config: TrainConfig, pipeline, reference_unet: torch.nn.Module):
        self.config = config
        self.pipeline = pipeline
        self.reference_unet = reference_unet

    def attach(self, *, reward) -> None:
        """Called once by the Trainer with the built reward; first-order methods keep it to differentiate it."""

    def rollout_kwargs(self) -> Dict[str, Any]:
        """Sampler settings passed to `pipeline.rollout` besides prompts, seeds, steps and guidance.

        Diffusion methods sample DDIM with the config's η; flow/consistency methods override this
        (e.g. Adjoint Matching asks for the memoryless SDE).
        """
        return {"eta": self.config.eta}

    @property
    def gradient_accumulation_steps(self) -> int:
        """Minibatches whose gradients are summed into one optimiser step."""
        return 1

    def advantages(self, rewards: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        from ..advantages import normalize

        return normalize(rewards)

    def collect(self, trajectory: Trajectory, advantages: torch.Tensor, rewards: torch.Tensor) -> None:
        raise NotImplementedError

    def minibatches(self, generator: torch.Generator) -> Iterable[Any]:
        raise NotImplementedError

    def loss(self, batch: Any, round_index: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError

    def extra_step(self, round_index: int) -> Dict[str, float]:
        """Updates of auxiliary networks after the policy updates of a round."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass
