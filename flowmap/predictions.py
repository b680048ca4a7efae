"""Conversions between the five prediction targets on an affine path x_t = alpha x0 + sigma eps.

Every prediction is turned into the pair (x0, eps) and back; each formula is written once:

- ``eps``      : eps                                           (Ho et al. 2020, Eq. 11)
- ``x0``       : x0 ("sample" in diffusers)                     (Ho et al. 2020; Karras et al. 2022)
- ``v``        : v = alpha eps - sigma x0                        (Salimans & Ho 2022, Sec. 4, App. D)
- ``velocity`` : u = alpha' x0 + sigma' eps = d x_t / dt          (Lipman et al. 2023; Liu et al. 2022)
- ``score``    : grad log p_t(x) = -eps / sigma                  (Song et al. 2021, via Tweedie / Eq. 7 of Vincent 2011)
"""

from __future__ import annotations

from torch import Tensor

from flowmap.paths import AffinePath
from flowmap.types import expand_like

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")


def _coeffs(path: AffinePath, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        expand_like(path.alpha(t), x),
        expand_like(path.sigma(t), x),
        expand_like(path.d_alpha(t), x),
        expand_like(path.d_sigma(t), x),
    )


def check_prediction(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}; choose from {list(PREDICTIONS)}")
    return kind


def to_x0_eps(pred: Tensor, kind: str, x: Tensor, t: Tensor, path: AffinePath) -> tuple[Tensor, Tensor]:
    """Prediction of type ``kind`` at (x, t) -> (x0, eps)."""
    check_prediction(kind)
    a, s, da, ds = _coeffs(path, t, x)
    if kind == "eps":
        eps = pred
        x0 = (x - s * eps) / a
    elif kind == "x0":
        x0 = pred
        eps = (x - a * x0) / s
    elif kind == "v":
        # v = a eps - s x0 and x = a x0 + s eps  =>  x0 = (a x - s v) / (a^2 + s^2), eps = (s x + a v) / (a^2 + s^2)
        norm = a * a + s * s
        x0 = (a * x - s * pred) / norm
        eps = (s * x + a * pred) / norm
    elif kind == "velocity":
        # u = a' x0 + s' eps and x = a x0 + s eps: solve the 2x2 system (det = a s' - s a')
        det = a * ds - s * da
        x0 = (ds * x - s * pred) / det
        eps = (a * pred - da * x) / det
    else:  # score
        eps = -s * pred
        x0 = (x - s * eps) / a
    return x0, eps


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
    """(x0, eps) at (x, t) -> prediction of type ``kind``."""
    check_prediction(kind)
    a, s, da, ds = _coeffs(path, t, x)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "velocity":
        return da * x0 + ds * eps
    return -eps / s  # score


def convert(pred: Tensor, src: str, dst: str, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
    """Prediction of type ``src`` -> type ``dst`` at (x, t) on ``path``."""
    if src == dst:
        check_prediction(src)
        return pred
    x0, eps = to_x0_eps(pred, src, x, t, path)
    return from_x0_eps(x0, eps, dst, x, t, path)
