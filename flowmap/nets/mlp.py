"""Residual MLP for vectors (2-D toy data, low-dimensional mixtures): net(x, s, t, y, w) -> (B, D).

Optional Fourier features of the input (Tancik et al. 2020, "Fourier Features Let Networks Learn High
Frequency Functions in Low Dimensional Domains"; the octave form of Mildenhall et al. 2020, Eq. 4):

    gamma(x) = [x, sin(2^k w0 x), cos(2^k w0 x)  for k = 0 .. K - 1]   (per coordinate)

A plain MLP on (x, t) learns the sharp edges of densities like the checkerboard slowly (spectral bias);
with K = 4 octaves from w0 = pi / sqrt(3) (longest period 2 sqrt(3), the width of a unit-variance
checkerboard) a 128 x 3 teacher puts 0.94 of its 64-step samples on occupied cells instead of 0.87
(4000 steps, one seed; measured for the benchmark).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowmap.nets.backbone import Backbone


class ResidualBlock(nn.Module):
    """h + Linear(SiLU(Linear(LayerNorm(h) * (1 + scale) + shift))) with (scale, shift) from the condition."""

    def __init__(self, width: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(cond_dim, 2 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.mod(c).to(h.dtype).chunk(2, dim=1)
        return h + self.fc2(self.act(self.fc1(self.norm(h) * (1 + scale) + shift)))


class MLP(Backbone):
    """x: (B, dim) -> (B, dim). ``data_shape=(dim,)``."""

    name = "mlp"

    def __init__(
        self,
        data_shape: tuple[int, ...] | list[int] = (2,),
        width: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        fourier_features: int = 0,
        fourier_scale: float = math.pi / math.sqrt(3.0),
        **kwargs,
    ) -> None:
        super().__init__(locals())
        data_shape = self.data_shape
        if len(data_shape) != 1:
            raise ValueError(f"the MLP takes vectors, data_shape must be (D,), got {data_shape}")
        if isinstance(fourier_features, bool) or int(fourier_features) != fourier_features or fourier_features < 0:
            raise ValueError(f"fourier_features (octaves) must be an int >= 0, got {fourier_features!r}")
        if not fourier_scale > 0:
            raise ValueError(f"fourier_scale (the lowest angular frequency) must be positive, got {fourier_scale}")
        if fourier_features:  # recorded only when used, so configs of nets without features stay as they were
            self.config.update(fourier_features=int(fourier_features), fourier_scale=float(fourier_scale))
        else:
            del self.config["fourier_features"], self.config["fourier_scale"]
        dim = data_shape[0]
        self.register_buffer(
            "freqs",
            float(fourier_scale) * 2.0 ** torch.arange(int(fourier_features), dtype=torch.float32),
            persistent=False,
        )
        self.cond = self.condition_embedding(emb_dim)
        self.inp = nn.Linear(dim * (1 + 2 * int(fourier_features)), width)
        self.cond_in = nn.Linear(emb_dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, emb_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        self.act = nn.SiLU()

    def features(self, x: Tensor) -> Tensor:
        """(B, D) -> (B, D (1 + 2K)): x, then the sines and cosines of each octave (``x`` itself when K = 0)."""
        if self.freqs.numel() == 0:
            return x
        a = (x[:, :, None] * self.freqs.to(x.dtype)).flatten(1)  # (B, D K)
        return torch.cat([x, torch.sin(a), torch.cos(a)], dim=1)

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        c = self.act(self.cond(s, t, cond, w))
        h = self.inp(self.features(x)) + self.cond_in(c).to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)
