"""Activation checkpointing of the student (``flowmap.student.activation_checkpointing``,
``model.student.activation_checkpointing: true``).

- test_checkpointed_gradients_equal_plain_ones: one objective step of CD (teacher steps, EMA target) and MeanFlow
  (the forward-mode JVP: its shared primal-and-tangent pass runs through the checkpointed blocks) on a tiny DiT
  and a tiny UNet: the loss and every parameter's gradient equal the plain student's to 1e-6, while the tensors
  autograd keeps from the forward shrink (saved bytes at most 0.7x); the EMA / target copies keep working
  under no_grad, and the block forwards survive deepcopy.
- test_diffusers_student_uses_the_models_own_checkpointing: a student made from a diffusers DiT switches on the
  model's own gradient checkpointing (the recomputation sees the injected interval embedding); its CD and
  MeanFlow gradients equal the plain student's to 1e-6 with at most 0.7x the saved bytes.
- test_distill_module_key_and_typed_help: DistillModule(student={"net": ..., "activation_checkpointing": True})
  checkpoints the student's blocks (the MLP's residual blocks too); the key is listed in scripts/distill.py
  --help; a net without blocks is refused in one clear error.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.student import FlowMap, _Checkpointed, activation_checkpointing

NETS = {
    "dit": {"name": "dit", "data_shape": [2, 8, 8], "patch": 2, "dim": 32, "depth": 2, "heads": 2},
    "unet": {
        "name": "unet",
        "data_shape": [2, 8, 8],
        "channels": 8,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "heads": 2,
        "emb_dim": 16,
    },
}
OBJECTIVES = {"cd": {"name": "cd", "steps": 4, "solver": "euler"}, "meanflow": {"name": "meanflow"}}


def randomized(config: dict, seed: int) -> FlowMap:
    torch.manual_seed(seed)
    fm = FlowMap(build_net(dict(config)))
    with torch.no_grad():  # off the zero init, so every parameter gets a gradient
        for p in fm.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    return fm


def step(student, teacher, objective, x0) -> tuple[torch.Tensor, dict, int]:
    """One objective step: (loss, grads, bytes autograd saved in the forward)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    student.zero_grad()
    target = copy.deepcopy(student).requires_grad_(False) if objective.uses_target else None
    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = objective(student=student, teacher=teacher, target=target, x0=x0, cond=None, step=0)
        loss = out.loss.mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in student.named_parameters()}, saved[0]


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
@pytest.mark.parametrize("net", sorted(NETS))
def test_checkpointed_gradients_equal_plain_ones(net, method):
    student = randomized(NETS[net], 0)
    teacher = randomized(NETS[net], 1).requires_grad_(False)
    objective = build_objective(dict(OBJECTIVES[method]))
    x0 = torch.randn((4, 2, 8, 8), generator=torch.Generator().manual_seed(2))
    loss, grads, saved = step(student, teacher, objective, x0)
    ckpt = copy.deepcopy(student)
    wrapped = activation_checkpointing(ckpt)
    kinds = ("DiTBlock",) if net == "dit" else ("ResBlock", "AttnBlock")
    assert wrapped == sum(type(m).__name__ in kinds for m in ckpt.modules()) >= 2
    loss_c, grads_c, saved_c = step(ckpt, teacher, objective, x0)
    assert float((loss - loss_c).abs()) <= 1e-6 * max(1.0, float(loss.abs()))
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    for k, g in grads.items():
        assert float((g - grads_c[k]).abs().max()) < 1e-6, k
    assert saved_c < 0.7 * saved, (saved_c, saved)
    again = copy.deepcopy(ckpt)  # an EMA / target copy: its blocks call their own (copied) forward
    block = next(m for m in again.modules() if isinstance(m.__dict__.get("forward"), _Checkpointed))
    assert block.forward.forward.__self__ is block
    with torch.no_grad():
        s, t = torch.full((4,), 0.9), torch.full((4,), 0.2)
        assert torch.equal(again(x0, s, t), student(x0, s, t))


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_diffusers_student_uses_the_models_own_checkpointing(tmp_path, method):
    pytest.importorskip("diffusers")
    from flowmap.models import student_from_teacher
    from teachers import CheckpointTeacher
    from tests.latent_parts import dit_folder

    teacher = CheckpointTeacher(str(dit_folder(tmp_path / "dit")))
    student = student_from_teacher(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    objective = build_objective(dict(OBJECTIVES[method]))
    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    loss, grads, saved = step(student, teacher, objective, x0)
    ckpt = copy.deepcopy(student)
    assert activation_checkpointing(ckpt) == -1 and ckpt.net.model.gradient_checkpointing
    loss_c, grads_c, saved_c = step(ckpt, teacher, objective, x0)
    assert float((loss - loss_c).abs()) <= 1e-6 * max(1.0, float(loss.abs()))
    for k, g in grads.items():
        assert float((g - grads_c[k]).abs().max()) < 1e-6, k
    assert saved_c < 0.7 * saved, (saved_c, saved)


def test_distill_module_key_and_typed_help(capsys):
    import sys
    from pathlib import Path

    from flowmap.lightning.distill_module import DistillModule

    module = DistillModule(
        student={"net": dict(NETS["dit"]), "activation_checkpointing": True},
        teacher=randomized(NETS["dit"], 1),
        objective={"name": "meanflow"},
    )
    assert sum(isinstance(m.__dict__.get("forward"), _Checkpointed) for m in module.student.modules()) == 2
    plain = DistillModule(
        student={"net": dict(NETS["dit"])}, teacher=randomized(NETS["dit"], 1), objective={"name": "cd"}
    )
    assert not any(isinstance(m.__dict__.get("forward"), _Checkpointed) for m in plain.student.modules())
    assert activation_checkpointing(FlowMap(build_net({"name": "mlp", "data_shape": [2], "depth": 3}))) == 3
    with pytest.raises(ValueError, match="no blocks"):
        activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import distill

    with pytest.raises(SystemExit):
        distill.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Every student: activation_checkpointing: bool = False" in out
