"""pipelines: generators whose every stochastic step is a Gaussian policy with an exact log-prob.

Public API: the pure step functions (`ddim_step`), the `GaussianStep` record with
`gaussian_log_prob` / `gaussian_kl`, the `Trajectory` record, and one pipeline class per family.
This package never imports `genft` or `reward_models`.
"""
from ._attention import BACKENDS as ATTENTION_BACKENDS, resolve_attention_backend, set_attention_backend
from ._consistency import (FINAL_STEP, ConsistencyPipeline, consistency_output, guidance_scale_embedding, lcm_prev_timesteps,
                           lcm_step)
from ._ddim import ddim_prev_timestep, ddim_step
from ._diffusion import DiffusionPipeline
from ._family import FAMILIES, detect_family
from ._flow import FlowMatchPipeline
from ._flow_step import MEMORYLESS_NOISE_LEVEL, flow_ode_step, flow_sde_noise_scale, flow_sde_step
from ._gaussian import GaussianStep, gaussian_kl, gaussian_log_prob
from ._mirror import (MIRRORS, BoxEntropicMirror, BoxLogBarrierMirror, BoxRegularizedMirror, FlowPair, GaussianPrior,
                      IdentityMap, MirrorFlow, MirrorMap, SimplexEntropicMirror, SimplexRegularizedMirror, StudentTPrior,
                      mirror_map)
from ._mirror_pipeline import MirrorFlowMatchPipeline
from ._one_step import OneStepPipeline, one_step_x0
from ._registry import REGISTRY, load
from ._trajectory import Trajectory

__all__ = [
    "ATTENTION_BACKENDS",
    "resolve_attention_backend",
    "set_attention_backend",
    "OneStepPipeline",
    "one_step_x0",
    "ConsistencyPipeline",
    "consistency_output",
    "FINAL_STEP",
    "guidance_scale_embedding",
    "lcm_prev_timesteps",
    "lcm_step",
    "DiffusionPipeline",
    "FlowMatchPipeline",
    "REGISTRY",
    "load",
    "MEMORYLESS_NOISE_LEVEL",
    "flow_ode_step",
    "flow_sde_noise_scale",
    "flow_sde_step",
    "FAMILIES",
    "detect_family",
    "GaussianStep",
    "Trajectory",
    "ddim_prev_timestep",
    "ddim_step",
    "gaussian_kl",
    "gaussian_log_prob",
    "MIRRORS",
    "BoxEntropicMirror",
    "BoxLogBarrierMirror",
    "BoxRegularizedMirror",
    "FlowPair",
    "GaussianPrior",
    "IdentityMap",
    "MirrorFlow",
    "MirrorFlowMatchPipeline",
    "MirrorMap",
    "SimplexEntropicMirror",
    "SimplexRegularizedMirror",
    "StudentTPrior",
    "mirror_map",
]
