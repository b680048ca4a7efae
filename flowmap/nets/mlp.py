"""Residual MLP for vectors (2-D toy data, low-dimensional mixtures): net(x, s, t, y, w) -> (B, D)."""

from __future__ import annotations

from torch import Tensor, nn

from flowmap.nets.embeddings import ConditionEmbedding


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


class MLP(nn.Module):
    """x: (B, dim) -> (B, dim). ``data_shape=(dim,)``."""

    def __init__(
        self,
        data_shape: tuple[int, ...] | list[int] = (2,),
        width: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        num_classes: int = 0,
        guidance_input: bool = False,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        data_shape = tuple(int(d) for d in data_shape)
        if len(data_shape) != 1:
            raise ValueError(f"the MLP takes vectors, data_shape must be (D,), got {data_shape}")
        self.config = {"name": "mlp", "data_shape": list(data_shape), "width": width, "depth": depth,
                       "emb_dim": emb_dim, "num_classes": num_classes, "guidance_input": guidance_input,
                       "time_scale": time_scale}
        self.data_shape = data_shape
        self.num_classes = int(num_classes)
        self.guidance_input = bool(guidance_input)
        dim = data_shape[0]
        self.cond = ConditionEmbedding(emb_dim, num_classes, guidance_input, time_scale=time_scale)
        self.inp = nn.Linear(dim, width)
        self.cond_in = nn.Linear(emb_dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, emb_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        self.act = nn.SiLU()

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        c = self.act(self.cond(s, t, cond, w))
        h = self.inp(x) + self.cond_in(c).to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)
