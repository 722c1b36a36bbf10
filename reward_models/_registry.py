"""Rewards by name, by import path ("pkg.module:Class"), or as ready instances."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Union

from ._base import RewardModel

_REGISTRY: Dict[str, Union[str, Callable[..., RewardModel]]] = {}


def register(name: str, factory: Union[str, Callable[..., RewardModel]], *, overwrite: bool = False) -> None:
    """Register a reward class/factory (or a lazy "module:attr" path) under `name`."""
    if not name or not isinstance(name, str):
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available() -> list:
    """Sorted names of the registered rewards."""
    return sorted(_REGISTRY)


def _import_path(path: str):
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"{path!r} is not an import path; use 'package.module:ClassName'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import reward {path!r}: {e}") from e


def load(spec: Union[str, RewardModel, Callable[..., RewardModel]], **kwargs) -> RewardModel:
    """A reward from a registered name, an import path, a class/factory, or an instance (returned as is)."""
    if isinstance(spec, RewardModel):
        if kwargs:
            raise ValueError("keyword arguments cannot be applied to a reward instance; pass a name or class instead")
        return spec
    if isinstance(spec, str):
        if spec in _REGISTRY:
            factory = _REGISTRY[spec]
            if isinstance(factory, str):
                factory = _import_path(factory)
        elif ":" in spec or "." in spec:
            factory = _import_path(spec)
        else:
            raise ValueError(f"unknown reward {spec!r}; registered rewards: {', '.join(available())} (or give 'module:Class')")
    elif callable(spec):
        factory = spec
    else:
        raise TypeError(f"reward must be a name, import path, class or RewardModel, got {type(spec).__name__}")
    reward = factory(**kwargs)
    if not isinstance(reward, RewardModel):
        raise TypeError(f"reward factory {spec!r} returned {type(reward).__name__}, not a reward_models.RewardModel")
    return reward
