"""Building the optimised reward and the held-out rewards from a TrainConfig, before any model loads."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Union

import reward_models
from reward_models import RewardModel, WeightedSum


def build_reward(spec: Union[str, Mapping[str, float], RewardModel], options: Mapping[str, Mapping[str, Any]] | None = None,
                 *, differentiable: bool = False) -> RewardModel:
    """One reward from a name/path, an instance, or {name: weight} (a WeightedSum); `options` are per-name kwargs."""
    options = options or {}
    if isinstance(spec, RewardModel):
        return spec

    def one(name: str) -> RewardModel:
        kwargs = dict(options.get(name, {}))
        if differentiable:
            kwargs["differentiable"] = True
        return reward_models.load(name, **kwargs)

    if isinstance(spec, Mapping):
        return WeightedSum({name: (one(name), float(w)) for name, w in spec.items()}, differentiable=differentiable)
    return one(spec)


def build_eval_rewards(names, options: Mapping[str, Mapping[str, Any]] | None = None) -> Dict[str, RewardModel]:
    """The held-out rewards, measured at evaluation only and never optimised."""
    options = options or {}
    return {name: reward_models.load(name, **dict(options.get(name, {}))) for name in names}
