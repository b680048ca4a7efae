"""scripts/diagnose_digits.py: the tangent probe separates a smooth velocity from one that ripples in time."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from diagnose_digits import tangent_probe  # noqa: E402


class Field(nn.Module):
    """v(x, s) = x (s + a sin(k s)): smooth for a = 0, a ripple of period 2 pi / k otherwise."""

    def __init__(self, a: float, k: float) -> None:
        super().__init__()
        self.a, self.k = a, k

    def velocity(self, x, s, cond=None):
        return x * (s + self.a * torch.sin(self.k * s)).view(-1, *([1] * (x.dim() - 1)))


def test_tangent_probe_jvp_matches_the_difference_for_a_smooth_field_and_exceeds_it_for_a_ripple():
    x0 = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(32, dtype=torch.long)
    smooth = tangent_probe(Field(0.0, 0.0), x0, y)
    for row in smooth.values():  # x (s^2 + 1) exactly: the central difference of a quadratic in h is exact
        assert abs(row["jvp"] - row["fd_0.01"]) <= 1e-3 * row["jvp"]
    rippled = tangent_probe(Field(0.01, 1000.0), x0, y)  # period 0.006, as a time_scale of 1000
    ratios = [row["jvp"] / row["fd_0.01"] for row in rippled.values()]
    assert max(ratios) > 3.0
