"""reward_models: rewards that score images [B,3,H,W] in [0,1] with their prompts, returning float32 [B].

Load one with `reward_models.load(name_or_path_or_instance)`; add one with `register`.
This package never imports `genft` or `pipelines`.
"""
from ._base import RewardError, RewardModel, check_images, check_rewards
from ._registry import available, load, register
from .client import RemoteReward, RemoteRewardError
from .combine import AsyncScorer, WeightedSum, score_with_components
from .jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb

register("jpeg_compressibility", JpegCompressibility)
register("jpeg_incompressibility", JpegIncompressibility)
# Lazy "module:Class" entries: open_clip/transformers load only when one of these is asked for.
register("clip_score", "reward_models.clip_score:CLIPScore")
register("aesthetic", "reward_models.aesthetic:LaionAesthetic")
register("hpsv2", "reward_models.hps:HPSv2")
register("pickscore", "reward_models.pickscore:PickScore")
register("image_reward", "reward_models.image_reward:ImageReward")

__all__ = [
    "RemoteReward",
    "RemoteRewardError",
    "AsyncScorer",
    "WeightedSum",
    "score_with_components",
    "JpegCompressibility",
    "JpegIncompressibility",
    "RewardError",
    "RewardModel",
    "available",
    "check_images",
    "check_rewards",
    "jpeg_size_kb",
    "load",
    "register",
]
