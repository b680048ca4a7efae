#!/usr/bin/env python
"""Export a student's one-step generator (noise, labels -> sample) with torch.export to a .pt2 file,
check it against eager PyTorch, and print the result.

    python scripts/export.py runs/cd/student.safetensors --out runs/cd/generator.pt2

In an application (no flowmap needed):

    gen = torch.export.load("generator.pt2").module()
    x = gen(torch.randn(16, *data_shape))                  # unconditional student
    x = gen(torch.randn(16, *data_shape), labels)          # class-conditional: labels (16,) long
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap.runtime import THREADS_HELP, set_cpu_threads  # noqa: E402
from flowmap.app import load_student  # noqa: E402
from flowmap.export import export_generator  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402

TOLERANCE = 1e-5


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="a student .safetensors file (save_student / DistillModule.export)")
    p.add_argument("--out", default=None, help="output .pt2 (default: next to the student, generator.pt2)")
    p.add_argument("--batch", type=int, default=4, help="example batch size for tracing")
    p.add_argument("--max-batch", type=int, default=4096, help="largest batch the exported program accepts")
    p.add_argument("--static", action="store_true", help="export with a fixed batch size instead of a dynamic one")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale baked in (students trained with a guidance input)")
    a = p.parse_args(argv)
    if a.batch < 1 or a.max_batch < a.batch:
        raise ValueError(f"--batch must be at least 1 and at most --max-batch, got --batch {a.batch} "
                         f"--max-batch {a.max_batch}")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    set_cpu_threads(a.threads)
    out = Path(a.out) if a.out else Path(a.student).with_name("generator.pt2")
    student = load_student(a.student)
    result = export_generator(student, out, batch=a.batch, guidance=a.guidance, dynamic=not a.static, max_batch=a.max_batch)
    ok = result["max_abs_diff"] < TOLERANCE
    result["matches_eager"] = ok
    print(json.dumps(result))
    print(f"{'ok' if ok else 'MISMATCH'}: max |exported - eager| = {result['max_abs_diff']:.3g} (tolerance {TOLERANCE:g}) over batches {result['checked_batches']}; wrote {out}")
    if not ok:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main_guard(main)
