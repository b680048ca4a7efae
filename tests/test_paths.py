"""Affine paths (flowmap/paths.py): derivatives, the change of path onto the linear path, the DDPM table.

The change of path (Lipman et al. 2024, Sec. 4.8): x_lin = x / (alpha + sigma), t_lin = sigma / (alpha + sigma).
The strongest check uses the analytic Gaussian mixture, whose exact probability-flow velocity is known on
every affine path: carried onto the linear axis it must equal the mixture's own linear-path velocity.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowmap.paths import (
    PATHS,
    AffinePath,
    CosinePath,
    DiscreteVPPath,
    LinearPath,
    VEPath,
    VPPath,
    build_path,
    ddpm_alphas_cumprod,
    from_linear,
    to_linear,
    velocity_from_linear,
    velocity_to_linear,
)
from teachers import preset_mixture

N_DDPM = 1000
ALL = {
    "linear": LinearPath(),
    "cosine": CosinePath(),
    "vp": VPPath(),
    "vp_discrete": DiscreteVPPath(tuple(ddpm_alphas_cumprod(N_DDPM))),
    "ve": VEPath(sigma_max=80.0),
}
NONLINEAR = [k for k in ALL if k != "linear"]


def _times(name: str, n: int = 40) -> torch.Tensor:
    """float64 times in [0.05, 0.95]; for the piecewise discrete path, mid-way between table knots."""
    t = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    if name == "vp_discrete":
        t = (torch.floor(t * N_DDPM) + 0.5) / N_DDPM
    return t


@pytest.mark.parametrize("name", list(ALL))
def test_derivatives_match_finite_differences(name):
    path = ALL[name]
    t = _times(name)
    h = 1e-6 if name != "vp_discrete" else 1e-5 / N_DDPM  # stay inside one table segment
    fd_alpha = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_sigma = (path.sigma(t + h) - path.sigma(t - h)) / (2 * h)
    err_a = (path.d_alpha(t) - fd_alpha).abs().max().item()
    err_s = (path.d_sigma(t) - fd_sigma).abs().max().item()
    scale = 1.0 + max(fd_alpha.abs().max().item(), fd_sigma.abs().max().item())
    assert err_a < 1e-7 * scale, f"{name}: d_alpha off by {err_a:.3g}"
    assert err_s < 1e-7 * scale, f"{name}: d_sigma off by {err_s:.3g}"
    # the paths run from data to noise: the noise-to-signal ratio increases
    assert torch.all(path.ratio(t[1:]) > path.ratio(t[:-1]))


@pytest.mark.parametrize("name", NONLINEAR)
@pytest.mark.parametrize("preset", ["ring8", "grid4"])
def test_mixture_velocity_carried_to_linear_equals_linear_velocity(name, preset):
    """(a) v_lin(x_lin, t_lin) = velocity_to_linear(v_path(x, t)) for the exact mixture velocities."""
    path = ALL[name]
    mix = preset_mixture(preset)
    t = _times(name, 64)
    g = torch.Generator().manual_seed(3)
    x0 = mix.sample(64, generator=g).double()
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x = path.sample(x0, eps, t)
    v_path = mix.exact_velocity(x, t, path)
    x_lin, t_lin = to_linear(x, t, path)
    carried = velocity_to_linear(v_path, x, t, path)
    direct = mix.velocity(x_lin, t_lin)
    err = (carried - direct).abs().max().item()
    assert err < 1e-9 * (1 + direct.abs().max().item()), f"{name}/{preset}: carried velocity off by {err:.3g}"
    # and the mixture's velocity on the path is not the linear one at the same (x, t): the test has teeth
    assert (v_path - mix.velocity(x, t)).abs().max().item() > 1e-2
    # velocity_from_linear is the inverse map
    back = velocity_from_linear(direct, x_lin, t, path)
    assert (back - v_path).abs().max().item() < 1e-9 * (1 + v_path.abs().max().item())


@pytest.mark.parametrize("name", list(ALL))
def test_to_linear_from_linear_round_trip(name):
    """(b) both compositions are the identity (from_linear inverts the time by a closed form or bisection)."""
    path = ALL[name]
    t = _times(name, 50)
    x = torch.randn(50, 3, 2, dtype=torch.float64)
    x_lin, t_lin = to_linear(x, t, path)
    x_back, t_back = from_linear(x_lin, t_lin, path)
    assert (t_back - t).abs().max().item() < 1e-10
    assert (x_back - x).abs().max().item() < 1e-9 * (1 + x.abs().max().item())
    # the other way round, from times on the linear axis (VE only reaches t_lin <= sigma_max / (1 + sigma_max))
    t_max = 0.95 * float(t_lin.max())
    t_lin2 = torch.linspace(0.05, t_max, 50, dtype=torch.float64)
    x2, t2 = from_linear(x, t_lin2, path)
    x_lin2, t_lin_back = to_linear(x2, t2, path)
    tol_t = 1e-10 if name != "vp_discrete" else 1e-9  # bisection in float64
    assert (t_lin_back - t_lin2).abs().max().item() < tol_t
    assert (x_lin2 - x).abs().max().item() < 1e-8


@pytest.mark.parametrize("name", list(ALL))
def test_closed_form_time_inverse_matches_bisection(name):
    path = ALL[name]
    t = _times(name, 30)
    r = path.ratio(t)
    bisect = AffinePath.t_from_ratio(path, r)
    assert (path.t_from_ratio(r) - t).abs().max().item() < 1e-10
    assert (bisect - t).abs().max().item() < 1e-10


@pytest.mark.parametrize("name", NONLINEAR)
def test_path_samples_map_onto_linear_marginal(name):
    """(c) x = alpha x0 + sigma eps  ->  x_lin = (1 - t_lin) x0 + t_lin eps for the same (x0, eps)."""
    path = ALL[name]
    t = _times(name, 128)
    x0 = torch.randn(128, 5, dtype=torch.float64) * 2 + 1
    eps = torch.randn(128, 5, dtype=torch.float64)
    x_lin, t_lin = to_linear(path.sample(x0, eps, t), t, path)
    want = (1 - t_lin)[:, None] * x0 + t_lin[:, None] * eps
    assert (x_lin - want).abs().max().item() < 1e-12
    assert torch.all((t_lin > 0) & (t_lin < 1))


def test_build_path_names_and_errors():
    for name in PATHS:
        if name == "vp_discrete":
            path = build_path({"name": name, "alphas_cumprod": ddpm_alphas_cumprod(10)})
        else:
            path = build_path(name)
        assert build_path(path.to_config()) == path
    assert build_path({"name": "vp", "beta_max": 10.0}).beta_max == 10.0
    with pytest.raises(ValueError, match="unknown path 'rectified'"):
        build_path("rectified")
    with pytest.raises(ValueError, match="unknown path"):
        build_path({"beta_min": 0.1})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sigma_max'\]"):
        build_path({"name": "vp", "sigma_max": 80.0})
    with pytest.raises(ValueError, match="at least two"):
        DiscreteVPPath(())


@pytest.mark.parametrize("schedule,beta_start,beta_end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)])
def test_discrete_vp_reproduces_alphas_cumprod(schedule, beta_start, beta_end):
    abar = ddpm_alphas_cumprod(N_DDPM, beta_start, beta_end, schedule)
    # the DDPM table from its definition, alpha_bar_k = prod_{i<=k} (1 - beta_i) (Ho et al. 2020, Eq. 4)
    if schedule == "linear":
        betas = [beta_start + (beta_end - beta_start) * i / (N_DDPM - 1) for i in range(N_DDPM)]
    else:
        betas = [(beta_start**0.5 + (beta_end**0.5 - beta_start**0.5) * i / (N_DDPM - 1)) ** 2 for i in range(N_DDPM)]
    prod, ref = 1.0, []
    for b in betas:
        prod *= 1.0 - b
        ref.append(prod)
    assert max(abs(a - r) / r for a, r in zip(abar, ref)) < 1e-10
    path = DiscreteVPPath(tuple(abar))
    k = torch.arange(N_DDPM)
    t_k = path.t_of_step(k)
    assert t_k[0].item() == pytest.approx(1.0 / N_DDPM) and t_k[-1].item() == 1.0
    got = path.alpha(t_k) ** 2
    want = torch.tensor(abar, dtype=torch.float64)
    assert ((got - want).abs() / want).max().item() < 1e-12
    assert ((path.alpha(t_k) ** 2 + path.sigma(t_k) ** 2) - 1).abs().max().item() < 1e-12  # variance preserving
    assert path.alpha(torch.zeros(1, dtype=torch.float64)).item() == 1.0  # clean data at t = 0
    if schedule == "linear":
        assert math.sqrt(abar[-1]) == pytest.approx(0.00635, rel=2e-3)  # the known DDPM terminal signal level
    with pytest.raises(ValueError, match="unknown DDPM beta schedule"):
        ddpm_alphas_cumprod(10, schedule="cosine")


def test_denoising_loss_linear_velocity_fast_path_equals_the_general_path():
    """DenoisingLoss takes the closed form x_t = x0 + t (eps - x0), target eps - x0 on the linear path with the
    velocity target; same draws through the general AffinePath / from_x0_eps code give the same loss."""
    from flowmap.objectives.denoising import DenoisingLoss, sample_training_times
    from flowmap.predictions import from_x0_eps

    class Probe(torch.nn.Module):
        num_classes = 0

        def forward(self, x, s, t, cond=None):
            return torch.sin(3 * x) * t[:, None]

    loss_fn, net = DenoisingLoss("linear", "velocity", p_uncond=0.0), Probe()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    fast = loss_fn(net, x0).loss
    torch.manual_seed(1)
    t = sample_training_times(64, x0.device, "uniform")
    eps = torch.randn_like(x0)
    x_t = loss_fn.path.sample(x0, eps, t)
    general = (net(x_t, t, t) - from_x0_eps(x0, eps, "velocity", x_t, t, loss_fn.path)).pow(2).mean(1)
    torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-7)
    assert float(general.mean()) > 0.1  # a probe that is not the target
