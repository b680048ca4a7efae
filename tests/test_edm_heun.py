"""``solve(..., method="edm_heun")`` is Karras et al. 2022 (EDM), Algorithm 1, on an EDM denoiser wrapped by
teachers/edm.py: checked against a direct implementation of the algorithm in (x, sigma) written below."""

from __future__ import annotations

import torch
from torch import nn

from flowmap.solvers import nfe, solve
from teachers.edm import EDMDenoiserTeacher


class RawNet(nn.Module):
    """F(c_in x, c_noise) of EDM's preconditioning: a random MLP on (x, c_noise), float64."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([x, c_noise[:, None]], dim=1))


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM Eq. 5 with sigma_N = 0, float64 (N + 1,)."""
    i = torch.arange(n, dtype=torch.float64)
    sig = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def reference_algorithm_1(D, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Karras et al. 2022, Alg. 1 (deterministic sampler, s(t) = 1, sigma(t) = t), written from the paper."""
    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - D(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next != 0:
            d_prime = (x_next - D(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def test_edm_heun_is_algorithm_1_on_the_edm_wrapper():
    torch.manual_seed(0)
    teacher = EDMDenoiserTeacher(RawNet().double(), sigma_data=0.5, data_shape=(3,)).eval()
    noise = torch.randn(64, 3, dtype=torch.float64)
    sigmas = karras_sigmas(18)
    grid = sigmas / (1 + sigmas)
    grid[0] = 1.0  # our noise end; edm_heun starts it at teacher.sigma_max = 80 = sigmas[0]

    def D(x, s):
        return teacher.denoise(x, torch.full((x.shape[0],), s, dtype=x.dtype), None)

    with torch.no_grad():
        ref = reference_algorithm_1(D, noise, sigmas)
        lin_heun = solve(teacher, noise, grid, "heun")
        calls = []
        teacher.net.register_forward_pre_hook(lambda *a: calls.append(1))
        out = solve(teacher, noise, grid, "edm_heun")
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-5, rel
    assert len(calls) == nfe("edm_heun", 18, ends_at_data=True) == 35  # no correction on the last step onto sigma = 0
    # the linear-axis Heun is a different second-order method: far from Alg. 1 at 18 steps
    assert float((lin_heun - ref).norm() / ref.norm()) > 1e-3


def test_edm_heun_from_an_intermediate_time_converges_to_the_exact_gmm_map():
    from teachers.gmm import preset_mixture

    teacher = preset_mixture("ring8")
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.7
    s = 0.8
    exact = teacher.flow_map(
        x, torch.full((256,), s, dtype=torch.float64), torch.zeros(256, dtype=torch.float64), steps=500
    )
    errs = []
    for n in (8, 16):
        grid = torch.linspace(s, 0.0, n + 1, dtype=torch.float64)
        errs.append(float((solve(teacher, x, grid, "edm_heun") - exact).abs().max()))
    assert errs[1] < errs[0] / 3, errs  # second order away from the last (Euler) step
