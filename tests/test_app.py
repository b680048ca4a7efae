"""flowmap.load_student for downstream apps (issue 7): a plain nn.Module from safetensors only, with
bit-identical samples in a fresh process, and no Lightning import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from weights import trained_like

import flowmap
from flowmap.io import CheckpointError
from flowmap.models import save_student, save_teacher
from flowmap.nets import build_net
from flowmap.sampling import sample
from flowmap.student import FlowMap
from flowmap.velocity import NetVelocity


def conditional_student() -> FlowMap:
    net = build_net(
        {
            "name": "unet",
            "data_shape": [1, 8, 8],
            "channels": 8,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [4],
            "heads": 2,
            "emb_dim": 32,
            "num_classes": 3,
        }
    )
    return FlowMap(trained_like(net)).eval()


FRESH = r"""
import json, sys
import torch
from safetensors.torch import save_file
torch.set_num_threads(1)
from flowmap import load_student
student = load_student(sys.argv[1])
g = torch.Generator().manual_seed(123)
x1 = student.sample(5, labels=torch.tensor([0, 1, 2, 3, 1]), generator=g)
x2 = student.sample(5, steps=3, labels=2, generator=g)
save_file({"x1": x1.contiguous(), "x2": x2.contiguous()}, sys.argv[2])
print(json.dumps({"lightning": "lightning" in sys.modules, "pytorch_lightning": "pytorch_lightning" in sys.modules,
                  "type": type(student).__name__, "is_module": isinstance(student, torch.nn.Module)}))
"""


def test_load_student_bit_identical_in_a_fresh_process(tmp_path, repo_root):
    student = conditional_student()
    path = save_student(tmp_path / "student.safetensors", student, method="cd")
    app = flowmap.load_student(path)
    assert isinstance(app, torch.nn.Module) and app.data_shape == (1, 8, 8) and app.num_classes == 3
    g = torch.Generator().manual_seed(123)
    x1 = app.sample(5, labels=torch.tensor([0, 1, 2, 3, 1]), generator=g)
    x2 = app.sample(5, steps=3, labels=2, generator=g)
    # the same numbers as the in-memory student through the core sampler
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(5, 1, 8, 8, generator=g)
    assert torch.equal(x1, sample(student, noise, 1, cond=torch.tensor([0, 1, 2, 3, 1])))
    assert torch.equal(app(noise, 1.0, 0.0, torch.tensor([0, 1, 2, 3, 1])), x1)

    out = tmp_path / "fresh.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(path), str(out)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"lightning": False, "pytorch_lightning": False, "type": "Student", "is_module": True}
    fresh = load_file(out)
    assert torch.equal(fresh["x1"], x1) and torch.equal(fresh["x2"], x2)
    assert float((x1 - x2).abs().max()) > 1e-3  # different calls give different samples


def test_student_forward_and_guidance_input(tmp_path):
    net = build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8, "guidance_input": True})
    student = FlowMap(trained_like(net)).eval()
    app = flowmap.load_student(save_student(tmp_path / "s.safetensors", student))
    x = torch.randn(6, 2)
    s, t = torch.rand(6), torch.rand(6) * 0.5
    with torch.no_grad():
        assert torch.equal(app(x, s, t, guidance=2.0), student(x, s, t, None, torch.full((6,), 2.0)))
        assert torch.equal(app(x, 0.3, 0.3), x)  # X(x, s, s) = x
        a = app.sample(x, guidance=1.0)
        b = app.sample(x, guidance=3.0)
    assert float((a - b).abs().max()) > 1e-4  # the guidance input is used
    unguided = flowmap.load_student(save_student(tmp_path / "u.safetensors", conditional_student()))
    with pytest.raises(ValueError, match="guidance"):
        unguided.sample(2, labels=1, guidance=2.0)


def test_load_student_refuses_pickle_teachers_and_foreign_files(tmp_path):
    ckpt = tmp_path / "student.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        p = ckpt.with_suffix(suffix)
        p.write_bytes(ckpt.read_bytes())
        with pytest.raises(CheckpointError, match="only safetensors"):
            flowmap.load_student(p)
    teacher = NetVelocity(
        build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8}), "linear", "velocity"
    )
    tpath = save_teacher(tmp_path / "teacher.safetensors", teacher)
    with pytest.raises(CheckpointError, match="teacher checkpoint, not a student"):
        flowmap.load_student(tpath)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        flowmap.load_student(junk)
    with pytest.raises(CheckpointError, match="no such"):
        flowmap.load_student(tmp_path / "missing.safetensors")
