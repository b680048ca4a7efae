"""Small pieces shared by the flow-map objectives: where the instantaneous velocity comes from (teacher or
data), and the times' dtype (classifier-free guidance: ``flowmap.objectives.guidance``). No equations of a
method live here.

    from data:     v = eps - x0                                  (conditional velocity, linear path)
                   v ~ E[eps - x0 | x_t] over the batch            (``stable_target``, Xu et al. 2023; ``"stf"``)
    distilled:     v = v_u + w (v_c - v_u) = w v_c + (1 - w) v_u   (teacher velocity, Ho & Salimans 2022, Eq. 6)
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowmap.conditions import Condition, drop, matches
from flowmap.objectives.guidance import teacher_velocity
from flowmap.types import Teacher, expand_like

SOURCES = ("teacher", "data")
SOLVERS = ("euler", "heun")  # the teacher ODE steps of the consistency family (``flowmap.solvers.teacher_step``)
DATA_VELOCITIES = ("conditional", "stf")  # a from-data velocity: eps - x0, or its batch-posterior estimate


def take(value, rows: slice):
    """``value[rows]`` for a per-row tensor or condition, None stays None: the one place objectives select rows
    of the (otherwise opaque) condition."""
    return None if value is None else value[rows]


def check_solver(solver: str) -> str:
    """``"heun"`` or ``"euler"``: the teacher's ODE step (``flowmap.solvers.teacher_step``)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown teacher step {solver!r}; choose from {list(SOLVERS)}")
    return solver


def check_source(source: str) -> str:
    """``"teacher"`` (distillation: teacher velocity) or ``"data"`` (conditional velocity eps - x0)."""
    if source not in SOURCES:
        raise ValueError(f"unknown velocity source {source!r}; choose 'teacher' (distill) or 'data' (train from data)")
    return source


def check_data_velocity(value: str, key: str = "data_velocity", source: str = "data") -> str:
    """``"conditional"`` (eps - x0) or ``"stf"`` (``stable_target``); ``key`` names the config key in the error.
    A from-data velocity other than the conditional one is refused when the method distills (``source="teacher"``)."""
    if value not in DATA_VELOCITIES:
        raise ValueError(f"unknown {key} {value!r}; choose from {list(DATA_VELOCITIES)}")
    if source == "teacher" and value != "conditional":
        raise ValueError(f"{key} applies to training from data (source='data'), not to distillation")
    return value


def check_velocity_from(value: str, key: str, source: str) -> str:
    """``"student"`` (a self-referential target takes the student's own diagonal velocity) or ``"teacher"`` (the
    teacher's velocity instead, which needs ``source="teacher"``); ``key`` names the config key in the error."""
    if value not in ("student", "teacher"):
        raise ValueError(f"{key} must be 'student' or 'teacher', got {value!r}")
    if value == "teacher" and source != "teacher":
        raise ValueError(f"{key} 'teacher' takes the teacher's velocity: it needs source 'teacher'")
    return value


def stable_target(x_s: Tensor, s: Tensor, x0: Tensor, eps: Tensor, cond: Condition = None, null: int = -1) -> Tensor:
    """Flow-matching target with the batch as reference set (Xu et al. 2023, "Stable Target Field for Reduced
    Variance Score Estimation", Eq. 5), written for the linear path x_s = (1 - s) x0 + s eps:

        E[eps - x0 | x_s] ~ sum_j w_j (x_s - x0_j) / s,   w_j = softmax_j(-||x_s - (1 - s) x0_j||^2 / (2 s^2)),

    the posterior over the batch's data points x0_j (same condition only, when conditioned: equal labels, or equal
    prompt records of a ``TextCondition``; ``null`` is the label, the record's ``null`` the empty prompt, that
    matches every condition, ``flowmap.conditions.matches``). It is computed as
    (eps - x0) + (x0 - sum_j w_j x0_j) / s, which is exactly the conditional target when the own point dominates
    (s -> 0), and a lower-variance, consistent (as the batch grows) estimate of the marginal velocity elsewhere.
    Uses data samples only."""
    s = s.clamp_min(1e-4)  # at s = 0 the own point takes all the weight and the correction is 0 / 0
    xf, df = x_s.flatten(1).double(), x0.flatten(1).double()
    a, sd = (1 - s).double()[:, None], s.double()[:, None]
    d2 = xf.pow(2).sum(1, keepdim=True) - 2 * a * (xf @ df.T) + a**2 * df.pow(2).sum(1)[None]  # (B, B)
    logits = -d2 / (2 * sd**2)
    if cond is not None:
        same = matches(cond, null)
        logits = logits.masked_fill(~same, float("-inf"))
    w = torch.softmax(logits, dim=1)
    mean = (w @ df).to(x0.dtype).view_as(x0)
    return (eps - x0) + (x0 - mean) / expand_like(s, x0)


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
    return teacher_velocity(teacher, x_t, t, cond, guidance)


def drop_labels(cond, num_classes: int, p_uncond: float):
    """Replace a share p_uncond of conditions by their unconditional counterpart (classifier-free guidance
    training): the null label, or the empty prompt of a text condition (``flowmap.conditions.drop``)."""
    return drop(cond, p_uncond, num_classes)


def ramp(step: int, steps: int) -> float:
    """min(1, step / steps), 1 when steps = 0: a warm-up weight (Lu & Song 2024, Sec. 4.2, tangent warm-up)."""
    return 1.0 if steps == 0 else min(1.0, step / steps)


def check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_step(step: int) -> int:
    if step < 0:
        raise ValueError(f"the training step must be >= 0, got {step}")
    return int(step)


def times_like(tau: Tensor, x: Tensor) -> Tensor:
    """Times follow the data's floating dtype (float64 data -> float64 times), at least float32."""
    return tau.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
