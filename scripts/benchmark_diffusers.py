#!/usr/bin/env python
"""The diffusers round trip on digits: a teacher saved as a diffusers folder, distilled back through the diffusers
path, from the teacher's weights against from scratch at the same budget; FD at 1 and 2 NFE. Writes DIFFUSERS.md.

    python scripts/benchmark_diffusers.py --threads 1            # benchmarks/DIFFUSERS.md (about 10 min, 1 thread)
    python scripts/benchmark.py --diffusers --threads 1           # the same, from the main benchmark

1. Teacher: a diffusers ``UNet2DModel`` trained by flow matching (Lipman et al. 2023; the model predicts
   noise - x0 at timestep 1000 t, as diffusers' SD3-style models do) on scikit-learn's 8x8 digits (train split,
   unconditional, [-1, 1]), saved with a ``FlowMatchEulerDiscreteScheduler`` as a diffusers model folder.
2. Students: ``scripts/distill.py --teacher FOLDER`` with a config naming no student net, i.e. the teacher's own
   UNet2DModel wrapped as the flow-map student (``flowmap/nets/diffusers_net.py``): once with its default
   ``init_from_teacher`` (a copy of the teacher's weights), once with ``--model.init_from_teacher false`` (the same
   architecture, fresh weights); same objective, data, steps and seed.
3. Metric: FD in the features of the project's digit classifier (``flowmap/features.py``, as
   ``scripts/benchmark.py``) against the train split, on the same noises for every model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.runtime import set_cpu_threads  # noqa: E402

BUDGETS = {  # teacher steps, student steps, evaluation samples, feature-net steps
    "full": {"teacher_steps": 1500, "student_steps": 300, "n_eval": 1000, "feature_steps": 1000, "batch": 64},
    "quick": {"teacher_steps": 30, "student_steps": 4, "n_eval": 64, "feature_steps": 20, "batch": 32},
}
OBJECTIVE = {"name": "cd", "steps": 18, "grid": "edm", "solver": "heun", "metric": "pseudo_huber", "target_ema": 0.95}
UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
}
N_TRAIN = 1000  # the scheduler's num_train_timesteps: the model's timestep is 1000 t


def log(msg: str) -> None:
    print(f"[benchmark_diffusers] {msg}", file=sys.stderr, flush=True)


def train_teacher(folder: Path, steps: int, batch: int, seed: int = 0) -> float:
    """Flow matching on the digits' train split: min E || F(x_t, 1000 t) - (eps - x0) ||^2, x_t = (1 - t) x0 + t eps,
    t logit-normal (Esser et al. 2024, Sec. 3.1); Adam, cosine decay. Saves the UNet2DModel and a
    FlowMatchEulerDiscreteScheduler into ``folder``; returns the seconds spent."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from flowmap.data.digits import load_digits_tensors

    t0 = time.time()
    torch.manual_seed(seed)
    x, _ = load_digits_tensors("train")
    model = UNet2DModel(**UNET)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x0 = x[torch.randint(0, len(x), (batch,), generator=g)]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        loss = (model(xt, t * N_TRAIN).sample - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(steps // 5, 1) == 0:
            log(f"teacher step {step + 1}/{steps}: loss {loss.item():.4f}")
    model.eval().save_pretrained(folder, safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN).save_pretrained(folder)
    return time.time() - t0


def distill(folder: Path, run: Path, steps: int, batch: int, from_teacher: bool) -> tuple[Path, float]:
    """scripts/distill.py --teacher FOLDER, a config of objective, data and trainer only; returns (student, seconds)."""
    import distill as distill_script

    config = {
        "seed_everything": 0,
        "model": {"objective": OBJECTIVE, "lr": 5e-4, "warmup_steps": steps // 10, "lr_decay": "cosine"},
        "data": {
            "class_path": "flowmap.lightning.datamodules.DigitsDataModule",
            "init_args": {"batch_size": batch, "class_conditional": False},
        },
        "trainer": {
            "max_steps": steps,
            "gradient_clip_val": 1.0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    out = run / "student.safetensors"
    args = ["--teacher", str(folder), "--config", str(run / "config.yaml"), "--run_dir", str(run)]
    args += ["--logger", "none", "--export", str(out), "--ckpt_every", str(10 * steps)]
    if not from_teacher:
        args += ["--model.init_from_teacher", "false"]
    t0 = time.time()
    distill_script.main(args)
    return out, time.time() - t0


def evaluate(budget: dict, cache: Path, models: dict) -> dict:
    """{name: {nfe: {"fd"}}} on the same noises (seeded) for each ``models[name] = (sample_fn, nfes)``."""
    from flowmap.data.digits import load_digits_tensors
    from flowmap.features import build_feature_extractor, digit_classifier, fid_kid_from_features

    net = digit_classifier(cache / f"digit_features_{budget['feature_steps']}.safetensors", budget["feature_steps"])
    extractor = build_feature_extractor(None, net)
    x_train, _ = load_digits_tensors("train")
    ref = extractor.extract(x_train)
    noise = torch.randn(budget["n_eval"], 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    subset = min(1000, budget["n_eval"])
    out: dict = {}
    for name, (fn, nfes) in models.items():
        out[name] = {}
        for nfe in nfes:
            with torch.no_grad():
                x = fn(noise, nfe)
            m = fid_kid_from_features(ref, extractor.extract(x.float()), kid_subsets=2, kid_subset_size=subset)
            out[name][nfe] = {"fd": m["fd"]}
            log(f"{name} at {nfe} NFE: FD {m['fd']:.2f}")
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder of DIFFUSERS.md")
    p.add_argument("--work", default=None, help="folder for the teacher folder and the runs (default <out>/cache)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the table was made with 1)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of the whole pipeline")
    p.add_argument("--student-steps", type=int, default=None, help="distillation steps of each student")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    set_cpu_threads(a.threads)
    start, cpu_start = time.time(), time.process_time()
    budget = dict(BUDGETS["quick" if a.quick else "full"])
    if a.student_steps is not None:
        if a.student_steps < 1:
            raise ValueError(f"--student-steps must be at least 1, got {a.student_steps}")
        budget["student_steps"] = a.student_steps
    out = Path(a.out)
    work = Path(a.work) if a.work else out / "cache" / "diffusers"
    out.mkdir(parents=True, exist_ok=True)
    folder = work / "digits_unet_flow"
    log(f"training the diffusers teacher ({budget['teacher_steps']} steps) into {folder}")
    seconds = {"teacher": train_teacher(folder, budget["teacher_steps"], budget["batch"])}
    students = {}
    for name, from_teacher in (("from the teacher's weights", True), ("from scratch", False)):
        run = work / ("from_teacher" if from_teacher else "scratch")
        log(f"distilling {name} ({budget['student_steps']} steps)")
        students[name], seconds[name] = distill(folder, run, budget["student_steps"], budget["batch"], from_teacher)

    from flowmap.app import load_student
    from flowmap.solvers import solve
    from teachers import CheckpointTeacher

    teacher = CheckpointTeacher(str(folder))
    models = {"teacher (Euler)": (lambda z, k: solve(teacher, z, k, "euler"), [1, 2, 8, 32])}
    for name, path in students.items():
        student = load_student(path)
        models[name] = (
            lambda z, k, s=student: s.sample(z, steps=k, generator=torch.Generator().manual_seed(7)),
            [1, 2],
        )
    results = evaluate(budget, work, models)
    meta = {
        "budget": budget,
        "objective": OBJECTIVE,
        "unet": UNET,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.time() - start, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cpu_seconds": round(time.process_time() - cpu_start, 1),  # the wall time of a quiet core, near enough
    }
    report = {"meta": meta, "fd": results}
    if not a.quick:
        (out / "DIFFUSERS.md").write_text(markdown(report))
        log(f"wrote {out / 'DIFFUSERS.md'}")
    print(json.dumps(report, default=str))
    return report


def markdown(report: dict) -> str:
    meta, fd = report["meta"], report["fd"]
    b = meta["budget"]
    rows = []
    for name, by_nfe in fd.items():
        cells = " | ".join(f"{by_nfe[k]['fd']:.2f}" if k in by_nfe else "-" for k in (1, 2, 8, 32))
        rows.append(f"| {name} | {cells} |")
    s = meta["seconds"]
    a1, b1 = fd["from the teacher's weights"][1]["fd"], fd["from scratch"][1]["fd"]
    a2, b2 = fd["from the teacher's weights"][2]["fd"], fd["from scratch"][2]["fd"]
    t1 = fd["teacher (Euler)"][1]["fd"]
    verdict = (
        f"At step 0 the student made from the teacher's weights is the teacher's one Euler step (FD {t1:.0f}, the "
        "teacher's 1-NFE cell); the student from scratch is the same network with fresh weights. "
        f"Starting from the teacher's weights is {'better' if a1 < b1 and a2 < b2 else 'NOT better'} at the same "
        f"budget: FD {a1:.2f} vs {b1:.2f} at 1 NFE ({b1 / a1:.1f}x), {a2:.2f} vs {b2:.2f} at 2 NFE ({b2 / a2:.1f}x)."
    )
    return f"""# The diffusers round trip on digits

Made by `python scripts/benchmark_diffusers.py --threads 1` (or `scripts/benchmark.py --diffusers`):
{meta["threads"]} torch thread(s), torch {meta["torch"]}, Python {meta["python"]}; {meta["total_seconds"]:.0f} s of wall
clock in all on 2 CPU cores shared with other jobs (load average at the end {meta["load_average"]}; the times below
are wall clock under that load), {meta["cpu_seconds"]:.0f} s of CPU time (about the wall time on a quiet core).

- **Teacher**: a diffusers `UNet2DModel` (block_out_channels {UNET["block_out_channels"]}, one layer per block,
  no attention) trained by flow matching for {b["teacher_steps"]} steps (batch {b["batch"]}) on the 8x8 digits'
  train split (unconditional, [-1, 1]), saved with a `FlowMatchEulerDiscreteScheduler` as a diffusers model folder
  ({s["teacher"]:.0f} s).
- **Students**: `scripts/distill.py --teacher FOLDER` with a config that names no student net, so the student is the
  teacher's own `UNet2DModel` with the injected interval embedding. Objective
  `{json.dumps(OBJECTIVE)}`,
  {b["student_steps"]} steps, batch {b["batch"]}, lr 5e-4 with warm-up and cosine decay, EMA half-life 10% of the
  run. "From the teacher's weights": `init_from_teacher` left at its default ({s["from the teacher's weights"]:.0f} s);
  "from scratch": `--model.init_from_teacher false` ({s["from scratch"]:.0f} s).
- **Metric**: FD in the features of the project's digit classifier against the 1438 train images,
  {b["n_eval"]} samples from the same noises for every row (student samples with the method's re-noising, gamma 1).

FD (lower is better):

| model \\ NFE | 1 | 2 | 8 | 32 |
|---|---|---|---|---|
{chr(10).join(rows)}

{verdict}
"""


if __name__ == "__main__":
    main_guard(main)
