"""Sampling time grids: decreasing (N + 1,) tensors from t = 1 (noise) to t = 0 (data).

On the linear path the EDM noise level is the noise-to-signal ratio sigma = t / (1 - t) and the
log-SNR is lambda = 2 log((1 - t) / t) (Kingma et al. 2021). Grids built in sigma or lambda put
t_0 = 1 in place of sigma_max (the linear path reaches pure noise at t = 1) and t_N = 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowmap.paths import LinearPath


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a time grid needs at least one step, got {steps!r}")


def uniform_grid(steps: int, device: torch.device | str | None = None) -> Tensor:
    """t_i = 1 - i / N, i = 0..N."""
    _check_steps(steps)
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def edm_grid(
    steps: int,
    rho: float = 7.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    mapped to t = sigma / (1 + sigma), with t_0 = 1 and t_N = 0."""
    _check_steps(steps)
    if steps == 1:
        return torch.tensor([1.0, 0.0], device=device)
    i = torch.arange(steps, dtype=torch.float64)
    sig = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([LinearPath().t_from_ratio(sig), torch.zeros(1, dtype=torch.float64)])
    t[0] = 1.0
    return t.float().to(device)


def logsnr_grid(
    steps: int,
    lambda_min: float = -2 * math.log(80.0),
    lambda_max: float = -2 * math.log(0.002),
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform in lambda = 2 log((1 - t) / t) (Lu et al. 2022, DPM-Solver, Sec. 3.3), t_0 = 1, t_N = 0."""
    _check_steps(steps)
    lam = torch.linspace(lambda_min, lambda_max, steps + 1, dtype=torch.float64)
    t = torch.sigmoid(-lam / 2)  # (1 - t) / t = e^(lambda / 2)
    t[0], t[-1] = 1.0, 0.0
    return t.float().to(device)


GRIDS = {"uniform": uniform_grid, "edm": edm_grid, "logsnr": logsnr_grid}


def make_grid(kind: str, steps: int, device: torch.device | str | None = None, **kwargs) -> Tensor:
    """One of ``uniform``, ``edm``, ``logsnr`` by name."""
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; choose from {sorted(GRIDS)}")
    return GRIDS[kind](steps, device=device, **kwargs)
