"""``compile: true`` (flowmap.compiled.compile_net via the modules' ``configure_model``): one training step of flow
matching (TeacherModule) and of MeanFlow (DistillModule, every pair s != t, forward-mode JVP) on a tiny MLP gives the
eager loss and gradients to float tolerance (1e-5 relative); the with-grad forward took the compiled path and the
JVP pass the eager one. Skipped when no C++ compiler is on PATH (inductor builds C++ kernels on CPU)."""

from __future__ import annotations

import pytest
import torch

from flowmap.compiled import compile_calls, has_c_compiler

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not has_c_compiler(), reason="inductor needs a C++ compiler (none on PATH)"),
]

NET = {"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "emb_dim": 32}


def _module(kind: str, compile: bool):
    torch.manual_seed(0)
    if kind == "fm":
        from flowmap.lightning.teacher_module import TeacherModule

        return TeacherModule(net=dict(NET), compile=compile)
    from flowmap.lightning.distill_module import DistillModule

    objective = {"name": "meanflow", "source": "data", "equal_share": 0.0}
    return DistillModule(student={"net": dict(NET)}, objective=objective, compile=compile)


def _step(module, x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    if hasattr(module, "loss_fn"):
        loss = module.loss_fn(module.net, x0, None).loss.mean()
    else:
        loss = module.objective(student=module.student, teacher=None, target=None, x0=x0, cond=None, step=0).loss.mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["fm", "meanflow"])
def test_compiled_step_matches_eager(kind):
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    eager, compiled = _module(kind, False), _module(kind, True)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    eager.configure_model()
    nets = compiled.compiled_networks()
    assert nets and all("_flowmap_compile" in n.__dict__ for n in nets)
    assert not any("_flowmap_compile" in n.__dict__ for n in eager.compiled_networks())
    loss0, g0 = _step(eager, x0)
    loss1, g1 = _step(compiled, x0)
    assert float((loss1 - loss0).abs() / loss0.abs()) < 1e-5
    assert set(g0) == set(g1) and g0
    worst = max(float((g1[n] - g0[n]).abs().max() / (g0[n].abs().max() + 1e-12)) for n in g0)
    assert worst < 1e-5, worst
    calls = compile_calls(nets[0])
    assert calls["compiled"] >= 1
    assert calls["eager"] == (1 if kind == "meanflow" else 0)  # the JVP pass, and only it, ran eager
