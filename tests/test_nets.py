"""Backbones (flowmap/nets): shapes, the zero-initialized interval and guidance embeddings, labels, the
registry, rebuilding from ``net.config``, and the attention kernel with its own forward-mode rule."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from flowmap.nets import NETS, build_net
from flowmap.nets.attention import _FusedAttention, attention, math_attention

SMALL = {
    "mlp": {"name": "mlp", "data_shape": [3], "width": 32, "depth": 2, "emb_dim": 32},
    "mlp_fourier": {"name": "mlp", "data_shape": [3], "width": 32, "depth": 2, "emb_dim": 32, "fourier_features": 3},
    "unet": {
        "name": "unet",
        "data_shape": [2, 8, 8],
        "channels": 16,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "heads": 2,
        "emb_dim": 32,
    },
    "dit": {"name": "dit", "data_shape": [2, 8, 8], "patch": 2, "dim": 32, "depth": 2, "heads": 2},
}
ZERO_LAST = ("cond.emb_d.3.", "cond.emb_w.3.")  # the zero-initialized last layers of emb_d and emb_w


def _net(name: str, **kw):
    return build_net({**SMALL[name], **kw})


def _randomize(net, keep_zero: bool = True, seed: int = 1):
    """Perturb every parameter (so zero-initialized output heads and adaLN gates no longer hide the
    inputs), except, when ``keep_zero``, the last layers of emb_d and emb_w."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if keep_zero and name.startswith(ZERO_LAST):
                continue
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.add_(torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5 if p.dim() > 1 else 0.1))
    return net.eval()


def _inputs(net, B: int = 4, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *net.data_shape, generator=g)
    s = torch.rand(B, generator=g)
    t = s * torch.rand(B, generator=g)
    return x, s, t


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("num_classes,guidance_input", [(0, False), (3, True)])
def test_shape(name, num_classes, guidance_input):
    net = _net(name, num_classes=num_classes, guidance_input=guidance_input)
    assert net.data_shape == tuple(SMALL[name]["data_shape"])
    assert net.num_classes == num_classes and net.guidance_input == guidance_input
    x, s, t = _inputs(net, B=5)
    cond = torch.tensor([0, 1, 2, 3, 1]) if num_classes else None
    w = torch.full((5,), 2.0) if guidance_input else None
    out = _randomize(net)(x, s, t, cond, w)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.all(torch.isfinite(out))


@pytest.mark.parametrize("name", list(SMALL))
def test_fresh_net_ignores_s_and_w(name):
    """emb_d and emb_w end in zero layers: the output does not depend on the end time t (only through s - t)
    nor on w, but does on the current time s, so a student initialized from a teacher starts as its Euler step."""
    net = _net(name, num_classes=2, guidance_input=True)
    for prefix in ZERO_LAST:
        zero = [p for n, p in net.named_parameters() if n.startswith(prefix)]
        assert zero and all(torch.count_nonzero(p) == 0 for p in zero)
    _randomize(net, keep_zero=True)  # everything else is random, so the check has teeth
    x, s, t = _inputs(net)
    cond = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        base = net(x, s, t, cond, torch.ones(4))
        assert torch.equal(net(x, s, torch.rand(4), cond, torch.ones(4)), base)  # another end time t
        assert torch.equal(net(x, s, s, cond, torch.ones(4)), base)  # t = s, as a teacher calls it
        assert torch.equal(net(x, s, t, cond, torch.full((4,), 7.5)), base)  # another w
        assert (net(x, 0.5 * s, t, cond, torch.ones(4)) - base).abs().max() > 1e-4  # the current time s matters
        # once emb_d's last layer is not zero, t does matter
        _randomize(net, keep_zero=False, seed=3)
        assert (net(x, s, torch.rand(4), cond, torch.ones(4)) - net(x, s, t, cond, torch.ones(4))).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(SMALL))
def test_label_changes_output_after_training(name):
    """A fresh UNet / DiT ignores the label (zero-initialized output heads and residual branches); the
    label reaches the output after a few steps (head, then the last modulation, then the features)."""
    net = _net(name, num_classes=3)
    x, s, t = _inputs(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    cond = torch.tensor([0, 1, 2, 0])
    target = torch.randn_like(x)
    for _ in range(3):
        opt.zero_grad()
        (net(x, s, t, cond) - target).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        out = {c: net(x, s, t, torch.full((4,), c)) for c in range(4)}  # 3 = null label
        assert (out[0] - out[1]).abs().max() > 1e-4  # exactly 0 before training (zero-initialized heads)
        assert (out[1] - out[3]).abs().max() > 1e-4
        assert torch.equal(net(x, s, t, None), out[3])  # cond=None means the null label


@pytest.mark.parametrize("name", list(SMALL))
def test_config_rebuilds_identical_net(name):
    net = _randomize(_net(name, num_classes=2, guidance_input=True))
    cfg = json.loads(json.dumps(net.config))  # JSON-able
    assert cfg["name"] == SMALL[name]["name"]
    twin = build_net(cfg)
    assert twin.config == net.config
    sd, sd2 = net.state_dict(), twin.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape for k in sd)
    twin.load_state_dict(sd)
    x, s, t = _inputs(net)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x, s, t), net(x, s, t))


def test_build_net_errors():
    with pytest.raises(ValueError, match="unknown net 'resnet'"):
        build_net({"name": "resnet"})
    with pytest.raises(ValueError, match="must be a dict with a 'name'"):
        build_net({"width": 3})
    with pytest.raises(ValueError, match="must be a dict with a 'name'"):
        build_net("mlp")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['widht'\] for net 'mlp'"):
        build_net({"name": "mlp", "widht": 3})
    with pytest.raises(ValueError, match="data_shape must be \\(D,\\)"):
        build_net({"name": "mlp", "data_shape": [1, 8, 8]})
    with pytest.raises(ValueError, match="data_shape must be \\(C, H, W\\)"):
        build_net({"name": "unet", "data_shape": [2]})
    with pytest.raises(ValueError, match="divisible"):
        build_net({"name": "unet", "data_shape": [1, 6, 6], "channel_mult": [1, 2, 2]})
    with pytest.raises(ValueError, match="square images"):
        build_net({"name": "dit", "data_shape": [1, 8, 6]})
    with pytest.raises(ValueError, match="divisible by 4"):
        build_net({"name": "dit", "data_shape": [1, 8, 8], "dim": 30, "heads": 2})
    with pytest.raises(ValueError, match="fourier_features"):
        build_net({"name": "mlp", "fourier_features": 1.5})
    with pytest.raises(ValueError, match="fourier_scale"):
        build_net({"name": "mlp", "fourier_features": 2, "fourier_scale": 0.0})
    assert set(NETS) == {"mlp", "unet", "dit", "diffusers"}


def test_mlp_fourier_features():
    """gamma(x) = [x, sin(2^k w0 x), cos(2^k w0 x)] per coordinate; K = 0 leaves x and the config as they were."""
    net = _net("mlp_fourier", fourier_scale=0.5)
    x = torch.tensor([[1.0, -2.0, 0.25]])
    f = net.features(x)
    a = torch.tensor([0.5 * 2**k * v for v in (1.0, -2.0, 0.25) for k in range(3)])  # coordinate-major, octave-minor
    assert f.shape == (1, 3 * 7)
    assert torch.allclose(f[0], torch.cat([x[0], torch.sin(a), torch.cos(a)]), atol=1e-6)
    assert net.inp.in_features == 21 and net.config["fourier_features"] == 3 and net.config["fourier_scale"] == 0.5
    plain = _net("mlp")
    assert torch.equal(plain.features(x), x) and "fourier_features" not in plain.config and plain.inp.in_features == 3
    assert "freqs" not in net.state_dict()  # derived from the config, not saved


# ---- attention ------------------------------------------------------------------------------------


def _qkv(dtype, seed: int = 0, shape=(2, 3, 10, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(6)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_attention_matches_math_attention(dtype, tol):
    q, k, v, dq, dk, dv = _qkv(dtype)
    # value
    assert (attention(q, k, v) - math_attention(q, k, v)).abs().max().item() < tol
    # gradient, through the plain path and through the custom Function's backward
    grads = []
    for fn in (attention, _FusedAttention.apply, math_attention):
        leaves = [a.clone().requires_grad_(True) for a in (q, k, v)]
        (fn(*leaves) * dq).sum().backward()
        grads.append([a.grad for a in leaves])
    for ours in grads[:2]:
        for a, b in zip(ours, grads[2]):
            assert (a - b).abs().max().item() < tol
    # JVP by torch.func.jvp (functorch) and by torch.autograd.forward_ad (dual tensors)
    out, d_ours = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    out_ref, d_ref = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    assert (out - out_ref).abs().max().item() < tol
    assert (d_ours - d_ref).abs().max().item() < tol
    assert d_ref.abs().max().item() > 0.1
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, da) for a, da in ((q, dq), (k, dk), (v, dv))]
        d_dual = fwAD.unpack_dual(attention(*duals)).tangent
    assert (d_dual - d_ref).abs().max().item() < tol
    # tangents on only some inputs
    _, d_part = torch.func.jvp(lambda a: attention(a, k, v), (q,), (dq,))
    _, d_part_ref = torch.func.jvp(lambda a: math_attention(a, k, v), (q,), (dq,))
    assert (d_part - d_part_ref).abs().max().item() < tol


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_func_jvp_runs_through_unet_and_dit(name):
    net = _randomize(_net(name, num_classes=2), keep_zero=False)
    x, s, t = _inputs(net)
    dx = torch.randn_like(x)
    ds, dt = torch.ones(4), torch.zeros(4)
    fn = lambda a, b, c: net(a, b, c, torch.tensor([0, 1, 2, 1]))  # noqa: E731
    with torch.no_grad():
        out, tangent = torch.func.jvp(fn, (x, s, t), (dx, ds, dt))
        assert (out - fn(x, s, t)).abs().max() < 1e-5
        assert torch.all(torch.isfinite(tangent)) and tangent.abs().max() > 1e-4
        # agrees with a float64 central difference (time features reach ~1e3 rad per unit time, so h is
        # small; the precision study lives in test_jvp.py)
        net.double()
        h = 1e-6
        args = [a.double() for a in (x, s, t, dx, ds)]
        fd = (
            fn(args[0] + h * args[3], args[1] + h * args[4], args[2])
            - fn(args[0] - h * args[3], args[1] - h * args[4], args[2])
        ) / (2 * h)
        rel = ((tangent.double() - fd).norm() / fd.norm()).item()
        assert rel < 1e-4, f"{name}: func.jvp vs central difference, relative {rel:.3g}"


def test_fourier_time_float32_phases_are_reduced_in_float64():
    """FourierTime at scale 1000 (phases up to ~1e3 rad): the float32 features match the float64 module's to ~1e-6
    (phases formed in float64 and reduced mod 2 pi before the float32 cos / sin; float32 phases would be ~6e-5 off),
    and under forward_ad the closed-form tangent matches a float64 central difference."""
    from torch.autograd import forward_ad

    from flowmap.nets.embeddings import FourierTime

    emb = FourierTime(128, scale=1000.0)
    tau = torch.rand(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float().double()
    ref = copy.deepcopy(emb).double()(tau)  # the same (float32-representable) times
    out = emb(tau.float())
    assert out.dtype == torch.float32 and float((out.double() - ref).abs().max()) < 2e-6
    dtau = torch.randn(256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with forward_ad.dual_level():
        _, d_rule = forward_ad.unpack_dual(copy.deepcopy(emb).double()(forward_ad.make_dual(tau, dtau)))
    emb64, h = copy.deepcopy(emb).double(), 1e-7
    d_ref = (emb64(tau + h * dtau) - emb64(tau - h * dtau)) / (2 * h)  # float64 central difference, ~1e-8 relative
    assert float((d_rule - d_ref).abs().max() / d_ref.abs().max()) < 1e-6
