#!/usr/bin/env python
"""Train a teacher (flow matching / diffusion on any path and prediction) with LightningCLI.

    python scripts/train_teacher.py --config configs/teacher/checkerboard.yaml \
        --run_dir runs/teacher --export runs/teacher/teacher.safetensors --logger csv

YAML files compose with repeated --config (e.g. configs/trainer/ddp_cpu.yaml on top).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning import LightningDataModule  # noqa: E402

from flowmap.lightning.cli import FlowmapCLI, main_guard  # noqa: E402
from flowmap.lightning.teacher_module import TeacherModule  # noqa: E402


def main(args: list[str] | None = None) -> FlowmapCLI:
    cli = FlowmapCLI(TeacherModule, LightningDataModule, subclass_mode_data=True, args=args)
    cli.fit()
    return cli


if __name__ == "__main__":
    main_guard(main)
