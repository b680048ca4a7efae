"""An SD3-like student (SD3Transformer2DModel + AutoencoderKL + CLIP-L, CLIP-G, T5) carries the whole TextCondition
(prompt and pooled embeddings, null) through scripts/sample.py and the exported pipeline (flowmap/pipeline.py).

- test_sd3_student_prompt_through_sample_script_and_export: sample.py --prompt on the student file writes the
  images of load_student(...).sample on the prompt's TextCondition, decoded (1e-5); the export ships text_encoder/,
  _2/, _3/ and their tokenizers, and with the teacher folder gone pipe(prompt=...) and pipe(condition=...) give
  load_student's decoded images for the same record and noise (1e-5), while zeroed pooled embeddings change them
  (the pooled embeddings reach pooled_projections).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowmap.conditions import TextCondition
from flowmap.latent import codec_of
from flowmap.text import prompt_encoder_of
from tests.latent_parts import moved_student, sd3_folder

PROMPTS = ["a red cat", "two dogs 7"]


@pytest.mark.slow
def test_sd3_student_prompt_through_sample_script_and_export(tmp_path):
    from flowmap.app import load_student
    from flowmap.pipeline import FlowMapPipeline
    from scripts.sample import main as sample_main

    folder = sd3_folder(tmp_path / "sd3")
    teacher, path = moved_student(folder, tmp_path / "student.safetensors")
    app = load_student(path)
    codec, encoder = codec_of(app), prompt_encoder_of(app)
    assert encoder.layout == "sd3" and encoder.text_encoder_3 is not None

    sample_main([str(path), "--n", "2", "--prompt", PROMPTS[0], "--out", str(tmp_path / "s")])
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # sample.py's noise
    one = encoder.condition([PROMPTS[0]] * 2)
    want = codec.decode(app.sample(noise, labels=one)).numpy()
    got = np.load(tmp_path / "s" / "samples.npz")["x"]
    assert got.shape == (2, 3, 16, 16) and np.abs(got - want).max() < 1e-5

    cond = encoder.condition(PROMPTS)
    ref = codec.decode(app.sample(noise, labels=cond))
    FlowMapPipeline.from_flow_map(app.flow_map, app.config).save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert {"transformer", "vae", "text_encoder_2", "text_encoder_3", "tokenizer_3"} <= set(index)
    shutil.rmtree(folder)
    pipe = FlowMapPipeline.from_pretrained(tmp_path / "pipe")
    by_prompt = pipe(prompt=PROMPTS, latents=noise, output_type="pt").images
    assert by_prompt.shape == (2, 3, 16, 16) and float((by_prompt - ref).abs().max()) < 1e-5
    by_record = pipe(condition=cond, latents=noise, output_type="pt").images
    assert float((by_record - ref).abs().max()) < 1e-5
    no_pooled = TextCondition(cond.prompt_embeds, torch.zeros_like(cond.pooled_embeds), None, cond.null)
    other = pipe(condition=no_pooled, latents=noise, output_type="pt").images
    assert float((other - ref).abs().max()) > 1e-4
