"""Training-time distributions: small pure functions returning (B,) tensors in [0, 1].

Noise comes from torch's global RNG (or ``generator``), so Lightning's seeding makes them exact on resume."""

from __future__ import annotations

from dataclasses import dataclass

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


def lognormal(
    batch: int,
    device: torch.device | str | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """sigma = exp(N(P_mean, P_std^2)): an EDM noise level (Karras et al. 2022, Table 1), in ``dtype``."""
    return torch.exp(p_mean + p_std * torch.randn(batch, device=device, generator=generator, dtype=dtype))


def lognormal_sigma(
    batch: int,
    device: torch.device | str | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ln sigma ~ N(P_mean, P_std^2) (``lognormal``) mapped to t = sigma / (1 + sigma)."""
    return LinearPath().t_from_ratio(lognormal(batch, device, p_mean, p_std, generator))


def sample_times(
    kind: str, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None, **kwargs
) -> Tensor:
    """One of ``uniform``, ``logit_normal``, ``lognormal`` by name."""
    fns = {"uniform": uniform, "logit_normal": logit_normal, "lognormal": lognormal_sigma}
    if kind not in fns:
        raise ValueError(f"unknown time distribution {kind!r}; choose from {sorted(fns)}")
    return fns[kind](batch, device=device, generator=generator, **kwargs)


TIME_KWARGS = {"logit_normal": ("mean", "std"), "lognormal": ("p_mean", "p_std"), "uniform": None}


def ordered_pair(
    batch: int,
    device: torch.device | str | None = None,
    kind: str = "logit_normal",
    generator: torch.Generator | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """(s, t) with 1 >= s >= t >= 0: two draws of ``kind``, sorted."""
    a = sample_times(kind, batch, device, generator, **kwargs)
    b = sample_times(kind, batch, device, generator, **kwargs)
    return torch.maximum(a, b), torch.minimum(a, b)


def gap_pair(
    batch: int,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(s, t) with 1 >= s >= t >= 0 drawn by their gap (Sabour et al. 2025, Align Your Flow, Alg. 1):
    s - t ~ sigmoid(N(mean, std^2)), t ~ U[0, 1 - gap]."""
    gap = logit_normal(batch, device, mean, std, generator)
    t = (1 - gap) * torch.rand(batch, device=device, generator=generator)
    return t + gap, t


GAP = "gap_logit_normal"  # ``gap_pair``: the pair drawn by its gap, not as two sorted times
PAIR_KINDS = (*TIME_KWARGS, GAP)


def moving_rows(batch: int, equal_share: float) -> int:
    """n: rows [0, n) of an ``equal_tail`` pair draw have s != t, rows [n, B) have s = t."""
    return batch - round(batch * equal_share)


def equal_tail(s: Tensor, t: Tensor, equal_share: float) -> Tensor:
    """t with t = s on the last round(B * equal_share) rows (MeanFlow's share of pairs with s = t, Geng et al. 2025,
    Sec. 4.3, as a fixed count): the rows with s != t are then the static slice [:moving_rows(B, equal_share)], so an
    objective that spends a JVP on those rows only selects them without reading a mask on the host."""
    n = moving_rows(s.shape[0], equal_share)
    return torch.cat([t[:n], s[n:]])


def fd_clamp(s: Tensor, t: Tensor, h: float, s_low: int = 1, t_low: int = 0, gap: int = 0) -> tuple[Tensor, Tensor]:
    """Times a central difference of step h perturbs, kept inside [0, 1] and ordered: s in [s_low h, 1 - h],
    t in [t_low h, s - gap h] (margins in units of h)."""
    s = s.clamp(s_low * h, 1.0 - h)
    t = torch.minimum(t, s - gap * h) if gap else torch.minimum(t, s)
    return s, (t.clamp(min=t_low * h) if t_low else t)


@dataclass(frozen=True)
class PairSampler:
    """The (s, t) law of a flow-map objective, 1 >= s >= t >= 0 (B,) each: two sorted draws of ``kind``
    (``uniform``, ``logit_normal`` (mean, std), ``lognormal`` (P_mean, P_std)) or ``gap_logit_normal``
    (``gap_pair``). The share of pairs with s = t is the objective's (``equal_tail``), applied after its clamps."""

    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PAIR_KINDS:
            raise ValueError(f"unknown time distribution {self.kind!r}; choose from {sorted(PAIR_KINDS)}")

    @property
    def single_kind(self) -> str:
        """The law of one time: ``kind``, or for ``gap_logit_normal`` the logit-normal law of its gap."""
        return "logit_normal" if self.kind == GAP else self.kind

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of ``sample_times`` for ``single_kind``."""
        names = TIME_KWARGS[self.single_kind]
        return {} if names is None else {names[0]: self.mean, names[1]: self.std}

    def pair(self, batch: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(s, t), s >= t."""
        if self.kind == GAP:
            return gap_pair(batch, device, self.mean, self.std)
        return ordered_pair(batch, device, self.kind, **self.kwargs)

    def single(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """One time per row from ``single_kind``."""
        return sample_times(self.single_kind, batch, device, **self.kwargs)
