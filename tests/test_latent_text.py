"""Text-to-image folders (UNet2DConditionModel + AutoencoderKL + CLIP text encoder + DDIM): flowmap/text.py.

- test_text_teacher_equals_stable_diffusion_pipeline: the folder loads as a latent, text-conditioned teacher (its
  line says both); prompts encoded by its own text encoder, DDIM (eta 0) with CFG against the empty prompt, then
  decode, equal diffusers' StableDiffusionPipeline images to 1e-4 relative at guidance 1 and 4.5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowmap.latent import codec_of
from flowmap.text import prompt_encoder_of
from teachers import CheckpointTeacher, describe_teacher
from teachers.diffusers_sampler import ddim_sample
from tests.latent_parts import text_folder

PROMPTS = ["a red cat", "two dogs 7"]


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_text_teacher_equals_stable_diffusion_pipeline(tmp_path, guidance):
    folder = text_folder(tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPTS, guidance_scale=guidance, num_inference_steps=5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    teacher = CheckpointTeacher(str(folder))
    line = describe_teacher(teacher.description)
    assert "latent (4, 8, 8) via AutoencoderKL, scaling 0.18215" in line and "text-conditioned (CLIPTextModel" in line
    emb = prompt_encoder_of(teacher).encode(PROMPTS)
    assert emb.shape == (2, 12, 16)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    z = ddim_sample(teacher, noise, 5, cond=emb, guidance=guidance)
    ours = (codec_of(teacher).decode(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    x, t = noise, torch.full((2,), 0.5)
    with torch.no_grad():
        assert float((teacher.velocity(x, t, emb) - teacher.velocity(x, t, None)).abs().max()) > 1e-4  # prompts matter


def test_sample_script_with_a_prompt_writes_decoded_images_for_teacher_and_student(tmp_path):
    """scripts/sample.py --prompt on the text teacher (guidance 3) and on a student made from it (its file records
    the VAE and the text encoder): (2, 3, 16, 16) images equal to decoding the --latents output; the prompt matters."""
    from flowmap.app import load_student
    from flowmap.models import save_student, student_from_teacher
    from scripts.sample import main as sample_main

    folder = text_folder(tmp_path / "sd")
    teacher = CheckpointTeacher(str(folder))
    student = student_from_teacher(teacher)
    path = save_student(tmp_path / "student.safetensors", student, teacher=teacher.description)
    codec = codec_of(teacher)
    for source, extra in ((str(folder), ["--steps", "4", "--guidance", "3"]), (str(path), [])):
        outs = {}
        for name, prompt in (("a", "a red cat"), ("b", "blue")):
            args = [source, "--n", "2", "--prompt", prompt, *extra]
            sample_main([*args, "--out", str(tmp_path / name)])
            sample_main([*args, "--latents", "--out", str(tmp_path / f"{name}_lat")])
            outs[name] = np.load(tmp_path / name / "samples.npz")["x"]
            z = np.load(tmp_path / f"{name}_lat" / "samples.npz")["x"]
            assert outs[name].shape == (2, 3, 16, 16) and z.shape == (2, 4, 8, 8)
            assert np.abs(codec.decode(torch.from_numpy(z)).numpy() - outs[name]).max() < 1e-5
        assert np.abs(outs["a"] - outs["b"]).max() > 1e-4
    assert prompt_encoder_of(load_student(path)) is not None
