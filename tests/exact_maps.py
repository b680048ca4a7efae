"""Exact flow maps posing as students, and the shared ring8 reference, for the objective tests.

* ``ExactGMMMap``: the Gaussian-mixture teacher's exact flow map (float64 RK4) as a student: not
  differentiable by torch, so JVP losses use the ``fd`` backend on it.
* ``GaussianFlow``: data N(m, sigma0^2 I) on the linear path, a teacher whose flow map is closed-form and
  differentiable (``func`` backend). With sigma0 = 0 (a point mass) the conditional velocity eps - x0 equals
  the marginal one, so losses trained *from data* vanish at its exact map too.
* ``ring8_reference``: fixed noises and their exact 1-NFE targets X(z, 1, 0), computed once per process.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

from flowmap.types import expand_like


class _MapStudent(nn.Module):
    """Student interface around an exact map: forward = X(x, s, t), average_velocity = (X - x) / (t - s),
    and the instantaneous velocity at s = t."""

    guidance_input = False

    def flow(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        raise NotImplementedError

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float | Tensor = 1.0) -> Tensor:
        raise NotImplementedError

    def average_velocity(
        self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        gap = t - s
        moving = gap != 0
        safe = torch.where(moving, gap, torch.ones_like(gap))
        u = (self.flow(x, s, t, cond) - x) / expand_like(safe, x)
        return torch.where(expand_like(moving, x).bool(), u, self.velocity(x, s, cond))

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        return x + expand_like(t - s, x) * self.average_velocity(x, s, t, cond, w)


class ExactGMMMap(_MapStudent):
    def __init__(self, teacher: nn.Module, steps: int = 100) -> None:
        super().__init__()
        self.teacher = teacher
        self.steps = steps
        self.data_shape = tuple(teacher.data_shape)
        self.num_classes = teacher.num_classes

    def flow(self, x, s, t, cond):
        return self.teacher.flow_map(x, s, t, cond, steps=self.steps)

    def velocity(self, x, t, cond=None, guidance=1.0):
        return self.teacher.velocity(x, t, cond, guidance)


class GaussianFlow(_MapStudent):
    """x_t ~ N((1 - t) m, std_t^2 I), std_t = sqrt((1 - t)^2 sigma0^2 + t^2); the PF-ODE map is affine:
    X(x, s, t) = (1 - t) m + std_t / std_s (x - (1 - s) m)."""

    def __init__(self, mean: Tensor, sigma0: float) -> None:
        super().__init__()
        self.register_buffer("m", torch.as_tensor(mean))
        self.sigma0 = float(sigma0)
        self.data_shape = tuple(self.m.shape)
        self.num_classes = 0

    def std(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - t) ** 2 * self.sigma0**2 + t**2)

    def flow(self, x, s, t, cond=None):
        ratio = self.std(t) / self.std(s)
        return expand_like(1 - t, x) * self.m + expand_like(ratio, x) * (x - expand_like(1 - s, x) * self.m)

    def velocity(self, x, t, cond=None, guidance=1.0):
        d_std = (t - (1 - t) * self.sigma0**2) / self.std(t)
        return -self.m + expand_like(d_std / self.std(t), x) * (x - expand_like(1 - t, x) * self.m)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.m + self.sigma0 * torch.randn(n, *self.data_shape, generator=generator, dtype=self.m.dtype)


class PointMass(GaussianFlow):
    """Data = the single point m (``GaussianFlow`` with sigma0 = 0): every trajectory is a straight line,
    X(x, s, t) = m + (t / s)(x - m), so Euler and Heun steps are exact and the conditional velocity eps - x0 is the
    marginal one. Every method's loss vanishes at this map, distilled or trained from data. The velocity (x - m) / t
    is undefined at t = 0, where all trajectories meet: a teacher queried there returns NaN (objectives mask and
    count those rows); the diagonal u(x, 0, 0) is multiplied by t - s = 0 in X, so it is taken as 0."""

    def __init__(self, mean: Tensor) -> None:
        super().__init__(mean, 0.0)

    def average_velocity(
        self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        u = super().average_velocity(x, s, t, cond, w)
        return torch.where(expand_like((s == 0) & (t == 0), x).bool(), torch.zeros_like(u), u)


class NaNRows(nn.Module):
    """A teacher whose velocity is NaN in the first ``rows`` rows of every call."""

    def __init__(self, teacher: nn.Module, rows: int = 3) -> None:
        super().__init__()
        self.teacher = teacher
        self.rows = rows
        self.data_shape = teacher.data_shape
        self.num_classes = teacher.num_classes

    def velocity(self, x, t, cond=None, guidance=1.0):
        v = self.teacher.velocity(x, t, cond, guidance).clone()
        v[: self.rows] = float("nan")
        return v


@functools.lru_cache(maxsize=None)
def ring8_reference(n: int = 1000, steps: int = 100) -> tuple[Tensor, Tensor]:
    """(z, X(z, 1, 0)) for n fixed standard-normal noises on the ring8 mixture (computed once per process)."""
    from teachers import preset_mixture

    teacher = preset_mixture("ring8")
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1234))
    return z, teacher.flow_map(z, torch.ones(n), torch.zeros(n), steps=steps).float()


@contextlib.contextmanager
def one_thread():
    """Train with one intra-op thread (xdist runs two workers on two cores), restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_on_ring8(
    student: nn.Module,
    objective: nn.Module,
    steps: int,
    lr: float = 1e-3,
    lr_final: float | None = None,
    batch: int = 256,
    ema_decay: float = 0.995,
    source: str = "teacher",
) -> nn.Module:
    """``flowmap.training.fit`` on ring8 samples (teacher = the exact mixture); returns the evaluation EMA of
    the student (the weights DistillModule exports)."""
    from flowmap.ema import ema_update, frozen_copy
    from flowmap.training import fit
    from teachers import preset_mixture

    teacher = preset_mixture("ring8")
    pool = teacher.sample(100_000, generator=torch.Generator().manual_seed(5))
    ema = frozen_copy(student)
    with one_thread():
        fit(
            student,
            objective,
            lambda step: (pool[torch.randint(0, len(pool), (batch,))], None),
            steps,
            teacher=teacher if source == "teacher" else None,
            lr=lr,
            lr_final=lr_final,
            callback=lambda step, out: ema_update(ema, student, ema_decay),
        )
    return ema


def one_step_run(
    student: nn.Module, objective: nn.Module, steps: int, **train_kwargs
) -> tuple[float, float, float, float]:
    """Train ``student`` with ``objective`` on ring8 (``train_on_ring8``); returns (untrained 1-NFE error, trained
    (EMA) 1-NFE error, the exact teacher's own 2-step Euler error, seconds of training)."""
    import time

    from flowmap.metrics import flow_map_rmse
    from flowmap.solvers import solve
    from teachers import preset_mixture

    z, ref = ring8_reference()
    euler2 = flow_map_rmse(solve(preset_mixture("ring8"), z, 2, "euler"), ref)
    before = one_step_error(student)
    t0 = time.time()
    ema = train_on_ring8(student, objective, steps, **train_kwargs)
    return before, one_step_error(ema), euler2, time.time() - t0


def one_step_error(flow_map: nn.Module, n: int = 1000) -> float:
    """RMSE of the 1-NFE map X(z, 1, 0) against the exact ring8 map."""
    from flowmap.metrics import flow_map_rmse

    z, ref = ring8_reference(n)
    with torch.no_grad():
        return flow_map_rmse(flow_map(z, torch.ones(n), torch.zeros(n)), ref)


def assert_fd64_matches_func(student: nn.Module, config: dict, teacher: nn.Module, x0: torch.Tensor) -> None:
    """A JVP objective built from ``config`` gives the same per-sample loss (same draws) with ``jvp_backend: func``,
    with ``forward_ad`` and with float64 finite differences (``jvp_backend: fd, fd_dtype: float64``), and the float32
    student comes back bit-identical from the promoted tangent pass."""
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # wake the zero-initialized layers
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    from flowmap.objectives import build_objective

    losses = {}
    for key, backend, fd_dtype in (
        ("forward_ad", "forward_ad", None),
        ("func", "func", None),
        ("fd64", "fd", "float64"),
    ):
        torch.manual_seed(5)
        obj = build_objective({**config, "jvp_backend": backend, "fd_dtype": fd_dtype})
        losses[key] = obj(student=student, teacher=teacher, target=None, x0=x0, cond=None, step=0).loss.detach()
    assert all(torch.equal(v, weights[k]) and v.dtype == weights[k].dtype for k, v in student.state_dict().items())
    torch.testing.assert_close(losses["fd64"], losses["func"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["forward_ad"], losses["func"], rtol=1e-5, atol=1e-7)
