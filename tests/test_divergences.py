"""Equal-variance Gaussian divergences: closed forms against Monte Carlo and quadrature, reductions, gradients."""
import math

import pytest
import torch

from genft import divergences as dv
from pipelines import gaussian_kl

B, D = 2, 3
MU_A = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.1, 0.0]], dtype=torch.float64)
MU_B = torch.tensor([[-0.1, 0.2, 0.1], [0.4, -0.3, 0.2]], dtype=torch.float64)
STD = torch.tensor([0.8, 1.1], dtype=torch.float64)
N_MC = 200_000


def _log_density(x, mu, s):
    """log N(x; mu, s²I) summed over the last dim, x [B, N, D]."""
    return (-0.5 * ((x - mu[:, None]) / s.view(-1, 1, 1)) ** 2 - torch.log(s.view(-1, 1, 1)) - 0.5 * math.log(2 * math.pi)).sum(-1)


def _mc_samples(mu_p, mu_q, s, seed=0):
    """(log p − log q at x ~ P, log q − log p at x ~ Q), each [B, N]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N_MC, D, generator=g, dtype=torch.float64)
    x_p = mu_p[:, None] + s.view(-1, 1, 1) * z
    x_q = mu_q[:, None] + s.view(-1, 1, 1) * z
    return (_log_density(x_p, mu_p, s) - _log_density(x_p, mu_q, s), _log_density(x_q, mu_q, s) - _log_density(x_q, mu_p, s))


def _mc_estimates(mu_p, mu_q, s):
    """Monte-Carlo integrands of each divergence ([B, N] per name): their means estimate it."""
    llr_p, llr_q = _mc_samples(mu_p, mu_q, s)
    return {
        "kl": llr_p,
        "reverse_kl": llr_q,
        "jeffreys": torch.cat([llr_p, llr_q], 1) * 2,  # mean over both halves ×2 = KL + reverse KL
        "hellinger": 1 - torch.exp(-0.5 * llr_p),  # 1 − E_P[√(q/p)]
        "tv": 0.5 * (1 - torch.exp(-llr_p)).abs(),  # ½ E_P|1 − q/p|
        "chi2": torch.exp(llr_p) - 1,  # E_P[p/q] − 1 = ∫p²/q − 1
        "js": 0.5 * torch.cat([math.log(2) - torch.nn.functional.softplus(-llr_p),
                               math.log(2) - torch.nn.functional.softplus(-llr_q)], 1) * 2,
    }


@pytest.mark.parametrize("name", dv.DIVERGENCES)
def test_each_divergence_matches_monte_carlo_within_five_standard_errors(name):
    # Stated tolerance: |closed form − MC mean| < 5 standard errors of a 200k-sample estimate (seed 0), δ ≈ 0.5–0.8.
    integrand = _mc_estimates(MU_A, MU_B, STD)[name]
    est, se = integrand.mean(1), integrand.std(1) / math.sqrt(integrand.shape[1])
    got = dv.gaussian_divergence(name, MU_A, MU_B, STD, reduce="sum", generator=torch.Generator().manual_seed(1),
                                 num_samples=20_000)
    assert got.shape == (B,)
    assert ((got - est).abs() < 5 * se + (2e-3 if name == "js" else 0)).all(), (name, got, est, se)


def test_closed_forms_in_terms_of_delta():
    delta = ((MU_A - MU_B) ** 2).sum(1) / STD**2
    expect = {"kl": delta / 2, "reverse_kl": delta / 2, "jeffreys": delta, "hellinger": 1 - torch.exp(-delta / 8),
              "tv": torch.erf(delta.sqrt() / (2 * math.sqrt(2))), "chi2": torch.exp(delta) - 1}
    for name, value in expect.items():
        torch.testing.assert_close(dv.gaussian_divergence(name, MU_A, MU_B, STD, reduce="sum"), value)


def test_js_matches_quadrature_and_its_bounds():
    gaps = torch.tensor([0.0, 0.3, 1.0, 2.5, 8.0], dtype=torch.float64)
    x = torch.linspace(-20, 30, 200_001, dtype=torch.float64)
    p = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    exact = []
    for g in gaps:
        q = torch.exp(-0.5 * (x - g) ** 2) / math.sqrt(2 * math.pi)
        m = 0.5 * (p + q)
        f = 0.5 * (p * torch.log(p / m) + q * torch.log(q / m))
        exact.append(torch.trapezoid(torch.nan_to_num(f), x))
    exact = torch.stack(exact)
    mu_a = torch.zeros(len(gaps), 1, dtype=torch.float64)
    mu_b = gaps[:, None]
    got = dv.jensen_shannon(mu_a, mu_b, torch.ones(len(gaps), dtype=torch.float64), reduce="sum",
                            generator=torch.Generator().manual_seed(0), num_samples=100_000)
    torch.testing.assert_close(got, exact, atol=3e-3, rtol=0)  # Monte-Carlo error of 100k antithetic samples
    assert got[0] == 0 and (got <= math.log(2)).all()


def test_mean_reduction_is_the_per_dimension_divergence_and_kl_matches_gaussian_kl():
    mu_a, mu_b = MU_A.float(), MU_B.float()
    std = STD.float()
    torch.testing.assert_close(dv.kl(mu_a, mu_b, std), gaussian_kl(mu_a, mu_b, std, reduce="mean"))
    per_dim = ((mu_a - mu_b) ** 2).mean(1) / std**2
    one_d = torch.zeros(B, 1)
    for name in dv.CLOSED_FORMS:
        torch.testing.assert_close(dv.gaussian_divergence(name, mu_a, mu_b, std, reduce="mean"),
                                   dv.gaussian_divergence(name, one_d, per_dim.sqrt()[:, None] * std[:, None], std, reduce="sum"))


def test_zero_std_and_equal_means_give_zero_with_finite_zero_gradients():
    mu = torch.randn(B, 4, 2, requires_grad=True)
    same = mu.detach().clone()
    for name in dv.DIVERGENCES:
        val = dv.gaussian_divergence(name, mu, same, torch.tensor([0.5, 0.7]), generator=torch.Generator().manual_seed(0))
        assert torch.equal(val.detach(), torch.zeros(B)), name
        (grad,) = torch.autograd.grad(val.sum(), mu)
        assert torch.isfinite(grad).all() and grad.abs().max() == 0, name
    off = dv.gaussian_divergence("chi2", mu, same + 1, torch.tensor([0.0, 0.7]))
    assert off[0] == 0 and off[1] > 0  # a deterministic step (std 0) carries no divergence


@pytest.mark.parametrize("name", dv.DIVERGENCES)
def test_gradients_match_finite_differences(name):
    mu_a = MU_A.clone().requires_grad_(True)
    mu_b = MU_B.clone().requires_grad_(True)

    def f(a, b):  # a fresh, fixed generator each call makes the JS estimate a deterministic function of the means
        return dv.gaussian_divergence(name, a, b, STD, reduce="mean", generator=torch.Generator().manual_seed(3),
                                      num_samples=64)

    assert torch.autograd.gradcheck(f, (mu_a, mu_b), eps=1e-6, atol=1e-6)


def test_unknown_divergence_and_bad_sample_count_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        dv.gaussian_divergence("wasserstein", MU_A, MU_B, STD)
    with pytest.raises(ValueError, match="even"):
        dv.jensen_shannon(MU_A, MU_B, STD, num_samples=3)
    z = dv.js_normals(8, torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(z[:4], -z[4:])
    torch.testing.assert_close(dv.jensen_shannon(MU_A, MU_B, STD, normals=z),
                               dv.jensen_shannon(MU_A, MU_B, STD, generator=torch.Generator().manual_seed(0), num_samples=8))
