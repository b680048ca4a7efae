#!/usr/bin/env python
"""The demo: train a checkerboard teacher, distill it into a flow-map student, and compare them.

    python scripts/demo.py                    # default method, results under runs/demo
    python scripts/demo.py --method meanflow  # any method with a configs/distill/<method>.yaml

The student is the recipe a user composes: configs/data/checkerboard.yaml + configs/model/mlp2d.yaml +
configs/distill/<method>.yaml (and its checkerboard override, if any); the teacher is configs/teacher/checkerboard.yaml.

Writes to the output folder: teacher.safetensors, student.safetensors, comparison.png
(data | teacher at 64 NFE | student at 1 and 2 NFE), metrics.json, and the Lightning run folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flowmap.data import get_dataset  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.metrics import checkerboard_precision, w2_exact  # noqa: E402
from flowmap.models import load_model  # noqa: E402
from flowmap.objectives import sampler_defaults  # noqa: E402
from flowmap.plotting import save_panels  # noqa: E402
from flowmap.runtime import set_cpu_threads  # noqa: E402
from flowmap.sampling import sample  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from flowmap.time_grids import uniform_grid  # noqa: E402

N_EVAL = 4000


def methods() -> list[str]:
    """The methods with a method config (configs/distill/<method>.yaml named after a registered objective)."""
    from flowmap.objectives import OBJECTIVES

    return sorted(p.stem for p in (ROOT / "configs" / "distill").glob("*.yaml") if p.stem in OBJECTIVES)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="cd", help=f"distillation method, one of {methods()}")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--teacher-steps", type=int, default=None, help="override the teacher's training steps")
    p.add_argument("--student-steps", type=int, default=None, help="override the student's training steps")
    p.add_argument("--logger", default="csv", help="wandb | csv | tensorboard | none")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: 1 on a busy machine, else all cores)")
    return p.parse_args(argv)


def evaluate(name: str, x: torch.Tensor, data: torch.Tensor, rows: dict) -> None:
    rows[name] = {"w2": w2_exact(x, data), "precision": checkerboard_precision(x)}
    print(f"  {name:<22} W2 {rows[name]['w2']:.4f}   on occupied cells {rows[name]['precision']:.3f}", flush=True)


def run_args(configs: list[str], out: Path, role: str, steps: int, extra: list[str]) -> list[str]:
    """Arguments of a training script: its ``configs/*.yaml`` files, the run folder ``out/<role>_run``, the exported
    ``out/<role>.safetensors``, ``extra`` and, when ``steps`` is set, the step budget."""
    args = [x for c in configs for x in ("--config", str(ROOT / f"configs/{c}.yaml"))]
    args += ["--run_dir", str(out / f"{role}_run"), "--export", str(out / f"{role}.safetensors"), *extra]
    return args + (["--trainer.max_steps", str(steps)] if steps else [])


def main(argv: list[str] | None = None) -> Path:
    a = parse(argv)
    sys.argv = sys.argv[:1]  # the CLIs below get their own argument lists
    if a.method not in methods():
        raise ValueError(f"unknown method {a.method!r}; choose from {methods()}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    threads = set_cpu_threads(a.threads)
    print(f"flowmap demo: method {a.method}, {threads} CPU thread(s), results in {out.resolve()}", flush=True)
    common = ["--logger", a.logger, "--trainer.enable_model_summary", "false"]

    print("[1/3] training the checkerboard teacher", flush=True)
    from scripts.train_teacher import main as train_teacher

    train_teacher(run_args(["teacher/checkerboard"], out, "teacher", a.teacher_steps, common))

    print(f"[2/3] distilling it with {a.method}", flush=True)
    from scripts.distill import main as distill

    recipe = ["data/checkerboard", "model/mlp2d", f"distill/{a.method}"]
    distill(run_args(recipe, out, "student", a.student_steps, [*common, "--teacher", str(out / "teacher.safetensors")]))

    print("[3/3] evaluating on 4,000 fresh samples", flush=True)
    torch.manual_seed(1234)
    ds = get_dataset("checkerboard")
    g = torch.Generator().manual_seed(1)
    data, data2 = ds.sample(N_EVAL, generator=g), ds.sample(N_EVAL, generator=g)
    teacher, student = load_model(out / "teacher.safetensors"), load_model(out / "student.safetensors")
    noise = torch.randn(N_EVAL, 2, generator=g)
    with torch.no_grad():
        x_teacher = solve(teacher, noise, uniform_grid(32), "heun")  # 32 Heun steps = 63 NFE (last step Euler)
        gamma = sampler_defaults(a.method)["gamma"]  # consistency-type students re-noise between steps
        x_s1 = sample(student, noise, 1)
        x_s2 = sample(student, noise, 2, gamma=gamma, generator=torch.Generator().manual_seed(2))
    rows: dict[str, dict] = {}
    evaluate("data vs data", data2, data, rows)
    evaluate("teacher, Heun 64 NFE", x_teacher, data, rows)
    evaluate(f"{a.method}, 1 NFE", x_s1, data, rows)
    evaluate(f"{a.method}, 2 NFE", x_s2, data, rows)
    floor = rows["data vs data"]["w2"]
    metrics = {
        "method": a.method,
        "samples": N_EVAL,
        "rows": rows,
        "teacher_w2_over_floor": rows["teacher, Heun 64 NFE"]["w2"] / floor,
        "sampler_gamma": gamma,
        "seconds": time.time() - start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_panels(
        out / "comparison.png",
        {"data": data, "teacher, 64 NFE": x_teacher, f"{a.method}, 1 NFE": x_s1, f"{a.method}, 2 NFE": x_s2},
    )
    print(
        f"\nteacher W2 / data-vs-data W2 = {metrics['teacher_w2_over_floor']:.2f} (target <= 1.4); "
        f"teacher on occupied cells {rows['teacher, Heun 64 NFE']['precision']:.3f} (target >= 0.85)"
    )
    print(
        f"done in {metrics['seconds']:.0f} s; results in {out.resolve()}  (comparison.png, metrics.json, *.safetensors)"
    )
    return out


if __name__ == "__main__":
    main_guard(main)
