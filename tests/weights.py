"""Test helper: weights that make every input matter."""

from __future__ import annotations

import torch


def trained_like(net: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Give every weight (also the zero-initialized ones) a random offset, so the output depends on all inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net
