"""A student made from the teacher's own network (flowmap/nets/diffusers_net.py): at step 0 it is the teacher's
one Euler step on our axis, X(x, s, t) = x + (t - s) v_teacher(x, s), for every wrapped model type; it trains
through scripts/distill.py --teacher FOLDER with no student named, and reloads bit-identically."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from flowmap.app import load_student
from flowmap.diffusers_velocity import DiffusersNet, DiffusersTeacher
from flowmap.edm_velocity import EDMDenoiserTeacher
from flowmap.io import read_config
from flowmap.models import save_student, student_from_teacher
from flowmap.nets import build_net
from teachers.diffusers_adapter import schedule_from_config
from tests.latent_parts import run_fresh

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 50


def ddim(prediction: str) -> diffusers.DDIMScheduler:
    return diffusers.DDIMScheduler(
        num_train_timesteps=N_TRAIN, beta_start=1e-3, beta_end=0.2, prediction_type=prediction, clip_sample=False
    )


def teacher_of(model, scheduler) -> DiffusersTeacher:
    path, prediction, n = schedule_from_config({**scheduler.config, "_class_name": type(scheduler).__name__})
    return DiffusersTeacher(
        DiffusersNet(model.eval().requires_grad_(False), null_class=False), path, prediction, n
    ).eval()


def unet(**kw):
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
        **kw,
    )


def dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=3,
    )


def cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
    )


def sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=2,
        out_channels=2,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=8,
        pooled_projection_dim=6,
        pos_embed_max_size=8,
    )


def edm_teacher() -> EDMDenoiserTeacher:
    """EDM preconditioning (Karras et al. 2022, Table 1) around a diffusers UNet2DModel as the raw network F."""
    return EDMDenoiserTeacher(DiffusersNet(unet().eval().requires_grad_(False)), sigma_data=0.5).eval()


def flow(model):
    return teacher_of(model, diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0))


CASES = {
    "unet_eps": (lambda: teacher_of(unet(), ddim("epsilon")), lambda g: None),
    "unet_v": (lambda: teacher_of(unet(), ddim("v_prediction")), lambda g: None),
    "dit_labels": (lambda: flow(dit()), lambda g: torch.tensor([0, 2, 3, 1, 3, 0])),  # 3 = null label
    "unet_cond": (lambda: teacher_of(cond_unet(), ddim("epsilon")), lambda g: torch.randn(6, 5, 12, generator=g)),
    "sd3_flow": (
        lambda: flow(sd3()),
        lambda g: {
            "encoder_hidden_states": torch.randn(6, 5, 12, generator=g),
            "pooled_projections": torch.randn(6, 6, generator=g),
        },
    ),
    "edm": (edm_teacher, lambda g: None),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_student_at_step_zero_is_the_teachers_euler_step(case):
    make_teacher, make_cond = CASES[case]
    teacher = make_teacher()
    student = student_from_teacher(teacher)
    g = torch.Generator().manual_seed(1)
    shape = teacher.data_shape
    x = torch.randn(6, *shape, generator=g)
    s = torch.rand(6, generator=g) * 0.98 + 0.01
    t = s * torch.rand(6, generator=g)  # t < s: towards the data
    cond = make_cond(g)
    with torch.no_grad():
        ref = x + (t - s).view(-1, 1, 1, 1) * teacher.velocity(x, s, cond)
        out = student(x, s, t, cond)
        assert rel(out, ref) < 1e-5
        # the student's copy is independent of the teacher: perturbing the injected interval MLP changes the
        # student (so the interval does reach the network), and leaves the teacher as it was
        torch.nn.init.normal_(student.net.injection.emb_d[-1].weight, std=1.0)
        moved = student(x, s, t, cond)
        assert rel(moved, ref) > 1e-3
        assert torch.equal(x + (t - s).view(-1, 1, 1, 1) * teacher.velocity(x, s, cond), ref)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_guidance_conditioned_student_starts_as_the_unguided_teacher():
    teacher = flow(dit())
    student = student_from_teacher(teacher, guidance_input=True)
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(4, 1, 8, 8, generator=g), torch.full((4,), 0.7)
    t, labels = torch.full((4,), 0.2), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = x + (t - s).view(-1, 1, 1, 1) * teacher.velocity(x, s, labels)
        for w in (1.0, 4.0):
            assert rel(student(x, s, t, labels, torch.full((4,), w)), ref) < 1e-5


def test_from_scratch_student_has_the_architecture_but_not_the_weights():
    teacher = teacher_of(unet(), ddim("epsilon"))
    copied, fresh = student_from_teacher(teacher), student_from_teacher(teacher, init=False)
    assert copied.net.config == fresh.net.config
    a, b = copied.net.model.state_dict(), fresh.net.model.state_dict()
    assert a.keys() == b.keys() == teacher.net.model.state_dict().keys()  # diffusers' own layout
    assert sum(not torch.equal(a[k], b[k]) for k in a) > len(a) // 2


def test_config_rebuilds_the_student_from_json(tmp_path):
    student = student_from_teacher(teacher_of(unet(), ddim("v_prediction")))
    path = save_student(tmp_path / "s.safetensors", student)
    config = read_config(path)
    assert config["net"]["name"] == "diffusers" and config["net"]["model_class"] == "UNet2DModel"
    assert config["net"]["teacher"]["prediction"] == "v"
    rebuilt = build_net(config["net"])
    assert rebuilt.config == student.net.config
    app = load_student(path)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(app.sample(noise, steps=2), load_student(path).sample(noise, steps=2))


@pytest.mark.slow
def test_distill_script_with_a_folder_and_no_student_trains_from_the_teachers_weights(tmp_path):
    """scripts/distill.py --teacher FOLDER with only objective, data and trainer: the student is the teacher's
    UNet2DModel (init_from_teacher by default), 20 steps train it, and a fresh process reloads it bit-identically."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "scripts"))
    import distill

    folder = tmp_path / "teacher"
    unet().save_pretrained(folder)
    ddim("epsilon").save_pretrained(folder)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32))
    config = tmp_path / "cd.yaml"
    config.write_text(
        "model:\n"
        "  objective: {name: cd, steps: 4, solver: euler}\n"
        "  ema_decay: 0.5\n"
        "data:\n"
        "  class_path: flowmap.lightning.datamodules.TensorDataModule\n"
        f"  init_args: {{path: {tmp_path / 'x.npz'}, batch_size: 8}}\n"
        "trainer: {max_steps: 20, enable_progress_bar: false}\n"
    )
    out = tmp_path / "student.safetensors"
    cli = distill.main(
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
    )
    module = cli.model
    assert module.hparams.student is None and module.hparams.init_from_teacher is None
    assert module.global_step == 20
    recorded = read_config(out)
    assert recorded["steps_trained"] == 20 and recorded["teacher"]["name"] == "teacher"
    teacher_state = module.teacher.teacher.net.model.state_dict()
    student_state = module.student.net.model.state_dict()
    diff = sum(float((student_state[k] - v).square().sum()) for k, v in teacher_state.items())
    norm = sum(float(v.square().sum()) for v in teacher_state.values())
    assert 0 < (diff / norm) ** 0.5 < 0.1  # trained, starting from the teacher's weights (a fresh init is ~0.9 away)
    assert float(module.student.net.injection.emb_d[-1].weight.detach().abs().max()) > 0  # the interval MLP learned
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(noise, tmp_path / "noise.pt")
    with torch.no_grad():
        ours = load_student(out).sample(noise, steps=2, generator=torch.Generator().manual_seed(5))  # CD re-noises
    code = (
        "import sys, torch; from flowmap import load_student\n"
        f"n = torch.load({str(tmp_path / 'noise.pt')!r})\n"
        f"x = load_student({str(out)!r}).sample(n, steps=2, generator=torch.Generator().manual_seed(5))\n"
        f"torch.save(x, {str(tmp_path / 'fresh.pt')!r})\n"
    )
    run_fresh(code, ROOT)
    assert torch.equal(torch.load(tmp_path / "fresh.pt"), ours)


@pytest.mark.parametrize("backend", ["forward_ad", "func"])
def test_jvp_through_the_wrapped_network_matches_finite_differences(backend):
    """MeanFlow / sCM / AYF differentiate the student in (x, s, t): diffusers' fused attention has no forward-mode
    rule, so the net swaps in explicit-softmax attention during a JVP; the tangent matches float64 differences."""
    from flowmap.jvp import jvp

    student = student_from_teacher(teacher_of(unet(), ddim("epsilon")))  # its mid-block has attention
    torch.nn.init.normal_(student.net.injection.emb_d[-1].weight, std=0.05)
    g = torch.Generator().manual_seed(4)
    x, s, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0.9, 0.6, 0.4]), torch.tensor([0.5, 0.2, 0.1])
    tangents = (torch.randn(3, 1, 8, 8, generator=g), torch.ones(3), torch.full((3,), 0.5))
    _, ours = jvp(student, (x, s, t), tangents, backend=backend)
    _, ref = jvp(student, (x, s, t), tangents, backend="fd", fd_dtype="float64", modules=[student])
    assert rel(ours, ref) < 1e-3
    assert all(
        type(m.processor).__name__ == "AttnProcessor2_0" for m in student.net.model.modules() if hasattr(m, "processor")
    )  # the fused kernels are back after the JVP


def test_init_from_teacher_defaults_to_same_architecture():
    """DistillModule: no student net -> the teacher's own network; a named net like the teacher's starts from
    its weights unless told otherwise; another architecture starts fresh; a teacher whose network cannot be
    wrapped needs a named student net."""
    from flowmap.lightning.distill_module import DistillModule
    from flowmap.velocity import NetVelocity

    cd = {"name": "cd", "steps": 4, "solver": "euler"}
    mlp = {"name": "mlp", "data_shape": [2], "width": 32, "depth": 2}
    torch.manual_seed(0)
    own = NetVelocity(build_net(mlp))
    same = DistillModule(objective=cd, student={"net": mlp}, teacher=own)
    assert all(torch.equal(a, b) for a, b in zip(same.student.net.state_dict().values(), own.net.state_dict().values()))
    off = DistillModule(objective=cd, student={"net": mlp}, teacher=own, init_from_teacher=False)
    fresh_own = off.student.net.state_dict()
    assert sum(not torch.equal(v, fresh_own[k]) for k, v in own.net.state_dict().items()) > 2
    other = DistillModule(objective=cd, student={"net": {**mlp, "width": 16}}, teacher=own)
    assert other.student.net.config["width"] == 16
    with pytest.raises(ValueError, match="name a student net"):
        DistillModule(objective=cd, teacher=own)
    teacher = teacher_of(unet(), ddim("epsilon"))
    auto = DistillModule(objective=cd, teacher=teacher)
    assert auto.student.net.config["name"] == "diffusers"
    a, b = auto.student.net.model.state_dict(), teacher.net.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    fresh = DistillModule(objective=cd, teacher=teacher, init_from_teacher=False).student.net.model.state_dict()
    assert sum(not torch.equal(fresh[k], b[k]) for k in b) > len(b) // 2
