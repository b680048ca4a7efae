"""The JVP engine: one switch for every loss that needs a Jacobian-vector product (MeanFlow, sCM).

    out, dout = jvp(fn, primals, tangents, backend="forward_ad" | "func" | "fd")
    dout = d/de fn(p + e t) at e = 0                                    (a directional derivative)

Backends:

* ``"forward_ad"`` (the objectives' default): forward-mode AD on ``torch.autograd.forward_ad`` dual tensors,
  with ``flowmap.jvp_rules.dual_rules``: linear, conv, layer/group norm, GELU, SiLU and attention compute
  their primal and tangent in one call each, with no zero tangents for the weights. Exact up to round-off
  (equal to PyTorch's own forward-mode formulas, tests/test_jvp.py); measured on one thread, a JVP takes
  0.6x the ``"func"`` time on the benchmark's DiT and 0.8x on its MLP (about 3x and 2.6x a plain forward).
* ``"func"``: forward-mode AD by ``torch.func.jvp``. One forward pass carrying dual numbers, exact up to
  round-off. Linear layers take one product per tangent (``flowmap.jvp_rules.constant_weight_rules``).
  Composes with the other ``torch.func`` transforms, and works inside a caller's own forward-AD level
  (where ``"forward_ad"`` cannot nest).
  Every layer needs a forward-mode rule in both AD backends; PyTorch's fused attention kernels have none
  (pytorch#128971), which is why ``flowmap.nets.attention`` ships its own.
* ``"fd"``: central finite differences, (fn(p + h t) - fn(p - h t)) / (2 h): two ordinary forwards
  (a third when ``primal_out``), accurate to O(h^2) plus round-off ~ ulp / h. Works through any
  layer; the fallback when a layer has no forward-mode rule. In float32 the two errors cannot both
  be small for nets whose time embeddings have frequencies ~1e3 (best ~1e-4 relative, measured in
  tests/test_jvp.py), so ``fd_dtype=torch.float64`` with ``modules=(student,)`` evaluates the
  differences in float64: the modules' float parameters are promoted for the tangent pass only and
  the original tensors are put back untouched afterwards (``promoted``); ~1e-7 relative, at the
  price of a float64 copy of the weights during the pass.

How a loss uses it (the pattern that keeps DDP's gradient all-reduce intact; DESIGN.md, pitfalls):
the tangent is a *constant* regression target, so the JVP runs under ``torch.no_grad()``, in float32
even under bf16 autocast (autocast disabled, lower-precision inputs promoted; float64 stays float64),
on the inner module (never through a DDP wrapper). The loss then makes ONE ordinary with-grad forward
of the student. In our Lightning wiring the student handed to an objective is the inner ``FlowMap``
and DDP wraps the whole LightningModule, so ``training_step`` already runs inside the DDP forward and
plain calls of the student are correct; ``require_inner`` refuses a DDP-wrapped student outright.
When that with-grad forward is at the JVP's own primals (MeanFlow, sCM), ``jvp(..., with_grad=True)`` gives both
from one pass: the dual pass's primal is the with-grad forward and only its tangents run under no_grad.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from flowmap.jvp_rules import constant_weight_rules, dual_rules

BACKENDS = ("forward_ad", "func", "fd")
WITH_GRAD = (False, True, "both")  # jvp's modes: nothing, the output, or output and JVP with autograd history

# Default central-difference steps per computing dtype. Our time embeddings have frequencies up to
# ~1e3 (FourierTime scale 1000), so h * 1e3 must stay well below 1 rad. Measured against a float64
# reference on small MLP/UNet/DiT nets (tests/test_jvp.py): h = 5e-5 in float32 gives relative errors
# ~1e-4..7e-4 (truncation ~ (h 1e3)^2 / 6 against round-off ~ 6e-8 / h); h = 1e-6 in float64 ~1e-7.
FD_EPS = {torch.float32: 5e-5, torch.float64: 1e-6}

# Fragments of PyTorch's messages for an op or autograd.Function without a forward-mode rule.
_NO_FORWARD_RULE = ("forward ad", "forward-mode", "forward mode", "jvp", "functorch transforms")


class JVPBackendError(ValueError):
    """The chosen JVP backend cannot serve this network (e.g. ``"func"`` through a layer without a
    forward-mode rule)."""


def check_backend(backend: str) -> str:
    """Return ``backend`` or raise one clear error naming the valid choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown JVP backend {backend!r}; choose from {list(BACKENDS)}")
    return backend


def require_inner(module: nn.Module) -> nn.Module:
    """Refuse a DDP-wrapped module: a JVP through DDP's forward fails or skips the gradient sync.

    Pass the inner module; under Lightning, DDP wraps the LightningModule, so the student an objective
    receives is already the inner one and its with-grad call is part of the synchronized forward."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "a JVP-based objective received a DistributedDataParallel-wrapped student; pass the inner "
            "FlowMap (under Lightning, DDP wraps the LightningModule and training_step already runs inside its forward)"
        )
    return module


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16 (and float32), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _check(primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> None:
    if len(primals) == 0 or len(primals) != len(tangents):
        raise ValueError(
            f"jvp needs as many tangents as primals (>= 1), got {len(primals)} primals and {len(tangents)} tangents"
        )
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if not isinstance(p, Tensor) or not isinstance(t, Tensor):
            raise ValueError(f"jvp primal/tangent {i} must be tensors, got {type(p).__name__} and {type(t).__name__}")
        if not (torch.is_floating_point(p) and torch.is_floating_point(t)):
            raise ValueError(
                f"jvp primal/tangent {i} must be floating point (pass labels through a closure), "
                f"got {p.dtype}, {t.dtype}"
            )
        if p.shape != t.shape:
            raise ValueError(f"jvp tangent {i} has shape {tuple(t.shape)}, its primal {tuple(p.shape)}")


def parse_fd_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` (the inputs' computing dtype), ``"float32"`` or ``"float64"`` (config spelling) -> dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    choices = {"float32": torch.float32, "float64": torch.float64}
    if name not in choices:
        raise ValueError(f"unknown finite-difference dtype {name!r}; choose from {list(choices)} or null")
    return choices[name]


@contextlib.contextmanager
def promoted(modules: Sequence[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Temporarily give the modules' floating parameters and buffers ``dtype`` (no grad is tracked).

    The original tensors are put back on exit, so weights, optimizer state and DDP's views of them are
    bit-identical afterwards; shared tensors are promoted once."""
    saved: list[tuple[Tensor, Tensor]] = []
    seen: set[int] = set()
    try:
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                if id(tensor) in seen or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                seen.add(id(tensor))
                saved.append((tensor, tensor.data))
                tensor.data = tensor.data.to(dtype)
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def jvp(
    fn: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    backend: str = "forward_ad",
    eps: float | None = None,
    primal_out: bool = True,
    fd_dtype: torch.dtype | str | None = None,
    modules: Sequence[nn.Module] = (),
    with_grad: bool | str = False,
) -> tuple[Tensor | None, Tensor]:
    """(fn(*primals), d/de fn(*(p + e t)) at e = 0), both detached, in float32 (float64 for float64 inputs).

    fn: a function of the primals returning one tensor; primals, tangents: matching float tensors.
    backend: ``"forward_ad"`` (dual tensors with the engine's rules), ``"func"`` (torch.func.jvp) or ``"fd"``
    (central differences with step ``eps``, default
    ``FD_EPS`` of the differencing dtype). ``primal_out=False`` returns ``None`` for the output (saves fd's
    third forward when the caller makes its own with-grad forward anyway).
    fd_dtype: the dtype the ``"fd"`` differences are taken in (``"float64"``: promote ``modules``, the
    networks ``fn`` calls, for the pass; see ``promoted``); results come back in the inputs' dtype.
    Raises ``JVPBackendError`` when the network has a layer the backend cannot differentiate.

    ``with_grad=True``, the with-grad mode: (fn(*primals) WITH autograd history, in fn's dtype; its JVP detached),
    the with-grad training forward and the stop-gradient tangent of a semi-gradient loss whose forward is at the
    JVP's own primals (MeanFlow's sg(du/ds), Geng et al. 2025, Eq. 10; sCM's sg(dF/dtheta), Lu & Song 2024,
    Alg. 1); ``primal_out`` is then moot. Where ``_one_pass`` allows, ONE forward on dual tensors under
    ``dual_rules(detach_tangents=True)``: autograd records the primal, which is the ordinary forward, and the rules
    compute the tangents under no_grad, so the JVP costs its tangent pass (about one forward) instead of a primal
    plus tangent (two forwards) beside the training forward. Otherwise (another backend, autocast on, bf16
    inputs, grad off, a compiled network) the detached JVP as above, then an ordinary ``fn(*primals)``. Either way
    fn's network is called once with grad (DDP, FSDP hooks).

    ``with_grad="both"``: output and JVP both WITH autograd history, for a loss that trains the derivative itself
    (flow-map self-distillation's Lagrangian and Eulerian residuals, Boffi et al. 2025, Eq. 3.4-3.5): the primals'
    dtype is kept and autocast is left as the caller set it (the derivative trains with the step's precision);
    ``"fd"`` takes central differences with step ``eps`` (default ``FD_EPS`` of the first primal's computing dtype)
    and returns the mean of its two evaluations as the output (``primal_out``, ``fd_dtype``, ``modules`` are moot)."""
    if with_grad not in WITH_GRAD:
        raise ValueError(f"unknown JVP with_grad mode {with_grad!r}; choose from {list(WITH_GRAD)}")
    check_backend(backend)
    _check(primals, tangents)
    if with_grad == "both":
        return _trained_jvp(fn, tuple(primals), tuple(tangents), backend, eps)
    dtype = max((compute_dtype(p.dtype) for p in primals), key=lambda d: torch.finfo(d).bits)
    if with_grad and _one_pass(backend, primals, dtype, modules):
        tangents = tuple(t.detach().to(dtype) for t in tangents)
        out, dout = _dual_jvp(fn, tuple(primals), tangents, detach_tangents=True)
        return out, dout.detach()
    if with_grad:
        _, dout = jvp(fn, primals, tangents, backend, eps, primal_out=False, fd_dtype=fd_dtype, modules=modules)
        return fn(*primals), dout
    device_type = primals[0].device.type
    fd_dtype = parse_fd_dtype(fd_dtype) or dtype
    if backend == "fd" and fd_dtype != dtype and not modules:
        raise ValueError(f"finite differences in {fd_dtype} need the networks fn calls (modules=...) to promote them")
    work = fd_dtype if backend == "fd" else dtype
    primals = tuple(p.detach().to(work) for p in primals)
    tangents = tuple(t.detach().to(work) for t in tangents)
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
        if backend != "fd":
            out, dout = (_func_jvp if backend == "func" else _dual_jvp)(fn, primals, tangents)
            return (out if primal_out else None), dout
        h = FD_EPS.get(work, 5e-5) if eps is None else float(eps)
        if not h > 0:
            raise ValueError(f"the finite-difference step eps must be positive, got {eps}")
        with promoted(modules, work) if work != dtype else contextlib.nullcontext():
            f_plus = fn(*(p + h * t for p, t in zip(primals, tangents)))
            f_minus = fn(*(p - h * t for p, t in zip(primals, tangents)))
            dout = (f_plus.to(work) - f_minus.to(work)) / (2.0 * h)
            out = fn(*primals).to(dtype) if primal_out else None
        return out, dout.to(dtype)


def _one_pass(backend: str, primals: Sequence[Tensor], dtype: torch.dtype, modules: Sequence[nn.Module]) -> bool:
    """Whether ``jvp(..., with_grad=True)`` can take the with-grad forward and the JVP from one dual pass: backend
    ``"forward_ad"``, grad enabled, no autocast, primals already in their computing ``dtype`` and no network of
    ``modules`` compiled by ``flowmap.compiled.compile_net`` (its dual pass would run eager: a compiled network
    keeps its compiled with-grad forward)."""
    from flowmap.compiled import is_compiled

    return (
        backend == "forward_ad"
        and not any(is_compiled(m) for m in modules)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(primals[0].device.type)
        and all(p.dtype == dtype for p in primals)
    )


def _trained_jvp(fn: Callable[..., Tensor], primals: tuple, tangents: tuple, backend: str, eps: float | None):
    """``jvp(..., with_grad="both")``: output and JVP with autograd history, in the primals' dtype, autocast as the
    caller set it; ``"fd"``'s output is the mean of its two evaluations."""
    if backend == "func":
        return _func_jvp(fn, primals, tangents)
    if backend == "forward_ad":
        return _dual_jvp(fn, primals, tangents)
    h = FD_EPS.get(compute_dtype(primals[0].dtype), 5e-5) if eps is None else float(eps)
    if not h > 0:
        raise ValueError(f"the finite-difference step eps must be positive, got {eps}")
    plus = fn(*(p + h * t for p, t in zip(primals, tangents)))
    minus = fn(*(p - h * t for p, t in zip(primals, tangents)))
    return 0.5 * (plus + minus), (plus - minus) / (2 * h)


def view_tangents(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook that re-packs each dual tensor argument whose tangent is not a view with a view of that
    tangent (same values, no copy); a no-op outside a forward-AD level. Register it with
    ``module.register_forward_pre_hook(view_tangents, with_kwargs=True, prepend=True)`` on a module whose wrapper
    hands its inputs through a custom autograd Function that returns them as-is: FSDP2's ``fully_shard``
    (``RegisterPostBackwardFunction``, under grad). PyTorch requires such a Function's jvp to return a view of each
    input's tangent; FSDP's returns the tangents as-is, which passes only when a tangent already is a view (one from
    ``make_dual``, or a rule's ``broadcast_to``), and fails for the fresh tangent of a residual add or a linear layer
    ("A custom Function's forward is returning a view ... but the jvp is not returning a view")."""
    if forward_ad._current_level < 0:
        return None

    def repack(a):
        if not isinstance(a, Tensor):
            return a
        primal, tangent = forward_ad.unpack_dual(a)
        if tangent is None or tangent._is_view():
            return a
        return forward_ad.make_dual(primal, tangent.view_as(tangent))

    return tuple(repack(a) for a in args), {k: repack(v) for k, v in kwargs.items()}


def _backend_error(backend: str, err: BaseException) -> BaseException:
    """``JVPBackendError`` naming the backend when ``err`` says a layer lacks a forward-mode rule, else ``err``."""
    msg = str(err)
    if isinstance(err, NotImplementedError) or any(k in msg.lower() for k in _NO_FORWARD_RULE):
        first = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
        api = "torch.func.jvp" if backend == "func" else "torch.autograd.forward_ad"
        return JVPBackendError(
            f'JVP backend "{backend}" ({api}) cannot differentiate this network: {first} '
            f'Use backend="fd" (central finite differences) or give the layer a forward-mode rule '
            f"(see flowmap.nets.attention for attention)."
        )
    return err


def _dual_jvp(
    fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], detach_tangents: bool = False
) -> tuple[Tensor, Tensor]:
    try:  # one call per layer, no zero tangents (flowmap.jvp_rules)
        with forward_ad.dual_level(), dual_rules(detach_tangents):
            out = fn(*(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)))
            if not isinstance(out, Tensor):
                raise ValueError(f"jvp: fn must return one tensor, got {type(out).__name__}")
            out, dout = forward_ad.unpack_dual(out)
    except (NotImplementedError, RuntimeError) as err:
        if "nested forward mode ad" in str(err).lower():
            raise JVPBackendError(
                'JVP backend "forward_ad" cannot run inside another forward-mode AD level; use backend="func"'
            ) from err
        new = _backend_error("forward_ad", err)
        if new is err:
            raise
        raise new from err
    if dout is None:  # the output does not depend on the primals along the tangents
        dout = torch.zeros_like(out)
    if detach_tangents:
        return out, dout.to(primals[0].dtype)
    return out.to(primals[0].dtype), dout.to(primals[0].dtype)


def _func_jvp(
    fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    try:
        with constant_weight_rules():  # one product per linear layer (flowmap.jvp_rules)
            out, dout = torch.func.jvp(fn, primals, tangents)
    except (NotImplementedError, RuntimeError) as err:
        new = _backend_error("func", err)
        if new is err:
            raise
        raise new from err
    return out.to(primals[0].dtype), dout.to(primals[0].dtype)


__all__ = [
    "BACKENDS",
    "WITH_GRAD",
    "FD_EPS",
    "JVPBackendError",
    "check_backend",
    "compute_dtype",
    "jvp",
    "parse_fd_dtype",
    "promoted",
    "require_inner",
    "view_tangents",
]
