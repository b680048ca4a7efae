"""The flow-map student (flowmap/student.py) and the sampler (flowmap/sampling.py).

X_theta(x, s, t) = x + (t - s) u_theta(x, s, t): X(x, s, s) = x by construction; the consistency
parametrization keeps u finite and equal to the raw output F at s = t; any velocity field is a flow map
by one Euler step; ``sample`` with an exact flow map (closed form, single Gaussian) draws the data
distribution for every gamma, which checks the re-noising of multistep consistency / CTM sampling.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowmap.nets import build_net
from flowmap.sampling import sample
from flowmap.solvers import solve
from flowmap.student import ConsistencyBoundary, EulerFlowMap, FlowMap, build_parametrization
from flowmap.types import expand_like
from teachers import preset_mixture


def _randomized(net: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every parameter so zero-initialized layers no longer hide s, t, x or the label."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.add_(torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5 if p.dim() > 1 else 0.1))
    return net.eval()


def _student(param=None, **kw) -> FlowMap:
    cfg = {"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "emb_dim": 32, **kw}
    return FlowMap(_randomized(build_net(cfg)), param).eval()


@pytest.mark.parametrize("param", [None, "consistency"])
def test_flow_map_is_identity_at_s_equals_t(param):
    student = _student(param)
    x = 3 * torch.randn(64, 2)
    s = torch.rand(64)
    with torch.no_grad():
        assert torch.equal(student(x, s, s), x)
        t = s * torch.rand(64)
        assert (student(x, s, t) - x).abs().max() > 1e-3  # it does move otherwise


def test_consistency_boundary():
    """u = F at s = t, finite everywhere, and X = c_skip x + c_out F (Song et al. 2023, Eq. 7 on Delta = s - t)."""
    sd = 0.5
    student = _student(ConsistencyBoundary(sigma_data=sd))
    x = torch.randn(64, 2, dtype=torch.float64)
    student.double()
    t = torch.rand(64, dtype=torch.float64)
    with torch.no_grad():
        F = student.net(x, t, t)
        assert torch.equal(student.average_velocity(x, t, t), F)
        assert torch.equal(student.velocity(x, t), F)
        s = torch.rand(64, dtype=torch.float64)
        s[:4] = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
        t[:4] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        u = student.average_velocity(x, s, t)
        assert torch.all(torch.isfinite(u))
        F = student.net(x, s, t)
        delta = expand_like(s - t, x)
        c_skip = sd**2 / (delta**2 + sd**2)
        c_out = -sd * delta / torch.sqrt(delta**2 + sd**2)
        assert torch.allclose(student(x, s, t), c_skip * x + c_out * F, atol=1e-12, rtol=0)
    assert build_parametrization(student.param.to_config()).sigma_data == sd
    with pytest.raises(ValueError, match="unknown student parametrization"):
        build_parametrization("edm")


def test_student_velocity_is_average_velocity_on_the_diagonal():
    student = _student()
    x, t = torch.randn(8, 2), torch.rand(8)
    with torch.no_grad():
        assert torch.equal(student.velocity(x, t), student.net(x, t, t))


def test_flow_map_errors():
    student = _student()
    x, s, t = torch.randn(4, 2), torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"x has shape \(4, 3\), the student expects \(B, 2\)"):
        student(torch.randn(4, 3), s, t)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        student(x, torch.full((4,), 1.5), t)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        student(x, s, torch.full((4,), -0.1))
    with pytest.raises(ValueError, match="shape"):
        student(x, torch.ones(3), t)
    with pytest.raises(ValueError, match="shape"):
        student(x, s, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="unconditional"):
        student(x, s, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance scale was given"):
        student(x, s, t, None, torch.ones(4))
    with pytest.raises(ValueError, match="guidance != 1"):
        student.velocity(x, t, None, guidance=2.0)
    conditional = _student(num_classes=3)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\]"):
        conditional(x, s, t, torch.full((4,), 4))
    with pytest.raises(ValueError, match="long tensor"):
        conditional(x, s, t, torch.zeros(4))
    # a net that takes a guidance scale accepts it, and the scale reaches the output
    guided = _student(num_classes=3, guidance_input=True)
    cond = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        assert (guided(x, s, t, cond, torch.ones(4)) - guided(x, s, t, cond, torch.full((4,), 4.0))).abs().max() > 1e-4


def test_euler_flow_map_is_one_euler_step():
    mix = preset_mixture("ring8")
    fm = EulerFlowMap(mix)
    assert fm.data_shape == (2,) and fm.num_classes == 2
    x = torch.randn(32, 2, dtype=torch.float64)
    s = torch.rand(32, dtype=torch.float64)
    t = s * torch.rand(32, dtype=torch.float64)
    cond = torch.randint(0, 3, (32,))
    want = x + (t - s)[:, None] * mix.velocity(x, s, cond)
    assert torch.equal(fm(x, s, t, cond), want)
    assert torch.equal(fm.velocity(x, t, cond), mix.velocity(x, t, cond))
    guided = EulerFlowMap(mix, guidance=2.0)
    v_u, v_c = mix.velocity(x, s), mix.velocity(x, s, cond)
    assert torch.allclose(guided(x, s, t, cond), x + (t - s)[:, None] * (v_u + 2.0 * (v_c - v_u)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("grid", [6, "edm"])
def test_sample_gamma0_on_euler_flow_map_equals_euler_solver(grid):
    from flowmap.time_grids import edm_grid

    mix = preset_mixture("ring8")
    g = edm_grid(6) if grid == "edm" else torch.linspace(1.0, 0.0, grid + 1)
    z = torch.randn(64, 2, dtype=torch.float64)
    seen = []
    out = sample(EulerFlowMap(mix), z, g, gamma=0.0, callback=lambda i, t, x: seen.append(i))
    ref = solve(mix, z, g, "euler")
    assert (out - ref).abs().max().item() < 1e-6
    assert (out - z).abs().max().item() > 0.1
    assert seen == list(range(len(g) - 1))


def test_sample_gamma1_runs_and_keeps_shape():
    mix = preset_mixture("ring8")
    z = torch.randn(16, 2)
    gen = torch.Generator().manual_seed(3)
    a = sample(EulerFlowMap(mix), z, 4, gamma=1.0, generator=gen)
    b = sample(EulerFlowMap(mix), z, 4, gamma=1.0, generator=torch.Generator().manual_seed(3))
    assert a.shape == z.shape and torch.all(torch.isfinite(a))
    assert torch.equal(a, b)  # the generator fixes the re-noising
    c = sample(EulerFlowMap(mix), z, 4, gamma=1.0, generator=torch.Generator().manual_seed(4))
    assert (a - c).abs().max() > 1e-3
    # image-shaped and labelled, through a student
    student = FlowMap(
        _randomized(
            build_net(
                {
                    "name": "unet",
                    "data_shape": [1, 8, 8],
                    "channels": 8,
                    "channel_mult": [1, 2],
                    "num_res_blocks": 1,
                    "attn_resolutions": [],
                    "heads": 1,
                    "emb_dim": 16,
                    "num_classes": 2,
                }
            )
        )
    )
    imgs = sample(student, torch.randn(3, 1, 8, 8), 2, cond=torch.tensor([0, 1, 2]), gamma=1.0)
    assert imgs.shape == (3, 1, 8, 8) and torch.all(torch.isfinite(imgs))


class _GaussianMap(nn.Module):
    """Exact flow map of data N(m, sd^2 I) on the linear path: X = (1 - t) m + std_t / std_s (x - (1 - s) m)."""

    def __init__(self, m: torch.Tensor, sd: float) -> None:
        super().__init__()
        self.m, self.sd = m, sd

    def std(self, t):
        return torch.sqrt((1 - t) ** 2 * self.sd**2 + t**2)

    def forward(self, x, s, t, cond=None):
        s, t = s.to(x.dtype), t.to(x.dtype)
        return expand_like(1 - t, x) * self.m + expand_like(self.std(t) / self.std(s), x) * (
            x - expand_like(1 - s, x) * self.m
        )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_sample_with_exact_map_draws_the_data(gamma):
    """Deterministic, CTM-gamma and consistency sampling with the exact map all end at N(m, sd^2 I);
    every intermediate state has the linear path's marginal at its time."""
    m, sd, n = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5, 20_000
    fm = _GaussianMap(m, sd)
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    states = {}
    grid = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    out = sample(
        fm,
        z,
        grid,
        gamma=gamma,
        generator=torch.Generator().manual_seed(1),
        callback=lambda i, t, x: states.update({float(t[0]): x}),
    )
    for tau, x in states.items():
        mean, std = (1 - tau) * m, math.sqrt((1 - tau) ** 2 * sd**2 + tau**2)
        assert (x.mean(0) - mean).abs().max().item() < 5 * std / math.sqrt(n), (gamma, tau)
        assert (x.std(0) - std).abs().max().item() < 5 * std / math.sqrt(2 * n), (gamma, tau)
    assert torch.equal(states[0.0], out)


def test_sample_errors():
    mix = preset_mixture("ring8")
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match="gamma must lie in"):
        sample(EulerFlowMap(mix), z, 2, gamma=1.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(EulerFlowMap(mix), z, torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="guidance was given"):
        sample(EulerFlowMap(mix), z, 2, guidance=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        sample(_student(), z, 2, cond=torch.zeros(4, dtype=torch.long))
