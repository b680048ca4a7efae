"""An EDM denoiser given as a file: a diffusers model folder whose scheduler is EDMEulerScheduler (or EDM DPM-Solver)
is read as ``EDMDenoiserTeacher`` (Karras et al. 2022, Table 1 preconditioning with the scheduler's sigma_data,
sigma_min, sigma_max; safetensors only). Its denoiser is diffusers' own preconditioned output to 1e-6, Euler on our
axis reproduces diffusers' EDM Euler sampler, and scripts/sample.py and the teacher's-own-network student take it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowmap.edm_velocity import EDMDenoiserTeacher
from flowmap.models import student_from_teacher
from flowmap.solvers import solve
from teachers import CheckpointTeacher, load_teacher
from tests.test_teacher_init_student import rel, unet

ROOT = Path(__file__).resolve().parents[1]


def edm_folder(tmp_path, prediction: str = "epsilon", sched=None):
    folder = tmp_path / f"edm_{prediction}"
    unet().save_pretrained(folder)
    sched = sched or diffusers.EDMEulerScheduler(sigma_data=0.5, sigma_max=80.0, prediction_type=prediction)
    sched.save_pretrained(folder)
    return folder, sched


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_folder_is_diffusers_preconditioned_denoiser(tmp_path, prediction):
    folder, sched = edm_folder(tmp_path, prediction)
    teacher, info = load_teacher(folder)
    assert isinstance(teacher, EDMDenoiserTeacher) and info["scheduler"] == "EDMEulerScheduler"
    assert info["scheduler_config"]["sigma_data"] == 0.5 and info["path"] == teacher.path.name
    model = teacher.net.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g) * 3
    sigma = torch.tensor([0.01, 0.5, 3.0, 60.0])
    s4 = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        out = model(sched.precondition_inputs(x, s4), sched.precondition_noise(sigma)).sample
        ref = sched.precondition_outputs(x, out, s4)
        assert rel(teacher.denoise(x, sigma, None), ref) < 1e-6


def test_euler_on_our_axis_is_diffusers_edm_euler(tmp_path):
    folder, sched = edm_folder(tmp_path)
    teacher, _ = load_teacher(folder)
    model = teacher.net.model
    sched.set_timesteps(12)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        x_lin = x / (1 + sched.sigmas[0])  # VE (x, sigma) -> our axis: x / (1 + sigma), t = sigma / (1 + sigma)
        for t in sched.timesteps:
            x = sched.step(model(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        grid = (sched.sigmas / (1 + sched.sigmas)).double()
        ours = solve(teacher, x_lin, grid, "euler")
        # the folder as a CheckpointTeacher is the loaded teacher, also at t = 1 (above sigma_max, x0 held)
        ones = torch.ones(3)
        wrapped = CheckpointTeacher(str(folder)).linear_velocity(x_lin, ones, None)
        assert torch.equal(wrapped, teacher.linear_velocity(x_lin, ones, None))
    assert rel(ours, x) < 1e-4


def test_edm_folder_samples_with_sample_py_and_gives_a_student(tmp_path):
    folder, _ = edm_folder(tmp_path)
    sys.path.insert(0, str(ROOT / "scripts"))
    import sample as sample_script

    out = sample_script.main(
        [str(folder), "--n", "6", "--batch_size", "4", "--steps", "3", "--out", str(tmp_path / "s")]
    )
    x = np.load(out / "samples.npz")["x"]
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    teacher, _ = load_teacher(folder)
    student = student_from_teacher(teacher)
    assert student.net.config["teacher"]["kind"] == "edm"
    g = torch.Generator().manual_seed(2)
    z, s, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([0.9, 0.5]), torch.tensor([0.3, 0.1])
    with torch.no_grad():
        ref = z + (t - s).view(-1, 1, 1, 1) * teacher.velocity(z, s)
        assert rel(student(z, s, t), ref) < 1e-5  # the student starts as the teacher's Euler step


def test_other_edm_prediction_types_are_one_line(tmp_path):
    from flowmap.io import CheckpointError

    folder, _ = edm_folder(tmp_path)
    cfg = folder / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"epsilon"', '"sample"'))
    with pytest.raises(CheckpointError, match="prediction_type='sample' is not supported"):
        load_teacher(folder)
