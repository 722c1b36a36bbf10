"""The DDIM/DDPM ancestral step as a pure Gaussian policy (no scheduler state is read or written).

Written by hand because diffusers' `DDIMScheduler.step` neither returns the mean/std nor scores a
given `prev_sample`; the formulas follow it line for line (eq. 12 and 16 of the DDIM paper).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from ._gaussian import GaussianStep, Reduce, gaussian_log_prob

TimestepLike = Union[int, torch.Tensor]


def _as_batch_timesteps(timestep: TimestepLike, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.long).cpu()
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be an int or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
    return t


def ddim_prev_timestep(timestep: TimestepLike, scheduler, num_inference_steps: Optional[int] = None) -> torch.Tensor:
    """The timestep the DDIM step lands on, exactly as `DDIMScheduler.step` computes it."""
    n = num_inference_steps if num_inference_steps is not None else getattr(scheduler, "num_inference_steps", None)
    if n is None:
        raise ValueError(
            "the scheduler has no num_inference_steps: call scheduler.set_timesteps(n) first "
            "or pass num_inference_steps explicitly"
        )
    return torch.as_tensor(timestep, dtype=torch.long) - scheduler.config.num_train_timesteps // n


def _alpha_prod(scheduler, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample in float32; negative timesteps map to `final_alpha_cumprod` as in diffusers."""
    ac = scheduler.alphas_cumprod.to(torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    return torch.where(t >= 0, ac[t.clamp(min=0)], final)


def ddim_step(
    model_output: torch.Tensor,
    timestep: TimestepLike,
    sample: torch.Tensor,
    scheduler,
    eta: float = 1.0,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, list]] = None,
    *,
    variance_noise: Optional[torch.Tensor] = None,
    prev_timestep: Optional[TimestepLike] = None,
    num_inference_steps: Optional[int] = None,
    reduce: Reduce = "mean",
) -> GaussianStep:
    """One DDIM step with η-scaled noise, as a Gaussian policy N(mean, std²I) with an exact log-prob.

    Given `prev_sample` it is scored (training); otherwise one is drawn from `generator` or
    `variance_noise` (rollout) and cast to `sample.dtype` before scoring, so that re-scoring the
    stored sample reproduces the log-prob. `timestep` may differ per sample (tensor [B]).
    All math runs in float32; `log_prob` is averaged over non-batch dims unless `reduce="sum"`.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if variance_noise is not None and generator is not None:
        raise ValueError("pass either generator or variance_noise, not both")
    batch = sample.shape[0]
    device = sample.device
    t = _as_batch_timesteps(timestep, batch)
    t_prev = (
        _as_batch_timesteps(prev_timestep, batch)
        if prev_timestep is not None
        else ddim_prev_timestep(t, scheduler, num_inference_steps)
    )
    alpha_t = _alpha_prod(scheduler, t).to(device)
    alpha_prev = _alpha_prod(scheduler, t_prev).to(device)
    beta_t = 1 - alpha_t
    view = (batch,) + (1,) * (sample.ndim - 1)

    x = sample.float()
    out = model_output.float()
    a_t, b_t, a_prev = alpha_t.view(view), beta_t.view(view), alpha_prev.view(view)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        x0 = (x - b_t.sqrt() * out) / a_t.sqrt()
        eps = out
    elif prediction_type == "sample":
        x0 = out
        eps = (x - a_t.sqrt() * x0) / b_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - b_t.sqrt() * out
        eps = a_t.sqrt() * out + b_t.sqrt() * x
    else:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon, sample or v_prediction")

    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)

    # σ_t(η) = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_prev), as DDIMScheduler._get_variance.
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    s = std.view(view)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - s**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=device, dtype=torch.float32)
            prev_sample = (mean + s * variance_noise.float()).to(sample.dtype)
        else:
            prev_sample = mean.to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")

    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduce=reduce)
    return GaussianStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob, pred_original_sample=x0)
