"""``Teacher``: the base class of every teacher type, a velocity field on the linear path's time axis.

A teacher type (a flowmap network, an EDM denoiser, a diffusers model, the analytic mixture) implements only what
is its own: ``path_velocity(x, t, cond)``, the velocity dx/dt on its own affine path ``self.path`` at its own time
t (Karras et al. 2022, Eq. 4: every such path is the linear one rescaled). The base owns the rest, written once:

    velocity(x_lin, t_lin, cond, w)                                    the public call (``flowmap.types.TeacherLike``)
      checks      x: (B, *data_shape), t: (B,) in [0, 1], cond: labels (B,) or a TextCondition of B rows
      guidance    v = v_u + w (v_c - v_u), v_u and v_c in ONE batched pass (Ho & Salimans 2022, Eq. 6), the
                  unconditional side being ``flowmap.conditions.uncond`` (the null label, or the empty prompt)
      path        (x, t) = from_linear(x_lin, t_lin)     x = (alpha + sigma) x_lin, sigma / alpha = t_lin / (1 - t_lin)
                  v_lin = to_linear(path_velocity(x, t), x, t, t_lin)   (``flowmap.paths.velocity_to_linear``)

A teacher type whose network is only defined on part of its path (EDM's [sigma_min, sigma_max], a DDPM's train
steps) says so in ``from_linear``, its time map; the conversion back is the base's, which gives the mapped point's
velocity. A type that carries its field on to the unclamped t_lin otherwise says how in ``to_linear`` (EDM above
sigma_max holds its x0 estimate: v_lin = (x_lin - x0) / t_lin).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap import conditions
from flowmap.paths import AffinePath, LinearPath, from_linear, velocity_to_linear
from flowmap.types import check_times, expand_like


def guided(v_uncond: Tensor, v_cond: Tensor, w: float | Tensor) -> Tensor:
    """v = v_u + w (v_c - v_u) (Ho & Salimans 2022, Eq. 6, on velocities); w: float, 0-dim or (B,) tensor."""
    if isinstance(w, Tensor) and w.dim() > 0:
        w = expand_like(w.reshape(-1).to(v_cond.device), v_cond)
    return v_uncond + w * (v_cond - v_uncond)


def is_unguided(guidance: float | Tensor) -> bool:
    """Whether ``guidance`` asks for the plain conditional velocity (the float 1; a tensor always guides)."""
    return not isinstance(guidance, Tensor) and float(guidance) == 1.0


class Teacher(nn.Module):
    """Base of every teacher type: subclasses set ``path``, ``data_shape``, ``num_classes`` (labels 0..n-1, the
    null label n) or ``cond_kind = "text"``, and implement ``path_velocity``.

    velocity(x (B, *data_shape), t (B,), cond, guidance) -> (B, *data_shape), on the linear path."""

    path: AffinePath = LinearPath()
    data_shape: tuple[int, ...] = ()
    num_classes: int = 0
    cond_kind: str = "labels"  # or "text": a TextCondition (prompt embeddings, ``flowmap.conditions``)

    # ---- what a teacher type implements -----------------------------------------------------------
    def path_velocity(self, x: Tensor, t: Tensor, cond: conditions.Condition) -> Tensor:
        """dx/dt on ``self.path`` at the path's own time t: x (B, *data_shape), t (B,) -> (B, *data_shape).
        ``cond`` None is the unconditional model."""
        raise NotImplementedError(f"{type(self).__name__} must implement path_velocity(x, t, cond)")

    def from_linear(self, x_lin: Tensor, t_lin: Tensor) -> tuple[Tensor, Tensor]:
        """(x_lin, t_lin) on the linear axis -> (x, t) on ``self.path`` (``flowmap.paths.from_linear``)."""
        return from_linear(x_lin, t_lin, self.path)

    # ---- what the base owns -------------------------------------------------------------------------
    def to_linear(self, v: Tensor, x: Tensor, t: Tensor, t_lin: Tensor) -> Tensor:
        """A velocity v on ``self.path`` at (x, t) = from_linear(x_lin, t_lin) -> the linear path's velocity at t_lin:
        ``flowmap.paths.velocity_to_linear``, the mapped point's velocity (t_lin (B,) is unused here; a time map that
        clamps may continue the field to it)."""
        return velocity_to_linear(v, x, t, self.path)

    def linear_velocity(self, x_lin: Tensor, t_lin: Tensor, cond: conditions.Condition) -> Tensor:
        """The unguided velocity on the linear axis, without checks (what a student built from the teacher calls)."""
        if isinstance(self.path, LinearPath):
            return self.path_velocity(x_lin, t_lin, cond)
        x, t = self.from_linear(x_lin, t_lin)
        return self.to_linear(self.path_velocity(x, t, cond), x, t, t_lin)

    def check_input(self, x: Tensor, t: Tensor, cond: conditions.Condition) -> None:
        """One clear error for x of another data shape, bad times, or a condition this teacher does not take."""
        if self.data_shape and tuple(x.shape[1:]) != tuple(self.data_shape):
            raise ValueError(
                f"x has shape {tuple(x.shape)}, the teacher expects (B, {', '.join(map(str, self.data_shape))})"
            )
        check_times(t, batch=x.shape[0])
        conditions.check(cond, x.shape[0], self.num_classes, text=self.cond_kind == "text")

    def velocity(
        self, x: Tensor, t: Tensor, cond: conditions.Condition = None, guidance: float | Tensor = 1.0
    ) -> Tensor:
        """v(x, t | cond) on the linear path, guided with scale w = ``guidance`` (w = 1: conditional, w = 0:
        unconditional). cond None: the unconditional velocity (any w)."""
        self.check_input(x, t, cond)
        if self.cond_kind == "text" and cond is not None:  # the teacher's empty prompt completes a record without one
            cond = conditions.as_condition(cond).with_null(getattr(self, "null_condition", None))
        if cond is None or is_unguided(guidance):
            if cond is None and not is_unguided(guidance) and self.num_classes == 0 and self.cond_kind != "text":
                raise ValueError("guidance needs a class-conditional teacher; this one has num_classes=0")
            return self.linear_velocity(x, t, cond)
        both = conditions.cat([conditions.uncond(cond, self.num_classes), cond])
        v_uncond, v_cond = self.linear_velocity(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return guided(v_uncond, v_cond, guidance)
