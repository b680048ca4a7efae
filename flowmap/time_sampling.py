"""Training-time distributions: small pure functions returning (B,) tensors in [0, 1].

Noise comes from torch's global RNG (or ``generator``), so Lightning's seeding makes them exact on resume."""

from __future__ import annotations

import torch
from torch import Tensor

from flowmap.paths import LinearPath


def uniform(
    batch: int,
    device: torch.device | str | None = None,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """t ~ U[t_min, t_max]."""
    return t_min + (t_max - t_min) * torch.rand(batch, device=device, generator=generator)


def logit_normal(
    batch: int,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """t = sigmoid(N(mean, std^2)) (Esser et al. 2024, Eq. 19)."""
    return torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))


def lognormal_sigma(
    batch: int,
    device: torch.device | str | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1), mapped to t = sigma / (1 + sigma)."""
    sigma = torch.exp(p_mean + p_std * torch.randn(batch, device=device, generator=generator))
    return LinearPath().t_from_ratio(sigma)


def sample_times(
    kind: str, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None, **kwargs
) -> Tensor:
    """One of ``uniform``, ``logit_normal``, ``lognormal`` by name."""
    fns = {"uniform": uniform, "logit_normal": logit_normal, "lognormal": lognormal_sigma}
    if kind not in fns:
        raise ValueError(f"unknown time distribution {kind!r}; choose from {sorted(fns)}")
    return fns[kind](batch, device=device, generator=generator, **kwargs)


TIME_KWARGS = {"logit_normal": ("mean", "std"), "lognormal": ("p_mean", "p_std"), "uniform": None}


def pair_kwargs(kind: str, mean: float, std: float) -> dict:
    """Keyword arguments of ``time_sampling.ordered_pair`` for the named time distribution."""
    if kind not in TIME_KWARGS:
        raise ValueError(f"unknown time distribution {kind!r}; choose from {sorted(TIME_KWARGS)}")
    names = TIME_KWARGS[kind]
    return {} if names is None else {names[0]: mean, names[1]: std}


def ordered_pair(
    batch: int,
    device: torch.device | str | None = None,
    kind: str = "logit_normal",
    equal_share: float = 0.25,
    generator: torch.Generator | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """(s, t) with 1 >= s >= t >= 0: two draws sorted, and a share ``equal_share`` with t = s
    (Geng et al. 2025, MeanFlow, Sec. 4.3 / Table 1a)."""
    a = sample_times(kind, batch, device, generator, **kwargs)
    b = sample_times(kind, batch, device, generator, **kwargs)
    s, t = torch.maximum(a, b), torch.minimum(a, b)
    equal = torch.rand(batch, device=device, generator=generator) < equal_share
    t = torch.where(equal, s, t)
    return s, t


def gap_pair(
    batch: int,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    equal_share: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(s, t) with 1 >= s >= t >= 0 drawn by their gap (Sabour et al. 2025, Align Your Flow, Alg. 1):
    s - t ~ sigmoid(N(mean, std^2)), t ~ U[0, 1 - gap]; a share ``equal_share`` with t = s."""
    gap = logit_normal(batch, device, mean, std, generator)
    t = (1 - gap) * torch.rand(batch, device=device, generator=generator)
    s = t + gap
    t = torch.where(torch.rand(batch, device=device, generator=generator) < equal_share, s, t)
    return s, t
