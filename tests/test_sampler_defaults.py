"""A method's sampler defaults travel with its student (issue 19): a student exported by ``DistillModule.export``
and reloaded with ``load_student`` samples, for every registered method, bit for bit as the benchmark samples it;
a ``gamma=`` argument (``--gamma`` in scripts/sample.py) overrides the saved default."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from weights import trained_like

import flowmap
from flowmap.data import get_dataset
from flowmap.lightning.distill_module import DistillModule
from flowmap.models import save_student
from flowmap.nets import build_net
from flowmap.objectives import OBJECTIVES, objective_class
from flowmap.sampling import sample
from flowmap.student import FlowMap
from scripts.benchmark import Evaluator, sampler_gamma, seed_of
from scripts.sample import main as sample_main
from teachers.gmm import preset_mixture

MLP = {"name": "mlp", "data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8}
CONSISTENCY = ("cd", "ict", "ect", "scd", "sct")  # students of f(x, t) = X(x, t, 0): multistep consistency sampling


def benchmark_evaluator(n: int = 256) -> Evaluator:
    """The benchmark's evaluator on ring8-like data (eight_gaussians) with ``n`` fixed noises; its teacher and
    trained students are not needed to sample a given student."""
    ev = Evaluator.__new__(Evaluator)
    ev.s = SimpleNamespace(name="eight_gaussians", kind="2d", is_mixture=False)
    g = torch.Generator().manual_seed(seed_of("eval", "eight_gaussians"))
    ev.noise, ev.cond = torch.randn(n, 2, generator=g), None
    ev.ref = get_dataset("eight_gaussians").sample(n, generator=torch.Generator().manual_seed(1))
    return ev


def exported_student(name: str, path) -> tuple[FlowMap, flowmap.Student]:
    module = DistillModule(student={"net": MLP}, objective={"name": name}, teacher=preset_mixture("ring8"))
    trained_like(module.ema.net, seed=3)  # export writes the evaluation EMA: give it weights where every input matters
    app = flowmap.load_student(module.export(path))
    return module.ema.eval(), app


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_load_student_samples_like_the_benchmark(name, tmp_path):
    flow_map, app = exported_student(name, tmp_path / f"{name}.safetensors")
    gamma = sampler_gamma(name)
    assert gamma == (1.0 if name in CONSISTENCY else 0.0) == objective_class(name).sampler_gamma
    assert app.sampler == {"gamma": gamma} and app.config["sampler"] == {"gamma": gamma}
    ev = benchmark_evaluator()
    rows, samples = ev.student_rows(flow_map, gamma)
    for nfe in (1, 2, 4):
        g = torch.Generator().manual_seed(seed_of("renoise", "eight_gaussians", nfe))
        x = app.sample(ev.noise, steps=nfe, generator=g)
        assert torch.equal(x, samples[nfe]), (name, nfe, float((x - samples[nfe]).abs().max()))
        assert np.isfinite(rows[nfe]["w2"])
    assert float((samples[1] - samples[4]).abs().max()) > 1e-3  # the step count matters


def test_cd_student_samples_with_gamma_one_and_gamma_overrides(tmp_path):
    flow_map, app = exported_student("cd", tmp_path / "cd.safetensors")
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))

    def core(gamma: float) -> torch.Tensor:
        return sample(flow_map, noise, 4, gamma=gamma, generator=torch.Generator().manual_seed(7))

    x_default = app.sample(noise, steps=4, generator=torch.Generator().manual_seed(7))
    x_zero = app.sample(noise, steps=4, generator=torch.Generator().manual_seed(7), gamma=0.0)
    assert torch.equal(x_default, core(1.0)) and torch.equal(x_zero, core(0.0))
    assert float((x_default - x_zero).abs().max()) > 1e-2  # re-noising changes the samples
    # one step never re-noises: the default and the override agree there
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(app.sample(noise, steps=1, generator=g1), app.sample(noise, steps=1, generator=g2, gamma=0.0))


def test_files_without_sampler_defaults(tmp_path):
    """Files written before the ``sampler`` entry: the stored method's defaults, else gamma 0."""
    student = FlowMap(trained_like(build_net(MLP))).eval()
    old_cd = save_student(tmp_path / "old_cd.safetensors", student, method="cd", sampler=None)
    anonymous = save_student(tmp_path / "anonymous.safetensors", student)
    assert flowmap.load_student(old_cd).sampler == {"gamma": 1.0}
    assert flowmap.load_student(anonymous).sampler == {"gamma": 0.0}
    noise = torch.randn(64, 2)
    x = flowmap.load_student(anonymous).sample(noise, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, sample(student, noise, 4))


def test_sample_script_uses_the_saved_gamma_and_gamma_overrides(tmp_path):
    flow_map, _ = exported_student("ect", tmp_path / "ect.safetensors")
    path = str(tmp_path / "ect.safetensors")
    out = {}
    for tag, extra in (("default", []), ("zero", ["--gamma", "0"])):
        sample_main([path, "--n", "100", "--steps", "4", "--seed", "5", "--out", str(tmp_path / tag), *extra])
        out[tag] = torch.from_numpy(np.load(tmp_path / tag / "samples.npz")["x"])
    for tag, gamma in (("default", 1.0), ("zero", 0.0)):
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(100, 2, generator=g)
        assert torch.equal(out[tag], sample(flow_map, noise, 4, gamma=gamma, generator=g)), tag
