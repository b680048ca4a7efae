"""The trainers' optimizer (``flowmap.optim.adam``) and the pure-torch loop (``flowmap.training.TrainLoop``):
the fused kernel computes PyTorch's Adam / AdamW update, it is chosen where it applies and refused with one
clear line where it does not, and the loop's schedule and steps are the ones ``fit`` documents."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flowmap.optim import adam, fused_supported
from flowmap.training import TrainLoop, fit
from flowmap.types import LossOutput


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 3)).to(dtype)


def _run(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 3, generator=g, dtype=next(net.parameters()).dtype)
        loss = (net(x) - x.flip(1)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adam_takes_the_reference_steps(decoupled: bool, dtype: torch.dtype) -> None:
    net_fused, net_ref = _net(dtype=dtype), _net(dtype=dtype)
    opt = adam(net_fused.parameters(), lr=1e-2, weight_decay=0.1, decoupled=decoupled)
    assert opt.defaults["fused"] is True  # the CPU has the kernel in this torch
    assert isinstance(opt, torch.optim.AdamW if decoupled else torch.optim.Adam)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = cls(net_ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    before = [p.detach().clone() for p in net_ref.parameters()]
    _run(net_fused, opt)
    _run(net_ref, ref)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    moved = 0.0
    for a, b, p0 in zip(net_fused.parameters(), net_ref.parameters(), before):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())
        moved = max(moved, (b - p0).abs().max().item())
    assert moved > 1e-3  # the steps did move the weights: the comparison is not between two copies of the start


def test_fused_choice_and_refusal() -> None:
    net = _net()
    assert fused_supported(list(net.parameters()))
    assert adam(net.parameters(), lr=1e-3, fused=False).defaults.get("fused") in (None, False)
    meta = nn.Linear(2, 2, device="meta")  # a device without the fused kernel: chosen off, refused if insisted on
    assert not fused_supported(list(meta.parameters()))
    assert adam(meta.parameters(), lr=1e-3).defaults.get("fused") in (None, False)
    with pytest.raises(ValueError, match="fused=True, but PyTorch's fused Adam does not take parameters on"):
        adam(meta.parameters(), lr=1e-3, fused=True)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adam(_net().requires_grad_(False).parameters(), lr=1e-3)


class _Regression(nn.Module):
    """An objective in the trainers' calling convention: regress the student's output onto x0 reversed."""

    needs_teacher = False
    uses_target = False

    def forward(self, *, student, teacher=None, target=None, x0, cond=None, step=0) -> LossOutput:
        return LossOutput(loss=(student(x0) - x0.flip(1)).pow(2).mean(1), logs={})


def test_train_loop_schedule_and_fit_agree() -> None:
    steps, lr, lr_final = 7, 1e-2, 1e-3
    net_a, net_b = _net(), _net()
    loop = TrainLoop(net_a, _Regression(), lr=lr, lr_final=lr_final, steps=steps)
    assert loop.lr_at(0) == pytest.approx(lr) and loop.lr_at(steps - 1) == pytest.approx(lr_final)
    assert loop.lr_at(3) == pytest.approx(lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, 3, generator=g) for _ in range(steps)]
    held = torch.cat(batches)
    before = float((net_a(held) - held.flip(1)).pow(2).mean())
    hist_a = [float(loop.step(x)[0]) for x in batches]
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(lr_final)
    hist_b = fit(net_b, _Regression(), lambda k: (batches[k], None), steps, lr=lr, lr_final=lr_final)
    assert hist_a == pytest.approx(hist_b, rel=1e-6)
    assert float((net_a(held) - held.flip(1)).pow(2).mean()) < 0.9 * before  # it trains
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)
    # a constant rate without a schedule; a schedule without its length is refused
    const = TrainLoop(copy.deepcopy(net_a), _Regression(), lr=lr)
    const.step(batches[0])
    assert const.opt.param_groups[0]["lr"] == lr
    with pytest.raises(ValueError, match="needs the number of steps"):
        TrainLoop(_net(), _Regression(), lr=lr, lr_final=lr_final)
    with pytest.raises(ValueError, match="lr_final must lie in"):
        TrainLoop(_net(), _Regression(), lr=lr, lr_final=2 * lr, steps=3)


def test_lightning_modules_use_the_fused_kernel_unless_a_grad_scaler_clips() -> None:
    from types import SimpleNamespace

    from flowmap.lightning.teacher_module import TeacherModule

    module = TeacherModule({"name": "mlp", "data_shape": [2], "width": 16, "depth": 2, "emb_dim": 16}, lr=1e-3)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    # 16-mixed on a GPU: Lightning unscales before clipping, which a fused optimizer would refuse
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), max_steps=-1)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")
