"""scripts/diagnose_student.py: the diagnosis scripts' student is the benchmark's (same recipe, same weights), and
their overrides land where a config's values would."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchmark import BUDGETS, Setting, recipe, student_steps  # noqa: E402
from scripts.diagnose_student import set_steps, student_recipe, train  # noqa: E402


def test_without_overrides_the_recipe_is_the_benchmarks():
    assert set_steps("gmm") == 4000  # configs/data/ring8.yaml's run length
    assert student_recipe("gmm", "shortcut") == recipe("gmm", "shortcut", BUDGETS["full"])
    r = student_recipe("digits", "meanflow", steps=250)
    assert r == recipe("digits", "meanflow", replace(BUDGETS["full"], student_scale=0.25))
    assert r["options"]["steps"] == r["cfg"]["trainer"]["max_steps"] == 250


def test_overrides_resolve_as_config_values():
    r = student_recipe("gmm", "sct", steps=200, objective={"tangent_warmup": 0.5, "p_mean": 1.0})
    assert r["objective"]["tangent_warmup"] == 100  # a fraction of the run, as in a config
    assert r["objective"]["p_mean"] == 1.0
    assert r["objective"]["sigma_data"] == 1.43  # the data config's, still there
    base = recipe("gmm", "sct", BUDGETS["full"])["student"]["net"]
    r = student_recipe("gmm", "sct", net={"width": 64}, base_net={"width": 32, "depth": 2})
    assert r["student"]["net"] == {**base, "width": 64, "depth": 2}
    # the method's own net options stay over a teacher's (base) options
    guided = recipe("digits", "ayf_lmd_guided", BUDGETS["full"])["student"]["net"]
    assert guided["guidance_input"] is True
    r = student_recipe("digits", "ayf_lmd_guided", base_net={"guidance_input": False, "time_scale": 10.0})
    assert r["student"]["net"] == {**guided, "time_scale": 10.0}
    with pytest.raises(ValueError, match="--steps"):
        student_recipe("gmm", "cd", steps=0)


@pytest.fixture(scope="module")
def quick_gmm(tmp_path_factory):
    """The benchmark's ring8 set under the quick budget (small nets, 4 student steps), its init net trained 3 steps."""
    torch.set_num_threads(1)
    budget = replace(BUDGETS["quick"], teacher_steps_2d=3)
    setting = Setting("gmm", budget, torch.device("cpu"), tmp_path_factory.mktemp("cache"), fresh=True)
    setting.get_teacher()
    return setting, budget


@pytest.mark.parametrize("method", ["cd", "ect_fromdata"])  # from the init net; from scratch (init_from_teacher: false)
def test_train_gives_the_benchmarks_student_bit_for_bit(quick_gmm, method):
    setting, budget = quick_gmm
    bench = setting.train_student(method)
    ours = train(setting, method, student_recipe("gmm", method, budget=budget))  # the budget's run length
    steps = bench["steps"]  # the set's steps, or the from-data config's own, times the quick scale
    assert ours["steps"] == steps == student_steps("gmm", budget, method)
    batch = 1024 if method == "ect_fromdata" else setting.batch  # the from-data config's own batch, else the set's
    assert ours["batch"] == bench["batch"] == batch
    assert (ours["init"] == "scratch") == (bench["init"] == "scratch") == (method == "ect_fromdata")
    for a, b in zip(bench["student"].state_dict().values(), ours["ema"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    raw = zip(bench["student"].state_dict().values(), ours["student"].state_dict().values(), strict=True)
    assert not all(torch.equal(a, b) for a, b in raw)  # the raw weights are not the EMA's
    other = train(setting, method, student_recipe("gmm", method, budget=budget), seed=1)
    assert other["losses"] != ours["losses"]  # another seed draws other batches


def test_init_rule_is_the_benchmarks(quick_gmm):
    setting, budget = quick_gmm
    wide = train(setting, "cd", student_recipe("gmm", "cd", 2, net={"width": 48}, budget=budget))
    assert wide["init"] == "scratch"  # not the init net's architecture
    scaled = train(setting, "cd", student_recipe("gmm", "cd", 2, net={"time_scale": 3.0}, budget=budget))
    assert scaled["init"] == "teacher"  # a student-only input: still from the init net
    forced = train(setting, "sct", student_recipe("gmm", "sct", 2, budget=budget), init="teacher")
    assert forced["init"] == "teacher"


def test_log_every_traces_the_objectives_logs_without_changing_the_run(quick_gmm):
    setting, budget = quick_gmm
    plain = train(setting, "scd", student_recipe("gmm", "scd", 5, budget=budget))
    traced = train(setting, "scd", student_recipe("gmm", "scd", 5, budget=budget), log_every=2)
    assert traced["losses"] == pytest.approx(plain["losses"], rel=1e-6) and plain["trace"] == []
    assert [row["step"] for row in traced["trace"]] == [2, 4, 5]  # every 2 steps, and the last
    assert traced["trace"][-1]["loss"] == pytest.approx(traced["losses"][-1], rel=1e-3)
    assert {"tangent_norm", "logvar", "mse"} <= set(traced["trace"][0])  # the objective's own logs
