"""Conversions among the five prediction targets (flowmap/predictions.py) on every affine path.

For known (x0, eps) and x_t = alpha x0 + sigma eps, every prediction type computed from its own
definition must convert into every other one exactly (float64), and every ordered pair round-trips.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flowmap.paths import CosinePath, DiscreteVPPath, LinearPath, VEPath, VPPath, ddpm_alphas_cumprod
from flowmap.predictions import PREDICTIONS, convert, from_x0_eps, to_x0_eps

PATHS = {
    "linear": LinearPath(),
    "cosine": CosinePath(),
    "vp": VPPath(),
    "vp_discrete": DiscreteVPPath(tuple(ddpm_alphas_cumprod(1000))),
    "ve": VEPath(sigma_max=80.0),
}
PAIRS = list(itertools.permutations(PREDICTIONS, 2))


def _batch(path, B: int = 64, shape: tuple[int, ...] = (3, 4)):
    """(x0, eps, x_t, t) in float64 with t inside (0, 1), where alpha, sigma > 0."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    t = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=torch.float64)
    return x0, eps, path.sample(x0, eps, t), t


def _truth(kind: str, x0, eps, t, path):
    """Each prediction from its definition, independently of predictions.py."""
    a = path.alpha(t).reshape(-1, 1, 1)
    s = path.sigma(t).reshape(-1, 1, 1)
    da = path.d_alpha(t).reshape(-1, 1, 1)
    ds = path.d_sigma(t).reshape(-1, 1, 1)
    return {
        "eps": eps,
        "x0": x0,
        "v": a * eps - s * x0,  # Salimans & Ho 2022
        "velocity": da * x0 + ds * eps,  # d x_t / dt
        "score": -eps / s,  # grad log N(x_t; alpha x0, sigma^2 I)
    }[kind]


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("src,dst", PAIRS)
def test_convert_matches_definitions_and_round_trips(path_name, src, dst):
    path = PATHS[path_name]
    x0, eps, x, t = _batch(path)
    pred = _truth(src, x0, eps, t, path)
    out = convert(pred, src, dst, x, t, path)
    # the converted prediction is the true one (relative error, float64)
    want = _truth(dst, x0, eps, t, path)
    rel = ((out - want).norm() / want.norm()).item()
    assert rel < 1e-12, f"{path_name}: {src} -> {dst} relative error {rel:.3g}"
    # and converting back recovers the input
    back = convert(out, dst, src, x, t, path)
    rel_back = ((back - pred).norm() / pred.norm()).item()
    assert rel_back < 1e-12, f"{path_name}: {src} -> {dst} -> {src} relative error {rel_back:.3g}"


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_to_x0_eps_inverts_from_x0_eps(path_name, kind):
    path = PATHS[path_name]
    x0, eps, x, t = _batch(path)
    x0_hat, eps_hat = to_x0_eps(from_x0_eps(x0, eps, kind, x, t, path), kind, x, t, path)
    assert torch.allclose(x0_hat, x0, rtol=0, atol=1e-11 * (1 + x0.abs().max().item()))
    assert torch.allclose(eps_hat, eps, rtol=0, atol=1e-11)


def test_linear_path_velocity_is_eps_minus_x0():
    path = PATHS["linear"]
    x0, eps, x, t = _batch(path)
    v = convert(eps, "eps", "velocity", x, t, path)
    assert torch.allclose(v, eps - x0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bad", ["noise", "epsilon", "", "V"])
def test_unknown_prediction_raises(bad):
    path = LinearPath()
    x0, eps, x, t = _batch(path, B=4)
    with pytest.raises(ValueError, match="unknown prediction"):
        convert(eps, bad, "x0", x, t, path)
    with pytest.raises(ValueError, match="unknown prediction"):
        convert(eps, "eps", bad, x, t, path)
    with pytest.raises(ValueError, match="unknown prediction"):
        convert(eps, bad, bad, x, t, path)
