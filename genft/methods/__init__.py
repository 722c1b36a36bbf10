"""Finetuners by name: each is a Method subclass with its own Config dataclass."""
from __future__ import annotations

from typing import Dict, Type

from ..config import ConfigError
from .adjoint_matching import AdjointMatching, AdjointMatchingConfig
from .base import Method
from .dpok import DPOK, DPOKConfig
from .diff_instruct_star import DiffInstructStar, DiffInstructStarConfig
from .fail import FAIL, FAILConfig
from .gardo import GARDODPOK, GARDODPOKConfig, GARDOGRPO, GARDOGRPOConfig
from .grpo import GRPO, GRPOConfig
from .rocm import ROCM, ROCMConfig

METHODS: Dict[str, Type[Method]] = {"dpok": DPOK, "adjoint_matching": AdjointMatching, "fail": FAIL}
METHODS["grpo"] = GRPO
METHODS["diff_instruct_star"] = DiffInstructStar
METHODS["gardo_grpo"] = GARDOGRPO
METHODS["gardo_dpok"] = GARDODPOK
METHODS["rocm"] = ROCM


def get_method(name: str) -> Type[Method]:
    """The Method class registered as `name`; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise ConfigError(f"method={name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["AdjointMatching", "AdjointMatchingConfig", "DiffInstructStar", "DiffInstructStarConfig", "DPOK", "DPOKConfig", "FAIL", "FAILConfig", "GARDODPOK", "GARDODPOKConfig", "GARDOGRPO", "GARDOGRPOConfig", "GRPO", "GRPOConfig", "METHODS", "Method", "ROCM", "ROCMConfig",
           "get_method"]
