"""One way each: the ODE stepper, the trigflow path, the linear path's time conversion and the guidance draw
each live in one place, and every user gets the same floats as the written equation.

* test_teacher_step_is_the_written_heun_and_euler_step: ``flowmap.solvers.teacher_step`` (used by cd, ict, ect, pd,
  ctm) equals x + h v(x, t) and x + h/2 (v(x, t) + v(x_e, r)) bit for bit, per-sample times, float32 and float64.
* test_gmm_exact_map_is_the_written_rk4_loop: the mixture's exact flow map (``ode_step`` rk4) equals the classical
  RK4 loop bit for bit, with labels and guidance.
* test_one_trigflow_path: ``PATHS["trigflow"]`` is ``TrigFlowPath``; ``CosinePath`` is it at sigma_d = 1 bit for bit;
  configs round-trip.
* test_linear_ratio_and_its_inverse: ``LinearPath.ratio`` is t / (1 - t) bit for bit (tensors and floats),
  ``t_from_ratio`` inverts it to 1e-6.
* test_draw_guidance_is_sample_guidance: the student's and teacher's scales are one U[lo, hi] draw.
"""

from __future__ import annotations

import pytest
import torch

from flowmap.objectives.guidance import draw_guidance, sample_guidance
from flowmap.paths import PATHS, CosinePath, LinearPath, TrigFlowPath, build_path
from flowmap.solvers import teacher_step
from flowmap.types import expand_like
from teachers import preset_mixture


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_step_is_the_written_heun_and_euler_step(dtype: torch.dtype) -> None:
    teacher = preset_mixture("ring8")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=dtype)
    t = torch.rand(64, generator=g, dtype=dtype)
    r = t * torch.rand(64, generator=g, dtype=dtype)
    cond = torch.arange(64) % 2
    h = expand_like(r - t, x)
    v = teacher.velocity(x, t, cond, guidance=1.5).to(dtype)
    euler = x + h * v
    heun = x + 0.5 * h * (v + teacher.velocity(euler, r, cond, guidance=1.5).to(dtype))
    assert torch.equal(teacher_step(teacher, x, t, r, "euler", cond, 1.5), euler)
    assert torch.equal(teacher_step(teacher, x, t, r, "heun", cond, 1.5), heun)
    assert (heun - euler).abs().max() > 1e-3  # the two steps differ: the test can tell them apart
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        teacher_step(teacher, x, t, r, "rk45")


def test_gmm_exact_map_is_the_written_rk4_loop() -> None:
    teacher = preset_mixture("ring8")
    g = torch.Generator().manual_seed(1)
    x, s = torch.randn(32, 2, generator=g), torch.rand(32, generator=g)
    t, cond, steps = 0.3 * s, torch.arange(32) % 2, 7
    xd, sd, td = x.double(), s.double(), t.double()
    h = (td - sd) / steps
    hx = expand_like(h, xd)

    def v(y, tau):
        return teacher.velocity(y, tau.clamp(0, 1), cond, 2.0)

    for i in range(steps):
        tau = sd + i * h
        k1 = v(xd, tau)
        k2 = v(xd + 0.5 * hx * k1, tau + 0.5 * h)
        k3 = v(xd + 0.5 * hx * k2, tau + 0.5 * h)
        k4 = v(xd + hx * k3, tau + h)
        xd = xd + hx / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert torch.equal(teacher.flow_map(x, s, t, cond, guidance=2.0, steps=steps), xd.float())


def test_one_trigflow_path() -> None:
    assert PATHS["trigflow"] is TrigFlowPath and isinstance(CosinePath(), TrigFlowPath)
    t = torch.rand(1000, generator=torch.Generator().manual_seed(2))
    r = 10 * torch.rand(1000, generator=torch.Generator().manual_seed(3))
    unit, cosine, half = TrigFlowPath(1.0), CosinePath(), TrigFlowPath(0.5)
    for fn in ("alpha", "sigma", "d_alpha", "d_sigma", "t_from_ratio"):
        arg = r if fn == "t_from_ratio" else t
        assert torch.equal(getattr(unit, fn)(arg), getattr(cosine, fn)(arg))
    assert torch.equal(half.sigma(t), 0.5 * cosine.sigma(t))
    assert torch.allclose(half.t_from_ratio(half.ratio(t[t > 1e-3])), t[t > 1e-3], atol=1e-5)
    assert cosine.to_config() == {"name": "cosine"} and half.to_config() == {"name": "trigflow", "sigma_data": 0.5}
    assert build_path(half.to_config()) == half and build_path("cosine") == cosine


def test_linear_ratio_and_its_inverse() -> None:
    path = LinearPath()
    t = torch.rand(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.999
    assert torch.equal(path.ratio(t), t / (1 - t)) and torch.equal(path.ratio(t.float()), t.float() / (1 - t.float()))
    assert path.ratio(0.25) == 0.25 / 0.75 and path.t_from_ratio(80.0) == 80.0 / 81.0
    assert torch.allclose(path.t_from_ratio(path.ratio(t)), t, rtol=0, atol=1e-6)
    assert torch.isinf(path.ratio(torch.ones(1))).all()


def test_draw_guidance_is_sample_guidance() -> None:
    class Student(torch.nn.Module):
        guidance_input = True

    torch.manual_seed(5)
    w_student, w_teacher = draw_guidance(Student(), 256, torch.device("cpu"), 1.5, 4.0)
    torch.manual_seed(5)
    assert w_student is w_teacher and torch.equal(w_student, sample_guidance(256, (1.5, 4.0)))
    assert 1.5 <= float(w_student.min()) and float(w_student.max()) <= 4.0 and float(w_student.std()) > 0.5
