"""The one-step generator exported with torch.export (.pt2) matches eager to 1e-5 (issue 7)."""

from __future__ import annotations

import json

import pytest
import torch
from weights import trained_like

from flowmap.app import load_student
from flowmap.export import OneStepGenerator, export_generator
from flowmap.models import save_student
from flowmap.nets import build_net
from flowmap.student import FlowMap


def test_export_script_matches_eager_with_dynamic_batch(tmp_path, capsys):
    """Class-conditional UNet student: scripts/export.py writes the .pt2 and reports the check; the
    reloaded program agrees with load_student's eager one-step sample for batch sizes it never saw."""
    import scripts.export as export_script

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
    path = save_student(tmp_path / "student.safetensors", FlowMap(trained_like(net, 7)))
    out = tmp_path / "gen.pt2"
    result = export_script.main([str(path), "--out", str(out), "--batch", "4"])
    printed = capsys.readouterr().out
    assert (
        json.loads(printed.splitlines()[0])["max_abs_diff"] == result["max_abs_diff"]
        and "ok: max |exported - eager|" in printed
    )
    assert result["dynamic_batch"] and result["max_abs_diff"] < 1e-5 and out.is_file()

    program = torch.export.load(str(out)).module()
    student = load_student(path)
    g = torch.Generator().manual_seed(3)
    for batch in (1, 9):
        noise = torch.randn(batch, 1, 8, 8, generator=g)
        labels = torch.randint(0, 4, (batch,), generator=g)
        with torch.no_grad():
            eager = student.sample(noise, steps=1, labels=labels)
            exported = program(noise, labels)
        err = float((exported - eager).abs().max())
        print(f"batch {batch}: max |exported - eager| = {err:.2e}")
        assert err < 1e-5
        assert float((eager - noise).abs().max()) > 1e-2  # the generator is not the identity


def test_export_unconditional_guidance_student_static_batch(tmp_path):
    net = build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 2, "emb_dim": 8, "guidance_input": True})
    student = FlowMap(trained_like(net, 7)).eval()
    result = export_generator(student, tmp_path / "g.pt2", batch=6, guidance=2.0, dynamic=False)
    assert result["max_abs_diff"] < 1e-5 and result["checked_batches"] == [6]
    program = torch.export.load(result["path"]).module()
    noise = torch.randn(6, 2)
    with torch.no_grad():
        ref = student(noise, torch.ones(6), torch.zeros(6), None, torch.full((6,), 2.0))
        assert float((program(noise) - ref).abs().max()) < 1e-5
        assert (
            float((OneStepGenerator(student, guidance=1.0)(noise) - ref).abs().max()) > 1e-4
        )  # the baked-in scale matters
    with pytest.raises(ValueError, match=".pt2"):
        export_generator(student, tmp_path / "g.onnx")
    plain = FlowMap(build_net({"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8}))
    with pytest.raises(ValueError, match="guidance"):
        OneStepGenerator(plain, guidance=3.0)
