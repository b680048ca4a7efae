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
