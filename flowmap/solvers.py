"""ODE solvers for a velocity field dx/dt = v(x, t) over any monotone time grid (plain functions,
k-diffusion style). Each call of ``teacher.velocity`` is one NFE.

    euler      x' = x + h v(x, t)                                            order 1
    midpoint   x' = x + h v(x + h/2 v(x, t), t + h/2)                       order 2
    heun       x' = x + h/2 (v(x, t) + v(x + h v(x, t), t + h))             order 2 (explicit trapezoidal
               rule, Heun's method; Hairer, Norsett & Wanner 1993, Sec. II.1), on the linear time axis
    rk4        classical Runge-Kutta                                        order 4
    dpm++2m    DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022b, Alg. 2), order 2, 1 NFE / step
    edm_heun   Karras et al. 2022 (EDM), Alg. 1: Heun in the VE variables (x, sigma), sigma = t / (1 - t),
               x = x_lin / (1 - t), with dx/dsigma = (x - D(x, sigma)) / sigma; no correction on the last
               step when it ends at sigma = 0 (2 N - 1 NFE). A grid starting at t = 1 starts at
               sigma_max = ``teacher.sigma_max`` (80 when the teacher has none) from x = sigma_max noise.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from flowmap.paths import LinearPath
from flowmap.time_grids import uniform_grid
from flowmap.types import Teacher, expand_like

Callback = Callable[[int, Tensor, Tensor], None]

NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "dpm++2m": 1, "edm_heun": 2}
EDM_SIGMA_MAX = 80.0  # Karras et al. 2022, Sec. 5


def _check_grid(grid: Tensor) -> Tensor:
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"a time grid must be 1-D with at least two times, got shape {tuple(grid.shape)}")
    if torch.any(grid < 0) or torch.any(grid > 1):
        raise ValueError("a time grid must lie in [0, 1] (t=1 noise, t=0 data)")
    d = grid[1:] - grid[:-1]
    if not (torch.all(d < 0) or torch.all(d > 0)):
        raise ValueError(f"a time grid must be strictly monotone, got {grid.tolist()}")
    return grid


def ode_step(
    method: str,
    f: Callable,
    x: Tensor,
    t: float | Tensor,
    h: float | Tensor,
    t_next: float | Tensor | None = None,
    hx: float | Tensor | None = None,
) -> Tensor:
    """One step of ``method`` (euler, midpoint, heun, rk4; table above) of dx/dt = f(x, t) from t to t + h.

    t, h: floats, or per-sample (B,) tensors with ``hx`` = h shaped to multiply x (B, 1, ...) (default h);
    t_next: the time the step ends at when the caller has it exactly (t + h may round differently)."""
    hx = h if hx is None else hx
    end = t + h if t_next is None else t_next
    if method == "euler":
        return x + hx * f(x, t)
    if method == "midpoint":
        return x + hx * f(x + 0.5 * hx * f(x, t), t + 0.5 * h)
    if method == "heun":
        k1 = f(x, t)
        k2 = f(x + hx * k1, end)
        return x + 0.5 * hx * (k1 + k2)
    if method == "rk4":
        k1 = f(x, t)
        k2 = f(x + 0.5 * hx * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * hx * k2, t + 0.5 * h)
        k4 = f(x + hx * k3, end)
        return x + hx / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"unknown solver {method!r}; choose from {sorted(NFE_PER_STEP)}")


def teacher_step(
    teacher: Teacher,
    x: Tensor,
    t: Tensor,
    r: Tensor,
    method: str = "heun",
    cond: Tensor | None = None,
    guidance: float | Tensor = 1.0,
) -> Tensor:
    """One ODE step of the teacher from per-sample times t to r ((B,) each) under no_grad, in x's dtype;
    guidance applies only with labels (``ode_step``; heun is Karras et al. 2022, Alg. 1, lines 5-8)."""
    g = guidance if cond is not None else 1.0

    def f(y: Tensor, tau: Tensor) -> Tensor:
        return teacher.velocity(y, tau, cond, guidance=g).to(x.dtype)

    with torch.no_grad():
        h = r - t
        return ode_step(method, f, x, t, h, t_next=r, hx=expand_like(h, x))


@torch.no_grad()
def solve(
    teacher: Teacher,
    x: Tensor,
    grid: Tensor | int = 32,
    method: str = "heun",
    cond: Tensor | None = None,
    guidance: float | Tensor = 1.0,
    callback: Callback | None = None,
) -> Tensor:
    """Integrate from grid[0] to grid[-1]. x: (B, *data_shape); grid: steps (uniform 1 -> 0) or a
    monotone (N + 1,) tensor; callback(i, t, x) after each step with t: (B,)."""
    if method not in NFE_PER_STEP:
        raise ValueError(f"unknown solver {method!r}; choose from {sorted(NFE_PER_STEP)}")
    grid = uniform_grid(grid) if isinstance(grid, int) else _check_grid(grid.detach().double().cpu())
    grid = grid.double().tolist()
    B = x.shape[0]

    def f(y: Tensor, tau: float) -> Tensor:
        tau = min(max(tau, 0.0), 1.0)
        return teacher.velocity(
            y,
            torch.full((B,), tau, device=y.device, dtype=torch.float32 if y.dtype != torch.float64 else y.dtype),
            cond,
            guidance,
        )

    if method == "dpm++2m":
        return _dpmpp_2m(f, x, grid, callback)
    if method == "edm_heun":
        return _edm_heun(f, x, grid, float(getattr(teacher, "sigma_max", EDM_SIGMA_MAX)), callback)
    for i in range(len(grid) - 1):
        x = ode_step(method, f, x, grid[i], grid[i + 1] - grid[i])
        if callback is not None:
            callback(i, torch.full((B,), grid[i + 1], device=x.device), x)
    return x


def _lam(t: float) -> float:
    """lambda(t) = log(alpha / sigma) = log((1 - t) / t) on the linear path (half the log-SNR)."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log((1 - t) / t)


def _dpmpp_2m(f: Callable[[Tensor, float], Tensor], x: Tensor, grid: list[float], callback: Callback | None) -> Tensor:
    """Lu et al. 2022b (DPM-Solver++), Alg. 2 on alpha = 1 - t, sigma = t, with data prediction
    x0_hat = x - t v. Update: x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
    D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}, r_i = h_{i-1} / h_i."""
    if grid[0] < grid[-1]:
        raise ValueError("dpm++2m integrates from noise to data: the grid must decrease")
    B = x.shape[0]
    prev_x0, prev_h = None, None
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        x0 = x - t * f(x, t)  # data prediction
        h = _lam(t_next) - _lam(t)
        if prev_x0 is None or not math.isfinite(prev_h) or not math.isfinite(h):
            D = x0
        else:
            r = prev_h / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
        ratio = t_next / t  # sigma_i / sigma_{i-1}
        exp_neg_h = 0.0 if t_next == 0.0 or t == 1.0 else LinearPath().ratio(t_next) * ((1 - t) / t)
        x = ratio * x - (1 - t_next) * (exp_neg_h - 1) * D
        prev_x0, prev_h = x0, h
        if callback is not None:
            callback(i, torch.full((B,), t_next, device=x.device), x)
    return x


def _edm_heun(
    f: Callable[[Tensor, float], Tensor], x: Tensor, grid: list[float], sigma_max: float, callback: Callback | None
) -> Tensor:
    """Karras et al. 2022, Alg. 1 (deterministic) with s(t) = 1, sigma(t) = t, in x_ve = x_lin / (1 - t).

    The denoiser of the linear-axis field is D = x_lin - t v(x_lin, t), so the EDM slope (x_ve - D) / sigma
    equals x_lin + (1 - t) v = the noise prediction. Returns x on the linear axis at grid[-1]."""
    if grid[0] < grid[-1]:
        raise ValueError("edm_heun integrates from noise to data: the grid must decrease")
    B = x.shape[0]

    def sigma_of(t: float) -> float:
        return sigma_max if t >= 1.0 else LinearPath().ratio(t)

    def slope(x_ve: Tensor, sigma: float) -> Tensor:  # d = (x - D(x; sigma)) / sigma, Alg. 1 lines 4 and 7
        t = LinearPath().t_from_ratio(sigma)
        x_lin = x_ve / (1.0 + sigma)
        return x_lin + (1.0 - t) * f(x_lin, t)

    sig = [sigma_of(t) for t in grid]
    x_ve = x * sigma_max if grid[0] >= 1.0 else x * (1.0 + sig[0])  # Alg. 1 line 2: x_0 ~ N(0, sigma_0^2 I)
    for i in range(len(grid) - 1):
        h = sig[i + 1] - sig[i]
        d = slope(x_ve, sig[i])
        x_next = x_ve + h * d  # Euler step, line 5
        if sig[i + 1] > 0.0:  # second-order correction, lines 6-8
            x_next = x_ve + h * 0.5 * (d + slope(x_next, sig[i + 1]))
        x_ve = x_next
        if callback is not None:
            callback(i, torch.full((B,), grid[i + 1], device=x.device), x_ve / (1.0 + sig[i + 1]))
    return x_ve / (1.0 + sig[-1])


def nfe(method: str, steps: int, ends_at_data: bool = False) -> int:
    """Number of velocity evaluations of ``solve(method, grid with steps)``; ``edm_heun`` saves one on a grid
    that ends at t = 0 (``ends_at_data``)."""
    return NFE_PER_STEP[method] * steps - int(method == "edm_heun" and ends_at_data)
