"""Adding a method takes its loss file and its config (issue 19): a toy method (tests/toy_method.py) registered inside
the test gets, from the same generic checks every registered method passes (tests/method_contract.py), a loss that
vanishes at an exact flow map, sampling through ``load_student`` with its own sampler defaults, and DDP gradients
equal across ranks and to one process."""

from __future__ import annotations

import pytest
import torch
from exact_maps import ExactGMMMap
from method_contract import assert_ddp_gradients, ddp_results, exact_map_losses, sample_after_reload
from toy_method import ToySemigroup

import flowmap
from flowmap.objectives import OBJECTIVES, build_objective, register_objective
from flowmap.sampling import sample
from teachers import preset_mixture

TOY = "toy_semigroup"
TOY_TARGET = "toy_method:ToySemigroup"


@pytest.fixture
def toy():
    """The toy registered for the test only."""
    register_objective(TOY, ToySemigroup)
    yield TOY
    OBJECTIVES.pop(TOY)


def registered() -> list[str]:
    return sorted(OBJECTIVES)


def check_exact_map(name: str) -> None:
    exact, bent = exact_map_losses(name)
    assert torch.isfinite(exact["loss"]).all() and exact["loss"].max() < 1e-20, (name, float(exact["loss"].max()))
    assert exact["nonfinite_targets"] <= 16  # only teacher queries at t = 0, where the point mass has no velocity
    assert bent["loss"].max() > 1e-9 and bent["loss"].max() > 1e6 * exact["loss"].max()


def check_reload(name: str, tmp_path) -> None:
    for steps in (1, 2, 4):
        x_app, x_ref, gamma = sample_after_reload(name, tmp_path / f"{name}.safetensors", steps)
        assert torch.equal(x_app, x_ref), (name, steps)


@pytest.mark.parametrize("name", registered())
def test_every_method_vanishes_at_an_exact_map(name):
    check_exact_map(name)


@pytest.mark.parametrize("name", registered())
def test_every_method_samples_with_its_defaults_after_reload(name, tmp_path):
    check_reload(name, tmp_path)


def test_toy_gets_the_generic_checks(toy, tmp_path):
    check_exact_map(toy)
    check_reload(toy, tmp_path)
    # its own gamma 0.5, not the default 0: the file carries it, and re-noising changes 4-step samples
    x4, _, gamma = sample_after_reload(toy, tmp_path / "toy4.safetensors", 4)
    app = flowmap.load_student(tmp_path / "toy4.safetensors")
    assert gamma == 0.5 and app.sampler == {"gamma": 0.5} and app.config["sampler"] == {"gamma": 0.5}
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(7))
    x4_zero = sample(app.flow_map, noise, 4, gamma=0.0, generator=torch.Generator().manual_seed(7))
    assert float((x4 - x4_zero).abs().max()) > 1e-2


def test_toy_loss_vanishes_at_the_exact_gmm_map(toy):
    """On the ring8 mixture's exact map (float64 RK4) the toy's two terms vanish to the integrator's error; a 1% bent
    map does not."""
    teacher = preset_mixture("ring8")
    exact = ExactGMMMap(teacher, steps=40)
    x0 = teacher.sample(32, generator=torch.Generator().manual_seed(0)).double()
    bent = ExactGMMMap(teacher, steps=40)
    bent.flow = lambda x, s, t, c: 1.01 * teacher.flow_map(x, s, t, c, steps=40) - 0.01 * x  # noqa: E731
    losses = {}
    for key, student in (("exact", exact), ("bent", bent)):
        torch.manual_seed(0)
        out = build_objective(toy)(student=student, teacher=teacher, target=student, x0=x0, cond=None, step=0)
        losses[key] = out.loss
    assert losses["exact"].max() < 1e-12
    assert losses["bent"].max() > 1e-6


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
def test_toy_ddp_gradients_match_one_process(toy, tmp_path):
    """One two-process launch: the toy and a registered method (shortcut: an EMA target, a teacher, a split batch)."""
    cases = [toy, "shortcut"]
    out = ddp_results(cases, tmp_path, register={toy: TOY_TARGET})
    for case in cases:
        worst = assert_ddp_gradients(case, out)
        assert worst < 1e-4, f"{case}: DDP gradient differs from one process by {worst:.2e} (relative)"


@pytest.mark.parametrize("name", registered())
def test_every_method_refuses_a_base_option_it_does_not_take(name):
    """A method built in Python takes exactly its hyperparameters: a base option it does not list (``Objective``'s
    shared ones) is refused as a config key would be, not silently set."""
    from flowmap.objectives import objective_class
    from flowmap.objectives.base import SHARED

    cls = objective_class(name)
    foreign = [k for k in SHARED if k not in cls.hyperparameters()]
    for key in foreign:
        with pytest.raises(TypeError, match="unexpected hyperparameter"):
            cls(**{key: None})
    taken = cls(**{k: getattr(cls(), k) for k in SHARED if k in cls.hyperparameters() and hasattr(cls(), k)})
    assert taken.to_config() == cls().to_config()
