"""Affine noising paths x_t = alpha(t) x0 + sigma(t) eps and the change of path onto the linear one.

Every path here is a frozen dataclass giving alpha, sigma and their time derivatives for t in [0, 1]
(t = 0 data, t = 1 noise). The change of path (e.g. Lipman et al. 2024, "Flow Matching Guide and
Code", Sec. 4.8; Karras et al. 2022, Eq. 4) rescales any affine path onto the linear one:

    x_lin = x / (alpha + sigma),        t_lin = sigma / (alpha + sigma)

so a student trained on the linear time axis never needs to know its teacher's path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowmap.types import expand_like


@dataclass(frozen=True)
class AffinePath:
    """Base class: subclasses define alpha, sigma, d_alpha, d_sigma for t: (B,) -> (B,)."""

    name: str = field(default="affine", init=False)

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def ratio(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio r(t) = sigma / alpha, increasing in t."""
        return self.sigma(t) / self.alpha(t)

    def t_from_ratio(self, r: Tensor) -> Tensor:
        """Inverse of ratio(t) by bisection in float64 (subclasses override with closed forms)."""
        r64 = r.double()
        lo = torch.zeros_like(r64)
        hi = torch.ones_like(r64)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self.ratio(mid) < r64
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(r.dtype)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2) (Kingma et al. 2021)."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def to_config(self) -> dict:
        cfg = {k: getattr(self, k) for k, f in self.__dataclass_fields__.items() if f.init}
        return {"name": self.name, **cfg}

    def sample(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps."""
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * eps

    def conditional_velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """d x_t / dt = alpha'(t) x0 + sigma'(t) eps."""
        return expand_like(self.d_alpha(t), x0) * x0 + expand_like(self.d_sigma(t), x0) * eps


@dataclass(frozen=True)
class LinearPath(AffinePath):
    """Rectified flow / conditional OT (Liu et al. 2022; Lipman et al. 2023): alpha = 1 - t, sigma = t."""

    name: str = field(default="linear", init=False)

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def ratio(self, t: Tensor | float) -> Tensor | float:
        """r = t / (1 - t): the EDM noise level sigma of time t (tensors or floats; t = 1 -> inf)."""
        return t / (1.0 - t)

    def t_from_ratio(self, r: Tensor | float) -> Tensor | float:
        """t = r / (1 + r): the time of noise level r (tensors or floats; the inverse of ``ratio``)."""
        return r / (1.0 + r)


@dataclass(frozen=True)
class TrigFlowPath(AffinePath):
    """TrigFlow (Lu & Song 2024, Sec. 3) with data scale sigma_d in data units: alpha = cos(theta),
    sigma = sigma_d sin(theta), theta = pi t / 2 for the path time t in [0, 1]."""

    sigma_data: float = 1.0
    name: str = field(default="trigflow", init=False)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_data * torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * self.sigma_data * torch.cos(0.5 * math.pi * t)

    def t_from_ratio(self, r: Tensor) -> Tensor:
        return torch.atan(r / self.sigma_data) * (2.0 / math.pi)


@dataclass(frozen=True)
class CosinePath(TrigFlowPath):
    """Cosine path (Nichol & Dhariwal 2021): alpha = cos(pi t / 2), sigma = sin(pi t / 2), TrigFlow at sigma_d = 1."""

    sigma_data: float = field(default=1.0, init=False)
    name: str = field(default="cosine", init=False)


@dataclass(frozen=True)
class VPPath(AffinePath):
    """Continuous variance-preserving path (Song et al. 2021, Eq. 33): alpha = exp(-B(t)/2),
    sigma = sqrt(1 - alpha^2), B(t) = beta_min t + (beta_max - beta_min) t^2 / 2."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name: str = field(default="vp", init=False)

    def _B(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _beta(self, t: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._B(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._B(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * self._beta(t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        # d/dt sqrt(1 - e^{-B}) = beta e^{-B} / (2 sigma)
        return 0.5 * self._beta(t) * torch.exp(-self._B(t)) / self.sigma(t).clamp_min(1e-20)

    def t_from_ratio(self, r: Tensor) -> Tensor:
        # r^2 = e^{B} - 1  =>  B = log(1 + r^2); solve the quadratic for t.
        B = torch.log1p(r**2)
        a = 0.5 * (self.beta_max - self.beta_min)
        b = self.beta_min
        if a == 0:
            return (B / b).clamp(0, 1)
        return ((-b + torch.sqrt(b * b + 4 * a * B)) / (2 * a)).clamp(0, 1)


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, schedule: str = "linear"
) -> list[float]:
    """alpha_bar_k = prod_{i<=k} (1 - beta_i) (Ho et al. 2020, Eq. 4; "scaled_linear" as in Stable Diffusion)."""
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown DDPM beta schedule {schedule!r} (linear, scaled_linear)")
    return torch.cumprod(1.0 - betas, 0).tolist()


@dataclass(frozen=True)
class DiscreteVPPath(AffinePath):
    """The discrete DDPM schedule on t in [0, 1]: step k (0-based) sits at t_k = (k + 1) / N and
    alpha_bar(0) = 1; log alpha_bar is interpolated linearly in t between steps (Ho et al. 2020).

    ``alphas_cumprod`` is a tuple of N floats (e.g. ``ddpm_alphas_cumprod()`` or a diffusers scheduler's)."""

    alphas_cumprod: tuple[float, ...] = ()
    name: str = field(default="vp_discrete", init=False)

    def __post_init__(self) -> None:
        if len(self.alphas_cumprod) < 2:
            raise ValueError("DiscreteVPPath needs at least two alphas_cumprod values")
        object.__setattr__(self, "alphas_cumprod", tuple(float(a) for a in self.alphas_cumprod))

    @property
    def num_steps(self) -> int:
        return len(self.alphas_cumprod)

    def _table(self, t: Tensor) -> Tensor:
        return torch.log(torch.tensor((1.0, *self.alphas_cumprod), dtype=torch.float64, device=t.device))

    def _log_abar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(log alpha_bar(t), d/dt log alpha_bar(t)), piecewise linear on the grid k / N."""
        table = self._table(t)
        n = self.num_steps
        pos = (t.double() * n).clamp(0, n)
        k = pos.floor().clamp(max=n - 1).long()
        frac = pos - k
        lo, hi = table[k], table[k + 1]
        value = lo + frac * (hi - lo)
        slope = (hi - lo) * n
        return value.to(t.dtype), slope.to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._log_abar(t)[0])

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._log_abar(t)[0]))

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self._log_abar(t)[1] * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        log_abar, slope = self._log_abar(t)
        return -0.5 * slope * torch.exp(log_abar) / self.sigma(t).clamp_min(1e-20)

    def t_of_step(self, k: Tensor) -> Tensor:
        """Time of the 0-based DDPM step index k."""
        return (k.double() + 1.0) / self.num_steps


@dataclass(frozen=True)
class VEPath(AffinePath):
    """Variance-exploding / EDM path (Song et al. 2021; Karras et al. 2022): alpha = 1, sigma = sigma_max t.

    On the linear axis it covers t_lin in [0, sigma_max / (1 + sigma_max)], so t_lin = 1 lies beyond it."""

    sigma_max: float = 80.0
    name: str = field(default="ve", init=False)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_max * t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.sigma_max)

    def t_from_ratio(self, r: Tensor) -> Tensor:
        return (r / self.sigma_max).clamp(0, 1)


PATHS: dict[str, type[AffinePath]] = {
    "linear": LinearPath,
    "cosine": CosinePath,
    "trigflow": TrigFlowPath,
    "vp": VPPath,
    "vp_discrete": DiscreteVPPath,
    "ve": VEPath,
    "edm": VEPath,
}


def build_path(config: dict | str | AffinePath) -> AffinePath:
    """A path from its name or ``to_config()`` dict; one clear error for an unknown name or key."""
    if isinstance(config, AffinePath):
        return config
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = config.pop("name", None)
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; choose from {sorted(PATHS)}")
    cls = PATHS[name]
    allowed = {k for k, f in cls.__dataclass_fields__.items() if f.init}
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} for path {name!r}; allowed: {sorted(allowed)}")
    return cls(**config)


# --- change of path onto the linear path --------------------------------------------------------


def to_linear(x: Tensor, t: Tensor, path: AffinePath) -> tuple[Tensor, Tensor]:
    """(x, t) on ``path`` -> (x_lin, t_lin): x_lin = x / (alpha + sigma), t_lin = sigma / (alpha + sigma)."""
    a, s = path.alpha(t), path.sigma(t)
    return x / expand_like(a + s, x), s / (a + s)


def from_linear(x_lin: Tensor, t_lin: Tensor, path: AffinePath) -> tuple[Tensor, Tensor]:
    """(x_lin, t_lin) -> (x, t) on ``path``: t solves sigma/alpha = t_lin / (1 - t_lin), x = (alpha + sigma) x_lin."""
    r = t_lin / (1.0 - t_lin).clamp_min(1e-12)
    t = path.t_from_ratio(r)
    a, s = path.alpha(t), path.sigma(t)
    return x_lin * expand_like(a + s, x_lin), t


def velocity_to_linear(v: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
    """Velocity on ``path`` at (x, t) -> velocity on the linear path at to_linear(x, t).

    From x_lin = x / (alpha + sigma) and t_lin = sigma / (alpha + sigma):
        v_lin = [(alpha + sigma) v - (alpha' + sigma') x] / (sigma' alpha - sigma alpha')."""
    a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
    return (expand_like(a + s, x) * v - expand_like(da + ds, x) * x) / expand_like(ds * a - s * da, x)


def velocity_from_linear(v_lin: Tensor, x_lin: Tensor, t: Tensor, path: AffinePath) -> Tensor:
    """Inverse of ``velocity_to_linear``; ``t`` is the time on ``path`` (not t_lin):
    v = [(sigma' alpha - sigma alpha') v_lin + (alpha' + sigma') (alpha + sigma) x_lin] / (alpha + sigma)."""
    a, s, da, ds = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
    x = x_lin * expand_like(a + s, x_lin)
    return (expand_like(ds * a - s * da, x_lin) * v_lin + expand_like(da + ds, x_lin) * x) / expand_like(a + s, x_lin)
