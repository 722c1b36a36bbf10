"""Fréchet distance and diversity against closed forms (pure numpy, no models)."""
import numpy as np
import pytest
import scipy.linalg
import torch

from genft.metrics import (diversity_within_prompt, frechet_distance, frechet_distance_features, gaussian_stats,
                           mean_pairwise_distance)


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_1d_is_mean_gap_plus_std_gap_squared():
    # W2²(N(m1, s1²), N(m2, s2²)) = (m1 - m2)² + (s1 - s2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2, abs=1e-12)


def test_frechet_commuting_covariances_closed_form():
    # S1 = R diag(a) Rᵀ, S2 = R diag(b) Rᵀ commute: d² = |Δμ|² + Σ (√a_i - √b_i)².
    rng = np.random.default_rng(0)
    d = 6
    r = _rotation(d, 1)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = frechet_distance(mu1, r @ np.diag(a) @ r.T, mu2, r @ np.diag(b) @ r.T)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_identity_vs_scaled_identity_and_singular_covariances():
    d = 5
    # N(0, I) vs N(0, c·I): d(1 - √c)²
    assert frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d * (1 - 2) ** 2)
    # rank-deficient covariances (fewer samples than dims) stay real and exact: diag(a, 0) vs diag(b, 0)
    s1, s2 = np.diag([4.0, 0.0, 0.0]), np.diag([1.0, 0.0, 0.0])
    assert frechet_distance(np.zeros(3), s1, np.ones(3), s2) == pytest.approx(3 + (2 - 1) ** 2, abs=1e-12)
    assert frechet_distance(np.zeros(3), s1, np.zeros(3), s1) == 0.0


def test_frechet_matches_scipy_sqrtm_on_general_covariances():
    rng = np.random.default_rng(3)
    d = 8
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_of_samples_converges_to_the_gaussians_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(20000, 3)) * [1.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    want = 1.0 + (2.0 - 1.0) ** 2
    assert frechet_distance_features(a, b) == pytest.approx(want, abs=0.05)
    assert frechet_distance_features(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-8)


def test_gaussian_stats_is_unbiased():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mu, cov = gaussian_stats(x)
    np.testing.assert_allclose(mu, [1, 1])
    np.testing.assert_allclose(cov, np.eye(2) * 4 / 3)


def test_mean_pairwise_distance_unit_square():
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    assert mean_pairwise_distance(square) == pytest.approx((4 * 1 + 2 * np.sqrt(2)) / 6)
    assert mean_pairwise_distance(np.ones((3, 5))) == 0.0


def test_diversity_within_prompt_groups_by_prompt():
    feats = np.array([[0.0], [2.0], [10.0], [10.0], [5.0]])
    prompts = ["a", "a", "b", "b", "c"]  # 'c' has one image: left out
    out = diversity_within_prompt(feats, prompts)
    assert out == {"mean": pytest.approx(1.0), "std": pytest.approx(1.0), "n": 2}


@pytest.mark.parametrize("call, match", [
    (lambda: frechet_distance([0, 0], np.eye(2), [0], np.eye(1)), "shapes"),
    (lambda: frechet_distance([0, 0], [[1, 2], [0, 1]], [0, 0], np.eye(2)), "symmetric"),
    (lambda: gaussian_stats(np.ones((1, 3))), "at least 2"),
    (lambda: mean_pairwise_distance(np.ones(3)), "2-D"),
    (lambda: frechet_distance_features(np.ones((3, 2)), np.ones((3, 4))), "dimensions"),
    (lambda: diversity_within_prompt(np.ones((2, 2)), ["a"]), "prompts"),
    (lambda: diversity_within_prompt(np.ones((2, 2)), ["a", "b"]), "images_per_prompt"),
    (lambda: mean_pairwise_distance(np.array([[np.nan, 0.0], [0.0, 0.0]])), "NaN"),
])
def test_metric_errors_are_clear(call, match):
    with pytest.raises(ValueError, match=match):
        call()
