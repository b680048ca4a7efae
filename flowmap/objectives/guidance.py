"""Guidance-conditioned students: the shared checks and draws (issue 8, part 4).

A student built with ``guidance_input=True`` takes the CFG scale w like a time; trained against the
guided teacher velocity at w ~ U[guidance, guidance_max] it samples at any w in that range:

    v_w(x, t | c) = v_u + w (v_c - v_u) = w v_c + (1 - w) v_u          (Ho & Salimans 2022, Eq. 6)

Every objective takes its guidance from here: the config check (``check_guidance``), the per-example draw
(``draw_guidance``; ``guided_draw`` adds the call-time check that guidance needs a class-conditional teacher
and labels) and the teacher's guided velocity (``teacher_velocity``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap.conditions import TextCondition, as_condition
from flowmap.types import Teacher


def sample_guidance(
    batch: int, guidance_range: tuple[float, float], device: torch.device | str | None = None
) -> Tensor:
    """w ~ U[lo, hi] per example: (B,) float32."""
    lo, hi = float(guidance_range[0]), float(guidance_range[1])
    if not lo <= hi:
        raise ValueError(f"a guidance range needs lo <= hi, got {guidance_range}")
    return lo + (hi - lo) * torch.rand(batch, device=device)


def check_guidance(source: str, guidance: float, guidance_max: float | None) -> None:
    """Guidance is folded into a *teacher's* velocity; a range [guidance, guidance_max] needs a student
    that takes the scale as input (checked at call time)."""
    if guidance_max is not None and guidance_max < guidance:
        raise ValueError(f"guidance_max={guidance_max} must be >= guidance={guidance}")
    if source == "data" and (guidance != 1.0 or guidance_max is not None):
        raise ValueError("classifier-free guidance is folded into the target only when distilling (source='teacher')")


def draw_guidance(
    student: nn.Module, batch: int, device: torch.device, guidance: float, guidance_max: float | None
) -> tuple[Tensor | None, float | Tensor]:
    """(w fed to the student or None, w fed to the teacher).

    A student built with ``guidance_input`` is trained at w ~ U[guidance, guidance_max] (or w = guidance);
    otherwise the fixed scale is baked into the student and only the teacher sees it."""
    if getattr(student, "guidance_input", False):
        if guidance_max is None:  # one scale: the teacher gets a float (w = 1 skips its unconditional pass)
            return torch.full((batch,), guidance, device=device), guidance
        w = sample_guidance(batch, (guidance, guidance_max), device)
        return w, w
    if guidance_max is not None:
        raise ValueError("a guidance range (guidance_max) needs a student built with guidance_input=True")
    return None, guidance


def check_guided_setup(
    student: nn.Module, teacher: Teacher | None, cond: Tensor | None, guidance: float, guidance_max: float | None
) -> None:
    """One clear error when guidance cannot apply: a range needs a student with ``guidance_input``, and any
    guidance (w != 1 or a range) needs a class-conditional teacher and labels."""
    guided = guidance_max is not None or guidance != 1.0
    if not guided:
        return
    if guidance_max is not None and not getattr(student, "guidance_input", False):
        raise ValueError("a guidance range (guidance_max) needs a student built with guidance_input=True")
    text = isinstance(as_condition(cond), TextCondition)  # guided against the empty prompt (flowmap.conditions)
    if teacher is None or (int(getattr(teacher, "num_classes", 0)) == 0 and not text):
        raise ValueError(
            "classifier-free guidance needs a class-conditional teacher (num_classes > 0); this one is unconditional"
        )
    if cond is None:
        raise ValueError("classifier-free guidance needs class labels or a text condition (cond), got None")


def guided_draw(
    student: nn.Module,
    teacher: Teacher | None,
    cond: Tensor | None,
    batch: int,
    device: torch.device,
    guidance: float,
    guidance_max: float | None,
) -> tuple[Tensor | None, float | Tensor]:
    """(w for the student or None, w for the teacher) after ``check_guided_setup``."""
    check_guided_setup(student, teacher, cond, guidance, guidance_max)
    return draw_guidance(student, batch, device, guidance, guidance_max)


@torch.no_grad()
def teacher_velocity(teacher: Teacher, x: Tensor, t: Tensor, cond: Tensor | None, w: float | Tensor = 1.0) -> Tensor:
    """The teacher's guided velocity v_w(x, t | cond): (B, *data_shape), in x's dtype, no grad."""
    g = w if cond is not None else 1.0
    return teacher.velocity(x, t, cond, guidance=g).to(x.dtype)


__all__ = [
    "check_guidance",
    "check_guided_setup",
    "draw_guidance",
    "guided_draw",
    "sample_guidance",
    "teacher_velocity",
]
