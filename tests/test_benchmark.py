"""scripts/benchmark.py --quick: every table of RESULTS.md / results.json holds numbers, the plots exist,
an unknown method is reported as skipped, and the targets are read correctly. Timings are never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.benchmark_report import _target, evaluate_targets  # noqa: E402

DATASETS = ("checkerboard", "eight_gaussians", "digits", "gmm", "aniso2d", "scales16")
METRICS = {
    "checkerboard": ("w2", "precision"),
    "eight_gaussians": ("w2", "precision"),
    "gmm": ("rmse", "w2"),
    "aniso2d": ("rmse", "w2"),
    "scales16": ("rmse", "w2"),
    "digits": ("fd", "kid", "class_acc"),
}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "--quick",
            "--out",
            str(out),
            "--methods",
            "cd,meanflow,no_such_method",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(ROOT),
    )
    print(f"benchmark --quick: {time.time() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), (out / "RESULTS.md").read_text()


@pytest.mark.slow
def test_quality_tables_hold_numbers(quick_run):
    _, res, md = quick_run
    assert set(res["quality"]) == set(DATASETS)
    # a fresh cache: every model carries this code's fingerprint, and the report says so
    assert (
        f"Training code fingerprint {res['meta']['code']}" in md
        and "every teacher and student here was trained under it" in md
    )
    for name, q in res["quality"].items():
        keys = METRICS[name]
        # the data-vs-data floor
        assert all(finite(q["floor"][k]) for k in keys if k != "class_acc"), (name, q["floor"])
        # teacher rows: Euler at 1..64 NFE, Heun at the even ones
        assert sorted(map(int, q["teacher"]["euler"])) == [1, 2, 4, 8, 16, 32, 64]
        assert sorted(map(int, q["teacher"]["heun"])) == [2, 4, 8, 16, 32, 64]
        for solver in ("euler", "heun"):
            for row in q["teacher"][solver].values():
                assert all(finite(row[k]) for k in keys), (name, solver, row)
        # every run method at 1, 2, 4, 8 NFE
        assert set(q["students"]) == {"cd", "meanflow"}, (name, q.get("failed"))
        for m, st in q["students"].items():
            assert sorted(map(int, st["nfe"])) == [1, 2, 4, 8]
            for nfe, row in st["nfe"].items():
                stochastic = st["sampler_gamma"] > 0 and int(nfe) > 1  # re-noising: no deterministic map to compare
                assert all(finite(row[k]) or (k == "rmse" and stochastic and row[k] is None) for k in keys), (
                    name,
                    m,
                    row,
                )
            assert len(st["losses"]) == st["steps"] > 0 and all(finite(v) for v in st["losses"])
    # a flow map error of the exact teacher falls with NFE (Heun 64 far below Euler 1): the table is not noise
    gmm = res["quality"]["gmm"]["teacher"]
    assert gmm["heun"]["64"]["rmse"] < 0.01 * gmm["euler"]["1"]["rmse"]
    assert finite(res["quality"]["gmm"]["data_std"])
    for title in (
        "## Targets",
        "## Quality per NFE",
        "### Checkerboard",
        "### Eight Gaussians",
        "### Digits",
        "### Analytic mixture",
        "## Training cost",
        "### Sampling throughput",
        "## Peer",
    ):
        assert title in md, title
    assert "project digit classifier" in md  # says which features were used
    assert "skipped `no_such_method`: not in the objective registry" in md


@pytest.mark.slow
def test_cost_throughput_and_peer_tables_hold_numbers(quick_run):
    _, res, md = quick_run
    for net in ("mlp", "dit"):
        c = res["cost"][net]
        assert set(c["steps"]) == {"fm", "cd", "meanflow", "meanflow (every pair s != t)"}
        assert c["steps"]["meanflow (every pair s != t)"]["config"]["equal_share"] == 0.0
        for name, row in c["steps"].items():
            assert finite(row["step_s"]) and row["step_s"] > 0 and finite(row["ratio"]), (net, name, row)
            assert row["peak_mib"] is None or finite(row["peak_mib"])
        assert c["steps"]["fm"]["ratio"] == pytest.approx(1.0)
        tp = c["throughput"]
        for k in ("raw forward", "student 1 NFE", "teacher 64 NFE"):
            assert finite(tp[k]["samples_per_s"]) and tp[k]["samples_per_s"] > 0
        assert finite(tp["student 1 NFE"]["vs_raw_forward"]) and finite(tp["student 1 NFE"]["vs_teacher_64"])
    assert (
        "peak resident-set growth" in res["meta"]["memory_method"]
        or "cuda" in res["meta"]["memory_method"]
        or res["meta"]["memory_method"] == "unavailable"
    )
    peer = res["peer"]
    if peer["available"]:
        for side in ("ours", "torchcfm"):
            assert finite(peer[side]["step_s"]) and finite(peer[side]["w2"])
        assert finite(peer["step_ratio"]) and finite(peer["w2_ratio"])
        assert peer["ours"]["w2"] == pytest.approx(sum(peer["ours"]["w2_per_seed"]) / peer["seeds"])
        assert "| torchcfm |" in md
    else:
        assert "torchcfm" in peer["reason"] and "Not run: torchcfm" in md
    # targets: every one has a verdict or says why not; the cost and quality ones are evaluated here
    targets = res["targets"]
    assert len(targets) >= 10
    evaluated = [t for t in targets if t["met"] is not None]
    assert all(finite(t["value"]) for t in evaluated)
    assert any("MeanFlow step" in t["target"] for t in evaluated)
    assert any(t["target"].startswith("mixture") for t in evaluated)


@pytest.mark.slow
def test_streaming_row_compares_shards_with_memory(quick_run):
    _, res, md = quick_run
    st = res["streaming"]
    assert st["available"], st
    for k in ("memory", "shards_w1", "shards_w2"):
        assert finite(st[k]) and st[k] > 0, (k, st)
    assert st["ratio_w1"] == pytest.approx(st["shards_w1"] / st["memory"])
    assert "## Streaming: webdataset shards against memory" in md and "shards, 2 workers" in md


@pytest.mark.slow
def test_plots_are_written(quick_run):
    out, res, _ = quick_run
    expected = {
        "scatter_checkerboard.png",
        "scatter_eight_gaussians.png",
        "scatter_gmm.png",
        "samples_digits.png",
        "trajectories_checkerboard.png",
        "quality_vs_nfe_digits.png",
        "quality_vs_nfe_gmm.png",
        "loss_checkerboard.png",
    }
    assert expected <= set(res["plots"])
    for name in res["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name


def test_targets_are_read_with_their_margin():
    assert _target("x", 1.30, 1.25, "<=")["met"] is False
    assert _target("x", 1.30, 1.25, "<=")["margin"] == "missed by 4%"
    assert _target("x", 0.95, 0.90, ">=")["margin"] == "met, 6% to spare"
    assert _target("x", float("nan"), 0.9, ">=", "no run")["met"] is None
    results = {
        "quality": {
            "checkerboard": {
                "teacher": {"heun": {"64": {"w2": 0.2}}},
                "students": {
                    "cd": {"nfe": {"1": {"precision": 0.95}, "2": {"w2": 0.24}}},
                    "pd": {"nfe": {"1": {"precision": 0.5}, "2": {"w2": 0.3}}},
                },
            },
            "gmm": {
                "data_std": 1.0,
                "students": {"cd": {"nfe": {"1": {"rmse": 0.04}}}, "pd": {"nfe": {"1": {"rmse": 0.2}}}},
            },
        },
        "cost": {
            "mlp": {"steps": {"meanflow": {"ratio": 2.0}}, "throughput": {"student 1 NFE": {"vs_raw_forward": 0.8}}}
        },
        "peer": {"available": False, "reason": "torchcfm is not installed"},
    }
    by_text = {t["target"]: t for t in evaluate_targets(results)}
    w2 = {k: v for k, v in by_text.items() if "W2 at 2 NFE" in k}
    assert w2["checkerboard: cd W2 at 2 NFE <= 1.25x the teacher's (Heun, 64 NFE) [ratio]"]["value"] == pytest.approx(
        1.2
    )
    assert w2["checkerboard: pd W2 at 2 NFE <= 1.25x the teacher's (Heun, 64 NFE) [ratio]"]["met"] is False
    prec = {k: v for k, v in by_text.items() if "occupied cells" in k}
    assert prec["checkerboard: cd at 1 NFE puts >= 0.90 of its samples on occupied cells"]["met"] is True
    assert prec["checkerboard: meanflow at 1 NFE puts >= 0.90 of its samples on occupied cells"]["met"] is None
    best = next(v for k, v in by_text.items() if k.startswith("mixture: best 1-NFE"))
    assert best["met"] is False and best["value"] == pytest.approx(0.04) and "(cd:" in best["target"]  # <= 2%
    cd = by_text["mixture: cd 1-NFE flow-map RMSE <= 5% of the data std [RMSE / std]"]
    pd = by_text["mixture: pd 1-NFE flow-map RMSE <= 5% of the data std [RMSE / std]"]
    assert cd["met"] is True and pd["met"] is False and pd["value"] == pytest.approx(0.2)
    mlp = next(v for k, v in by_text.items() if "MeanFlow step <= 2.5x" in k)
    assert mlp["met"] is True
    dit = next(v for k, v in by_text.items() if "MeanFlow step <= 3.0x" in k)
    assert dit["met"] is None
    tp = next(v for k, v in by_text.items() if "raw forward" in k and "MLP" in k)
    assert tp["met"] is False
    peer = [v for k, v in by_text.items() if k.startswith("peer")]
    assert len(peer) == 2 and all(p["met"] is None and "torchcfm is not installed" in p["margin"] for p in peer)


def test_bad_arguments_are_one_clear_error():
    from scripts.benchmark import main

    with pytest.raises(ValueError, match="--datasets: unknown"):
        main(["--datasets", "mnist", "--quick"])
    with pytest.raises(ValueError, match="--skip: unknown"):
        main(["--skip", "everything", "--quick"])
    with pytest.raises(ValueError, match="--scale must be a positive number"):
        main(["--scale", "0", "--quick"])
    with pytest.raises(ValueError, match="--inception-weights: no such file"):
        main(["--inception-weights", "/nonexistent/pt_inception.pth", "--quick"])


@pytest.mark.slow
def test_jobs_train_in_workers_and_the_cache_hands_them_over(tmp_path):
    """--jobs 2: teachers and students are trained in two spawned worker processes and land in the cache; the main
    pass evaluates them (marked trained by a worker), and a second run with --jobs 1 loads the very same students
    (identical metrics, marked cached)."""
    cache = tmp_path / "cache"
    args = [
        "--quick",
        "--datasets",
        "checkerboard,gmm",
        "--methods",
        "cd",
        "--skip",
        "cost,peer,plots,streaming",
        "--cache",
        str(cache),
    ]

    def run(out: Path, jobs: int) -> tuple[dict, str]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args, "--out", str(out), "--jobs", str(jobs)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=str(ROOT),
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((out / "results.json").read_text()), proc.stdout + proc.stderr

    first, log = run(tmp_path / "a", 2)
    assert "pretrain: 2 teachers, then 2 students, in 2 worker processes" in log and "pretrain: gmm/cd done" in log
    assert (
        len(list(cache.glob("student_*_cd_*.safetensors"))) == 2 and len(list(cache.glob("teacher_*.safetensors"))) == 2
    )
    second, _ = run(tmp_path / "b", 1)
    for name in ("checkerboard", "gmm"):
        a, b = first["quality"][name]["students"]["cd"], second["quality"][name]["students"]["cd"]
        assert a["worker"] and not a["cached"] and b["cached"] and not b["worker"]
        assert all(finite(row["w2"]) for row in a["nfe"].values())
        assert a["nfe"] == b["nfe"]  # the same weights, evaluated twice with the same noise
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "benchmark.py"),
                "--quick",
                "--jobs",
                "0",
                "--out",
                str(tmp_path / "c"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(ROOT),
            check=True,
        )


def test_report_names_what_was_trained_under_other_code() -> None:
    """The cache is keyed on configs: a teacher or student trained under another version of flowmap/ or teachers/
    is named in RESULTS.md; a run whose models all carry the current fingerprint says so."""
    from scripts import benchmark
    from scripts.benchmark_report import code_note

    code = benchmark.code_fingerprint()
    assert len(code) == 12 and code == benchmark.code_fingerprint()
    results = {
        "meta": {"code": code},
        "quality": {
            "checkerboard": {"teacher_code": code, "students": {"cd": {"code": code}, "meanflow": {"code": code}}},
            "gmm": {"teacher_code": code, "data_std": 1.0, "students": {"cd": {"code": code}}},
        },
    }
    assert "every teacher and student here was trained under it" in code_note(results)
    results["quality"]["checkerboard"]["students"]["meanflow"]["code"] = "0123456789ab"
    results["quality"]["gmm"]["teacher_code"] = None  # written before fingerprints were recorded
    note = code_note(results)
    assert "Trained under other code" in note
    assert "checkerboard/meanflow (0123456789ab)" in note and "gmm flow-matching init net (unrecorded)" in note
    assert "checkerboard/cd" not in note and "checkerboard teacher" not in note


def test_benchmark_objectives_are_built_under_a_fixed_seed() -> None:
    """sCM owns a randomly initialized log-variance net; torch's global generator starts from a random seed in each
    process, so the benchmark builds objectives under a seed of their own (the global stream is left as it was)."""
    from scripts import benchmark

    def params(obj):
        return torch.cat([p.detach().flatten() for p in obj.parameters()] + [b.flatten() for b in obj.buffers()])

    torch.manual_seed(1)
    a = benchmark.seeded_objective({"name": "scd"}, "objective", "checkerboard", "scd")
    after = torch.rand(3)
    torch.manual_seed(2)
    b = benchmark.seeded_objective({"name": "scd"}, "objective", "checkerboard", "scd")
    assert params(a).numel() > 0 and torch.equal(params(a), params(b))
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)  # the build did not consume the global stream
    c = benchmark.seeded_objective({"name": "scd"}, "objective", "eight_gaussians", "scd")
    assert not torch.equal(params(a), params(c))


def test_fresh_worker_tasks_retrain_a_teacher_once(monkeypatch) -> None:
    """--fresh --jobs N: the teacher's own task retrains it; each student's task loads it from the cache and
    retrains only the student (it used to retrain the teacher once per student)."""
    from scripts import benchmark

    calls = []

    class FakeSetting:
        def __init__(self, name, budget, device, cache, fresh, reuse_only=False):
            self.name, self.fresh = name, fresh

        def get_teacher(self):
            calls.append(("teacher", self.name, self.fresh))

        def train_student(self, method, seed=0):
            calls.append((method, seed, self.name, self.fresh))

    monkeypatch.setattr(benchmark, "Setting", FakeSetting)
    threads = torch.get_num_threads()  # a worker task sets one thread: restore this process's count
    try:
        for method, seed in ((None, 0), ("cd", 0), ("meanflow", 1)):
            task = ("checkerboard", method, seed, None, "cpu", "/nonexistent", True)
            name, m, k, err, _ = benchmark._pretrain_task(task)
            assert err is None and m == method and k == seed
    finally:
        torch.set_num_threads(threads)
    assert calls == [
        ("teacher", "checkerboard", True),
        ("teacher", "checkerboard", False),
        ("cd", 0, "checkerboard", True),
        ("teacher", "checkerboard", False),
        ("meanflow", 1, "checkerboard", True),
    ]


def test_students_train_their_recipe_and_are_evaluated_with_the_ema(tmp_path, monkeypatch) -> None:
    """Every student's ``TrainLoop`` gets exactly its recipe's options (``benchmark.recipe``: the configs' lr, warm-up,
    decay, EMA, clipping; no per-method or per-data exception: meanflow trains at cd's rate), its recipe's batch, and
    the student handed to the evaluation holds the loop's EMA weights, not the last raw weights."""
    from scripts import benchmark

    loops: dict = {}

    class Loop(benchmark.TrainLoop):
        def __init__(self, student, objective, teacher=None, **options):
            super().__init__(student, objective, teacher, **options)
            loops[objective.name] = self
            self.options, self.shapes = options, []

        def step(self, x0, cond=None):
            self.shapes.append(tuple(x0.shape))
            out = super().step(x0, cond)
            self.raw = [p.detach().clone() for p in self.student.parameters()]
            return out

    monkeypatch.setattr(benchmark, "TrainLoop", Loop)
    budget = benchmark.BUDGETS["quick"]
    setting = benchmark.Setting("checkerboard", budget, torch.device("cpu"), tmp_path, fresh=True)
    setting.get_teacher()
    trained = {m: setting.train_student(m) for m in ("cd", "meanflow")}
    for method, loop in loops.items():
        r = benchmark.recipe("checkerboard", method, budget)
        assert loop.options == r["options"] and loop.k == r["options"]["steps"] == setting.student_steps
        assert trained[method]["config"] == r["objective"] and loop.objective.name == method
        assert loop.student.net.config == benchmark.build_student(dict(r["student"])).net.config
        assert loop.shapes[0][0] == r["cfg"]["data"]["init_args"]["batch_size"]
        student = trained[method]["student"]
        ema = [p.detach() for p in loop.ema.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(student.parameters(), ema))
        assert any(not torch.equal(a, b) for a, b in zip(ema, loop.raw))  # the EMA lags the raw weights
    assert loops["meanflow"].options["lr"] == loops["cd"].options["lr"]
    assert not hasattr(benchmark, "LR_SCALE") and not hasattr(benchmark, "method_config")
