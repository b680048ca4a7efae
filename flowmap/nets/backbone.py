"""What every flowmap backbone records about itself (``flowmap.nets.MLP``, ``UNet``, ``DiT``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn


class Backbone(nn.Module):
    """A backbone ``net(x, s, t, cond=None, w=None) -> (B, *data_shape)`` that knows how it was built.

    A subclass sets ``name`` and opens its ``__init__`` with ``super().__init__(locals())``; this keeps
    ``data_shape`` (a tuple of ints), ``num_classes``, ``guidance_input`` and ``config``: the registry ``name`` and
    every argument of the subclass's ``__init__`` in signature order, sequences as lists (JSON-able), so
    ``flowmap.nets.build_net(net.config)`` builds the same net again."""

    name: str = "backbone"

    def __init__(self, args: Mapping[str, Any]) -> None:
        super().__init__()
        self.data_shape = tuple(int(d) for d in args["data_shape"])
        self.num_classes = int(args["num_classes"])
        self.guidance_input = bool(args["guidance_input"])
        names = [k for k in inspect.signature(type(self).__init__).parameters if k != "self"]
        self.config = {"name": self.name, **{k: _json(args[k]) for k in names}, "data_shape": list(self.data_shape)}


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value
