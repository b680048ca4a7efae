#!/usr/bin/env python
"""Distill a teacher into a flow-map student with LightningCLI.

    python scripts/distill.py --config configs/data/checkerboard.yaml --config configs/model/mlp2d.yaml \
        --config configs/distill/cd.yaml --teacher runs/teacher/teacher.safetensors --run_dir runs/cd \
        --export runs/cd/student.safetensors

The ``--config`` files compose (``flowmap.recipe.compose``): a data config (the data and its training budget), a
model config (the student net) and a method config (the objective only), deep-merged in order; a method's config is
the same for every data set, and the benchmark trains the same recipe (``scripts/benchmark.py``).

``--teacher PATH`` accepts our safetensors or Lightning checkpoints and diffusers model folders; the
script says what it found before training. A config that names no student net (``model.student.net``) gets
the teacher's own network as the student (diffusers folders; ``flowmap/nets/diffusers_net.py``), starting
from the teacher's weights: then only an objective, data and trainer are needed. Data-free configs (e.g.
configs/distill/*_gmm.yaml) set the teacher in YAML (the analytic Gaussian mixture) and draw their samples from it.
A checkpoint records its teacher's source and content fingerprint: ``--resume`` with another teacher is refused,
naming both, unless ``--teacher_swap`` is given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning import LightningDataModule  # noqa: E402

from flowmap.lightning.cli import FlowmapCLI, main_guard  # noqa: E402
from flowmap.lightning.distill_module import DistillModule  # noqa: E402
from flowmap.recipe import expand_config_flags  # noqa: E402


def expand_teacher_flag(args: list[str]) -> list[str]:
    """``--teacher PATH`` -> ``--model.teacher`` as a CheckpointTeacher, after describing the file
    (``--allow_clip_mismatch``: accept a diffusers scheduler that clips x0)."""
    allow = "--allow_clip_mismatch" in args
    args = [a for a in args if a != "--allow_clip_mismatch"]
    if "--teacher" not in args:
        return args
    i = args.index("--teacher")
    if i + 1 >= len(args):
        raise ValueError("--teacher needs a path")
    path = args[i + 1]
    from teachers.checkpoints import describe_teacher, load_teacher

    _, description = load_teacher(path, allow_clip_mismatch=allow)
    print(f"teacher: {describe_teacher(description)}", flush=True)
    spec = {
        "class_path": "teachers.CheckpointTeacher",
        "init_args": {"path": path, **({"allow_clip_mismatch": True} if allow else {})},
    }
    return args[:i] + ["--model.teacher", json.dumps(spec)] + args[i + 2 :]


def build_cli(args: list[str]) -> FlowmapCLI:
    """The parsed and instantiated run (module, data, trainer) of a command line, not yet fitted."""
    args = expand_teacher_flag(expand_config_flags(list(args)))
    return FlowmapCLI(DistillModule, LightningDataModule, subclass_mode_data=True, args=args)


def main(args: list[str] | None = None) -> FlowmapCLI:
    cli = build_cli(sys.argv[1:] if args is None else args)
    cli.fit()
    return cli


if __name__ == "__main__":
    main_guard(main)
