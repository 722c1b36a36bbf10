"""Adjoint Matching's math (Domingo-Enrich, Drozdzal, Karrer, Chen, ICLR 2025, arXiv 2409.08861) as pure functions.

Conventions
-----------
* A sampler step k maps the stored latent x_k to x_{k+1} = μ_k(x_k) + s_k z (Gaussian, std s_k).
  For the *base* (frozen) model μ_k = x_k + h_k b_base(x_k, t_k) is one Euler–Maruyama step of the
  memoryless SDE dX = b_base dt + σ(t) dB, so s_k = σ(t_k)√h_k.
* Sign: the terminal cost is g(x) = −λ·r(x), and the adjoint is ã = ∂(cost to go)/∂x, so
  ã_K = −λ∇r(x_K). The optimal control is u* = −σ·ã: it moves samples *up* the reward gradient,
  and the fine-tuned law is p_base(x)·exp(λ r(x))/Z when the base process is memoryless.
* The lean adjoint drops every term of the control from the adjoint ODE:
  dã/dt = −(∇_x b_base)ᵀ ã. On the stored trajectory its exact discrete form is one VJP per step,
  ã_k = (∂μ_k/∂x_k)ᵀ ã_{k+1} (the adjoint of the Euler scheme).
* Loss: with u_θ = (μ_θ − μ_base)/(σ√h) the control of the fine-tuned model,
  ‖(μ_θ − μ_base)/s_k + s_k·ã_{k+1}‖² = h_k·‖u_θ + σ(t_k)·ã‖², the paper's regression target on a
  grid (for flow models u_θ = 2(v_θ − v_base)/σ(t)). Summed over latent dims as in the paper's code.
  We pair step k with ã_{k+1} (the adjoint at the step's output), which is the discrete-time
  optimum u_k* ≈ −s_k·E[ã_{k+1} | x_k]; microsoft/soc-fine-tuning-sd pairs it with ã_k, which
  differs by O(h) but gives the first step of a memoryless sampler (whose Jacobian ≈ 0) no control.

Why no torchdiffeq here: the paper's method regresses onto the adjoint *of the sampled discrete
trajectory*. Its discrete adjoint is exact for the process we sample, costs one VJP per stored
step, and needs no drift evaluations off the stored states. A continuous solver
(`torchdiffeq.odeint_adjoint`) would have to re-integrate x backwards or interpolate it between
grid points, spend more network calls, and save no memory, since the lean adjoint needs no
parameter gradients. The tests use the ODE's closed form instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

#: Flow-GRPO's `noise_level` a that makes the rectified-flow SDE memoryless (σ² = 2t/(1−t), diffusers time).
MEMORYLESS_FLOW_NOISE_LEVEL = math.sqrt(2.0)
#: DDIM η of the memoryless diffusion sampler (DDPM ancestral sampling; Thm 1 of the paper).
MEMORYLESS_DDIM_ETA = 1.0

TensorLike = Union[float, torch.Tensor]
StepMean = Callable[[torch.Tensor, int], torch.Tensor]


# ----- memoryless noise schedules --------------------------------------------------------------
def memoryless_sigma(alpha: TensorLike, beta: TensorLike, d_alpha: TensorLike, d_beta: TensorLike) -> torch.Tensor:
    """The memoryless diffusion coefficient σ(t) = √(2β(α̇β/α − β̇)) for X_t = β_t X_0 + α_t X_1.

    AM time: X_0 is noise (t = 0), X_1 data (t = 1). Any other σ makes X_0 and X_1 dependent and
    biases the fine-tuned law away from p_base·exp(λr).
    """
    a, b = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(beta, dtype=torch.float64)
    da, db = torch.as_tensor(d_alpha, dtype=torch.float64), torch.as_tensor(d_beta, dtype=torch.float64)
    return torch.sqrt(2 * b * (da * b / a - db))


def flow_memoryless_sigma(sigma: TensorLike) -> torch.Tensor:
    """σ of the memoryless rectified-flow SDE at diffusers' `sigma` (1 = noise, 0 = data): √(2σ/(1−σ)).

    Equal to AM's √(2(1−t)/t) with t = 1 − σ, and to Flow-GRPO's a·√(σ/(1−σ)) with a = √2.
    Infinite at σ = 1; samplers evaluate the first step's noise at the next grid point instead.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if ((s < 0) | (s > 1)).any():
        raise ValueError(f"sigma must lie in [0, 1] (1 = noise, 0 = data), got {s.tolist()}")
    return torch.sqrt(2 * s / (1 - s))


def ddim_memoryless_std(alpha_prod_t: TensorLike, alpha_prod_prev: TensorLike) -> torch.Tensor:
    """Per-step std of DDIM at η = 1 (DDPM ancestral), the memoryless diffusion sampler.

    s² = (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev) ≈ h·σ(t)² with σ(t)² = d ln ᾱ/dt, the memoryless
    coefficient of the VP interpolant (α = √ᾱ, β = √(1−ᾱ)).
    """
    at = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    ap = torch.as_tensor(alpha_prod_prev, dtype=torch.float64)
    return torch.sqrt(((1 - ap) / (1 - at) * (1 - at / ap)).clamp(min=0))


# ----- reward gradient and lean adjoint --------------------------------------------------------
def reward_gradient(x: torch.Tensor, reward_fn: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∇_x r(x), r(x)) per sample, in float32; `reward_fn` maps a batch [B, ...] to rewards [B].

    `reward_fn` typically decodes latents to images and scores them with a differentiable reward.
    """
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        r = reward_fn(x)
        if not isinstance(r, torch.Tensor) or r.shape != (x.shape[0],):
            shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"reward_fn must return one reward per sample (shape [{x.shape[0]}]), got {shape}")
        if not r.requires_grad:
            raise ValueError("the reward carries no gradient to the samples: build it with differentiable=True "
                             "(a reward class with supports_grad=True) and do not detach inside reward_fn")
        (g,) = torch.autograd.grad(r.sum(), x)
    return g.detach(), r.detach().float()


@dataclass
class LeanAdjoint:
    """The lean adjoint and base means at the selected steps of each trajectory.

    steps: LongTensor [B, n], the selected transitions k (x_k -> x_{k+1}).
    adjoint: [B, n, ...] float32 ã_{k+1}, the adjoint at the output of step k.
    base_mean: [B, n, ...] float32 μ_base(x_k), the frozen model's step mean.
    initial: [B, ...] float32 ã_0, the adjoint at the initial noise (diagnostics and tests).
    """

    steps: torch.Tensor
    adjoint: torch.Tensor
    base_mean: torch.Tensor
    initial: torch.Tensor


def lean_adjoint(latents: torch.Tensor, terminal_adjoint: torch.Tensor, step_mean: StepMean,
                 steps: torch.Tensor) -> LeanAdjoint:
    """Solve the discrete lean adjoint ã_k = (∂μ_k/∂x_k)ᵀ ã_{k+1} backward from `terminal_adjoint`.

    latents: [B, K+1, ...] stored trajectory x_0 (noise) ... x_K (sample), detached.
    terminal_adjoint: [B, ...] ã_K = −λ∇r(x_K).
    step_mean(x, k): the BASE model's mean of step k at x (differentiable in x); only VJPs with
    respect to x are taken, never to parameters.
    steps: LongTensor [B, n] of transitions to keep (see `LeanAdjoint`).

    Memory is flat in K: one step's graph lives at a time and only the current adjoint plus the n
    kept slots are held.
    """
    if latents.ndim < 3:
        raise ValueError(f"latents must be [B, K+1, ...] with K >= 1, got shape {tuple(latents.shape)}")
    batch, num_steps = latents.shape[0], latents.shape[1] - 1
    if terminal_adjoint.shape != (batch, *latents.shape[2:]):
        raise ValueError(f"terminal_adjoint has shape {tuple(terminal_adjoint.shape)}; expected {(batch, *latents.shape[2:])}")
    steps = torch.as_tensor(steps, dtype=torch.long)
    if steps.ndim != 2 or steps.shape[0] != batch or (steps < 0).any() or (steps >= num_steps).any():
        raise ValueError(f"steps must be a LongTensor [B={batch}, n] of indices in 0..{num_steps - 1}, got {steps.tolist()}")
    steps_dev = steps.to(latents.device)
    slot_shape = (batch, steps.shape[1], *latents.shape[2:])
    kept_adjoint = torch.zeros(slot_shape, dtype=torch.float32, device=latents.device)
    kept_mean = torch.zeros(slot_shape, dtype=torch.float32, device=latents.device)
    a = terminal_adjoint.detach().float()
    for k in range(num_steps - 1, -1, -1):
        with torch.enable_grad():
            x = latents[:, k].detach().float().requires_grad_(True)
            mean = step_mean(x, k)
            if mean.shape != x.shape:
                raise ValueError(f"step_mean returned shape {tuple(mean.shape)} at step {k}; expected {tuple(x.shape)}")
            rows, slots = (steps_dev == k).nonzero(as_tuple=True)
            if rows.numel():
                kept_adjoint[rows, slots] = a[rows]
                kept_mean[rows, slots] = mean.detach().float()[rows]
            (a,) = torch.autograd.grad(mean, x, grad_outputs=a.to(mean.dtype))
        a = a.detach().float()
        del x, mean
    return LeanAdjoint(steps=steps, adjoint=kept_adjoint, base_mean=kept_mean, initial=a)


# ----- the regression loss ---------------------------------------------------------------------
def _std_view(std: TensorLike, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(std, dtype=torch.float32, device=like.device)
    if s.ndim == 0:
        s = s.expand(like.shape[0])
    s = s.reshape(like.shape[0], -1)[:, 0] if s.numel() != like.shape[0] else s.reshape(like.shape[0])
    if not (s > 0).all():
        raise ValueError(f"std must be > 0 for every sample (a deterministic step carries no control), got {s.tolist()}; "
                         "sample with the memoryless SDE (flow: noise_level=√2, diffusion: eta=1)")
    return s.view((like.shape[0],) + (1,) * (like.ndim - 1))


def adjoint_matching_loss(mean: torch.Tensor, base_mean: torch.Tensor, std: TensorLike,
                          adjoint: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖(μ_θ − μ_base)/s + s·ã‖², summed over non-batch dims, in float32.

    For an Euler–Maruyama step s = σ(t)√h, so this is h·‖u_θ + σ(t)·ã‖² (paper eq. for the AM loss);
    `std` is a scalar or per-sample [B]; gradients flow through `mean` only.
    """
    m = mean.float()
    s = _std_view(std, m)
    resid = (m - base_mean.detach().float()) / s + s * adjoint.detach().float()
    return resid.pow(2).flatten(1).sum(dim=1)


def control_norm(mean: torch.Tensor, base_mean: torch.Tensor, std: TensorLike) -> torch.Tensor:
    """Per-sample ‖(μ_θ − μ_base)/s‖² = h‖u_θ‖²: the KL the step adds to the path measure, times 2."""
    m = mean.detach().float()
    return ((m - base_mean.float()) / _std_view(std, m)).pow(2).flatten(1).sum(dim=1)


# ----- loss-quantile filter --------------------------------------------------------------------
class LossQuantileFilter:
    """Drops loss entries whose √loss exceeds an EMA of the batch's `quantile`-th √loss (paper code's filter).

    The EMA averages uniformly over its first 1/(1−decay) updates, then decays by `decay`.
    `quantile >= 1` keeps everything. State is two floats (`state_dict` for checkpoints).
    """

    def __init__(self, quantile: float = 0.9, decay: float = 0.9):
        if not 0 < quantile:
            raise ValueError(f"quantile={quantile} must be > 0 (>= 1 disables the filter)")
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.quantile, self.decay = float(quantile), float(decay)
        self.value: Optional[float] = None
        self.updates = 0

    @property
    def enabled(self) -> bool:
        return self.quantile < 1

    def update(self, losses: torch.Tensor) -> float:
        """Fold this batch's quantile of √loss into the EMA and return the new threshold."""
        q = torch.quantile(losses.detach().float().flatten().clamp(min=0).sqrt(), self.quantile).item()
        n = self.updates
        if self.value is None or n == 0:
            self.value = q
        elif n < 1 / (1 - self.decay):
            self.value = q / (n + 1) + (1 - 1 / (n + 1)) * self.value
        else:
            self.value = self.decay * self.value + (1 - self.decay) * q
        self.updates += 1
        return self.value

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        """Bool mask of entries kept (all True when disabled); updates the EMA first."""
        if not self.enabled:
            return torch.ones_like(losses, dtype=torch.bool)
        threshold = self.update(losses)
        return losses.detach().clamp(min=0).sqrt() < threshold

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value, self.updates = state["value"], int(state["updates"])


# ----- which steps to train on -----------------------------------------------------------------
def sample_train_steps(num_steps: int, per_trajectory: int, batch: int, generator: Optional[torch.Generator] = None,
                       early_fraction: float = 0.6) -> torch.Tensor:
    """LongTensor [batch, per_trajectory]: distinct step indices per trajectory, sorted.

    Stratified as in the paper's code: half from the first `early_fraction` of the steps (the noisy
    end), the rest from the remainder, so both coarse and fine steps are trained every round.
    """
    if not 1 <= per_trajectory <= num_steps:
        raise ValueError(f"per_trajectory={per_trajectory} must be in 1..num_steps={num_steps}; lower timesteps_per_trajectory "
                         "or raise num_inference_steps")
    if not 0 < early_fraction < 1:
        raise ValueError(f"early_fraction={early_fraction} must be in (0, 1)")
    split = min(max(round(num_steps * early_fraction), 1), num_steps - 1) if num_steps > 1 else 1
    late_size = num_steps - split
    n_early = min(max(per_trajectory // 2, per_trajectory - late_size), split)
    n_late = per_trajectory - n_early
    early = torch.rand(batch, split, generator=generator).argsort(dim=1)[:, :n_early]
    late = torch.rand(batch, max(late_size, 1), generator=generator).argsort(dim=1)[:, :n_late] + split
    return torch.cat([early, late], dim=1).sort(dim=1).values
