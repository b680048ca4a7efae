"""Issue 20, schedulers: every diffusers scheduler with training betas is the same teacher; flow-matching
schedulers with a shift are ours; clipping schedulers are refused with one line or sampled exactly like
diffusers' DDIMPipeline (teachers.diffusers_sampler); every timestep spacing reproduces DDIMPipeline."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowmap.io import CheckpointError
from flowmap.solvers import solve
from teachers import load_teacher
from teachers.diffusers_sampler import ddim_plan, ddim_sample

N_TRAIN, K = 50, 10
UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
}
BETAS = {"num_train_timesteps": N_TRAIN, "beta_start": 1e-3, "beta_end": 0.2, "beta_schedule": "linear"}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel.from_config(UNET).eval()


def folder(root, unet, scheduler) -> str:
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root)
    scheduler.save_pretrained(root)
    return str(root)


def velocity(path, x, t, **kw):
    teacher, description = load_teacher(path, **kw)
    with torch.no_grad():
        return teacher.velocity(x, t), description


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_every_scheduler_with_training_betas_is_the_same_teacher(tmp_path, unet, prediction):
    base = diffusers.DDIMScheduler(**BETAS, prediction_type=prediction, clip_sample=False)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.02, 0.2, 0.4, 0.55, 0.7, 0.9])
    ref, _ = velocity(folder(tmp_path / "ddim", unet, base), x, t)
    names = [
        "EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "UniPCMultistepScheduler",
        "HeunDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DDPMScheduler",
    ]
    for name in names:
        sched = getattr(diffusers, name).from_config({**base.config, "clip_sample": False})
        assert sched.config.prediction_type == prediction
        v, d = velocity(folder(tmp_path / name, unet, sched), x, t)
        assert d["scheduler"] == name and d["path"] == "vp_discrete"
        assert float((v - ref).abs().max()) <= 1e-6, name
    # negative control: other training betas are another teacher
    other = diffusers.EulerDiscreteScheduler(**{**BETAS, "beta_end": 0.1}, prediction_type=prediction)
    v, _ = velocity(folder(tmp_path / "other", unet, other), x, t)
    assert float((v - ref).abs().max()) > 1e-2


def test_flow_matching_schedulers_with_a_shift_are_our_linear_path(tmp_path, unet):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.3, 0.6, 0.95])
    ref, d = velocity(
        folder(tmp_path / "fm", unet, diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100)), x, t
    )
    assert (d["path"], d["prediction"]) == ("linear", "velocity")
    with torch.no_grad():
        assert torch.allclose(ref, unet(x, t * 100).sample, atol=1e-6)  # the model's output at timestep sigma N
    for sched in (
        diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0),
        diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=100, shift=2.0),
        diffusers.UniPCMultistepScheduler(
            num_train_timesteps=100, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
        ),
    ):
        v, d = velocity(folder(tmp_path / type(sched).__name__, unet, sched), x, t)
        assert d["path"] == "linear" and float((v - ref).abs().max()) <= 1e-6, type(sched).__name__


def test_unsupported_schedulers_are_one_line(tmp_path, unet):
    for sched, words in (
        (diffusers.LCMScheduler(**BETAS), "consistency-distilled"),
        (diffusers.EulerDiscreteScheduler(**BETAS, timestep_type="continuous"), "timestep_type"),
        (diffusers.ScoreSdeVeScheduler(), "no training betas"),  # EDM schedulers: tests/test_edm_folder_teacher.py
    ):
        with pytest.raises(CheckpointError, match=words) as err:
            load_teacher(folder(tmp_path / type(sched).__name__, unet, sched))
        assert "\n" not in str(err.value)


@torch.no_grad()
def pipeline_and_loop(
    unet, scheduler, batch: int = 4, seed: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, DDIMPipeline's image (B, H, W, C) in [0, 1], diffusers' own unclamped DDIM loop), eta 0."""
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        batch_size=batch,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=K,
        eta=0.0,
        output_type="np",
    ).images
    noise = torch.randn((batch, 1, 8, 8), generator=torch.Generator().manual_seed(seed))  # randn_tensor on the CPU
    sched = pipe.scheduler
    sched.set_timesteps(K)
    x = noise.clone()
    for k in sched.timesteps:
        x = sched.step(unet(x, k).sample, k, x, eta=0.0).prev_sample
    return noise, torch.from_numpy(image), x


def as_image(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "spacing, offset, alpha_one",
    [("leading", 1, True), ("leading", 0, False), ("trailing", 0, False), ("linspace", 0, True)],
)
def test_each_timestep_spacing_reproduces_ddim_pipeline(tmp_path, unet, spacing, offset, alpha_one):
    """leading from timestep 0 without set_alpha_to_one ends with a step onto its own level (dropped from the grid)."""
    sched = diffusers.DDIMScheduler(
        **BETAS, clip_sample=False, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one
    )
    path = folder(tmp_path / spacing, unet, sched)
    teacher, _ = load_teacher(path)
    noise, image, loop = pipeline_and_loop(unet, sched)
    assert float((loop - noise).abs().max()) > 0.1  # the sampler moved
    ours = ddim_sample(teacher, noise, K)
    assert rel(ours, loop) < 1e-4
    assert rel(as_image(ours), image) < 1e-4
    plan = ddim_plan(teacher, K)
    if spacing == "linspace":  # DDIM steps to k - N // K but evaluates next at another timestep: no one grid
        with pytest.raises(ValueError, match="not one time grid"):
            plan.grid()
        euler = solve(
            teacher,
            noise / plan.scale(plan.t_eval[0]),
            torch.tensor((*plan.t_eval, plan.t_next[-1]), dtype=torch.float64),
            "euler",
        ) * plan.scale(plan.t_next[-1])
        assert rel(euler, loop) > 1e-2  # the Euler grid through the evaluated timesteps is another sampler
    else:  # the plan is one time grid: our Euler solver on it is diffusers' DDIM
        grid = plan.grid()
        assert len(grid) == K + 1 - int(spacing == "leading" and not alpha_one)
        euler = solve(teacher, noise / plan.scale(float(grid[0])), grid, "euler") * plan.scale(float(grid[-1]))
        assert rel(euler, loop) < 1e-4


@pytest.mark.parametrize(
    "clip",
    [
        {"clip_sample": True},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    ],
)
def test_clipping_schedulers_are_refused_or_sampled_exactly(tmp_path, unet, clip):
    sched = diffusers.DDIMScheduler(**BETAS, **clip)
    path = folder(tmp_path / "clip", unet, sched)
    with pytest.raises(CheckpointError, match="allow_clip_mismatch") as err:
        load_teacher(path)
    line = str(err.value)
    assert "\n" not in line and ("clip_sample=True" in line or "thresholding=True" in line)
    teacher, d = load_teacher(path, allow_clip_mismatch=True)
    assert any("not applied" in n for n in d["notes"])
    noise, image, loop = pipeline_and_loop(unet, sched)
    ours = ddim_sample(teacher, noise, K)
    assert rel(ours, loop) < 1e-4 and rel(as_image(ours), image) < 1e-4
    # the velocity field alone (no clipping) is far from diffusers' sampler: what the refusal is about
    plan = ddim_plan(teacher, K)
    unclipped = solve(teacher, noise / plan.scale(plan.t_eval[0]), plan.grid(), "euler")
    assert rel(unclipped, loop) > 1e-2


def test_a_config_without_clip_sample_takes_diffusers_default(tmp_path, unet):
    """DDPMScheduler's default is clip_sample=True: a config file that omits the key clips, and is refused."""
    import json

    path = folder(tmp_path / "ddpm", unet, diffusers.DDPMScheduler(**BETAS, clip_sample=False))
    cfg_file = tmp_path / "ddpm" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("clip_sample")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"clipping of x0 to \[-1.0, 1.0\] \(clip_sample=True\)"):
        load_teacher(path)


@pytest.mark.parametrize(
    "sched",
    [
        diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=2.0),
        diffusers.UniPCMultistepScheduler(
            num_train_timesteps=100, use_flow_sigmas=True, flow_shift=2.0, prediction_type="flow_prediction"
        ),
    ],
)
def test_flow_folders_are_sampled_like_flow_matching_euler(tmp_path, unet, sched):
    """--teacher_sampler diffusers on a flow-matching folder: diffusers' FlowMatchEulerDiscreteScheduler loop with the
    folder's shift (flow_shift for DPMSolver / UniPC with use_flow_sigmas)."""
    teacher, _ = load_teacher(folder(tmp_path / "f", unet, sched))
    ref_sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=2.0)
    ref_sched.set_timesteps(6)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    x = noise.clone()
    with torch.no_grad():
        for ts in ref_sched.timesteps:
            x = ref_sched.step(unet(x, ts).sample, ts, x).prev_sample
    assert float((x - noise).abs().max()) > 0.1
    assert rel(ddim_sample(teacher, noise, 6), x) < 1e-5
