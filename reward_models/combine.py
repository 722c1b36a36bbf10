"""Combining rewards: a weighted sum whose parts are logged separately, and background scoring."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch

from ._base import RewardModel
from ._registry import load

RewardSpec = Union[str, RewardModel]


class WeightedSum(RewardModel):
    """r(x, c) = Σ_k w_k · r_k(x, c). `score_components` returns each r_k so the trainer can log it.

    Differentiable only if every part with a non-zero weight is.
    """

    name = "weighted_sum"

    def __init__(self, parts: Mapping[str, Tuple[RewardSpec, float]], *, differentiable: bool = False, **kwargs):
        if not parts:
            raise ValueError("WeightedSum needs at least one (reward, weight) part")
        models: Dict[str, RewardModel] = {}
        weights: Dict[str, float] = {}
        for key, value in parts.items():
            if not (isinstance(value, tuple) and len(value) == 2):
                raise TypeError(f"part {key!r} must be a (reward, weight) pair, got {value!r}")
            spec, weight = value
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight or abs(weight) == float("inf"):
                raise ValueError(f"weight of reward {key!r} must be a finite number, got {weight!r}")
            models[key] = load(spec) if not isinstance(spec, RewardModel) else spec
            weights[key] = float(weight)
        self.supports_grad = all(m.supports_grad for k, m in models.items() if weights[k] != 0.0)
        super().__init__(differentiable=differentiable, **kwargs)
        if differentiable:
            for k, m in models.items():
                if weights[k] != 0.0 and not m.differentiable:
                    raise ValueError(f"reward {k!r} in the weighted sum was built with differentiable=False; "
                                     "build it with differentiable=True to use the sum differentiably")
        self.parts = torch.nn.ModuleDict(models)
        self.weights = weights
        self.name = "+".join(f"{w:g}*{k}" for k, w in weights.items())

    def score_components(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Each part's validated float32 [B] score, unweighted, keyed by its name in `parts`."""
        return {k: m(images, prompts) for k, m in self.parts.items()}

    def combine(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of already computed `score_components`."""
        return sum(self.weights[k] * components[k] for k in self.weights)  # type: ignore[return-value]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.combine(self.score_components(images, prompts))


def score_with_components(reward: RewardModel, images: torch.Tensor, prompts: Sequence[str]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(total [B], {part: [B]}) for any reward; a single reward is its own only part."""
    if isinstance(reward, WeightedSum):
        from ._base import check_images, check_rewards  # local: avoid a cycle in type checkers only

        check_images(images, prompts)
        parts = reward.score_components(images, list(prompts))
        return check_rewards(reward.combine(parts), images.shape[0], reward.name), parts
    total = reward(images, prompts)
    return total, {reward.name: total}


class AsyncScorer:
    """Score batches on a background thread so reward computation overlaps the next rollout chunk.

    `submit` returns a Future of (total, components); images are detached and copied first, so the
    caller may reuse its buffers. Use as a context manager, or call `close()`.
    """

    def __init__(self, reward: RewardModel, max_workers: int = 1):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"reward-{reward.name}")

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> "Future[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]":
        frozen = images.detach().clone()
        return self._pool.submit(score_with_components, self.reward, frozen, list(prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "AsyncScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
