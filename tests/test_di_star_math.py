"""Diff-Instruct* math: the surrogate's gradient is the score divergence's (Gaussians, exact quadrature), pseudo-Huber limits."""
import numpy as np
import pytest
import torch

from genft.di_star_math import (denoising_score_matching_loss, eps_to_score, guided, pseudo_huber, pseudo_huber_grad,
                                sample_timesteps, score_divergence, score_divergence_surrogate, vp_noise)

ALPHA, SIGMA = 0.8, 0.6
M_REF = torch.tensor([0.4, -0.3], dtype=torch.float64)  # reference data law N(M_REF, R_REF)
R_REF = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
MU0 = torch.tensor([-0.2, 0.5], dtype=torch.float64)  # generator x0 = μ + S z at θ0
S0 = torch.tensor([[0.7, 0.0], [0.4, 1.3]], dtype=torch.float64)


def _quadrature(dims: int, n: int = 14):
    """Gauss–Hermite nodes [N, dims] and weights [N] for expectations under N(0, I_dims)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    grids = np.meshgrid(*([x] * dims), indexing="ij")
    weights = np.prod(np.meshgrid(*([w] * dims), indexing="ij"), axis=0)
    nodes = np.stack([g.ravel() for g in grids], axis=1)
    return torch.from_numpy(nodes), torch.from_numpy(weights.ravel())


def _gauss_score(x, mean, cov):
    return -torch.linalg.solve(cov, (x - mean).T).T


def _marginal(mu, s):
    """Mean and covariance of x_t = α(μ + S z) + σ ε."""
    return ALPHA * mu, ALPHA**2 * s @ s.T + SIGMA**2 * torch.eye(2, dtype=torch.float64)


def _ref_score(x):
    return _gauss_score(x, ALPHA * M_REF, ALPHA**2 * R_REF + SIGMA**2 * torch.eye(2, dtype=torch.float64))


def _true_divergence_grad(c: float):
    """∇_θ E_{x~π}[d(s_θ(x) − s_q(x))] at θ0, with π = p_{θ0,t} fixed (SIM's definition); exact by quadrature."""
    mu, s = MU0.clone().requires_grad_(True), S0.clone().requires_grad_(True)
    u, w = _quadrature(2, 40)
    mean0, cov0 = _marginal(MU0, S0)
    x = mean0 + u @ torch.linalg.cholesky(cov0).T  # samples of π, no θ dependence
    mean, cov = _marginal(mu, s)
    d = pseudo_huber(_gauss_score(x, mean, cov) - _ref_score(x), c).double()
    (w * d).sum().backward()
    return mu.grad, s.grad


def _surrogate_grad(c: float, detach_weight: bool = False):
    """∇_θ E_{z,ε}[−d′(y(x_t))ᵀ(s_p(x_t) + ε/σ)] with frozen scores at θ0 and x_t = α(μ + S z) + σ ε."""
    mu, s = MU0.clone().requires_grad_(True), S0.clone().requires_grad_(True)
    nodes, w = _quadrature(4)
    z, eps = nodes[:, :2], nodes[:, 2:]
    x_t = ALPHA * (mu + z @ s.T) + SIGMA * eps
    mean0, cov0 = _marginal(MU0, S0)
    s_p = _gauss_score(x_t, mean0, cov0)
    s_q = _ref_score(x_t)
    if detach_weight:  # the tempting mistake: d′(y) treated as a constant
        per = -(pseudo_huber_grad((s_p - s_q).detach(), c).double() * (s_p + eps / SIGMA)).sum(1)
    else:
        per = score_divergence_surrogate(s_p, s_q, -eps / SIGMA, c).double()
    (w * per).sum().backward()
    return mu.grad, s.grad


@pytest.mark.parametrize("c", [0.5, 2.0, 20.0])
def test_surrogate_gradient_equals_the_pseudo_huber_divergence_gradient(c):
    """SIM's theorem on Gaussians (scores in closed form), from the L2-like to the Fisher-like regime.

    Tolerance: score_divergence_surrogate computes in float32, and Gauss–Hermite quadrature converges
    slowly near the kink of ‖y‖ at y = 0 for small c (at c = 0.05 it needs far finer grids).
    """
    true_mu, true_s = _true_divergence_grad(c)
    got_mu, got_s = _surrogate_grad(c)
    assert true_mu.norm() > 1e-3 and true_s.norm() > 1e-3  # a non-trivial case
    true, got = torch.cat([true_mu, true_s.flatten()]), torch.cat([got_mu, got_s.flatten()])
    torch.testing.assert_close(got, true, rtol=0, atol=1e-3 * true.norm().item())
    det_mu, det_s = _surrogate_grad(c, detach_weight=True)
    assert (det_s - true_s).norm() > 0.05 * true_s.norm()  # detaching d′(y) breaks the identity


def test_fisher_limit_matches_the_closed_form_gradient():
    """With c ≫ ‖y‖, c·d(y) → ½‖y‖², so c·(surrogate gradient) → the Fisher-divergence gradient, here in closed form.

    For x0 = θ + z against q = N(0, 1) in 1-D: p_t = N(αθ, v), q_t = N(0, v), v = α² + σ², y = αθ/v,
    ½E[y²] = α²θ²/(2v²), gradient α²θ/v².
    """
    theta = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    v = ALPHA**2 + SIGMA**2
    nodes, w = _quadrature(2, 20)
    x_t = ALPHA * (theta + nodes[:, :1]) + SIGMA * nodes[:, 1:]
    s_p = -(x_t - ALPHA * theta.detach()) / v
    s_q = -x_t / v
    c = 1e4
    (w * score_divergence_surrogate(s_p, s_q, -nodes[:, 1:] / SIGMA, c).double()).sum().mul(c).backward()
    torch.testing.assert_close(theta.grad, ALPHA**2 * theta.detach() / v**2, rtol=1e-4, atol=1e-8)


def test_pseudo_huber_limits_and_gradient():
    y = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    norm = y.flatten(1).norm(dim=1)
    small = 1e-3 * y
    torch.testing.assert_close(pseudo_huber(small, 10.0), (1e-3 * norm) ** 2 / 20.0, rtol=1e-5, atol=0)  # ‖y‖²/(2c)
    torch.testing.assert_close(pseudo_huber(y, 1e-4), norm - 1e-4, rtol=1e-5, atol=1e-6)  # ‖y‖ − c
    assert (pseudo_huber(torch.zeros(2, 3), 0.5) == 0).all()
    yy = y.clone().requires_grad_(True)
    pseudo_huber(yy, 0.7).sum().backward()
    torch.testing.assert_close(pseudo_huber_grad(y, 0.7), yy.grad)
    assert (pseudo_huber_grad(y, 0.7).flatten(1).norm(dim=1) < 1).all()
    torch.testing.assert_close(score_divergence(y, torch.zeros_like(y), 0.7), pseudo_huber(y, 0.7))
    with pytest.raises(ValueError, match="c must be > 0"):
        pseudo_huber(y, 0.0)


def test_surrogate_is_zero_when_the_fake_score_equals_the_reference():
    s = torch.randn(4, 3, 8, 8)
    assert score_divergence_surrogate(s, s, torch.randn_like(s), 1.0).abs().max() == 0


def test_guidance_noise_and_helpers():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(guided(u, c, 1.0), c)
    torch.testing.assert_close(guided(u, c, 3.0), 3 * c - 2 * u)
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    abar = torch.tensor([0.9, 0.5, 0.1, 0.99])
    x_t, alpha, sigma = vp_noise(x0, eps, abar)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4))
    torch.testing.assert_close(x_t, abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(eps_to_score(eps, sigma), -eps / sigma.view(-1, 1, 1, 1))
    t = sample_timesteps(1000, 20, 980, torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 980 and t.dtype == torch.long
    assert denoising_score_matching_loss(eps, eps) == 0
    with pytest.raises(ValueError, match="t_min"):
        sample_timesteps(2, 5, 3)
