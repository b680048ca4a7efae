"""Diffusion Transformer (Peebles & Xie 2023) from timm blocks with adaLN-Zero conditioning:
net(x, s, t, y, w) -> (B, C, H, W). Attention goes through ``flowmap.nets.attention`` so the fused
kernel is kept for the forward and JVPs use the closed-form rule."""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import Tensor, nn

from flowmap.nets.attention import attention
from flowmap.nets.backbone import Backbone


class JVPAttention(Attention):
    """timm's multi-head self-attention with ``flowmap.nets.attention`` as the kernel (no masks, no dropout)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("JVPAttention does not take masks")
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        h = attention(q, k, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(self.norm(h))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """x + gate * Attn(adaLN(x)); x + gate * MLP(adaLN(x)) with (shift, scale, gate) from the condition (zero-init)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = JVPAttention(dim, num_heads=heads, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).to(x.dtype).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


def _sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine positional embedding (grid^2, dim)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    out = [f(pos.reshape(-1)[:, None] * omega[None]) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()


class DiT(Backbone):
    """x: (B, C, H, W), H = W divisible by ``patch``."""

    name = "dit"

    def __init__(
        self,
        data_shape: tuple[int, ...] | list[int] = (1, 8, 8),
        patch: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        **kwargs,
    ) -> None:
        super().__init__(locals())
        data_shape = self.data_shape
        if len(data_shape) != 3 or data_shape[1] != data_shape[2] or data_shape[1] % patch:
            raise ValueError(
                f"the DiT takes square images with side divisible by patch={patch}, got data_shape {data_shape}"
            )
        if dim % 4 or dim % heads:
            raise ValueError(f"DiT dim={dim} must be divisible by 4 and by heads={heads}")
        C, H, _ = data_shape
        self.patch, self.grid = patch, H // patch
        self.embed = PatchEmbed(img_size=H, patch_size=patch, in_chans=C, embed_dim=dim)
        self.register_buffer("pos", _sincos_2d(dim, self.grid)[None], persistent=False)
        self.cond = self.condition_embedding(dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, patch * patch * C)
        for layer in (self.ada[-1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        c = self.cond(s, t, cond, w)
        h = self.embed(x) + self.pos.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c).to(h.dtype).chunk(2, dim=1)
        h = self.head(_modulate(self.norm(h), shift, scale))  # (B, grid^2, p*p*C)
        p, g = self.patch, self.grid
        return h.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
