"""The flow-map student X_theta(x, s, t) = x + (t - s) u_theta(x, s, t), and any velocity field seen as a flow map.

X(x, s, s) = x holds by construction (Boffi et al. 2025, Eq. 2.4; Geng et al. 2025, Eq. 4), and
u_theta(x, t, t) is an instantaneous velocity, so every student is also a ``Teacher``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flowmap.conditions import Condition
from flowmap.conditions import check as check_condition
from flowmap.types import Teacher, check_times, expand_like


class Parametrization(nn.Module):
    """Maps the raw network output F(x, s, t) to the average velocity u(x, s, t)."""

    name = "identity"

    def forward(self, F: Tensor, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return F

    def to_config(self) -> dict:
        return {"name": self.name}


class ConsistencyBoundary(Parametrization):
    """Consistency-style skip connection (Song et al. 2023, Eq. 7; Karras et al. 2022, Table 1) on the two-time map.

    With Delta = s - t:  X = c_skip x + c_out F,  c_skip = sigma_d^2 / (Delta^2 + sigma_d^2),
    c_out = -sigma_d Delta / sqrt(Delta^2 + sigma_d^2); written through X = x + (t - s) u as
        u = Delta / (Delta^2 + sigma_d^2) x + sigma_d / sqrt(Delta^2 + sigma_d^2) F,
    which is finite at s = t, where u = F."""

    name = "consistency"

    def __init__(self, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.sigma_data = float(sigma_data)

    def forward(self, F: Tensor, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        delta = expand_like(s - t, x)
        sd2 = self.sigma_data**2
        return delta / (delta**2 + sd2) * x + self.sigma_data / torch.sqrt(delta**2 + sd2) * F

    def to_config(self) -> dict:
        return {"name": self.name, "sigma_data": self.sigma_data}


PARAMETRIZATIONS = {"identity": Parametrization, "consistency": ConsistencyBoundary}


def build_parametrization(config: dict | str | None) -> Parametrization:
    if config is None:
        return Parametrization()
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = config.pop("name", "identity")
    if name not in PARAMETRIZATIONS:
        raise ValueError(f"unknown student parametrization {name!r}; choose from {sorted(PARAMETRIZATIONS)}")
    return PARAMETRIZATIONS[name](**config)


class FlowMap(nn.Module):
    """X_theta(x, s, t) = x + (t - s) u_theta(x, s, t) around a backbone ``net(x, s, t, cond, w)``.

    Shapes: x (B, *data_shape); s, t (B,) in [0, 1]; cond: labels (B,) long, a ``TextCondition`` of B rows
    (``flowmap.conditions``, passed to the net unchanged) or None; w (B,) float or None (guidance scale, only for
    nets built with ``guidance_input=True``).
    """

    def __init__(self, net: nn.Module, parametrization: Parametrization | dict | str | None = None) -> None:
        super().__init__()
        self.net = net
        self.param = (
            parametrization if isinstance(parametrization, Parametrization) else build_parametrization(parametrization)
        )
        self.data_shape: tuple[int, ...] = tuple(getattr(net, "data_shape", ()))
        self.num_classes: int = int(getattr(net, "num_classes", 0))
        self.guidance_input: bool = bool(getattr(net, "guidance_input", False))
        self.validate = True

    def check_inputs(self, x: Tensor, s: Tensor, t: Tensor, cond: Condition, w: Tensor | None) -> None:
        if self.data_shape and tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, the student expects (B, {', '.join(map(str, self.data_shape))})"
            )
        check_times(s, t, batch=x.shape[0])
        check_cond = getattr(self.net, "check_cond", None)  # nets with other conditions (text) check their own
        if check_cond is not None:
            check_cond(cond, x.shape[0])
        else:
            check_condition(cond, x.shape[0], self.num_classes)
        if w is not None and not self.guidance_input:
            raise ValueError(
                "a guidance scale was given to a student that was not built to take one (guidance_input=False)"
            )

    def average_velocity(
        self, x: Tensor, s: Tensor, t: Tensor, cond: Condition = None, w: Tensor | None = None
    ) -> Tensor:
        """u_theta(x, s, t): (B, *data_shape)."""
        if self.validate and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_inputs(x, s, t, cond, w)
        F = self.net(x, s, t, cond, w) if w is not None else self.net(x, s, t, cond)
        return self.param(F, x, s, t)

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Condition = None, w: Tensor | None = None) -> Tensor:
        """X_theta(x, s, t) = x + (t - s) u_theta(x, s, t)."""
        u = self.average_velocity(x, s, t, cond, w)  # validates the inputs before t - s broadcasts
        return x + expand_like(t - s, x) * u

    def velocity(self, x: Tensor, t: Tensor, cond: Condition = None, guidance: float | Tensor = 1.0) -> Tensor:
        """u_theta(x, t, t): the student's instantaneous velocity (the Teacher protocol)."""
        w = _guidance_tensor(guidance, x) if self.guidance_input else None
        if not self.guidance_input and not _is_one(guidance):
            raise ValueError("guidance != 1 on a student that was not trained to take a guidance scale")
        return self.average_velocity(x, t, t, cond, w)


class _Checkpointed:
    """A block's forward that keeps only its inputs for the backward pass and recomputes the rest there
    (``torch.utils.checkpoint``, non-reentrant: works under forward-mode AD, so MeanFlow's and sCM's shared
    primal-and-tangent pass is checkpointed too); a plain call when grad is off (teacher passes, JVP tangents)."""

    def __init__(self, forward) -> None:
        self.forward = forward

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def _checkpoint_diffusers(injection: nn.Module | None, module: nn.Module, *args):
    """diffusers' ``gradient_checkpointing_func`` for a student made from a diffusers model
    (``flowmap.nets.diffusers_net``): the recomputation sees the interval embedding the forward injected
    (``injection.offset``, set only during the student's forward)."""
    offset = None if injection is None else injection.offset

    def run(*inputs):
        if injection is None:
            return module(*inputs)
        before, injection.offset = injection.offset, offset
        try:
            return module(*inputs)
        finally:
            injection.offset = before

    return checkpoint(run, *args, use_reentrant=False)


def activation_checkpointing(student: nn.Module) -> int:
    """Activation checkpointing (Chen et al. 2016) on the student's net: each block (flowmap's ``DiTBlock``,
    ``ResBlock``, ``AttnBlock``, ``ResidualBlock``: the outermost modules whose class name ends in "Block"; a
    diffusers model: its own ``enable_gradient_checkpointing``) keeps its inputs only and recomputes its
    activations in the backward pass. Gradients are unchanged (up to round-off); the activations kept drop to the
    blocks' inputs. Non-reentrant checkpointing works under forward-mode AD, so the shared primal-and-tangent
    pass of MeanFlow and sCM (``flowmap.jvp.jvp(..., with_grad=True)``) is checkpointed too. The config key
    ``model.student.activation_checkpointing: true``. Returns the number of blocks wrapped (-1: the diffusers
    model's own switch); raises ValueError for a net without blocks."""
    net = getattr(student, "net", student)
    model = getattr(net, "model", None)
    if getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing(partial(_checkpoint_diffusers, getattr(net, "injection", None)))
        return -1
    blocks = [m for m in net.modules() if type(m).__name__.endswith("Block")]
    outer = [b for b in blocks if not any(b is not o and any(b is m for m in o.modules()) for o in blocks)]
    if not outer:
        raise ValueError(f"activation checkpointing: the {type(net).__name__} net has no blocks to checkpoint")
    for block in outer:
        if not isinstance(block.__dict__.get("forward"), _Checkpointed):
            block.forward = _Checkpointed(block.forward)
    return len(outer)


class EulerFlowMap(nn.Module):
    """Any velocity field seen as a flow map: X(x, s, t) = x + (t - s) v(x, s) (one Euler step).

    Lets one sampler serve teachers and students; progressive distillation's round 0 is this."""

    def __init__(self, teacher: Teacher, guidance: float = 1.0) -> None:
        super().__init__()
        self.teacher = teacher
        self.guidance = guidance
        self.data_shape = tuple(teacher.data_shape)
        self.num_classes = int(teacher.num_classes)
        self.guidance_input = False

    def forward(self, x: Tensor, s: Tensor, t: Tensor, cond: Condition = None, w: Tensor | None = None) -> Tensor:
        g = self.guidance if w is None else w
        return x + expand_like(t - s, x) * self.teacher.velocity(x, s, cond, guidance=g)

    def velocity(self, x: Tensor, t: Tensor, cond: Condition = None, guidance: float | Tensor = 1.0) -> Tensor:
        return self.teacher.velocity(x, t, cond, guidance=guidance)


def _is_one(g: float | Tensor) -> bool:
    if isinstance(g, Tensor):
        return bool(torch.all(g == 1))
    return math.isclose(float(g), 1.0)


def _guidance_tensor(g: float | Tensor, x: Tensor) -> Tensor:
    if isinstance(g, Tensor):
        return g.to(x.device, torch.float32).expand(x.shape[0]) if g.dim() == 0 else g.to(x.device, torch.float32)
    return torch.full((x.shape[0],), float(g), device=x.device, dtype=torch.float32)
