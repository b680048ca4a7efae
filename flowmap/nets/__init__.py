"""Raw backbones ``net(x, s, t, cond=None, w=None) -> (B, *data_shape)`` and their registry.

Every net has ``.config`` (JSON-able, with its ``name``), ``.data_shape``, ``.num_classes`` and
``.guidance_input``; ``build_net(net.config)`` rebuilds it."""

from __future__ import annotations

from torch import nn

from flowmap.nets.backbone import options
from flowmap.nets.diffusers_net import DiffusersStudentNet
from flowmap.nets.dit import DiT
from flowmap.nets.mlp import MLP
from flowmap.nets.unet import UNet

NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet, "dit": DiT, "diffusers": DiffusersStudentNet}


def build_net(config: dict) -> nn.Module:
    """Build a net from ``{"name": ..., **kwargs}``; unknown names or arguments raise one clear error."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"a net config must be a dict with a 'name' (one of {sorted(NETS)}), got {config!r}")
    config = dict(config)
    name = config.pop("name")
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; choose from {sorted(NETS)}")
    cls = NETS[name]
    allowed = set(options(cls).parameters)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for net {name!r}; allowed: {sorted(allowed)}")
    return cls(**config)


__all__ = ["DiT", "DiffusersStudentNet", "MLP", "NETS", "UNet", "build_net"]
