"""genft: reward fine-tuning of generative image models (DPOK, Adjoint Matching, GARDO, FAIL, ROCM, DI*, MFM).

Public API: `genft.train(config)`, `genft.Trainer`, the method configs (e.g. `genft.DPOKConfig`),
`genft.load_config`. The toy world's rewards are registered with `reward_models` by name here, so
`reward_models` itself never needs to know the toy world exists.
"""
import reward_models as _reward_models

from .config import ConfigError
from .loading import load_config
from .methods import DPOK, FAIL, AdjointMatching, AdjointMatchingConfig, DPOKConfig, FAILConfig, get_method
from .train_config import TrainConfig
from .trainer import Trainer, TrainingError, train

_reward_models.register("toy_oracle", "genft.toyworld:ToyOracleReward", overwrite=True)
_reward_models.register("toy_oracle_accuracy", "genft.toyworld:ToyOracleAccuracy", overwrite=True)
# The learned, hackable proxy (a tiny open_clip CLIP trained on the toy world; trained on first use, ~70 s).
_reward_models.register("toy_proxy_clip", "genft.toyworld.proxy:ToyProxyCLIPScore", overwrite=True)
# A deliberately mis-specified bonus (paint in the stroke colour); added to the proxy it makes hacking visible.
_reward_models.register("toy_ink", "genft.toyworld.ink:ToyInkReward", overwrite=True)

__version__ = "0.1.0"
__all__ = ["AdjointMatching", "AdjointMatchingConfig", "ConfigError", "DPOK", "DPOKConfig", "FAIL", "FAILConfig", "TrainConfig", "Trainer", "TrainingError", "get_method", "load_config", "train"]
