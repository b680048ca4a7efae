"""One sampler for every flow map: multistep jumps over a time grid from 1 to 0, with optional
stochastic re-noising between steps.

gamma = 0 is deterministic multistep flow-map sampling; gamma = 1 is multistep consistency sampling
(Song et al. 2023, Alg. 1: jump to 0, re-noise to the next time); 0 < gamma < 1 is CTM's
gamma-sampling (Kim et al. 2023, Alg. 1): jump to the time whose noise-to-signal ratio is
sqrt(1 - gamma^2) times the next one's, then re-noise. On the linear path the noise-to-signal
ratio is r = t / (1 - t) and re-noising from r' to r is x_r / (1 - t) = x_r' / (1 - t') + sqrt(r^2 - r'^2) z.

Which gamma suits a student is its method's knowledge: ``Objective.sampler_gamma`` (flowmap.objectives), written
into the student file at export and used by ``load_student(...).sample``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowmap.conditions import Condition
from flowmap.paths import LinearPath
from flowmap.time_grids import uniform_grid
from flowmap.types import FlowMapLike


def check_grid(grid: Tensor) -> Tensor:
    """A grid must be 1-D, inside [0, 1] and strictly decreasing (noise to data)."""
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"a time grid must be 1-D with at least two times, got shape {tuple(grid.shape)}")
    if torch.any(grid < 0) or torch.any(grid > 1):
        raise ValueError("a time grid must lie in [0, 1] (t=1 noise, t=0 data)")
    if not torch.all(grid[1:] < grid[:-1]):
        raise ValueError(f"a time grid must be strictly decreasing from noise to data, got {grid.tolist()}")
    return grid


def _renoise(x_hat: Tensor, t_hat: Tensor, t_next: Tensor, z: Tensor) -> Tensor:
    """x at t_hat -> x at t_next >= t_hat by the forward kernel of the linear path."""
    r_hat, r_next = LinearPath().ratio(t_hat), LinearPath().ratio(t_next)
    return (1 - t_next) * (x_hat / (1 - t_hat) + torch.sqrt((r_next**2 - r_hat**2).clamp_min(0)) * z)


@torch.no_grad()
def sample(
    flow_map: FlowMapLike,
    noise: Tensor,
    grid: Tensor | int = 1,
    cond: Condition = None,
    gamma: float = 0.0,
    guidance: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Multistep flow-map sampling; NFE = len(grid) - 1.

    noise: (B, *data_shape) at t = 1; grid: steps (int, uniform) or a decreasing (K + 1,) tensor;
    cond: (B,) labels, a ``TextCondition`` (``flowmap.conditions``; passed to every jump unchanged) or None;
    guidance: scale w fed to students built to take it;
    callback(i, t, x) is called after each step with the state at time t."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    grid = uniform_grid(grid, noise.device) if isinstance(grid, int) else check_grid(grid.to(noise.device))
    x = noise
    B = x.shape[0]
    kwargs = {}
    if guidance is not None:
        if not getattr(flow_map, "guidance_input", False):
            raise ValueError("guidance was given to a flow map that was not trained to take a guidance scale")
        w = guidance if isinstance(guidance, Tensor) else torch.tensor(float(guidance))
        kwargs["w"] = w.to(noise.device, torch.float32).expand(B) if w.dim() == 0 else w.to(noise.device, torch.float32)
    times = grid.tolist()  # one host read per call, not one per step
    for i in range(len(grid) - 1):
        t_cur, t_next = times[i], times[i + 1]
        last = i == len(grid) - 2
        t_hat = t_next if (gamma == 0.0 or last) else _ctm_time(t_next, gamma)
        s_vec = torch.full((B,), t_cur, device=x.device, dtype=torch.float32)
        t_vec = torch.full((B,), t_hat, device=x.device, dtype=torch.float32)
        x = flow_map(x, s_vec, t_vec, cond, **kwargs)
        if t_hat < t_next:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = _renoise(x, torch.tensor(t_hat, dtype=x.dtype), torch.tensor(t_next, dtype=x.dtype), z)
        if callback is not None:
            callback(i, torch.full((B,), t_next, device=x.device), x)
    return x


def _ctm_time(t_next: float, gamma: float) -> float:
    """t' with noise-to-signal ratio r' = sqrt(1 - gamma^2) r(t_next)."""
    r = LinearPath().ratio(t_next) * (1 - gamma**2) ** 0.5
    return LinearPath().t_from_ratio(r)
