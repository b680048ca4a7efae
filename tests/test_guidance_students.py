"""Guidance-conditioned students (flowmap/objectives/guidance.py, wired into AYF and CTM): the student gets
w ~ U[guidance, guidance_max], misuse fails with one clear error, and a guidance-conditioned AYF-LMD student
on the class-conditional ring8 mixture tracks the exact guided flow map at w = 1, 2 and 4 in one step."""

from __future__ import annotations

import time

import pytest
import torch

from flowmap.ema import ema_update, frozen_copy
from flowmap.metrics import flow_map_rmse
from flowmap.nets import build_net
from flowmap.objectives import build_objective
from flowmap.objectives.guidance import sample_guidance, teacher_velocity
from flowmap.student import FlowMap
from flowmap.training import fit
from teachers import GaussianMixtureTeacher, preset_mixture

GUIDED = ["ayf_emd", "ayf_lmd", "ctm"]


def student(guidance_input: bool = True, num_classes: int = 2, width: int = 32, depth: int = 2, **kw) -> FlowMap:
    return FlowMap(
        build_net(
            {
                "name": "mlp",
                "data_shape": [2],
                "width": width,
                "depth": depth,
                "num_classes": num_classes,
                "guidance_input": guidance_input,
                **kw,
            }
        )
    )


def config(name: str, **kw) -> dict:
    extra = {"dsm_source": "teacher"} if name == "ctm" else {}
    return {"name": name, "guidance": 1.0, "guidance_max": 4.0, **extra, **kw}


def test_sample_guidance_and_guided_teacher_velocity():
    torch.manual_seed(0)
    w = sample_guidance(4000, (1.0, 4.0))
    assert w.min() >= 1.0 and w.max() <= 4.0 and abs(float(w.mean()) - 2.5) < 0.05
    with pytest.raises(ValueError, match="lo <= hi"):
        sample_guidance(4, (3.0, 1.0))
    teacher = preset_mixture("ring8")
    x, t, c = torch.randn(8, 2), torch.full((8,), 0.5), torch.arange(8) % 2
    v_c, v_u = teacher.velocity(x, t, c), teacher.velocity(x, t, None)
    w = torch.full((8,), 3.0)
    torch.testing.assert_close(teacher_velocity(teacher, x, t, c, w), v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", GUIDED)
def test_student_is_trained_at_w_in_the_range(name):
    teacher = preset_mixture("ring8")
    st = student()
    seen = []
    st.net.register_forward_pre_hook(lambda m, i: seen.append(i[4] if len(i) > 4 else None))
    x0, cond = teacher.sample_labeled(64, generator=torch.Generator().manual_seed(0))
    out = build_objective(config(name))(student=st, teacher=teacher, target=st, x0=x0, cond=cond, step=0)
    out.loss.mean().backward()
    assert seen and all(w is not None and w.min() >= 1.0 and w.max() <= 4.0 for w in seen)
    assert float(seen[-1].std()) > 0.3  # one w per example, not one per batch
    assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("name", GUIDED)
def test_clear_errors_where_guidance_cannot_apply(name):
    teacher = preset_mixture("ring8")
    x0, cond = teacher.sample_labeled(8, generator=torch.Generator().manual_seed(0))
    obj = build_objective(config(name))
    with pytest.raises(ValueError, match="guidance_input"):
        obj(student=student(guidance_input=False), teacher=teacher, target=None, x0=x0, cond=cond, step=0)
    uncond = GaussianMixtureTeacher(teacher.means, teacher.covs)
    with pytest.raises(ValueError, match="unconditional"):
        obj(student=student(num_classes=0), teacher=uncond, target=None, x0=x0, cond=None, step=0)
    with pytest.raises(ValueError, match="labels"):
        obj(student=student(), teacher=teacher, target=None, x0=x0, cond=None, step=0)
    with pytest.raises(ValueError, match="guidance_max"):
        build_objective(config(name, guidance=3.0, guidance_max=2.0))


@pytest.mark.long
def test_guided_student_tracks_the_exact_guided_map_at_each_w():
    """Long (~300 s on one thread on 2 shared cores): issue 8's 1/5 at every w, 1-NFE, evaluation EMA (0.998) weights.

    The bound is the issue's 1/5 itself; measurements in docs/measurements.md."""
    torch.set_num_threads(1)
    teacher = preset_mixture("ring8")
    n = 500
    z, c = torch.randn(n, 2, generator=torch.Generator().manual_seed(7)), torch.arange(n) % 2
    one, zero = torch.ones(n), torch.zeros(n)
    refs = {w: teacher.flow_map(z, one, zero, c, guidance=w, steps=100).float() for w in (1.0, 2.0, 4.0)}
    torch.manual_seed(0)
    st = student(width=128, depth=3, time_scale=10.0)

    def errors(m) -> dict[float, float]:
        with torch.no_grad():
            return {w: flow_map_rmse(m(z, one, zero, c, torch.full((n,), w)), ref) for w, ref in refs.items()}

    before = errors(st)
    x, y = teacher.sample_labeled(100_000, generator=torch.Generator().manual_seed(5))

    def batch(k: int):
        i = torch.randint(0, len(x), (512,))
        return x[i], y[i]

    ema = frozen_copy(st)  # evaluation EMA (Karras et al. 2022), not part of the objective
    t0 = time.time()
    fit(
        st,
        build_objective({"name": "ayf_lmd", "equal_share": 0.25, "guidance": 1.0, "guidance_max": 4.0}),
        batch,
        STEPS,
        teacher=teacher,
        lr=1e-3,
        lr_final=1e-5,
        callback=lambda k, out: ema_update(ema, st, 0.998),
    )
    after = errors(ema)
    print(
        "guided ayf_lmd ring8 1-NFE rmse (EMA): "
        + ", ".join(f"w={w:g}: {before[w]:.3f} -> {after[w]:.3f} ({after[w] / before[w]:.3f})" for w in refs)
        + f" ({STEPS} steps, {time.time() - t0:.0f}s)"
    )
    for w in refs:
        assert after[w] <= before[w] / 5, f"w={w}"


STEPS = 3500


@pytest.mark.parametrize("name", ["cd", "pd", "meanflow", "shortcut", "scd"])
def test_existing_distillation_objectives_take_a_guidance_range(name):
    """CD and PD (wired here) and MeanFlow, shortcut, sCD (their own) feed w ~ U[1, 4] to the student."""
    teacher = preset_mixture("ring8")
    st = student()
    seen = []
    st.net.register_forward_pre_hook(lambda m, i: seen.append(i[4] if len(i) > 4 else None))
    x0, cond = teacher.sample_labeled(64, generator=torch.Generator().manual_seed(0))
    obj = build_objective({"name": name, "guidance": 1.0, "guidance_max": 4.0})
    out = obj(student=st, teacher=teacher, target=frozen_copy(st), x0=x0, cond=cond, step=0)
    assert torch.isfinite(out.loss).all()
    ws = [w for w in seen if w is not None]
    assert ws and all(w.min() >= 1.0 and w.max() <= 4.0 for w in ws) and float(ws[-1].std()) > 0.3
    plain = student(guidance_input=False)
    with pytest.raises(ValueError, match="guidance_input"):
        obj(student=plain, teacher=teacher, target=frozen_copy(plain), x0=x0, cond=cond, step=0)
