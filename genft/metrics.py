"""Sample-set metrics on fixed features: Fréchet distance between Gaussian fits, and diversity within prompt.

Pure functions on float64 numpy arrays; features come from `genft.features`. The Fréchet distance uses an
eigen-based symmetric square root (see `frechet_distance`), not `scipy.linalg.sqrtm`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


def _as_features(x, what: str) -> np.ndarray:
    """A float64 [N, D] array, or a ValueError naming `what`."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D] of features, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return a


def gaussian_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D] (N >= 2), as the FID reference code computes them."""
    f = _as_features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½). tr((S1 S2)^½) equals the trace of the square
    root of the symmetric PSD matrix S1^½ S2 S1^½, so two `eigh` calls give it exactly: always real, no
    `sqrtm` of the non-symmetric S1 S2 (which returns complex noise and needs an eps when the
    covariances are singular, as they are with fewer samples than feature dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if not np.allclose(s, s.T, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(s).max())):
            raise ValueError(f"{name} is not symmetric; pass a covariance matrix")
    root1 = _sqrt_psd(s1)
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)
    return max(value, 0.0)  # rounding can leave -1e-15 for equal Gaussians


def frechet_distance_features(a, b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, D] and [M, D]."""
    fa, fb = _as_features(a, "first feature set"), _as_features(b, "second feature set")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature sets have different dimensions: {fa.shape[1]} and {fb.shape[1]}")
    return frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))


def mean_pairwise_distance(features) -> float:
    """Mean Euclidean distance over the N(N-1)/2 unordered pairs of rows of [N, D] (N >= 2)."""
    f = _as_features(features, "features")
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"pairwise distance needs at least 2 feature vectors, got {n}")
    sq = (f * f).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0, None)
    iu = np.triu_indices(n, k=1)
    return float(np.sqrt(d2[iu]).mean())


def diversity_within_prompt(features, prompts: Sequence[str]) -> Dict[str, float]:
    """Mean pairwise feature distance among each prompt's images: {"mean", "std"} over prompts with >= 2 images.

    0 means every prompt gets the same image; it says nothing about whether the images fit the prompt.
    """
    f = _as_features(features, "features")
    if len(prompts) != f.shape[0]:
        raise ValueError(f"got {f.shape[0]} feature vectors but {len(prompts)} prompts")
    groups: Dict[str, List[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    per_prompt = [mean_pairwise_distance(f[idx]) for idx in groups.values() if len(idx) >= 2]
    if not per_prompt:
        raise ValueError("diversity within prompt needs at least 2 images of some prompt; raise images_per_prompt")
    return {"mean": float(np.mean(per_prompt)), "std": float(np.std(per_prompt)), "n": len(per_prompt)}
