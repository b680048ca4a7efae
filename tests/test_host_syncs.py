"""No host sync in the hot path (issue 19): one training step of every registered objective, on the MLP and on the
DiT, through ``DistillModule.training_step`` and the Lightning mixin's guarded ``optimizer_step`` (forward, backward,
non-finite guard, optimizer step, EMA updates), makes no call that waits for the device.

On CPU the calls that would sync on a GPU are counted by wrapping them (``Tensor.item``, ``__bool__``, ``__float__``,
``__int__``, ``__index__``, ``tolist``, ``cpu``, ``numpy``, ``nonzero``, ``torch.nonzero``, ``torch.unique``,
``masked_select`` and indexing with a boolean tensor); with a GPU, ``torch.cuda.set_sync_debug_mode("error")`` makes
any sync raise. The first step initialises state (optimizer moments, progressive rounds), so the second is counted."""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from weights import trained_like

from flowmap.lightning.distill_module import DistillModule
from flowmap.nets import build_net
from flowmap.objectives import OBJECTIVES
from flowmap.velocity import NetVelocity
from teachers.gmm import preset_mixture

NETS = {
    "mlp": {"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8},
    "dit": {"name": "dit", "data_shape": [1, 4, 4], "patch": 2, "dim": 16, "depth": 1, "heads": 2},
}
TENSOR_METHODS = (
    "item",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "masked_select",
)
TORCH_FUNCTIONS = ("nonzero", "unique", "masked_select")
# torch.optim keeps Adam's step counters on the host (a CPU tensor read with .item(): no device sync)
ALLOWED_FILES = ("torch/optim/",)


class _MaskIndexing(TorchFunctionMode):
    """Calls ``record("boolean-mask indexing")`` for every ``x[mask]`` with a boolean tensor index."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and len(args) > 1:
            items = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                self.record("boolean-mask indexing")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_syncs():
    """Yields a list that collects (call, stack) for every host-syncing call made inside the block."""
    calls: list[tuple[str, str]] = []
    saved = []
    depth: list[str] = []

    def record(name: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if stack and any(part in stack[-1].filename.replace("\\", "/") for part in ALLOWED_FILES):
            return
        calls.append((name, "".join(traceback.format_list(stack[-6:]))))

    def wrap(owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            if not depth:  # the mode below hands the wrapped call back to it once more: count the outer call only
                record(label)
            depth.append(label)
            try:
                return original(*args, **kwargs)
            finally:
                depth.pop()

        saved.append((owner, attr, vars(owner).get(attr)))
        setattr(owner, attr, counted)

    for attr in TENSOR_METHODS:
        wrap(torch.Tensor, attr, f"Tensor.{attr}")
    for attr in TORCH_FUNCTIONS:
        wrap(torch, attr, f"torch.{attr}")
    try:
        with _MaskIndexing(record):  # a mode: patching Tensor.__getitem__ would leave Tensor a sequence type
            yield calls
    finally:  # restore the class dicts as they were: an inherited method is deleted again, not copied in
        for owner, attr, original in reversed(saved):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def distill_module(objective: str, net: str) -> DistillModule:
    config = NETS[net]
    if net == "mlp":
        teacher = preset_mixture("ring8")
    else:
        teacher = NetVelocity(trained_like(build_net(config)), "linear", "velocity").eval()
    module = DistillModule(student={"net": config}, objective={"name": objective}, teacher=teacher)
    trained_like(module.student.net, seed=6)  # the DiT's zero-initialised output layers would give zero losses
    return module


def batch_for(net: str) -> torch.Tensor:
    return torch.randn(8, *NETS[net]["data_shape"])


def train_step(module: DistillModule, optimizer, batch: torch.Tensor) -> None:
    """What Lightning's automatic optimization runs per step: the closure (zero_grad, training_step, backward)
    inside the module's guarded optimizer_step."""

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 0)
        loss.backward()
        return loss

    module.optimizer_step(0, 0, optimizer, closure)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_one_training_step_makes_no_host_sync(objective, net):
    module = distill_module(objective, net)
    optimizer = module.configure_optimizers()["optimizer"]
    train_step(module, optimizer, batch_for(net))  # warm-up: optimizer state, progressive rounds
    before = [p.detach().clone() for p in module.student.parameters()]
    batch = batch_for(net)
    with count_syncs() as calls:
        train_step(module, optimizer, batch)
    assert not calls, f"{len(calls)} host sync(s) in a {objective} step on the {net}: {calls[0][0]}\n{calls[0][1]}"
    assert any(not torch.equal(a, p) for a, p in zip(before, module.student.parameters()))  # the step trained


# class-conditional students with label dropout and a guidance range where the method takes them
CONDITIONAL_NET = dict(NETS["dit"], num_classes=2)
CONDITIONAL = {
    "ayf_emd": {"guidance_max": 2.0},
    "ayf_lmd": {"guidance_max": 2.0},
    "cd": {"guidance_max": 2.0},
    "ctm": {"guidance_max": 2.0, "dsm_source": "teacher"},
    "meanflow": {"guidance_max": 2.0, "p_uncond": 0.2},
    "pd": {"guidance_max": 2.0},
    "scd": {"guidance_max": 2.0, "p_uncond": 0.2},
    "shortcut": {"guidance_max": 2.0, "p_uncond": 0.2},
    "fmsd_eulerian": {"p_uncond": 0.2},
    "fmsd_lagrangian": {"p_uncond": 0.2},
    "fmsd_progressive": {"p_uncond": 0.2},
}


@pytest.mark.parametrize("objective", sorted(CONDITIONAL))
def test_conditional_guided_step_makes_no_host_sync(objective):
    """Labels, label dropout and a guidance-scale input (the objective called as ``training_step`` calls it)."""
    extra = CONDITIONAL[objective]
    student = dict(CONDITIONAL_NET, guidance_input="guidance_max" in extra)
    teacher = NetVelocity(trained_like(build_net(CONDITIONAL_NET)), "linear", "velocity").eval()
    module = DistillModule(student={"net": student}, objective={"name": objective, **extra}, teacher=teacher)
    trained_like(module.student.net, seed=6)
    optimizer = module.configure_optimizers()["optimizer"]

    def step(x0: torch.Tensor, cond: torch.Tensor) -> None:
        def closure():
            optimizer.zero_grad(set_to_none=True)
            out = module.objective(
                student=module.student,
                teacher=module.teacher,
                target=module.target,
                x0=x0,
                cond=cond,
                step=module.global_step,
            )
            loss = out.loss.mean()
            loss.backward()
            return loss

        module.optimizer_step(0, 0, optimizer, closure)

    step(torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,)))
    x0, cond = torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))
    before = [p.detach().clone() for p in module.student.parameters()]
    with count_syncs() as calls:
        step(x0, cond)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.student.parameters()))  # the step trained
    assert not calls, f"{len(calls)} host sync(s) in a conditional {objective} step: {calls[0][0]}\n{calls[0][1]}"


def test_the_counter_sees_syncs():
    x = torch.randn(4)
    with count_syncs() as calls:
        x.sum().item()
        if torch.any(x > 10):
            pass
        _ = x[x > 0]
        torch.nonzero(x)
    assert [c[0] for c in calls] == ["Tensor.item", "Tensor.__bool__", "boolean-mask indexing", "torch.nonzero"]
    with count_syncs() as calls:
        torch.where(x > 0, x, 0 * x).sum()
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_one_training_step_on_gpu_makes_no_sync(objective):
    module = distill_module(objective, "dit").cuda()
    if isinstance(module.teacher, torch.nn.Module):
        module.teacher.cuda()
    optimizer = module.configure_optimizers()["optimizer"]
    train_step(module, optimizer, batch_for("dit").cuda())
    batch = batch_for("dit").cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(module, optimizer, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
