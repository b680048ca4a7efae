"""Small pieces shared by the flow-map objectives of "Flow-map students II" (MeanFlow, shortcut, sCM):
where the instantaneous velocity comes from (teacher or data), classifier-free guidance folded into a
distillation target, and the times' dtype. No equations of a method live here.

    from data:     v = eps - x0                                  (conditional velocity, linear path)
    distilled:     v = v_u + w (v_c - v_u) = w v_c + (1 - w) v_u   (teacher velocity, Ho & Salimans 2022, Eq. 6)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.types import Teacher

SOURCES = ("teacher", "data")


def check_source(source: str) -> str:
    """``"teacher"`` (distillation: teacher velocity) or ``"data"`` (conditional velocity eps - x0)."""
    if source not in SOURCES:
        raise ValueError(f"unknown velocity source {source!r}; choose 'teacher' (distill) or 'data' (train from data)")
    return source


def check_guidance(source: str, guidance: float, guidance_max: float | None) -> None:
    """Guidance is folded into a *teacher's* velocity; a range [guidance, guidance_max] needs a student
    that takes the scale as input (checked at call time)."""
    if guidance_max is not None and guidance_max < guidance:
        raise ValueError(f"guidance_max={guidance_max} must be >= guidance={guidance}")
    if source == "data" and (guidance != 1.0 or guidance_max is not None):
        raise ValueError("classifier-free guidance is folded into the target only when distilling (source='teacher')")


def draw_guidance(student: nn.Module, batch: int, device: torch.device, guidance: float, guidance_max: float | None) -> tuple[Tensor | None, float | Tensor]:
    """(w fed to the student or None, w fed to the teacher).

    A student built with ``guidance_input`` is trained at w ~ U[guidance, guidance_max] (or w = guidance);
    otherwise the fixed scale is baked into the student and only the teacher sees it."""
    if getattr(student, "guidance_input", False):
        if guidance_max is None:  # one scale: the teacher gets a float (w = 1 skips its unconditional pass)
            return torch.full((batch,), guidance, device=device), guidance
        w = guidance + (guidance_max - guidance) * torch.rand(batch, device=device)
        return w, w
    if guidance_max is not None:
        raise ValueError("a guidance range (guidance_max) needs a student built with guidance_input=True")
    return None, guidance


@torch.no_grad()
def instantaneous_velocity(
    source: str,
    teacher: Teacher | None,
    x_t: Tensor,
    t: Tensor,
    x0: Tensor | None,
    eps: Tensor | None,
    cond: Tensor | None,
    guidance: float | Tensor = 1.0,
) -> Tensor:
    """v(x_t, t) on the linear path: the teacher's (guided) velocity, or eps - x0 from data. (B, *data_shape)."""
    if source == "data":
        if x0 is None or eps is None:
            raise ValueError("the conditional velocity eps - x0 needs x0 and eps")
        return eps - x0
    if teacher is None:
        raise ValueError("this objective distills a teacher (source='teacher'), but teacher is None")
    g = guidance if cond is not None else 1.0  # guidance needs labels; without them v_c = v_u
    return teacher.velocity(x_t, t, cond, guidance=g).to(x_t.dtype)


def times_like(tau: Tensor, x: Tensor) -> Tensor:
    """Times follow the data's floating dtype (float64 data -> float64 times), at least float32."""
    return tau.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
