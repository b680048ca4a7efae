"""LightningCLI shell shared by ``scripts/train_teacher.py`` and ``scripts/distill.py``.

YAML files compose with repeated ``--config`` (data, trainer, model); extra flags:
``--run_dir`` (everything a run writes), ``--logger`` (wandb | csv | tensorboard | none),
``--export`` (safetensors file written by rank 0 at the end), ``--resume`` (a checkpoint or ``last``),
``--ckpt_every`` (steps between periodic checkpoints), ``--sample_every`` (steps between sample images).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from flowmap.io import atomic_write
from flowmap.lightning.callbacks import ExportModel, SampleLogger
from flowmap.lightning.loggers import LOGGERS, make_logger
from flowmap.lightning.rank_guard import RankGuard


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and moved into place: a preempted write leaves the old file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        import torch

        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class FlowmapCLI(LightningCLI):
    """LightningCLI with the run directory, logger, export and resume flags of flowmap."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("run", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        kwargs.setdefault("seed_everything_default", 0)
        argv = sys.argv
        if kwargs.get("args") is not None:  # our scripts pass their (rewritten) command line as ``args``:
            sys.argv = argv[:1]  # hide the original, or LightningCLI warns that both were given
        try:
            super().__init__(*args, **kwargs)
        finally:
            sys.argv = argv

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default", help="directory for checkpoints, logs, samples")
        parser.add_argument("--logger", type=str, default="wandb", help=f"one of {LOGGERS}")
        parser.add_argument("--export", type=str, default=None, help="safetensors path for the final model")
        parser.add_argument("--resume", type=str, default=None, help="checkpoint path, 'last', or 'auto' (last if it exists)")
        parser.add_argument("--ckpt_every", type=int, default=1000, help="steps between periodic checkpoints")
        parser.add_argument("--sample_every", type=int, default=0, help="steps between logged sample images (0: off)")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config
        run_dir = Path(cfg["run_dir"])
        kwargs.setdefault("default_root_dir", str(run_dir))
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = make_logger(cfg["logger"], run_dir / "logs", name=run_dir.name, config=_plain(cfg)) or False
        callbacks = [ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step{step:07d}", every_n_train_steps=max(int(cfg["ckpt_every"]), 1), save_last=True, save_top_k=-1, auto_insert_metric_name=False)]
        callbacks.append(RankGuard())  # one failing rank stops every rank (Lightning's own ddp launcher)
        if cfg["sample_every"]:
            callbacks.append(SampleLogger(every_n_steps=cfg["sample_every"]))
        if cfg["export"]:
            callbacks.append(ExportModel(cfg["export"]))
        kwargs["callbacks"] = list(trainer_cfg.get("callbacks") or []) + callbacks
        plugins = trainer_cfg.get("plugins") or []
        kwargs["plugins"] = (plugins if isinstance(plugins, list) else [plugins]) + [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def fit(self) -> L.Trainer:
        """Run ``trainer.fit`` with ``--resume`` resolved; returns the trainer."""
        ckpt = self.config["resume"]
        if ckpt == "auto":  # preemptible jobs: resume from last.ckpt when there is one, else start fresh
            last = Path(self.config["run_dir"]) / "checkpoints" / "last.ckpt"
            ckpt = str(last) if last.exists() else None
        elif ckpt == "last":
            last = Path(self.config["run_dir"]) / "checkpoints" / "last.ckpt"
            if not last.exists():
                raise ValueError(f"--resume last: no checkpoint at {last}")
            ckpt = str(last)
        elif ckpt is not None and not Path(ckpt).is_file():
            raise ValueError(f"--resume: no checkpoint file at {ckpt}")
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        return self.trainer


def _plain(cfg) -> dict:
    """The parsed config as plain JSON-able values (for the logger's config panel)."""
    try:
        return cfg.as_dict()
    except Exception:
        return {}


def _user_error(err: BaseException) -> BaseException:
    """The innermost cause of a chained error (jsonargparse wraps our ValueErrors in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def main_guard(main) -> None:
    """Run ``main()``; a user error becomes one clear line on stderr and exit code 2
    (``FLOWMAP_DEBUG=1`` shows the traceback instead)."""
    try:
        main()
    except KeyboardInterrupt:
        raise
    except Exception as err:
        root = _user_error(err)
        user = isinstance(root, (ValueError, FileNotFoundError, KeyError)) or type(err).__name__ == "ArgumentError" or "jsonargparse" in type(err).__module__
        if not user or os.environ.get("FLOWMAP_DEBUG"):
            raise
        print(f"error: {_one_line(root)}", file=sys.stderr)
        sys.exit(2)
