"""Consistency objectives (CD, iCT, ECT) on the analytic ring8 mixture: exactness at the true flow map,
gradient isolation, bad input, and test-sized distillation runs against the exact 1-NFE map."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flowmap.metrics import flow_map_rmse
from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.objectives.base import LINEAR, Draw
from flowmap.objectives.common import stable_target
from flowmap.objectives.consistency import (
    ConsistencyDistillation,
    EasyConsistencyTuning,
    ImprovedConsistencyTraining,
    distance,
    karras_sigmas,
    sigma_to_t,
    teacher_step,
    training_pair,
)
from flowmap.student import FlowMap
from flowmap.training import fit
from flowmap.types import LossOutput
from teachers.gmm import preset_mixture

N_EVAL = 2000


@pytest.fixture(scope="module")
def ring8():
    return preset_mixture("ring8")


@pytest.fixture(scope="module")
def reference(ring8):
    """2000 fixed noises and their exact images X(eps, 1, 0) (float64 RK4 of the exact velocity)."""
    g = torch.Generator().manual_seed(1234)
    eps = torch.randn(N_EVAL, 2, generator=g)
    ref = ring8.flow_map(eps, torch.ones(N_EVAL), torch.zeros(N_EVAL), steps=50)
    return eps, ref


class ExactFlowMap(nn.Module):
    """The mixture's exact flow map as a student: X(x, s, t) = scale * X*(x, s, t) with scale = 1, a
    parameter so that the loss has a graph (and gradients can be checked)."""

    def __init__(self, mix, steps: int = 60) -> None:
        super().__init__()
        self.mix, self.steps = mix, steps
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.data_shape, self.num_classes, self.guidance_input = mix.data_shape, mix.num_classes, False

    def forward(self, x, s, t, cond=None, w=None):
        return self.scale.to(x.dtype) * self.mix.flow_map(x, s, t, cond, steps=self.steps)


def small_student(num_classes: int = 0, dtype=torch.float32) -> FlowMap:
    net = build_net(
        {"name": "mlp", "data_shape": [2], "width": 128, "depth": 2, "emb_dim": 64, "num_classes": num_classes}
    )
    return FlowMap(net).to(dtype)


def one_step_error(student, eps, ref, cond=None) -> float:
    with torch.no_grad():
        X = student(eps, torch.ones(len(eps)), torch.zeros(len(eps)), cond)
    return flow_map_rmse(X, ref)


def mean_loss(objective, student, target, teacher, x0, step=0, seed=0, cond=None) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(
            objective(student=student, teacher=teacher, target=target, x0=x0, cond=cond, step=step).loss.mean()
        )


# --- pieces ------------------------------------------------------------------------------------------


def test_sigma_mapping_and_karras_levels():
    sig = karras_sigmas(18)
    assert sig[0].item() == pytest.approx(0.002) and sig[-1].item() == pytest.approx(80.0)
    assert torch.all(sig[1:] > sig[:-1])
    t = sigma_to_t(sig)
    # x_lin = x_ve / (1 + sigma) at t = sigma / (1 + sigma): the same point, signal 1 - t, noise t
    x0, z = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    for s_, t_ in zip(sig[[0, 9, 17]], t[[0, 9, 17]]):
        assert torch.allclose((x0 + s_ * z) / (1 + s_), (1 - t_) * x0 + t_ * z)
    assert sigma_to_t(torch.tensor([math.inf])).item() == 1.0


def test_pseudo_huber_matches_definition():
    a, b = torch.randn(7, 3, 4), torch.randn(7, 3, 4)
    c = 0.00054 * math.sqrt(12)
    sq = (a - b).pow(2).flatten(1).sum(1)
    assert torch.allclose(distance(a, b, "pseudo_huber", None), torch.sqrt(sq + c * c) - c)
    assert torch.allclose(distance(a, b, "l2", None), sq)
    assert torch.allclose(distance(a, b, "pseudo_huber", 0.5), torch.sqrt(sq + 0.25) - 0.5)


def test_teacher_step_orders(ring8):
    """Euler's local error is O(h^2), Heun's O(h^3): halving h divides them by ~4 and ~8."""
    x0 = ring8.sample(256, torch.Generator().manual_seed(0)).double()
    t = torch.full((256,), 0.6, dtype=torch.float64)
    x = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(256, 2, dtype=torch.float64)
    errs = {}
    for method in ("euler", "heun"):
        errs[method] = []
        for h in (0.02, 0.01):
            r = t - h
            exact = ring8.flow_map(x, t, r, steps=4)  # RK4 over h <= 0.02: error ~1e-12
            errs[method].append((teacher_step(ring8, x, t, r, method) - exact).norm(dim=1).mean().item())
    e_ratio, h_ratio = errs["euler"][0] / errs["euler"][1], errs["heun"][0] / errs["heun"][1]
    print(f"local errors euler {errs['euler']} (ratio {e_ratio:.2f}), heun {errs['heun']} (ratio {h_ratio:.2f})")
    assert 3.4 < e_ratio < 4.6 and 6.5 < h_ratio < 9.5


def test_ict_curriculum_is_a_pure_function_of_the_step():
    ict = ImprovedConsistencyTraining(total_steps=7000, s0=10, s1=1280)
    # K' = floor(7000 / (log2(128) + 1)) = 875; N(k) = min(10 * 2^floor(k / 875), 1280) + 1
    expected = {0: 11, 874: 11, 875: 21, 1750: 41, 5250: 641, 6125: 1281, 10**6: 1281}
    for k in sorted(expected, reverse=True):  # any order: no state
        assert ict.discretization_steps(k) == expected[k]
    p = ict.interval_probs(ict.sigmas(0))
    assert p.shape == (10,) and abs(p.sum().item() - 1) < 1e-12 and torch.all(p > 0)


def test_ect_mapping_function_shrinks_dt():
    ect = EasyConsistencyTuning(stage_steps=100, q=2.0, k=8.0, b=1.0)
    sig_t = torch.tensor([0.01, 0.5, 2.0, 20.0], dtype=torch.float64)
    gaps = []
    for stage in range(6):
        sig_r = ect.r_of_t(sig_t, stage * 100 + 50)
        assert torch.all(sig_r >= 0) and torch.all(sig_r < sig_t)
        n = 1 + 8 * torch.sigmoid(-sig_t)
        assert torch.allclose(sig_r, (sig_t * (1 - n / 2 ** (stage + 1))).clamp_min(0))
        gaps.append(sig_t - sig_r)
    assert torch.equal(
        gaps[0][:2], sig_t[:2]
    )  # first stage, n(sigma) > 2 at small sigma: r = 0, the denoising end of ECT
    assert torch.allclose(gaps[5] / gaps[4], torch.full_like(sig_t, 0.5))  # later stages halve dt


# --- exactness at the true flow map ------------------------------------------------------------------


def test_cd_loss_vanishes_at_the_exact_flow_map_with_a_fine_teacher_step(ring8):
    x0 = ring8.sample(128, torch.Generator().manual_seed(3)).double()
    exact = ExactFlowMap(ring8, steps=40)
    untrained = small_student(dtype=torch.float64)
    cd = ConsistencyDistillation(steps=1000, grid="uniform", solver="heun", target_ema=0.0)
    loss_exact = mean_loss(cd, exact, exact, ring8, x0)
    loss_untrained = mean_loss(cd, untrained, untrained, ring8, x0)
    print(f"CD loss: exact map {loss_exact:.3e}, untrained student {loss_untrained:.3e}")
    assert loss_exact < 1e-8 * loss_untrained and loss_exact < 1e-12


def test_cd_loss_at_the_exact_map_is_the_teacher_step_error(ring8):
    """With the exact map as student and target, the CD loss is the teacher's local step error carried to t = 0:
    O(h^4) for Euler and O(h^6) for Heun (squared L2), so halving h divides the per-sample loss by ~16 and ~64
    (compared by medians: a few samples near t = 0, where the mixture's velocity bends, are not yet asymptotic)."""
    x0 = ring8.sample(256, torch.Generator().manual_seed(4)).double()
    exact = ExactFlowMap(ring8, steps=40)
    ratios = {}
    for solver in ("euler", "heun"):
        medians = []
        for n in (32, 64):
            torch.manual_seed(0)
            cd = ConsistencyDistillation(steps=n, grid="uniform", solver=solver, target_ema=0.0)
            medians.append(cd(student=exact, teacher=ring8, target=exact, x0=x0).loss.detach().median().item())
        ratios[solver] = medians[0] / medians[1]
        print(
            f"CD loss at the exact map, {solver}: median N=32 {medians[0]:.3e}, N=64 {medians[1]:.3e}, "
            f"ratio {ratios[solver]:.1f}"
        )
    assert 11 < ratios["euler"] < 22
    assert 40 < ratios["heun"] < 90


def test_ect_with_teacher_steps_vanishes_at_the_exact_map_late_in_tuning(ring8):
    x0 = ring8.sample(128, torch.Generator().manual_seed(5)).double()
    exact = ExactFlowMap(ring8, steps=40)
    untrained = small_student(dtype=torch.float64)
    ect = EasyConsistencyTuning(stage_steps=10, source="teacher", solver="heun", metric="l2")
    late = 16 * 10  # stage 16: dt / t <= 5 / 2^17
    loss_exact = mean_loss(ect, exact, exact, ring8, x0, step=late)
    loss_untrained = mean_loss(ect, untrained, untrained, ring8, x0, step=late)
    print(f"ECT (teacher steps) loss: exact map {loss_exact:.3e}, untrained student {loss_untrained:.3e}")
    assert loss_exact < 1e-8 * loss_untrained


def test_consistency_training_gap_at_the_exact_map_is_first_order(ring8):
    """Consistency *training* pairs x_t, x_r share the noise, so they sit on one ODE trajectory only to first
    order: at the exact map the gap f(x_t, t) - f(x_r, r) is O(sigma_t - sigma_r) (Song et al. 2023, Thm. 2),
    not 0; its square shrinks ~ dsigma^2 (~16^2 in the median sample) when the iCT curriculum refines the grid
    16-fold. (A bug in the pair, e.g. independent noises or a wrong sigma -> t map, leaves an O(1) gap that does
    not shrink.) Medians: the mean is dominated by a few samples on the widest intervals."""
    x0 = ring8.sample(256, torch.Generator().manual_seed(6)).double()
    exact = ExactFlowMap(ring8, steps=30)
    ict = ImprovedConsistencyTraining(total_steps=4000, s0=10, s1=160, metric="l2")
    gaps = []
    for step in (0, 3999):  # N = 11 and N = 161 noise levels
        torch.manual_seed(0)
        out = ict(student=exact, target=exact, teacher=None, x0=x0, cond=None, step=step)
        gaps.append(out.logs["mse"].median().item())
    print(
        f"iCT at the exact map: median squared gap {gaps[0]:.3e} (N=11) -> {gaps[1]:.3e} (N=161), "
        f"{gaps[0] / gaps[1]:.1f}x smaller"
    )
    assert gaps[0] / gaps[1] > 100


def test_stf_pairs_lie_closer_to_the_exact_ode_step(ring8):
    """``data_velocity='stf'``: x_r = x_t + (r - t) v_hat(x_t, t) with the batch-posterior velocity (Xu et al. 2023)
    lies far closer to the exact ODE step X*(x_t, t, r) than the shared-noise x_r = (1 - r) x0 + r eps, both on
    iCT's finest Karras intervals (dt small) and on ECT's first-stage jumps (often all the way to r = 0)."""
    g = torch.Generator().manual_seed(9)
    x0 = ring8.sample(1024, g).double()
    eps = torch.randn(1024, 2, generator=g, dtype=torch.float64)
    ict, ect = ImprovedConsistencyTraining(total_steps=800, s0=8, s1=256), EasyConsistencyTuning(stage_steps=100)
    times = sigma_to_t(ict.sigmas(799))
    times[-1] = 1.0
    i = torch.randint(0, len(times) - 1, (1024,), generator=g)
    sig_t = torch.exp(-1.1 + 2.0 * torch.randn(1024, generator=g, dtype=torch.float64))
    draws = {"ict": (times[i + 1], times[i]), "ect": (sigma_to_t(sig_t), sigma_to_t(ect.r_of_t(sig_t, 50)))}
    for name, (t, r) in draws.items():
        errs = {}
        for dv in ("conditional", "stf"):
            d = Draw(x0, eps, t, r, LINEAR.sample(x0, eps, t), None, None, 1.0)
            x_t, x_r = d.x_s, training_pair(dv, d, 0)
            assert torch.allclose(x_t, (1 - t[:, None]) * x0 + t[:, None] * eps)
            errs[dv] = (x_r - ring8.flow_map(x_t, t, r, steps=40)).pow(2).sum(1).mean().item()
        print(
            f"{name} pairs, mean squared distance of x_r to the exact ODE step: conditional {errs['conditional']:.3e}, "
            f"stf {errs['stf']:.3e}"
        )
        assert errs["stf"] < 0.2 * errs["conditional"]


# --- gradients ---------------------------------------------------------------------------------------


class NetTeacher(nn.Module):
    """A teacher with trainable parameters (deliberately not frozen) to catch any gradient leaking into it."""

    def __init__(self) -> None:
        super().__init__()
        self.fm = small_student()
        self.data_shape, self.num_classes = (2,), 0

    def velocity(self, x, t, cond=None, guidance=1.0):
        return self.fm.velocity(x, t, cond)


@pytest.mark.parametrize(
    "config",
    [
        {"name": "cd", "steps": 8},
        {"name": "ict", "total_steps": 100},
        {"name": "ect", "stage_steps": 20, "target_ema": 0.5},
        {"name": "ect", "stage_steps": 20, "source": "teacher"},
    ],
)
def test_no_gradient_reaches_teacher_or_target(config):
    student, teacher = small_student(), NetTeacher()
    target = copy.deepcopy(student)  # requires_grad left on: only the objective's no_grad protects it
    target.net.out[-1].bias.data.add_(0.1)
    objective = build_objective(config)
    out = objective(student=student, teacher=teacher, target=target, x0=torch.randn(64, 2), cond=None, step=60)
    out.loss.mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in target.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert out.loss.shape == (64,) and torch.isfinite(out.loss).all()


def test_target_decay_and_missing_target():
    assert ConsistencyDistillation(target_ema=0.95).target_decay(10) == 0.95
    assert ImprovedConsistencyTraining().target_decay(10) == 0.0
    x0 = torch.randn(8, 2)
    with pytest.raises(ValueError, match="needs an EMA target"):
        ConsistencyDistillation(target_ema=0.95)(
            student=small_student(), teacher=preset_mixture("ring8"), target=None, x0=x0
        )
    # decay 0: the target is the stop-gradient student itself
    out = ImprovedConsistencyTraining()(student=small_student(), teacher=None, target=None, x0=x0)
    assert torch.isfinite(out.loss).all()


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors(ring8):
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_objective({"name": "cd", "stepz": 18})
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_objective({"name": "ict", "p_mean": -1.1, "curriculum": "exp"})
    with pytest.raises(ValueError, match="needs a teacher"):
        ConsistencyDistillation()(student=small_student(), teacher=None, target=small_student(), x0=torch.randn(4, 2))
    with pytest.raises(ValueError, match="distills a teacher"):
        fit(small_student(), ConsistencyDistillation(), lambda k: (torch.randn(4, 2), None), 1, teacher=None)
    with pytest.raises(ValueError, match="needs a teacher"):
        EasyConsistencyTuning(source="teacher")(
            student=small_student(), teacher=None, target=None, x0=torch.randn(4, 2)
        )
    for bad in (
        {"name": "cd", "steps": -3},
        {"name": "cd", "steps": 0},
        {"name": "ict", "total_steps": -1},
        {"name": "ict", "s0": -10},
        {"name": "ect", "stage_steps": -5},
    ):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            build_objective(bad)
    with pytest.raises(ValueError, match="training step must be >= 0"):
        ImprovedConsistencyTraining().discretization_steps(-1)
    with pytest.raises(ValueError, match="training step must be >= 0"):
        ConsistencyDistillation()(
            student=small_student(), teacher=ring8, target=small_student(), x0=torch.randn(4, 2), step=-1
        )
    with pytest.raises(ValueError, match="unknown consistency metric"):
        build_objective({"name": "cd", "metric": "lpips"})
    with pytest.raises(ValueError, match="unknown teacher step"):
        build_objective({"name": "cd", "solver": "rk45"})
    with pytest.raises(ValueError, match="unknown time grid"):
        build_objective({"name": "cd", "grid": "cosine"})
    with pytest.raises(ValueError, match="s1=5 < s0=10"):
        build_objective({"name": "ict", "s0": 10, "s1": 5})
    with pytest.raises(ValueError, match="q > 1"):
        build_objective({"name": "ect", "q": 1.0})
    with pytest.raises(ValueError, match="velocity source"):
        build_objective({"name": "ect", "source": "oracle"})
    for name in ("ict", "ect"):
        with pytest.raises(ValueError, match="unknown data_velocity"):
            build_objective({"name": name, "data_velocity": "oracle"})
    with pytest.raises(ValueError, match="data_velocity applies to training from data"):
        build_objective({"name": "ect", "source": "teacher", "data_velocity": "stf"})


# --- distillation on the mixture: the 1-NFE flow-map error drops at least five-fold ----------------------


def pretrain_flow_matching(student, pool, steps, batch=1024, lr=3e-3, lr_final=None, velocity="conditional"):
    """Flow matching in the consistency function's slot: u(x_t, t, 0) regressed onto the conditional velocity
    eps - x0 (Lipman et al. 2023, Eq. 23), or its batch-posterior estimate (``velocity="stf"``, Xu et al. 2023,
    ``stable_target``), so f(x, t) = x - t u(x, t, 0) becomes the denoiser E[x0 | x_t]: the diffusion model ECT
    starts from (Geng et al. 2024, Sec. 3: diffusion pretraining is consistency training at dt = t)."""

    class _FlowMatching(nn.Module):
        needs_teacher, uses_target = False, False

        def forward(self, *, student, teacher, target, x0, cond, step):
            t = torch.rand(len(x0))
            eps = torch.randn_like(x0)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
            u = student.average_velocity(x_t, t, torch.zeros_like(t), cond)
            v = stable_target(x_t, t, x0, eps) if velocity == "stf" else eps - x0
            loss = (u - v).pow(2).sum(1)
            return LossOutput(loss=loss, logs={"mse": loss.detach()})

    fit(
        student,
        _FlowMatching(),
        lambda k: (pool[torch.randint(0, len(pool), (batch,))], None),
        steps,
        lr=lr,
        lr_final=lr_final,
    )


def train_and_measure(ring8, reference, config, steps, cond_classes=0, lr=3e-3, lr_final=1e-4, batch=256, init_steps=0):
    """Train the small student with ``config`` for ``steps`` steps; ``init_steps`` > 0 first pretrains it by flow
    matching (``pretrain_flow_matching``). Returns the 1-NFE error (untrained random student, trained student)."""
    eps, ref = reference
    torch.manual_seed(0)
    student = small_student(cond_classes)
    g = torch.Generator().manual_seed(7)
    pool, labels = ring8.sample_labeled(batch * 40, g)
    eval_cond = None
    if cond_classes:
        eval_cond = torch.randint(0, cond_classes, (len(eps),), generator=torch.Generator().manual_seed(8))
        ref = ring8.flow_map(eps, torch.ones(len(eps)), torch.zeros(len(eps)), eval_cond, steps=50)
    before = one_step_error(student, eps, ref, eval_cond)
    if init_steps:
        pretrain_flow_matching(student, pool, init_steps, batch=batch, lr=lr)

    def batches(k):
        idx = torch.randint(0, len(pool), (batch,))
        return pool[idx], (labels[idx] if cond_classes else None)

    objective = build_objective(config)
    fit(
        student, objective, batches, steps, teacher=ring8 if objective.needs_teacher else None, lr=lr, lr_final=lr_final
    )
    after = one_step_error(student, eps, ref, eval_cond)
    print(f"{config}: 1-NFE rmse vs exact map {before:.4f} (untrained) -> {after:.4f} ({after / before:.3f}x)")
    return before, after


@pytest.mark.slow
def test_cd_cuts_the_one_step_error_five_fold(ring8, reference):
    before, after = train_and_measure(
        ring8,
        reference,
        {"name": "cd", "steps": 8, "grid": "uniform", "solver": "heun", "metric": "l2", "target_ema": 0.9},
        steps=800,
    )
    assert after <= before / 5


@pytest.mark.slow
def test_ict_cuts_the_one_step_error_five_fold(ring8, reference):
    """Teacher-free consistency training (Song & Dhariwal 2023): pseudo-Huber, lognormal levels, N(k) doubling
    from 8 to 64, stop-gradient target (EMA 0), lambda = 1 / (sigma_{i+1} - sigma_i), random initialization; the
    pair is ``data_velocity='stf'`` (x_r one Euler step of the batch-posterior velocity from x_t, Xu et al. 2023:
    data samples only, far lower variance than the shared-noise pair). 1600 steps at batch 512.

    The bound is the issue's 1/5; measurements in docs/measurements.md. c = 0.05: on 2-D data the paper's
    c = 0.00054 sqrt(d) ~ 8e-4 is far below the pair gaps ||delta|| ~ 1e-2."""
    config = {"name": "ict", "total_steps": 1600, "s0": 8, "s1": 64, "huber_c": 0.05, "data_velocity": "stf"}
    before, after = train_and_measure(ring8, reference, config, steps=1600, batch=512)
    assert after <= before / 5


@pytest.mark.slow
def test_ect_from_data_cuts_the_one_step_error_five_fold(ring8, reference):
    """Easy Consistency Tuning from data alone (Geng et al. 2024): dt shrinking by q = 2 every 160 steps, EMA 0. As in
    the paper, ECT starts from a diffusion model: the random student is first trained for 400 steps by flow matching in
    the consistency slot (``pretrain_flow_matching``, f = the denoiser E[x0 | x_t]); the baseline is the random
    student's error, as in the other tests. The pair is ``data_velocity='stf'``: x_r is one Euler step of the
    batch-posterior velocity (Xu et al. 2023) from x_t, data samples only; with it the loss of the distilled form
    (l2, uniform lambda, ``test_ect_with_teacher_steps_cuts_the_one_step_error_five_fold``) works from data.

    The bound is the issue's 1/5; measurements in docs/measurements.md."""
    config = {
        "name": "ect",
        "stage_steps": 160,
        "source": "data",
        "metric": "l2",
        "weighting": "uniform",
        "data_velocity": "stf",
    }
    before, after = train_and_measure(ring8, reference, config, steps=800, batch=1024, init_steps=400)
    assert after <= before / 5


@pytest.mark.slow
def test_ect_with_teacher_steps_cuts_the_one_step_error_five_fold(ring8, reference):
    """ECT with the teacher's ODE step as the target's x_r (the distillation form; from data alone see
    ``test_ect_from_data_cuts_the_one_step_error``)."""
    config = {"name": "ect", "stage_steps": 200, "source": "teacher", "metric": "l2", "weighting": "uniform"}
    before, after = train_and_measure(ring8, reference, config, steps=1000, batch=1024)
    assert after <= before / 5
