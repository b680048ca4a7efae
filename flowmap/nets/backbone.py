"""What every flowmap backbone records about itself (``flowmap.nets.MLP``, ``UNet``, ``DiT``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from flowmap.nets.embeddings import ConditionEmbedding


def conditioning(num_classes: int = 0, guidance_input: bool = False, time_scale: float = 10.0) -> dict[str, Any]:
    """What every backbone is conditioned on (one home for these options): labels (``num_classes``, 0 = none), a
    guidance-scale input, and the time embedding's frequency scale (``ConditionEmbedding``)."""
    return dict(locals())


class Backbone(nn.Module):
    """A backbone ``net(x, s, t, cond=None, w=None) -> (B, *data_shape)`` that knows how it was built.

    A subclass sets ``name``, takes its own arguments and ``**kwargs`` (the ``conditioning`` options), and opens its
    ``__init__`` with ``super().__init__(locals())``; this keeps ``data_shape`` (a tuple of ints), ``num_classes``,
    ``guidance_input``, ``time_scale`` and ``config``: the registry ``name`` and every argument of ``signature()``,
    sequences as lists (JSON-able), so ``flowmap.nets.build_net(net.config)`` builds the same net again."""

    name: str = "backbone"

    def __init__(self, args: Mapping[str, Any]) -> None:
        super().__init__()
        given = dict(args.get("kwargs") or {})
        unknown = sorted(set(given) - set(inspect.signature(conditioning).parameters))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) {unknown}")
        values = {**args, **conditioning(**given)}
        self.data_shape = tuple(int(d) for d in values["data_shape"])
        self.num_classes = int(values["num_classes"])
        self.guidance_input = bool(values["guidance_input"])
        self.time_scale = float(values["time_scale"])
        names = type(self).signature().parameters
        self.config = {"name": self.name, **{k: _json(values[k]) for k in names}, "data_shape": list(self.data_shape)}

    @classmethod
    def signature(cls) -> inspect.Signature:
        """The net's options: its own ``__init__``'s, then ``conditioning``'s."""
        own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        own = [p for p in own if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        return inspect.Signature(own + list(inspect.signature(conditioning).parameters.values()))

    def condition_embedding(self, dim: int) -> ConditionEmbedding:
        """The (s, t, label, guidance) embedding of width ``dim`` for this net's conditioning."""
        return ConditionEmbedding(dim, self.num_classes, self.guidance_input, time_scale=self.time_scale)


def options(cls: type) -> inspect.Signature:
    """The keyword options of a net class (``Backbone.signature``, else its ``__init__``'s without ``self``)."""
    if isinstance(cls, type) and issubclass(cls, Backbone):
        return cls.signature()
    params = inspect.signature(cls.__init__).parameters
    return inspect.Signature([p for k, p in params.items() if k != "self"])


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value
