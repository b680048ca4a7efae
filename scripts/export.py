#!/usr/bin/env python
"""Export a student's one-step generator (noise, labels -> sample) with torch.export to a .pt2 file,
check it against eager PyTorch, and print the result.

    python scripts/export.py runs/cd/student.safetensors --out runs/cd/generator.pt2

A student made from a diffusers model (the teacher's own network) also exports as a diffusers folder
(``flowmap.pipeline.FlowMapPipeline.from_pretrained(OUT)``, or diffusers' own
``DiffusionPipeline.from_pretrained(OUT, custom_pipeline="pipeline_flowmap", trust_remote_code=True)``; LoRA
adapters merged), as merged LoRA weights, or as the LoRA adapter alone:

    python scripts/export.py runs/cd/student.safetensors --format diffusers --out runs/cd/pipeline
    python scripts/export.py runs/cd/student.safetensors --format lora_merged --out runs/cd/merged.safetensors
    python scripts/export.py runs/cd/student.safetensors --format lora_adapter --out runs/cd/adapter.safetensors

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

from flowmap.app import load_student  # noqa: E402
from flowmap.export import export_generator  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.runtime import THREADS_HELP, set_cpu_threads  # noqa: E402

TOLERANCE = 1e-5
FORMATS = ("pt2", "diffusers", "lora_merged", "lora_adapter")
DEFAULT_OUT = {
    "pt2": "generator.pt2",
    "diffusers": "pipeline",
    "lora_merged": "merged.safetensors",
    "lora_adapter": "adapter.safetensors",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="a student .safetensors file (save_student / DistillModule.export)")
    p.add_argument(
        "--format",
        default="pt2",
        choices=FORMATS,
        help="pt2 (torch.export), diffusers (a pipeline "
        "folder), lora_merged or lora_adapter (students trained with LoRA)",
    )
    p.add_argument("--out", default=None, help="output .pt2 / folder / .safetensors (default: next to the student)")
    p.add_argument("--batch", type=int, default=4, help="example batch size for tracing")
    p.add_argument("--max-batch", type=int, default=4096, help="largest batch the exported program accepts")
    p.add_argument("--static", action="store_true", help="export with a fixed batch size instead of a dynamic one")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance scale baked in (students trained with a guidance input)"
    )
    a = p.parse_args(argv)
    if a.batch < 1 or a.max_batch < a.batch:
        raise ValueError(
            f"--batch must be at least 1 and at most --max-batch, got --batch {a.batch} --max-batch {a.max_batch}"
        )
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    set_cpu_threads(a.threads)
    out = Path(a.out) if a.out else Path(a.student).with_name(DEFAULT_OUT[a.format])
    student = load_student(a.student)
    if a.format != "pt2":
        return export_other(student, a.format, out, a.batch)
    result = export_generator(
        student, out, batch=a.batch, guidance=a.guidance, dynamic=not a.static, max_batch=a.max_batch
    )
    ok = result["max_abs_diff"] < TOLERANCE
    result["matches_eager"] = ok
    print(json.dumps(result))
    print(
        f"{'ok' if ok else 'MISMATCH'}: max |exported - eager| = {result['max_abs_diff']:.3g} "
        f"(tolerance {TOLERANCE:g}) over batches {result['checked_batches']}; wrote {out}"
    )
    if not ok:
        raise SystemExit(1)
    return result


def export_other(student, fmt: str, out: Path, batch: int) -> dict:
    """diffusers folder, merged LoRA student or LoRA adapter; the first two are checked against the student."""
    import torch

    from flowmap.models import save_lora_adapter, save_student
    from flowmap.student import FlowMap

    if getattr(student.flow_map.net, "config", {}).get("name") != "diffusers":
        raise ValueError(f"--format {fmt} needs a student made from a diffusers model (net 'diffusers')")
    extra = {
        k: v
        for k, v in student.config.items()
        if k not in ("kind", "net", "parametrization", "data_shape", "num_classes", "format", "version")
    }
    if fmt == "lora_adapter":
        save_lora_adapter(out, student.flow_map, **extra)
        result = {"format": fmt, "out": str(out)}
        print(json.dumps(result))
        return result
    noise = torch.randn((batch, *student.data_shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % student.num_classes if student.num_classes else None
    ref = student.sample(noise, labels=labels)
    if fmt == "diffusers":
        from flowmap.pipeline import FlowMapPipeline

        FlowMapPipeline.from_flow_map(student.flow_map, student.config).save_pretrained(out)
        got = FlowMapPipeline.from_pretrained(out)(latents=noise, class_labels=labels, output_type="latent").images
    else:
        from flowmap.app import load_student as reload
        from flowmap.nets.diffusers_net import merged_lora

        save_student(out, FlowMap(merged_lora(student.flow_map.net), student.flow_map.param), **extra)
        got = reload(out).sample(noise, labels=labels)
    diff = float((got - ref).abs().max())
    rel = diff / max(float(ref.abs().max()), 1.0)  # merging W + (alpha / r) B A rounds differently in float32
    result = {
        "format": fmt,
        "out": str(out),
        "max_abs_diff": diff,
        "max_rel_diff": rel,
        "matches_student": rel < TOLERANCE,
    }
    print(json.dumps(result))
    if rel >= TOLERANCE:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main_guard(main)
