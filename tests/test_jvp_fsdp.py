"""The shared forward-mode pass (flowmap.jvp.jvp(..., with_grad=True), flowmap.jvp_rules) through a DiT sharded by
flowmap.lightning.sharding.shard_net (FSDP2 ``fully_shard``, one gloo process): the output, its tangent and the
parameter gradients equal the unsharded net's (1e-6). FSDP's pre-forward passes each unit's inputs through a custom
autograd Function whose jvp returns the tangents as-is, which PyTorch accepts only for view tangents; the rules give
the blocks fresh (non-view) tangents, so without ``flowmap.jvp.view_tangents`` this pass raises."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.autograd import forward_ad

from flowmap.jvp import jvp
from flowmap.lightning.sharding import shard_net
from flowmap.nets import build_net

NET = {"name": "dit", "data_shape": [1, 8, 8], "patch": 2, "dim": 32, "depth": 2, "heads": 2}


@pytest.fixture
def mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _step(net, x, s, t, dx):
    out, dout = jvp(lambda *a: net(*a), (x, s, t), (dx, torch.ones_like(s), torch.zeros_like(t)), with_grad=True)
    out.square().sum().backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in net.named_parameters()}
    return out.detach(), dout, grads


def test_shared_pass_through_fsdp_units_matches_the_unsharded_net(mesh):
    torch.manual_seed(0)
    ref = build_net(dict(NET))
    with torch.no_grad():  # no zero-init gates or head: every block's tangent reaches the output
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    sharded = shard_net(copy.deepcopy(ref), mesh)
    x, dx = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    s, t = torch.rand(4), torch.rand(4)

    views = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: views.append(forward_ad.unpack_dual(a[0])[1]._is_view()))
        for b in ref.blocks
    ]
    out_ref, dout_ref, grads_ref = _step(ref, x, s, t, dx)
    for h in hooks:
        h.remove()
    assert False in views  # the case FSDP's jvp rejects: a block input whose tangent is not a view

    out, dout, grads = _step(sharded, x, s, t, dx)
    assert float(dout_ref.abs().max()) > 1e-2
    assert torch.allclose(out, out_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dout, dout_ref, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(grads_ref)
    assert all(torch.allclose(grads[n], grads_ref[n], rtol=1e-6, atol=1e-7) for n in grads)
