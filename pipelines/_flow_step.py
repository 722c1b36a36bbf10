"""Flow-matching sampler steps (ODE, Flow-GRPO SDE, memoryless SDE, CPS) as pure Gaussian policies.

Convention (diffusers `FlowMatchEulerDiscreteScheduler`): σ = 1 is noise, σ = 0 is data,
x_σ = (1−σ)·x0 + σ·ε, and the network predicts the velocity v = ε − x0. Sampling runs σ from 1
down to 0, so every step has dt = σ_next − σ < 0. No function here reads or writes scheduler state:
σ and σ_next are arguments (python floats, 0-d or per-sample [B] tensors), so one function both
samples (rollout) and scores a given `prev_sample` (training).

Written by hand after Flow-GRPO's `sde_step_with_logprob` (yifan123/flow_grpo,
`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, "sde" and "cps" branches) and the CPS paper
(arXiv 2509.05952), because diffusers' Euler step has no noise injection and no log-prob.
"""
from __future__ import annotations

import math
from typing import List, Literal, Optional, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from ._gaussian import GaussianStep, Reduce, _reduce, gaussian_log_prob

SigmaLike = Union[float, torch.Tensor]
NoiseLevelLike = Union[float, torch.Tensor]
GeneratorLike = Optional[Union[torch.Generator, List[torch.Generator]]]
Sampler = Literal["sde", "cps", "ode"]
LogProbForm = Literal["gaussian", "squared_error"]

SAMPLERS = ("sde", "cps", "ode")

#: `noise_level` a = √2 makes the Flow-GRPO SDE memoryless: σ_t² = 2σ/(1−σ), which is Adjoint
#: Matching's σ(t)² = 2(1−t)/t at t = 1−σ, with drift 2v + x/(1−σ) (AM's b = 2v_AM − x/t).
MEMORYLESS_NOISE_LEVEL: float = math.sqrt(2.0)


def _as_batch(value: Union[float, torch.Tensor], batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A float, 0-d or [B] tensor as a float32 [B] tensor on `device`."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.shape != (batch,):
        raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    if bool(((sigma <= 0) | (sigma > 1)).any()):
        raise ValueError(f"sigma must lie in (0, 1] (1 = noise, 0 = data), got {sigma.tolist()}")
    if bool(((sigma_next < 0) | (sigma_next >= sigma)).any()):
        raise ValueError(
            f"sigma_next must satisfy 0 <= sigma_next < sigma (sampling runs from noise to data), "
            f"got sigma={sigma.tolist()}, sigma_next={sigma_next.tolist()}"
        )


def flow_sde_noise_scale(sigma: SigmaLike, noise_level: NoiseLevelLike, sigma_next: Optional[SigmaLike] = None) -> torch.Tensor:
    """The Flow-GRPO diffusion coefficient σ_t = a·sqrt(σ/(1−σ)) in float32 (a = `noise_level`).

    At σ = 1 it is infinite, so, as the reference does, the denominator 1−σ uses the next schedule
    sigma instead (Flow-GRPO uses `sigmas[1]`, which is σ_next on the first step): pass `sigma_next`
    whenever σ can be 1. The step std is σ_t·sqrt(σ − σ_next).
    """
    s = torch.as_tensor(sigma, dtype=torch.float32)
    a = torch.as_tensor(noise_level, dtype=torch.float32, device=s.device)
    at_one = s >= 1
    if bool(at_one.any()):
        if sigma_next is None:
            raise ValueError("sigma == 1 needs sigma_next: the coefficient sqrt(sigma/(1-sigma)) is infinite there")
        denom_sigma = torch.where(at_one, torch.as_tensor(sigma_next, dtype=torch.float32, device=s.device), s)
    else:
        denom_sigma = s
    return a * torch.sqrt(s / (1 - denom_sigma))


def flow_sde_step(
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    sample: torch.Tensor,
    noise_level: NoiseLevelLike = 0.7,
    prev_sample: Optional[torch.Tensor] = None,
    generator: GeneratorLike = None,
    *,
    sampler: Sampler = "sde",
    variance_noise: Optional[torch.Tensor] = None,
    reduce: Reduce = "mean",
    log_prob_form: LogProbForm = "gaussian",
) -> GaussianStep:
    """One flow-matching step σ → σ_next as a Gaussian policy N(mean, std²I) with its log-prob.

    `sampler`:
      - "sde" (Flow-GRPO, default): Euler–Maruyama on the marginal-preserving reverse SDE
        dx = [v + σ_t²/(2σ)·(x + (1−σ)v)]dσ + σ_t dw with σ_t = a·sqrt(σ/(1−σ)) (see
        `flow_sde_noise_scale` for the σ = 1 guard). a = `MEMORYLESS_NOISE_LEVEL` (√2) is the
        memoryless schedule of Adjoint Matching; the published default 0.7 is not memoryless.
      - "cps" (coefficients-preserving sampling): x_next = (1−σ')·x̂0 + σ'·(cos(aπ/2)·x̂1 + sin(aπ/2)·z)
        with x̂0 = x − σv, x̂1 = x + (1−σ)v, so std = σ'·sin(aπ/2); a ∈ [0, 1]. The last step (σ' = 0)
        is deterministic.
      - "ode": the deterministic Euler step (same as `flow_ode_step`).
    a = 0 reduces "sde" and "cps" to the Euler ODE step. `noise_level` may be a float or [B].

    Given `prev_sample` it is scored; otherwise one is drawn from `generator` (or `variance_noise`)
    and cast to `sample.dtype` before scoring, so re-scoring the stored sample reproduces the
    log-prob. Math runs in float32 (bf16 overflows here, per the reference). `log_prob` [B] is the
    exact Gaussian log-density averaged over non-batch dims (`reduce="sum"` sums);
    `log_prob_form="squared_error"` gives Flow-GRPO's CPS form −(x_next − mean)² with constants and
    the 1/(2 std²) factor dropped. Steps with std 0 have log_prob 0.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if log_prob_form not in ("gaussian", "squared_error"):
        raise ValueError(f"log_prob_form must be 'gaussian' or 'squared_error', got {log_prob_form!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if variance_noise is not None and generator is not None:
        raise ValueError("pass either generator or variance_noise, not both")
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
    batch, device = sample.shape[0], sample.device
    s = _as_batch(sigma, batch, device, "sigma")
    sn = _as_batch(sigma_next, batch, device, "sigma_next")
    _check_sigmas(s, sn)
    a = _as_batch(noise_level, batch, device, "noise_level")
    if bool((a < 0).any()):
        raise ValueError(f"noise_level must be >= 0, got {a.tolist()}")
    if sampler == "ode":
        a = torch.zeros_like(a)
    if sampler == "cps" and bool((a > 1).any()):
        raise ValueError(f"noise_level for sampler='cps' must lie in [0, 1] (the noise angle is a·π/2), got {a.tolist()}")

    view = (batch,) + (1,) * (sample.ndim - 1)
    x, v = sample.float(), velocity.float()
    sv, snv = s.view(view), sn.view(view)
    x0 = x - sv * v
    if sampler == "cps":
        std = sn * torch.sin(a * (math.pi / 2))
        x1 = x + (1 - sv) * v
        # sqrt(σ'² − std²) in the reference, written as σ'·cos(aπ/2) to avoid a negative round-off.
        mean = (1 - snv) * x0 + (sn * torch.cos(a * (math.pi / 2))).view(view) * x1
    else:
        dt = snv - sv
        sig_t = flow_sde_noise_scale(s, a, sn).view(view)
        mean = x * (1 + sig_t**2 / (2 * sv) * dt) + v * (1 + sig_t**2 * (1 - sv) / (2 * sv)) * dt
        std = (sig_t * torch.sqrt(-dt)).reshape(batch)
    return _finish(mean, std, sample, prev_sample, generator, variance_noise, reduce, log_prob_form, x0, velocity)


def flow_ode_step(
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    sample: torch.Tensor,
    prev_sample: Optional[torch.Tensor] = None,
    *,
    reduce: Reduce = "mean",
) -> GaussianStep:
    """The deterministic Euler step x_next = x + (σ_next − σ)·v: std 0 and log_prob 0 (no policy gradient)."""
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
    batch, device = sample.shape[0], sample.device
    s = _as_batch(sigma, batch, device, "sigma")
    sn = _as_batch(sigma_next, batch, device, "sigma_next")
    _check_sigmas(s, sn)
    view = (batch,) + (1,) * (sample.ndim - 1)
    x, v = sample.float(), velocity.float()
    mean = x + (sn - s).view(view) * v
    std = torch.zeros(batch, dtype=torch.float32, device=device)
    return _finish(mean, std, sample, prev_sample, None, None, reduce, "gaussian", x - s.view(view) * v, velocity)


def _finish(mean, std, sample, prev_sample, generator, variance_noise, reduce, log_prob_form, x0, velocity) -> GaussianStep:
    """Draw (or check) prev_sample, then score it; shared by every flow sampler."""
    batch = sample.shape[0]
    if prev_sample is None:
        if bool((std > 0).any()):
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            elif variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise shape {tuple(variance_noise.shape)} != sample shape {tuple(sample.shape)}")
            noise = variance_noise.to(sample.device, torch.float32)
            prev_sample = (mean + std.view((batch,) + (1,) * (sample.ndim - 1)) * noise).to(sample.dtype)
        else:
            prev_sample = mean.to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")
    if log_prob_form == "gaussian":
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduce=reduce)
    else:
        log_prob = _reduce(-((prev_sample.detach().float() - mean) ** 2), reduce, std > 0)
    return GaussianStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob,
                        pred_original_sample=x0, model_output=velocity)
