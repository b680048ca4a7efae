"""scripts/export.py --format diffusers: a student made from a diffusers model becomes a folder that diffusers' own
``DiffusionPipeline.from_pretrained(OUT, custom_pipeline="pipeline_flowmap", trust_remote_code=True)`` and
``FlowMapPipeline.from_pretrained`` load in a fresh process without flowmap's training code, and gives the same
samples as ``load_student`` for the same noise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowmap.app import load_student
from flowmap.io import read_config
from flowmap.models import save_student, student_from_teacher
from tests.test_teacher_init_student import ddim, dit, flow, teacher_of, unet

ROOT = Path(__file__).resolve().parents[1]
FRESH = """
import json, sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline="pipeline_flowmap", trust_remote_code=True)
noise, labels = torch.load(sys.argv[2])
images = pipe(latents=noise, class_labels=labels, num_inference_steps=2, output_type="pt",
              generator=torch.Generator().manual_seed(2)).images
pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(0)).images
from flowmap.pipeline import FlowMapPipeline
again = FlowMapPipeline.from_pretrained(sys.argv[1])(latents=noise, class_labels=labels, num_inference_steps=2,
                                                     output_type="pt", generator=torch.Generator().manual_seed(2))
torch.save(images, sys.argv[3])
banned = [m for m in sys.modules if m.startswith(("lightning", "flowmap.lightning", "flowmap.objectives",
                                                   "flowmap.training", "teachers"))]
print(json.dumps({"banned": banned, "pil": [im.size for im in pil], "class": type(pipe).__name__,
                  "same": bool(torch.equal(again.images, images))}))
"""


def trained_like(student):
    """Move the student away from its initialization (as training would), so the export has something to carry."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in student.net.named_parameters():
            if name.startswith("injection.") or "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return student


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unet", "dit_lora"])
def test_export_diffusers_folder_samples_like_load_student(tmp_path, case):
    sys.path.insert(0, str(ROOT / "scripts"))
    import export

    if case == "unet":
        student, labels = student_from_teacher(teacher_of(unet(), ddim("v_prediction"))), None
    else:
        student = student_from_teacher(flow(dit()), lora={"rank": 2})
        labels = torch.tensor([0, 2, 3])
    path = save_student(tmp_path / "student.safetensors", trained_like(student), method="cd")
    assert read_config(path)["flowmap_version"]
    out = tmp_path / "pipe"
    result = export.main([str(path), "--format", "diffusers", "--out", str(out), "--batch", "3"])
    assert result["matches_student"]
    index = json.loads((out / "model_index.json").read_text())
    sub = "unet" if case == "unet" else "transformer"
    assert index["_class_name"] == "FlowMapPipeline" and index[sub][1] == type(student.net.model).__name__
    reloaded = getattr(diffusers, index[sub][1]).from_pretrained(out / sub)  # the original class, diffusers' layout
    assert not any("lora" in k for k in reloaded.state_dict())

    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.save((noise, labels), tmp_path / "noise.pt")
    run = subprocess.run(
        [sys.executable, "-c", FRESH, str(out), str(tmp_path / "noise.pt"), str(tmp_path / "x.pt")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")},
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["banned"] == [] and report["pil"] == [[8, 8], [8, 8]]
    assert report["class"] == "FlowMapPipeline" and report["same"]  # diffusers' loader and ours build the same pipeline
    with torch.no_grad():
        ref = load_student(path).sample(noise, steps=2, labels=labels, generator=torch.Generator().manual_seed(2))
    assert load_student(path).config["sampler"]["gamma"] == 1.0  # CD re-noises between steps: the pipeline must too
    assert float((torch.load(tmp_path / "x.pt") - ref).abs().max()) < 1e-6


def test_export_refuses_a_student_of_flowmaps_own_nets(tmp_path, capsys):
    from flowmap.nets import build_net
    from flowmap.student import FlowMap

    path = save_student(tmp_path / "s.safetensors", FlowMap(build_net({"name": "mlp", "data_shape": [2]})))
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), str(path), "--format", "diffusers"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "made from a diffusers model" in run.stderr


def test_text_conditioned_student_round_trips_through_the_pipeline_folder(tmp_path):
    """UNet2DConditionModel student: the pipeline takes encoder_hidden_states and samples like the student."""
    from flowmap.pipeline import FlowMapPipeline
    from tests.test_teacher_init_student import cond_unet

    student = trained_like(student_from_teacher(teacher_of(cond_unet(), ddim("epsilon"))))
    g = torch.Generator().manual_seed(2)
    noise, context = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    FlowMapPipeline.from_flow_map(student, {"net": student.net.config}).save_pretrained(tmp_path / "pipe")
    pipe = FlowMapPipeline.from_pretrained(tmp_path / "pipe")
    with torch.no_grad():
        ref = student.eval()(noise, torch.ones(2), torch.zeros(2), context)
        got = pipe(latents=noise, encoder_hidden_states=context, output_type="pt").images
        other = pipe(latents=noise, encoder_hidden_states=torch.randn(2, 5, 12, generator=g), output_type="pt").images
    assert float((got - ref).abs().max()) < 1e-6
    assert float((other - ref).abs().max()) > 1e-4  # the condition reaches the network
