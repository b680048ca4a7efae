#!/usr/bin/env python
"""Sample a student or any teacher: a PNG (2-D scatter or image grid) plus an .npz (or shards).

    python scripts/sample.py runs/cd/student.safetensors --n 2000 --steps 1 --out runs/cd/samples
    python scripts/sample.py runs/teacher/teacher.safetensors --steps 32 --solver heun --out runs/teacher/samples
    python scripts/sample.py my_diffusers_folder --n 10000 --batch_size 500 --steps 32 --out teacher_samples

A teacher is any file or folder ``teachers.load_teacher`` reads (our .safetensors, a Lightning .ckpt of a
TeacherModule, a diffusers folder). Teachers are sampled in chunks of ``--batch_size`` written to disk as they
come (``samples.npz`` with ``x`` and, with ``--label``, ``y``; or ``--shards`` for the shard format of
``flowmap/data/shards.py``), so memory holds one chunk. ``--teacher_sampler diffusers`` runs the diffusers
folder's own DDIM sampler, x0 clipping included (``teachers/diffusers_sampler.py``).

Latent models (a pipeline folder with ``vae/``, or a student distilled from one): samples are decoded to images
by the VAE the folder / student file references (``flowmap/latent.py``) unless ``--latents``; ``--shards`` always
holds latents (the teacher's data, for data-free distillation); the PNG always shows images. Text-to-image
models take ``--prompt`` (encoded once by the folder's text encoder, ``flowmap/text.py``; ``--guidance`` is CFG
against the empty prompt for teachers):

    python scripts/sample.py sd_folder --prompt "a red cat" --n 4 --steps 25 --guidance 4.5 --out cats
    python scripts/sample.py sd_folder --prompts captions.txt --n 100000 --shards --guidance 4.5 --out data_free

``--prompts FILE`` (one prompt per line; sample i takes prompt i mod P) with ``--shards`` is the data-free text
mode: teacher latents with their prompt's condition (``<key>.emb.npy``, and ``.pool.npy`` / ``.mask.npy`` where the
pipeline has pooled embeddings / a mask), ready for ``scripts/distill.py``. Every text encoder the folder has
encodes the prompt, as its pipeline does (SD3: CLIP-L + CLIP-G + T5, pooled embeddings included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flowmap.conditions import TextCondition  # noqa: E402
from flowmap.conditions import to as condition_to  # noqa: E402
from flowmap.guard import ScriptParser, main_guard  # noqa: E402
from flowmap.io import CheckpointError  # noqa: E402
from flowmap.latent import codec_of, decode_in_chunks  # noqa: E402
from flowmap.models import load_model, student_sampler  # noqa: E402
from flowmap.plotting import save_panels  # noqa: E402
from flowmap.runtime import THREADS_HELP, set_cpu_threads  # noqa: E402
from flowmap.sampling import sample  # noqa: E402
from flowmap.solvers import solve  # noqa: E402
from flowmap.student import FlowMap  # noqa: E402
from flowmap.text import prompt_encoder_of  # noqa: E402
from flowmap.time_grids import GRIDS, make_grid  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a student .safetensors, or a teacher: .safetensors, .ckpt, diffusers folder")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 1 for students, 32 for teachers)")
    p.add_argument("--solver", default="heun", help="teacher ODE solver: euler, heun, midpoint, rk4, dpm++2m, edm_heun")
    p.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="stochastic re-noising between student steps, in [0, 1] (default: the student's method's)",
    )
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    p.add_argument("--prompt", default=None, help="text prompt (text-to-image models)")
    p.add_argument("--prompts", default=None, help="a text file of prompts, one per line, cycled over the samples")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--latents", action="store_true", help="latent models: write latents, not VAE-decoded images")
    add_teacher_arguments(p)
    a = p.parse_args(argv)
    if a.n < 1:
        raise ValueError(f"--n must be at least 1, got {a.n}")
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {a.steps}")
    if a.gamma is not None and not 0.0 <= a.gamma <= 1.0:
        raise ValueError(f"--gamma must lie in [0, 1], got {a.gamma}")
    return a


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teachers")
    g.add_argument("--grid", default="uniform", choices=sorted(GRIDS), help="time grid of the ODE solver")
    g.add_argument(
        "--teacher_sampler",
        default="ode",
        choices=["ode", "diffusers"],
        help="ode: --solver on --grid; diffusers: the folder's DDIM / flow Euler, x0 clipping included",
    )
    g.add_argument(
        "--allow_clip_mismatch",
        action="store_true",
        help="sample the unclipped ODE of a diffusers folder whose scheduler clips x0",
    )
    g.add_argument("--batch_size", type=int, default=1000, help="samples per chunk (memory holds one chunk)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cuda, cuda:1, cpu")
    g.add_argument("--shards", action="store_true", help="write OUT/shards/ (flowmap/data/shards.py), not samples.npz")
    g.add_argument("--shard_size", type=int, default=10_000, help="samples per shard with --shards")


def load_checkpoint(a: argparse.Namespace):
    """A student (FlowMap) from a flowmap student file, else a teacher of any kind teachers.load_teacher reads."""
    p = Path(a.checkpoint)
    if p.is_file():
        try:
            model = load_model(p)
        except CheckpointError:
            model = None  # not a flowmap safetensors file (e.g. a Lightning .ckpt): load_teacher says what it is
        if isinstance(model, FlowMap):
            return model
    from teachers import load_teacher

    allow = a.allow_clip_mismatch or a.teacher_sampler == "diffusers"  # the diffusers sampler clips as the folder does
    return load_teacher(p, allow_clip_mismatch=allow)[0]


def teacher_chunks(teacher, a: argparse.Namespace, steps: int):
    """(x (b, *data_shape) float32 on the CPU, labels (b,) or None) per chunk of --batch_size samples."""
    g = torch.Generator().manual_seed(a.seed)
    guidance = 1.0 if a.guidance is None else a.guidance
    if a.teacher_sampler == "diffusers":
        from teachers.diffusers_sampler import ddim_sample

        if not hasattr(getattr(teacher, "teacher", teacher), "scheduler_config"):
            raise ValueError("--teacher_sampler diffusers needs a diffusers folder as the teacher")
    else:
        grid = make_grid(a.grid, steps)
    table = prompt_table(teacher, a)
    for start in range(0, a.n, a.batch_size):
        b = min(a.batch_size, a.n - start)
        noise = torch.randn((b, *teacher.data_shape), generator=g).to(a.device)
        cond = None if a.label is None else torch.full((b,), a.label, dtype=torch.long, device=a.device)
        if table is not None:
            cond = table[torch.arange(start, start + b) % len(table)].to(a.device)
        with torch.no_grad():
            if a.teacher_sampler == "diffusers":
                x = ddim_sample(teacher, noise, steps, cond=cond, guidance=guidance)
            else:
                x = solve(teacher, noise, grid.to(a.device), a.solver, cond=cond, guidance=guidance)
        yield x.float().cpu(), condition_to(cond, "cpu")


def prompt_table(model, a: argparse.Namespace) -> TextCondition | None:
    """The ``TextCondition`` (P rows: prompt embeddings, pooled embeddings, mask where the pipeline has them, the
    empty prompt's null) of --prompt (P = 1) or of the --prompts file's lines, encoded once, in chunks of
    --batch_size, by the text encoder(s) the model (teacher or student) references; None without prompts."""
    if a.prompt is None and a.prompts is None:
        return None
    if a.prompt is not None and a.prompts is not None:
        raise ValueError("give --prompt or --prompts, not both")
    if a.prompts is not None:
        try:
            prompts = Path(a.prompts).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--prompts {a.prompts}: unreadable ({err})") from None
        if not prompts:
            raise ValueError(f"--prompts {a.prompts} holds no prompt")
    else:
        prompts = [a.prompt]
    encoder = prompt_encoder_of(model)
    if encoder is None:
        raise ValueError(
            "--prompt needs a text-to-image model (a pipeline folder with tokenizer/ and text_encoder/, "
            "or a student distilled from one)"
        )
    return TextCondition.cat(
        [encoder.condition(prompts[i : i + a.batch_size]) for i in range(0, len(prompts), a.batch_size)]
    )


def sample_teacher(teacher, a: argparse.Namespace) -> Path:
    """Sample ``teacher`` chunk by chunk into OUT/samples.npz (or OUT/shards/), with a progress bar and a PNG."""
    from tqdm import tqdm

    from flowmap.data.npz_stream import write_npz_chunks
    from flowmap.data.shards import write_shards

    if a.n < 1 or a.batch_size < 1:
        raise ValueError(f"--n and --batch_size must be at least 1, got {a.n} and {a.batch_size}")
    steps = a.steps or 32
    teacher = teacher.to(a.device).eval()
    shape = tuple(teacher.data_shape)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=a.n, unit="sample", desc="teacher samples", file=sys.stderr, mininterval=2.0)
    first: list[torch.Tensor] = []
    codec = codec_of(teacher)
    if codec is not None:
        codec.to(a.device)
    decode = (lambda x: x) if codec is None else (lambda x: codec.decode(x.to(a.device)).cpu())
    decoded = codec is not None and not a.latents and not a.shards

    def chunks():
        for x, c in teacher_chunks(teacher, a, steps):
            if not first:
                first.append(decode(x[: 64 if len(shape) > 1 else 5000]))
            bar.update(x.shape[0])
            yield x, c

    if a.shards:
        y = -1 if a.label is None else int(a.label)
        text = a.prompt is not None or a.prompts is not None  # rows carry their prompt embedding
        rows = ((x[j], c[j] if text else y) for x, c in chunks() for j in range(x.shape[0]))
        write_shards(
            rows,
            out / "shards",
            shape=shape,
            num_classes=int(getattr(teacher, "num_classes", 0)),
            max_count=a.shard_size,
            overwrite=True,
            source={"teacher": str(a.checkpoint), "steps": steps},
        )
        target = out / "shards"
    else:
        extra = None if a.label is None else {"y": np.full(a.n, a.label, dtype=np.int64)}
        rows = (decode(x).numpy() if decoded else x.numpy() for x, _ in chunks())
        target = write_npz_chunks(
            out / "samples.npz", rows, a.n, codec.image_shape(shape) if decoded else shape, extra=extra
        )
    bar.close()
    how = f"diffusers sampler {steps} steps" if a.teacher_sampler == "diffusers" else f"{a.solver} {steps} steps"
    save_panels(out / "samples.png", {f"teacher, {how}": first[0]})
    print(f"wrote {out / 'samples.png'} and {target}")
    return out


def main(argv: list[str] | None = None) -> Path:
    a = parse(argv)
    set_cpu_threads(a.threads)
    model = load_checkpoint(a)
    if not isinstance(model, FlowMap):
        return sample_teacher(model, a)
    g = torch.Generator().manual_seed(a.seed)
    noise = torch.randn((a.n, *model.data_shape), generator=g)
    cond = None if a.label is None else torch.full((a.n,), a.label, dtype=torch.long)
    table = prompt_table(model, a)
    if table is not None:
        cond = table[torch.arange(a.n) % len(table)]
    steps = a.steps or 1
    gamma = student_sampler(model.config)["gamma"] if a.gamma is None else a.gamma
    x = sample(model, noise, steps, cond=cond, gamma=gamma, guidance=a.guidance, generator=g)
    codec = codec_of(model)
    if codec is not None:
        image = decode_in_chunks(codec.to(a.device), x.to(a.device), a.batch_size).cpu()
        x = x if a.latents else image
    title = f"student, {steps} NFE" + (f", gamma {gamma:g}" if gamma else "")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = cond.numpy() if cond is not None and table is None else np.zeros(0)
    np.savez(out / "samples.npz", x=x.numpy(), labels=labels)
    save_panels(out / "samples.png", {title: x if codec is None else image})
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'}")
    return out


if __name__ == "__main__":
    main_guard(main)
