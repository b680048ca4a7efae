"""Teachers from other libraries (issue 7): a diffusers UNet2DModel + DDIMScheduler folder reproduces
diffusers' own DDIM sampler as Euler on our linear axis; flow-matching DiT folders; EDM denoisers;
and a short distillation from the diffusers teacher that saves a student."""

from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowmap.app import load_student  # noqa: E402
from flowmap.models import save_student  # noqa: E402
from flowmap.nets import build_net  # noqa: E402
from flowmap.objectives import build_objective  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from flowmap.student import FlowMap  # noqa: E402
from flowmap.training import fit  # noqa: E402
from teachers import CheckpointTeacher, EDMDenoiserTeacher, GaussianMixtureTeacher, describe_teacher, load_teacher  # noqa: E402
from teachers.diffusers_adapter import ddim_time_grid  # noqa: E402

N_TRAIN = 50  # DDPM train steps of the tiny schedule
K = 10  # DDIM inference steps


def tiny_unet(**kwargs) -> "diffusers.UNet2DModel":
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **kwargs,
    ).eval()


def ddim(prediction: str, set_alpha_to_one: bool = True, steps_offset: int = 0) -> "diffusers.DDIMScheduler":
    # clip_sample=False: clipping x0 is a sampler heuristic that no velocity field reproduces.
    return diffusers.DDIMScheduler(
        num_train_timesteps=N_TRAIN,
        beta_start=1e-3,
        beta_end=0.2,
        prediction_type=prediction,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset,
    )


def save_folder(folder, model, scheduler):
    model.save_pretrained(folder)
    scheduler.save_pretrained(folder)
    return folder


@torch.no_grad()
def diffusers_ddim(unet, scheduler, noise: torch.Tensor) -> torch.Tensor:
    """diffusers' own deterministic DDIM loop (eta = 0), as its pipeline runs it."""
    scheduler.set_timesteps(K)
    x = noise.clone()
    for k in scheduler.timesteps:
        x = scheduler.step(unet(x, k).sample, k, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def euler_on_linear_axis(teacher, scheduler, noise: torch.Tensor, shift_steps: int = 0) -> torch.Tensor:
    """Our Euler solver over DDIM's grid: x_lin = x / (alpha + sigma) at the first timestep, back at the end."""
    grid = ddim_time_grid(scheduler, teacher.teacher)
    if shift_steps:  # negative control: every time moved by `shift_steps` train steps on the VP axis
        abar = torch.tensor(teacher.teacher.path.alphas_cumprod, dtype=torch.float64)
        k = (scheduler.timesteps.long() + shift_steps).clamp(0, N_TRAIN - 1)
        grid = torch.cat([((1 - abar[k]).sqrt() / (abar[k].sqrt() + (1 - abar[k]).sqrt())), grid[len(k) :]])
    abar0 = scheduler.alphas_cumprod[scheduler.timesteps[0]].double()
    scale = float(abar0.sqrt() + (1 - abar0).sqrt())  # alpha + sigma of the VP path at the first timestep
    x_lin = solve(teacher, noise / scale, grid, "euler")
    # back to diffusers' variable at the final level t_end: abar = 1 / (1 + r^2), r = t / (1 - t)
    t_end = float(grid[-1])
    abar_end = 1.0 / (1.0 + (t_end / (1 - t_end)) ** 2)
    return x_lin * (math.sqrt(abar_end) + math.sqrt(1 - abar_end))


@pytest.mark.parametrize(
    "prediction, set_alpha_to_one, steps_offset",
    [("epsilon", True, 0), ("v_prediction", False, 1)],
)
def test_euler_on_converted_path_reproduces_diffusers_ddim(tmp_path, prediction, set_alpha_to_one, steps_offset):
    unet, scheduler = tiny_unet(), ddim(prediction, set_alpha_to_one, steps_offset)
    folder = save_folder(tmp_path / "model", unet, scheduler)
    teacher = CheckpointTeacher(str(folder))
    d = teacher.description
    assert (d["kind"], d["model"], d["scheduler"], d["path"]) == (
        "diffusers",
        "UNet2DModel",
        "DDIMScheduler",
        "vp_discrete",
    )
    assert d["prediction"] == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    assert teacher.data_shape == (1, 8, 8) and teacher.num_classes == 0
    line = describe_teacher(d)
    assert "DDIMScheduler" in line and prediction in line and "(1, 8, 8)" in line and "unconditional" in line

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = diffusers_ddim(unet, scheduler, noise)
    ours = euler_on_linear_axis(teacher, scheduler, noise)
    err = float((ours - ref).abs().max())
    moved = float((ref - noise).abs().max())
    print(f"{prediction}: max |euler - diffusers DDIM| = {err:.2e} (sample moved {moved:.2f} from the noise)")
    assert moved > 0.1  # the sampler did something
    assert err < 1e-4
    # negative control: the timestep map off by one train step is far outside the tolerance
    off = float((euler_on_linear_axis(teacher, scheduler, noise, shift_steps=1) - ref).abs().max())
    print(f"{prediction}: with the timestep map shifted by one step: {off:.2e}")
    assert off > 100 * 1e-4


def test_fractional_times_interpolate_between_steps(tmp_path):
    """Between train steps the model sees the fractional timestep; at a step, exactly that step."""
    unet, scheduler = tiny_unet(), ddim("epsilon")
    teacher = load_teacher(save_folder(tmp_path / "m", unet, scheduler))[0]
    abar = scheduler.alphas_cumprod.double()
    k = torch.tensor([3, 20, 49])
    t_step = (1 - abar[k]).sqrt() / (abar[k].sqrt() + (1 - abar[k]).sqrt())
    tau, t_vp = teacher.vp_step(t_step.float())
    assert torch.equal(tau, k.double())  # float32 times snap back to the train step
    # halfway in log alpha_bar between steps 20 and 21 is timestep 20.5
    la = 0.5 * (abar[20].log() + abar[21].log())
    t_mid = (1 - la.exp()).sqrt() / (la.exp().sqrt() + (1 - la.exp()).sqrt())
    tau_mid, _ = teacher.vp_step(t_mid.reshape(1))
    assert abs(float(tau_mid) - 20.5) < 1e-6


def test_flow_matching_dit_with_labels_and_guidance(tmp_path):
    """DiT + FlowMatchEulerDiscreteScheduler: diffusers' sigma is our t, the output is our velocity;
    its Euler sampler is ours on the scheduler's sigmas; CFG uses DiT's null label."""
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=3,
    ).eval()  # eval: no label dropout
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=2.0)
    folder = save_folder(tmp_path / "dit", dit, scheduler)
    teacher = CheckpointTeacher(str(folder))
    assert (
        teacher.num_classes == 3
        and teacher.description["null_class"]
        and teacher.description["prediction"] == "velocity"
    )
    assert teacher.description["path"] == "linear"

    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 3])  # 3 = the null label
    scheduler.set_timesteps(6)
    x = noise.clone()
    with torch.no_grad():
        for ts in scheduler.timesteps:
            out = dit(x, ts.expand(3), class_labels=labels).sample[:, :1]  # learned-sigma channels dropped
            x = scheduler.step(out, ts, x).prev_sample
        ours = solve(teacher, noise, scheduler.sigmas.double(), "euler", cond=labels)
        assert float((ours - x).abs().max()) < 1e-5
        t = torch.full((3,), 0.6)
        v_c = teacher.velocity(noise, t, torch.tensor([0, 2, 1]))
        v_u = teacher.velocity(noise, t, None)
        v_g = teacher.velocity(noise, t, torch.tensor([0, 2, 1]), guidance=2.5)
        assert torch.allclose(v_g, v_u + 2.5 * (v_c - v_u), atol=1e-6)
        assert float((v_c - v_u).abs().max()) > 1e-4  # the label matters


def test_class_conditional_unet_needs_a_null_class_for_guidance(tmp_path):
    unet = tiny_unet(num_class_embeds=4)
    folder = save_folder(tmp_path / "cu", unet, ddim("epsilon"))
    teacher, d = load_teacher(folder)
    assert d["num_classes"] == 4 and not d["null_class"]
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    assert teacher.velocity(x, t, torch.tensor([0, 3])).shape == x.shape
    with pytest.raises(ValueError, match="no null"):
        teacher.velocity(x, t, None)
    with pytest.raises(ValueError, match="no null"):
        teacher.velocity(x, t, torch.tensor([0, 3]), guidance=2.0)
    teacher_null, d_null = load_teacher(folder, null_class=True)  # last embedding = unconditional
    assert d_null["num_classes"] == 3 and d_null["null_class"]
    with torch.no_grad():
        v_g = teacher_null.velocity(x, t, torch.tensor([0, 2]), guidance=2.0)
    assert torch.isfinite(v_g).all()


def test_edm_denoiser_of_a_gaussian_gives_the_exact_velocity():
    """D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) is the exact denoiser of N(mu, s^2 I); through
    the change of path it must give the Gaussian's exact linear-path velocity, also through EDM's
    preconditioning of a raw network F (sigma_data)."""
    mu, s = torch.tensor([1.0, -0.5]), 0.7

    class Exact(torch.nn.Module):
        data_shape = (2,)

        def forward(self, x, sigma):
            sig2 = sigma[:, None].double() ** 2
            return (mu + s**2 / (s**2 + sig2) * (x.double() - mu)).float()

    sd = 0.5

    class Raw(torch.nn.Module):  # F with c_skip x + c_out F(c_in x, c_noise) = exact D
        def forward(self, x_in, c_noise):
            sigma = torch.exp(4 * c_noise.double())[:, None]
            x = x_in.double() * torch.sqrt(sigma**2 + sd**2)
            D = mu + s**2 / (s**2 + sigma**2) * (x - mu)
            c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / torch.sqrt(sigma**2 + sd**2)
            return ((D - c_skip * x) / c_out).float()

    gmm = GaussianMixtureTeacher(mu[None], (s**2 * torch.eye(2))[None])
    x = torch.randn(256, 2)
    t = torch.rand(256) * 0.96 + 0.02  # sigma in [0.02, 24], inside [sigma_min, sigma_max]
    v_ref = gmm.velocity(x, t)
    for teacher in (EDMDenoiserTeacher(Exact()), EDMDenoiserTeacher(Raw(), sigma_data=sd, data_shape=(2,))):
        err = float((teacher.velocity(x, t) - v_ref).abs().max())
        assert err < 1e-4, err
    edge = EDMDenoiserTeacher(Exact()).velocity(x[:2], torch.tensor([0.0, 1.0]))
    assert torch.isfinite(edge).all()  # clamped to [sigma_min, sigma_max] at the ends


def test_distill_from_diffusers_teacher_and_save_student(tmp_path):
    """A few steps of consistency distillation from the diffusers teacher, then save and reload the student."""
    folder = save_folder(tmp_path / "model", tiny_unet(), ddim("epsilon"))
    teacher = CheckpointTeacher(str(folder))
    student = FlowMap(
        build_net(
            {
                "name": "unet",
                "data_shape": [1, 8, 8],
                "channels": 8,
                "channel_mult": [1, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "emb_dim": 32,
            }
        )
    )
    objective = build_objective({"name": "cd", "steps": 8, "solver": "euler", "target_ema": 0.9})
    with torch.no_grad():  # data-free: x0 from the teacher's own Euler samples
        x0 = solve(teacher, torch.randn(16, 1, 8, 8), 8, "euler")
    before = [p.detach().clone() for p in student.parameters()]
    losses = fit(
        student, objective, lambda step: (x0[(4 * step) % 16 : (4 * step) % 16 + 4], None), steps=4, teacher=teacher
    )
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    path = save_student(tmp_path / "student.safetensors", student, method="cd", teacher=json.dumps(teacher.description))
    app = load_student(path)
    noise = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(app.sample(noise), student(noise, torch.ones(3), torch.zeros(3)))


def test_distill_script_detects_the_folder_and_builds_the_teacher_from_yaml(tmp_path, capsys):
    """scripts/distill.py --teacher FOLDER says what it found, and LightningCLI builds the teacher from
    the spec it writes ({"class_path": "teachers.CheckpointTeacher", "init_args": {"path": ...}})."""
    import numpy as np
    from lightning import LightningDataModule

    from flowmap.lightning.cli import FlowmapCLI
    from flowmap.lightning.distill_module import DistillModule
    from scripts.distill import expand_teacher_flag

    folder = save_folder(tmp_path / "model", tiny_unet(), ddim("v_prediction"))
    np.savez(tmp_path / "x.npz", x=np.zeros((8, 1, 8, 8), dtype=np.float32))
    config = tmp_path / "cd.yaml"
    config.write_text(
        "model:\n"
        "  student: {net: {name: unet, data_shape: [1, 8, 8], channels: 8, channel_mult: [1, 2], num_res_blocks: 1, "
        "attn_resolutions: [], emb_dim: 32}}\n"
        "  objective: {name: cd, steps: 4, solver: euler}\n"
        "data:\n"
        "  class_path: flowmap.lightning.datamodules.TensorDataModule\n"
        f"  init_args: {{path: {tmp_path / 'x.npz'}, batch_size: 4}}\n"
        "trainer: {max_steps: 1, enable_progress_bar: false}\n"
    )
    args = expand_teacher_flag(
        ["--teacher", str(folder), "--config", str(config), "--run_dir", str(tmp_path / "run"), "--logger", "none"]
    )
    out = capsys.readouterr().out
    assert "teacher: diffusers UNet2DModel + DDIMScheduler: prediction v_prediction -> v, path vp_discrete" in out
    cli = FlowmapCLI(DistillModule, LightningDataModule, subclass_mode_data=True, args=args)
    teacher = cli.model.teacher
    assert (
        isinstance(teacher, CheckpointTeacher)
        and teacher.source == str(folder)
        and not any(p.requires_grad for p in teacher.parameters())
    )
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.equal(teacher.velocity(x, t), load_teacher(folder)[0].velocity(x, t))


def test_pipeline_folder_layout(tmp_path):
    """model_index.json + unet/ + scheduler/ loads the same teacher as a flat model folder."""
    unet, scheduler = tiny_unet(), ddim("epsilon")
    pipe = tmp_path / "pipe"
    unet.save_pretrained(pipe / "unet")
    scheduler.save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDIMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    flat = save_folder(tmp_path / "flat", unet, scheduler)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(load_teacher(pipe)[0].velocity(x, t), load_teacher(flat)[0].velocity(x, t))
