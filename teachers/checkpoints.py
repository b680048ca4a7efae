"""Teachers from checkpoints users already have; the kind is detected from the content, not the name.

    flowmap .safetensors teacher    flowmap.models.load_model (config in the metadata)
    Lightning .ckpt (TeacherModule) torch.load(weights_only=True) only; rebuilt from hyper_parameters
                                    net / path / prediction, with the EMA weights ("ema.*") if present
    diffusers model folder          teachers.diffusers_adapter (UNet2DModel, DiTTransformer2DModel, ...); with an
                                    EDM scheduler (EDMEulerScheduler) it is an EDM denoiser module (EDMDenoiserTeacher)
    Gaussian-mixture .json          teachers.gmm (GaussianMixtureTeacher.save: means, covs, weights, labels)

Each kind is a ``TeacherKind`` in ``TEACHER_KINDS`` (detect from the content, load, describe); ``register_teacher_kind``
adds another without editing ``load_teacher``.

Nothing is unpickled beyond tensors and plain containers: a .ckpt holding other Python objects is
refused by ``weights_only=True`` before any of its code can run, and reported as a CheckpointError
(``flowmap.io.load_torch_file``, the one loading policy). A teacher whose weights hold a NaN or an
infinity is refused at load, whatever its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from flowmap.io import CheckpointError, file_kind, load_state_strict, load_torch_file, nonfinite_tensors
from flowmap.models import load_model
from flowmap.teacher import Teacher
from flowmap.velocity import NetVelocity
from teachers.gmm import is_mixture_file, load_mixture


def _load_safetensors(path: Path) -> tuple[nn.Module, dict]:
    try:
        model = load_model(path)
    except CheckpointError:
        raise
    except ValueError as err:  # e.g. a config naming a net, path or prediction this version does not know
        raise CheckpointError(f"{path}: the saved config does not describe a flowmap teacher ({err})") from None
    config = model.config
    if config.get("kind") != "teacher":
        raise CheckpointError(
            f"{path}: a flowmap {config.get('kind')} checkpoint, not a teacher "
            "(load a student with flowmap.load_student)"
        )
    return model, _net_description("safetensors", path, model, config.get("net", {}).get("name"))


def _load_lightning(path: Path) -> tuple[nn.Module, dict]:
    ckpt = load_torch_file(path, expected=expected())
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path}: a PyTorch file without Lightning's 'state_dict' and 'hyper_parameters'; expected {expected()}"
        )
    if "student" in hp or "objective" in hp:
        raise CheckpointError(
            f"{path}: a DistillModule (student) checkpoint, not a teacher; "
            "export the student and use flowmap.load_student"
        )
    if "net" not in hp:
        raise CheckpointError(
            f"{path}: a Lightning checkpoint without hyper_parameters['net'] (not a flowmap TeacherModule); "
            f"expected {expected()}"
        )
    from flowmap.nets import build_net

    try:
        net = build_net(dict(hp["net"]))
    except ValueError as err:
        raise CheckpointError(f"{path}: hyper_parameters['net'] does not describe a flowmap net ({err})") from None
    state: dict[str, Tensor] = ckpt["state_dict"]
    prefix = "ema." if any(k.startswith("ema.") for k in state) else "net."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    load_state_strict(net, weights, what=f"{path} ({prefix}* weights)")
    teacher = NetVelocity(net, hp.get("path", "linear"), hp.get("prediction", "velocity")).eval()
    return teacher, _net_description(
        "lightning", path, teacher, hp["net"].get("name"), weights="ema" if prefix == "ema." else "net"
    )


def _net_description(kind: str, path: Path, teacher: NetVelocity, net_name: str | None, **extra) -> dict:
    return {
        "kind": kind,
        "source": str(path),
        "name": Path(path).name,
        "model": net_name,
        "prediction": teacher.prediction,
        "path": teacher.path.name,
        "data_shape": list(teacher.data_shape),
        "num_classes": teacher.num_classes,
        "null_class": teacher.num_classes > 0,
        **extra,
    }


def load_teacher(
    path: str | Path, null_class: bool = False, allow_clip_mismatch: bool = False
) -> tuple[nn.Module, dict]:
    """(teacher, description) from ``path``: see the module docstring for the kinds detected.

    ``null_class`` applies to class-conditional diffusers UNet2DModels only: their last class embedding
    is the unconditional class; ``allow_clip_mismatch`` accepts a diffusers scheduler that clips x0
    (``teachers.diffusers_adapter.clip_mismatch``). Anything else raises one CheckpointError naming what was
    expected, and so does a teacher with non-finite weights."""
    teacher, description = _load_any(Path(path), null_class, allow_clip_mismatch)
    bad = nonfinite_tensors(teacher.state_dict())
    if bad:
        raise CheckpointError(
            f"{path}: the teacher's weights hold NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); "
            "refusing to distill from it: use a finite checkpoint (e.g. an earlier one)"
        )
    return teacher, description


def _load_any(p: Path, null_class: bool, allow_clip_mismatch: bool) -> tuple[nn.Module, dict]:
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; expected {expected()}")
    for kind in TEACHER_KINDS.values():
        if kind.detect(p):
            return kind.load(p, null_class=null_class, allow_clip_mismatch=allow_clip_mismatch)
    if p.is_dir():
        raise CheckpointError(
            f"{p}: a folder that is not a diffusers model folder "
            f"(no model_index.json or config.json with _class_name); expected {expected()}"
        )
    raise CheckpointError(
        f"{p}: not a checkpoint (no kind of teachers.TEACHER_KINDS recognises its content); expected {expected()}"
    )


# --- the kinds of teacher files ----------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherKind:
    """A kind of teacher file or folder: ``detect(path) -> bool`` from the content (never the name),
    ``load(path, null_class=..., allow_clip_mismatch=...) -> (Teacher, description)``, and what it is, for errors."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., tuple[Teacher, dict]]
    expected: str


TEACHER_KINDS: dict[str, TeacherKind] = {}


def register_teacher_kind(kind: TeacherKind, overwrite: bool = False) -> None:
    """Add a kind that ``load_teacher`` (and ``CheckpointTeacher``) tries, in registration order."""
    if kind.name in TEACHER_KINDS and not overwrite:
        raise ValueError(f"teacher kind {kind.name!r} is already registered (pass overwrite=True to replace it)")
    TEACHER_KINDS[kind.name] = kind


def expected() -> str:
    """What ``load_teacher`` reads: the registered kinds, for one-line errors."""
    names = [k.expected for k in TEACHER_KINDS.values()]
    return ", ".join(names[:-1]) + f", or {names[-1]}" if len(names) > 1 else "".join(names)


def _is_file_of(*kinds: str) -> Callable[[Path], bool]:
    return lambda p: p.is_file() and file_kind(p) in kinds


def _is_diffusers_folder(p: Path) -> bool:
    from teachers.diffusers_adapter import is_diffusers_folder

    return is_diffusers_folder(p)


def _load_diffusers(p: Path, null_class: bool = False, allow_clip_mismatch: bool = False) -> tuple[nn.Module, dict]:
    from teachers.diffusers_adapter import load_diffusers_teacher

    return load_diffusers_teacher(p, null_class=null_class, allow_clip_mismatch=allow_clip_mismatch)


for _kind in (
    TeacherKind(
        "safetensors",
        _is_file_of("safetensors"),
        lambda p, **_: _load_safetensors(p),
        "a flowmap teacher .safetensors file",
    ),
    TeacherKind(  # a bare pickle stream is refused there with the same one line
        "lightning",
        _is_file_of("torch-zip", "pickle"),
        lambda p, **_: _load_lightning(p),
        "a Lightning .ckpt of a flowmap TeacherModule",
    ),
    TeacherKind(
        "diffusers",
        _is_diffusers_folder,
        _load_diffusers,
        "a diffusers model folder (an EDM denoiser: a model folder with an EDMEulerScheduler config)",
    ),
    TeacherKind(
        "mixture",
        is_mixture_file,
        lambda p, **_: load_mixture(p),
        "a Gaussian-mixture .json file (GaussianMixtureTeacher.save)",
    ),
):
    register_teacher_kind(_kind)


def describe_teacher(description: dict) -> str:
    """One line: kind, model, prediction, path, data shape, classes."""
    d = description
    what = d.get("kind", "?")
    if d.get("model"):
        what += f" {d['model']}"
    if d.get("scheduler"):
        what += f" + {d['scheduler']}"
    n = int(d.get("num_classes", 0))
    classes = (
        "unconditional"
        if n == 0
        else f"{n} classes" + (" + null label (CFG)" if d.get("null_class") else ", no null label (no CFG)")
    )
    pred = d.get("prediction", "?")
    if d.get("diffusers_prediction"):
        pred = f"{d['diffusers_prediction']} -> {pred}"
    steps = f" ({d['num_train_timesteps']} train steps)" if d.get("num_train_timesteps") else ""
    classes = d["text"]["text"] if d.get("text") else classes
    space = d["latent"]["text"] if d.get("latent") else f"data shape {tuple(d.get('data_shape', ()))}"
    line = f"{what}: prediction {pred}, path {d.get('path', '?')}{steps}, {space}, {classes}"
    if d.get("weights"):
        line += f", {d['weights']} weights"
    for note in d.get("notes", []):
        line += f"; note: {note}"
    return line


class CheckpointTeacher(Teacher):
    """A frozen ``Teacher`` loaded from ``path`` (any kind ``load_teacher`` detects); a plain constructor
    so LightningCLI YAML can build it: ``{"class_path": "teachers.CheckpointTeacher", "init_args": {"path": ...}}``.

    The loaded teacher (``self.teacher``) keeps its own path, time map and conditions: every call is its own.
    velocity(x (B, *data_shape), t (B,), cond (B,) or None, guidance) -> (B, *data_shape)."""

    def __init__(self, path: str, null_class: bool = False, allow_clip_mismatch: bool = False) -> None:
        super().__init__()
        teacher, description = load_teacher(path, null_class=null_class, allow_clip_mismatch=allow_clip_mismatch)
        self.teacher = teacher
        self.source = str(path)
        self.description = description
        self.path = teacher.path
        self.data_shape: tuple[int, ...] = tuple(teacher.data_shape)
        self.num_classes: int = int(teacher.num_classes)
        self.cond_kind = teacher.cond_kind
        self.requires_grad_(False)
        self.eval()

    def path_velocity(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.teacher.path_velocity(x, t, cond)

    def from_linear(self, x_lin: Tensor, t_lin: Tensor) -> tuple[Tensor, Tensor]:
        return self.teacher.from_linear(x_lin, t_lin)

    def to_linear(self, v: Tensor, x: Tensor, t: Tensor, t_lin: Tensor) -> Tensor:
        return self.teacher.to_linear(v, x, t, t_lin)

    def velocity(self, x: Tensor, t: Tensor, cond=None, guidance: float | Tensor = 1.0) -> Tensor:
        return self.teacher.velocity(x, t, cond, guidance)

    def extra_repr(self) -> str:
        return describe_teacher(self.description)
