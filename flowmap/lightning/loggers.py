"""Loggers: Weights & Biases by default, offline when no API key is set (no prompt, no hang), CSV or
TensorBoard on request; a logger that fails to start warns (one line) and training goes on with CSV.

An online W&B start waits at most ``WANDB_INIT_TIMEOUT`` seconds (wandb's own variable; default here
``WANDB_START_TIMEOUT`` = 5 s instead of wandb's 90 s), so a bad key or an unreachable server costs a few
seconds, not a minute and a half."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

LOGGERS = ("wandb", "csv", "tensorboard", "none")
WANDB_START_TIMEOUT = 5.0  # seconds wandb.init may take before the run falls back to CSV


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def make_logger(
    kind: str, save_dir: str | Path, name: str | None = None, project: str = "flowmap", config: dict | None = None
):
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
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled")
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        settings = wandb.Settings(init_timeout=_init_timeout())  # read here: wandb reads its variable once a process
        logger = WandbLogger(
            project=project,
            name=name,
            save_dir=str(save_dir),
            offline=offline,
            log_model=False,
            config=config,
            settings=settings,
        )
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)  # wandb >= 0.19 warns that it has no effect
        _ = logger.experiment  # start now (rank 0 only), so a failure falls back here, not mid-training
        return logger
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]  # wandb's errors add lines of advice
        wait = "" if offline else f" within WANDB_INIT_TIMEOUT={_init_timeout():g} s"
        warnings.warn(f"W&B logger failed to start{wait} ({type(err).__name__}: {first}); logging to CSV instead")
        return make_logger("csv", save_dir)


def _init_timeout() -> float:
    """Seconds an online ``wandb.init`` may take: ``WANDB_INIT_TIMEOUT`` if set, else ``WANDB_START_TIMEOUT``."""
    value = os.environ.get("WANDB_INIT_TIMEOUT", "")
    try:
        return float(value) if value.strip() else WANDB_START_TIMEOUT
    except ValueError:
        raise ValueError(f"WANDB_INIT_TIMEOUT={value!r} is not a number of seconds") from None
