"""The JVP engine (flowmap/jvp.py): accuracy against a float64 reference for the MLP, UNet and DiT
students, the attention's own forward-mode rule, bf16 autocast, and the errors.

Reference: a float64 deep copy of the student, differentiated by a fourth-order (5-point) central
difference with h = 1e-5 (truncation ~h^4, round-off ~1e-16 / h: ~1e-10 relative). We compare
    forward_ad (float64 net) vs reference < 1e-8 (the dual rules' formulas, free of float32 round-off)
    forward_ad, func (float32 net)  vs reference   < 1e-5   (forward-mode AD in float32)
    fd   (float64 copy) vs reference   < 1e-5   (the fd backend's own O(h^2) rule, default h, in float64)
    fd   (float32 net, fd_dtype=float64) < 1e-5 (the engine promotes the net for the tangent pass only)
    fd   (float32 net)  vs reference   < 3e-3   (fd in float32 is limited by round-off / h; stated, not hidden)
Errors are relative in the 2-norm over the whole batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowmap.jvp import JVPBackendError, jvp, require_inner
from flowmap.nets import build_net
from flowmap.nets.attention import attention, attention_jvp, math_attention
from flowmap.student import FlowMap

NETS = {
    # DDPM's time scale 1000 (not the nets' default 10): the rules must hold through a fast-varying embedding
    "mlp": {"name": "mlp", "data_shape": [2], "width": 64, "depth": 3, "time_scale": 1000.0},
    "mlp_fourier": {
        "name": "mlp",
        "data_shape": [2],
        "width": 64,
        "depth": 3,
        "fourier_features": 4,
        "time_scale": 10.0,
    },
    "unet": {
        "name": "unet",
        "data_shape": [1, 8, 8],
        "channels": 16,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "heads": 2,
        "emb_dim": 32,
        "num_classes": 3,
        "time_scale": 1000.0,
    },
    "dit": {"name": "dit", "data_shape": [1, 8, 8], "dim": 32, "depth": 2, "heads": 2, "num_classes": 3},
}


def randomized_student(name: str) -> FlowMap:
    """A student whose zero-initialized layers (interval embedding, adaLN, output heads) are perturbed,
    so every input, s included, moves the output."""
    student = FlowMap(build_net(NETS[name]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            fan_in = p.shape[1] if p.dim() > 1 else 1
            p.add_(torch.randn(p.shape, generator=g) * (0.3 / fan_in**0.5 if p.dim() > 1 else 0.1))
    return student.eval()


def inputs(student: FlowMap, batch: int = 4):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, *student.data_shape, generator=g)
    s = 0.2 + 0.7 * torch.rand(batch, generator=g)
    t = s * torch.rand(batch, generator=g)
    dx = torch.randn(x.shape, generator=g)
    ds, dt = torch.ones(batch), 0.5 * torch.randn(batch, generator=g)
    cond = torch.randint(0, student.num_classes, (batch,), generator=g) if student.num_classes else None
    return (x, s, t), (dx, ds, dt), cond


def reference_jvp(fn, primals, tangents, h: float = 1e-5) -> torch.Tensor:
    """Fourth-order central difference in float64."""

    def at(e: float) -> torch.Tensor:
        return fn(*(p + e * d for p, d in zip(primals, tangents)))

    with torch.no_grad():
        return (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", ["mlp", "mlp_fourier", "unet", "dit"])
def test_func_and_fd_match_float64_reference(name):
    student = randomized_student(name)
    student64 = copy.deepcopy(student).double()
    primals, tangents, cond = inputs(student)
    p64 = tuple(p.double() for p in primals)
    t64 = tuple(d.double() for d in tangents)
    ref = reference_jvp(lambda x, s, t: student64.average_velocity(x, s, t, cond), p64, t64)
    assert ref.norm() > 1e-2  # the direction actually moves the output

    out32, d_func = jvp(lambda x, s, t: student.average_velocity(x, s, t, cond), primals, tangents, "func")
    out_dual, d_dual = jvp(lambda x, s, t: student.average_velocity(x, s, t, cond), primals, tangents, "forward_ad")
    _, d_dual64 = jvp(lambda x, s, t: student64.average_velocity(x, s, t, cond), p64, t64, "forward_ad")
    _, d_fd64 = jvp(lambda x, s, t: student64.average_velocity(x, s, t, cond), p64, t64, "fd")
    _, d_fd32 = jvp(lambda x, s, t: student.average_velocity(x, s, t, cond), primals, tangents, "fd")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    _, d_fd_promoted = jvp(
        lambda x, s, t: student.average_velocity(x, s, t, cond),
        primals,
        tangents,
        "fd",
        fd_dtype="float64",
        modules=(student,),
    )
    e_func, e_fd64, e_fd32 = rel(d_func, ref), rel(d_fd64, ref), rel(d_fd32, ref)
    e_promoted, e_dual, e_dual64 = rel(d_fd_promoted, ref), rel(d_dual, ref), rel(d_dual64, ref)
    print(
        f"{name}: rel. error vs float64 reference: forward_ad(f64) {e_dual64:.2e}  forward_ad(f32) {e_dual:.2e}  "
        f"func(f32) {e_func:.2e}  fd(f64) {e_fd64:.2e}  fd(f32 net, fd_dtype=float64) {e_promoted:.2e}  "
        f"fd(f32) {e_fd32:.2e}"
    )
    assert d_func.dtype == torch.float32 and d_fd64.dtype == torch.float64 and d_fd_promoted.dtype == torch.float32
    assert d_dual.dtype == torch.float32 and d_dual64.dtype == torch.float64
    assert e_dual64 < 1e-8
    assert e_dual < 1e-5
    assert torch.equal(out_dual, out32)
    assert e_func < 1e-5
    assert e_fd64 < 1e-5
    assert e_promoted < 1e-5
    assert e_fd32 < 3e-3
    # the promotion is undone: same dtypes and bit-identical weights
    for k, v in student.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    # the primal output of the func backend is the plain forward
    with torch.no_grad():
        assert torch.allclose(out32, student.average_velocity(*primals, cond), atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "unet", "dit"])
def test_constant_weight_rules_match_pytorchs_rules_and_fire(name, monkeypatch):
    """flowmap.jvp_rules: linear layers on dual inputs take one product (dx W^T) instead of PyTorch's
    dx W^T + x 0^T; the tangent equals PyTorch's own rule and every linear layer that carries a tangent goes
    through it."""
    from flowmap import jvp_rules

    student = randomized_student(name)
    primals, tangents, cond = inputs(student)
    fn = lambda x, s, t: student.average_velocity(x, s, t, cond)  # noqa: E731
    with torch.no_grad():
        out_builtin, d_builtin = torch.func.jvp(fn, primals, tangents)
    calls = [0]
    original = jvp_rules._ConstantWeightLinear.jvp

    def counted(ctx, *args):
        calls[0] += 1
        return original(ctx, *args)

    monkeypatch.setattr(jvp_rules._ConstantWeightLinear, "jvp", staticmethod(counted))
    out, d_rules = jvp(fn, primals, tangents, "func")
    n_linear = sum(isinstance(m, nn.Linear) for m in student.modules())
    print(
        f"{name}: {calls[0]} rule calls for {n_linear} linear layers; "
        f"max |tangent difference| {float((d_rules - d_builtin).abs().max()):.1e}"
    )
    assert torch.allclose(d_rules, d_builtin, rtol=1e-6, atol=1e-6) and torch.equal(out, out_builtin)
    assert n_linear - 2 <= calls[0] <= n_linear  # label / guidance embeddings carry no tangent
    # outside the no-grad tangent pass nothing is rerouted: a with-grad forward still trains the weights
    loss = student.average_velocity(*primals, cond).pow(2).sum()
    loss.backward()
    assert calls[0] <= n_linear and all(
        p.grad is not None for p in student.parameters() if p.requires_grad and p.dim() > 1
    )


@pytest.mark.parametrize("name", ["mlp", "mlp_fourier", "unet", "dit"])
def test_dual_rules_match_pytorchs_rules_and_fire(name, monkeypatch):
    """flowmap.jvp_rules.dual_rules: linear, conv, layer/group norm, GELU and SiLU on forward_ad duals, and the
    attention's dual path, give PyTorch's own forward-mode tangent (float64, so only round-off differs) and
    every rule fires on every layer of its kind that carries a tangent."""
    from torch.autograd import forward_ad

    from flowmap import jvp_rules
    from flowmap.nets import attention as attention_module

    student = copy.deepcopy(randomized_student(name)).double()
    primals, tangents, cond = inputs(student)
    primals, tangents = tuple(p.double() for p in primals), tuple(d.double() for d in tangents)
    fn = lambda x, s, t: student.average_velocity(x, s, t, cond)  # noqa: E731
    # PyTorch's rules: forward_ad without ours, math attention in place of the fused kernel
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", lambda q, k, v: math_attention(q, k, v))
    with torch.no_grad(), forward_ad.dual_level():
        out = fn(*(forward_ad.make_dual(p, d) for p, d in zip(primals, tangents)))
        out_builtin, d_builtin = (a.clone() for a in forward_ad.unpack_dual(out))
    monkeypatch.undo()
    calls: dict[str, int] = {}
    for func, rule in list(jvp_rules._DUAL_RULES.items()):

        def counted(args, kwargs, rule=rule, key=rule.__name__):
            out = rule(args, kwargs)
            calls[key] = calls.get(key, 0) + (out is not None)
            return out

        monkeypatch.setitem(jvp_rules._DUAL_RULES, func, counted)
    original_attention = attention_module._dual_attention

    def counted_attention(*args):
        calls["attention"] = calls.get("attention", 0) + 1
        return original_attention(*args)

    monkeypatch.setattr(attention_module, "_dual_attention", counted_attention)
    out, d_rules = jvp(fn, primals, tangents, "forward_ad")
    print(f"{name}: rule calls {calls}; rel. difference to PyTorch's rules {rel(d_rules, d_builtin):.1e}")
    assert rel(d_rules, d_builtin) < 1e-12 and rel(out, out_builtin) < 1e-12
    kinds = {
        "_linear": nn.Linear,
        "_conv2d": nn.Conv2d,
        "_layer_norm": nn.LayerNorm,
        "_group_norm": nn.GroupNorm,
        "_gelu": nn.GELU,
    }
    for key, kind in kinds.items():
        n = sum(isinstance(m, kind) for m in student.modules())
        assert (n - 2 if key == "_linear" else n) <= calls.get(key, 0) <= n, (
            key,
            n,
            calls,
        )  # label/guidance embeddings: no tangent
    assert calls.get("_silu", 0) >= 1
    n_attention = sum(type(m).__name__ in ("JVPAttention", "AttnBlock") for m in student.modules())
    assert calls.get("attention", 0) == n_attention and name.startswith("mlp") == (n_attention == 0)


def test_attention_jvp_matches_math_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    dq, dk, dv = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    out, d_ours = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    out_ref, d_ref = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    assert rel(out, out_ref.double()) < 1e-6
    assert rel(d_ours, d_ref.double()) < 1e-5
    # query blocks (block < N) give the same tangent; float64 agreement is at round-off level
    d_blocks = attention_jvp(q, k, v, out, dq, dk, dv, block=3)
    assert rel(d_blocks, d_ref.double()) < 1e-5
    q64, k64, v64, dq64, dk64, dv64 = (a.double() for a in (q, k, v, dq, dk, dv))
    _, d64 = torch.func.jvp(attention, (q64, k64, v64), (dq64, dk64, dv64))
    _, d64_ref = torch.func.jvp(math_attention, (q64, k64, v64), (dq64, dk64, dv64))
    assert rel(d64, d64_ref) < 1e-12
    # the forward_ad dual path: same closed form without the autograd Function
    _, d_dual = jvp(attention, (q, k, v), (dq, dk, dv), "forward_ad")
    assert rel(d_dual, d_ref.double()) < 1e-5
    # and the backward of the custom Function is the math attention's gradient
    leaves = [a.clone().requires_grad_(True) for a in (q, k, v)]
    leaves_ref = [a.clone().requires_grad_(True) for a in (q, k, v)]
    (attention(*leaves) * dq).sum().backward()
    (math_attention(*leaves_ref) * dq).sum().backward()
    for a, b in zip(leaves, leaves_ref):
        assert rel(a.grad, b.grad.double()) < 1e-5


@pytest.mark.parametrize("backend", ["forward_ad", "func"])
@pytest.mark.parametrize("name", ["mlp", "dit"])
def test_jvp_under_bf16_autocast_runs_in_float32(name, backend):
    student = randomized_student(name)
    primals, tangents, cond = inputs(student)
    fn = lambda x, s, t: student.average_velocity(x, s, t, cond)  # noqa: E731
    _, plain = jvp(fn, primals, tangents, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, under = jvp(fn, tuple(p.bfloat16() if p.dim() > 1 else p for p in primals), tangents, backend)
        with torch.no_grad():
            with_grad_forward = student.average_velocity(*primals, cond)
    assert under.dtype == torch.float32
    # the tangent pass ignores autocast: only the bf16 rounding of the *input* x remains
    x_bf = primals[0].bfloat16().float()
    _, plain_rounded = jvp(fn, (x_bf, *primals[1:]), tangents, backend)
    assert rel(under, plain_rounded.double()) < 1e-6
    assert rel(under, plain.double()) < 5e-2
    assert with_grad_forward.dtype == torch.bfloat16  # the ordinary forward does run in bf16


@pytest.mark.parametrize("name", ["mlp_fourier", "unet", "dit"])
def test_with_grad_jvp_shares_the_with_grad_forward(name):
    """flowmap.jvp.jvp(..., with_grad=True): one network call gives the with-grad forward and the detached JVP, equal to
    the two-pass pattern (no-grad JVP, then a with-grad forward): outputs, tangents and the gradients of a
    semi-gradient loss ||u - sg(u - du)||^2 agree to round-off. Under bf16 autocast it falls back to two calls."""
    student = randomized_student(name).train()
    primals, tangents, cond = inputs(student, batch=6)
    calls = [0]
    student.net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    fn = lambda x, s, t: student.average_velocity(x, s, t, cond)  # noqa: E731

    def grads(out, dout):
        loss = (out - (out.detach() - dout)).pow(2).sum()
        return torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad], allow_unused=True)

    _, d_two = jvp(fn, primals, tangents, "forward_ad", primal_out=False)
    out_two = fn(*primals)
    g_two = grads(out_two, d_two)
    calls[0] = 0
    out, dout = jvp(fn, primals, tangents, with_grad=True)
    assert calls[0] == 1 and out.requires_grad and not dout.requires_grad
    g = grads(out, dout)
    assert rel(out, out_two.detach().double()) < 1e-6 and rel(dout, d_two.double()) < 1e-6
    pairs = [(a, b) for a, b in zip(g, g_two) if b is not None]
    assert len(pairs) > 4 and all(a is not None and rel(a, b.double()) < 1e-6 for a, b in pairs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        calls[0] = 0
        out_bf, dout_bf = jvp(fn, primals, tangents, with_grad=True)
    assert calls[0] == 2 and out_bf.dtype == torch.bfloat16 and dout_bf.dtype == torch.float32
    assert rel(dout_bf, d_two.double()) < 1e-6


class PlainSDPA(nn.Module):
    """A layer through PyTorch's fused attention, which has no forward-mode rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.reshape(x.shape[0], 1, 4, 2)
        return F.scaled_dot_product_attention(q, q, q).reshape(x.shape)


class NoJVPRule(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_unservable_backend_is_named_and_fd_serves_it():
    layer = PlainSDPA()
    x, dx = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(JVPBackendError, match=r'backend "func".*backend="fd"'):
        jvp(layer, (x,), (dx,), "func")
    with pytest.raises(ValueError, match='backend "func"'):  # JVPBackendError is a ValueError
        jvp(lambda a: NoJVPRule.apply(a), (x,), (dx,), "func")
    with pytest.raises(JVPBackendError, match=r'backend "forward_ad".*backend="fd"'):
        jvp(layer, (x,), (dx,), "forward_ad")
    with pytest.raises(JVPBackendError, match='backend "forward_ad"'):
        jvp(lambda a: NoJVPRule.apply(a), (x,), (dx,), "forward_ad")
    from torch.autograd import forward_ad

    with forward_ad.dual_level(), pytest.raises(JVPBackendError, match='another forward-mode AD level.*backend="func"'):
        jvp(torch.sin, (x,), (dx,), "forward_ad")
    _, d_fd = jvp(layer, (x,), (dx,), "fd")

    def math_layer(a):
        q = a.reshape(a.shape[0], 1, 4, 2)
        return math_attention(q, q, q).reshape(a.shape)

    _, d_ref = torch.func.jvp(math_layer, (x,), (dx,))
    assert rel(d_fd, d_ref.double()) < 3e-3


def test_bad_arguments():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="unknown JVP backend 'forward'"):
        jvp(torch.sin, (x,), (x,), "forward")
    with pytest.raises(ValueError, match="shape"):
        jvp(torch.sin, (x,), (x[:2],), "func")
    with pytest.raises(ValueError, match="as many tangents"):
        jvp(torch.sin, (x,), (), "func")
    with pytest.raises(ValueError, match="floating point"):
        jvp(torch.sin, (torch.ones(3, dtype=torch.long),), (torch.ones(3, dtype=torch.long),), "fd")
    with pytest.raises(ValueError, match="positive"):
        jvp(torch.sin, (x,), (x,), "fd", eps=0.0)
    with pytest.raises(ValueError, match="need the networks fn calls"):
        jvp(torch.sin, (x,), (x,), "fd", fd_dtype="float64")
    with pytest.raises(ValueError, match="unknown finite-difference dtype"):
        jvp(torch.sin, (x,), (x,), "fd", fd_dtype="float16")
    with pytest.raises(ValueError, match="unknown JVP with_grad mode 'output'"):
        jvp(torch.sin, (x,), (x,), with_grad="output")
    with pytest.raises(ValueError, match="positive"):
        jvp(torch.sin, (x,), (x,), "fd", eps=-1.0, with_grad="both")
    wrapped = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        require_inner(wrapped)
    lin = nn.Linear(2, 2)
    assert require_inner(lin) is lin


def test_fd_and_func_agree_on_a_closed_form():
    """d/de sin(a + e da) * b^2 = cos(a) da b^2 + 2 sin(a) b db: exact to round-off."""
    g = torch.Generator().manual_seed(4)
    a, b, da, db = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4))
    exact = torch.cos(a) * da * b**2 + 2 * torch.sin(a) * b * db
    fn = lambda a_, b_: torch.sin(a_) * b_**2  # noqa: E731
    out, d_func = jvp(fn, (a, b), (da, db), "func")
    _, d_fd = jvp(fn, (a, b), (da, db), "fd")
    _, d_dual = jvp(fn, (a, b), (da, db), "forward_ad")
    assert rel(d_func, exact) < 1e-14
    assert rel(d_dual, exact) < 1e-14
    assert rel(d_fd, exact) < 1e-9
    assert torch.allclose(out, fn(a, b))
