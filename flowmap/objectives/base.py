"""The template every objective follows (see docs/architecture.md).

One training step of any method is

    draw = objective.draw(student, teacher, x0, cond, step)          (the base: times, noise, dropout, guidance)
    out  = objective.loss(draw, student, teacher, target, step)      (the method: its equations only)

``Objective.forward`` (the public call) checks the inputs, builds the ``Draw`` and calls ``loss``. The draw:

    s, t   = times(B, x0, step)          a ``PairSampler`` by default, t = 0 on its first rows (``end_share``,
                                          ``flowmap.time_sampling.end_head``); a method with its own times overrides
                                          ``times`` (and applies ``end_share`` there when it takes one)
    s, t   = fd_clamp(s, t, h)            only with ``jvp_backend="fd"`` and a ``fd_margin`` (central differences)
    t      = s on the last rows           ``equal_share`` (``flowmap.time_sampling.equal_tail``)
    eps    ~ N(0, I),  x_s = (1 - s) x0 + s eps                              (the linear path, ``LinearPath.sample``)
    cond   <- the null condition with probability p_uncond                   (Ho & Salimans 2022, Sec. 3.2)
    w      ~ U[guidance, guidance_max] for a ``guidance_input`` student      (``flowmap.objectives.guidance``)

An objective is an ``nn.Module`` only so that learned loss parameters (sCM's adaptive-weight log-variance) are
optimized and checkpointed with the student; most hold no parameters."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from flowmap.jvp import FD_EPS, check_backend, compute_dtype, jvp, parse_fd_dtype, require_inner
from flowmap.objectives.common import check_source, check_step, drop_labels, instantaneous_velocity, take, times_like
from flowmap.objectives.guidance import check_guidance, guided_draw
from flowmap.paths import LinearPath
from flowmap.time_sampling import PairSampler, end_head, end_rows, equal_tail, fd_clamp
from flowmap.types import LossOutput, expand_like, hot_path

LINEAR = LinearPath()
GUIDANCE = ("guidance", "guidance_max")  # groups of the base's hyperparameters (``Objective.shared``)
JVP = ("jvp_backend", "fd_eps", "fd_dtype")
TIMES = ("time_dist", "time_mean", "time_std", "equal_share", "end_share")


def shared_hyperparameters(
    *,
    source: str | None = None,
    guidance: float = 1.0,
    guidance_max: float | None = None,
    p_uncond: float = 0.0,
    target_ema: float = 0.0,
    jvp_backend: str = "forward_ad",
    fd_eps: float | None = None,
    fd_dtype: str | None = None,
    time_dist: str = "uniform",
    time_mean: float = 0.0,
    time_std: float = 1.0,
    equal_share: float = 0.0,
    end_share: float = 0.0,
) -> dict[str, Any]:
    """The hyperparameters ``Objective`` owns, their types and base defaults (one home; see ``Objective``)."""
    return dict(locals())


SHARED = tuple(inspect.signature(shared_hyperparameters).parameters)
JSON_TYPES = (int, float, str, bool, type(None), list, tuple)


@dataclass(frozen=True)
class Draw:
    """One step's random draw, shared by every term of a loss (B rows).

    x0, eps: (B, *data_shape) data and noise; s >= t: (B,) the current time and the time jumped to;
    x_s = (1 - s) x0 + s eps: (B, *data_shape); cond: the condition after label dropout (opaque: passed through);
    w_student: (B,) guidance scales for a ``guidance_input`` student, else None; w_teacher: the teacher's CFG scale
    (float or (B,)); extra: what a method's ``times`` drew besides (s, t) (e.g. CTM's middle time u)."""

    x0: Tensor
    eps: Tensor
    s: Tensor
    t: Tensor
    x_s: Tensor
    cond: Any
    w_student: Tensor | None
    w_teacher: float | Tensor
    extra: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.x0.shape[0]

    def rows(self, sl: slice) -> Draw:
        """The draw restricted to the rows ``sl`` (every per-row entry, the condition included)."""
        per_row = lambda a: take(a, sl) if isinstance(a, Tensor) and a.dim() > 0 else a  # noqa: E731
        return replace(
            self,
            x0=self.x0[sl],
            eps=self.eps[sl],
            s=self.s[sl],
            t=self.t[sl],
            x_s=self.x_s[sl],
            cond=take(self.cond, sl),
            w_student=take(self.w_student, sl),
            w_teacher=per_row(self.w_teacher),
            extra={k: per_row(v) for k, v in self.extra.items()},
        )

    def at(self, tau: Tensor) -> Tensor:
        """x_tau = (1 - tau) x0 + tau eps: another point of this draw's path (same x0, eps)."""
        return LINEAR.sample(self.x0, self.eps, tau)

    def X(self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """X(x, s, t | cond, w_student): a jump of ``model`` (student, target or snapshot)."""
        w = self.w_student
        return model(x, s, t, self.cond) if w is None else model(x, s, t, self.cond, w)

    def u(self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """u(x, s, t | cond, w_student): the average velocity, X = x + (t - s) u (a flow map without
        ``average_velocity``: (X(x, s, t) - x) / (t - s))."""
        if not hasattr(model, "average_velocity"):
            return (self.X(model, x, s, t) - x) / expand_like(t - s, x)
        w, c = self.w_student, self.cond
        return model.average_velocity(x, s, t, c) if w is None else model.average_velocity(x, s, t, c, w)


class Objective(nn.Module):
    """A method = its time law and its ``loss``; everything else about a step is drawn here.

    A subclass sets ``name`` and implements ``loss(draw, student, teacher, target, step) -> LossOutput`` with a
    per-sample loss (B,); its ``__init__`` lists its hyperparameters and hands the shared ones to this one:

    * ``source``: ``"teacher"`` (distil a teacher's velocity) or ``"data"`` (eps - x0); ``needs_teacher`` follows;
    * ``guidance``, ``guidance_max``: CFG scale of the teacher (a range trains a ``guidance_input`` student);
    * ``p_uncond``: label dropout;
    * ``target_ema``: decay of the EMA target network (with ``uses_target``; 0 = the stop-gradient student);
    * ``jvp_backend``, ``fd_eps``, ``fd_dtype``: the JVP engine (``flowmap.jvp``); with ``"fd"`` the times keep
      the class's ``fd_margin`` = (s_low, t_low, gap) in units of the step (``flowmap.time_sampling.fd_clamp``);
    * ``time_dist``, ``time_mean``, ``time_std``, ``equal_share``, ``end_share``: the (s, t) law (``PairSampler``),
      the share of pairs with s = t (the last rows) and of pairs ending at the data, t = 0 (the first rows). A method
      with other times overrides ``times(batch, x0, step)``.

    A method takes the shared ones it names in its signature (``super().__init__(**shared(locals()))``), or names
    them in the class attribute ``shared`` (the groups ``GUIDANCE``, ``JVP``, ``TIMES``) with its own ``defaults``
    and hands them on as ``**kwargs``; ``signature()`` lists both (the config keys and the typed ``--help``).

    What a method knows about itself beyond its loss are class attributes:

    * ``sampler_gamma``: the re-noising ``gamma`` of ``flowmap.sampling.sample`` its students sample with
      (0: deterministic flow-map jumps; 1: multistep consistency sampling, Song et al. 2023, Alg. 1), written
      into the exported student file so ``load_student(...).sample`` uses it;
    * ``needs_jvp``: whether the loss takes a Jacobian-vector product (the student must be the inner module);
    * ``callbacks``: ``"module:Class"`` names of the Lightning callbacks its training needs (imported by the
      Lightning shell only, so this core stays free of Lightning).

    ``student``/``target`` are ``flowmap.types.FlowMapStudent``s (target = EMA copy, no grad), ``teacher`` a
    ``Teacher`` (velocity on the linear axis) or None, ``x0`` (B, *data_shape), ``cond`` the batch's condition
    or None, ``step`` the global step (curricula are pure functions of it). Noise and times come from torch's
    global RNG."""

    name: str = "objective"
    source: str = "teacher"
    uses_target: bool = False
    needs_jvp: bool = False
    sampler_gamma: float = 0.0
    callbacks: tuple[str, ...] = ()
    fd_margin: tuple[int, int, int] | None = None
    shared: tuple[str, ...] = ()  # base hyperparameters the method takes through ``**kwargs``
    defaults: Mapping[str, Any] = {}  # the method's defaults of those (else ``shared_hyperparameters``')

    def __init__(self, **given: Any) -> None:
        super().__init__()
        params = type(self).signature().parameters
        unknown = sorted(set(given) - set(params))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected hyperparameter(s) {unknown}")
        hp = shared_hyperparameters(**{**{k: p.default for k, p in params.items() if k in SHARED}, **given})
        source, guidance, guidance_max, p_uncond, target_ema = (hp[k] for k in SHARED[:5])
        jvp_backend, fd_eps, fd_dtype, time_dist, time_mean, time_std, equal_share, end_share = (
            hp[k] for k in SHARED[5:]
        )
        if source is not None:
            self.source = check_source(source)
        check_guidance(self.source, guidance, guidance_max)
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1), got {target_ema}")
        if not 0.0 <= equal_share <= 1.0:
            raise ValueError(f"equal_share must lie in [0, 1], got {equal_share}")
        if not 0.0 <= end_share <= 1.0 or end_share + equal_share > 1.0:
            raise ValueError(
                f"end_share must lie in [0, 1] and leave room for equal_share, got {end_share} and {equal_share}"
            )
        self.guidance, self.guidance_max = float(guidance), guidance_max
        self.p_uncond, self.target_ema = float(p_uncond), float(target_ema)
        self.jvp_backend, self.fd_eps, self.fd_dtype = check_backend(jvp_backend), fd_eps, parse_fd_dtype(fd_dtype)
        self.pairs = PairSampler(time_dist, float(time_mean), float(time_std))
        self.time_dist, self.time_mean, self.time_std = time_dist, float(time_mean), float(time_std)
        self.equal_share, self.end_share = float(equal_share), float(end_share)

    def end_rows(self, batch: int) -> int:
        """How many of the first rows of a batch of ``batch`` jump to the data, t = 0 (``end_share``)."""
        return end_rows(batch, self.end_share)

    @property
    def needs_teacher(self) -> bool:
        return self.source == "teacher"

    @classmethod
    def sampler_defaults(cls) -> dict:
        """Keyword defaults of ``flowmap.sampling.sample`` for this method's students (JSON-able)."""
        return {"gamma": float(cls.sampler_gamma)}

    def __call__(self, *args, **kwargs) -> LossOutput:
        """``forward`` inside ``flowmap.types.hot_path()``: the student's and teacher's time and label checks test
        shapes only, so a training step does not wait for the device (FLOWMAP_DEBUG=1 restores the value checks)."""
        with hot_path():
            return super().__call__(*args, **kwargs)

    # --- the template ---------------------------------------------------------------------------------------
    def forward(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module | None = None,
        target: nn.Module | None = None,
        x0: Tensor,
        cond: Any = None,
        step: int = 0,
    ) -> LossOutput:
        """The per-sample loss (B,) of one step: ``loss(draw(...))``."""
        check_step(step)
        if self.needs_teacher and teacher is None:
            raise ValueError(f"objective {self.name!r} distills a teacher (it needs a teacher), but teacher is None")
        if self.needs_jvp:
            student = require_inner(student)
        draw = self.draw(student, teacher, x0, cond, step)
        return self.loss(draw, student, teacher, self.target_network(student, target), step)

    def loss(self, draw: Draw, student: nn.Module, teacher: Any, target: nn.Module, step: int) -> LossOutput:
        """The method's equations on one draw: LossOutput with a per-sample loss (B,)."""
        raise NotImplementedError

    def times(self, batch: int, x0: Tensor, step: int) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict]:
        """(s, t) with s >= t, (B,) each in the times' dtype (``times_like``), and optionally a dict of further
        draws (``Draw.extra``). Default: ``PairSampler(time_dist, time_mean, time_std)``, with t = 0 on the first
        ``end_rows(B)`` rows."""
        s, t = self.pairs.pair(batch, x0.device)
        return times_like(s, x0), times_like(end_head(t, self.end_share), x0)

    def sample_times(self, batch: int, x0: Tensor, step: int = 0) -> tuple[Tensor, Tensor, dict]:
        """(s, t, extra) as the draw uses them: ``times``, the finite-difference clamp, the share with s = t."""
        s, t, *rest = self.times(batch, x0, step)
        if self.jvp_backend == "fd" and self.fd_margin is not None:
            s, t = fd_clamp(s, t, self.fd_step(s.dtype), *self.fd_margin)
        if self.equal_share > 0:
            t = equal_tail(s, t, self.equal_share)
        return s, t, (rest[0] if rest else {})

    def draw(self, student: nn.Module, teacher: Any, x0: Tensor, cond: Any, step: int) -> Draw:
        """Times, noise, the linear path's x_s, label dropout and the guidance draw (in this RNG order)."""
        B = x0.shape[0]
        s, t, extra = self.sample_times(B, x0, step)
        eps = torch.randn_like(x0)
        cond = drop_labels(cond, int(getattr(student, "num_classes", 0)), self.p_uncond)
        w_student, w_teacher = guided_draw(student, teacher, cond, B, x0.device, self.guidance, self.guidance_max)
        return Draw(x0, eps, s, t, LINEAR.sample(x0, eps, s), cond, w_student, w_teacher, extra)

    def target_network(self, student: nn.Module, target: nn.Module | None) -> nn.Module:
        """The network of the stop-gradient targets: the EMA target when ``uses_target``, the student itself
        (sg(theta)) otherwise or at decay 0."""
        if not self.uses_target or (target is None and self.target_decay(0) == 0.0):
            return student
        if target is None:
            raise ValueError(
                f"objective {self.name!r} with target EMA decay {self.target_decay(0)} needs an EMA target network "
                "(fit() and DistillModule pass it as target), got None"
            )
        return require_inner(target) if self.needs_jvp else target

    def target_decay(self, step: int) -> float:
        """EMA decay of the target network at ``step`` (only when ``uses_target``)."""
        return self.target_ema

    # --- shared pieces of the losses -----------------------------------------------------------------------
    def velocity(self, teacher: Any, draw: Draw, x: Tensor | None = None, tau: Tensor | None = None) -> Tensor:
        """v(x, tau) on the linear path (default x_s, s): the teacher's guided velocity, or eps - x0 from data."""
        x, tau = (draw.x_s, draw.s) if x is None else (x, tau)
        return instantaneous_velocity(self.source, teacher, x, tau, draw.x0, draw.eps, draw.cond, draw.w_teacher)

    def fd_step(self, dtype: torch.dtype) -> float:
        """h of the central differences: ``fd_eps``, or ``FD_EPS`` of the differencing dtype."""
        return self.fd_eps or FD_EPS.get(self.fd_dtype or compute_dtype(dtype), 5e-5)

    def jvp(
        self,
        fn: Callable[..., Tensor],
        primals: tuple,
        tangents: tuple,
        model: nn.Module,
        primal_out: bool = False,
        with_grad: bool | str = False,
    ) -> tuple[Tensor | None, Tensor]:
        """``flowmap.jvp.jvp`` with this objective's backend, step and dtype; ``model`` is the network ``fn`` calls.
        ``with_grad=True``: (fn(*primals) with grad, its JVP detached), in one dual pass where the backend allows,
        for a semi-gradient loss whose with-grad forward is at the JVP's primals; ``"both"``: the JVP with grad too
        (a loss that trains the derivative)."""
        return jvp(
            fn,
            primals,
            tangents,
            self.jvp_backend,
            self.fd_eps,
            primal_out,
            self.fd_dtype,
            (model,),
            with_grad=with_grad,
        )

    # --- config -----------------------------------------------------------------------------------------------
    @classmethod
    def signature(cls) -> inspect.Signature:
        """The method's hyperparameters, keyword-only, typed, with its defaults: each ``__init__`` up the classes
        while it hands on ``**kwargs``, then the base's named in ``shared`` (with ``defaults``)."""
        params: dict[str, inspect.Parameter] = {}
        for klass in cls.__mro__:
            if klass is Objective or not issubclass(klass, Objective):
                break
            if "__init__" not in vars(klass):
                continue
            more = False
            for p in list(inspect.signature(klass.__init__).parameters.values())[1:]:
                more = more or p.kind is p.VAR_KEYWORD
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    params.setdefault(p.name, p.replace(kind=p.KEYWORD_ONLY))
            if not more:
                break
        for p in inspect.signature(shared_hyperparameters).parameters.values():
            if p.name in cls.shared and p.name not in params:
                default, ann = cls.defaults.get(p.name, p.default), p.annotation
                if p.default is None and default is not None and isinstance(ann, str):  # source: None = the class's
                    ann = ann.removesuffix(" | None")
                params[p.name] = p.replace(default=default, annotation=ann)
        return inspect.Signature(list(params.values()))

    @classmethod
    def hyperparameters(cls) -> list[str]:
        """The names the method accepts (the config keys besides ``name``)."""
        return list(cls.signature().parameters)

    def to_config(self) -> dict:
        """JSON-able hyperparameters (recorded in exported checkpoints): ``{"name": ..., **hyperparameters}``."""
        values = {k: getattr(self, k) for k in self.hyperparameters() if hasattr(self, k)}
        return {"name": self.name, **{k: v for k, v in values.items() if isinstance(v, JSON_TYPES)}}


def shared(values: Mapping[str, Any]) -> dict:
    """The base's hyperparameters among a subclass's ``locals()``: ``super().__init__(**shared(locals()))``."""
    return {k: values[k] for k in SHARED if k in values}


def sq_norm(delta: Tensor) -> Tensor:
    """||delta||^2 per sample (B,), in float32 or wider."""
    return delta.flatten(1).to(torch.promote_types(delta.dtype, torch.float32)).pow(2).sum(1)


def normalized(g: Tensor, c: float | None) -> Tensor:
    """g / (||g|| + c) per sample (tangent normalization, Lu & Song 2024, Sec. 4.2); c None: g."""
    if c is None:
        return g
    return g / expand_like(g.flatten(1).norm(dim=1) + c, g)


def mask_nonfinite(target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mask samples whose regression target is not finite: returns (target with non-finite rows
    zeroed, finite mask (B,), count of masked samples). Objectives multiply their per-sample loss by
    the mask and log ``nonfinite_targets`` so bad targets are counted, never trained on."""
    finite = torch.isfinite(target.flatten(1)).all(dim=1)
    clean = torch.where(finite.view(-1, *([1] * (target.dim() - 1))), target, torch.zeros_like(target))
    return clean, finite, (~finite).sum()


__all__ = ["Draw", "LINEAR", "Objective", "mask_nonfinite", "normalized", "shared", "sq_norm"]
