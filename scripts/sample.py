#!/usr/bin/env python
"""Sample any flowmap checkpoint (teacher or student): a PNG (2-D scatter or image grid) plus an .npz.

    python scripts/sample.py runs/cd/student.safetensors --n 2000 --steps 1 --out runs/cd/samples
    python scripts/sample.py runs/teacher/teacher.safetensors --steps 32 --solver heun --out runs/teacher/samples
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flowmap.lightning.cli import main_guard  # noqa: E402
from flowmap.models import load_model, student_sampler  # noqa: E402
from flowmap.plotting import save_panels  # noqa: E402
from flowmap.sampling import sample  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from flowmap.student import FlowMap  # noqa: E402
from flowmap.time_grids import uniform_grid  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a flowmap .safetensors file (teacher or student)")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 1 for students, 32 for teachers)")
    p.add_argument("--solver", default="heun", help="ODE solver for teachers: euler, heun, midpoint, rk4, dpm++2m")
    p.add_argument("--gamma", type=float, default=None,
                   help="stochastic re-noising between student steps, in [0, 1] (default: the student's method's)")
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    a = parse(argv)
    model = load_model(a.checkpoint)
    g = torch.Generator().manual_seed(a.seed)
    noise = torch.randn((a.n, *model.data_shape), generator=g)
    cond = None if a.label is None else torch.full((a.n,), a.label, dtype=torch.long)
    if isinstance(model, FlowMap):
        steps = a.steps or 1
        gamma = student_sampler(model.config)["gamma"] if a.gamma is None else a.gamma
        x = sample(model, noise, steps, cond=cond, gamma=gamma, guidance=a.guidance, generator=g)
        title = f"student, {steps} NFE" + (f", gamma {gamma:g}" if gamma else "")
    else:
        steps = a.steps or 32
        x = solve(model, noise, uniform_grid(steps), a.solver, cond=cond, guidance=1.0 if a.guidance is None else a.guidance)
        title = f"teacher, {a.solver} {steps} steps"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", x=x.numpy(), labels=(cond.numpy() if cond is not None else np.zeros(0)))
    save_panels(out / "samples.png", {title: x})
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}")
    return out


if __name__ == "__main__":
    main_guard(main)
