"""One ``Teacher`` base (flowmap/teacher.py) for every teacher type: each type gives only its path velocity (and time
map), and the base's change of path, checks and one-pass classifier-free guidance make the public velocity."""

from __future__ import annotations

import pytest
import torch

from flowmap.edm_velocity import EDMDenoiserTeacher
from flowmap.nets import build_net
from flowmap.paths import DiscreteVPPath, LinearPath, VPPath, ddpm_alphas_cumprod, from_linear, velocity_to_linear
from flowmap.teacher import Teacher
from flowmap.types import TeacherLike
from flowmap.velocity import NetVelocity
from teachers import CheckpointTeacher, preset_mixture
from tests.weights import trained_like

F64 = torch.float64
N_TRAIN = 50


def mlp(num_classes: int = 3) -> torch.nn.Module:
    net = build_net({"name": "mlp", "data_shape": [2], "width": 32, "depth": 2, "num_classes": num_classes})
    return trained_like(net).double().eval()


class LabelDenoiser(torch.nn.Module):
    """F(c_in x, c_noise, labels) of EDM's preconditioning: a small random MLP with a label embedding, float64."""

    data_shape = (2,)

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(num_classes + 1, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(11, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([x, c_noise[:, None], self.emb(labels)], 1))


def edm() -> EDMDenoiserTeacher:
    torch.manual_seed(0)
    return EDMDenoiserTeacher(LabelDenoiser().double(), sigma_data=0.5, num_classes=3).eval()


def diffusers_teacher():
    diffusers = pytest.importorskip("diffusers")
    from flowmap.diffusers_velocity import DiffusersNet, DiffusersTeacher

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=[8, 16],
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=["DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D"],
        num_class_embeds=4,  # 3 classes and the null class
    )
    path = DiscreteVPPath(tuple(ddpm_alphas_cumprod(N_TRAIN, 1e-3, 0.2)))
    return DiffusersTeacher(DiffusersNet(unet.double().eval(), null_class=True), path, "eps", N_TRAIN).eval()


TYPES = {
    "net_linear": lambda: NetVelocity(mlp(), "linear", "velocity"),
    "net_vp": lambda: NetVelocity(mlp(), VPPath(), "eps"),
    "edm": edm,
    "diffusers": diffusers_teacher,
    "mixture": lambda: preset_mixture("ring8"),
}


def batch(teacher, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *teacher.data_shape, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=F64)
    cond = torch.arange(n) % teacher.num_classes
    return x, t, cond


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (1 + b.abs().max()))


@pytest.mark.parametrize("kind", list(TYPES))
def test_every_type_is_a_teacher_whose_velocity_is_its_path_velocity_carried_to_the_linear_axis(kind):
    teacher = TYPES[kind]()
    assert isinstance(teacher, Teacher) and isinstance(teacher, TeacherLike)
    assert type(teacher).path_velocity is not Teacher.path_velocity
    assert type(teacher).velocity is Teacher.velocity  # no type redoes the checks or the guidance
    x_lin, t_lin, cond = batch(teacher)
    with torch.no_grad():
        x, t = teacher.from_linear(x_lin, t_lin)
        carried = velocity_to_linear(teacher.path_velocity(x, t, cond), x, t, teacher.path)
        v = teacher.velocity(x_lin, t_lin, cond)
    assert rel(carried, v) < 1e-12
    assert v.dtype == F64 and v.shape == x_lin.shape


def test_path_velocities_are_each_types_own_model_call():
    """Independent of the base: the linear velocity eps - x0 from each model called at its own (x, t)."""
    g = torch.Generator().manual_seed(1)
    x_lin, t_lin, cond = torch.randn(12, 2, generator=g, dtype=F64), torch.linspace(0.05, 0.95, 12, dtype=F64), None
    cond = torch.arange(12) % 3
    with torch.no_grad():
        # a flowmap net predicting eps on the VP path (Song et al. 2021): x = (alpha + sigma) x_lin
        net_vp = TYPES["net_vp"]()
        x, t = from_linear(x_lin, t_lin, VPPath())
        a, s = VPPath().alpha(t)[:, None], VPPath().sigma(t)[:, None]
        eps = net_vp.net(x, t, t, cond)
        assert rel(net_vp.velocity(x_lin, t_lin, cond), eps - (x - s * eps) / a) < 1e-10
        # EDM: v_lin = (x_lin - D(x_lin (1 + sigma), sigma)) / t with sigma = t / (1 - t)
        teacher = edm()
        sigma = t_lin / (1 - t_lin)
        d = teacher.denoise(x_lin * (1 + sigma[:, None]), sigma, cond)
        assert rel(teacher.velocity(x_lin, t_lin, cond), (x_lin - d) / t_lin[:, None]) < 1e-10
        # diffusers: the UNet at its (fractional) DDPM timestep, on the discrete VP path
        teacher = diffusers_teacher()
        xi = torch.randn(12, 1, 8, 8, generator=g, dtype=F64)
        tau, t = teacher.vp_step(t_lin)
        a, s = (teacher.path.alpha(t).view(-1, 1, 1, 1), teacher.path.sigma(t).view(-1, 1, 1, 1))
        x = xi * (a + s)
        eps = teacher.net.model(x, tau, class_labels=cond).sample
        assert rel(teacher.velocity(xi, t_lin, cond), eps - (x - s * eps) / a) < 1e-6
        # the mixture's exact velocity on its (linear) path is the conditional mixture's (ring8: labels = index mod 2)
        mix = preset_mixture("ring8")
        c2 = torch.arange(12) % 2
        assert torch.equal(mix.velocity(x_lin, t_lin, c2), mix.exact_velocity(x_lin, t_lin, LinearPath(), c2))


@pytest.mark.parametrize("kind", list(TYPES))
def test_guidance_one_is_conditional_zero_is_unconditional_in_one_batched_pass(kind):
    teacher = TYPES[kind]()
    x, t, cond = batch(teacher, seed=2)
    null = torch.full_like(cond, teacher.num_classes)
    calls = []
    teacher.path_velocity = lambda *a, _f=teacher.path_velocity: calls.append(a[0].shape[0]) or _f(*a)
    with torch.no_grad():
        v_c, v_u = teacher.velocity(x, t, cond), teacher.velocity(x, t, null)
        calls.clear()
        v_2 = teacher.velocity(x, t, cond, guidance=2.5)
        assert calls == [2 * len(x)]  # v_u and v_c in one pass
        assert rel(teacher.velocity(x, t, cond, guidance=torch.ones(len(x))), v_c) < 1e-12
        assert rel(teacher.velocity(x, t, cond, guidance=0.0), v_u) < 1e-12
        assert rel(v_2, v_u + 2.5 * (v_c - v_u)) < 1e-12
        w = torch.linspace(0.0, 3.0, len(x), dtype=F64)  # one scale per sample
        assert (
            rel(teacher.velocity(x, t, cond, guidance=w), v_u + w.view(-1, *[1] * (x.dim() - 1)) * (v_c - v_u)) < 1e-12
        )
    assert rel(v_c, v_u) > 1e-4  # the label matters: the test can tell w = 0 from w = 1


class PointMass(Teacher):
    """Data = a point mass at mu[c] (mu[null] for the unconditional model) on the VP path: the only method written."""

    path = VPPath()
    data_shape = (2,)
    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.mu = torch.tensor([[1.0, -2.0], [-0.5, 0.5], [0.25, 0.75]], dtype=F64)  # classes 0, 1, null

    def path_velocity(self, x, t, cond):
        mu = self.mu[torch.full((len(x),), 2) if cond is None else cond]
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        eps = (x - a * mu) / s  # x = alpha mu + sigma eps
        return self.path.d_alpha(t)[:, None] * mu + self.path.d_sigma(t)[:, None] * eps


def test_a_type_that_writes_only_path_velocity_gets_the_linear_axis_guidance_and_checks():
    teacher = PointMass()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(16, 2, generator=g, dtype=F64), torch.linspace(0.02, 0.98, 16, dtype=F64)
    cond = torch.arange(16) % 2
    exact = lambda c: (x - teacher.mu[c]) / t[:, None]  # noqa: E731  linear path: v = eps - x0 = (x - x0) / t
    v_c = teacher.velocity(x, t, cond)
    assert rel(v_c, exact(cond)) < 1e-10
    v_u = exact(torch.full_like(cond, 2))
    assert rel(teacher.velocity(x, t), v_u) < 1e-10
    assert rel(teacher.velocity(x, t, cond, guidance=3.0), v_u + 3.0 * (exact(cond) - v_u)) < 1e-10
    with pytest.raises(ValueError, match=r"expects \(B, 2\)"):
        teacher.velocity(torch.zeros(4, 3, dtype=F64), t[:4])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        teacher.velocity(x, t + 1.0)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 2\]"):
        teacher.velocity(x, t, torch.full((16,), 5))
    with pytest.raises(ValueError, match="text condition"):
        from flowmap.conditions import TextCondition

        teacher.velocity(x, t, TextCondition(torch.zeros(16, 3, 4)))


def test_edm_velocity_holds_its_x0_above_sigma_max():
    """Above t(sigma_max) = sigma_max / (1 + sigma_max) ~ 0.988 the EDM teacher's linear velocity is
    (x_lin - D(x_lin (1 + sigma_c), sigma_c)) / t_lin with sigma_c = t / (1 - t) clamped to [sigma_min, sigma_max]:
    the x0 estimate at sigma_max held, consistent with x_lin = (1 - t) x0 + t eps; below sigma_min it divides by
    t(sigma_min). The mapped point's velocity (dividing by t(sigma_max)) is 0.2% to 1.2% off there."""
    teacher = edm()
    g = torch.Generator().manual_seed(2)
    x_lin, cond = torch.randn(6, 2, generator=g, dtype=F64), torch.arange(6) % 3
    t_floor = teacher.sigma_min / (1 + teacher.sigma_min)
    for t_val in (0.99, 0.999, 1.0, 1e-4, 0.5):
        t = torch.full((6,), t_val, dtype=F64)
        sigma_c = (t / (1 - t)).clamp(teacher.sigma_min, teacher.sigma_max)
        with torch.no_grad():
            x0 = teacher.denoise(x_lin * (1 + sigma_c[:, None]), sigma_c, cond)
            v = teacher.velocity(x_lin, t, cond)
        want = (x_lin - x0) / t.clamp_min(t_floor)[:, None]
        assert rel(v, want) < 1e-6, t_val
        if t_val > 0.99:  # the mapped point's velocity differs by far more: the test has teeth
            assert rel(v, (x_lin - x0) / (sigma_c / (1 + sigma_c))[:, None]) > 1e-3


def test_checkpoint_teacher_is_the_loaded_teacher(tmp_path):
    from flowmap.models import save_teacher

    inner = NetVelocity(mlp(), VPPath(), "eps")
    path = save_teacher(tmp_path / "t.safetensors", NetVelocity(inner.net.float(), VPPath(), "eps"))
    teacher = CheckpointTeacher(str(path))
    assert isinstance(teacher, Teacher) and teacher.path == VPPath() and teacher.num_classes == 3
    x, t, cond = batch(teacher)
    x, t = x.float(), t.float()
    with torch.no_grad():
        want = teacher.teacher.velocity(x, t, cond, 2.0)
        assert torch.equal(teacher.velocity(x, t, cond, 2.0), want)
        xp, tp = teacher.from_linear(x, t)
        carried = velocity_to_linear(teacher.path_velocity(xp, tp, cond), xp, tp, teacher.path)
        assert rel(carried, teacher.velocity(x, t, cond)) < 1e-6


def test_load_teacher_consults_the_registered_kinds(tmp_path):
    """A mixture file is a kind (teachers.gmm), and a kind registered from outside is read by load_teacher and
    CheckpointTeacher without editing them."""
    from flowmap.io import CheckpointError
    from teachers import TEACHER_KINDS, TeacherKind, load_teacher, register_teacher_kind

    mix = preset_mixture("ring8")
    teacher, d = load_teacher(mix.save(tmp_path / "ring8.json"))
    x, t, cond = batch(mix)
    assert d["kind"] == "mixture" and torch.equal(teacher.velocity(x, t, cond, 2.0), mix.velocity(x, t, cond, 2.0))
    (tmp_path / "m.pm").write_text("point mass")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_teacher(tmp_path / "m.pm")
    kind = TeacherKind(
        "point_mass",
        lambda p: p.is_file() and p.read_bytes() == b"point mass",
        lambda p, **_: (PointMass(), {"kind": "point_mass", "data_shape": [2], "num_classes": 2}),
        "a point-mass file",
    )
    register_teacher_kind(kind)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_teacher_kind(kind)
        wrapped = CheckpointTeacher(str(tmp_path / "m.pm"))
        assert isinstance(wrapped.teacher, PointMass) and wrapped.path == VPPath()
        xp, tp = torch.randn(4, 2, dtype=F64), torch.full((4,), 0.5, dtype=F64)
        assert rel(wrapped.velocity(xp, tp, torch.zeros(4, dtype=torch.long)), 2 * (xp - wrapped.teacher.mu[0])) < 1e-10
        with pytest.raises(CheckpointError, match="or a point-mass file"):
            load_teacher(tmp_path / "ring8.txt")
    finally:
        TEACHER_KINDS.pop("point_mass")


def test_text_guidance_is_the_same_one_pass_against_the_teachers_empty_prompt():
    """A TextCondition without its own null is guided against the teacher's ``null_condition`` (the empty prompt),
    in one batched pass; cond None is the empty prompt's velocity; without a null, one clear error."""
    from flowmap.conditions import TextCondition
    from flowmap.diffusers_velocity import DiffusersNet, DiffusersTeacher
    from tests.latent_parts import tiny_sd3

    teacher = DiffusersTeacher(
        DiffusersNet(tiny_sd3(joint_dim=16, pooled_dim=8, seed=0)), LinearPath(), "velocity", 1000
    ).eval()
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.2, 0.5, 0.9])
    c = TextCondition(torch.randn(3, 7, 16, generator=g), torch.randn(3, 8, generator=g))
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs a condition"):
            teacher.velocity(x, t)
        with pytest.raises(ValueError, match="no null"):
            teacher.velocity(x, t, c, guidance=2.0)
        null = TextCondition(torch.randn(1, 7, 16, generator=g), torch.randn(1, 8, generator=g))
        teacher.null_condition = null
        v_u = teacher.velocity(x, t)
        assert rel(v_u, teacher.velocity(x, t, TextCondition.cat([null] * 3))) < 1e-6
        v_c = teacher.velocity(x, t, c)
        calls = []
        hook = teacher.net.model.register_forward_pre_hook(
            lambda m, a, k: calls.append(len(a[0]) if a else 0), with_kwargs=True
        )
        v_w = teacher.velocity(x, t, c, guidance=2.5)
        hook.remove()
        assert calls == [6]  # v_u and v_c: one call on 2 B rows
        assert rel(v_w, v_u + 2.5 * (v_c - v_u)) < 1e-5 and rel(v_c, v_u) > 1e-3
