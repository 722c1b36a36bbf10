"""The toy text-to-image world: real sklearn digits in named colours, a pretrained tiny generator, and its oracle.

Prompts look like "a red 7 on a blue background"; a fixed 15% of (digit, fg, bg) combinations is
held out of pretraining for evaluation. `load_or_pretrain()` returns a diffusers-layout folder that
`pipelines.DiffusionPipeline.from_pretrained` loads; `OracleEvaluator` and `ToyOracleReward` measure
how well images follow their prompts.
"""
from .accuracy import ToyOracleAccuracy
from .cache import default_cache_dir, load_or_pretrain, validate_world
from .data import (
    COLORS,
    PALETTE,
    TEMPLATES,
    Combo,
    all_combos,
    caption,
    heldout_combos,
    heldout_prompts,
    parse_prompt,
    render,
    sample_batch,
    train_combos,
    train_prompts,
)
from .oracle import OracleEvaluator, OraclePrediction, ToyOracleReward
from .pretrain import PretrainConfig, evaluate_heldout, pretrain
from .tokenizer import build_tokenizer

__all__ = [
    "COLORS",
    "PALETTE",
    "TEMPLATES",
    "Combo",
    "OracleEvaluator",
    "OraclePrediction",
    "PretrainConfig",
    "ToyOracleAccuracy",
    "ToyOracleReward",
    "all_combos",
    "build_tokenizer",
    "caption",
    "default_cache_dir",
    "evaluate_heldout",
    "heldout_combos",
    "heldout_prompts",
    "load_or_pretrain",
    "parse_prompt",
    "pretrain",
    "render",
    "sample_batch",
    "train_combos",
    "train_prompts",
    "validate_world",
]
