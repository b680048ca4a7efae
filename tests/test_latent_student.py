"""A student distilled from a latent teacher decodes through the teacher's VAE, which it references by folder.

- test_student_file_references_the_vae_and_the_export_ships_it: load_student + codec_of decode the student's
  latents; the exported FlowMapPipeline folder holds vae/ and gives the same images (1e-5) with the teacher
  folder gone; output_type="latent" gives the latents bit-equal to load_student's.
- test_exported_dit_student_in_a_fresh_process: a subprocess that imports only flowmap.pipeline (no training code)
  loads the exported DiT folder, the teacher folder gone, and gives load_student's decoded images to 1e-5; the
  modules it imported include no objective, Lightning or teacher code.
- test_sample_script_decodes_unless_latents: scripts/sample.py on the latent teacher and on the student writes
  (N, 3, 16, 16) images equal to decoding its --latents output (1e-5), and (N, 4, 8, 8) latents with --latents.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from flowmap.app import load_student
from flowmap.latent import codec_of
from flowmap.pipeline import FlowMapPipeline
from scripts.sample import main as sample_main
from teachers import CheckpointTeacher
from tests.latent_parts import dit_folder, moved_student, run_fresh


def latent_student(tmp_path):
    folder = dit_folder(tmp_path / "dit")
    teacher, path = moved_student(folder, tmp_path / "student.safetensors")
    return folder, path


def test_student_file_references_the_vae_and_the_export_ships_it(tmp_path):
    folder, path = latent_student(tmp_path)
    app = load_student(path)
    codec = codec_of(app)
    assert codec is not None and codec.source == str(folder.resolve()) and app.data_shape == (4, 8, 8)
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 5, 1000])
    z = app.sample(noise, labels=labels)
    images = codec.decode(z)
    assert images.shape == (3, 3, 16, 16) and float(images.std()) > 1e-3

    FlowMapPipeline.from_flow_map(app.flow_map, app.config).save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    shutil.rmtree(folder)  # the export is self-contained
    pipe = FlowMapPipeline.from_pretrained(tmp_path / "pipe")
    got = pipe(latents=noise, class_labels=labels, output_type="pt").images
    assert float((got - images).abs().max()) < 1e-5
    assert torch.equal(pipe(latents=noise, class_labels=labels, output_type="latent").images, z)
    np_images = pipe(latents=noise, class_labels=labels, output_type="np").images
    assert np.abs(np_images - (images / 2 + 0.5).permute(0, 2, 3, 1).numpy()).max() < 1e-5


@pytest.mark.slow
def test_exported_dit_student_in_a_fresh_process(tmp_path):
    import json

    folder, path = latent_student(tmp_path)
    app = load_student(path)
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 5, 1000])
    ref = codec_of(app).decode(app.sample(noise, labels=labels))
    FlowMapPipeline.from_flow_map(app.flow_map, app.config).save_pretrained(tmp_path / "pipe")
    shutil.rmtree(folder)
    torch.save({"noise": noise, "labels": labels}, tmp_path / "inputs.pt")
    code = (
        "import json, sys, torch; from flowmap.pipeline import FlowMapPipeline\n"
        f"pipe = FlowMapPipeline.from_pretrained({str(tmp_path / 'pipe')!r})\n"
        f"inp = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "x = pipe(latents=inp['noise'], class_labels=inp['labels'], output_type='pt').images\n"
        f"torch.save(x, {str(tmp_path / 'x.pt')!r})\n"
        "mods = [m for m in sys.modules if m.startswith(('flowmap', 'teachers', 'lightning'))]\n"
        f"open({str(tmp_path / 'mods.json')!r}, 'w').write(json.dumps(mods))\n"
    )
    run_fresh(code, tmp_path)
    got = torch.load(tmp_path / "x.pt")
    assert got.shape == (3, 3, 16, 16) and float((got - ref).abs().max()) < 1e-5
    mods = json.loads((tmp_path / "mods.json").read_text())
    training = [m for m in mods if m.startswith(("flowmap.objectives", "flowmap.lightning", "teachers", "lightning"))]
    assert "flowmap.pipeline" in mods and not training, training


def test_sample_script_decodes_unless_latents(tmp_path):
    folder, path = latent_student(tmp_path)
    codec = codec_of(CheckpointTeacher(str(folder)))
    for source, extra in ((str(folder), ["--steps", "3", "--batch_size", "1"]), (str(path), [])):
        args = [source, "--n", "2", "--label", "7", *extra]
        sample_main([*args, "--out", str(tmp_path / "img")])
        sample_main([*args, "--latents", "--out", str(tmp_path / "lat")])
        x = np.load(tmp_path / "img" / "samples.npz")["x"]
        z = np.load(tmp_path / "lat" / "samples.npz")["x"]
        assert x.shape == (2, 3, 16, 16) and z.shape == (2, 4, 8, 8), (x.shape, z.shape)
        assert np.abs(codec.decode(torch.from_numpy(z)).numpy() - x).max() < 1e-5
        assert (tmp_path / "img" / "samples.png").stat().st_size > 0
