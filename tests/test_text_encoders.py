"""Pipelines with several text encoders (SD3: CLIP-L + CLIP-G + T5): one PromptEncoder for all (flowmap/text.py).

- test_sd3_prompt_encoder_equals_the_pipelines_encode_prompt: on a tiny StableDiffusion3Pipeline folder, with and
  without its T5, the PromptEncoder's prompt embeddings (B, 12 + 256, 32), pooled embeddings (B, 16) and empty-prompt
  null equal the pipeline's own encode_prompt (run under no_grad, as its __call__ does) to 1e-5; the description
  names the three encoders.
- test_sdxl_prompt_encoder_equals_the_pipelines_encode_prompt: on a StableDiffusionXLPipeline folder (two CLIPs),
  the penultimate states concatenated (B, 12, 16 + 12), the projection of text_encoder_2 (B, 8) and the all-zero
  empty prompt (force_zeros_for_empty_prompt) equal the pipeline's encode_prompt to 1e-6.
- test_sd3_teacher_samples_equal_the_sd3_pipeline: the folder loads as a latent, text-conditioned teacher whose
  condition carries pooled_projections; flow-matching Euler with CFG against the empty prompt, then decode, equals
  StableDiffusion3Pipeline's images to 1e-4 relative at guidance 1 and 3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowmap.latent import codec_of
from flowmap.text import PromptEncoder, prompt_encoder_of
from teachers import CheckpointTeacher, describe_teacher
from teachers.diffusers_sampler import ddim_sample
from tests.latent_parts import sd3_folder, sdxl_folder

PROMPTS = ["a red cat", "two dogs 7"]


def load_pipeline(folder, t5: bool):
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_prompt_encoder_equals_the_pipelines_encode_prompt(tmp_path, t5):
    folder = sd3_folder(tmp_path / "sd3", t5=t5)
    pipe = load_pipeline(folder, t5)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    encoder = PromptEncoder.from_folder(folder)
    cond = encoder.condition(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 268, 32) and cond.pooled_embeds.shape == (2, 16)
    assert cond.attention_mask is None and encoder.layout == "sd3"
    assert float((cond.prompt_embeds - embeds).abs().max()) < 1e-5
    assert float((cond.pooled_embeds - pooled).abs().max()) < 1e-5
    assert float((cond.null.prompt_embeds - neg[:1]).abs().max()) < 1e-5
    assert float((cond.null.pooled_embeds - neg_pooled[:1]).abs().max()) < 1e-5
    assert float(embeds[:, 12:].abs().max()) > 0.1 if t5 else float(embeds[:, 12:].abs().max()) == 0.0
    assert float((cond.prompt_embeds[0] - cond.prompt_embeds[1]).abs().max()) > 1e-3
    names = "CLIPTextModelWithProjection + CLIPTextModelWithProjection" + (" + T5EncoderModel" if t5 else "")
    assert f"text-conditioned ({names}, 268 tokens x 32)" in encoder.describe()


def test_sdxl_prompt_encoder_equals_the_pipelines_encode_prompt(tmp_path):
    folder = sdxl_folder(tmp_path / "xl")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    encoder = PromptEncoder.from_folder(folder)
    cond = encoder.condition(PROMPTS)
    assert encoder.layout == "sdxl" and encoder.zero_null
    assert cond.prompt_embeds.shape == (2, 12, 28) and cond.pooled_embeds.shape == (2, 8)
    assert float((cond.prompt_embeds - embeds).abs().max()) < 1e-6
    assert float((cond.pooled_embeds - pooled).abs().max()) < 1e-6
    assert float(cond.null.prompt_embeds.abs().max()) == 0.0 == float(neg.abs().max())
    assert float(cond.null.pooled_embeds.abs().max()) == 0.0 == float(neg_pooled.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sd3_teacher_samples_equal_the_sd3_pipeline(tmp_path, guidance):
    folder = sd3_folder(tmp_path / "sd3")
    pipe = load_pipeline(folder, True)
    ref = pipe(
        prompt=PROMPTS,
        guidance_scale=guidance,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    teacher = CheckpointTeacher(str(folder))
    line = describe_teacher(teacher.description)
    assert "latent (4, 8, 8) via AutoencoderKL" in line and "T5EncoderModel" in line, line
    cond = prompt_encoder_of(teacher).condition(PROMPTS)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    z = ddim_sample(teacher, noise, 4, cond=cond, guidance=guidance)
    ours = (codec_of(teacher).decode(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # the prompts matter
