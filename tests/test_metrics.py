"""Metrics against closed forms and exact identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmap.data import sample_checkerboard
from flowmap.metrics import (
    checkerboard_precision,
    flow_map_rmse,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    mmd_rbf,
    sliced_w2,
    w2_exact,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(n, d=2, seed=0) -> torch.Tensor:
    return torch.randn(n, d, generator=gen(seed), dtype=torch.float64)


# --- W2 ------------------------------------------------------------------------------------------


def test_w2_identities():
    x = randn(300)
    assert w2_exact(x, x) < 1e-9
    shift = torch.tensor([0.7, -2.4], dtype=torch.float64)  # |shift| = 2.5
    assert abs(w2_exact(x, x + shift) - 2.5) < 1e-7
    # unequal sizes: y = x listed twice is the same empirical measure
    assert w2_exact(x, torch.cat([x, x])) < 1e-7
    y = randn(200, seed=1)
    assert abs(w2_exact(x, y) - w2_exact(y, x)) < 1e-9


def test_w2_gaussians_close_to_closed_form():
    """N(m1, I) vs N(m2, I): W2 = |m1 - m2|. Exact bounds for the empirical measures:
    |mean(x) - mean(y)| <= W2(x, y) <= |delta| + W2(x, y - delta)  (Jensen; triangle inequality)."""
    n = 800
    delta = torch.tensor([1.0, 1.0], dtype=torch.float64)
    x, y = randn(n, seed=2), randn(n, seed=3) + delta
    w = w2_exact(x, y)
    assert (x.mean(0) - y.mean(0)).norm().item() <= w + 1e-9
    assert w <= delta.norm().item() + w2_exact(x, y - delta) + 1e-9
    assert abs(w - math.sqrt(2)) < 0.15


def test_w2_bad_input():
    with pytest.raises(ValueError, match="dimension"):
        w2_exact(randn(5, 2), randn(5, 3))
    with pytest.raises(ValueError, match="non-finite"):
        w2_exact(torch.full((3, 2), float("nan")), randn(3))


def test_sliced_w2():
    x = randn(500, seed=4)
    assert sliced_w2(x, x, generator=gen(0)) < 1e-12
    # in 1-D the only directions are +-1, so SW2 = W2 exactly (also for unequal sizes)
    a, b = randn(50, 1, seed=5), randn(37, 1, seed=6) * 2 + 1
    assert abs(sliced_w2(a, b, n_projections=3, generator=gen(0)) - w2_exact(a, b)) < 1e-9
    # a shift c projects to theta.c, and E[(theta.c)^2] = |c|^2 / d
    c = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert abs(sliced_w2(x, x + c, n_projections=4000, generator=gen(1)) - 5 / math.sqrt(2)) < 0.15
    assert sliced_w2(x, torch.cat([x, x, x]), generator=gen(0)) < 1e-9


# --- MMD -----------------------------------------------------------------------------------------


def test_mmd_same_vs_different():
    x, y, z = randn(400, seed=7), randn(400, seed=8), randn(400, seed=9) + 0.5
    same, diff = mmd_rbf(x, y), mmd_rbf(x, z)
    assert abs(same) < 0.01 and diff > 0.05 and diff > 10 * abs(same)
    assert mmd_rbf(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    assert mmd_rbf(x, y, unbiased=False) > mmd_rbf(x, y, unbiased=True)
    assert mmd_rbf(x, z, bandwidths=None) > mmd_rbf(x, y, bandwidths=None)
    with pytest.raises(ValueError, match="positive"):
        mmd_rbf(x, y, bandwidths=(0.0,))


# --- flow-map error and support precision ---------------------------------------------------------


def test_flow_map_rmse():
    ref = torch.zeros(10, 2)
    pred = torch.tensor([[3.0, 4.0]]).repeat(10, 1)
    assert flow_map_rmse(pred, ref) == pytest.approx(math.sqrt(12.5))
    assert flow_map_rmse(ref, ref) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        flow_map_rmse(torch.zeros(10, 2), torch.zeros(9, 2))


def test_checkerboard_precision():
    assert checkerboard_precision(sample_checkerboard(4000, gen(0))) == 1.0
    p = checkerboard_precision(torch.randn(4000, 2, generator=gen(1)))
    assert 0.3 < p < 0.7
    with pytest.raises(ValueError, match="2-D"):
        checkerboard_precision(torch.zeros(4, 3))


# --- Frechet distance and KID --------------------------------------------------------------------


def test_frechet_closed_forms():
    f = randn(500, 4, seed=10)
    assert abs(frechet_distance(f, f)) < 1e-8
    # diagonal covariances: d^2 = |dmu|^2 + sum (s1 - s2)^2 with s the standard deviations
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    d = frechet_distance_from_stats(mu1, np.diag([1.0, 4.0]), mu2, np.diag([9.0, 1.0]))
    assert d == pytest.approx(5.0 + (1 - 3) ** 2 + (2 - 1) ** 2, abs=1e-10)
    # general SPD covariances against scipy's sqrtm
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    ref = np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert frechet_distance_from_stats(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_from_gaussian_samples():
    """N(0, I) vs N(m, 4 I) in 3-D: d^2 = |m|^2 + 3 (1 - 2)^2."""
    x = randn(20_000, 3, seed=11)
    y = 2 * randn(20_000, 3, seed=12) + torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert frechet_distance(x, y) == pytest.approx(2.0 + 3.0, abs=0.15)


def test_kid():
    x, y, z = randn(600, 8, seed=13), randn(600, 8, seed=14), randn(600, 8, seed=15) + 0.5
    same_mean, same_std = kid(x, y, subsets=20, subset_size=300, generator=gen(0))
    diff_mean, _ = kid(x, z, subsets=20, subset_size=300, generator=gen(0))
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert diff_mean > 10 * same_std and diff_mean > 0.1
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, y, subset_size=601)
