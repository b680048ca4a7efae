"""Training-time distributions: the laws of one time (``LAWS``, drawn by ``draw``), the (s, t) pairs of a flow-map
objective (``PairSampler``) and the EDM noise level (``lognormal``), as (B,) tensors.

Noise comes from torch's global RNG, so Lightning's seeding makes them exact on resume."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowmap.paths import LinearPath


def lognormal(
    batch: int,
    device: torch.device | str | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """sigma = exp(N(P_mean, P_std^2)): an EDM noise level (Karras et al. 2022, Table 1), in ``dtype``."""
    return torch.exp(p_mean + p_std * torch.randn(batch, device=device, dtype=dtype))


# The laws of one time t in [0, 1] by name: (the standard draw z, t as a function of z and the law's (mean, std)).
LAWS = {
    "uniform": (torch.rand, lambda z, mean, std: z),  # t ~ U[0, 1]; takes no parameters
    "logit_normal": (torch.randn, lambda z, mean, std: torch.sigmoid(mean + std * z)),  # Esser et al. 2024, Eq. 19
    "lognormal": (torch.randn, lambda z, mean, std: LinearPath().t_from_ratio(torch.exp(mean + std * z))),
}  # lognormal: the EDM noise level sigma = exp(N(mean, std^2)) (``lognormal``) mapped to t = sigma / (1 + sigma)


def draw(
    kind: str, batch: int, device: torch.device | str | None = None, mean: float = 0.0, std: float = 1.0
) -> Tensor:
    """t (B,) from the law ``kind`` of ``LAWS`` with parameters (mean, std)."""
    if kind not in LAWS:
        raise ValueError(f"unknown time distribution {kind!r}; choose from {sorted(LAWS)}")
    standard, law = LAWS[kind]
    return law(standard(batch, device=device), mean, std)


GAP = "gap_logit_normal"  # the pair drawn by its gap, not as two sorted times
PAIR_KINDS = (*LAWS, GAP)


def moving_rows(batch: int, equal_share: float) -> int:
    """n: rows [0, n) of an ``equal_tail`` pair draw have s != t, rows [n, B) have s = t."""
    return batch - round(batch * equal_share)


def equal_tail(s: Tensor, t: Tensor, equal_share: float) -> Tensor:
    """t with t = s on the last round(B * equal_share) rows (MeanFlow's share of pairs with s = t, Geng et al. 2025,
    Sec. 4.3, as a fixed count): the rows with s != t are then the static slice [:moving_rows(B, equal_share)], so an
    objective that spends a JVP on those rows only selects them without reading a mask on the host."""
    n = moving_rows(s.shape[0], equal_share)
    return torch.cat([t[:n], s[n:]])


def end_rows(batch: int, end_share: float) -> int:
    """k: rows [0, k) of an ``end_head`` pair draw jump to the data, t = 0."""
    return round(batch * end_share)


def end_head(t: Tensor, end_share: float) -> Tensor:
    """t with t = 0 on the first round(B * end_share) rows: a fixed share of the pairs trains the jump to the data
    itself (s, 0), which a law of two sorted draws reaches with density ~0 at the long gaps the 1-step sampler asks for
    (CTM's rows ending at the data, ``flowmap.objectives.ctm``, for every pair law)."""
    k = end_rows(t.shape[0], end_share)
    return torch.cat([torch.zeros_like(t[:k]), t[k:]]) if k else t


def fd_clamp(s: Tensor, t: Tensor, h: float, s_low: int = 1, t_low: int = 0, gap: int = 0) -> tuple[Tensor, Tensor]:
    """Times a central difference of step h perturbs, kept inside [0, 1] and ordered: s in [s_low h, 1 - h],
    t in [t_low h, s - gap h] (margins in units of h)."""
    s = s.clamp(s_low * h, 1.0 - h)
    t = torch.minimum(t, s - gap * h) if gap else torch.minimum(t, s)
    return s, (t.clamp(min=t_low * h) if t_low else t)


@dataclass(frozen=True)
class PairSampler:
    """The (s, t) law of a flow-map objective, 1 >= s >= t >= 0 (B,) each: two sorted draws of ``kind``
    (``uniform``, ``logit_normal`` (mean, std), ``lognormal`` (P_mean, P_std): ``LAWS``) or ``gap_logit_normal``
    (drawn by the gap). The shares of pairs ending at the data (``end_head``) and with s = t (``equal_tail``) are the
    objective's, applied around its clamps."""

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

    def pair(self, batch: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(s, t), s >= t: two sorted draws of ``kind``, or for ``gap_logit_normal`` drawn by their gap (Sabour et
        al. 2025, Align Your Flow, Alg. 1): s - t ~ sigmoid(N(mean, std^2)), t ~ U[0, 1 - gap]."""
        if self.kind == GAP:
            gap = self.single(batch, device)
            t = (1 - gap) * torch.rand(batch, device=device)
            return t + gap, t
        a, b = self.single(batch, device), self.single(batch, device)
        return torch.maximum(a, b), torch.minimum(a, b)

    def single(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """One time per row from ``single_kind``."""
        return draw(self.single_kind, batch, device, self.mean, self.std)
