"""Toy 2-D data sets as pure functions ``sample_<name>(n, generator=None) -> (n, 2) float32``.

Every set is centred at the origin and scaled so that E||x||^2 = 2, i.e. the per-coordinate variance
averages to 1 (the same scale as the N(0, I) noise at t = 1). The normalizing constants below are
computed in closed form from each set's natural coordinates; the tests check them by Monte Carlo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def _check_n(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"the number of samples must be a non-negative int, got {n!r}")
    return n


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    """(n,) uniform on [0, 1) in float64."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _randn(*shape: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _randint(high: int, n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, high, (n,), generator=generator)


# --- checkerboard -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkerboard:
    """A ``cells x cells`` board on [-half_width, half_width]^2; cell (i, j) (column i, row j, counted
    from the lower-left corner) is occupied when i + j is even, so 8 of the 16 cells of the standard
    4 x 4 board used in flow-matching papers (FFJORD, Grathwohl et al. 2019; Lipman et al. 2023) are.

    half_width = sqrt(3) makes the uniform law on the board have per-coordinate variance a^2 / 3 = 1."""

    cells: int = 4
    half_width: float = math.sqrt(3.0)

    @property
    def side(self) -> float:
        """Side length of one cell."""
        return 2.0 * self.half_width / self.cells

    def cell_index(self, x: Tensor) -> Tensor:
        """(n, 2) points -> (n, 2) long (column i, row j); -1 outside the board."""
        ij = torch.floor((x.double() + self.half_width) / self.side).long()
        inside = ((ij >= 0) & (ij < self.cells)).all(dim=-1, keepdim=True)
        return torch.where(inside, ij, torch.full_like(ij, -1))

    def occupied(self, x: Tensor) -> Tensor:
        """(n, 2) points -> (n,) bool: the point lies in an occupied cell."""
        ij = self.cell_index(x)
        inside = ij[:, 0] >= 0
        return inside & ((ij[:, 0] + ij[:, 1]) % 2 == 0)

    def occupied_cells(self) -> list[tuple[int, int]]:
        """The occupied (column, row) pairs."""
        return [(i, j) for i in range(self.cells) for j in range(self.cells) if (i + j) % 2 == 0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, 2) uniform on the occupied cells."""
        n = _check_n(n)
        cells = torch.tensor(self.occupied_cells(), dtype=torch.float64)
        ij = cells[_randint(len(cells), n, generator)]
        u = _rand(2 * n, generator).reshape(n, 2).clamp(1e-6, 1.0 - 1e-6)  # float32 rounding stays inside the cell
        return (-self.half_width + (ij + u) * self.side).float()


CHECKERBOARD = Checkerboard()


def sample_checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) uniform on the 8 occupied cells of ``CHECKERBOARD`` (per-coordinate variance 1)."""
    return CHECKERBOARD.sample(n, generator)


# --- eight Gaussians ----------------------------------------------------------------------------

EIGHT_GAUSSIANS_STD = 0.1
# per-coordinate variance R^2 E[cos^2] + s^2 = R^2 / 2 + s^2 = 1
EIGHT_GAUSSIANS_RADIUS = math.sqrt(2.0 * (1.0 - EIGHT_GAUSSIANS_STD**2))


def eight_gaussians_centers() -> Tensor:
    """(8, 2) float32 centres at angles k pi / 4 on the circle of radius ``EIGHT_GAUSSIANS_RADIUS``."""
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return (EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)).float()


def sample_eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) equal mixture of 8 isotropic Gaussians (std 0.1) on a circle (per-coordinate variance 1)."""
    n = _check_n(n)
    k = _randint(8, n, generator)
    centers = eight_gaussians_centers().double()
    return (centers[k] + EIGHT_GAUSSIANS_STD * _randn(n, 2, generator=generator)).float()


# --- two moons ----------------------------------------------------------------------------------

TWO_MOONS_NOISE = 0.05
# natural coordinates (as sklearn.datasets.make_moons): upper (cos a, sin a), lower (1 - cos a, 1/2 - sin a),
# a ~ U(0, pi).  Mean (1/2, 1/4); Var[x] = 3/4, Var[y] = 9/16 - 1/pi; plus noise variance in each coordinate.
_MOONS_MEAN = (0.5, 0.25)
_MOONS_TOTAL_VAR = 0.75 + 0.5625 - 1.0 / math.pi + 2 * TWO_MOONS_NOISE**2
_MOONS_SCALE = math.sqrt(2.0 / _MOONS_TOTAL_VAR)


def sample_two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) two interleaved half circles with Gaussian noise, centred, E||x||^2 = 2."""
    n = _check_n(n)
    a = math.pi * _rand(n, generator)
    lower = _randint(2, n, generator).bool()
    x = torch.where(lower, 1.0 - torch.cos(a), torch.cos(a))
    y = torch.where(lower, 0.5 - torch.sin(a), torch.sin(a))
    pts = torch.stack([x - _MOONS_MEAN[0], y - _MOONS_MEAN[1]], dim=1)
    pts = pts + TWO_MOONS_NOISE * _randn(n, 2, generator=generator)
    return (_MOONS_SCALE * pts).float()


# --- two spirals --------------------------------------------------------------------------------

SPIRALS_TURNS = 1.5
SPIRALS_NOISE = 0.03
# natural coordinates: r = sqrt(u) in [0, 1], angle 2 pi turns r; arm 2 = -arm 1.  E[r^2] = 1/2.
_SPIRALS_SCALE = math.sqrt(2.0 / (0.5 + 2 * SPIRALS_NOISE**2))


def sample_spirals(n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) two interleaved spirals (1.5 turns each, point-symmetric), centred, E||x||^2 = 2."""
    n = _check_n(n)
    r = torch.sqrt(_rand(n, generator))
    angle = 2.0 * math.pi * SPIRALS_TURNS * r
    arm = 1.0 - 2.0 * _randint(2, n, generator).double()  # +1 or -1
    pts = (arm * r)[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    pts = pts + SPIRALS_NOISE * _randn(n, 2, generator=generator)
    return (_SPIRALS_SCALE * pts).float()


# --- concentric rings ---------------------------------------------------------------------------

RINGS_RADII = (1.0, 2.0, 3.0, 4.0)
RINGS_NOISE = 0.08
# natural coordinates: ring k (equal weights) of radius R_k; E||x||^2 = mean(R_k^2) + 2 noise^2
_RINGS_SCALE = math.sqrt(2.0 / (sum(r * r for r in RINGS_RADII) / len(RINGS_RADII) + 2 * RINGS_NOISE**2))


def sample_rings(n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) four concentric circles (radii 1:2:3:4, equal weights) with noise, E||x||^2 = 2."""
    n = _check_n(n)
    radii = torch.tensor(RINGS_RADII, dtype=torch.float64)
    k = _randint(len(RINGS_RADII), n, generator)
    angle = 2.0 * math.pi * _rand(n, generator)
    pts = radii[k][:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    pts = pts + RINGS_NOISE * _randn(n, 2, generator=generator)
    return (_RINGS_SCALE * pts).float()


# --- lookup -------------------------------------------------------------------------------------

TOY_SETS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "checkerboard": sample_checkerboard,
    "eight_gaussians": sample_eight_gaussians,
    "two_moons": sample_two_moons,
    "spirals": sample_spirals,
    "rings": sample_rings,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) float32 samples of the toy set ``name``; one clear error for an unknown name."""
    if name not in TOY_SETS:
        raise ValueError(f"unknown toy data set {name!r}; known: {sorted(TOY_SETS)}")
    return TOY_SETS[name](n, generator)
