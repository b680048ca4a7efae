"""A denoising network trained on any affine path and prediction target, as a ``Teacher`` (``flowmap.teacher``):

    (x, t) on the net's path --net(x, t, t, cond)--> prediction --convert--> u = dx/dt on the path

The base class carries it onto the linear axis (from_linear / velocity_to_linear) and applies classifier-free
guidance (Ho & Salimans 2022, Eq. 6, written on velocities): v = v_u + w (v_c - v_u).
"""

from __future__ import annotations

from torch import Tensor, nn

from flowmap.paths import AffinePath, build_path
from flowmap.predictions import check_prediction, convert
from flowmap.teacher import Teacher, guided

__all__ = ["NetVelocity", "guided"]


class NetVelocity(Teacher):
    """Teacher from ``net(x, s, t, cond)`` trained on ``path`` to predict ``prediction``.

    The net is called with s = t (a teacher ignores the second time). x: (B, *data_shape), t: (B,)."""

    def __init__(self, net: nn.Module, path: AffinePath | dict | str = "linear", prediction: str = "velocity") -> None:
        super().__init__()
        self.net = net
        self.path = build_path(path)
        self.prediction = check_prediction(prediction)
        self.data_shape: tuple[int, ...] = tuple(getattr(net, "data_shape", ()))
        self.num_classes: int = int(getattr(net, "num_classes", 0))
        self.cond_kind: str = getattr(net, "cond_kind", "labels")

    def path_velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Velocity on the net's own path at its own time t."""
        pred = self.net(x, t, t, cond)
        return convert(pred, self.prediction, "velocity", x, t, self.path)
