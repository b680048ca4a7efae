"""Text-to-image folders (UNet2DConditionModel + AutoencoderKL + CLIP text encoder + DDIM): flowmap/text.py.

- test_text_teacher_equals_stable_diffusion_pipeline: the folder loads as a latent, text-conditioned teacher (its
  line says both); prompts encoded by its own text encoder, DDIM (eta 0) with CFG against the empty prompt, then
  decode, equal diffusers' StableDiffusionPipeline images to 1e-4 relative at guidance 1 and 4.5.
- test_sample_script_with_a_prompt_writes_decoded_images_for_teacher_and_student: sample.py --prompt writes
  images equal to decoding its --latents output (1e-5), different for two prompts.
- test_prompt_shards_made_once_and_a_text_distillation_streams_them: make_shards --prompts stores embeddings equal
  to direct encodes (1e-5); distill.py trains 3 CD steps on them from the teacher's weights, the VAE never run.
- test_exported_text_student_takes_prompts_in_a_fresh_process: the export ships vae/, text_encoder/, tokenizer/;
  pipe(prompt=...) in a fresh process equals load_student + decode to 1e-5.
- test_data_free_prompt_shards_from_the_teacher: sample.py --prompts --shards writes teacher latents (= the
  --latents run, 1e-6) with prompt i mod P's embedding (= a direct encode, 1e-5).
- test_guidance_conditioned_student_on_the_text_teacher: the text teacher's CFG (w = 1 is its conditional
  velocity); a guidance-conditioned student starts as its Euler step at w = 1 and 3 (1e-5), trains with
  w ~ U[1, 3], then differs between w = 1 and 3; it samples at w = 1, 2, 3 in its range (finite, different) and at
  w = 1 gives its unguided output bit for bit.
- test_ayf_and_ctm_distill_the_guided_text_teacher: AYF and CTM with w ~ U[1, 3] on text condition records run two
  steps to finite losses and move the weights.
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
from tests.latent_parts import moved_student, run_fresh, text_folder

PROMPTS = ["a red cat", "two dogs 7"]


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_text_teacher_equals_stable_diffusion_pipeline(tmp_path, guidance):
    folder = text_folder(tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompt=PROMPTS,
        guidance_scale=guidance,
        num_inference_steps=5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
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


@pytest.mark.slow
def test_prompt_shards_made_once_and_a_text_distillation_streams_them(tmp_path, monkeypatch):
    """make_shards --encode SD_FOLDER --prompts captions.txt: latents and prompt embeddings (<key>.emb.npy) equal
    direct encodes (1e-5); scripts/distill.py trains 3 steps of CD on them from the teacher's weights, the VAE
    made to raise; the student file references the text encoder."""
    import sys
    from pathlib import Path

    from flowmap.app import load_student
    from flowmap.data.registry import get_dataset
    from flowmap.data.shards import read_all
    from flowmap.latent import LatentCodec
    from scripts.make_shards import main as make_shards
    from tests.test_latent_shards import image_folder

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    import distill

    folder = text_folder(tmp_path / "sd")
    images = image_folder(tmp_path / "images")
    captions = ["a red cat", "two dogs", "", "blue sky 3", "cat", "a b c"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    make_shards(
        [
            "--image-folder",
            str(images),
            "--encode",
            str(folder),
            "--prompts",
            str(tmp_path / "captions.txt"),
            "--out",
            str(tmp_path / "lat"),
            "--max-count",
            "4",
            "--batch-size",
            "4",
        ]
    )
    z, emb = read_all(tmp_path / "lat")
    ds = get_dataset("image_folder", root=str(images), image_size=16, channels=3).dataset("train")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert float((z - LatentCodec.from_folder(folder).encode(x)).abs().max()) < 1e-5
    direct = CheckpointTeacher(str(folder)).teacher.prompt_encoder.encode(captions)
    assert emb.shape == (6, 12, 16) and float((emb - direct).abs().max()) < 1e-5

    def never(*args, **kwargs):
        raise AssertionError("the VAE ran during training")

    monkeypatch.setattr(LatentCodec, "encode", never)
    monkeypatch.setattr(LatentCodec, "decode", never)
    config = tmp_path / "cd.yaml"
    config.write_text(
        "model:\n"
        "  objective: {name: cd, steps: 4, solver: euler}\n"
        "  ema_decay: 0.5\n"
        "data:\n"
        "  class_path: flowmap.lightning.streaming.ShardDataModule\n"
        f"  init_args: {{root: {tmp_path / 'lat'}, batch_size: 3, epoch_length: 3, shuffle_buffer: 4}}\n"
        "trainer: {max_steps: 3, enable_progress_bar: false}\n"
    )
    out = tmp_path / "student.safetensors"
    module = distill.main(
        [
            "--teacher",
            str(folder),
            "--config",
            str(config),
            "--run_dir",
            str(tmp_path / "run"),
            "--logger",
            "none",
            "--export",
            str(out),
        ]
    ).model
    assert module.global_step == 3
    teacher_state = module.teacher.teacher.net.model.state_dict()
    student_state = module.student.net.model.state_dict()
    diff = sum(float((student_state[k] - v).square().sum()) for k, v in teacher_state.items())
    norm = sum(float(v.square().sum()) for v in teacher_state.values())
    assert 0 < (diff / norm) ** 0.5 < 0.1
    assert prompt_encoder_of(load_student(out)) is not None


@pytest.mark.slow
def test_exported_text_student_takes_prompts_in_a_fresh_process(tmp_path):
    """The exported folder ships vae/, text_encoder/ and tokenizer/: in a fresh process, with the teacher folder
    gone, pipe(prompt=...) gives load_student's decoded images for the same prompts and noise to 1e-5."""
    import json
    import shutil

    from flowmap.app import load_student
    from flowmap.pipeline import FlowMapPipeline

    folder = text_folder(tmp_path / "sd")
    teacher, path = moved_student(folder, tmp_path / "student.safetensors")
    app = load_student(path)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = prompt_encoder_of(app).condition(PROMPTS)  # the application wrapper takes the condition record
    ref = codec_of(app).decode(app.sample(noise, labels=cond))
    FlowMapPipeline.from_flow_map(app.flow_map, app.config).save_pretrained(tmp_path / "pipe")
    shutil.rmtree(folder)
    torch.save(noise, tmp_path / "noise.pt")
    code = (
        "import sys, torch; from flowmap.pipeline import FlowMapPipeline\n"
        f"pipe = FlowMapPipeline.from_pretrained({str(tmp_path / 'pipe')!r})\n"
        f"x = pipe(prompt={PROMPTS!r}, latents=torch.load({str(tmp_path / 'noise.pt')!r}), output_type='pt').images\n"
        f"torch.save(x, {str(tmp_path / 'x.pt')!r})\n"
    )
    run_fresh(code, tmp_path)
    got = torch.load(tmp_path / "x.pt")
    assert got.shape == (2, 3, 16, 16) and float((got - ref).abs().max()) < 1e-5
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer"} <= set(index)


def test_data_free_prompt_shards_from_the_teacher(tmp_path):
    """sample.py --prompts FILE --shards: teacher latents (equal to the --latents .npz of the same run, 1e-6) with
    each sample's prompt embedding, prompt i mod P, equal to a direct encode (1e-5); drawn in chunks of 3."""
    from flowmap.data.shards import read_all
    from scripts.sample import main as sample_main

    folder = text_folder(tmp_path / "sd")
    prompts = ["a red cat", "blue", "two dogs 7"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = [
        str(folder),
        "--n",
        "4",
        "--batch_size",
        "3",
        "--steps",
        "3",
        "--guidance",
        "2",
        "--prompts",
        str(tmp_path / "prompts.txt"),
    ]
    sample_main([*args, "--shards", "--out", str(tmp_path / "free")])
    sample_main([*args, "--latents", "--out", str(tmp_path / "npz")])
    z, emb = read_all(tmp_path / "free" / "shards")
    assert z.shape == (4, 4, 8, 8) and emb.shape == (4, 12, 16)
    assert float((z - torch.from_numpy(np.load(tmp_path / "npz" / "samples.npz")["x"])).abs().max()) < 1e-6
    direct = prompt_encoder_of(CheckpointTeacher(str(folder))).encode([prompts[i % 3] for i in range(4)])
    assert float((emb - direct).abs().max()) < 1e-5


def test_guidance_conditioned_student_on_the_text_teacher():
    """CD with w ~ U[1, 3] against the text teacher's CFG (empty-prompt null): the guidance-conditioned student made
    from the teacher starts as the teacher's unguided Euler step at every w (1e-5), trains to finite losses, and then
    answers differently at w = 1 and w = 3; the teacher at w = 1 (float or tensor) is its conditional velocity."""
    import math
    import tempfile
    from pathlib import Path

    from flowmap.models import student_from_teacher
    from flowmap.objectives import build_objective
    from flowmap.training import fit

    with tempfile.TemporaryDirectory() as tmp:
        teacher = CheckpointTeacher(str(text_folder(Path(tmp) / "sd")))
    emb = prompt_encoder_of(teacher).encode(PROMPTS * 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, 4, 8, 8), generator=g)
    s, t = torch.full((4,), 0.8), torch.full((4,), 0.3)
    with torch.no_grad():
        v_c = teacher.velocity(x, s, emb)
        assert torch.equal(teacher.velocity(x, s, emb, guidance=1.0), v_c)
        assert torch.allclose(teacher.velocity(x, s, emb, guidance=torch.ones(4)), v_c, atol=1e-6)
        v_3 = teacher.velocity(x, s, emb, guidance=3.0)
        assert torch.allclose(v_3, teacher.velocity(x, s, None) + 3 * (v_c - teacher.velocity(x, s, None)), atol=1e-5)
    student = student_from_teacher(teacher, guidance_input=True)
    with torch.no_grad():
        euler = x + (t - s)[:, None, None, None] * v_c
        for w in (1.0, 3.0):
            got = student(x, s, t, emb, torch.full((4,), w))
            assert float((got - euler).abs().max()) / float(euler.abs().max()) < 1e-5
    objective = build_objective({"name": "cd", "steps": 4, "solver": "euler", "guidance": 1.0, "guidance_max": 3.0})
    data = torch.randn((4, 4, 8, 8), generator=g)
    losses = fit(student, objective, lambda step: (data, emb), steps=3, teacher=teacher)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        a, b = (student(x, s, t, emb, torch.full((4,), w)) for w in (1.0, 3.0))
    assert float((a - b).abs().max()) > 1e-6
    from flowmap.sampling import sample

    noise = torch.randn((4, 4, 8, 8), generator=g)
    cond = prompt_encoder_of(teacher).condition(PROMPTS * 2)  # the record: embeddings + the empty prompt's null
    assert torch.equal(cond.prompt_embeds, emb)
    unguided = sample(student, noise, 2, cond=cond)
    draws = {w: sample(student, noise, 2, cond=cond, guidance=w) for w in (1.0, 2.0, 3.0)}
    assert torch.equal(draws[1.0], unguided)  # w = 1 is the student's unguided output
    assert all(bool(torch.isfinite(v).all()) for v in draws.values())
    assert float((draws[2.0] - draws[1.0]).abs().max()) > 1e-7 and float((draws[3.0] - draws[2.0]).abs().max()) > 1e-7


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ayf_emd", "ctm"])
def test_ayf_and_ctm_distill_the_guided_text_teacher(name):
    """AYF (EMD, a JVP through the UNet2DConditionModel) and CTM with w ~ U[1, 3] on text conditions (records with the
    empty prompt's null): two steps train to finite losses and move the student's weights."""
    import math
    import tempfile
    from pathlib import Path

    from flowmap.models import student_from_teacher
    from flowmap.objectives import build_objective
    from flowmap.training import fit

    with tempfile.TemporaryDirectory() as tmp:
        teacher = CheckpointTeacher(str(text_folder(Path(tmp) / "sd")))
    cond = prompt_encoder_of(teacher).condition(PROMPTS)
    student = student_from_teacher(teacher, guidance_input=True)
    before = [p.detach().clone() for p in student.parameters()]
    config = {"name": name, "guidance": 1.0, "guidance_max": 3.0}
    if name == "ctm":
        config.update(dsm_source="teacher", solver="euler", solver_steps=1)
    data = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    losses = fit(student, build_objective(config), lambda step: (data, cond), steps=2, teacher=teacher, lr=1e-3)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(student.parameters(), before))
    assert moved > 0
