"""Protocols every part of flowmap speaks.

Time runs from t = 0 (data) to t = 1 (noise). A batch is ``(B, ...)``; times are ``(B,)`` float
tensors; class labels are ``(B,)`` long tensors (``None`` = unconditional, see ``null_label``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class TeacherLike(Protocol):
    """What the core asks of a teacher: a velocity field on the linear path's time axis, v(x, t) = dx_t/dt.
    Every teacher type derives from the base class ``flowmap.teacher.Teacher``, which satisfies this protocol.

    ``guidance`` is the classifier-free guidance scale w; v = v_u + w (v_c - v_u), so w = 1 is the
    conditional model and w = 0 the unconditional one.
    """

    data_shape: tuple[int, ...]
    num_classes: int

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float | Tensor = 1.0) -> Tensor:
        """x: (B, *data_shape), t: (B,) -> v: (B, *data_shape)."""
        ...


Teacher = TeacherLike  # the protocol's earlier name, kept for annotations and isinstance checks


@runtime_checkable
class FlowMapLike(Protocol):
    """Anything that can jump from time s to time t: X(x, s, t) -> x_t (what the sampler needs).

    ``w``: (B,) guidance scales, only for flow maps built to take one (``guidance_input``)."""

    def __call__(
        self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor: ...


@runtime_checkable
class FlowMapStudent(FlowMapLike, Protocol):
    """What the objectives use of a student (``flowmap.student.FlowMap``): the jump, the average velocity
    u(x, s, t) with X(x, s, t) = x + (t - s) u (Boffi et al. 2025, Eq. 2.4), and the net's description."""

    data_shape: tuple[int, ...]
    num_classes: int
    guidance_input: bool

    def average_velocity(
        self, x: Tensor, s: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        """x: (B, *data_shape), s, t: (B,) -> u: (B, *data_shape)."""
        ...


@dataclass
class LossOutput:
    """What every objective returns: a per-sample loss ``(B,)`` and scalar or per-sample logs."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


def null_label(num_classes: int) -> int:
    """The reserved label for "no class" (classifier-free guidance): index ``num_classes``."""
    return num_classes


_VALUE_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("flowmap_value_checks", default=True)


def value_checks() -> bool:
    """Whether ``check_times`` / ``check_labels`` read tensor values (ranges), which waits for the device (a host
    sync). On for direct calls; off inside ``hot_path()`` (every objective's step) unless FLOWMAP_DEBUG=1."""
    return _VALUE_CHECKS.get() or os.environ.get("FLOWMAP_DEBUG") == "1"


@contextlib.contextmanager
def hot_path() -> Iterator[None]:
    """Inside the block, time and label checks test shapes and dtypes only (no host sync); FLOWMAP_DEBUG=1 keeps
    the value checks. ``Objective.__call__`` runs every training step in it."""
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def check_times(*times: Tensor, batch: int | None = None) -> None:
    """Raise one clear error when times are not (B,) floats inside [0, 1] (the range only when ``value_checks()``)."""
    for tau in times:
        if tau.dim() != 1 or (batch is not None and tau.shape[0] != batch):
            raise ValueError(f"times must have shape (B,) = ({batch},), got {tuple(tau.shape)}")
        if not torch.is_floating_point(tau):
            raise ValueError(f"times must be floating point, got {tau.dtype}")
    if not value_checks():
        return
    for tau in times:
        if bool(((tau < 0) | (tau > 1) | ~torch.isfinite(tau)).any()):
            raise ValueError(
                "times must lie in [0, 1] (t=0 data, t=1 noise), "
                f"got min {tau.min().item():.4g} max {tau.max().item():.4g}"
            )


def check_labels(cond: Tensor | None, num_classes: int, batch: int) -> None:
    """Raise one clear error for a label on an unconditional model or a label out of range (the range only when
    ``value_checks()``)."""
    if cond is None:
        return
    if num_classes <= 0:
        raise ValueError("class labels were given to an unconditional model (num_classes=0)")
    if cond.shape != (batch,) or cond.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"class labels must be a (B,) = ({batch},) long tensor, got {tuple(cond.shape)} {cond.dtype}")
    if value_checks() and (torch.any(cond < 0) or torch.any(cond > num_classes)):
        raise ValueError(f"class labels must lie in [0, {num_classes}] ({num_classes} is the null label)")


def expand_like(tau: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x."""
    return tau.reshape(tau.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)
