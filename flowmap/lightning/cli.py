"""LightningCLI shell shared by ``scripts/train_teacher.py`` and ``scripts/distill.py``.

YAML files compose with repeated ``--config`` (data, trainer, model); extra flags:
``--run_dir`` (everything a run writes), ``--logger`` (wandb | csv | tensorboard | none),
``--export`` (safetensors file written by rank 0 at the end), ``--resume`` (a checkpoint or ``last``),
``--ckpt_every`` (steps between periodic checkpoints), ``--sample_every`` (steps between sample images),
``--teacher_swap`` (resume a distillation with another teacher), ``--debug`` (tracebacks instead of one line).

Before anything is written, ``FlowmapCLI.preflight`` checks what can be checked: ``max_steps``, that the run
dir and the export path can be written, that the data's sample shape is the network's, and that a
``--resume`` file is a checkpoint of this run (read with the one loading policy, ``flowmap.io.load_torch_file``).
Lightning's info lines go to stdout; stderr keeps warnings and errors.
"""

from __future__ import annotations

import inspect
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
from jsonargparse import ActionYesNo
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from flowmap.guard import main_guard  # noqa: F401  (scripts import it from here)
from flowmap.io import atomic_write, load_torch_file
from flowmap.lightning.callbacks import ExportModel, LastCheckpoint, SampleLogger
from flowmap.lightning.loggers import LOGGERS, make_logger
from flowmap.lightning.rank_guard import RankGuard


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and moved into place: a preempted write leaves the old file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        import torch

        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    preloaded: tuple[str, dict] | None = None  # (path, checkpoint) read by the CLI's pre-flight check

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        """Every Lightning restore (``ckpt_path``, ``last``, SLURM's ``hpc``) reads through the one loading
        policy: a torch zip file with ``weights_only=True`` forced, whatever ``weights_only`` Lightning asks for."""
        if self.preloaded is not None and self.preloaded[0] == str(path):
            checkpoint, self.preloaded = self.preloaded[1], None
            return checkpoint
        return load_torch_file(path, expected=RESUME_EXPECTED)


RESUME_EXPECTED = "a Lightning checkpoint written by a flowmap run (checkpoints/last.ckpt or checkpoints/step*.ckpt)"


class FlowmapCLI(LightningCLI):
    """LightningCLI with the run directory, logger, export and resume flags of flowmap."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("run", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        kwargs.setdefault("seed_everything_default", 0)
        _info_to_stdout()
        argv = sys.argv
        if kwargs.get("args") is not None:  # our scripts pass their (rewritten) command line as ``args``:
            sys.argv = argv[:1]  # hide the original, or LightningCLI warns that both were given
        try:
            super().__init__(*args, **kwargs)
        finally:
            sys.argv = argv

    def before_instantiate_classes(self) -> None:
        """``--threads``: torch's CPU threads (0: ``flowmap.runtime.pick_threads``), set before anything is built."""
        from flowmap.runtime import set_cpu_threads

        set_cpu_threads(int(self.config["threads"]))

    def add_arguments_to_parser(self, parser) -> None:
        from flowmap.runtime import THREADS_HELP

        parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
        parser.add_argument(
            "--run_dir", type=str, default="runs/default", help="directory for checkpoints, logs, samples"
        )
        parser.add_argument("--logger", type=str, default="wandb", help=f"one of {LOGGERS}")
        parser.add_argument("--export", type=str, default=None, help="safetensors path for the final model")
        parser.add_argument(
            "--resume", type=str, default=None, help="checkpoint path, 'last', or 'auto' (last if it exists)"
        )
        parser.add_argument("--ckpt_every", type=int, default=1000, help="steps between periodic checkpoints")
        parser.add_argument("--sample_every", type=int, default=0, help="steps between logged sample images (0: off)")
        parser.add_argument(
            "--teacher_swap",
            action=ActionYesNo,
            default=False,
            help="with --resume: continue a distillation with another teacher than the checkpoint's",
        )
        parser.add_argument("--debug", action=ActionYesNo, default=False, help="show tracebacks (also FLOWMAP_DEBUG=1)")
        if "teacher" in inspect.signature(self.model_class).parameters:  # scripts/distill.py expands it before parsing
            parser.add_argument(
                "--teacher",
                type=Optional[str],
                default=None,
                help="teacher: our .safetensors / .ckpt file or a diffusers folder (sets --model.teacher)",
            )
            parser.add_argument(
                "--allow_clip_mismatch",
                action="store_true",
                help="accept a diffusers scheduler that clips x0 (the velocity field does not)",
            )
            from flowmap.lightning.help import describe_dict_arguments

            describe_dict_arguments(parser)  # each method's hyperparameters and each net's options, typed

    def resume_path(self) -> str | None:
        """``--resume`` resolved to a file path (``last``: the run's last.ckpt; ``auto``: it if it exists)."""
        ckpt = self.config["resume"]
        last = Path(self.config["run_dir"]) / "checkpoints" / "last.ckpt"
        if ckpt == "auto":  # preemptible jobs: resume from last.ckpt when there is one, else start fresh
            return str(last) if last.exists() else None
        if ckpt == "last":
            if not last.exists():
                raise ValueError(f"--resume last: no checkpoint at {last}")
            return str(last)
        if ckpt is not None and not Path(ckpt).is_file():
            raise ValueError(f"--resume: no checkpoint file at {ckpt}")
        return ckpt

    def preflight(self) -> dict | None:
        """Check what can be checked before anything is written; returns the ``--resume`` checkpoint (or None)."""
        cfg = self.config
        trainer_cfg = cfg.get("trainer") or {}
        max_steps = trainer_cfg.get("max_steps")
        if max_steps is not None and (int(max_steps) == 0 or int(max_steps) < -1):
            raise ValueError(f"--trainer.max_steps must be a positive number of optimizer steps, got {max_steps}")
        if int(cfg["ckpt_every"]) < 1:
            raise ValueError(f"--ckpt_every must be a positive number of steps, got {cfg['ckpt_every']}")
        check_writable(Path(cfg["run_dir"]), "--run_dir", folder=True)
        if cfg["export"]:
            check_writable(Path(cfg["export"]), "--export", folder=False)
        if callable(getattr(self.model, "check_data", None)):
            self.model.check_data(self.datamodule)
        if hasattr(self.model, "allow_teacher_swap"):
            self.model.allow_teacher_swap = bool(cfg["teacher_swap"])
        path = self.resume_path()
        self._resume = path
        if path is None:
            return None
        checkpoint = load_torch_file(path, expected=RESUME_EXPECTED)
        if callable(getattr(self.model, "check_resume", None)):
            self.model.check_resume(checkpoint)
        return checkpoint

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        checkpoint = self.preflight()  # before the logger or anything else creates a file
        checkpoint_io = AtomicCheckpointIO()
        if checkpoint is not None:
            checkpoint_io.preloaded = (self._resume, checkpoint)
        cfg = self.config
        run_dir = Path(cfg["run_dir"])
        kwargs.setdefault("default_root_dir", str(run_dir))
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = (
                make_logger(cfg["logger"], run_dir / "logs", name=run_dir.name, config=_plain(cfg)) or False
            )
        callbacks = [
            LastCheckpoint(
                dirpath=str(run_dir / "checkpoints"),
                filename="step{step:07d}",
                every_n_train_steps=max(int(cfg["ckpt_every"]), 1),
                save_top_k=-1,
                auto_insert_metric_name=False,
            )
        ]
        callbacks.append(RankGuard())  # one failing rank stops every rank (Lightning's own ddp launcher)
        if cfg["sample_every"]:
            callbacks.append(SampleLogger(every_n_steps=cfg["sample_every"]))
        if cfg["export"]:
            callbacks.append(ExportModel(cfg["export"]))
        kwargs["callbacks"] = list(trainer_cfg.get("callbacks") or []) + callbacks
        plugins = trainer_cfg.get("plugins") or []
        kwargs["plugins"] = (plugins if isinstance(plugins, list) else [plugins]) + [checkpoint_io]
        return super().instantiate_trainer(**kwargs)

    def fit(self) -> L.Trainer:
        """Run ``trainer.fit`` with ``--resume`` resolved; returns the trainer."""
        ckpt = self._resume if hasattr(self, "_resume") else self.resume_path()
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        return self.trainer


def _plain(cfg) -> dict:
    """The parsed config as plain JSON-able values (for the logger's config panel)."""
    try:
        return cfg.as_dict()
    except Exception:
        return {}


def check_writable(path: Path, flag: str, folder: bool) -> None:
    """Raise one ValueError unless ``path`` (a folder, or a file if not ``folder``) can be created and written;
    probes the nearest existing ancestor with a temporary file, so nothing is left behind."""
    if path.exists() and folder != path.is_dir():
        what = "exists and is not a folder" if folder else "is a folder, not a file path"
        raise ValueError(f"{flag} {path}: {what}")
    probe = path if folder else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is a regular file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        reason = err.strerror or err
        raise ValueError(f"{flag} {path}: cannot write in {probe} ({reason}); choose a writable path") from None


class _StdoutInfo(logging.StreamHandler):
    """Lightning's info lines (seed, devices, restore) on the current ``sys.stdout``."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(lambda record: record.levelno < logging.WARNING)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _info_to_stdout() -> None:
    """Send Lightning's info lines to stdout and keep its stderr handlers for warnings and errors, so a user
    error is the only line on stderr."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        log = logging.getLogger(name)
        if any(isinstance(h, _StdoutInfo) for h in log.handlers):
            continue
        for h in log.handlers:
            if type(h) is logging.StreamHandler:
                h.addFilter(lambda record: record.levelno >= logging.WARNING)
        if log.handlers:
            log.addHandler(_StdoutInfo())
