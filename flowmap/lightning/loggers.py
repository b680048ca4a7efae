"""Loggers: Weights & Biases by default, offline when no API key is set (no prompt, no hang), CSV or
TensorBoard on request; a logger that fails to start warns and training goes on with CSV."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

LOGGERS = ("wandb", "csv", "tensorboard", "none")


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def make_logger(kind: str, save_dir: str | Path, name: str | None = None, project: str = "flowmap", config: dict | None = None):
    """A Lightning logger of ``kind`` writing below ``save_dir``; None for ``none``."""
    if kind not in LOGGERS:
        raise ValueError(f"unknown logger {kind!r}; choose from {list(LOGGERS)}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if kind == "none":
        return None
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(save_dir), name="csv", version="")
    if kind == "tensorboard":
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(str(save_dir), name="tensorboard", version="")
        except Exception as err:  # tensorboard missing or broken
            warnings.warn(f"TensorBoard logger failed to start ({err}); logging to CSV instead")
            return make_logger("csv", save_dir)
    # W&B: never prompt. Without credentials run offline; a broken install or init falls back to CSV.
    os.environ.setdefault("WANDB_SILENT", "true")
    if not wandb_has_credentials() and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = "offline"
    try:
        from lightning.pytorch.loggers import WandbLogger

        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled")
        logger = WandbLogger(project=project, name=name, save_dir=str(save_dir), offline=offline, log_model=False, config=config)
        _ = logger.experiment  # start now (rank 0 only), so a failure falls back here, not mid-training
        return logger
    except Exception as err:
        warnings.warn(f"W&B logger failed to start ({type(err).__name__}: {err}); logging to CSV instead")
        return make_logger("csv", save_dir)
