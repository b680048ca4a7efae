"""A small UNet for images (Ho et al. 2020; Dhariwal & Nichol 2021 scale-shift conditioning):
net(x, s, t, y, w) -> (B, C, H, W). Attention blocks use ``flowmap.nets.attention`` so JVPs run."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from flowmap.nets.attention import attention
from flowmap.nets.backbone import Backbone


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 2:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.mod = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.mod(c).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (qkv[:, i].transpose(-2, -1) for i in range(3))  # (B, heads, HW, d)
        h = attention(q, k, v).transpose(-2, -1).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(Backbone):
    """x: (B, C, H, W) with H, W divisible by 2^(len(channel_mult) - 1)."""

    name = "unet"

    def __init__(
        self,
        data_shape: tuple[int, ...] | list[int] = (1, 8, 8),
        channels: int = 64,
        channel_mult: tuple[int, ...] | list[int] = (1, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] | list[int] = (4,),
        heads: int = 4,
        emb_dim: int = 256,
        dropout: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(locals())
        data_shape = self.data_shape
        if len(data_shape) != 3:
            raise ValueError(f"the UNet takes images, data_shape must be (C, H, W), got {data_shape}")
        C, H, W = data_shape
        if H % 2 ** (len(channel_mult) - 1) or W % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"image size {H}x{W} must be divisible by {2 ** (len(channel_mult) - 1)} "
                f"for channel_mult {list(channel_mult)}"
            )
        self.cond = self.condition_embedding(emb_dim)
        self.inp = nn.Conv2d(C, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [channels]
        ch, res = channels, H
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch, heads))
                self.down.append(blocks)
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch, heads), ResBlock(ch, ch, emb_dim, dropout)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch, heads))
                if level > 0 and i == num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(ch, ch, 3, padding=1))
                    res *= 2
                self.up.append(blocks)
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, C, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: Tensor, c: Tensor) -> Tensor:
        for b in blocks:
            h = b(h, c) if isinstance(b, ResBlock) else b(h)
        return h

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        c = F.silu(self.cond(s, t, cond, w))
        h = self.inp(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, c)
            hs.append(h)
        h = self._run(self.mid, h, c)
        for blocks in self.up:
            h = self._run(blocks, torch_cat(h, hs.pop()), c)
        return self.out(h)


def torch_cat(a: Tensor, b: Tensor) -> Tensor:
    import torch

    return torch.cat([a, b], dim=1)
