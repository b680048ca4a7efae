"""ODE solvers and time grids (flowmap/solvers.py, flowmap/time_grids.py).

Known solution: for data N(mu, S) with diagonal S on the linear path, the probability-flow ODE has the
closed-form map x_t = (1 - t) mu + A_t A_s^{-1} (x_s - (1 - s) mu), A_t = ((1 - t)^2 S + t^2 I)^{1/2}.
Halving the step of an order-p solver must divide the error by about 2^p.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowmap.solvers import NFE_PER_STEP, nfe, solve
from flowmap.time_grids import edm_grid, logsnr_grid, make_grid, uniform_grid
from flowmap.types import expand_like
from teachers import GaussianMixtureTeacher, preset_mixture

MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
S = torch.tensor([0.05, 1.0, 4.0], dtype=torch.float64)
TEACHER = GaussianMixtureTeacher(MU[None], torch.diag(S)[None])


def _A(t: float) -> torch.Tensor:
    return torch.sqrt((1 - t) ** 2 * S + t**2)


def _exact(x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    return (1 - t) * MU + _A(t) / _A(s) * (x - (1 - s) * MU)


def _lambda_grid(a: float, b: float, steps: int) -> torch.Tensor:
    """Uniform in lambda = log((1 - t) / t) from t = a to t = b (float64)."""
    lam = torch.linspace(math.log((1 - a) / a), math.log((1 - b) / b), steps + 1, dtype=torch.float64)
    return torch.sigmoid(-lam)


# (order, steps N for the comparison N vs 2N, grid builder); dpm++2m on a sub-interval, since its
# first and last steps at lambda = -inf / +inf are first order and blur the asymptotics.
ORDERS = {
    "euler": (1, 32, lambda n: torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)),
    "midpoint": (2, 16, lambda n: torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)),
    "heun": (2, 16, lambda n: torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)),
    "rk4": (4, 16, lambda n: torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)),
    "dpm++2m": (2, 32, lambda n: _lambda_grid(0.9, 0.05, n)),
}


@pytest.mark.parametrize("method", list(ORDERS))
def test_order_of_accuracy(method):
    order, n, grid = ORDERS[method]
    g0, g1 = grid(n), grid(2 * n)
    a, b = float(g0[0]), float(g0[-1])
    x_a = _exact(torch.randn(32, 3, dtype=torch.float64), 1.0, a)  # x_a ~ p_a
    want = _exact(x_a, a, b)
    err_n = (solve(TEACHER, x_a, g0, method) - want).abs().max().item()
    err_2n = (solve(TEACHER, x_a, g1, method) - want).abs().max().item()
    ratio = err_n / err_2n
    assert err_2n < err_n
    assert ratio > 0.75 * 2**order, f"{method}: error {err_n:.3g} -> {err_2n:.3g}, ratio {ratio:.2f} < 0.75 * 2^{order}"


def test_solve_forward_in_time_and_any_grid():
    """From data to noise (increasing grid) and on a non-uniform EDM grid, rk4 lands on the closed form."""
    x0 = _exact(torch.randn(16, 3, dtype=torch.float64), 1.0, 0.0)
    up = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    assert (solve(TEACHER, x0, up, "rk4") - _exact(x0, 0.0, 1.0)).abs().max().item() < 1e-6
    z = torch.randn(16, 3, dtype=torch.float64)
    for kind in ("edm", "logsnr"):
        err = (solve(TEACHER, z, make_grid(kind, 40), "rk4") - _exact(z, 1.0, 0.0)).abs().max().item()
        assert err < 1e-3, f"rk4 on the {kind} grid: {err:.3g}"


@pytest.mark.parametrize("method", list(NFE_PER_STEP))
def test_callback_sees_every_step_and_nfe(method):
    calls = []

    class Counting:
        data_shape, num_classes = TEACHER.data_shape, 0

        def velocity(self, x, t, cond=None, guidance=1.0):
            calls.append(t)
            return TEACHER.velocity(x, t, cond, guidance)

    grid = torch.linspace(0.95, 0.05, 7, dtype=torch.float64)
    seen = []
    x = torch.randn(5, 3, dtype=torch.float64)
    out = solve(Counting(), x, grid, method, callback=lambda i, t, y: seen.append((i, t.clone(), y.clone())))
    assert [i for i, _, _ in seen] == list(range(6))
    for i, t, y in seen:
        assert t.shape == (5,) and torch.allclose(t.double(), grid[i + 1].expand(5))
        assert y.shape == x.shape
    assert torch.equal(seen[-1][2], out)
    assert len(calls) == nfe(method, 6) == NFE_PER_STEP[method] * 6


class _PixelGaussian:
    """Data N(mu, diag(S)) for image-shaped x (C, H, W): the closed-form velocity, elementwise."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        g = torch.Generator().manual_seed(0)
        self.mu = torch.randn(shape, generator=g, dtype=torch.float64)
        self.S = 0.1 + torch.rand(shape, generator=g, dtype=torch.float64)
        self.data_shape, self.num_classes = shape, 0

    def A(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = expand_like(t, x)
        return torch.sqrt((1 - tt) ** 2 * self.S + tt**2)

    def velocity(self, x, t, cond=None, guidance=1.0):
        tt = expand_like(t, x)
        dlogA = (tt - (1 - tt) * self.S) / self.A(t, x) ** 2  # d/dt log A_t
        return -self.mu + dlogA * (x - (1 - tt) * self.mu)

    def exact(self, x, s, t):
        ss, tt = torch.full((x.shape[0],), s, dtype=x.dtype), torch.full((x.shape[0],), t, dtype=x.dtype)
        return expand_like(1 - tt, x) * self.mu + self.A(tt, x) / self.A(ss, x) * (x - expand_like(1 - ss, x) * self.mu)


@pytest.mark.parametrize("method", ["heun", "rk4", "dpm++2m"])
def test_solve_on_image_batches(method):
    teacher = _PixelGaussian((2, 4, 4))
    z = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    out = solve(teacher, z, 64, method)
    assert out.shape == z.shape
    err = (out - teacher.exact(z, 1.0, 0.0)).abs().max().item()
    assert err < 2e-2, f"{method} on images: {err:.3g}"
    # a batch is solved row by row: the first row alone gives the same answer
    alone = solve(teacher, z[:1], 64, method)
    assert torch.allclose(alone, out[:1], atol=1e-12, rtol=0)


def test_solve_float32_and_labels():
    """float32 states stay float32; labels reach the teacher (class velocity differs from the unconditional one)."""
    mix = preset_mixture("ring8")
    z = torch.randn(8, 2)
    out_c = solve(mix, z, 8, "heun", cond=torch.zeros(8, dtype=torch.long))
    out_u = solve(mix, z, 8, "heun")
    assert out_c.dtype == torch.float32
    assert (out_c - out_u).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", ["uniform", "edm", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 7, 64])
def test_grids_decrease_from_one_to_zero(kind, steps):
    grid = make_grid(kind, steps)
    assert grid.shape == (steps + 1,)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])


def test_grid_spacings():
    """uniform: equal steps; edm: sigma^(1/rho) equally spaced (Karras et al. 2022, Eq. 5);
    logsnr: lambda equally spaced; both in the noise-to-signal ratio sigma = t / (1 - t) of the linear path."""
    assert torch.allclose(uniform_grid(10)[:-1] - uniform_grid(10)[1:], torch.full((10,), 0.1), atol=1e-6)
    t = edm_grid(12, rho=7.0).double()[1:-1]
    root = (t / (1 - t)) ** (1 / 7)
    d = root[1:] - root[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-4)
    t_min = float(edm_grid(12)[-2])
    assert t_min / (1 - t_min) == pytest.approx(0.002, rel=1e-4)  # sigma_min
    t = logsnr_grid(12).double()[1:-1]
    lam = 2 * torch.log((1 - t) / t)
    d = lam[1:] - lam[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-4)


def test_bad_grids_and_methods_raise():
    x = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="monotone"):
        solve(TEACHER, x, torch.tensor([1.0, 0.5, 0.7, 0.0]), "euler")
    with pytest.raises(ValueError, match="monotone"):
        solve(TEACHER, x, torch.tensor([1.0, 0.5, 0.5, 0.0]), "euler")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solve(TEACHER, x, torch.tensor([1.2, 0.5, 0.0]), "euler")
    with pytest.raises(ValueError, match="at least two"):
        solve(TEACHER, x, torch.tensor([1.0]), "euler")
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        solve(TEACHER, x, 4, "rk45")
    with pytest.raises(ValueError, match="decrease"):
        solve(TEACHER, x, torch.linspace(0.0, 1.0, 5), "dpm++2m")
    with pytest.raises(ValueError, match="unknown time grid"):
        make_grid("cosine", 4)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="at least one step"):
            uniform_grid(bad)
