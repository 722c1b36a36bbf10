"""Mirror maps, heavy-tailed priors and dual-space flow matching (Mirror Flow Matching, arXiv 2510.08929).

A mirror map ∇Ψ sends a convex domain K (the pixel box [0,1]^d, the probability simplex) onto R^d;
flow matching then runs in that unconstrained dual space and samples come back through the inverse
map ∇Ψ* = (∇Ψ)⁻¹, so they land inside K by construction. Guan, Balasubramanian & Ma (Prop. 2.2) use
the *regularised* log-barrier

    Ψ(x) = −1/(1−κ) · Σ_i (−ϕ_i(x))^(1−κ) + ½‖x‖²,   K = {ϕ_i(x) < 0},   0 < κ < 1,

whose gradient blows up only like dist(x, ∂K)^(−κ); if P(dist(X, ∂K) < δ) ≤ C δ^β then
P(‖∇Ψ(X)‖ ≥ R) ≤ C' R^(−β/κ), so E‖∇Ψ(X)‖^p < ∞ for every p < β/κ (the classical log-barrier
−Σ log(−ϕ_i) has tail R^(−β): no finite mean when β = 1). ∇²Ψ ⪰ I, so W2 in the primal is bounded
by W2 in the dual. Their recipe pairs it with a multivariate Student-t prior (κ = 0.3, ν = 10 in
the synthetic experiments). Conventions follow `pipelines._flow_step`: σ = 1 is noise, σ = 0 is
data, y_σ = (1−σ)·y0 + σ·z and the network regresses v = z − y0. Nothing here imports `genft`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ._flow_step import SAMPLERS, flow_sde_step
from ._gaussian import GaussianStep, Reduce
from ._trajectory import Trajectory

VelocityModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GeneratorLike = Optional[torch.Generator]

_BISECT_ITERS = 64  # log-space brackets span at most ~700/κ, so 64 halvings leave < 4e-17/κ (float64 resolution)
_SIMPLEX_OUTER_ITERS = 56
_DUAL_CAP = 1e300  # dual inputs are clipped here (±inf included) so every float64 formula stays finite


def _open_unit_bounds(dtype: torch.dtype) -> Tuple[float, float]:
    """(smallest normal, largest value below 1) of a float dtype: the open interval (0, 1) it can represent."""
    info = torch.finfo(dtype)
    return info.tiny, 1.0 - info.eps / 2


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.is_floating_point(t):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")


def _to_dtype_finite(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float64 dual values to `dtype`, saturating at its largest finite value instead of overflowing."""
    big = torch.finfo(dtype).max
    return y.clamp(-big, big).to(dtype)


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if t.ndim > 1 else t


class MirrorMap:
    """∇Ψ: K → R^d, its inverse ∇Ψ* and log|det ∇²Ψ|. Math runs in float64; results come back in the input dtype."""

    name = "mirror"

    def dual_shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of the dual tensor for a primal tensor of `shape`."""
        return tuple(shape)

    def to_dual(self, x: torch.Tensor) -> torch.Tensor:
        """y = ∇Ψ(x) in x's dtype; points on the boundary are first moved `eps` inside (their dual is infinite)."""
        raise NotImplementedError

    def to_primal(self, y: torch.Tensor) -> torch.Tensor:
        """x = ∇Ψ*(y), strictly inside K for every finite or infinite y (NaN raises)."""
        raise NotImplementedError

    def log_abs_det_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """log|det ∂∇Ψ/∂x| per sample [B] (float64 math, returned as float32), so log p_X(x) = log p_Y(∇Ψ(x)) + this."""
        raise NotImplementedError

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        """Bool [B]: whether each sample lies strictly inside K."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- box


class _BoxMap(MirrorMap):
    """Coordinate-wise maps of the open box (0,1)^d; `eps` is the boundary margin used when clamping."""

    def __init__(self, eps: float = 1e-6):
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
        self.eps = float(eps)

    def _clamped(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        _check_finite(x, name)
        if x.numel() and (float(x.detach().min()) < -1e-4 or float(x.detach().max()) > 1 + 1e-4):
            lo, hi = float(x.detach().min()), float(x.detach().max())
            raise ValueError(f"{name} must lie in the box [0, 1] (pixels), got values in [{lo:.4g}, {hi:.4g}]")
        return x.double().clamp(self.eps, 1.0 - self.eps)

    def _dual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _primal(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_derivative(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dual(self, x: torch.Tensor) -> torch.Tensor:
        return _to_dtype_finite(self._dual(self._clamped(x)), x.dtype)

    def to_primal(self, y: torch.Tensor) -> torch.Tensor:
        _check_finite(y, "y")
        x = self._primal(y.double().clamp(-_DUAL_CAP, _DUAL_CAP)).clamp(self.eps, 1.0 - self.eps).to(y.dtype)
        lo, hi = _open_unit_bounds(y.dtype)
        return x.clamp(lo, hi)

    def log_abs_det_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        return _per_sample_sum(self._log_derivative(self._clamped(x))).float()

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x > 0) & (x < 1)
        return inside.reshape(x.shape[0], -1).all(1) if x.ndim > 1 else inside


class BoxEntropicMirror(_BoxMap):
    """Entropic map of the box: Ψ = Σ x log x + (1−x) log(1−x), ∇Ψ = logit(x), ∇Ψ* = sigmoid.

    Dual tails are exponential (all moments finite) but Ψ is not regularised: its Hessian 1/(x(1−x)) is
    unbounded, which is the classical choice (e.g. logit-space image flows), not the paper's map.
    """

    name = "box_entropic"

    def _dual(self, x):
        return torch.log(x) - torch.log1p(-x)

    def _primal(self, y):
        return torch.sigmoid(y)

    def _log_derivative(self, x):
        return -torch.log(x) - torch.log1p(-x)


class BoxLogBarrierMirror(_BoxMap):
    """Classical log-barrier Ψ = −Σ log x + log(1−x): ∇Ψ = 1/(1−x) − 1/x (paper §2.1's counter-example).

    With a positive density at the boundary the dual tail is P(|y| ≥ R) ~ 1/R, so E|y| = ∞.
    Inverse in closed form: the root in (0,1) of y·x² + (2−y)·x − 1 = 0, x = 2/(2 − y + sqrt(y²+4)).
    """

    name = "box_log_barrier"

    def _dual(self, x):
        return 1.0 / (1.0 - x) - 1.0 / x

    def _primal(self, y):
        neg = -y.abs()  # solve on the y <= 0 side (no cancellation) and reflect: x(−y) = 1 − x(y)
        x = 2.0 / (2.0 - neg + torch.sqrt(neg * neg + 4.0))
        return torch.where(y > 0, 1.0 - x, x)

    def _log_derivative(self, x):
        return torch.log(1.0 / (1.0 - x) ** 2 + 1.0 / x**2)


class BoxRegularizedMirror(_BoxMap):
    """The paper's regularised log-barrier on the box (Prop. 2.2 with ϕ = −x_j and x_j − 1):

        Ψ(x) = Σ_j [ −(x_j^(1−κ) + (1−x_j)^(1−κ))/(1−κ) + x_j²/2 ],   ∇Ψ(x)_j = x_j − x_j^(−κ) + (1−x_j)^(−κ).

    ∇²Ψ = 1 + κ x^(−κ−1) + κ (1−x)^(−κ−1) ≥ 1 (strongly convex). With density bounded at the boundary
    (β = 1), E|y|^p < ∞ iff p < 1/κ. The inverse has no closed form: it is solved by bisection in
    log x on the half nearer the boundary (the map satisfies ∇Ψ(1−x) = 1 − ∇Ψ(x)), in float64.
    """

    name = "box_regularized"

    def __init__(self, kappa: float = 0.3, eps: float = 1e-6):
        super().__init__(eps)
        if not 0.0 < kappa < 1.0:
            raise ValueError(f"kappa must lie in (0, 1) (Prop. 2.2's exponent), got {kappa}")
        self.kappa = float(kappa)

    def _dual(self, x):
        k = self.kappa
        return x - x.pow(-k) + (1.0 - x).pow(-k)

    def _primal(self, y):
        k = self.kappa
        flip = y > 0.5
        target = torch.where(flip, 1.0 - y, y)  # <= 1/2, so the root is in (0, 1/2]
        # f(x) = x − x^−κ + (1−x)^−κ is increasing; f(½) = ½ ≥ target and, for
        # L = (½ + 2^κ + |target|)^(−1/κ), f(L) ≤ ½ − L^−κ + 2^κ ≤ target.
        lo = -torch.log(0.5 + 2.0**k + target.abs()) / k
        hi = torch.full_like(target, math.log(0.5))
        for _ in range(_BISECT_ITERS):
            mid = 0.5 * (lo + hi)
            f = torch.exp(mid) - torch.exp(-k * mid) + torch.exp(-k * torch.log1p(-torch.exp(mid)))
            below = f < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        x = torch.exp(0.5 * (lo + hi))
        return torch.where(flip, 1.0 - x, x)

    def _log_derivative(self, x):
        k = self.kappa
        return torch.log(1.0 + k * x.pow(-k - 1) + k * (1.0 - x).pow(-k - 1))


# ----------------------------------------------------------------------------------------- simplex


class _SimplexMap(MirrorMap):
    """Maps of the open probability simplex {p ∈ R^K: p_i > 0, Σp = 1} (last dim K ≥ 2) onto R^(K−1).

    The free coordinates are p_1..p_{K−1} (p_K = 1 − Σ); `log_abs_det_jacobian` is with respect to them.
    """

    def __init__(self, eps: float = 1e-6):
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
        self.eps = float(eps)

    def dual_shape(self, shape):
        shape = tuple(shape)
        if len(shape) < 1 or shape[-1] < 2:
            raise ValueError(f"simplex tensors need a last dimension K >= 2, got shape {shape}")
        return shape[:-1] + (shape[-1] - 1,)

    def _clamped(self, p: torch.Tensor, name: str = "p") -> torch.Tensor:
        _check_finite(p, name)
        if p.ndim < 1 or p.shape[-1] < 2:
            raise ValueError(f"{name} needs a last dimension K >= 2 (probabilities), got shape {tuple(p.shape)}")
        k = p.shape[-1]
        if self.eps * k >= 1:
            raise ValueError(f"eps={self.eps} is too large for K={k} categories (need eps*K < 1)")
        if p.numel():
            low, err = float(p.detach().min()), float((p.detach().double().sum(-1) - 1).abs().max())
            if low < -1e-4 or err > 1e-3:
                raise ValueError(f"{name} must hold probability vectors (>= 0, summing to 1 over the last dim); "
                                 f"got min {low:.4g}, max |sum - 1| {err:.4g}")
        q = p.double().clamp_min(self.eps)
        return q / q.sum(-1, keepdim=True)

    def _finish_primal(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = p.clamp_min(self.eps)
        q = (q / q.sum(-1, keepdim=True)).to(dtype)
        return q.clamp_min(torch.finfo(dtype).tiny)

    def contains(self, p: torch.Tensor) -> torch.Tensor:
        tol = 8 * p.shape[-1] * torch.finfo(p.dtype).eps
        ok = (p > 0).all(-1) & ((p.double().sum(-1) - 1).abs() <= tol)
        return ok.reshape(p.shape[0], -1).all(1) if ok.ndim > 1 else ok


class SimplexEntropicMirror(_SimplexMap):
    """Negative entropy Ψ = Σ_i p_i log p_i: ∇Ψ = additive log-ratio y_i = log(p_i/p_K), ∇Ψ* = softmax([y, 0]).

    log|det ∂y/∂p_{1:K−1}| = −Σ_{i=1..K} log p_i.
    """

    name = "simplex_entropic"

    def to_dual(self, p):
        q = self._clamped(p)
        return _to_dtype_finite(torch.log(q[..., :-1]) - torch.log(q[..., -1:]), p.dtype)

    def to_primal(self, y):
        _check_finite(y, "y")
        y64 = y.double().clamp(-_DUAL_CAP, _DUAL_CAP)
        full = torch.cat([y64, torch.zeros_like(y64[..., :1])], dim=-1)
        return self._finish_primal(torch.softmax(full, dim=-1), y.dtype)

    def log_abs_det_jacobian(self, p):
        return _per_sample_sum(-torch.log(self._clamped(p)).sum(-1)).float()


class SimplexRegularizedMirror(_SimplexMap):
    """The paper's regularised log-barrier on the simplex (Prop. 2.2 with ϕ_i = −p_i, ϕ_K = Σ_{i<K} p_i − 1):

        Ψ(p) = −(Σ_{i≤K} p_i^(1−κ))/(1−κ) + ½ Σ_{i<K} p_i²,   y_i = p_i − p_i^(−κ) + p_K^(−κ)  (i < K).

    ∂y/∂p_{1:K−1} = D + c·11ᵀ with D = diag(1 + κ p_i^(−κ−1)), c = κ p_K^(−κ−1), so log det =
    Σ log D_i + log(1 + c Σ 1/D_i). Inverse: for s = p_K every p_i = g(y_i − s^(−κ)) with g the inverse
    of u ↦ u − u^(−κ); s + Σ g(y_i − s^(−κ)) − 1 is increasing in s, so s is found by bisection in
    log s (and each g by bisection in log p), all in float64.
    """

    name = "simplex_regularized"

    def __init__(self, kappa: float = 0.3, eps: float = 1e-6):
        super().__init__(eps)
        if not 0.0 < kappa < 1.0:
            raise ValueError(f"kappa must lie in (0, 1) (Prop. 2.2's exponent), got {kappa}")
        self.kappa = float(kappa)

    def to_dual(self, p):
        q, k = self._clamped(p), self.kappa
        y = q[..., :-1] - q[..., :-1].pow(-k) + q[..., -1:].pow(-k)
        return _to_dtype_finite(y, p.dtype)

    def _g(self, u: torch.Tensor, iters: int = _BISECT_ITERS) -> torch.Tensor:
        """The p > 0 with p − p^(−κ) = u: bracket log p ∈ [−log(1+|u|)/κ, log(1 + max(u, 0))]."""
        k = self.kappa
        lo = -torch.log1p(u.abs()) / k
        hi = torch.log1p(u.clamp_min(0.0))
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = torch.exp(mid) - torch.exp(-k * mid) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return torch.exp(0.5 * (lo + hi))

    def to_primal(self, y):
        _check_finite(y, "y")
        k = self.kappa
        # Beyond |y| = 1e12 float64 cannot resolve y_i − s^−κ; such points are within 1e12^(−1/κ) < 1e-12 of
        # the boundary, i.e. well inside the `eps` margin that the result is clamped to anyway.
        y64 = y.double().clamp(-1e12, 1e12)
        n = y64.shape[-1] + 1
        # F(s) = s + Σ g(y_i − s^−κ) − 1 is increasing; F(1) > 0 and F(s_lo) < 0 for
        # s_lo = (max(max_i y_i, 0) + (2K)^κ)^(−1/κ) (then every g ≤ 1/(2K) and s_lo ≤ 1/(2K)).
        top = y64.max(-1, keepdim=True).values.clamp_min(0.0)
        lo = -torch.log(top + (2.0 * n) ** k) / k
        hi = torch.zeros_like(lo)
        for _ in range(_SIMPLEX_OUTER_ITERS):
            mid = 0.5 * (lo + hi)
            s = torch.exp(mid)
            total = s + self._g(y64 - torch.exp(-k * mid), iters=48).sum(-1, keepdim=True)
            below = total < 1.0
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        log_s = 0.5 * (lo + hi)
        free = self._g(y64 - torch.exp(-k * log_s))
        p = torch.cat([free, torch.exp(log_s)], dim=-1)
        return self._finish_primal(p, y.dtype)

    def log_abs_det_jacobian(self, p):
        q, k = self._clamped(p), self.kappa
        d = 1.0 + k * q[..., :-1].pow(-k - 1)
        c = k * q[..., -1].pow(-k - 1)
        logdet = torch.log(d).sum(-1) + torch.log1p(c * (1.0 / d).sum(-1))
        return _per_sample_sum(logdet).float()


class IdentityMap(MirrorMap):
    """Plain Euclidean flow matching (no constraint): an affine `scale·x + shift` and its inverse.

    With scale=2, shift=−1 and `clip=True` it is the usual "[0,1] data scaled to [−1,1], samples clipped"
    baseline; it is not a mirror map, and clipped samples sit *on* the box boundary.
    """

    name = "identity"

    def __init__(self, scale: float = 1.0, shift: float = 0.0, clip: bool = False):
        if scale == 0:
            raise ValueError("scale must be non-zero")
        self.scale, self.shift, self.clip = float(scale), float(shift), bool(clip)

    def to_dual(self, x):
        _check_finite(x, "x")
        return x * self.scale + self.shift

    def to_primal(self, y):
        _check_finite(y, "y")
        x = (y - self.shift) / self.scale
        return x.clamp(0.0, 1.0) if self.clip else x

    def log_abs_det_jacobian(self, x):
        n = x[0].numel() if x.ndim > 1 else 1
        return torch.full((x.shape[0],), n * math.log(abs(self.scale)), dtype=torch.float32, device=x.device)

    def contains(self, x):
        ok = torch.isfinite(x)
        return ok.reshape(x.shape[0], -1).all(1) if x.ndim > 1 else ok


MIRRORS = {
    "box_entropic": BoxEntropicMirror,
    "box_log_barrier": BoxLogBarrierMirror,
    "box_regularized": BoxRegularizedMirror,
    "simplex_entropic": SimplexEntropicMirror,
    "simplex_regularized": SimplexRegularizedMirror,
    "identity": IdentityMap,
}


def mirror_map(name: str, **kwargs) -> MirrorMap:
    """The mirror map registered as `name` (see `MIRRORS`); an unknown name lists the valid ones."""
    if name not in MIRRORS:
        raise ValueError(f"mirror={name!r} is unknown; choose one of {', '.join(sorted(MIRRORS))}")
    return MIRRORS[name](**kwargs)


# ------------------------------------------------------------------------------------------ priors


def _sample_gamma(alpha: float, n: int, generator: GeneratorLike, device) -> torch.Tensor:
    """n Gamma(alpha, 1) draws in float64 from `generator` (Marsaglia–Tsang; torch's sampler takes no generator)."""
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    pending = torch.arange(n, device=device)
    while pending.numel():
        m = pending.numel()
        x = torch.randn(m, generator=generator, dtype=torch.float64, device=device)
        u = torch.rand(m, generator=generator, dtype=torch.float64, device=device)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[pending[ok]] = (d * v)[ok]
        pending = pending[~ok]
    if boost:
        out = out * torch.rand(n, generator=generator, dtype=torch.float64, device=device).pow(1.0 / alpha)
    return out


class GaussianPrior:
    """Standard normal N(0, I) over all non-batch dims; `log_prob` sums over them (a density on R^d)."""

    name = "gaussian"

    def sample(self, shape: Sequence[int], generator: GeneratorLike = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draws of `shape` ([B, ...]) from `generator`."""
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32).to(dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Float32 log N(z; 0, I) per sample [B]."""
        z64 = z.double().reshape(z.shape[0], -1)
        return (-0.5 * z64.pow(2).sum(1) - 0.5 * z64.shape[1] * math.log(2 * math.pi)).float()


class StudentTPrior:
    """Student-t prior with ν degrees of freedom (the paper's t-Flow prior; ν = 10 in its experiments).

    multivariate=True (default, the paper's t_{d,ν}): z = ε·sqrt(ν/V) with ε ~ N(0, I_d) and one
    V ~ χ²_ν per sample, density ∝ (1 + ‖z‖²/ν)^(−(ν+d)/2). multivariate=False: independent
    univariate t_ν per coordinate. `log_prob` sums over non-batch dims (a density on R^d).
    """

    name = "student_t"

    def __init__(self, nu: float = 10.0, multivariate: bool = True):
        if not (nu > 0 and math.isfinite(nu)):
            raise ValueError(f"nu (degrees of freedom) must be a finite number > 0, got {nu}")
        self.nu, self.multivariate = float(nu), bool(multivariate)

    def sample(self, shape: Sequence[int], generator: GeneratorLike = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draws of `shape` ([B, ...]) from `generator` (normals first, then the χ² scales)."""
        shape = tuple(shape)
        if len(shape) < 1:
            raise ValueError("shape needs a batch dimension")
        eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
        n = shape[0] if self.multivariate else eps.numel()
        chi2 = 2.0 * _sample_gamma(self.nu / 2.0, n, generator, eps.device)
        scale = torch.sqrt(self.nu / chi2.clamp_min(1e-300))
        scale = scale.view((n,) + (1,) * (len(shape) - 1)) if self.multivariate else scale.view(shape)
        return _to_dtype_finite(eps * scale, dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Float32 log-density per sample [B] (float64 math)."""
        nu = self.nu
        z64 = z.double().reshape(z.shape[0], -1)
        if self.multivariate:
            d = z64.shape[1]
            const = math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - 0.5 * d * math.log(nu * math.pi)
            return (const - 0.5 * (nu + d) * torch.log1p(z64.pow(2).sum(1) / nu)).float()
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        return (const - 0.5 * (nu + 1) * torch.log1p(z64.pow(2) / nu)).sum(1).float()


Prior = Union[GaussianPrior, StudentTPrior]


# ------------------------------------------------------------------------------- dual-space flows


@dataclass
class FlowPair:
    """One batch of dual-space flow-matching regression data: the model sees (noisy, sigma) and regresses target."""

    noisy: torch.Tensor  # y_σ = (1−σ)·y0 + σ·z
    sigma: torch.Tensor  # [B] float32, σ ∈ (0, 1)
    target: torch.Tensor  # v* = z − y0
    clean: torch.Tensor  # y0 = ∇Ψ(x)
    noise: torch.Tensor  # z ~ prior


def _sigma_vector(sigma: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), float(sigma), dtype=torch.float32, device=like.device)


class MirrorFlow:
    """Flow matching in the dual space of `mirror`, with noise from `prior` (Gaussian by default).

    The velocity model is called as `model(y, sigma)` with y [B, *dual] and sigma [B] float32 and
    returns v ≈ z − y0 of y's shape. Training pairs, ODE/SDE sampling and the policy rollout all live
    in dual coordinates; only `sample` and `Trajectory.images` are mapped back with ∇Ψ*.

    The Flow-GRPO SDE ("sde"/"cps" samplers of `flow_sde_step`) keeps the ODE's marginals only for a
    Gaussian prior (it turns v into a score through the Gaussian noise law). With a Student-t prior it
    is still an exact Gaussian *policy* (valid log-probs for policy gradients) but its samples are not
    the ODE's distribution; use sampler="ode" to sample the learned model itself.
    """

    def __init__(self, mirror: MirrorMap, prior: Optional[Prior] = None):
        if not isinstance(mirror, MirrorMap):
            raise TypeError(f"mirror must be a MirrorMap (see pipelines.MIRRORS), got {type(mirror).__name__}")
        prior = GaussianPrior() if prior is None else prior
        if not (hasattr(prior, "sample") and hasattr(prior, "log_prob")):
            raise TypeError(f"prior must have sample(shape, generator) and log_prob(z), got {type(prior).__name__}")
        self.mirror, self.prior = mirror, prior

    # ---- training
    def dual_pair(self, y0: torch.Tensor, generator: GeneratorLike = None, sigma: Optional[torch.Tensor] = None) -> FlowPair:
        """Pairs from dual data y0 [B, ...]: z ~ prior, σ ~ U(0, 1) unless given ([B] or scalar)."""
        _check_finite(y0, "y0")
        y0 = y0.float()
        batch = y0.shape[0]
        z = self.prior.sample(y0.shape, generator, device=y0.device)
        if sigma is None:
            sigma = torch.rand(batch, generator=generator, device=y0.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=y0.device).expand(batch).contiguous()
        if bool(((sigma < 0) | (sigma > 1)).any()):
            raise ValueError(f"sigma must lie in [0, 1], got range [{float(sigma.min())}, {float(sigma.max())}]")
        s = sigma.view((batch,) + (1,) * (y0.ndim - 1))
        return FlowPair(noisy=(1 - s) * y0 + s * z, sigma=sigma, target=z - y0, clean=y0, noise=z)

    def pair(self, x: torch.Tensor, generator: GeneratorLike = None, sigma: Optional[torch.Tensor] = None) -> FlowPair:
        """Pairs from primal data x (mapped with ∇Ψ first); precompute `mirror.to_dual` and use `dual_pair` in loops."""
        return self.dual_pair(self.mirror.to_dual(x), generator, sigma)

    @staticmethod
    def loss(model: VelocityModel, pair: FlowPair) -> torch.Tensor:
        """Velocity regression mean‖v_θ(y_σ, σ) − (z − y0)‖² over batch and dims (Alg. 1, step 2)."""
        pred = model(pair.noisy, pair.sigma)
        if pred.shape != pair.target.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} != target shape {tuple(pair.target.shape)}")
        return (pred.float() - pair.target).pow(2).mean()

    # ---- sampling
    @staticmethod
    def sigmas(num_steps: int) -> torch.Tensor:
        """The uniform schedule 1 = σ_0 > … > σ_T = 0 (float32 [T+1]), as in the paper's constant-step Euler."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def sample_dual(self, model: VelocityModel, shape: Sequence[int], num_steps: int = 50, generator: GeneratorLike = None, *,
                    sampler: str = "ode", noise_level: float = 0.7, ode_solver: str = "euler", device=None) -> torch.Tensor:
        """Dual samples y ≈ y0 for a primal batch `shape`: prior draw, then the ODE (Euler or any torchdiffeq
        method named by `ode_solver`) or the Flow-GRPO SDE / CPS (`sampler`), σ from 1 to 0."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if ode_solver != "euler" and sampler != "ode":
            raise ValueError(f"ode_solver={ode_solver!r} needs sampler='ode', got sampler={sampler!r}")
        y = self.prior.sample(self.mirror.dual_shape(shape), generator, device=device)
        sig = self.sigmas(num_steps)
        with torch.no_grad():
            if ode_solver != "euler":
                from torchdiffeq import odeint

                ys = odeint(lambda t, v: model(v, t.expand(v.shape[0]).to(torch.float32)), y, sig.to(y.device), method=ode_solver)
                return ys[-1]
            for k in range(num_steps):
                v = model(y, _sigma_vector(sig[k], y))
                y = flow_sde_step(v, float(sig[k]), float(sig[k + 1]), y, noise_level, generator=generator, sampler=sampler).prev_sample
        return y

    def sample(self, model: VelocityModel, shape: Sequence[int], num_steps: int = 50, generator: GeneratorLike = None,
               **kwargs) -> torch.Tensor:
        """Primal samples of `shape`: `sample_dual` mapped back with ∇Ψ* (inside the domain by construction)."""
        return self.mirror.to_primal(self.sample_dual(model, shape, num_steps, generator, **kwargs))

    # ---- policy rollouts in dual coordinates
    def rollout(self, model: VelocityModel, shape: Sequence[int], num_steps: int = 10, generator: GeneratorLike = None, *,
                noise_level: float = 0.7, sampler: str = "sde", reduce: Reduce = "mean", device=None) -> Trajectory:
        """B stochastic chains in dual space with per-step Gaussian log-probs (`flow_sde_step`), for policy gradients.

        latents [B, T+1, *dual] run from the prior draw to y0; log_probs [B, T] are float32 log-densities
        of the dual steps (averaged over dims unless reduce="sum"); images are ∇Ψ*(y0) in the primal.
        timesteps holds σ_k of each step, eta the SDE noise level; extras: sigmas [T+1], sampler, reduce,
        prior_log_prob [B] (log-density of the initial draw under the prior, summed over dims).
        """
        if sampler not in ("sde", "cps"):
            raise ValueError(f"rollout needs a stochastic sampler ('sde' or 'cps'), got {sampler!r}")
        if noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 for a stochastic policy, got {noise_level}")
        y = self.prior.sample(self.mirror.dual_shape(shape), generator, device=device)
        sig = self.sigmas(num_steps)
        latents: List[torch.Tensor] = [y]
        log_probs: List[torch.Tensor] = []
        stds: List[torch.Tensor] = []
        with torch.no_grad():
            for k in range(num_steps):
                v = model(y, _sigma_vector(sig[k], y))
                step = flow_sde_step(v, float(sig[k]), float(sig[k + 1]), y, noise_level, generator=generator,
                                     sampler=sampler, reduce=reduce)
                y = step.prev_sample
                latents.append(y)
                log_probs.append(step.log_prob)
                stds.append(step.std[0])
        batch = y.shape[0]
        return Trajectory(
            latents=torch.stack(latents, dim=1), timesteps=sig[:-1].clone(), log_probs=torch.stack(log_probs, dim=1),
            stds=torch.stack(stds).float().cpu(), prompts=[""] * batch, prompt_embeds=torch.zeros(batch, 0, 0),
            negative_prompt_embeds=None, images=self.mirror.to_primal(y), guidance_scale=1.0, eta=float(noise_level),
            num_inference_steps=num_steps,
            extras={"sigmas": sig, "sampler": sampler, "reduce": reduce, "space": "dual", "mirror": self.mirror.name,
                    "prior_log_prob": self.prior.log_prob(latents[0])},
        )

    def step_log_prob(self, model: VelocityModel, trajectory: Trajectory, step: int) -> GaussianStep:
        """Re-score the stored dual transition latents[:, step] → latents[:, step+1] under `model` (differentiable)."""
        sig = trajectory.extras.get("sigmas")
        if sig is None or trajectory.extras.get("space") != "dual":
            raise ValueError("trajectory was not produced by MirrorFlow.rollout (extras lack 'sigmas'/'space')")
        if not 0 <= step < trajectory.num_steps:
            raise ValueError(f"step must lie in [0, {trajectory.num_steps}), got {step}")
        y = trajectory.latents[:, step]
        v = model(y, _sigma_vector(sig[step], y))
        return flow_sde_step(v, float(sig[step]), float(sig[step + 1]), y, trajectory.eta,
                             prev_sample=trajectory.latents[:, step + 1], sampler=trajectory.extras["sampler"],
                             reduce=trajectory.extras["reduce"])

    def log_probs(self, model: VelocityModel, trajectory: Trajectory) -> torch.Tensor:
        """[B, T] float32 log-probs of every stored dual step under `model` (equals trajectory.log_probs for the rollout model)."""
        return torch.stack([self.step_log_prob(model, trajectory, k).log_prob for k in range(trajectory.num_steps)], dim=1)
