"""LoRA students (LCM-LoRA style): low-rank adapters trained on the frozen copy of the teacher's network; the
merged export samples like the adapter version, and the adapter alone, applied to a fresh copy, does too."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flowmap.app import load_student
from flowmap.io import read_config
from flowmap.models import load_lora_adapter, save_lora_adapter, save_student, student_from_teacher
from flowmap.nets.diffusers_net import merged_lora
from flowmap.objectives import build_objective
from flowmap.solvers import solve
from flowmap.student import FlowMap
from flowmap.training import fit
from tests.test_teacher_init_student import ddim, rel, teacher_of, unet

LORA = {"rank": 2, "alpha": 4.0}


def test_lora_student_trains_adapters_only_and_exports_merged_and_alone(tmp_path):
    teacher = teacher_of(unet(), ddim("epsilon"))
    student = student_from_teacher(teacher, lora=LORA)
    g = torch.Generator().manual_seed(0)
    x, s, t = torch.randn(4, 1, 8, 8, generator=g), torch.full((4,), 0.8), torch.full((4,), 0.3)
    with torch.no_grad():  # B = 0 at init: still the teacher's Euler step
        assert rel(student(x, s, t), x + (t - s).view(-1, 1, 1, 1) * teacher.velocity(x, s)) < 1e-5
    trainable = {k for k, p in student.net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k or k.startswith("injection.") for k in trainable)
    base = {k: v.clone() for k, v in student.net.state_dict().items() if "base_layer" in k}

    with torch.no_grad():
        x0 = solve(teacher, torch.randn(16, 1, 8, 8, generator=g), 8, "euler")
    objective = build_objective({"name": "cd", "steps": 8, "solver": "euler", "target_ema": 0.9})
    fit(
        student,
        objective,
        lambda step: (x0[4 * (step % 4) : 4 * (step % 4) + 4], None),
        steps=4,
        teacher=teacher,
        lr=1e-2,
    )
    after = student.net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the copy of the teacher stays frozen
    assert any(float(after[k].abs().max()) > 0 for k in after if "lora_B" in k)  # the adapters trained

    noise = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        ref = student(noise, torch.ones(3), torch.zeros(3))
        assert rel(ref, student_from_teacher(teacher)(noise, torch.ones(3), torch.zeros(3))) > 1e-4  # it moved

    merged = FlowMap(merged_lora(student.net))
    path = save_student(tmp_path / "merged.safetensors", merged)
    assert "lora" not in read_config(path)["net"]
    assert not any("lora_" in k or "base_layer" in k for k in merged.net.state_dict())
    with torch.no_grad():
        assert rel(load_student(path).sample(noise), ref) < 1e-5

    adapter = save_lora_adapter(tmp_path / "adapter.safetensors", student)
    assert adapter.stat().st_size < path.stat().st_size / 2
    fresh = load_lora_adapter(student_from_teacher(teacher, lora=LORA), adapter)
    with torch.no_grad():
        assert rel(fresh(noise, torch.ones(3), torch.zeros(3)), ref) < 1e-6
