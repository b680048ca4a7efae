"""A denoising network trained on any affine path and prediction target, seen as a velocity field on
the linear path's time axis (the ``Teacher`` protocol), with classifier-free guidance.

    (x_lin, t_lin) --from_linear--> (x, t) --net--> prediction --convert--> u on the path
    --velocity_to_linear--> v_lin

Guidance (Ho & Salimans 2022, Eq. 6, written on velocities): v = v_u + w (v_c - v_u).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.paths import AffinePath, LinearPath, build_path, from_linear, velocity_to_linear
from flowmap.predictions import check_prediction, convert
from flowmap.types import check_labels, check_times, expand_like, null_label


def guided(v_uncond: Tensor, v_cond: Tensor, w: float | Tensor) -> Tensor:
    """v = v_u + w (v_c - v_u) (Ho & Salimans 2022); w: float or (B,)."""
    if isinstance(w, Tensor) and w.dim() > 0:
        w = expand_like(w, v_cond)
    return v_uncond + w * (v_cond - v_uncond)


class NetVelocity(nn.Module):
    """Teacher from ``net(x, s, t, cond)`` trained on ``path`` to predict ``prediction``.

    The net is called with s = t (a teacher ignores the second time). x: (B, *data_shape), t: (B,)."""

    def __init__(self, net: nn.Module, path: AffinePath | dict | str = "linear", prediction: str = "velocity") -> None:
        super().__init__()
        self.net = net
        self.path = build_path(path)
        self.prediction = check_prediction(prediction)
        self.data_shape: tuple[int, ...] = tuple(getattr(net, "data_shape", ()))
        self.num_classes: int = int(getattr(net, "num_classes", 0))

    def path_velocity(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Velocity on the net's own path at its own time t."""
        pred = self.net(x, t, t, cond)
        return convert(pred, self.prediction, "velocity", x, t, self.path)

    def linear_velocity(self, x_lin: Tensor, t_lin: Tensor, cond: Tensor | None) -> Tensor:
        if isinstance(self.path, LinearPath):
            return self.path_velocity(x_lin, t_lin, cond)
        x, t = from_linear(x_lin, t_lin, self.path)
        return velocity_to_linear(self.path_velocity(x, t, cond), x, t, self.path)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float | Tensor = 1.0) -> Tensor:
        if self.data_shape and tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, the teacher expects (B, {', '.join(map(str, self.data_shape))})"
            )
        check_times(t, batch=x.shape[0])
        check_labels(cond, self.num_classes, x.shape[0])
        unguided = not isinstance(guidance, Tensor) and float(guidance) == 1.0
        if cond is None or unguided:
            if cond is None and not unguided and self.num_classes == 0:
                raise ValueError("guidance needs a class-conditional teacher; this one has num_classes=0")
            return self.linear_velocity(x, t, cond)
        null = torch.full_like(cond, null_label(self.num_classes))
        v = self.linear_velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond]))
        v_uncond, v_cond = v.chunk(2)
        return guided(v_uncond, v_cond, guidance)
